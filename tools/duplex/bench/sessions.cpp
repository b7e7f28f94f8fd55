// duplex bench: every transport as a session (see sessions.hpp).
//
// Raw baselines use the system calls directly (socketpair, pipe2, send, recv, read, write, fork),
// duplex rows the library's public interface only. Peers are a thread or a forked child; the
// caller (or producer) and the peer are pinned to two different CPUs when there are two.
#include <fcntl.h>
#include <fmt/core.h>
#include <sched.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <initializer_list>
#include <new>
#include <optional>
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

// A pair of sockets, or two pipes, with both sides' fds owned.
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
