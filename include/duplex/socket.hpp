// duplex/socket.hpp - one end of an AF_UNIX socket pair, with every syscall made safe.
//
// `socket` owns one connected AF_UNIX socket (stream, datagram or seqpacket), or one connected
// TCP stream (an endpoint's connection to another host, duplex/endpoint.hpp), and wraps each
// syscall so that the classic mistakes of hand-written socketpair code cannot happen:
//   - no SIGPIPE: every send uses MSG_NOSIGNAL, so writing to a dead peer returns EPIPE;
//   - EINTR is retried inside every call (timeouts keep counting down across retries);
//   - partial transfers on streams are finished by send_all / receive_exact;
//   - a packet larger than the caller's buffer is an error (errc::buffer_too_small), never a
//     silently shortened message;
//   - every fd received is close-on-exec (MSG_CMSG_CLOEXEC), and an fd that arrives but cannot be
//     handed to the caller is closed before the call returns;
//   - non-blocking use is per call (io_flags::dont_wait uses MSG_DONTWAIT), so a socket's file
//     flags are never toggled behind the caller's back.
//
// Threads: a socket is an fd. Concurrent send and receive calls from different threads are safe
// (the kernel serialises them), but on a stream the bytes of two concurrent partial sends can
// interleave: use a channel (or one sender) for whole messages. Moving, closing or destroying a
// socket while another thread uses it is a data race.
//
//   auto pair = duplex::socket_pair(duplex::socket_kind::stream);
//   if (!pair) return pair.error();
//   auto& [a, b] = *pair;
//   a.send_all(duplex::as_bytes("ping"));
//   std::array<std::byte, 4> buf;
//   b.receive_exact(buf);
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstddef>
#include <span>
#include <string_view>

#include "duplex/buffer.hpp"
#include "duplex/constants.hpp"
#include "duplex/error.hpp"
#include "duplex/fd.hpp"

namespace duplex {

// The three kinds of AF_UNIX socket a pair can be made of.
enum class socket_kind {
  stream,     // SOCK_STREAM: a reliable byte stream without message boundaries.
  datagram,   // SOCK_DGRAM: boundaries kept; no end-of-stream when the peer closes.
  seqpacket,  // SOCK_SEQPACKET: boundaries kept, reliable, ordered, with end-of-stream.
};

// "stream", "datagram" or "seqpacket".
[[nodiscard]] std::string_view to_string(socket_kind kind) noexcept;

// The SOCK_* type constant of a kind (SOCK_STREAM, SOCK_DGRAM, SOCK_SEQPACKET).
[[nodiscard]] int to_socket_type(socket_kind kind) noexcept;

// Where a socket's peer can be: on this host (AF_UNIX), or on any host (a TCP stream over
// AF_INET or AF_INET6). What only one kernel can give (fds, credentials, a pidfd, shared memory)
// crosses only a local socket; on a tcp one every call that asks for it returns
// errc::not_supported and sends nothing.
enum class socket_domain {
  local,  // AF_UNIX
  tcp,    // AF_INET or AF_INET6, SOCK_STREAM
};

// Per-call options of send and receive operations; combine with |.
enum class io_flags : unsigned {
  none = 0,
  // Do not block: return errc::would_block instead (MSG_DONTWAIT; file flags untouched).
  dont_wait = 1U << 0,
  // receive only: look at the data without consuming it (MSG_PEEK). Never used together with a
  // control buffer, so no fd is ever installed by a peek.
  peek = 1U << 1,
  // receive_msg only: a packet larger than the buffers is returned cut to their size, with its
  // real size in received::message_size, instead of failing with errc::buffer_too_small.
  allow_truncation = 1U << 2,
};

// Combines io_flags.
[[nodiscard]] constexpr io_flags operator|(io_flags a, io_flags b) noexcept {
  return static_cast<io_flags>(static_cast<unsigned>(a) | static_cast<unsigned>(b));
}

// True if every flag of `flag` is set in `set`.
[[nodiscard]] constexpr bool has_flag(io_flags set, io_flags flag) noexcept {
  return (static_cast<unsigned>(set) & static_cast<unsigned>(flag)) == static_cast<unsigned>(flag);
}

// Which direction shutdown() closes.
enum class shutdown_how {
  read,   // SHUT_RD: this end stops receiving.
  write,  // SHUT_WR: half-close; the peer sees end-of-stream after the data already sent.
  both,   // SHUT_RDWR.
};

// The identity of a peer as the kernel recorded it (SO_PEERCRED). On a socketpair this is the
// process that called socketpair(), not a child that later inherited the other end.
struct credentials {
  pid_t pid = 0;  // process id at the time the pair was created
  uid_t uid = 0;  // effective user id
  gid_t gid = 0;  // effective group id
};

// What one receive_msg call delivered.
struct received {
  std::size_t bytes = 0;         // bytes stored into the caller's buffers
  std::size_t fds = 0;           // fds stored into the caller's fd array (from index 0)
  std::size_t message_size = 0;  // real size of the packet (== bytes unless truncation allowed)
};

// max_fds_per_message and forever are declared in duplex/constants.hpp.

// One end of a connected AF_UNIX socket pair. Move-only; the destructor closes it.
class socket {
 public:
  // An empty socket (no fd). Every operation on it fails with EBADF.
  socket() noexcept = default;

