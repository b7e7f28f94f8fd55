// duplex/channel.hpp - whole messages, with fds, over one end of a socket pair.
//
// A channel moves messages (bytes plus fds) over a stream or seqpacket socket and never loses,
// cuts, interleaves or leaks anything, whatever the peer does:
//
//   - On a stream, each message is a frame (framing::native: a 16-byte header, docs/protocol.md;
//     or framing::python: CPython multiprocessing.connection's length prefix). On a seqpacket
//     socket, each message is one packet that starts with the native header.
//   - Every header from the peer is checked completely before anything is allocated: the length
//     against this end's max_message_size, the version and flags, and the announced fd count
//     against the fds that really arrived with the frame's first byte.
//   - Every message sent before the peer closed is delivered, then errc::peer_closed. A stream
//     that ends inside a frame gives errc::truncated_message once, then peer_closed.
//   - A header that breaks the protocol gives errc::protocol_error and breaks the channel: every
//     later call returns errc::broken. On a stream the same holds for a length over the maximum
//     (errc::message_too_large), since a stream cannot skip what it cannot trust; a seqpacket
//     channel discards the oversized packet and carries on.
//   - A well-formed message this end refuses (more fds than max_fds: errc::too_many_fds; fds the
//     kernel cut short: errc::fds_truncated; no memory: ENOMEM) is skipped whole, its fds closed,
//     and the next message is intact.
//   - fds are received close-on-exec, at most 253 per message (254 are refused before anything
//     is sent, and the caller keeps its fds). Every fd that arrives and is not handed to the
//     caller is closed before the call returns.
//
// Threads: send, receive and close may be called from several threads at once. Each message is
// sent whole under a lock, so messages from several senders never interleave. Concurrent
// receivers each get whole messages, every message goes to exactly one of them, and the order
// they get them in is the order of the stream, but which thread gets which is unspecified.
// Moving or destroying a channel while another thread uses it is a data race.
//
// Why not datagram pairs: a datagram socketpair never reports the peer's close to a reader
// (see docs/errors.md), so "every message, then peer_closed" cannot be kept; create() refuses
// them with errc::wrong_kind. Use seqpacket for packets.
//
//   auto ends = duplex::channel_pair(duplex::socket_kind::stream);
//   ends->first.send(duplex::as_bytes("hello"));
//   duplex::result<duplex::message> m = ends->second.receive();
//   if (m) std::cout << m->text() << '\n';
#pragma once

#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <new>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "duplex/batch.hpp"
#include "duplex/buffer.hpp"
#include "duplex/codec.hpp"
#include "duplex/error.hpp"
#include "duplex/fd.hpp"
#include "duplex/framing.hpp"
#include "duplex/message.hpp"
#include "duplex/socket.hpp"

