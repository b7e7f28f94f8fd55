// duplex/ring.hpp - whole messages through shared-memory rings, for the lowest latency.
//
// A ring_channel carries fd-less messages between two peers (threads or processes) through two
// rings in shared memory, one per direction, and uses its socket only to set them up and to see
// the peer die. Each end owns the ring it receives on (a memfd sealed against resizing, mapped
// by both ends); the peer writes messages into it and moves its tail, the owner reads them and
// moves its head. A receiver with busy_poll set spins on the ring's tail without a system call,
// so a round trip between two spinning cores costs memory traffic only. A receiver that finds
// nothing and stops spinning sleeps on a wake socket of its own (an AF_UNIX seqpacket pair it
// made, whose other end the peer holds), on which the peer sends a byte only when it sees the
// receiver asleep; a sender whose ring is full sleeps the same way until the receiver makes room.
//
// What it promises, whatever the peer does:
//   - Messages arrive whole, in order, each once. Every message published before the peer
//     closed or died is delivered, then errc::peer_closed.
//   - The peer can write anything into the ring it shares: every position and length read from
//     shared memory is checked before use (a broken one gives errc::protocol_error, then
//     errc::broken); a message is copied out before it is handed over, so the peer cannot change
//     it afterwards; the memfd the peer hands over must be sealed against shrinking (no SIGBUS)
//     and its wake sockets must be connected AF_UNIX seqpacket sockets.
//   - No call blocks on anything the peer can change: every wait is a ppoll on this end's own
//     sockets, bounded by the call's timeout, and every other system call on a shared object
//     (a wake sent on the peer's socket, a wake taken from this end's own) is non-blocking per
//     call, so clearing O_NONBLOCK, filling a socket or setting the sleeping and waiting flags
//     by hand does not make send(), receive() or close() wait past their timeouts. What the peer
//     can do is wake this end for nothing (a waiting call looks at the ring again and goes back
//     to sleep, costing CPU until its timeout), or never wake it (as if it sent nothing); a peer
//     that closes its ends of this end's wake sockets is gone (errc::peer_closed, after what it
//     published). A peer that can ptrace this process is out of any library's reach.
//   - No fds: a message with fds needs a duplex::channel. Messages are at most the receiver's
//     max_message_size, which is at most its ring's capacity less 8 bytes.
//
// What it costs: two rings (2 × capacity bytes of shared memory per pair), four wake sockets per
// end besides the socket (the ends of its own two pairs it sleeps on, and the ends of the peer's
// two it wakes the peer with; the memfds are closed once mapped), a socket send and receive per
// wake-up and, with busy_poll, a core spinning while it waits. A send into the ring of a peer that
// died without closing succeeds while the ring has room (like a send into the socket buffer of a
// peer that has not read it yet); the first send that must wait for room, and every receive, see
// the peer gone.
//
// Threads: one thread may send while another receives on the same end; concurrent senders (or
// receivers) take turns on a lock, and a call's timeout does not count the wait for that lock.
// close() may be called from any thread at any time.
//
// The API mirrors duplex::channel's where the two overlap: timeouts default to `forever`,
// create() takes its options by value, receive_into() returns a message_info, a pair comes as a
// named struct (connected_rings, like connected_channels), and is_open() / is_broken() mean the
// same on both.
//
//   auto ends = duplex::ring_channel_pair({.busy_poll = std::chrono::microseconds(100)});
//   ends->first.send(duplex::as_bytes("ping"));
//   duplex::result<duplex::message> m = ends->second.receive();
#pragma once

#include <chrono>
#include <cstddef>
#include <memory>
#include <span>

#include "duplex/buffer.hpp"
#include "duplex/constants.hpp"
#include "duplex/error.hpp"
#include "duplex/message.hpp"
#include "duplex/socket.hpp"

namespace duplex {

// How a ring_channel end is set up. Both ends choose their own; each learns the peer's ring
// size and message limit in the handshake. create() refuses a field out of its range below with
// EINVAL before it makes or sends anything.
struct ring_options {
  // Bytes of the ring this end receives on: a power of two from 4 KiB to 1 GiB.
  std::size_t capacity = std::size_t{1} << 20;
  // The largest message this end accepts: 1 to capacity - 8. Larger ones are refused with
  // errc::message_too_large by the sender, and break the ring if they appear in it anyway.
  std::size_t max_message_size = std::size_t{64} << 10;
  // The largest ring the peer may ask this end to map (the peer's capacity): at least 4 KiB,
  // the smallest ring (less would refuse every peer); above 1 GiB it is the same as 1 GiB.
  std::size_t max_peer_capacity = std::size_t{64} << 20;
  // How long a receive (or a send waiting for room) spins on shared memory before it sleeps:
  // 0 to max_busy_poll (duplex/constants.hpp), never negative. Spinning costs a core for that long;
  // 0 sleeps at once.
  std::chrono::nanoseconds busy_poll{0};
  // How long create() waits for the peer's half of the handshake: never negative; 0 takes only
  // a handshake already there, and a hundred years or more (such as `forever`) waits without
  // bound.
  std::chrono::nanoseconds handshake_timeout = std::chrono::seconds(10);
};

struct connected_rings;

// One end of a pair of shared-memory rings (see the top of this file). Move-only; the
// destructor closes it.
class ring_channel {
 public:
  // No ring: every call returns errc::closed (as on a moved-from end).
  ring_channel() noexcept;
  ~ring_channel();
  ring_channel(ring_channel&&) noexcept;
  ring_channel& operator=(ring_channel&&) noexcept;

