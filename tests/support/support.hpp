// Test support shared by duplex's test binaries: fd accounting, error matchers, a signal storm
// aimed at one thread, and running a function in a forked child.
#pragma once

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/resource.h>
#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <functional>
#include <span>
#include <string>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

#include "duplex/channel.hpp"
#include "duplex/error.hpp"
#include "duplex/fd.hpp"
#include "duplex/socket.hpp"
#include "duplex/socket_pair.hpp"

namespace duplex::test {

// The open fds of this process, from /proc/self/fd (without the fd used to read it).
std::vector<int> open_fds();

// The number of open fds of this process: open_fds().size().
std::size_t open_fd_count();

// True if fd is open in this process (fcntl(F_GETFD) succeeds).
bool fd_is_open(int fd);

// True if fd has FD_CLOEXEC set.
bool fd_is_cloexec(int fd);

// An open fd and the file it refers to (device and inode, from fstat).
struct open_file {
  int fd;
  dev_t dev;
  ino_t ino;
  friend bool operator==(const open_file&, const open_file&) = default;
};

// The open fds of this process with their files, in fd order.
std::vector<open_file> open_files();

// What differs between two open_files() snapshots, one line per fd ("fd 7 was left open (inode
// 1234)", "fd 5 was closed", "fd 5 now refers to another file"); empty if nothing.
std::string fd_changes(const std::vector<open_file>& before, const std::vector<open_file>& after);

// Base fixture: every test derived from it fails if it leaves an fd open, closes one it did not
// open, or leaves an fd number referring to another file than before (fds are compared by number
// and identity, so a leak offset by closing some other fd is caught too).
class fd_checked : public ::testing::Test {
 protected:
  void SetUp() override { before_ = open_files(); }
  void TearDown() override {
    EXPECT_EQ(fd_changes(before_, open_files()), "")
        << "the test leaked, closed or replaced file descriptors";
  }

 private:
  std::vector<open_file> before_;
};

// Waits, looking every 20 us, until done() holds; false if it still does not after 10 s (the
// test then fails instead of hanging). Only ever waits for an event, never for time to pass.
template <typename F>
bool eventually(F done) {
  using namespace std::chrono_literals;
  const auto give_up = std::chrono::steady_clock::now() + 10s;
  while (!done()) {
    if (std::chrono::steady_clock::now() > give_up) return false;
    std::this_thread::sleep_for(20us);
  }
  return true;
}

// Base fixture of tests run once per socket kind (GetParam()), with fd accounting.
class kind_test : public fd_checked, public ::testing::WithParamInterface<socket_kind> {};

// Sets SIGPIPE to its default action (terminate) for its lifetime, so a test proves that no
// write raises it; restores the previous action.
class default_sigpipe {
 public:
  default_sigpipe();
  ~default_sigpipe();
  default_sigpipe(const default_sigpipe&) = delete;
  default_sigpipe& operator=(const default_sigpipe&) = delete;