namespace duplex {

// The default largest message a channel accepts: 64 MiB (sd-bus's limit; OpenSSH's privilege
// separation monitor allows 4 MiB, Chromium's Mojo 256 MiB).
inline constexpr std::size_t default_max_message_size = std::size_t{64} << 20;

// The largest channel_options::receive_buffer_size: 1 GiB. A stream channel allocates its
// receive buffer whole on its first receive; more than this could never be filled by one read
// and only risks an allocation that cannot succeed.
inline constexpr std::size_t max_receive_buffer_size = std::size_t{1} << 30;

// The largest shared_memory_options::pool_size (1 TiB) and slots (65536).
inline constexpr std::size_t max_shared_pool_size = std::size_t{1} << 40;
inline constexpr std::uint32_t max_shared_pool_slots = 65536;

// How a channel receives a large message its peer sent through the peer's shared-memory pool.
enum class shared_receive {
  // Copy it out at once and give the pool's memory back (the default). The message is then this
  // process's own: nothing the sender does afterwards can change it. One memcpy.
  copy,
  // Show it in place, read-only, until the message is destroyed (message::is_view()): no copy at
  // all. The sender's pool stays writable by the sender, so a sender that keeps writing to the
  // block after sending can change the bytes while the receiver reads them: for peers you trust.
  view,
};

// Large payloads through shared memory (native framing only). A sender with this enabled puts a
// payload of at least `threshold` bytes into its pool, a memfd created on the first such message
// and mapped by both ends, and sends only a small frame naming where it is; blocks are reused as
// the receiver releases them. A payload the pool cannot take (too large, or the pool is full of
// unreleased messages) travels in a sealed memfd of its own instead, which any receiver can show
// in place safely. On seqpacket this also carries messages larger than a packet.
struct shared_memory_options {
  // Use shared memory for large sends. Off by default: a pool holds up to pool_size of memory.
  bool enabled = false;
  // Payloads of at least this many bytes go through shared memory.
  std::size_t threshold = std::size_t{256} << 10;
  // The data region of this end's pool (rounded up to a page; 1 to max_shared_pool_size
  // bytes), and its number of slots (how many messages may be in flight in it at once; 1 to
  // max_shared_pool_slots).
  std::size_t pool_size = std::size_t{64} << 20;
  std::uint32_t slots = 256;
  // How messages from the peer's pool are received.
  shared_receive receive = shared_receive::copy;
  // Whether this end accepts shared-memory frames at all (a protocol error otherwise), and the
  // largest peer pool it will map.
  bool accept = true;
  std::size_t max_peer_pool = std::size_t{1} << 30;
  // The most bytes of messages in memfds of their own (those the pool has no room for) that may
  // be on their way to the peer: sent, and not yet read out of the socket by it. Past this, send
  // waits until the peer has read everything this end sent (close() from another thread ends
  // the wait: errc::closed), and try_send takes nothing and returns errc::queue_full (retry
  // after the peer has read; no readiness of the socket tells when). So a peer that never
  // reads holds at most this much of this end's shared memory beyond the pool. When nothing is
  // on its way, one message is always let through, whatever its size. Messages the peer has
  // read and keeps are its own memory, as any message it keeps.
  std::size_t max_in_flight = std::size_t{64} << 20;
};

// How a channel is set up. channel::create refuses (EINVAL) any option out of the range its
// comment gives, before it allocates anything.
struct channel_options {
  // The wire format. framing::python needs a stream socket and carries no fds.
  framing format = framing::native;
  // The largest message this end sends or accepts (payload bytes, headers not counted).
  std::size_t max_message_size = default_max_message_size;
  // The most fds this end accepts with one message (at most 253); a message with more is
  // refused (errc::too_many_fds), its fds closed.
  std::size_t max_fds = max_fds_per_message;
  // The outgoing queue of try_send holds at most this many unsent bytes; a message that would
  // take it past this is refused (errc::queue_full). An empty queue always takes one message,
  // whatever its size, so a channel holds at most max_message_size + max_queued_bytes.
  std::size_t max_queued_bytes = std::size_t{1} << 20;
  // Busy-poll: before a receive blocks, keep trying without blocking for this long. Trades a
  // CPU core, spinning, for latency: a blocking round trip across cores costs tens of
  // microseconds (mostly waking the sleeping thread), a spinning one a few. 0: block at once.
  // At most max_busy_poll; never negative.
  std::chrono::nanoseconds busy_poll{0};
  // Large payloads through shared memory.
  shared_memory_options shared_memory{};
  // Stream channels read through a buffer of this size (a smaller value counts as 64 bytes; at
  // most max_receive_buffer_size), allocated on the first receive: many small messages per
  // syscall; payloads of at least half of it are read straight into their message.
  // Seqpacket channels read each packet whole instead, with behind the caller's buffer a spill
  // area of min(max_message_size, 2 * net.core.wmem_max) bytes of address space, of which at
  // most 64 KiB stays resident (docs/design.md).
  std::size_t receive_buffer_size = std::size_t{64} << 10;
};

// A writable buffer in shared memory, from channel::allocate(): write a payload in place, then
// channel::send(std::move(buffer)) sends it without any copy. Move-only. Dropped unsent, its
// memory is given back. Not thread-safe (a value).
class shared_buffer {
 public:
  shared_buffer() noexcept;
  shared_buffer(shared_buffer&&) noexcept;
  shared_buffer& operator=(shared_buffer&&) noexcept;
  ~shared_buffer();

  // The bytes to write (uninitialised).
  [[nodiscard]] std::span<std::byte> bytes() noexcept;

