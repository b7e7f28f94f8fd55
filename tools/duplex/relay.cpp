// The relay shared by `duplex run` and `duplex connect` (see relay.hpp): lines of stdin become
// messages on a channel (a feeder thread), messages become lines on stdout (the main thread's
// loop), with signals, the child if there is one, and every way it can end.
#include "relay.hpp"

#include <fcntl.h>
#include <fmt/core.h>
#include <poll.h>
#include <pthread.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>

#include "report.hpp"

namespace duplex::cli {
namespace {

using clock = std::chrono::steady_clock;

// How long the child has to end after a signal was passed on, before SIGKILL.
constexpr auto grace_period = std::chrono::seconds(5);

// Stop reading the channel while this much output waits for a slow stdout.
constexpr std::size_t output_high_water = std::size_t{1} << 20;

// The wake pipe: the signal handler writes one byte per signal (its number, + 0x80 when the
// kernel sent it, e.g. the terminal's Ctrl-C), the feeder thread a 0 when it stopped on a
// failure; the main loop polls the read end. It is closed only once nothing can write to it any
// more (close_wake_pipe); while a feeder may still run, it stays open to the process's exit, so
// that no write can ever land in a reused fd number.
int wake_read_fd = -1;
int wake_write_fd = -1;

extern "C" void on_forwarded_signal(int sig, siginfo_t* info, void* /*context*/) {
  const int saved = errno;
  const auto byte =
      static_cast<unsigned char>(sig | (info != nullptr && info->si_code == SI_KERNEL ? 0x80 : 0));
  static_cast<void>(::write(wake_write_fd, &byte, 1));  // a full pipe has signals enough waiting
  errno = saved;
}

extern "C" void on_sigpipe(int /*sig*/) {}

bool sigpipe_ignored_at_start = false;

}  // namespace

// The handlers go without SA_RESTART, so a write to a stalled stdout in the main thread returns
// at a signal; the feeder thread blocks these signals. SIGPIPE gets an empty handler rather than
// SIG_IGN: writes to a closed stdout return EPIPE, and a child (whose handlers are reset at
// spawn) still starts with SIGPIPE at its default.
std::error_code catch_signals(std::span<const int> signals) {
  if (wake_read_fd < 0) {
    std::array<int, 2> p{};
    if (::pipe2(p.data(), O_CLOEXEC | O_NONBLOCK) != 0) return {errno, std::system_category()};
    wake_read_fd = p[0];
    wake_write_fd = p[1];
  }
  struct sigaction old {};
  for (const int sig : signals) {
    if (::sigaction(sig, nullptr, &old) == 0 && old.sa_handler == SIG_IGN) continue;
    struct sigaction sa {};
    sa.sa_sigaction = on_forwarded_signal;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    if (::sigaction(sig, &sa, nullptr) != 0) return {errno, std::system_category()};
  }
  if (::sigaction(SIGPIPE, nullptr, &old) == 0 && old.sa_handler == SIG_IGN) {
    sigpipe_ignored_at_start = true;
  } else {
    struct sigaction sa {};
    sa.sa_handler = on_sigpipe;
    sigemptyset(&sa.sa_mask);
    if (::sigaction(SIGPIPE, &sa, nullptr) != 0) return {errno, std::system_category()};
  }
  return {};
}

int wake_read_end() noexcept { return wake_read_fd; }

int die_of(int sig) {
  std::signal(sig, SIG_DFL);
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, sig);
  ::pthread_sigmask(SIG_UNBLOCK, &set, nullptr);
  ::raise(sig);
  return 128 + sig;
}

namespace {

std::string errno_text(int err) { return std::error_code(err, std::system_category()).message(); }

// Why a relay ends early, in words, for the one-line error.
std::string what_went_wrong(const std::string& name, const channel& ch, const std::error_code& ec) {
  if (ec == errc::truncated_message) return name + " stopped in the middle of a message";
  std::string detail = ch.error_detail();
  if (detail.empty()) detail = ec.message();
  return name + " broke the protocol: " + detail;
}

// What the feeder thread tells the main loop.
struct feeder_report {
  std::mutex mutex;
  std::string failure;  // set once, before the 0 byte is written to the wake pipe
  // Set once the feeder makes no call that can wait any more: joining it is then bounded.
  std::atomic<bool> finished{false};
};

// The feeder: lines of stdin to messages, on a thread of its own, so that a child that sends
// without reading can never block the messages coming back. It reads fd 0 itself (read(2)), so
// that a read error is told apart from the end of input.
class feeder {
 public:
  feeder(std::shared_ptr<channel> ch, std::shared_ptr<feeder_report> report)
      : ch_(std::move(ch)), report_(std::move(report)) {}