  // Takes ownership of fd, trusting that it is a connected AF_UNIX socket of `kind`.
  socket(unique_fd fd, socket_kind kind) noexcept : fd_(std::move(fd)), kind_(kind) {}

  // Takes ownership of fd, trusting that it is a connected socket of `kind` in `domain` (a tcp
  // socket is always socket_kind::stream).
  socket(unique_fd fd, socket_kind kind, socket_domain domain) noexcept
      : fd_(std::move(fd)), kind_(kind), domain_(domain) {}

  // Takes ownership of fd after checking (SO_DOMAIN, SO_TYPE) that it is an AF_UNIX socket, or a
  // connected TCP stream (AF_INET or AF_INET6, SOCK_STREAM, IPPROTO_TCP), and learns its kind and
  // domain. Errors: EBADF or ENOTSOCK (system); errc::wrong_kind if it is neither (another
  // family or type, or a TCP socket that is not connected, such as a listening one). On error
  // the fd is closed (it was moved in).
  [[nodiscard]] static result<socket> from_fd(unique_fd fd) noexcept;

  socket(socket&&) noexcept = default;
  socket& operator=(socket&&) noexcept = default;

  // True if this holds an fd.
  [[nodiscard]] bool is_open() const noexcept { return fd_.valid(); }

  // The fd, for poll/epoll or any event loop. Ownership stays here.
  [[nodiscard]] int native_handle() const noexcept { return fd_.get(); }

  // The kind this socket was created or adopted as.
  [[nodiscard]] socket_kind kind() const noexcept { return kind_; }

  // The domain this socket was created or adopted as: whether fds and credentials can cross it.
  [[nodiscard]] socket_domain domain() const noexcept { return domain_; }

  // Gives up the fd; this socket becomes empty.
  [[nodiscard]] unique_fd release() noexcept { return std::move(fd_); }

  // Closes the fd now (the destructor would). Safe to call on an empty socket.
  void close() noexcept { fd_.reset(); }

  // Sends bytes with one sendmsg(MSG_NOSIGNAL). Returns how many were accepted: on a stream
  // possibly fewer than given (use send_all); on a packet socket all of them, or an error.
  // Errors: EPIPE (peer closed), EMSGSIZE (packet over the kernel's limit), ECONNREFUSED /
  // ENOTCONN (datagram peer gone), ENOBUFS, errc::would_block (with dont_wait, or on an
  // O_NONBLOCK socket).
  [[nodiscard]] result<std::size_t> send(const_buffer data,
                                         io_flags flags = io_flags::none) noexcept;

  // Scatter/gather send: the buffers go out as one message with one sendmsg. At most IOV_MAX
  // (1024) buffers (else EMSGSIZE). Errors as send.
  [[nodiscard]] result<std::size_t> send(std::span<const const_buffer> buffers,
                                         io_flags flags = io_flags::none);

  // Sends buffers and fds (SCM_RIGHTS) with one sendmsg. The fds travel with the first byte
  // sent; if a stream send is partial, the rest must be sent without them (they went once).
  // The caller keeps its fds (the peer receives duplicates). Errors as send, plus:
  // errc::too_many_fds (more than 253; nothing sent), errc::not_supported (fds on a tcp socket,
  // which cannot carry them; nothing sent), EINVAL (fds with no data bytes on a
  // stream, which the kernel would drop), EBADF (an fd is not open).
  [[nodiscard]] result<std::size_t> send_msg(std::span<const const_buffer> buffers,
                                             std::span<const int> fds,
                                             io_flags flags = io_flags::none);

  // Sends every byte, continuing after partial writes (and waiting for writability on an
  // O_NONBLOCK socket). On a packet socket this is one send of the whole packet. On error some
  // prefix of data may have been sent: the stream's framing is then unknown.
  [[nodiscard]] result<void> send_all(const_buffer data) noexcept;

  // send_all with a timeout for the whole transfer: errc::timed_out if it expires.
  [[nodiscard]] result<void> send_all(const_buffer data, std::chrono::nanoseconds timeout) noexcept;

  // Receives once into buf. Returns the bytes received: on a stream possibly fewer than asked; on
  // a packet socket one whole packet. End-of-stream (stream/seqpacket peer closed or shut down
  // its write side) is errc::peer_closed. A packet larger than buf is errc::buffer_too_small
  // (the kernel has discarded it; call next_packet_size() first to lose nothing). Any fd sent
  // along is closed (use receive_msg to take fds). An empty buf on a stream returns 0 at once.
  // Errors: errc::peer_closed, errc::buffer_too_small, errc::would_block, ECONNRESET (the peer
  // closed with data of ours unread; it comes once: on a stream after every byte the peer sent,
  // on seqpacket before the packets still queued, which the next calls return).
  // Seqpacket note: the kernel reports an empty packet and end-of-stream alike; duplex tells them
  // apart by the peer's shutdown state, so an empty packet sent just before the peer closed is
  // reported as errc::peer_closed.
  [[nodiscard]] result<std::size_t> receive(mutable_buffer buf,
                                            io_flags flags = io_flags::none) noexcept;