  // Their number.
  [[nodiscard]] std::size_t size() const noexcept;

  // True if the buffer is in the channel's pool; false if it is a memfd of its own (the pool
  // had no room).
  [[nodiscard]] bool in_pool() const noexcept;

 private:
  friend class channel;
  struct state;
  std::unique_ptr<state> state_;
};

// One end of a message channel. Move-only; the destructor closes the socket.
class channel {
 public:
  // An empty channel; every call on it returns errc::closed.
  channel() noexcept;

  // Makes a channel of one end of a connected pair (stream or seqpacket). Errors:
  // errc::wrong_kind (a datagram socket, or framing::python on a seqpacket socket);
  // EINVAL (an option out of its range: max_fds over 253, max_message_size 0,
  // receive_buffer_size over max_receive_buffer_size, busy_poll negative or over max_busy_poll,
  // shared_memory.pool_size 0 or over max_shared_pool_size, shared_memory.slots 0 or over
  // max_shared_pool_slots, an enum out of its values); ENOMEM. On error the socket is closed.
  [[nodiscard]] static result<channel> create(socket s, channel_options options = {});

  channel(channel&&) noexcept;
  channel& operator=(channel&&) noexcept;
  ~channel();

  // The kind of the underlying socket.
  [[nodiscard]] socket_kind kind() const noexcept;

  // The options the channel was created with.
  [[nodiscard]] const channel_options& options() const noexcept;

  // The socket's fd, for poll/epoll (readable: a receive can make progress), or -1 once closed.
  // Owned here.
  [[nodiscard]] int native_handle() const noexcept;

  // True until close(); false for an empty (default-constructed) or moved-from channel, and for
  // one made over an empty socket. Says nothing about the peer: a channel whose peer has gone
  // stays open until closed. While it is true, native_handle() is the socket's fd (>= 0); once it
  // is false, native_handle() is -1 as soon as no call of another thread is inside the channel.
  [[nodiscard]] bool is_open() const noexcept;

  // True once a protocol error has broken the channel (every call then returns errc::broken).
  [[nodiscard]] bool is_broken() const noexcept;

  // What the peer broke, in words, once the channel is broken ("message length 4294967295 is
  // over the maximum 67108864", "frame version 2 is not supported", ...); empty before.
  [[nodiscard]] std::string error_detail() const;

  // Sends one message: the concatenation of parts (scatter/gather; header and parts go out in
  // one sendmsg where the kernel takes them whole), with fds attached (the caller keeps its
  // own). Blocks until the whole message is written. Errors: errc::message_too_large (over
  // max_message_size, or over the kernel's packet limit on seqpacket; nothing sent),
  // errc::too_many_fds (over 253; nothing sent), errc::not_supported (fds with
  // framing::python, or on a tcp channel: no fd crosses a host; nothing sent), errc::peer_closed
  // (EPIPE/ECONNRESET), errc::broken, errc::closed, EBADF (an fd is not open); and local limits,
  // which change nothing (the message is not sent, the channel goes on, what try_send queued stays
  // queued): ETOOMANYREFS (this user's fds in flight, sent on any socket and not yet received, are
  // over its RLIMIT_NOFILE; root is exempt), ENOBUFS or ENOMEM (no kernel memory). A local error
  // after the frame's first byte (and its fds) went out is not returned: the rest waits in the
  // outgoing queue (wants_write()) and goes first with the next send or flush, which reports the
  // error if it persists; the message is accepted, do not send it again; only if no memory can be
  // had for that rest is ENOMEM returned, with the channel broken (errc::broken after: the stream
  // cannot go on mid-frame). With shared memory, a send past shared_memory.max_in_flight waits for
  // the peer to read (errc::closed if close() ends the wait).
  [[nodiscard]] result<void> send(std::span<const const_buffer> parts, std::span<const int> fds);

  // Sends bytes as one message.
  [[nodiscard]] result<void> send(const_buffer bytes);

  // Sends bytes with fds as one message.
  [[nodiscard]] result<void> send(const_buffer bytes, std::span<const int> fds);

  // Sends parts as one message (scatter/gather).
  [[nodiscard]] result<void> send(std::span<const const_buffer> parts);

