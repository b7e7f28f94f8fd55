// duplex::listener: binding (a stale unix socket file replaced, a live one left alone), and
// accept: one epoll fd over the listening fd, the close eventfd, every connection in handshake
// (each driven by its own non-blocking state machine, at most max_handshakes of them) and a
// timerfd set to the earliest handshake deadline or the end of a rest, so that the epoll fd,
// which native_handle() gives, is readable whenever accept(0) may make progress. EMFILE is
// survived with a reserve fd (libuv's trick: close it, accept and close the connection, reopen
// it) so that a full fd table never turns accept into a busy loop.
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/timerfd.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cerrno>
#include <deque>
#include <mutex>
#include <new>

#include "base/syscall.hpp"
#include "duplex/endpoint.hpp"
#include "endpoint/net.hpp"

namespace duplex {
namespace {

using clock = std::chrono::steady_clock;

// How long the listening fd rests when no connection can be taken at all (no fd, no memory):
// accept looks again after this instead of spinning on a readable fd it cannot serve.
constexpr auto rest_when_starved = std::chrono::milliseconds(100);

unique_fd open_reserve() noexcept { return unique_fd(::open("/", O_PATH | O_CLOEXEC)); }

}  // namespace

// A connection taken from the backlog and not yet handed out.
struct pending {
  unique_fd fd;
  std::string peer;  // for failure reports
  address peer_address;
  std::optional<credentials> creds;
  clock::time_point deadline;
  std::unique_ptr<detail::handshake> hs;  // null: no authkey, ready at once
  short events = 0;                       // what its handshake waits for (in the epoll set)
};

struct listener::impl {
  listener_options options;
  address local;
  bool tcp = false;
  unique_fd fd;
  unique_fd wake;           // an eventfd: close() from another thread ends a wait in accept
  unique_fd reserve;        // the spare fd given up at EMFILE
  unique_fd poller;         // epoll: wake, timer, fd while it may be accepted from, the handshakes
  unique_fd timer;          // a timerfd: the earliest handshake deadline, or the end of a rest
  bool polling_fd = false;  // fd is in poller's set
  clock::time_point timer_at = clock::time_point::max();  // what timer is set to (max: off)
  bool created_file = false;
  dev_t file_dev = 0;
  ino_t file_ino = 0;

  std::mutex accepting;  // one accept at a time; close() waits for it
  std::atomic<bool> closed{false};
  std::vector<pending> handshaking;
  std::deque<pending> ready;
  clock::time_point resting_until{};

  mutable std::mutex failure_mutex;
  std::atomic<std::uint64_t> failure_count{0};
  std::optional<accept_failure> last;

  // Counts a failed connection, and keeps and passes on its description when there is memory
  // for it (the count is kept even when there is not).
  void report(const std::string& peer, std::error_code ec, std::string why) {
    failure_count.fetch_add(1, std::memory_order_relaxed);
    accept_failure f;
    try {
      f = {peer, ec, why.empty() ? ec.message() : std::move(why)};
    } catch (const std::bad_alloc&) {
      return;
    }
    if (options.on_failure) options.on_failure(f);
    const std::lock_guard lock(failure_mutex);
    last = std::move(f);
  }