 private:
  struct sigaction previous_ {};
};

// A storm of signals (default SIGALRM at 10 kHz) delivered to the thread that creates it, with a
// handler installed without SA_RESTART, so every blocking syscall of that thread is interrupted
// with EINTR. Restores the previous handler on destruction.
class signal_storm {
 public:
  explicit signal_storm(int signal = SIGALRM, long interval_ns = 100'000);
  ~signal_storm();
  signal_storm(const signal_storm&) = delete;
  signal_storm& operator=(const signal_storm&) = delete;

  // Signals delivered so far.
  [[nodiscard]] long delivered() const noexcept;

 private:
  int signal_;
  void* timer_ = nullptr;
  struct sigaction previous_ {};
};

// The value of a result a test cannot go on without; throws std::system_error (failing the test
// with the error's message) if there is none.
template <typename T>
T must(result<T> r) {
  if (!r) throw std::system_error(r.error());
  return std::move(*r);
}

// A channel on one end of a new pair and the raw socket of the other, for writing hostile bytes.
struct raw_peer {
  channel ch;
  socket raw;
};
raw_peer make_raw(socket_kind kind, channel_options options = {});

// Shrinks both sockets' buffers to the smallest the kernel allows (about 4.5 KiB), so that sends
// block or come out short at once and stream frames go out in pieces.
void make_buffers_tiny(connected_pair& pair);

// A Python frame (multiprocessing.connection), written by hand: a 4-byte big-endian length, or
// (long_form) -1 and an 8-byte big-endian length, the form CPython writes above 2 GiB - 1 and
// that a receiver accepts for any length; then body.
std::vector<std::byte> python_frame(const std::vector<std::byte>& body, bool long_form = false);

// Deterministic bytes that depend on both n and seed (a 64-bit xorshift, 8 bytes a step).
std::vector<std::byte> pattern(std::size_t n, unsigned seed = 1);

// Byte-exact comparison (memcmp: fast even in a debug build).
bool same(std::span<const std::byte> a, std::span<const std::byte> b);

// A new pipe, close-on-exec: {read end, write end}.
std::pair<unique_fd, unique_fd> make_pipe();

// The inode of what fd refers to (0 if fstat fails): tells whether two fds are the same file.
ino_t inode_of(int fd);

// Waits for a child (EINTR retried) and returns its raw wait status, or -1.
int reap(pid_t pid);

// The pids of this process's children (running or zombie), from /proc.
std::vector<pid_t> child_processes();

// Base fixture of process tests: fd accounting, and no child process of this one (running or
// zombie) may outlive a test.
class process_checked : public fd_checked {
 protected:
  void TearDown() override {
    fd_checked::TearDown();
    EXPECT_THAT(child_processes(), ::testing::IsEmpty()) << "a child was left unreaped";
  }
};

// Runs fn in a forked child and returns its exit status (or 128 + signal if it was killed).
// fn's return value is the child's exit code. The child leaves with _exit, skipping gtest's
// cleanup. Use only async-signal-safe-enough code in fn when other threads exist.
int run_in_child(const std::function<int()>& fn);

// For a forked child (run_in_child): the kernel's limit on fds in flight (unix(7): a user may
// have at most RLIMIT_NOFILE fds sent and not yet received; ETOOMANYREFS past it) does not apply
// to a process with CAP_SYS_RESOURCE or CAP_SYS_ADMIN, so as root sends never meet it. The child
// becomes an unprivileged user of its own (a uid no account uses, made from its pid, since the
// count is per user and tests may run in parallel). False if it cannot.
bool become_unprivileged();

// Sets this process's soft RLIMIT_NOFILE (the hard one stays, so it can be raised again).
bool set_nofile(rlim_t soft);

// Reads fd until end of file (or an error) and returns what was read.
std::string read_to_end(int fd);

// Matches a result<T> (or an error_code) that holds exactly the given error.
MATCHER_P(HasError, code, "fails with " + ::testing::PrintToString(std::error_code(code))) {
  if constexpr (std::is_same_v<std::decay_t<arg_type>, std::error_code>) {
    *result_listener << "error " << arg << " (" << arg.message() << ")";
    return arg == code;
  } else {
    if (arg.has_value()) {
      *result_listener << "which succeeded";
      return false;
    }
    *result_listener << "which failed with " << arg.error() << " (" << arg.error().message() << ")";
    return arg.error() == code;
  }
}

// Matches a result<T> that holds a value.
MATCHER(Succeeded, "succeeds") {
  if (arg.has_value()) return true;
  *result_listener << "which failed with " << arg.error() << " (" << arg.error().message() << ")";
  return false;
}

// Names a test parameterised by socket kind after the kind ("stream", ...).
inline std::string kind_name(const ::testing::TestParamInfo<socket_kind>& info) {
  return std::string(to_string(info.param));
}

// A std::error_code of the system category for errno value e.
inline std::error_code sys(int e) { return {e, std::system_category()}; }

}  // namespace duplex::test

// Prints a result in test output as its error or "a value", rather than as raw bytes (which
// would also read padding that was never written).
namespace std {
template <typename T>
void PrintTo(const expected<T, error_code>& r, ostream* os) {
  if (r) {
    *os << "a value";
  } else {
    *os << "error " << r.error() << " (" << r.error().message() << ")";
  }
}
}  // namespace std

namespace duplex {
// Prints a socket_kind by name in test output.
inline void PrintTo(socket_kind kind, std::ostream* os) { *os << to_string(kind); }
}  // namespace duplex