  // Sends a message's bytes and fds (the message keeps its fds).
  [[nodiscard]] result<void> send(const message& m);

  // Sends one message without blocking, for event loops: writes what the kernel takes now and
  // keeps the rest of the frame (and duplicates of fds not yet sent) in the channel's outgoing
  // queue; flush() writes it when the socket is writable, and any later send or try_send writes it
  // first. Messages are never lost, reordered or interleaved: only the peer's end
  // (errc::peer_closed) or close() drops the queue. Errors: errc::queue_full (the queue is at
  // max_queued_bytes: nothing was taken; wait until writable, flush(), retry; or
  // shared_memory.max_in_flight is reached: retry once the peer has read), errc::would_block
  // (another thread is sending at this moment), ENOMEM (no memory for the queue's copy of a
  // message of which nothing was written: nothing was taken, retry), and those of send.
  [[nodiscard]] result<void> try_send(std::span<const const_buffer> parts,
                                      std::span<const int> fds);

  // try_send of bytes (with fds) as one message.
  [[nodiscard]] result<void> try_send(const_buffer bytes, std::span<const int> fds = {});

  // try_send of a message's bytes and fds.
  [[nodiscard]] result<void> try_send(const message& m);

  // Writes queued bytes without blocking. Returns true once the queue is empty, false if the
  // socket is full (wait until writable and call again) or another thread is sending. Errors:
  // errc::peer_closed (the queued messages cannot be delivered and are dropped), errc::broken,
  // errc::closed; and the local limits of send (ETOOMANYREFS, ENOBUFS, ENOMEM): every queued
  // message stays queued for a later flush once the limit is no longer reached.
  [[nodiscard]] result<bool> flush();

  // Bytes already read from the socket and not yet delivered (0 if another thread is receiving
  // right now, or from inside a receive_batch callback). When it is 0, a receive needs the socket:
  // an event loop can wait for readability at once instead of first trying a receive that would
  // block. Non-zero does not promise a whole message (a frame may be partial).
  [[nodiscard]] std::size_t buffered_bytes() const noexcept;

  // True if the last receive call read the socket empty and left nothing buffered: its last read
  // came back shorter than the room it had, with no fds or other control message, so the kernel
  // held no more bytes for this end at that moment. For edge-triggered loops (EPOLLET): until
  // the next edge, a try_receive could only fail with would_block, unless the peer had already
  // ended its side (watch EPOLLRDHUP: the end of stream is not a byte, and a read that returns
  // bytes does not report it). A read that stopped short at an urgent byte (MSG_OOB, which duplex
  // never sends) did not empty the socket: drained() asks the kernel (SIOCATMARK, one system call
  // when it would be true) and is false at the mark. Always false on seqpacket channels, after a
  // call served from the buffer, and once closed.
  [[nodiscard]] bool drained() const noexcept;

  // True while try_send left bytes to write: wait for POLLOUT on native_handle(), then flush().
  [[nodiscard]] bool wants_write() const noexcept;

  // How many bytes wait in the outgoing queue.
  [[nodiscard]] std::size_t queued_bytes() const noexcept;

  // A writable buffer of size bytes in this end's shared-memory pool (created on first use,
  // whatever shared_memory.enabled says), or in a memfd of its own when the pool has no room (a
  // memfd's buffer is not mapped in a child forked meanwhile: fill it in this process). Errors:
  // errc::closed, errc::broken, errc::message_too_large (over max_message_size),
  // errc::not_supported (framing::python), ENOMEM / EMFILE (memfd_create, mmap). On a tcp
  // channel the buffer cannot travel: sending it gives errc::not_supported, nothing sent.
  [[nodiscard]] result<shared_buffer> allocate(std::size_t size);

  // Sends a buffer from allocate() as one message, with fds, without copying it (blocking, as
  // send). The buffer is consumed either way. Errors as send, and EINVAL for an empty buffer or
  // one from another channel.
  [[nodiscard]] result<void> send(shared_buffer&& buffer, std::span<const int> fds = {});

  // Sends every message of a batch, in order, with as few syscalls as the kernel allows: one
  // sendmsg per run of messages on a stream (a message with fds starts a new one), one sendmsg
  // per packet on seqpacket. Blocks until all are written. Errors as send, plus EINVAL (a
  // batch made for the other framing); if one fails, the messages before it were sent.
  [[nodiscard]] result<void> send(const batch& b);

