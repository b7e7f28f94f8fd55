#include "duplex/socket.hpp"

#include <fcntl.h>
#include <limits.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>

#include "base/syscall.hpp"
#include "socket/classify.hpp"
#include "socket/io.hpp"

#ifndef SO_PEERPIDFD
#define SO_PEERPIDFD 77
#endif

namespace duplex {
namespace {

using detail::from_errno;
using detail::retry_eintr;
using detail::seqpacket_at_end;

constexpr int to_msg_flags(io_flags flags) noexcept {
  int out = 0;
  if (has_flag(flags, io_flags::dont_wait)) out |= MSG_DONTWAIT;
  if (has_flag(flags, io_flags::peek)) out |= MSG_PEEK;
  return out;
}

result<int> get_int_option(int fd, int level, int name) noexcept {
  int value = 0;
  socklen_t len = sizeof(value);
  if (::getsockopt(fd, level, name, &value, &len) != 0) return fail_errno(errno);
  return value;
}

result<void> set_int_option(int fd, int level, int name, int value) noexcept {
  if (::setsockopt(fd, level, name, &value, sizeof(value)) != 0) return fail_errno(errno);
  return {};
}

std::size_t clamp_to_int(std::size_t bytes) noexcept {
  return std::min<std::size_t>(bytes, INT_MAX / 2);
}

}  // namespace

std::string_view to_string(socket_kind kind) noexcept {
  switch (kind) {
    case socket_kind::stream: return "stream";
    case socket_kind::datagram: return "datagram";
    case socket_kind::seqpacket: return "seqpacket";
  }
  return "unknown";
}

int to_socket_type(socket_kind kind) noexcept {
  switch (kind) {
    case socket_kind::stream: return SOCK_STREAM;
    case socket_kind::datagram: return SOCK_DGRAM;
    case socket_kind::seqpacket: return SOCK_SEQPACKET;
  }
  return -1;
}

result<detail::socket_shape> detail::classify_socket(int fd) noexcept {
  auto domain = get_int_option(fd, SOL_SOCKET, SO_DOMAIN);
  if (!domain) return std::unexpected(domain.error());
  auto type = get_int_option(fd, SOL_SOCKET, SO_TYPE);
  if (!type) return std::unexpected(type.error());
  if (*domain == AF_INET || *domain == AF_INET6) {
    // Only a connected TCP stream is a channel's end: a listening or unconnected one is not.
    auto protocol = get_int_option(fd, SOL_SOCKET, SO_PROTOCOL);
    if (!protocol) return std::unexpected(protocol.error());
    sockaddr_storage peer{};
    socklen_t len = sizeof(peer);
    if (*type != SOCK_STREAM || *protocol != IPPROTO_TCP ||
        ::getpeername(fd, reinterpret_cast<sockaddr*>(&peer), &len) != 0) {
      return fail(errc::wrong_kind);
    }
    return socket_shape{socket_kind::stream, socket_domain::tcp};
  }
  if (*domain != AF_UNIX) return fail(errc::wrong_kind);
  switch (*type) {
    case SOCK_STREAM: return socket_shape{socket_kind::stream, socket_domain::local};
    case SOCK_DGRAM: return socket_shape{socket_kind::datagram, socket_domain::local};
    case SOCK_SEQPACKET: return socket_shape{socket_kind::seqpacket, socket_domain::local};
    default: return fail(errc::wrong_kind);
  }
}

result<socket> socket::from_fd(unique_fd fd) noexcept {
  auto shape = detail::classify_socket(fd.get());
  if (!shape) return std::unexpected(shape.error());
  return socket(std::move(fd), shape->kind, shape->domain);
}

result<std::size_t> socket::send(const_buffer data, io_flags flags) noexcept {
  return detail::send_bytes(fd_.get(), data.data(), data.size(), to_msg_flags(flags));
}

result<std::size_t> socket::send(std::span<const const_buffer> buffers, io_flags flags) {
  return send_msg(buffers, {}, flags);
}

result<std::size_t> socket::send_msg(std::span<const const_buffer> buffers,
                                     std::span<const int> fds, io_flags flags) {
  if (fds.size() > max_fds_per_message) return fail(errc::too_many_fds);
  // A TCP stream would carry the bytes and silently drop the fds.
  if (!fds.empty() && domain_ != socket_domain::local) return fail(errc::not_supported);
  if (buffers.size() > IOV_MAX) return fail_errno(EMSGSIZE);
  detail::iovec_array iov(buffers);
  if (!fds.empty() && iov.total() == 0 && kind_ == socket_kind::stream) {
    // A stream carries control data only with at least one byte; the kernel would drop the fds.
    return fail_errno(EINVAL);
  }
  return detail::send_with_fds(fd_.get(), iov.data(), iov.size(), fds, to_msg_flags(flags));
}

namespace {

result<void> send_all_impl(socket& s, const_buffer data,
                           std::chrono::nanoseconds timeout) noexcept {
  const detail::deadline until(timeout);
  const io_flags flags = until.infinite() ? io_flags::none : io_flags::dont_wait;
  std::size_t done = 0;
  do {
    auto n = s.send(data.subspan(done), flags);
    if (n) {
      done += *n;
      if (s.kind() != socket_kind::stream) break;  // a packet goes whole or not at all
      continue;
    }
    if (n.error() != errc::would_block) return std::unexpected(n.error());
    auto ready = detail::wait_for(s.native_handle(), POLLOUT, until.remaining());
    if (!ready) return std::unexpected(ready.error());
  } while (done < data.size());
  return {};
}

}  // namespace

result<void> socket::send_all(const_buffer data) noexcept {
  return send_all_impl(*this, data, forever);
}

result<void> socket::send_all(const_buffer data, std::chrono::nanoseconds timeout) noexcept {
  return send_all_impl(*this, data, timeout);
}

result<std::size_t> socket::receive_impl(mutable_buffer buf, io_flags flags) noexcept {
  if (kind_ == socket_kind::stream && buf.empty() && fd_.valid()) return 0;
  int msg_flags = to_msg_flags(flags);
  if (kind_ != socket_kind::stream) msg_flags |= MSG_TRUNC;  // returns the packet's real size
  const ssize_t n =
      retry_eintr([&] { return ::recv(fd_.get(), buf.data(), buf.size(), msg_flags); });
  if (n < 0) return from_errno(errno);
  const auto got = static_cast<std::size_t>(n);
  if (kind_ == socket_kind::stream) {
    if (got == 0) return fail(errc::peer_closed);
    return got;
  }
  if (got > buf.size()) return fail(errc::buffer_too_small);
  if (got == 0 && kind_ == socket_kind::seqpacket && seqpacket_at_end(fd_.get())) {
    return fail(errc::peer_closed);
  }
  return got;
}

result<std::size_t> socket::receive(mutable_buffer buf, io_flags flags) noexcept {
  return receive_impl(buf, flags);
}

result<std::size_t> socket::receive(mutable_buffer buf, std::chrono::nanoseconds timeout) noexcept {
  const detail::deadline until(timeout);
  if (until.infinite()) return receive_impl(buf, io_flags::none);
  for (;;) {
    auto n = receive_impl(buf, io_flags::dont_wait);
    if (n || n.error() != errc::would_block) return n;
    auto ready = detail::wait_for(fd_.get(), POLLIN, until.remaining());
    if (!ready) return std::unexpected(ready.error());
  }
}

result<received> socket::receive_msg(std::span<const mutable_buffer> buffers,
                                     std::span<unique_fd> fds, io_flags flags) {
  if (has_flag(flags, io_flags::peek)) return fail_errno(EINVAL);
  if (buffers.size() > IOV_MAX) return fail_errno(EMSGSIZE);
  detail::iovec_array iov(buffers);
  int msg_flags = to_msg_flags(flags);
  if (kind_ != socket_kind::stream) msg_flags |= MSG_TRUNC;  // returns the packet's real size
  detail::fd_batch arrived;
  auto r = detail::recv_with_fds(fd_.get(), iov.data(), iov.size(), msg_flags, arrived);
  if (!r) return std::unexpected(r.error());
  // From here on, returning early closes every fd that arrived (arrived owns them).
  if (r->ctrunc) return fail(errc::fds_truncated);
  const std::size_t got = r->bytes;
  if (kind_ != socket_kind::stream) {
    if (got > iov.total() && !has_flag(flags, io_flags::allow_truncation)) {
      return fail(errc::buffer_too_small);
    }
    if (got == 0 && arrived.count == 0 && kind_ == socket_kind::seqpacket &&
        seqpacket_at_end(fd_.get())) {
      return fail(errc::peer_closed);
    }
  } else if (got == 0 && iov.total() > 0) {
    return fail(errc::peer_closed);
  }
  if (arrived.count > fds.size()) return fail(errc::too_many_fds);
  auto taken = arrived.taken();
  for (std::size_t i = 0; i < taken.size(); ++i)
    fds[i] = std::move(taken[i]);
  return received{std::min(got, iov.total()), taken.size(), got};
}

result<void> socket::receive_exact(mutable_buffer buf) noexcept {
  return receive_exact(buf, forever);
}

result<void> socket::receive_exact(mutable_buffer buf, std::chrono::nanoseconds timeout) noexcept {
  if (kind_ != socket_kind::stream) return fail(errc::wrong_kind);
  const detail::deadline until(timeout);
  std::size_t done = 0;
  while (done < buf.size()) {
    auto n = until.infinite() ? receive_impl(buf.subspan(done), io_flags::none)
                              : receive(buf.subspan(done), until.remaining());
    if (!n) {
      if (n.error() == errc::would_block) {
        // An O_NONBLOCK socket: wait for data within the deadline, then try again.
        auto ready = detail::wait_for(fd_.get(), POLLIN, until.remaining());
        if (!ready) return std::unexpected(ready.error());
        continue;
      }
      if (n.error() == errc::peer_closed && done > 0) return fail(errc::truncated_message);
      return std::unexpected(n.error());
    }
    done += *n;
  }
  return {};
}

result<std::size_t> socket::next_packet_size(io_flags flags) noexcept {
  if (kind_ == socket_kind::stream) return fail(errc::wrong_kind);
  const int msg_flags = to_msg_flags(flags) | MSG_PEEK | MSG_TRUNC;
  char probe = 0;
  const ssize_t n = retry_eintr([&] { return ::recv(fd_.get(), &probe, 0, msg_flags); });
  if (n < 0) return from_errno(errno);
  if (n == 0 && kind_ == socket_kind::seqpacket && seqpacket_at_end(fd_.get())) {
    return fail(errc::peer_closed);
  }
  return static_cast<std::size_t>(n);
}

result<void> socket::shutdown(shutdown_how how) noexcept {
  int native = SHUT_RDWR;
  if (how == shutdown_how::read) native = SHUT_RD;
  if (how == shutdown_how::write) native = SHUT_WR;
  if (::shutdown(fd_.get(), native) != 0) return fail_errno(errno);
  return {};
}

result<void> socket::wait_readable(std::chrono::nanoseconds timeout) const noexcept {
  auto r = detail::wait_for(fd_.get(), POLLIN, timeout);
  if (!r) return std::unexpected(r.error());
  return {};
}

result<void> socket::wait_writable(std::chrono::nanoseconds timeout) const noexcept {
  auto r = detail::wait_for(fd_.get(), POLLOUT, timeout);
  if (!r) return std::unexpected(r.error());
  return {};
}

result<std::size_t> socket::send_buffer_size() const noexcept {
  auto v = get_int_option(fd_.get(), SOL_SOCKET, SO_SNDBUF);
  if (!v) return std::unexpected(v.error());
  return static_cast<std::size_t>(*v);
}

result<void> socket::set_send_buffer_size(std::size_t bytes) noexcept {
  return set_int_option(fd_.get(), SOL_SOCKET, SO_SNDBUF, static_cast<int>(clamp_to_int(bytes)));
}

result<std::size_t> socket::receive_buffer_size() const noexcept {
  auto v = get_int_option(fd_.get(), SOL_SOCKET, SO_RCVBUF);
  if (!v) return std::unexpected(v.error());
  return static_cast<std::size_t>(*v);
}

result<void> socket::set_receive_buffer_size(std::size_t bytes) noexcept {
  return set_int_option(fd_.get(), SOL_SOCKET, SO_RCVBUF, static_cast<int>(clamp_to_int(bytes)));
}

result<bool> socket::is_non_blocking() const noexcept {
  const int fl = ::fcntl(fd_.get(), F_GETFL);
  if (fl < 0) return fail_errno(errno);
  return (fl & O_NONBLOCK) != 0;
}

result<void> socket::set_non_blocking(bool on) noexcept {
  const int fl = ::fcntl(fd_.get(), F_GETFL);
  if (fl < 0) return fail_errno(errno);
  const int want = on ? (fl | O_NONBLOCK) : (fl & ~O_NONBLOCK);
  if (want != fl && ::fcntl(fd_.get(), F_SETFL, want) != 0) return fail_errno(errno);
  return {};
}

result<credentials> socket::peer_credentials() const noexcept {
  // On TCP the kernel answers with pid 0 and uid -1: nothing it could vouch for.
  if (domain_ != socket_domain::local) return fail(errc::not_supported);
  ucred cred{};
  socklen_t len = sizeof(cred);
  if (::getsockopt(fd_.get(), SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) return fail_errno(errno);
  return credentials{cred.pid, cred.uid, cred.gid};
}

result<unique_fd> socket::peer_pidfd() const noexcept {
  if (domain_ != socket_domain::local) return fail(errc::not_supported);
  int pidfd = -1;
  socklen_t len = sizeof(pidfd);
  if (::getsockopt(fd_.get(), SOL_SOCKET, SO_PEERPIDFD, &pidfd, &len) != 0) {
    if (errno == ENOPROTOOPT) return fail(errc::not_supported);
    return fail_errno(errno);
  }
  return unique_fd{pidfd};
}

}  // namespace duplex
