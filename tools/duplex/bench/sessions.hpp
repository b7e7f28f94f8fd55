// duplex bench: how each transport is measured, as a session the rows open (sessions.cpp).
//
// Every session pins its peer (a thread or a forked child; the consumer thread for throughput)
// to cpus.b, and is closed by its destructor, which ends and reaps the peer. Opening throws
// failure when the transport cannot be set up (e.g. "socketpair: Too many open files").
#pragma once

#include <cstddef>
#include <memory>

#include "bench.hpp"
#include "duplex/channel.hpp"
#include "duplex/ring.hpp"

namespace duplex::cli::bench {

// The raw baselines' links: a socket pair of either kind, two pipes, or a connection accepted
// from a listening socket: AF_UNIX stream on a filesystem path, or TCP on 127.0.0.1 with
// TCP_NODELAY on both ends.
enum class raw_kind { stream, seqpacket, pipe, unix_path, tcp };

// Where the endpoint rows listen: a unix socket path in the temporary directory, or tcp
// loopback.
enum class endpoint_kind { unix_path, tcp };

// Round trips: run(n) sends n messages of size bytes, each after the echo of the one before.
// spin: both ends wait by retrying recv(MSG_DONTWAIT) instead of blocking.
[[nodiscard]] std::unique_ptr<session> open_raw_rtt(raw_kind kind, peers who, std::size_t size,
                                                    bool spin, const placement& cpus);
[[nodiscard]] std::unique_ptr<session> open_channel_rtt(socket_kind kind,
                                                        const channel_options& options, peers who,
                                                        std::size_t size, const placement& cpus);
// duplex::listener and duplex::connect (no authkey) on kind: the accepted connection's channel.
[[nodiscard]] std::unique_ptr<session> open_endpoint_rtt(endpoint_kind kind, peers who,
                                                         std::size_t size, const placement& cpus);
// Connections: run(n) makes n connections one after the other, each with one round trip of
// 8 B over it and then closed, a thread accepting and echoing. duplex: duplex::connect with a
// 32-byte authkey (the handshake) against a duplex::listener's accept, channels' send and
// receive; raw: socket() and connect() against accept4(), send() and recv().
[[nodiscard]] std::unique_ptr<session> open_connect(endpoint_kind kind, bool duplex,
                                                    const placement& cpus);
[[nodiscard]] std::unique_ptr<session> open_ring_rtt(const ring_options& options, peers who,
                                                     std::size_t size, const placement& cpus);

// Throughput: run(n) sends n messages of size bytes from this thread to a consumer thread, each
// filled by the producer and checked by the consumer.
[[nodiscard]] std::unique_ptr<session> open_raw_throughput(raw_kind kind, std::size_t size,
                                                           const placement& cpus);
[[nodiscard]] std::unique_ptr<session> open_endpoint_throughput(endpoint_kind kind,
                                                                std::size_t size,
                                                                const placement& cpus);
// One thread: memset, memcpy, check. The ceiling of a transport that copies once.
[[nodiscard]] std::unique_ptr<session> open_memcpy_throughput(std::size_t size);
[[nodiscard]] std::unique_ptr<session> open_channel_throughput(socket_kind kind, std::size_t size,
                                                               const placement& cpus);
// duplex::batch of 64 messages per send, received with receive_batch.
[[nodiscard]] std::unique_ptr<session> open_batch_throughput(std::size_t size,
                                                             const placement& cpus);
[[nodiscard]] std::unique_ptr<session> open_ring_throughput(const ring_options& options,
                                                            std::size_t size,
                                                            const placement& cpus);
// Messages allocate()d in the shared pool and sent by move; mode: received as views or copies.
[[nodiscard]] std::unique_ptr<session> open_shm_throughput(shared_receive mode, std::size_t size,
                                                           const placement& cpus);

}  // namespace duplex::cli::bench
