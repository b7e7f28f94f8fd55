// What the listener and connect share (net.hpp): resolving addresses, checking options, tcp
// options, and moving a handshake's bytes over a non-blocking socket.
#include "endpoint/net.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/un.h>

#include <cerrno>
#include <cstddef>
#include <cstring>
#include <new>

#include "base/syscall.hpp"
#include "channel/channel_check.hpp"
#include "socket/io.hpp"

namespace duplex::detail {

result<std::vector<sock_address>> resolve(const address& a, bool passive, std::string& detail) {
  std::vector<sock_address> out;
  try {
    if (a.kind() != address_kind::tcp) {
      if (a.name().empty() || a.name().size() > max_unix_path_size) return fail_errno(EINVAL);
      sock_address s;
      auto* un = reinterpret_cast<sockaddr_un*>(&s.storage);
      un->sun_family = AF_UNIX;
      // An abstract name starts with a NUL byte, and its length is the address's size exactly.
      const std::size_t at = a.kind() == address_kind::unix_abstract ? 1 : 0;
      std::memcpy(un->sun_path + at, a.name().data(), a.name().size());
      s.size = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + at + a.name().size() +
                                      (at == 0 ? 1 : 0));
      out.push_back(s);
      return out;
    }
    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_protocol = IPPROTO_TCP;
    hints.ai_flags = AI_NUMERICSERV | (passive ? AI_PASSIVE : AI_ADDRCONFIG);
    addrinfo* found = nullptr;
    const std::string port = std::to_string(a.port());
    const int rc = ::getaddrinfo(a.name().c_str(), port.c_str(), &hints, &found);
    if (rc != 0) {
      detail = "cannot resolve '" + a.name() + "': " + ::gai_strerror(rc);
      if (rc == EAI_MEMORY) return fail_errno(ENOMEM);
      if (rc == EAI_SYSTEM) return fail_errno(errno);
      return fail_errno(EHOSTUNREACH);
    }
    for (const addrinfo* i = found; i != nullptr; i = i->ai_next) {
      if (i->ai_addrlen > sizeof(sockaddr_storage)) continue;
      sock_address s;
      std::memcpy(&s.storage, i->ai_addr, i->ai_addrlen);
      s.size = i->ai_addrlen;
      out.push_back(s);
    }
    ::freeaddrinfo(found);
  } catch (const std::bad_alloc&) {
    return fail_errno(ENOMEM);
  }
  if (out.empty()) {
    detail = "'" + a.name() + "' has no IPv4 or IPv6 address";
    return fail_errno(EHOSTUNREACH);
  }
  return out;
}

address to_address(const sockaddr_storage& s, socklen_t size) {
  char host[INET6_ADDRSTRLEN] = {};
  if (s.ss_family == AF_INET) {
    const auto& in = reinterpret_cast<const sockaddr_in&>(s);
    ::inet_ntop(AF_INET, &in.sin_addr, host, sizeof host);
    if (auto a = address::tcp(host, ntohs(in.sin_port))) return *a;
  } else if (s.ss_family == AF_INET6) {
    const auto& in6 = reinterpret_cast<const sockaddr_in6&>(s);
    ::inet_ntop(AF_INET6, &in6.sin6_addr, host, sizeof host);
    if (auto a = address::tcp(host, ntohs(in6.sin6_port))) return *a;
  } else if (s.ss_family == AF_UNIX) {
    const auto& un = reinterpret_cast<const sockaddr_un&>(s);
    const auto base = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path));
    if (size > base) {
      const std::size_t n = size - base;
      if (un.sun_path[0] == '\0') {
        if (auto a = address::unix_abstract(std::string_view(un.sun_path + 1, n - 1))) return *a;
      } else if (auto a =
                     address::unix_path(std::string_view(un.sun_path, ::strnlen(un.sun_path, n)))) {
        return *a;
      }
    }
  }
  return {};
}

