// duplex run: start a command holding a channel end; lines of stdin become messages to it, and
// messages from it become lines on stdout. Exits with the command's status.
//
// How a run ends, in every case (the README's CLI section says the same to users):
// - CMD's end closes and CMD exits: every message has been printed; duplex exits with CMD's
//   status (128 + N if signal N killed it). If CMD exits (or closes its end) before reading all
//   of stdin, the rest of stdin is left unread: that is CMD's choice, not a failure.
// - A failure of duplex's own (CMD breaks the protocol, a stdin line cannot be sent, stdin
//   cannot be read, stdout cannot be written): CMD is killed (SIGKILL) and reaped, what was
//   received before is printed, and duplex exits 1 with one line on stderr.
// - EPIPE on stdout (the reader left, as in `duplex run ... | head -1`): CMD is killed and
//   reaped, and duplex dies of SIGPIPE without a word, as coreutils do; if SIGPIPE was ignored
//   when duplex started, it is a write error as above.
// - SIGTERM, SIGINT, SIGHUP or SIGQUIT: passed on to CMD (unless the terminal sent it, which
//   reached CMD too), SIGKILL after a grace period; once CMD is reaped, duplex dies of the same
//   signal. A signal ignored when duplex started stays ignored (nohup). If duplex is killed by
//   SIGKILL, the kernel kills CMD (PR_SET_PDEATHSIG).
#include <fcntl.h>
#include <fmt/core.h>
#include <poll.h>
#include <pthread.h>
#include <sys/resource.h>
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

#include "commands.hpp"
#include "duplex/duplex.hpp"
#include "report.hpp"

