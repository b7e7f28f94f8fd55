// duplex::connect, and reading an authkey from a file or an fd.
#include <fcntl.h>
#include <poll.h>
#include <unistd.h>

#include <time.h>

#include <algorithm>
#include <array>
#include <cerrno>

#include "base/syscall.hpp"
#include "duplex/endpoint.hpp"
#include "endpoint/net.hpp"

namespace duplex {
namespace {

// Connects a non-blocking socket to one address within the deadline.
result<unique_fd> connect_one(const detail::sock_address& to, int type,
                              const detail::deadline& until) {
  unique_fd fd(::socket(to.family(), type | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!fd.valid()) return fail_errno(errno);
  auto pause = std::chrono::microseconds(200);
  for (;;) {
    if (::connect(fd.get(), to.get(), to.size) == 0) return fd;
    if (errno == EINTR) continue;
    if (errno == EAGAIN && to.family() == AF_UNIX) {
      // The listener's backlog is full. Nothing signals when it has room: look again after a
      // pause that doubles up to 10 ms, until the deadline.
      if (until.passed()) return fail(errc::timed_out);
      const auto left = until.remaining();
      const std::chrono::nanoseconds wait = std::min<std::chrono::nanoseconds>(pause, left);
      timespec ts{0, static_cast<long>(wait.count())};
      ::nanosleep(&ts, nullptr);
      pause = std::min(pause * 2, std::chrono::microseconds(10'000));
      continue;
    }
    if (errno != EINPROGRESS) return fail_errno(errno);
    // TCP: the connection completes (or fails) later; writability says when, SO_ERROR how.
    auto ready = detail::wait_for(fd.get(), POLLOUT, until);
    if (!ready) return std::unexpected(ready.error());
    int err = 0;
    socklen_t len = sizeof err;
    if (::getsockopt(fd.get(), SOL_SOCKET, SO_ERROR, &err, &len) != 0) return fail_errno(errno);
    if (err != 0) return fail_errno(err);
    return fd;
  }
}

}  // namespace

result<channel> connect(const address& to, const endpoint_options& options,
                        std::chrono::nanoseconds timeout, std::string& detail) {
  detail.clear();
  if (auto ok = detail::check_endpoint(to, options); !ok) {
    detail = "the address or options are not valid for a connection";
    return std::unexpected(ok.error());
  }
  if (to.kind() == address_kind::tcp && to.port() == 0) {
    detail = "port 0 cannot be connected to";
    return fail_errno(EINVAL);
  }
  const detail::deadline until(timeout);
  auto targets = detail::resolve(to, false, detail);
  if (!targets) return std::unexpected(targets.error());
  const bool tcp = to.kind() == address_kind::tcp;
  const int type = tcp ? SOCK_STREAM : to_socket_type(options.kind);
  std::error_code last;
  unique_fd fd;
  for (const auto& t : *targets) {
    auto c = connect_one(t, type, until);
    if (c) {
      fd = std::move(*c);
      break;
    }
    last = c.error();
    if (last == errc::timed_out) break;
  }
  if (!fd.valid()) {
    detail = "cannot connect to " + to.to_string() + ": " + last.message();
    return std::unexpected(last);
  }
  if (tcp) {
    if (auto r = detail::set_tcp_options(fd.get(), options); !r) return std::unexpected(r.error());
  }
  if (!options.authkey.empty()) {
    detail::handshake hs(detail::handshake_role::client, options.authkey, options.allow_legacy_md5);
    if (auto r = hs.start(); !r) return std::unexpected(r.error());
    for (;;) {
      auto events = detail::pump(fd.get(), options.kind, hs);
      if (!events) {
        detail = "handshake with " + to.to_string() +
                 " failed: " + (hs.detail().empty() ? events.error().message() : hs.detail());
        return std::unexpected(events.error());
      }
      if (*events == 0) break;
      auto ready = detail::wait_for(fd.get(), *events, until);
      if (!ready) {
        detail = "handshake with " + to.to_string() + ": " + ready.error().message();
        return std::unexpected(ready.error());
      }
    }
  }
  const auto domain = tcp ? socket_domain::tcp : socket_domain::local;
  return detail::make_channel(std::move(fd), tcp ? socket_kind::stream : options.kind, domain,
                              options.channel);
}

result<channel> connect(const address& to, const endpoint_options& options,
                        std::chrono::nanoseconds timeout) {
  std::string detail;
  return connect(to, options, timeout, detail);
}

result<std::vector<std::byte>> read_authkey_fd(int fd) {
  std::vector<std::byte> key;
  std::array<std::byte, 4096> chunk;
  for (;;) {
    const ssize_t n = detail::retry_eintr([&] { return ::read(fd, chunk.data(), chunk.size()); });
    if (n < 0) return fail_errno(errno);
    if (n == 0) break;
    if (key.size() + static_cast<std::size_t>(n) > max_authkey_size) return fail_errno(EFBIG);
    key.insert(key.end(), chunk.begin(), chunk.begin() + n);
  }
  if (key.empty()) return fail_errno(EINVAL);
  return key;
}

result<std::vector<std::byte>> read_authkey_file(const std::string& path) {
  const unique_fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOCTTY));
  if (!fd.valid()) return fail_errno(errno);
  return read_authkey_fd(fd.get());
}

}  // namespace duplex