result<void> check_endpoint(const address& a, const endpoint_options& o) {
  if (a.name().empty()) return fail_errno(EINVAL);
  if (o.kind != socket_kind::stream && o.kind != socket_kind::seqpacket) return fail_errno(EINVAL);
  if (a.kind() == address_kind::tcp) {
    if (o.kind != socket_kind::stream) return fail_errno(EINVAL);
    if (o.channel.shared_memory.enabled) return fail(errc::not_supported);
  }
  const auto& k = o.keepalive;
  if (k.enabled && (k.idle < std::chrono::seconds(1) || k.idle > std::chrono::seconds(32767) ||
                    k.interval < std::chrono::seconds(1) ||
                    k.interval > std::chrono::seconds(32767) || k.count < 1 || k.count > 127)) {
    return fail_errno(EINVAL);
  }
  if (auto ok = check_channel(o.kind, o.channel); !ok) {
    return fail_errno(EINVAL);  // wrong_kind (python framing on seqpacket) included
  }
  return {};
}

result<void> set_tcp_options(int fd, const endpoint_options& o) {
  const auto set = [fd](int level, int name, int value) -> result<void> {
    if (::setsockopt(fd, level, name, &value, sizeof value) != 0) return fail_errno(errno);
    return {};
  };
  if (auto r = set(IPPROTO_TCP, TCP_NODELAY, o.tcp_nodelay ? 1 : 0); !r) return r;
  if (!o.keepalive.enabled) return {};
  if (auto r = set(SOL_SOCKET, SO_KEEPALIVE, 1); !r) return r;
  if (auto r = set(IPPROTO_TCP, TCP_KEEPIDLE, static_cast<int>(o.keepalive.idle.count())); !r) {
    return r;
  }
  if (auto r = set(IPPROTO_TCP, TCP_KEEPINTVL, static_cast<int>(o.keepalive.interval.count()));
      !r) {
    return r;
  }
  return set(IPPROTO_TCP, TCP_KEEPCNT, o.keepalive.count);
}

result<short> pump(int fd, socket_kind kind, handshake& hs) {
  for (;;) {
    const auto out = hs.output();
    if (!out.empty()) {
      auto n = send_bytes(fd, out.data(), out.size(), MSG_DONTWAIT);
      if (!n) {
        if (hs.failed()) return std::unexpected(hs.error());
        if (n.error() == errc::would_block) return POLLOUT;
        if (n.error() == std::errc::broken_pipe || n.error() == std::errc::connection_reset) {
          return fail(errc::peer_closed);
        }
        return std::unexpected(n.error());
      }
      hs.wrote(*n);
      continue;
    }
    if (hs.failed()) return std::unexpected(hs.error());
    if (hs.done()) return 0;
    const std::size_t want = hs.input_wanted();
    if (kind == socket_kind::seqpacket) {
      // One message per packet; one byte more than the largest shows an oversized one.
      std::array<std::byte, 4 + max_handshake_message + 1> packet;
      auto n = recv_bytes(fd, packet.data(), packet.size(), MSG_DONTWAIT);
      if (!n) {
        if (n.error() == errc::would_block) return POLLIN;
        if (n.error() == std::errc::connection_reset) return fail(errc::peer_closed);
        return std::unexpected(n.error());
      }
      if (*n == 0) return fail(errc::peer_closed);
      if (auto r = hs.feed_packet(std::span(packet).first(*n)); !r) continue;  // failed: out
      continue;
    }
    std::array<std::byte, 4 + max_handshake_message> buf;
    auto n = recv_bytes(fd, buf.data(), want, MSG_DONTWAIT);
    if (!n) {
      if (n.error() == errc::would_block) return POLLIN;
      if (n.error() == std::errc::connection_reset) return fail(errc::peer_closed);
      return std::unexpected(n.error());
    }
    if (*n == 0) return fail(errc::peer_closed);
    if (auto r = hs.feed(std::span(buf).first(*n)); !r) continue;  // failed: its output first
  }
}

result<channel> make_channel(unique_fd fd, socket_kind kind, socket_domain domain,
                             const channel_options& o) {
  const int fl = ::fcntl(fd.get(), F_GETFL);
  if (fl < 0 || ::fcntl(fd.get(), F_SETFL, fl & ~O_NONBLOCK) != 0) return fail_errno(errno);
  return channel::create(socket(std::move(fd), kind, domain), o);
}

}  // namespace duplex::detail