  void operator()() {
    struct mark_finished {
      feeder_report& r;
      ~mark_finished() { r.finished.store(true); }
    } const finished{*report_};
    std::array<char, 64 * 1024> buf{};
    for (;;) {
      const ssize_t n = ::read(STDIN_FILENO, buf.data(), buf.size());
      if (n < 0) {
        if (errno == EINTR) continue;
        if (errno == EAGAIN) {  // stdin was left non-blocking by whoever shares it
          pollfd p{STDIN_FILENO, POLLIN, 0};
          static_cast<void>(::poll(&p, 1, -1));
          continue;
        }
        return fail("reading stdin: " + errno_text(errno));
      }
      if (n == 0) break;
      std::string_view data(buf.data(), static_cast<std::size_t>(n));
      while (!data.empty()) {
        const std::size_t newline = data.find('\n');
        const std::string_view part = data.substr(0, newline);
        // Checked as the line grows: a line of any length costs at most the limit in memory.
        if (line_.size() + part.size() > ch_->options().max_message_size) {
          return fail(fmt::format("line {} is longer than the maximum message size ({} bytes)",
                                  line_number_, ch_->options().max_message_size));
        }
        if (newline == std::string_view::npos) {
          line_.append(part);
          break;
        }
        // A line whole in the buffer goes without a copy.
        const bool whole = line_.empty();
        if (!whole) line_.append(part);
        if (!send(whole ? part : std::string_view(line_))) return;
        line_.clear();
        data.remove_prefix(newline + 1);
      }
    }
    // The last line may lack its newline.
    if (!line_.empty() && !send(line_)) return;
    report_->finished.store(true);  // the peer sees the end of input only after this
    if (auto r = ch_->shutdown_send(); !r && !peer_gone(r.error())) {
      return fail("ending the input: " + r.error().message());
    }
  }

 private:
  // A peer that closed its end (a child that exited) stops the feeding; how the relay ends says
  // how it went.
  static bool peer_gone(const std::error_code& ec) {
    return ec == errc::peer_closed || ec == errc::closed || ec == std::errc::not_connected;
  }

  // Sends one line; false if the feeding is over (the child is gone, or a failure was reported).
  bool send(std::string_view line) {
    auto r = ch_->send(as_bytes(line));
    ++line_number_;
    if (r) return true;
    if (peer_gone(r.error())) return false;
    const auto number = line_number_ - 1;
    if (r.error() == errc::message_too_large) {
      // Under max_message_size (checked before), so the kernel's packet limit, which follows the
      // socket's send buffer.
      int sndbuf = 0;
      socklen_t len = sizeof sndbuf;
      static_cast<void>(::getsockopt(ch_->native_handle(), SOL_SOCKET, SO_SNDBUF, &sndbuf, &len));
      fail(
          fmt::format("line {} ({} bytes) is longer than a seqpacket message can be (the "
                      "socket's send buffer is {} bytes)",
                      number, line.size(), sndbuf));
    } else {
      fail(fmt::format("sending line {}: {}", number, r.error().message()));
    }
    return false;
  }

  void fail(std::string what) {
    {
      const std::lock_guard lock(report_->mutex);
      report_->failure = std::move(what);
    }
    report_->finished.store(true);  // the main loop ends only after the byte below
    const unsigned char byte = 0;
    static_cast<void>(::write(wake_write_fd, &byte, 1));
  }

  std::shared_ptr<channel> ch_;  // shared: the channel lives as long as the feeder needs it
  std::shared_ptr<feeder_report> report_;
  std::string line_;  // the part of a line read so far, when it spans reads
  std::uint64_t line_number_ = 1;
};

// Output waiting for stdout, written with write(2) so that every error is seen when it happens.
class output {
 public:
  output() {
    // After poll says writable, a pipe, socket or terminal takes PIPE_BUF bytes without
    // blocking; a regular file or device never blocks for long.
    struct stat st {};
    if (::fstat(STDOUT_FILENO, &st) == 0 && (S_ISREG(st.st_mode) || S_ISCHR(st.st_mode)) &&
        ::isatty(STDOUT_FILENO) == 0) {
      chunk_ = std::size_t{1} << 20;
    }
  }

  void add(std::span<const std::byte> bytes) {
    buf_.append(reinterpret_cast<const char*>(bytes.data()), bytes.size());
    buf_.push_back('\n');
  }

  [[nodiscard]] bool empty() const noexcept { return done_ == buf_.size(); }
  [[nodiscard]] std::size_t size() const noexcept { return buf_.size() - done_; }