  // Sends a value encoded with codec<T> as one message. Errors as send, and ENOMEM (the
  // encoding could not be allocated; nothing sent).
  template <has_codec T>
  [[nodiscard]] result<void> send_value(const T& value) {
    std::vector<std::byte> bytes;
    try {
      codec<T>::encode(value, bytes);
    } catch (const std::bad_alloc&) {
      return fail_errno(ENOMEM);
    }
    return send(const_buffer(bytes));
  }

  // Receives the next message, blocking until one is whole. Errors: errc::peer_closed,
  // errc::truncated_message, errc::protocol_error (then broken), errc::message_too_large,
  // errc::too_many_fds, errc::fds_truncated, ENOMEM (the message was skipped; or, on a stream
  // channel's first receive, its receive buffer could not be allocated: nothing was read, and a
  // later call tries again; or the fds that came with a read could not be kept: then broken),
  // errc::broken,
  // errc::closed, errc::reentrant_call (called from inside a receive_batch callback of this
  // channel, on the callback's thread: refused at once, nothing consumed; see receive_batch).
  // With shared memory, local limits skip one message and never break the channel: ENOMEM,
  // EAGAIN or ENFILE when the peer's pool or a message's memfd cannot be mapped here (address
  // space, vm.max_map_count); and once the pool's announce was skipped (errc::fds_truncated at
  // RLIMIT_NOFILE, or no room to map it), each later message in that pool is skipped with the
  // same error while all others arrive.
  [[nodiscard]] result<message> receive();

  // receive, giving up after timeout: errc::timed_out. A message partly read stays buffered
  // for the next call.
  [[nodiscard]] result<message> receive(std::chrono::nanoseconds timeout);

  // receive without blocking: errc::would_block if no whole message is available yet (or
  // another thread is receiving on this channel right now).
  [[nodiscard]] result<message> try_receive();

  // Receives the next message into buf and its fds into fds. If the message is larger than buf
  // (errc::buffer_too_small) or carries more fds than fds has room for (errc::too_many_fds),
  // nothing is consumed: the message stays queued for a call with room for it (or receive()),
  // and the stream stays in step. Other errors as receive.
  [[nodiscard]] result<message_info> receive_into(mutable_buffer buf,
                                                  std::span<unique_fd> fds = {});

  // receive_into, giving up after timeout: errc::timed_out.
  [[nodiscard]] result<message_info> receive_into(mutable_buffer buf, std::span<unique_fd> fds,
                                                  std::chrono::nanoseconds timeout);

  // Receives every whole message available (at least one: waits up to timeout for the first),
  // calling fn(message_view&) for each, in order, at most max of them. Messages already in the
  // receive buffer are shown in place: no copy, no allocation; their bytes are valid only during
  // the callback. Returns how many were delivered. Errors as receive (an error that concerns one
  // message comes after the messages before it were delivered). On seqpacket, each message is
  // still one packet and one read: batching saves the allocations there, not the syscalls.
  //
  // The callback runs with this channel's receive lock held. From inside it, on its thread, every
  // receive call on this channel (receive, try_receive, receive_into, receive_batch,
  // try_receive_batch, receive_value, wait_readable) returns errc::reentrant_call at once and
  // consumes nothing; buffered_bytes() says 0. Receives from other threads wait for the batch to
  // end, as they would for any receive. Sending on the channel, or receiving on another one, is
  // fine. If the callback throws, the message it threw on counts as delivered (the fds it did
  // not take are closed), the messages after it stay queued for the next call, the lock is
  // released, and the exception propagates out of receive_batch: the channel stays usable and
  // each message is still delivered exactly once.
  template <typename F>
  [[nodiscard]] result<std::size_t> receive_batch(F&& fn, std::size_t max = SIZE_MAX,
                                                  std::chrono::nanoseconds timeout = forever) {
    return receive_batch_impl(&call_view<std::remove_reference_t<F>>, erase(fn), max, timeout,
                              false);
  }