  // receive, waiting at most timeout for data: errc::timed_out if none arrives in time.
  [[nodiscard]] result<std::size_t> receive(mutable_buffer buf,
                                            std::chrono::nanoseconds timeout) noexcept;

  // Receives into buffers and takes up to fds.size() fds (SCM_RIGHTS, MSG_CMSG_CLOEXEC) into fds
  // from index 0. Entries of fds beyond the count returned are left empty. On any error no fd is
  // handed over: every fd that arrived has been closed. Errors as receive, plus:
  // errc::too_many_fds (more fds arrived than fds.size()), errc::fds_truncated (MSG_CTRUNC:
  // the kernel could not deliver all fds, e.g. the receiver is at RLIMIT_NOFILE). io_flags::peek
  // is refused here (EINVAL): peeking with a control buffer would install fds.
  [[nodiscard]] result<received> receive_msg(std::span<const mutable_buffer> buffers,
                                             std::span<unique_fd> fds,
                                             io_flags flags = io_flags::none);

  // Receives exactly buf.size() bytes from a stream, continuing after short reads.
  // Errors: errc::peer_closed (end-of-stream before the first byte), errc::truncated_message
  // (end-of-stream after some bytes), errc::wrong_kind (not a stream), and those of receive.
  [[nodiscard]] result<void> receive_exact(mutable_buffer buf) noexcept;

  // receive_exact with a timeout for the whole transfer: errc::timed_out if it expires (the bytes
  // read so far are in buf, but how many is unknown: treat the stream as unusable).
  [[nodiscard]] result<void> receive_exact(mutable_buffer buf,
                                           std::chrono::nanoseconds timeout) noexcept;

  // The size of the next packet without consuming it (MSG_PEEK|MSG_TRUNC, no control buffer),
  // so a caller can size its buffer and lose nothing. Packet sockets only (errc::wrong_kind on a
  // stream). Blocks until a packet is queued unless dont_wait. Errors as receive.
  [[nodiscard]] result<std::size_t> next_packet_size(io_flags flags = io_flags::none) noexcept;

  // Shuts down one or both directions. shutdown(write) is the half-close: the peer reads what was
  // sent, then end-of-stream, and can still send to us. Errors: ENOTCONN, EBADF.
  [[nodiscard]] result<void> shutdown(shutdown_how how) noexcept;

  // Waits until a receive would not block (data, end-of-stream or an error is pending).
  // Errors: errc::timed_out.
  [[nodiscard]] result<void> wait_readable(
      std::chrono::nanoseconds timeout = forever) const noexcept;

  // Waits until a send would not block (buffer space, or an error is pending).
  // Errors: errc::timed_out.
  [[nodiscard]] result<void> wait_writable(
      std::chrono::nanoseconds timeout = forever) const noexcept;

  // SO_SNDBUF as the kernel reports it (twice the size set, for its bookkeeping).
  [[nodiscard]] result<std::size_t> send_buffer_size() const noexcept;

  // Sets SO_SNDBUF; the kernel doubles the value and caps it at net.core.wmem_max (no error).
  [[nodiscard]] result<void> set_send_buffer_size(std::size_t bytes) noexcept;

  // SO_RCVBUF as the kernel reports it.
  [[nodiscard]] result<std::size_t> receive_buffer_size() const noexcept;

  // Sets SO_RCVBUF; doubled and capped at net.core.rmem_max by the kernel.
  [[nodiscard]] result<void> set_receive_buffer_size(std::size_t bytes) noexcept;

  // Whether O_NONBLOCK is set on the file (then every call behaves as with dont_wait).
  [[nodiscard]] result<bool> is_non_blocking() const noexcept;

  // Sets or clears O_NONBLOCK. It is a property of the open file, shared with every dup of it,
  // including an end inherited by another process.
  [[nodiscard]] result<void> set_non_blocking(bool on) noexcept;

  // The peer's credentials from SO_PEERCRED: for a socketpair, the creator of the pair; for a
  // connection accepted from a unix listener, the process that connected. Errors:
  // errc::not_supported (a tcp socket: no kernel vouches for a remote peer).
  [[nodiscard]] result<credentials> peer_credentials() const noexcept;

  // A pidfd of the peer's process (SO_PEERPIDFD, Linux 6.5+), close-on-exec. As with
  // peer_credentials, on a socketpair this names the creator of the pair.
  // Errors: errc::not_supported (older kernel, or a tcp socket), ESRCH (that process has exited).
  [[nodiscard]] result<unique_fd> peer_pidfd() const noexcept;

 private:
  [[nodiscard]] result<std::size_t> receive_impl(mutable_buffer buf, io_flags flags) noexcept;

  unique_fd fd_;
  socket_kind kind_ = socket_kind::stream;
  socket_domain domain_ = socket_domain::local;
};

}  // namespace duplex