  // One write(2) of what waits; 0, or the errno of a failed write (EINTR is not a failure).
  int write_some() {
    const ssize_t n = ::write(STDOUT_FILENO, buf_.data() + done_, std::min(size(), chunk_));
    if (n < 0) return errno == EINTR || errno == EAGAIN ? 0 : errno;
    done_ += static_cast<std::size_t>(n);
    if (done_ == buf_.size()) {
      buf_.clear();
      done_ = 0;
    }
    return 0;
  }

 private:
  std::string buf_;
  std::size_t done_ = 0;
  std::size_t chunk_ = PIPE_BUF;
};

// The main thread's loop: prints the peer's messages, watches the wake pipe and the child (if
// any), and ends the relay in each of the ways listed in relay.hpp. Without a child, the relay
// starts as if a child had exited with status 0: the channel alone decides the end.
class relay {
 public:
  relay(std::shared_ptr<channel> ch, child* c, std::shared_ptr<feeder_report> report,
        std::string verb, std::string name)
      : ch_(std::move(ch)),
        child_(c),
        report_(std::move(report)),
        verb_(std::move(verb) + ": "),
        name_(std::move(name)) {
    if (child_ == nullptr) status_ = exit_status::exited(0);
  }

  int run() {
    channel& ch = *ch_;
    for (;;) {
      while (!channel_done_ && channel_maybe_ && out_.size() < output_high_water) {
        auto m = ch.try_receive();
        if (m) {
          out_.add(m->bytes());
          continue;
        }
        if (m.error() == errc::would_block) {
          channel_maybe_ = false;
        } else if (m.error() == errc::peer_closed) {
          channel_done_ = true;
        } else {
          return fail(verb_ + what_went_wrong(name_, ch, m.error()));
        }
      }
      if (status_ && dying_of_ != 0) return end_by_signal();
      if (status_ && channel_done_ && out_.empty()) return status_->shell_code();

      std::array<pollfd, 4> fds{};
      nfds_t n = 0;
      fds[n++] = {wake_read_fd, POLLIN, 0};
      const nfds_t channel_at = !channel_done_ && !channel_maybe_ ? n++ : 0;
      if (channel_at != 0) fds[channel_at] = {ch.native_handle(), POLLIN, 0};
      const nfds_t child_at = !status_ ? n++ : 0;
      if (child_at != 0) fds[child_at] = {child_->pidfd(), POLLIN, 0};
      const nfds_t stdout_at = !out_.empty() ? n++ : 0;
      if (stdout_at != 0) fds[stdout_at] = {STDOUT_FILENO, POLLOUT, 0};
      if (::poll(fds.data(), n, timeout_ms()) < 0 && errno != EINTR) {
        return fail(verb_ + "poll: " + errno_text(errno));
      }

      if (int r = take_wake(); r != 0) return r;
      if (kill_at_ && clock::now() >= *kill_at_) {
        if (child_ != nullptr) static_cast<void>(child_->kill(SIGKILL));
        kill_at_.reset();
      }
      if (child_at != 0 && fds[child_at].revents != 0) {
        auto s = child_->try_wait();
        if (!s) return fail(verb_ + "wait: " + s.error().message());
        if (*s) status_ = **s;
      }
      if (channel_at != 0 && fds[channel_at].revents != 0) channel_maybe_ = true;
      if (stdout_at != 0 && fds[stdout_at].revents != 0) {
        if (const int err = out_.write_some(); err != 0) return write_failed(err);
      }
    }
  }

 private:
  int timeout_ms() const {
    if (!kill_at_) return -1;
    const auto left = std::chrono::ceil<std::chrono::milliseconds>(*kill_at_ - clock::now());
    return static_cast<int>(std::max<std::chrono::milliseconds::rep>(left.count(), 0));
  }

  // Reads the wake pipe: the feeder's failure ends the run; signals start or add to its end.
  // Returns an exit status to return with, or 0 to go on.
  int take_wake() {
    std::array<unsigned char, 64> bytes{};
    for (;;) {
      const ssize_t n = ::read(wake_read_fd, bytes.data(), bytes.size());
      if (n <= 0) return 0;
      for (ssize_t i = 0; i < n; ++i) {
        if (bytes[i] == 0) {
          std::string why;
          {
            const std::lock_guard lock(report_->mutex);
            why = report_->failure;
          }
          return fail(verb_ + why);
        }
        on_signal(bytes[i] & 0x7F, (bytes[i] & 0x80) != 0);
      }
    }
  }