namespace duplex::cli {
namespace {

using clock = std::chrono::steady_clock;

// The signals passed on to the child. SIGPIPE is handled apart (see catch_signals).
constexpr std::array forwarded_signals{SIGTERM, SIGINT, SIGHUP, SIGQUIT};

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

// Installs the handlers, after making the wake pipe. A signal ignored at the start stays ignored
// (and so it is in the child). The handlers go without SA_RESTART, so a write to a stalled
// stdout in the main thread returns at a signal; the feeder thread blocks these signals. SIGPIPE
// gets an empty handler rather than SIG_IGN: writes to a closed stdout return EPIPE, and the
// child (whose handlers are reset at spawn) still starts with SIGPIPE at its default.
std::error_code catch_signals() {
  if (wake_read_fd < 0) {
    std::array<int, 2> p{};
    if (::pipe2(p.data(), O_CLOEXEC | O_NONBLOCK) != 0) return {errno, std::system_category()};
    wake_read_fd = p[0];
    wake_write_fd = p[1];
  }
  struct sigaction old {};
  for (const int sig : forwarded_signals) {
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

// Dies of sig (its default action), as the shell expects of a program a signal ended; returns
// 128 + sig only if that somehow fails.
int die_of(int sig) {
  std::signal(sig, SIG_DFL);
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, sig);
  ::pthread_sigmask(SIG_UNBLOCK, &set, nullptr);
  ::raise(sig);
  return 128 + sig;
}

std::string errno_text(int err) { return std::error_code(err, std::system_category()).message(); }

// Why a run ends early, in words, for the one-line error.
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
  feeder(std::shared_ptr<child> c, std::shared_ptr<feeder_report> report)
      : child_(std::move(c)), report_(std::move(report)), ch_(child_->channel()) {}

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
        if (line_.size() + part.size() > ch_.options().max_message_size) {
          return fail(fmt::format("line {} is longer than the maximum message size ({} bytes)",
                                  line_number_, ch_.options().max_message_size));
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
    report_->finished.store(true);  // the child sees the end of input only after this
    if (auto r = ch_.shutdown_send(); !r && !child_gone(r.error())) {
      return fail("ending the input: " + r.error().message());
    }
  }

 private:
  // A child that closed its end or exited stops the feeding; its status says how the run went.
  static bool child_gone(const std::error_code& ec) {
    return ec == errc::peer_closed || ec == errc::closed || ec == std::errc::not_connected;
  }

  // Sends one line; false if the feeding is over (the child is gone, or a failure was reported).
  bool send(std::string_view line) {
    auto r = ch_.send(as_bytes(line));
    ++line_number_;
    if (r) return true;
    if (child_gone(r.error())) return false;
    const auto number = line_number_ - 1;
    if (r.error() == errc::message_too_large) {
      // Under max_message_size (checked before), so the kernel's packet limit, which follows the
      // socket's send buffer.
      int sndbuf = 0;
      socklen_t len = sizeof sndbuf;
      static_cast<void>(::getsockopt(ch_.native_handle(), SOL_SOCKET, SO_SNDBUF, &sndbuf, &len));
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

  std::shared_ptr<child> child_;  // shared: the channel lives as long as the feeder needs it
  std::shared_ptr<feeder_report> report_;
  channel& ch_;
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

// The main thread's loop: prints the child's messages, watches the wake pipe and the child, and
// ends the run in each of the ways listed at the top of this file.
class relay {
 public:
  relay(std::shared_ptr<child> c, std::shared_ptr<feeder_report> report, std::string name)
      : child_(std::move(c)), report_(std::move(report)), name_(std::move(name)) {}

  int run() {
    channel& ch = child_->channel();
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
          return fail("run: " + what_went_wrong(name_, ch, m.error()));
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
        return fail("run: poll: " + errno_text(errno));
      }

      if (int r = take_wake(); r != 0) return r;
      if (kill_at_ && clock::now() >= *kill_at_) {
        static_cast<void>(child_->kill(SIGKILL));
        kill_at_.reset();
      }
      if (child_at != 0 && fds[child_at].revents != 0) {
        auto s = child_->try_wait();
        if (!s) return fail("run: wait: " + s.error().message());
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
          return fail("run: " + why);
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
    const int status = report_failure("run: write error: " + errno_text(err));
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
    channel& ch = child_->channel();
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

  std::shared_ptr<child> child_;
  std::shared_ptr<feeder_report> report_;
  std::string name_;
  output out_;
  bool channel_done_ = false;          // peer_closed was received
  bool channel_maybe_ = true;          // try_receive may have a message without the socket readable
  std::optional<exit_status> status_;  // once the child is reaped
  int dying_of_ = 0;                   // the first signal received
  std::optional<clock::time_point> kill_at_;  // SIGKILL for a child that outlives the grace
  clock::time_point give_up_output_at_{};
};

}  // namespace

int run_command(const run_options& o) {
  // The child's end is moved to o.fd, which the kernel refuses at or above the soft limit.
  rlimit files{};
  if (::getrlimit(RLIMIT_NOFILE, &files) == 0 && files.rlim_cur != RLIM_INFINITY &&
      static_cast<rlim_t>(o.fd) >= files.rlim_cur) {
    fmt::print(stderr,
               "duplex: run: --fd {} is not below the limit on open files (RLIMIT_NOFILE: {})\n",
               o.fd, files.rlim_cur);
    return 2;
  }
  // Before the child exists, so that no signal finds duplex at its default and the child orphaned.
  if (auto ec = catch_signals(); ec) return report_failure("run: signal handlers", ec);

  spawn_options options;
  options.kind = o.kind;
  options.child_fd = o.fd;
  options.channel.format = o.format;
  options.kill_on_parent_death = true;  // spawned from the main thread, which lives to the end
  auto started = spawn(o.command, options);
  if (!started) {
    return report_failure(fmt::format("run: cannot start '{}'", o.command[0]), started.error());
  }
  auto child = std::make_shared<duplex::child>(std::move(*started));
  auto report = std::make_shared<feeder_report>();

  // The feeder starts with the forwarded signals blocked, so they all reach the main thread.
  sigset_t blocked;
  sigset_t old;
  sigemptyset(&blocked);
  for (const int sig : forwarded_signals)
    sigaddset(&blocked, sig);
  ::pthread_sigmask(SIG_BLOCK, &blocked, &old);
  std::thread feeding(feeder(child, report));
  ::pthread_sigmask(SIG_SETMASK, &old, nullptr);
  const int status = relay(child, report, o.command[0]).run();
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