  void take_connections();
  void admit(unique_fd conn, const sockaddr_storage& from, socklen_t from_size);
  void step(pending& p);
  void forget(const pending& p) noexcept;
  void settle();
  result<connection> hand_out(pending p);
  void shut() noexcept;
};

void listener::impl::take_connections() {
  while (handshaking.size() + ready.size() < options.max_handshakes) {
    sockaddr_storage from{};
    socklen_t from_size = sizeof from;
    const int c = ::accept4(fd.get(), reinterpret_cast<sockaddr*>(&from), &from_size,
                            SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (c >= 0) {
      admit(unique_fd(c), from, from_size);
      continue;
    }
    const int err = errno;
    if (err == EINTR) continue;
    if (err == EAGAIN || err == EWOULDBLOCK) return;
    if (err == EMFILE || err == ENFILE) {
      // No fd to take the connection with. Left in the backlog it keeps the listening fd
      // readable and accept would spin; so the reserve fd is given up, the connection taken and
      // closed at once, and the reserve taken back.
      if (!reserve.valid()) {
        resting_until = clock::now() + rest_when_starved;
        return;
      }
      reserve.reset();
      unique_fd dropped(
          ::accept4(fd.get(), reinterpret_cast<sockaddr*>(&from), &from_size, SOCK_CLOEXEC));
      const bool took = dropped.valid();
      dropped.reset();  // before the reserve is taken back: its slot is the one free
      reserve = open_reserve();
      if (took) {
        report(tcp ? detail::to_address(from, from_size).to_string() : "unix peer",
               std::error_code(err, std::system_category()),
               "no fd to take a connection with: closed at once");
      }
      if (!reserve.valid()) resting_until = clock::now() + rest_when_starved;
      if (!took || !reserve.valid()) return;
      continue;
    }
    // The connection's own failure (accept(2) passes on a pending connection's network errors):
    // that connection is gone, take the next.
    if (err == ECONNABORTED || err == EPROTO || err == EPERM || err == ENETDOWN ||
        err == ENOPROTOOPT || err == EHOSTDOWN || err == ENONET || err == EHOSTUNREACH ||
        err == EOPNOTSUPP || err == ENETUNREACH) {
      continue;
    }
    // No memory, or anything else: the listening fd rests rather than spin on it.
    resting_until = clock::now() + rest_when_starved;
    return;
  }
}

void listener::impl::admit(unique_fd conn, const sockaddr_storage& from, socklen_t from_size) {
  pending p;
  p.fd = std::move(conn);
  p.deadline = clock::now() + options.handshake_timeout;
  try {
    if (tcp) {
      p.peer_address = detail::to_address(from, from_size);
      p.peer = p.peer_address.to_string();
      if (auto r = detail::set_tcp_options(p.fd.get(), options.endpoint); !r) {
        report(p.peer, r.error(), "");
        return;
      }
    } else {
      p.peer_address = detail::to_address(from, from_size);
      ucred cred{};
      socklen_t len = sizeof cred;
      if (::getsockopt(p.fd.get(), SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) {
        report("unix peer", std::error_code(errno, std::system_category()), "");
        return;
      }
      p.creds = credentials{cred.pid, cred.uid, cred.gid};
      p.peer = "unix peer pid " + std::to_string(cred.pid) + " uid " + std::to_string(cred.uid);
      // Checked before a byte is read or written: a uid not allowed learns nothing.
      const auto& uids = options.allowed_uids;
      if (!uids.empty() && std::find(uids.begin(), uids.end(), cred.uid) == uids.end()) {
        report(p.peer, std::error_code(EACCES, std::system_category()),
               "uid " + std::to_string(cred.uid) + " is not allowed");
        return;
      }
    }
    if (options.endpoint.authkey.empty()) {
      ready.push_back(std::move(p));
      return;
    }
    p.hs = std::make_unique<detail::handshake>(detail::handshake_role::listener,
                                               options.endpoint.authkey,
                                               options.endpoint.allow_legacy_md5);
    if (auto r = p.hs->start(); !r) {
      report(p.peer, r.error(), "");
      return;
    }
    handshaking.push_back(std::move(p));
    step(handshaking.back());  // the challenge goes out at once
  } catch (const std::bad_alloc&) {
    report(p.peer, std::error_code(ENOMEM, std::system_category()), "");
  }
}

// Moves a handshake on; a finished one goes to ready, a failed one is reported and closed. Either
// way its fd here is left empty, which is how the caller knows to remove it from handshaking.
void listener::impl::step(pending& p) {
  auto events = detail::pump(p.fd.get(), options.endpoint.kind, *p.hs);
  if (events && *events != 0) {
    if (*events == p.events) return;
    epoll_event ev{};
    ev.events =
        ((*events & POLLIN) != 0 ? EPOLLIN : 0u) | ((*events & POLLOUT) != 0 ? EPOLLOUT : 0u);
    ev.data.fd = p.fd.get();
    if (::epoll_ctl(poller.get(), p.events == 0 ? EPOLL_CTL_ADD : EPOLL_CTL_MOD, p.fd.get(), &ev) ==
        0) {
      p.events = *events;
      return;
    }
    events = std::unexpected(std::error_code(errno, std::system_category()));
  }
  forget(p);
  if (!events) {
    report(p.peer, events.error(),
           p.hs->detail().empty() ? "handshake: " + events.error().message() : p.hs->detail());
    p.fd.reset();
    return;
  }
  ready.push_back(std::move(p));
  p.fd.reset();  // moved from: marks it for removal
}

// Takes a handshake's connection out of the epoll set (before it is closed or handed out).
void listener::impl::forget(const pending& p) noexcept {
  if (p.events != 0) ::epoll_ctl(poller.get(), EPOLL_CTL_DEL, p.fd.get(), nullptr);
}

// Drops the handshakes past their deadline, and brings the epoll set up to date: the listening
// fd in it while there is room and no rest, the timer set to the next deadline or rest's end.
void listener::impl::settle() {
  const auto now = clock::now();
  auto next = clock::time_point::max();
  std::erase_if(handshaking, [&](pending& p) {
    if (p.deadline > now) {
      next = std::min(next, p.deadline);
      return false;
    }
    forget(p);
    report(p.peer, make_error_code(errc::timed_out), "the handshake's deadline passed");
    return true;
  });
  const bool room = handshaking.size() + ready.size() < options.max_handshakes;
  if (const bool want = room && now >= resting_until; want != polling_fd) {
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.fd = fd.get();
    if (::epoll_ctl(poller.get(), want ? EPOLL_CTL_ADD : EPOLL_CTL_DEL, fd.get(), &ev) == 0) {
      polling_fd = want;
    } else if (want) {
      resting_until = now + rest_when_starved;  // no memory for it: look again after a rest
    }
  }
  if (now < resting_until) next = std::min(next, resting_until);
  // `next` is always ahead of now (what has passed was dropped above), and setting the timer also
  // clears its expirations: it is readable only once `next` has passed.
  itimerspec spec{};
  if (next != clock::time_point::max()) {
    // steady_clock is CLOCK_MONOTONIC, the timer's clock; a zero would disarm it, hence 1 ns.
    const auto ns = std::max<std::int64_t>(
        std::chrono::duration_cast<std::chrono::nanoseconds>(next.time_since_epoch()).count(), 1);
    spec.it_value.tv_sec = static_cast<time_t>(ns / 1'000'000'000);
    spec.it_value.tv_nsec = static_cast<long>(ns % 1'000'000'000);
  }
  if (next != timer_at) {
    ::timerfd_settime(timer.get(), TFD_TIMER_ABSTIME, &spec, nullptr);
    timer_at = next;
  }
}

result<connection> listener::impl::hand_out(pending p) {
  connection c;
  const auto kind = tcp ? socket_kind::stream : options.endpoint.kind;
  const auto domain = tcp ? socket_domain::tcp : socket_domain::local;
  if (!tcp) {
    int pidfd = -1;
    socklen_t len = sizeof pidfd;
#ifndef SO_PEERPIDFD
#define SO_PEERPIDFD 77
#endif
    if (::getsockopt(p.fd.get(), SOL_SOCKET, SO_PEERPIDFD, &pidfd, &len) == 0) {
      c.peer_pidfd = unique_fd(pidfd);
    } else if (p.creds && p.creds->pid > 0) {
      // Older kernels: by pid, racing with its reuse (endpoint.hpp says so).
      c.peer_pidfd = unique_fd(static_cast<int>(::syscall(SYS_pidfd_open, p.creds->pid, 0)));
    }
  }
  auto ch = detail::make_channel(std::move(p.fd), kind, domain, options.endpoint.channel);
  if (!ch) return std::unexpected(ch.error());
  c.chan = std::move(*ch);
  c.peer = std::move(p.peer_address);
  c.peer_credentials = p.creds;
  return c;
}

void listener::impl::shut() noexcept {
  handshaking.clear();
  ready.clear();
  if (created_file && local.kind() == address_kind::unix_path) {
    // Only the file this listener bound: another listener may have replaced it since.
    struct stat st {};
    if (::lstat(local.name().c_str(), &st) == 0 && st.st_dev == file_dev && st.st_ino == file_ino) {
      ::unlink(local.name().c_str());
    }
    created_file = false;
  }
  fd.reset();
  reserve.reset();
  polling_fd = false;
}

listener::listener() noexcept = default;
listener::listener(listener&&) noexcept = default;
listener& listener::operator=(listener&& other) noexcept {
  if (this != &other) {
    close();
    impl_ = std::move(other.impl_);
  }
  return *this;
}
listener::~listener() { close(); }

namespace {

// Whether something listens on a unix socket path: a connect that is not refused says so.
bool unix_path_is_live(const detail::sock_address& at, int type) {
  const unique_fd probe(::socket(AF_UNIX, type | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!probe.valid()) return true;  // cannot tell: leave it alone
  const int r = detail::retry_eintr([&] { return ::connect(probe.get(), at.get(), at.size); });
  return r == 0 || errno != ECONNREFUSED;
}

}  // namespace

result<listener> listener::listen(const address& at, listener_options options) {
  if (auto ok = detail::check_endpoint(at, options.endpoint); !ok)
    return std::unexpected(ok.error());
  if (options.max_handshakes == 0 || options.backlog < 1 ||
      options.handshake_timeout <= std::chrono::nanoseconds::zero()) {
    return fail_errno(EINVAL);
  }
  std::string why;
  auto targets = detail::resolve(at, true, why);
  if (!targets) return std::unexpected(targets.error());
  listener l;
  try {
    l.impl_ = std::make_unique<impl>();
  } catch (const std::bad_alloc&) {
    return fail_errno(ENOMEM);
  }
  impl& m = *l.impl_;
  m.tcp = at.kind() == address_kind::tcp;
  const int type = m.tcp ? SOCK_STREAM : to_socket_type(options.endpoint.kind);
  std::error_code last = std::make_error_code(std::errc::address_not_available);
  for (const auto& t : *targets) {
    unique_fd fd(::socket(t.family(), type | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
    if (!fd.valid()) {
      last = std::error_code(errno, std::system_category());
      continue;
    }
    const int on = 1;
    if (m.tcp && ::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &on, sizeof on) != 0) {
      return fail_errno(errno);
    }
    if (t.family() == AF_INET6 &&
        ::setsockopt(fd.get(), IPPROTO_IPV6, IPV6_V6ONLY, &on, sizeof on) != 0) {
      return fail_errno(errno);
    }
    int r = ::bind(fd.get(), t.get(), t.size);
    if (r != 0 && errno == EADDRINUSE && at.kind() == address_kind::unix_path) {
      // A socket file is there. Replace it only if it is a socket nothing listens on (left by
      // a process that died): never another kind of file, never a live listener's.
      struct stat st {};
      if (::lstat(at.name().c_str(), &st) == 0 && S_ISSOCK(st.st_mode) &&
          !unix_path_is_live(t, type)) {
        ::unlink(at.name().c_str());
        r = ::bind(fd.get(), t.get(), t.size);
      } else {
        errno = EADDRINUSE;
      }
    }
    if (r != 0) {
      last = std::error_code(errno, std::system_category());
      continue;
    }
    if (at.kind() == address_kind::unix_path) {
      struct stat st {};
      if (::lstat(at.name().c_str(), &st) == 0) {
        m.created_file = true;
        m.file_dev = st.st_dev;
        m.file_ino = st.st_ino;
      }
    }
    if (::listen(fd.get(), options.backlog) != 0) {
      last = std::error_code(errno, std::system_category());
      m.fd = std::move(fd);
      m.local = at;
      m.shut();
      return std::unexpected(last);
    }
    sockaddr_storage bound{};
    socklen_t size = sizeof bound;
    m.local = at;
    if (m.tcp && ::getsockname(fd.get(), reinterpret_cast<sockaddr*>(&bound), &size) == 0) {
      m.local = detail::to_address(bound, size);
    }
    m.fd = std::move(fd);
    break;
  }
  if (!m.fd.valid()) return std::unexpected(last);
  m.wake = unique_fd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!m.wake.valid()) return fail_errno(errno);
  m.poller = unique_fd(::epoll_create1(EPOLL_CLOEXEC));
  if (!m.poller.valid()) return fail_errno(errno);
  m.timer = unique_fd(::timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC | TFD_NONBLOCK));
  if (!m.timer.valid()) return fail_errno(errno);
  for (const int watched : {m.wake.get(), m.timer.get(), m.fd.get()}) {
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.fd = watched;
    if (::epoll_ctl(m.poller.get(), EPOLL_CTL_ADD, watched, &ev) != 0) return fail_errno(errno);
  }
  m.polling_fd = true;
  m.reserve = open_reserve();
  m.options = std::move(options);
  return l;
}

result<connection> listener::accept(std::chrono::nanoseconds timeout) {
  if (!impl_) return fail(errc::closed);
  impl& m = *impl_;
  const std::lock_guard lock(m.accepting);
  const detail::deadline until(timeout);
  for (;;) {
    if (m.closed.load()) return fail(errc::closed);
    while (!m.ready.empty()) {
      pending p = std::move(m.ready.front());
      m.ready.pop_front();
      const std::string peer = p.peer;
      auto c = m.hand_out(std::move(p));
      if (c || c.error() == std::errc::not_enough_memory) {
        m.settle();
        return c;
      }
      m.report(peer, c.error(), "");
    }
    // Handshakes past their deadline are dropped, however their bytes trickle in.
    m.settle();
    int wait_ms = -1;
    if (!until.infinite()) {
      // Rounded up: a wait that ends early would only be made again.
      wait_ms = static_cast<int>(std::min<std::int64_t>(
          std::chrono::ceil<std::chrono::milliseconds>(until.remaining()).count(),
          std::int64_t{24} * 3600 * 1000));
    }
    std::array<epoll_event, 16> got{};
    const int r = ::epoll_wait(m.poller.get(), got.data(), static_cast<int>(got.size()), wait_ms);
    if (r < 0) {
      if (errno == EINTR) continue;  // the time left is taken again at the top
      return fail_errno(errno);
    }
    bool incoming = false;
    for (int i = 0; i < r; ++i) {
      const int which = got[static_cast<std::size_t>(i)].data.fd;
      if (which == m.wake.get()) return fail(errc::closed);
      if (which == m.timer.get()) {
        std::uint64_t ticks = 0;
        [[maybe_unused]] const auto n = ::read(m.timer.get(), &ticks, sizeof ticks);
      } else if (which == m.fd.get()) {
        incoming = true;
      } else {
        const auto at = std::find_if(m.handshaking.begin(), m.handshaking.end(),
                                     [&](const pending& p) { return p.fd.get() == which; });
        if (at != m.handshaking.end()) m.step(*at);
      }
    }
    std::erase_if(m.handshaking, [](const pending& p) { return !p.fd.valid(); });
    if (incoming && m.polling_fd) {
      m.take_connections();
      std::erase_if(m.handshaking, [](const pending& p) { return !p.fd.valid(); });
    }
    if (m.ready.empty() && until.passed()) {
      m.settle();
      return fail(errc::timed_out);
    }
  }
}

const address& listener::local_address() const noexcept {
  static const address none;
  return impl_ ? impl_->local : none;
}

int listener::native_handle() const noexcept {
  return impl_ && !impl_->closed.load() ? impl_->poller.get() : -1;
}

std::uint64_t listener::failures() const noexcept {
  return impl_ ? impl_->failure_count.load(std::memory_order_relaxed) : 0;
}

std::optional<accept_failure> listener::last_failure() const {
  if (!impl_) return std::nullopt;
  const std::lock_guard lock(impl_->failure_mutex);
  return impl_->last;
}

void listener::close() noexcept {
  if (!impl_) return;
  if (impl_->closed.exchange(true)) return;
  const std::uint64_t one = 1;
  [[maybe_unused]] const auto w = ::write(impl_->wake.get(), &one, sizeof one);
  const std::lock_guard lock(impl_->accepting);  // an accept in progress returns first
  impl_->shut();
}

}  // namespace duplex