  // Passes the signal on (a signal from the terminal reached the child, in duplex's process
  // group, already) and starts the grace period at the first one.
  void on_signal(int sig, bool from_terminal) {
    if (dying_of_ == 0) {
      dying_of_ = sig;
      kill_at_ = clock::now() + grace_period;
      give_up_output_at_ = *kill_at_;
    }
    if (!from_terminal && !status_) static_cast<void>(child_->kill(sig));
  }

  // The child is reaped after a signal: what it sent in the meantime is printed (for as long as
  // the grace period lasts, and unless another signal comes), then duplex dies of the signal.
  int end_by_signal() {
    drain_and_flush(give_up_output_at_);
    return die_of(dying_of_);
  }

  // Kills and reaps the child, prints what was received before, reports the failure: exit 1.
  int fail(const std::string& what) {
    end_child();
    drain_and_flush(std::nullopt);
    const int status = report_failure(what);
    if (dying_of_ != 0) return die_of(dying_of_);
    return status;
  }

  int write_failed(int err) {
    end_child();
    if (err == EPIPE && !sigpipe_ignored_at_start) return die_of(SIGPIPE);
    const int status = report_failure(verb_ + "write error: " + errno_text(err));
    if (dying_of_ != 0) return die_of(dying_of_);
    return status;
  }

  void end_child() {
    if (status_) return;
    static_cast<void>(child_->kill(SIGKILL));
    if (auto s = child_->wait(); s) status_ = *s;
  }

  // Prints the messages already received and what waits, until done, a write error, a signal,
  // or the deadline.
  void drain_and_flush(std::optional<clock::time_point> deadline) {
    channel& ch = *ch_;
    while (!channel_done_) {
      auto m = ch.try_receive();
      if (!m) break;
      out_.add(m->bytes());
    }
    while (!out_.empty()) {
      int timeout = -1;
      if (deadline) {
        const auto left = std::chrono::ceil<std::chrono::milliseconds>(*deadline - clock::now());
        if (left.count() <= 0) return;
        timeout = static_cast<int>(left.count());
      }
      std::array<pollfd, 2> fds{{{STDOUT_FILENO, POLLOUT, 0}, {wake_read_fd, POLLIN, 0}}};
      if (::poll(fds.data(), fds.size(), timeout) < 0 && errno != EINTR) return;
      if (fds[1].revents != 0) {
        // A signal (or the feeder's failure) while the last output waits: stop here.
        std::array<unsigned char, 64> bytes{};
        const ssize_t n = ::read(wake_read_fd, bytes.data(), bytes.size());
        for (ssize_t i = 0; i < n; ++i) {
          if (bytes[i] != 0 && dying_of_ == 0) dying_of_ = bytes[i] & 0x7F;
        }
        if (dying_of_ != 0) return;
      }
      if (fds[0].revents != 0 && out_.write_some() != 0) return;
    }
  }

  std::shared_ptr<channel> ch_;
  child* child_;  // null: no child, the channel alone
  std::shared_ptr<feeder_report> report_;
  std::string verb_;  // "run: ", "connect: "
  std::string name_;
  output out_;
  bool channel_done_ = false;          // peer_closed was received
  bool channel_maybe_ = true;          // try_receive may have a message without the socket readable
  std::optional<exit_status> status_;  // once the child is reaped (at once without a child)
  int dying_of_ = 0;                   // the first signal received
  std::optional<clock::time_point> kill_at_;  // SIGKILL for a child that outlives the grace
  clock::time_point give_up_output_at_{};
};

}  // namespace

int relay_messages(std::shared_ptr<channel> ch, child* c, std::string verb, std::string name) {
  auto report = std::make_shared<feeder_report>();
  // The feeder starts with the relayed signals blocked, so they all reach the main thread.
  sigset_t blocked;
  sigset_t old;
  sigemptyset(&blocked);
  for (const int sig : relayed_signals)
    sigaddset(&blocked, sig);
  ::pthread_sigmask(SIG_BLOCK, &blocked, &old);
  std::thread feeding(feeder(ch, report));
  ::pthread_sigmask(SIG_SETMASK, &old, nullptr);
  const int status = relay(std::move(ch), c, report, std::move(verb), std::move(name)).run();
  if (!report->finished.load()) {
    feeding.detach();  // blocked reading stdin: the process exits without waiting for it
    return status;
  }
  // Nothing writes to the wake pipe once the feeder has returned and the signals are blocked
  // (a signal now finds the child reaped and the status decided), so it can be closed.
  feeding.join();
  ::pthread_sigmask(SIG_BLOCK, &blocked, nullptr);
  ::close(wake_read_fd);
  ::close(wake_write_fd);
  wake_read_fd = wake_write_fd = -1;
  return status;
}

}  // namespace duplex::cli