  // receive_batch without waiting: errc::would_block if no whole message is available (or
  // another thread is receiving on this channel right now).
  template <typename F>
  [[nodiscard]] result<std::size_t> try_receive_batch(F&& fn, std::size_t max = SIZE_MAX) {
    return receive_batch_impl(&call_view<std::remove_reference_t<F>>, erase(fn), max, forever,
                              true);
  }

  // Receives one message and decodes it with codec<T>. A message with fds is refused
  // (errc::protocol_error; the fds are closed). Errors as receive (errc::reentrant_call
  // included), those of decode (the built-in codecs: errc::protocol_error for bytes that are not
  // a value of T: a wrong size, a bool byte other than 0 or 1, an enum value enum_values<T>
  // refuses), and ENOMEM if decode could not allocate. A message that fails to decode is
  // consumed and the channel goes on: the frame was sound, only its contents were refused.
  template <has_codec T>
  [[nodiscard]] result<T> receive_value(std::chrono::nanoseconds timeout = forever) {
    auto m = receive(timeout);
    if (!m) return std::unexpected(m.error());
    if (!m->fds().empty()) return fail(errc::protocol_error);
    try {
      return codec<T>::decode(std::as_const(*m).bytes());
    } catch (const std::bad_alloc&) {
      return fail_errno(ENOMEM);  // the message is consumed, as for any failed decode
    }
  }

  // Waits until a receive can make progress without blocking (bytes buffered or readable,
  // end-of-stream, or an error pending). Errors: errc::timed_out, errc::closed (also when a
  // close() from another thread ends the wait), errc::reentrant_call (from inside a
  // receive_batch callback of this channel: no receive can make progress before it returns).
  [[nodiscard]] result<void> wait_readable(std::chrono::nanoseconds timeout = forever) const;

  // Half-close: the peer receives every message sent so far (the outgoing queue is written
  // first, blocking if need be), then errc::peer_closed; this end can still receive.
  // Errors: errc::closed, ENOTCONN, those of send.
  [[nodiscard]] result<void> shutdown_send();

  // Closes this end: every later call returns errc::closed, and messages still in the outgoing
  // queue of try_send are dropped (flush first to deliver them). Safe from any thread. The fd is
  // closed as soon as no other call is inside the channel (at once, in the usual case), so no
  // call can ever act on a reused fd number. If other threads are inside a call at that moment
  // (perhaps blocked in the kernel), close() wakes them with shutdown(SHUT_RDWR) and they return
  // errc::closed; note that a shutdown ends the connection for every process holding this end,
  // so after fork() drop an end you do not use by closing it while no other thread uses it.
  void close() noexcept;

  // The peer's credentials (SO_PEERCRED): for a socketpair, the process that created the pair,
  // not a child that inherited the other end; for a unix endpoint, the process that connected
  // or listened. Errors: errc::not_supported (a tcp channel: no kernel vouches for a remote peer).
  [[nodiscard]] result<credentials> peer_credentials() const;

  // A pidfd of the peer process named by peer_credentials() (SO_PEERPIDFD). Errors:
  // errc::not_supported (an older kernel, or a tcp channel).
  [[nodiscard]] result<unique_fd> peer_pidfd() const;

 private:
  // fn's address as the void* receive_batch_impl passes back to call_view<F> (F may be const).
  template <typename F>
  static void* erase(F& fn) noexcept {
    return const_cast<void*>(static_cast<const void*>(std::addressof(fn)));
  }
  template <typename F>
  static void call_view(void* fn, message_view& view) {
    (*static_cast<F*>(fn))(view);
  }
  [[nodiscard]] result<std::size_t> receive_batch_impl(void (*call)(void*, message_view&), void* fn,
                                                       std::size_t max,
                                                       std::chrono::nanoseconds timeout,
                                                       bool try_only);

  struct impl;
  std::unique_ptr<impl> impl_;
};

// Both ends of a new pair as channels.
struct connected_channels {
  channel first;
  channel second;
};

// Creates a pair of the given kind (stream or seqpacket) and makes a channel of each end, with
// the same options. Errors: those of socket_pair and channel::create.
[[nodiscard]] result<connected_channels> channel_pair(socket_kind kind = socket_kind::stream,
                                                      channel_options options = {});

}  // namespace duplex
