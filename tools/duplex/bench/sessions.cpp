// duplex bench: every transport as a session (see sessions.hpp).
//
// Raw baselines use the system calls directly (socketpair, pipe2, send, recv, read, write, fork),
// duplex rows the library's public interface only. Peers are a thread or a forked child; the
// caller (or producer) and the peer are pinned to two different CPUs when there are two.
#include <fcntl.h>
#include <fmt/core.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <bit>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <initializer_list>
#include <new>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "sessions.hpp"

#include "bench.hpp"
#include "duplex/duplex.hpp"

namespace duplex::cli::bench {

void pin_to(int cpu) noexcept {
  if (cpu < 0) return;
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(static_cast<unsigned>(cpu), &set);
  static_cast<void>(::sched_setaffinity(0, sizeof(set), &set));
}

namespace {

using steady = std::chrono::steady_clock;

double seconds_between(steady::time_point a, steady::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

[[noreturn]] void sys_failure(const char* what, int err) {
  throw failure(fmt::format("{}: {}", what, std::strerror(err)));
}

template <typename T>
T check(result<T> r, const char* what) {
  if (!r) throw failure(fmt::format("{}: {}", what, r.error().message()));
  return std::move(*r);
}

void check(const result<void>& r, const char* what) {
  if (!r) throw failure(fmt::format("{}: {}", what, r.error().message()));
}

void relax() noexcept {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// The byte every position of message k is filled with.
std::uint8_t value_of(std::uint64_t k) noexcept { return static_cast<std::uint8_t>(k * 131 + 7); }

// Keeps the compiler from treating memory as unobserved.
void clobber(const void* p) noexcept { asm volatile("" : : "r"(p) : "memory"); }

// The consumer's rule, the same for every transport: read (and check) the first byte of every
// message and one byte per 4 KiB page of it.
constexpr std::size_t page = 4096;

class message_checker {
 public:
  // True if every byte read had the value of message k and the size is right.
  [[nodiscard]] static bool check(const std::byte* data, std::size_t n, std::size_t size,
                                  std::uint64_t k) noexcept {
    const auto v = static_cast<std::byte>(value_of(k));
    bool ok = n == size;
    for (std::size_t i = 0; i < n; i += page)
      ok &= data[i] == v;
    return ok;
  }
};

// The same rule for a stream received in bulk: position p of the stream is read when
// p % min(size, 4096) == 0 (sizes are powers of two).
class stream_checker {
 public:
  stream_checker(std::size_t size, std::uint64_t first)
      : step_(std::min(size, page)),
        shift_(static_cast<unsigned>(std::countr_zero(size))),
        first_(first) {}
  void feed(const std::byte* data, std::size_t n) noexcept {
    std::uint64_t p = (pos_ + step_ - 1) / step_ * step_;
    for (; p < pos_ + n; p += step_)
      ok_ &= data[p - pos_] == static_cast<std::byte>(value_of(first_ + (p >> shift_)));
    pos_ += n;
  }
  [[nodiscard]] bool ok() const noexcept { return ok_; }

 private:
  std::uint64_t step_;
  unsigned shift_;
  std::uint64_t first_;
  std::uint64_t pos_ = 0;
  bool ok_ = true;
};

// A page-aligned buffer. Two std::vectors of 4 KiB lie 4112 bytes apart, and on some CPUs
// glibc's memcpy between buffers that far apart runs many times slower than between page-aligned
// ones: every row's buffers are page-aligned, so that no row measures where its allocator put
// them.
class page_buffer {
 public:
  explicit page_buffer(std::size_t size)
      : size_(size),
        data_(static_cast<std::byte*>(
            std::aligned_alloc(page, (size + page - 1) / page * page + page))) {
    if (!data_) throw std::bad_alloc();
  }
  [[nodiscard]] std::byte* data() const noexcept { return data_.get(); }
  [[nodiscard]] std::size_t size() const noexcept { return size_; }
  [[nodiscard]] mutable_buffer bytes() const noexcept { return {data_.get(), size_}; }

 private:
  struct free_memory {
    void operator()(std::byte* p) const noexcept { std::free(p); }
  };
  std::size_t size_;
  std::unique_ptr<std::byte, free_memory> data_;
};

[[noreturn]] void bad_data(std::uint64_t from, std::uint64_t n) {
  throw failure(fmt::format("messages {}..{} arrived with the wrong bytes", from, from + n - 1));
}

// Closes every fd above 2 but those in keep (a child must not hold other rows' ends, or their
// peers would never see end-of-stream).
void close_all_but(std::initializer_list<int> keep) noexcept {
  std::vector<int> k(keep);
  std::sort(k.begin(), k.end());
  unsigned from = 3;
  for (int fd : k) {
    if (fd < 3) continue;
    const auto u = static_cast<unsigned>(fd);
    if (u > from) ::close_range(from, u - 1, 0);
    from = u + 1;
  }
  ::close_range(from, ~0U, 0);
}

// --- raw ends ---------------------------------------------------------------------------------

// One side of a raw link: where it reads and writes.
struct raw_end {
  int rfd = -1;
  int wfd = -1;
  bool sock = true;
};

// A unix socket path of its own for each listener this process makes, in $TMPDIR or /tmp.
std::string bench_socket_path() {
  static std::atomic<unsigned> count{0};
  const char* dir = std::getenv("TMPDIR");
  return fmt::format("{}/duplex-bench-{}-{}.sock", dir != nullptr && *dir != '\0' ? dir : "/tmp",
                     ::getpid(), count.fetch_add(1));
}

// A listening socket: AF_UNIX stream on a new path (unlinked when the listener is closed by its
// owner, see raw_listener), or TCP on 127.0.0.1 and a free port.
class raw_listener {
 public:
  explicit raw_listener(raw_kind kind) : tcp_(kind == raw_kind::tcp) {
    fd_ = unique_fd(::socket(tcp_ ? AF_INET : AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (!fd_.valid()) sys_failure("socket", errno);
    if (tcp_) {
      sockaddr_in in{};
      in.sin_family = AF_INET;
      in.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
      if (::bind(fd_.get(), reinterpret_cast<sockaddr*>(&in), sizeof in) != 0) {
        sys_failure("bind", errno);
      }
      socklen_t len = sizeof in;
      ::getsockname(fd_.get(), reinterpret_cast<sockaddr*>(&in), &len);
      std::memcpy(&addr_, &in, sizeof in);
      len_ = sizeof in;
    } else {
      path_ = bench_socket_path();
      sockaddr_un un{};
      un.sun_family = AF_UNIX;
      std::snprintf(un.sun_path, sizeof un.sun_path, "%s", path_.c_str());
      ::unlink(path_.c_str());
      if (::bind(fd_.get(), reinterpret_cast<sockaddr*>(&un), sizeof un) != 0) {
        sys_failure("bind", errno);
      }
      std::memcpy(&addr_, &un, sizeof un);
      len_ = sizeof un;
    }
    if (::listen(fd_.get(), 128) != 0) sys_failure("listen", errno);
  }
  raw_listener(const raw_listener&) = delete;
  raw_listener& operator=(const raw_listener&) = delete;
  ~raw_listener() {
    if (!path_.empty()) ::unlink(path_.c_str());
  }

  // A new connected client socket (TCP_NODELAY on tcp).
  [[nodiscard]] unique_fd connect() const {
    unique_fd c(::socket(tcp_ ? AF_INET : AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (!c.valid()) sys_failure("socket", errno);
    if (::connect(c.get(), reinterpret_cast<const sockaddr*>(&addr_), len_) != 0) {
      sys_failure("connect", errno);
    }
    no_delay(c.get());
    return c;
  }
  // The next connection (TCP_NODELAY on tcp).
  [[nodiscard]] unique_fd accept() const {
    unique_fd a(::accept4(fd_.get(), nullptr, nullptr, SOCK_CLOEXEC));
    if (!a.valid()) sys_failure("accept4", errno);
    no_delay(a.get());
    return a;
  }
  [[nodiscard]] int fd() const noexcept { return fd_.get(); }

  // TCP_NODELAY on fd, on tcp.
  void no_delay(int fd) const {
    const int on = 1;
    if (tcp_ && ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &on, sizeof on) != 0) {
      sys_failure("setsockopt(TCP_NODELAY)", errno);
    }
  }

 private:
  bool tcp_;
  unique_fd fd_;
  std::string path_;
  sockaddr_storage addr_{};
  socklen_t len_ = 0;
};

// A pair of sockets, two pipes, or a connection and its accepted end, with both sides' fds
// owned.
struct raw_link {
  raw_end near, far;
  std::vector<unique_fd> near_fds, far_fds;

  explicit raw_link(raw_kind kind) {
    if (kind == raw_kind::pipe) {
      int to_far[2];
      int to_near[2];
      if (::pipe2(to_far, O_CLOEXEC) != 0) sys_failure("pipe2", errno);
      near_fds.emplace_back(to_far[1]);
      far_fds.emplace_back(to_far[0]);
      if (::pipe2(to_near, O_CLOEXEC) != 0) sys_failure("pipe2", errno);
      near_fds.emplace_back(to_near[0]);
      far_fds.emplace_back(to_near[1]);
      near = {to_near[0], to_far[1], false};
      far = {to_far[0], to_near[1], false};
      return;
    }
    if (kind == raw_kind::unix_path || kind == raw_kind::tcp) {
      const raw_listener l(kind);
      unique_fd client = l.connect();
      unique_fd server = l.accept();
      near = {client.get(), client.get(), true};
      far = {server.get(), server.get(), true};
      near_fds.push_back(std::move(client));
      far_fds.push_back(std::move(server));
      return;
    }
    int sv[2];
    const int type = kind == raw_kind::stream ? SOCK_STREAM : SOCK_SEQPACKET;
    if (::socketpair(AF_UNIX, type | SOCK_CLOEXEC, 0, sv) != 0) sys_failure("socketpair", errno);
    near_fds.emplace_back(sv[0]);
    far_fds.emplace_back(sv[1]);
    near = {sv[0], sv[0], true};
    far = {sv[1], sv[1], true};
  }
};

// Writes n bytes (one call per message on a packet socket). Returns errno, or 0.
int write_all(const raw_end& e, const std::byte* p, std::size_t n) noexcept {
  while (n > 0) {
    const ssize_t w = e.sock ? ::send(e.wfd, p, n, MSG_NOSIGNAL) : ::write(e.wfd, p, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    p += w;
    n -= static_cast<std::size_t>(w);
  }
  return 0;
}

// One read; spin: wait by retrying recv(MSG_DONTWAIT). Returns the bytes, 0 at the end, or -errno.
ssize_t read_some(const raw_end& e, std::byte* p, std::size_t n, bool spin) noexcept {
  for (;;) {
    const ssize_t r = e.sock ? ::recv(e.rfd, p, n, spin ? MSG_DONTWAIT : 0) : ::read(e.rfd, p, n);
    if (r >= 0) return r;
    if (errno == EINTR) continue;
    if (spin && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      relax();
      continue;
    }
    return -errno;
  }
}

// Reads one whole message of n bytes: one packet, or n bytes of a stream. False at the end or
// on any error.
bool read_message(const raw_end& e, std::byte* p, std::size_t n, bool spin, bool packet) noexcept {
  if (packet) return read_some(e, p, n, spin) == static_cast<ssize_t>(n);
  while (n > 0) {
    const ssize_t r = read_some(e, p, n, spin);
    if (r <= 0) return false;
    p += r;
    n -= static_cast<std::size_t>(r);
  }
  return true;
}

void raw_echo(const raw_end& e, std::size_t size, bool spin, bool packet) noexcept {
  const page_buffer buf(size);
  while (read_message(e, buf.data(), size, spin, packet)) {
    if (write_all(e, buf.data(), size) != 0) return;
  }
}

// A forked child running fn (it returns when its end of the link closes), reaped on destruction.
class raw_child {
 public:
  template <typename F>
  raw_child(F&& fn, std::initializer_list<int> keep) {
    std::fflush(nullptr);
    const pid_t parent = ::getpid();
    pid_ = ::fork();
    if (pid_ < 0) sys_failure("fork", errno);
    if (pid_ == 0) {
      if (::prctl(PR_SET_PDEATHSIG, SIGKILL) != 0 || ::getppid() != parent) ::_exit(127);
      close_all_but(keep);
      fn();
      ::_exit(0);
    }
  }
  raw_child(const raw_child&) = delete;
  raw_child& operator=(const raw_child&) = delete;
  ~raw_child() {
    int status = 0;
    while (::waitpid(pid_, &status, 0) < 0 && errno == EINTR) {
    }
  }

 private:
  pid_t pid_ = -1;
};

// --- duplex ends --------------------------------------------------------------------------------
//
// The sessions of duplex::channel and duplex::ring_channel are one template each, over a link: a
// small struct that names the end type and makes the ends. A link has:
//   end        the type of one end (channel, ring_channel);
//   pair()     two connected ends in this process (.first, .second);
//   process    a forked child echoing on its own end, built from (link, size, cpu); near() is
//              this process's end, and its destructor reaps the child once that end is closed.

// The peer of a round trip: sends every message back as it came, until its end closes.
template <typename End>
void echo(End& ch, std::size_t size) noexcept {
  const page_buffer buf(size);
  for (;;) {
    auto r = ch.receive_into(buf.bytes());
    if (!r || !ch.send(const_buffer(buf.data(), r->size))) return;
  }
}

// duplex::channel on a socket pair of kind with options; a forked peer is fork_with_channel's.
struct channel_link {
  using end = channel;
  socket_kind kind = socket_kind::stream;
  channel_options options;

  [[nodiscard]] auto pair() const { return check(channel_pair(kind, options), "channel_pair"); }

  class process {
   public:
    process(const channel_link& link, std::size_t size, int cpu) {
      fork_options fo;
      fo.kind = link.kind;
      fo.channel = link.options;
      fo.kill_on_parent_death = true;
      child_ = check(fork_with_channel(
                         [size, cpu](channel& ch) {
                           close_all_but({ch.native_handle()});
                           pin_to(cpu);
                           echo(ch, size);
                           return 0;
                         },
                         fo),
                     "fork_with_channel");
    }
    process(const process&) = delete;
    process& operator=(const process&) = delete;
    ~process() {
      if (child_.pid() > 0) static_cast<void>(child_.wait());
    }
    [[nodiscard]] channel& near() noexcept { return child_.channel(); }

   private:
    child child_;
  };
};

// A duplex endpoint on kind, without authkey.
address endpoint_address(endpoint_kind kind) {
  return check(kind == endpoint_kind::tcp ? address::parse("tcp:127.0.0.1:0")
                                          : address::unix_path(bench_socket_path()),
               "address");
}

// duplex::channel over a connection: the end a listener accepted, and the end connect() made.
// A forked peer connects to this process's listener and echoes.
struct endpoint_link {
  using end = channel;
  endpoint_kind kind = endpoint_kind::unix_path;

  [[nodiscard]] std::pair<channel, channel> pair() const {
    auto l = check(listener::listen(endpoint_address(kind)), "listen");
    auto near = check(connect(l.local_address(), {}, std::chrono::seconds(10)), "connect");
    auto far = check(l.accept(std::chrono::seconds(10)), "accept");
    return {std::move(near), std::move(far.chan)};
  }

  class process {
   public:
    process(const endpoint_link& link, std::size_t size, int cpu) {
      auto l = check(listener::listen(endpoint_address(link.kind)), "listen");
      const address at = l.local_address();
      child_.emplace(
          [at, size, cpu] {
            pin_to(cpu);
            auto ch = connect(at, {}, std::chrono::seconds(10));
            if (ch) echo(*ch, size);
          },
          std::initializer_list<int>{});
      near_ = check(l.accept(std::chrono::seconds(10)), "accept").chan;
    }
    [[nodiscard]] channel& near() noexcept { return near_; }

   private:
    std::optional<raw_child> child_;  // reaped after near_ is gone
    channel near_;
  };
};

// duplex::ring_channel with options; a forked peer sets up its own end over the stream socket it
// inherits, as two unrelated processes would.
struct ring_link {
  using end = ring_channel;
  ring_options options;

  [[nodiscard]] auto pair() const { return check(ring_channel_pair(options), "ring_channel_pair"); }

  class process {
   public:
    process(const ring_link& link, std::size_t size, int cpu) {
      auto sockets = check(socket_pair(socket_kind::stream), "socket_pair");
      const int far_fd = sockets.second.native_handle();
      child_.emplace(
          [&sockets, &link, size, cpu] {
            pin_to(cpu);
            auto ch = ring_channel::create(std::move(sockets.second), link.options);
            if (ch) echo(*ch, size);
          },
          std::initializer_list<int>{far_fd});
      sockets.second.close();
      near_ = check(ring_channel::create(std::move(sockets.first), link.options),
                    "ring_channel::create");
    }
    [[nodiscard]] ring_channel& near() noexcept { return near_; }

   private:
    std::optional<raw_child> child_;  // reaped after near_ is gone
    ring_channel near_;
  };
};
// --- round trips --------------------------------------------------------------------------------

class raw_rtt final : public session {
 public:
  raw_rtt(raw_kind kind, peers who, std::size_t size, bool spin, const placement& cpus)
      : link_(kind),
        size_(size),
        spin_(spin),
        packet_(kind == raw_kind::seqpacket),
        out_(size),
        in_(size) {
    std::memset(out_.data(), 'x', size);
    const raw_end far = link_.far;
    const bool packet = packet_;
    auto echo = [far, size, spin, packet, cpu = cpus.b] {
      pin_to(cpu);
      raw_echo(far, size, spin, packet);
    };
    if (who == peers::threads) {
      thread_ = std::thread(echo);
    } else {
      child_.emplace(echo, std::initializer_list<int>{far.rfd, far.wfd});
      link_.far_fds.clear();
    }
  }
  ~raw_rtt() override {
    link_.near_fds.clear();  // the peer sees the end and returns
    if (thread_.joinable()) thread_.join();
    child_.reset();
  }

  double run(std::uint64_t n) override {
    const auto start = steady::now();
    for (std::uint64_t i = 0; i < n; ++i) {
      if (const int err = write_all(link_.near, out_.data(), size_); err != 0) {
        sys_failure("send", err);
      }
      if (!read_message(link_.near, in_.data(), size_, spin_, packet_)) {
        throw failure("the echoing peer stopped");
      }
    }
    return seconds_between(start, steady::now());
  }

 private:
  raw_link link_;
  std::size_t size_;
  bool spin_, packet_;
  page_buffer out_, in_;
  std::thread thread_;
  std::optional<raw_child> child_;
};

// Round trips through a duplex channel or ring (see the links above): send() a message, then
// receive_into() a reused buffer; the peer is a thread, or a forked child.
template <typename Link>
class channel_rtt final : public session {
 public:
  channel_rtt(const Link& link, peers who, std::size_t size, const placement& cpus)
      : size_(size), out_(size), in_(size) {
    std::memset(out_.data(), 'x', size);
    if (who == peers::threads) {
      auto ends = link.pair();
      own_ = std::move(ends.first);
      thread_ = std::thread([far = std::move(ends.second), size, cpu = cpus.b]() mutable {
        pin_to(cpu);
        echo(far, size);
      });
    } else {
      process_.emplace(link, size, cpus.b);
      near_ = &process_->near();
    }
  }
  ~channel_rtt() override {
    near_->close();  // the peer sees the end and returns
    if (thread_.joinable()) thread_.join();
    process_.reset();
  }

  double run(std::uint64_t n) override {
    auto& c = *near_;
    const auto start = steady::now();
    for (std::uint64_t i = 0; i < n; ++i) {
      check(c.send(const_buffer(out_.bytes())), "send");
      const auto got = check(c.receive_into(in_.bytes()), "receive");
      if (got.size != size_) throw failure("the echo came back with another size");
    }
    return seconds_between(start, steady::now());
  }

 private:
  using end = typename Link::end;

  std::size_t size_;
  page_buffer out_, in_;
  end own_;  // the near end when the peer is a thread
  end* near_ = &own_;
  std::thread thread_;
  std::optional<typename Link::process> process_;
};
// --- connections ------------------------------------------------------------------------------

// n connections one after the other, accepted by a thread (see open_connect).
class connect_session final : public session {
 public:
  connect_session(endpoint_kind kind, bool with_duplex, const placement& cpus)
      : duplex_(with_duplex), tcp_(kind == endpoint_kind::tcp) {
    if (duplex_) {
      options_.authkey.assign(32, std::byte{0x5a});
      listener_options lo;
      lo.endpoint = options_;
      listener_ = check(listener::listen(endpoint_address(kind), lo), "listen");
      at_ = listener_.local_address();
      thread_ = std::thread([this, cpu = cpus.b] {
        pin_to(cpu);
        for (;;) {
          auto c = listener_.accept();
          if (!c) return;  // closed
          std::array<std::byte, 8> buf{};
          auto got = c->chan.receive_into(buf);
          if (got) static_cast<void>(c->chan.send(const_buffer(buf.data(), got->size)));
        }
      });
    } else {
      raw_.emplace(kind == endpoint_kind::tcp ? raw_kind::tcp : raw_kind::unix_path);
      thread_ = std::thread([this, cpu = cpus.b] {
        pin_to(cpu);
        for (;;) {
          const unique_fd a(::accept4(raw_->fd(), nullptr, nullptr, SOCK_CLOEXEC));
          if (!a.valid() || stop_.load()) return;
          raw_->no_delay(a.get());
          const raw_end e{a.get(), a.get(), true};
          std::array<std::byte, 8> buf{};
          if (read_message(e, buf.data(), buf.size(), false, false)) {
            static_cast<void>(write_all(e, buf.data(), buf.size()));
          }
        }
      });
    }
  }
  ~connect_session() override {
    if (duplex_) {
      listener_.close();  // the accepting thread returns
    } else {
      stop_.store(true);
      try {
        static_cast<void>(raw_->connect());  // wakes the accepting thread, which sees stop_
      } catch (const failure&) {
        ::shutdown(raw_->fd(), SHUT_RDWR);
      }
    }
    thread_.join();
  }

  double run(std::uint64_t n) override {
    const auto start = steady::now();
    for (std::uint64_t i = 0; i < n; ++i) {
      if (duplex_) {
        auto ch = check(connect(at_, options_, std::chrono::seconds(10)), "connect");
        check(ch.send(const_buffer(out_.data(), out_.size())), "send");
        const auto got = check(ch.receive_into(in_), "receive");
        if (got.size != in_.size()) throw failure("the echo came back with another size");
        abort_on_close(ch.native_handle());
      } else {
        const unique_fd c = raw_->connect();
        const raw_end e{c.get(), c.get(), true};
        if (const int err = write_all(e, out_.data(), out_.size()); err != 0) {
          sys_failure("send", err);
        }
        if (!read_message(e, in_.data(), in_.size(), false, false)) {
          throw failure("the accepting thread stopped");
        }
        abort_on_close(c.get());
      }
    }
    return seconds_between(start, steady::now());
  }

 private:
  // The client's close resets a tcp connection (SO_LINGER 0) rather than leave it in TIME_WAIT:
  // thousands of connections a second would otherwise run out of loopback's ephemeral ports.
  // Both rows do the same.
  void abort_on_close(int fd) const noexcept {
    const linger now{1, 0};
    if (tcp_) static_cast<void>(::setsockopt(fd, SOL_SOCKET, SO_LINGER, &now, sizeof now));
  }

  bool duplex_;
  bool tcp_;
  std::array<std::byte, 8> out_{}, in_{};
  endpoint_options options_;
  listener listener_;
  address at_;
  std::optional<raw_listener> raw_;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

// --- throughput ---------------------------------------------------------------------------------

// A producer (the calling thread) and a consumer thread started for each run; the time runs from
// the producer's first byte to the consumer's last.
class producer_consumer : public session {
 public:
  explicit producer_consumer(std::size_t size, const placement& cpus) : size_(size), cpus_(cpus) {}

  double run(std::uint64_t n) override {
    const std::uint64_t first = next_;
    next_ += n;
    std::atomic<bool> ready{false};
    steady::time_point end{};
    std::exception_ptr consumer_error;
    std::thread consumer([&] {
      pin_to(cpus_.b);
      ready.store(true, std::memory_order_release);
      try {
        consume(n, first);
      } catch (...) {
        consumer_error = std::current_exception();
        abort_consumer();
      }
      end = steady::now();
    });
    while (!ready.load(std::memory_order_acquire))
      std::this_thread::yield();
    const auto start = steady::now();
    std::exception_ptr producer_error;
    try {
      produce(n, first);
    } catch (...) {
      producer_error = std::current_exception();
      abort_producer();
    }
    consumer.join();
    if (consumer_error) std::rethrow_exception(consumer_error);
    if (producer_error) std::rethrow_exception(producer_error);
    return seconds_between(start, end);
  }

 protected:
  virtual void produce(std::uint64_t n, std::uint64_t first) = 0;
  virtual void consume(std::uint64_t n, std::uint64_t first) = 0;
  // Make the other side's blocked call return (the run has failed).
  virtual void abort_producer() noexcept = 0;
  virtual void abort_consumer() noexcept = 0;

  std::size_t size_;
  placement cpus_;

 private:
  std::uint64_t next_ = 0;  // messages sent so far: message k is filled with value_of(k)
};

constexpr std::size_t bulk = std::size_t{256} << 10;  // raw consumers' receive buffer

class raw_throughput final : public producer_consumer {
 public:
  raw_throughput(raw_kind kind, std::size_t size, const placement& cpus)
      : producer_consumer(size, cpus),
        kind_(kind),
        link_(kind),
        src_(size),
        dst_(std::max(bulk, kind == raw_kind::seqpacket ? size : 0)) {}

 protected:
  void produce(std::uint64_t n, std::uint64_t first) override {
    for (std::uint64_t i = 0; i < n; ++i) {
      std::memset(src_.data(), value_of(first + i), size_);
      if (const int err = write_all(link_.near, src_.data(), size_); err != 0) {
        sys_failure(link_.near.sock ? "send" : "write", err);
      }
    }
  }
  void consume(std::uint64_t n, std::uint64_t first) override {
    const raw_end& e = link_.far;
    if (kind_ == raw_kind::seqpacket) {
      bool ok = true;
      for (std::uint64_t i = 0; i < n; ++i) {
        const ssize_t r = read_some(e, dst_.data(), dst_.size(), false);
        if (r <= 0) throw failure("the stream ended early");
        ok &= message_checker::check(dst_.data(), static_cast<std::size_t>(r), size_, first + i);
      }
      if (!ok) bad_data(first, n);
      return;
    }
    stream_checker c(size_, first);
    std::uint64_t left = n * size_;
    while (left > 0) {
      const ssize_t r =
          read_some(e, dst_.data(), std::min<std::uint64_t>(left, dst_.size()), false);
      if (r <= 0) throw failure("the stream ended early");
      c.feed(dst_.data(), static_cast<std::size_t>(r));
      left -= static_cast<std::uint64_t>(r);
    }
    if (!c.ok()) bad_data(first, n);
  }
  void abort_producer() noexcept override {
    if (link_.near.sock) {
      ::shutdown(link_.near.wfd, SHUT_RDWR);
    } else {
      link_.near_fds.clear();  // the consumer reads the end
    }
  }
  void abort_consumer() noexcept override {
    if (link_.far.sock) {
      ::shutdown(link_.far.rfd, SHUT_RDWR);
    } else {
      link_.far_fds.clear();  // the producer gets EPIPE
    }
  }

 private:
  raw_kind kind_;
  raw_link link_;
  page_buffer src_, dst_;
};

// One thread: fill, copy, touch. The ceiling of any transport that copies once.
class memcpy_throughput final : public session {
 public:
  explicit memcpy_throughput(std::size_t size) : size_(size), src_(size), dst_(size) {}
  double run(std::uint64_t n) override {
    const std::uint64_t first = next_;
    next_ += n;
    bool ok = true;
    const auto start = steady::now();
    for (std::uint64_t i = 0; i < n; ++i) {
      std::memset(src_.data(), value_of(first + i), size_);
      std::memcpy(dst_.data(), src_.data(), size_);
      clobber(dst_.data());
      ok &= message_checker::check(dst_.data(), size_, size_, first + i);
    }
    const auto end = steady::now();
    if (!ok) bad_data(first, n);
    return seconds_between(start, end);
  }

 private:
  std::size_t size_;
  page_buffer src_, dst_;
  std::uint64_t next_ = 0;
};

// Whole messages through a duplex channel or ring (see the links above): memset() fills each in
// the producer's own buffer, one send() per message; the consumer receive_into()s a reused buffer.
template <typename Link>
class channel_throughput : public producer_consumer {
 public:
  channel_throughput(const Link& link, std::size_t size, const placement& cpus)
      : producer_consumer(size, cpus), src_(size), dst_(size) {
    auto ends = link.pair();
    near_ = std::move(ends.first);
    far_ = std::move(ends.second);
  }

 protected:
  void produce(std::uint64_t n, std::uint64_t first) override {
    for (std::uint64_t i = 0; i < n; ++i) {
      std::memset(src_.data(), value_of(first + i), size_);
      check(near_.send(const_buffer(src_.bytes())), "send");
    }
  }
  void consume(std::uint64_t n, std::uint64_t first) override {
    bool ok = true;
    for (std::uint64_t i = 0; i < n; ++i) {
      const auto got = check(far_.receive_into(dst_.bytes()), "receive_into");
      ok &= message_checker::check(dst_.data(), got.size, size_, first + i);
    }
    if (!ok) bad_data(first, n);
  }
  void abort_producer() noexcept override { near_.close(); }
  void abort_consumer() noexcept override { far_.close(); }

  typename Link::end near_, far_;

 private:
  page_buffer src_, dst_;
};

using duplex_throughput = channel_throughput<channel_link>;
// Batches of 64 messages, received with receive_batch (seen in place).
class batch_throughput final : public duplex_throughput {
 public:
  static constexpr std::size_t per_batch = 64;
  batch_throughput(std::size_t size, const placement& cpus)
      : duplex_throughput(channel_link{socket_kind::stream, {}}, size, cpus), one_(size) {}

 protected:
  void produce(std::uint64_t n, std::uint64_t first) override {
    batch_.clear();
    for (std::uint64_t i = 0; i < n; ++i) {
      std::memset(one_.data(), value_of(first + i), size_);
      check(batch_.add(const_buffer(one_.bytes())), "batch::add");
      if (batch_.size() == per_batch) {
        check(near_.send(batch_), "send(batch)");
        batch_.clear();
      }
    }
    if (!batch_.empty()) check(near_.send(batch_), "send(batch)");
    batch_.clear();
  }
  void consume(std::uint64_t n, std::uint64_t first) override {
    std::uint64_t got = 0;
    bool ok = true;
    while (got < n) {
      check(far_.receive_batch(
                [&](message_view& m) {
                  ok &= message_checker::check(m.bytes.data(), m.bytes.size(), size_, first + got);
                  ++got;
                },
                static_cast<std::size_t>(n - got)),
            "receive_batch");
    }
    if (!ok) bad_data(first, n);
  }

 private:
  page_buffer one_;
  batch batch_;
};

// Large payloads through the shared pool: allocate, fill in place, send(std::move(buffer)).
class shm_throughput final : public duplex_throughput {
 public:
  shm_throughput(shared_receive mode, std::size_t size, const placement& cpus)
      : duplex_throughput(channel_link{socket_kind::stream, options_for(mode)}, size, cpus),
        mode_(mode) {}

  [[nodiscard]] std::uint64_t warm_bytes() const override {
    return 2 * channel_options{}.shared_memory.pool_size;  // every block of the pool used once
  }
  [[nodiscard]] std::string notes() const override {
    std::string s;
    if (fallbacks_ > 0) {
      s += fmt::format("{} of {} messages did not fit the pool and went in a memfd of their own",
                       fallbacks_, sent_);
    }
    if (mode_ == shared_receive::view && not_views_ > 0) {
      if (!s.empty()) s += "; ";
      s += fmt::format("{} of {} messages were received as copies, not views", not_views_, sent_);
    }
    return s;
  }

 protected:
  static channel_options options_for(shared_receive mode) {
    channel_options o;
    o.shared_memory.enabled = true;
    o.shared_memory.receive = mode;
    return o;
  }
  void produce(std::uint64_t n, std::uint64_t first) override {
    for (std::uint64_t i = 0; i < n; ++i) {
      auto buf = check(near_.allocate(size_), "allocate");
      if (!buf.in_pool()) ++fallbacks_;
      std::memset(buf.bytes().data(), value_of(first + i), buf.size());
      check(near_.send(std::move(buf)), "send(shared_buffer)");
    }
    sent_ += n;
  }
  void consume(std::uint64_t n, std::uint64_t first) override {
    bool ok = true;
    for (std::uint64_t i = 0; i < n; ++i) {
      const message m = check(far_.receive(), "receive");
      if (!m.is_view()) ++not_views_;
      ok &= message_checker::check(m.bytes().data(), m.size(), size_, first + i);
    }
    if (!ok) bad_data(first, n);
  }

 private:
  shared_receive mode_;
  std::uint64_t fallbacks_ = 0, not_views_ = 0, sent_ = 0;
};

}  // namespace

std::unique_ptr<session> open_raw_rtt(raw_kind kind, peers who, std::size_t size, bool spin,
                                      const placement& cpus) {
  return std::make_unique<raw_rtt>(kind, who, size, spin, cpus);
}

std::unique_ptr<session> open_channel_rtt(socket_kind kind, const channel_options& options,
                                          peers who, std::size_t size, const placement& cpus) {
  return std::make_unique<channel_rtt<channel_link>>(channel_link{kind, options}, who, size, cpus);
}

std::unique_ptr<session> open_endpoint_rtt(endpoint_kind kind, peers who, std::size_t size,
                                           const placement& cpus) {
  return std::make_unique<channel_rtt<endpoint_link>>(endpoint_link{kind}, who, size, cpus);
}

std::unique_ptr<session> open_connect(endpoint_kind kind, bool duplex, const placement& cpus) {
  return std::make_unique<connect_session>(kind, duplex, cpus);
}

std::unique_ptr<session> open_endpoint_throughput(endpoint_kind kind, std::size_t size,
                                                  const placement& cpus) {
  return std::make_unique<channel_throughput<endpoint_link>>(endpoint_link{kind}, size, cpus);
}

std::unique_ptr<session> open_ring_rtt(const ring_options& options, peers who, std::size_t size,
                                       const placement& cpus) {
  return std::make_unique<channel_rtt<ring_link>>(ring_link{options}, who, size, cpus);
}

std::unique_ptr<session> open_raw_throughput(raw_kind kind, std::size_t size,
                                             const placement& cpus) {
  return std::make_unique<raw_throughput>(kind, size, cpus);
}

std::unique_ptr<session> open_memcpy_throughput(std::size_t size) {
  return std::make_unique<memcpy_throughput>(size);
}

std::unique_ptr<session> open_channel_throughput(socket_kind kind, std::size_t size,
                                                 const placement& cpus) {
  return std::make_unique<duplex_throughput>(channel_link{kind, {}}, size, cpus);
}

std::unique_ptr<session> open_batch_throughput(std::size_t size, const placement& cpus) {
  return std::make_unique<batch_throughput>(size, cpus);
}

std::unique_ptr<session> open_ring_throughput(const ring_options& options, std::size_t size,
                                              const placement& cpus) {
  return std::make_unique<channel_throughput<ring_link>>(ring_link{options}, size, cpus);
}

std::unique_ptr<session> open_shm_throughput(shared_receive mode, std::size_t size,
                                             const placement& cpus) {
  return std::make_unique<shm_throughput>(mode, size, cpus);
}

}  // namespace duplex::cli::bench
