// Internal helpers shared by the library's sources: errno translation, the peer-gone test,
// deadlines, and waiting for readiness with EINTR retried. Not installed.
#pragma once

#include <poll.h>

#include <cerrno>
#include <chrono>
#include <ctime>
#include <span>
#include <system_error>

#include "duplex/constants.hpp"
#include "duplex/error.hpp"

namespace duplex::detail {

// The error for a failed syscall's errno: EAGAIN becomes errc::would_block, the rest stay errno.
[[nodiscard]] inline std::unexpected<std::error_code> from_errno(int err) noexcept {
  if (err == EAGAIN || err == EWOULDBLOCK) return fail(errc::would_block);
  return fail_errno(err);
}

// True if a send or receive error on a connected socket means the peer is gone (EPIPE: it shut
// down or closed its end; ECONNRESET: it closed with data unread).
[[nodiscard]] inline bool peer_gone(const std::error_code& ec) noexcept {
  return ec == std::errc::broken_pipe || ec == std::errc::connection_reset;
}

// A point in steady time after which an operation gives up; "forever" never comes.
class deadline {
 public:
  explicit deadline(std::chrono::nanoseconds timeout) noexcept {
    using namespace std::chrono;
    // Anything beyond ~100 years is forever; this also keeps now() + timeout from overflowing.
    if (timeout >= hours(24 * 365 * 100)) return;
    infinite_ = false;
    end_ = steady_clock::now() + (timeout < nanoseconds::zero() ? nanoseconds::zero() : timeout);
  }

  [[nodiscard]] bool infinite() const noexcept { return infinite_; }

  // When it comes (meaningless if infinite).
  [[nodiscard]] std::chrono::steady_clock::time_point at() const noexcept { return end_; }

  // True once the deadline has come; never for an infinite one.
  [[nodiscard]] bool passed() const noexcept {
    return !infinite_ && std::chrono::steady_clock::now() >= end_;
  }

  // The time left as ppoll's timeout, stored in ts: nullptr (wait without limit) if infinite.
  [[nodiscard]] const timespec* left(timespec& ts) const noexcept {
    if (infinite_) return nullptr;
    const auto ns = remaining().count();
    ts.tv_sec = static_cast<time_t>(ns / 1'000'000'000);
    ts.tv_nsec = static_cast<long>(ns % 1'000'000'000);
    return &ts;
  }

  // Time left, at least zero; forever if infinite.
  [[nodiscard]] std::chrono::nanoseconds remaining() const noexcept {
    if (infinite_) return forever;
    const auto left = end_ - std::chrono::steady_clock::now();
    return left < std::chrono::nanoseconds::zero()
               ? std::chrono::nanoseconds::zero()
               : std::chrono::duration_cast<std::chrono::nanoseconds>(left);
  }

 private:
  bool infinite_ = true;
  std::chrono::steady_clock::time_point end_{};
};

// Calls f() until it does not fail with EINTR, and returns its last result: for syscalls that
// return -1 and set errno. A call with a timeout is not retried with this (it would restart the
// full timeout): wait_for counts down instead.
template <class F>
[[nodiscard]] auto retry_eintr(F&& f) noexcept(noexcept(f())) {
  for (;;) {
    auto r = f();
    if (r != -1 || errno != EINTR) return r;
  }
}

// Waits until fd reports any of `events` (or an error/hangup) or the deadline comes, retrying
// EINTR with the time that remains. Errors: errc::timed_out, EBADF (fd not open), ppoll's other
// errnos.
[[nodiscard]] inline result<short> wait_for(int fd, short events, const deadline& until) noexcept {
  if (fd < 0) return fail_errno(EBADF);  // poll would silently ignore a negative fd
  for (;;) {
    pollfd p{fd, events, 0};
    timespec ts{};
    const int r = ::ppoll(&p, 1, until.left(ts), nullptr);
    if (r > 0) {
      if ((p.revents & POLLNVAL) != 0) return fail_errno(EBADF);
      return p.revents;
    }
    if (r == 0) return fail(errc::timed_out);
    if (errno != EINTR) return fail_errno(errno);
  }
}

// Waits until any of fds reports its events (or an error/hangup) or the deadline comes, retrying
// EINTR with the time that remains; each fd's revents are set on return (a negative fd is
// ignored, as ppoll does). Errors: errc::timed_out, EBADF (an fd not open), ppoll's other errnos.
[[nodiscard]] inline result<void> wait_for(std::span<pollfd> fds, const deadline& until) noexcept {
  for (;;) {
    timespec ts{};
    const int r = ::ppoll(fds.data(), fds.size(), until.left(ts), nullptr);
    if (r > 0) {
      for (const pollfd& p : fds) {
        if ((p.revents & POLLNVAL) != 0) return fail_errno(EBADF);
      }
      return {};
    }
    if (r == 0) return fail(errc::timed_out);
    if (errno != EINTR) return fail_errno(errno);
  }
}

// wait_for with a timeout counted from now.
[[nodiscard]] inline result<short> wait_for(int fd, short events,
                                            std::chrono::nanoseconds timeout) noexcept {
  return wait_for(fd, events, deadline(timeout));
}

}  // namespace duplex::detail