  // Sets up this end over a connected stream or seqpacket socket whose peer calls create() too:
  // sends this end's ring and wake sockets, receives and checks the peer's, and maps its ring.
  // Errors: errc::wrong_kind (not a connected stream/seqpacket socket), errc::timed_out,
  // errc::peer_closed, errc::protocol_error (a bad handshake, ring or fd), errc::fds_truncated
  // (the kernel could not give this process all of the peer's fds, as at its RLIMIT_NOFILE;
  // those that arrived are closed), EINVAL (an option out of its range in ring_options, checked
  // first), the errno of memfd_create, socketpair or mmap. On error the socket is closed (as by
  // channel::create).
  [[nodiscard]] static result<ring_channel> create(socket s, ring_options options = {});

  // Sends one message (its pieces gathered), waiting for room in the peer's ring as long as
  // timeout allows. Errors: errc::message_too_large (over the peer's limit; nothing sent),
  // errc::timed_out, errc::peer_closed, errc::protocol_error / errc::broken (the peer broke its
  // ring's positions), errc::closed.
  [[nodiscard]] result<void> send(const_buffer payload, std::chrono::nanoseconds timeout = forever);
  [[nodiscard]] result<void> send(std::span<const const_buffer> pieces,
                                  std::chrono::nanoseconds timeout = forever);
  // Sends only if the peer's ring has room now; errc::would_block otherwise.
  [[nodiscard]] result<void> try_send(const_buffer payload);

  // The next message, copied out of the ring, waiting as long as timeout allows (spinning first
  // for busy_poll). Errors: errc::timed_out, errc::peer_closed (everything sent was delivered),
  // errc::protocol_error / errc::broken, errc::closed, ENOMEM.
  [[nodiscard]] result<message> receive(std::chrono::nanoseconds timeout = forever);
  // The next message if one is there now; errc::would_block otherwise.
  [[nodiscard]] result<message> try_receive();
  // The next message copied into buf; returns its size (message_info::size; fds is always 0: a
  // ring carries none). A message larger than buf stays in the ring and gives
  // errc::buffer_too_small. Other errors as receive().
  [[nodiscard]] result<message_info> receive_into(mutable_buffer buf,
                                                  std::chrono::nanoseconds timeout = forever);

  // The peer's limit for one message (0 when closed).
  [[nodiscard]] std::size_t max_send_size() const noexcept;
  // True until close(); false for a default-constructed or moved-from end. Says nothing about
  // the peer: an end whose peer has gone stays open until closed.
  [[nodiscard]] bool is_open() const noexcept;
  // True once this end has found that the peer broke the rings (a position or record in shared
  // memory that fails its checks, or bytes on the socket after the handshake): the call that
  // found it returned errc::protocol_error, and every send and receive since returns
  // errc::broken (errc::closed once closed). It stays true after close(); false for a
  // default-constructed end and for a peer that only closed or died.
  [[nodiscard]] bool is_broken() const noexcept;
  // The socket's fd: readable when the peer has gone (it carries nothing after the handshake).
  [[nodiscard]] int native_handle() const noexcept;

  // Tells the peer this end is gone (it gets errc::peer_closed once it has read everything
  // already in its ring) and wakes any call waiting on this end, which returns errc::closed.
  // Never waits, whatever the peer has done. The rings stay mapped until destruction.
  void close() noexcept;

 private:
  struct impl;  // the shared state of an end; defined in the library
  friend result<connected_rings> ring_channel_pair(ring_options);
  explicit ring_channel(std::unique_ptr<impl> p) noexcept;
  std::unique_ptr<impl> impl_;
};

// Both ends of a new pair of rings.
struct connected_rings {
  ring_channel first;
  ring_channel second;
};

// Two connected ring_channel ends in this process, both set up with options. Errors as
// create(); EINVAL (an option out of range) before any socket is made.
[[nodiscard]] result<connected_rings> ring_channel_pair(ring_options options = {});

}  // namespace duplex
