#include "duplex/waiter.hpp"

#include <sys/epoll.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <limits>

#include "base/syscall.hpp"
#include "duplex/channel.hpp"
#include "duplex/process.hpp"

namespace duplex {
namespace {

constexpr std::size_t max_events = 256;

std::uint32_t to_epoll(readiness r) noexcept {
  std::uint32_t e = EPOLLRDHUP;  // hangups always come (EPOLLHUP and EPOLLERR need no asking)
  if (any(r, readiness::readable)) e |= EPOLLIN;
  if (any(r, readiness::writable)) e |= EPOLLOUT;
  return e;
}

readiness from_epoll(std::uint32_t e) noexcept {
  readiness r = readiness::none;
  if ((e & EPOLLIN) != 0) r = r | readiness::readable;
  if ((e & EPOLLOUT) != 0) r = r | readiness::writable;
  if ((e & (EPOLLHUP | EPOLLRDHUP | EPOLLERR)) != 0) r = r | readiness::closed;
  return r;
}

}  // namespace

result<waiter> waiter::create() {
  const int fd = ::epoll_create1(EPOLL_CLOEXEC);
  if (fd < 0) return fail_errno(errno);
  waiter w;
  w.epoll_.reset(fd);
  return w;
}

result<void> waiter::add(int fd, std::uint64_t key, readiness interest) {
  if (by_fd_.contains(fd)) return fail_errno(EEXIST);
  const std::uint64_t id = next_id_++;
  epoll_event ev{};
  ev.events = to_epoll(interest);
  ev.data.u64 = id;
  if (::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, fd, &ev) != 0) return fail_errno(errno);
  by_fd_.emplace(fd, registration{id, key});
  by_id_.emplace(id, fd);
  return {};
}

result<void> waiter::add(const channel& ch, std::uint64_t key, readiness interest) {
  return add(ch.native_handle(), key, interest);
}

result<void> waiter::add_exit(const child& c, std::uint64_t key) {
  return add(c.pidfd(), key, readiness::readable);
}

result<void> waiter::modify(int fd, readiness interest) {
  const auto it = by_fd_.find(fd);
  if (it == by_fd_.end()) return fail_errno(ENOENT);
  epoll_event ev{};
  ev.events = to_epoll(interest);
  ev.data.u64 = it->second.id;
  if (::epoll_ctl(epoll_.get(), EPOLL_CTL_MOD, fd, &ev) != 0) return fail_errno(errno);
  return {};
}

result<void> waiter::remove(int fd) {
  const auto it = by_fd_.find(fd);
  if (it == by_fd_.end()) return fail_errno(ENOENT);
  by_id_.erase(it->second.id);  // events already collected for it now name an unknown id
  by_fd_.erase(it);
  if (::epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, fd, nullptr) != 0 && errno != EBADF &&
      errno != ENOENT) {
    return fail_errno(errno);
  }
  return {};
}

result<std::size_t> waiter::wait(std::chrono::nanoseconds timeout) {
  ready_.clear();
  ready_ids_.clear();
  next_ = 0;
  const detail::deadline until(timeout);
  std::array<epoll_event, max_events> events{};
  for (;;) {
    int ms = -1;
    if (!until.infinite()) {
      // Round up, so that a wait never ends before its deadline.
      const auto left = until.remaining();
      ms = static_cast<int>(std::min<long long>((left.count() + 999'999) / 1'000'000,
                                                std::numeric_limits<int>::max()));
    }
    const int n = ::epoll_wait(epoll_.get(), events.data(), static_cast<int>(events.size()), ms);
    if (n < 0) {
      if (errno == EINTR) continue;
      return fail_errno(errno);
    }
    if (n == 0) {
      if (!until.infinite() && until.remaining() > std::chrono::nanoseconds::zero()) continue;
      return fail(errc::timed_out);
    }
    for (int i = 0; i < n; ++i) {
      ready_ids_.push_back(events[static_cast<std::size_t>(i)].data.u64);
      ready_.push_back(ready_event{0, -1, from_epoll(events[static_cast<std::size_t>(i)].events)});
    }
    return static_cast<std::size_t>(n);
  }
}

std::optional<ready_event> waiter::next() {
  while (next_ < ready_.size()) {
    const std::size_t i = next_++;
    // An event whose registration is gone (removed, or its fd added anew with a new id since
    // wait()) is stale and skipped.
    const auto it = by_id_.find(ready_ids_[i]);
    if (it == by_id_.end()) continue;
    ready_event e = ready_[i];
    e.fd = it->second;
    e.key = by_fd_.at(e.fd).key;
    return e;
  }
  return std::nullopt;
}

}  // namespace duplex
