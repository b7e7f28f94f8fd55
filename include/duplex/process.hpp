// duplex/process.hpp - child processes that hold one end of a channel, and their whole life.
//
//   auto worker = duplex::spawn({"/usr/lib/app/worker", "--quiet"});
//   if (!worker) die(worker.error());             // e.g. ENOENT: reported, never a silent 127
//   worker->channel().send(duplex::as_bytes("job 1"));
//   auto reply = worker->channel().receive();     // errc::peer_closed if the worker died
//   auto status = worker->wait();                 // exit code or signal, reaped exactly once
//
// In the child:
//
//   auto parent = duplex::inherited_channel();    // finds its end through DUPLEX_FD
//   if (!parent) die(duplex::describe_inherited_error(parent.error()));  // names DUPLEX_FD's value
//
// How a child is started. spawn() does not fork the parent's memory: it uses
// clone3(CLONE_VM | CLONE_VFORK | CLONE_PIDFD | CLONE_CLEAR_SIGHAND) (clone() where clone3 is
// unavailable), like posix_spawn, so its cost does not grow with the parent's size, and the
// parent learns of a failed exec (with its errno) before spawn() returns. In the child, before
// exec: signal handlers are reset to their defaults, the signal mask
// is the parent's, stdin/stdout/stderr are as asked, the child's end of a new pair is at fd 3 (or
// spawn_options::child_fd) with DUPLEX_FD naming it, and every other fd is closed (close_range),
// whatever other threads of the parent are doing.
//
// Reaping. A child is reaped once, through its pidfd (waitid(P_PIDFD)), by wait(), try_wait() or
// the destructor. Two things in the rest of the program would defeat that, and must be avoided:
// setting SIGCHLD to SIG_IGN (the kernel then reaps children itself and wait() reports ECHILD),
// and calling waitpid(-1, ...) or wait() from elsewhere (it could reap a duplex child). The pid
// stays reserved until the child is reaped, so kill() and wait() can never reach another process
// that was given the same pid; kill() goes through the pidfd besides.
//
// Who is at the other end. SO_PEERCRED on a socketpair names the process that *created* the pair,
// not a child that inherited one end: channel::peer_credentials() in the parent returns the
// parent's own pid, and in the child too. To identify a child, use child::pid() or child::pidfd()
// (from its creation). A channel does not carry SCM_CREDENTIALS (it discards them).
#pragma once

#include <signal.h>
#include <sys/types.h>

#include <chrono>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "duplex/channel.hpp"
#include "duplex/error.hpp"
#include "duplex/fd.hpp"

namespace duplex {

// The environment variable through which a child learns the number of its end.
inline constexpr std::string_view inherited_fd_variable = "DUPLEX_FD";

// Where a child's stdin, stdout or stderr goes.
enum class stdio_mode {
  inherit,  // the parent's
  null,     // /dev/null
};

// How spawn() starts a child.
struct spawn_options {
  // The child's environment starts as a copy of the parent's, or empty if clear_environment.
  bool clear_environment = false;
  // Entries "NAME=value" added to the child's environment, replacing any of the same name.
  std::vector<std::string> environment{};
  // The child's working directory; empty for the parent's.
  std::string working_directory{};
  stdio_mode stdin_mode = stdio_mode::inherit;
  stdio_mode stdout_mode = stdio_mode::inherit;
  stdio_mode stderr_mode = stdio_mode::inherit;
  // The fd number of the child's end; DUPLEX_FD says it. At least 3 (EINVAL), and below the soft
  // RLIMIT_NOFILE, which the child inherits (EBADF: no fd of that number can exist there). Any
  // number in that range works, however low the limit: placing the end uses no fd above it.
  int child_fd = 3;
  // The kind of the pair (stream or seqpacket), and the options of the parent's channel.
  socket_kind kind = socket_kind::stream;
  channel_options channel{};
  // Kill the child (SIGKILL) when the parent dies (PR_SET_PDEATHSIG). Linux ties this to the
  // *thread* that called spawn(): if that thread exits first, the child is killed then. Spawn
  // from a thread that lives as long as the process (e.g. the main thread).
  bool kill_on_parent_death = false;
};

// How a child ended.
class exit_status {
 public:
  // A normal exit with the given code.
  [[nodiscard]] static exit_status exited(int code) noexcept { return {code, 0, false}; }
  // Death by a signal.
  [[nodiscard]] static exit_status killed(int signal, bool core_dumped = false) noexcept {
    return {0, signal, core_dumped};
  }

  // True if the child called exit() (or returned from main).
  [[nodiscard]] bool normal() const noexcept { return signal_ == 0; }
  // The exit code (0..255) if normal(), else 0.
  [[nodiscard]] int code() const noexcept { return code_; }
  // The signal that killed the child, or 0 if it exited normally.
  [[nodiscard]] int signal() const noexcept { return signal_; }
  // True if the kernel wrote a core dump on its death.
  [[nodiscard]] bool core_dumped() const noexcept { return core_; }
  // True for a normal exit with code 0.
  [[nodiscard]] bool success() const noexcept { return normal() && code_ == 0; }
  // The shell's convention: the exit code, or 128 + the signal.
  [[nodiscard]] int shell_code() const noexcept { return normal() ? code_ : 128 + signal_; }
  // "exited with code 3", "killed by signal 9 (SIGKILL)".
  [[nodiscard]] std::string describe() const;

  friend bool operator==(const exit_status&, const exit_status&) = default;

 private:
  exit_status(int code, int signal, bool core) noexcept
      : code_(code), signal_(signal), core_(core) {}
  int code_ = 0;
  int signal_ = 0;
  bool core_ = false;
};

// A child process holding the other end of a channel. Move-only. Not thread-safe, except that
// its channel() may be used from several threads as any channel may.
//
// The destructor never leaves a zombie: if the child has not been reaped, it closes the channel,
// kills the child (SIGKILL, through the pidfd) and reaps it. To let a child finish its work, call
// wait() (after closing or half-closing the channel, if that is how the child knows to stop).
class child {
 public:
  // No child.
  child() noexcept = default;
  child(child&& other) noexcept;
  child& operator=(child&& other) noexcept;
  ~child();

  // The child's pid (reserved for it until it is reaped), or -1.
  [[nodiscard]] pid_t pid() const noexcept { return pid_; }

  // A pidfd of the child (close-on-exec, owned here): readable once the child has exited, for
  // poll/epoll or any event loop.
  [[nodiscard]] int pidfd() const noexcept { return pidfd_.get(); }

  // The parent's end of the channel. The child's death shows here as errc::peer_closed (unless
  // the child passed its end on to a process that is still alive).
  [[nodiscard]] duplex::channel& channel() noexcept { return channel_; }

  // Waits for the child to exit and reaps it. After the first success, returns the same status
  // again without waiting. Errors: ECHILD (SIGCHLD is SIG_IGN, or someone else reaped it).
  [[nodiscard]] result<exit_status> wait();

  // wait, giving up after timeout: errc::timed_out (the child is still running, not reaped).
  [[nodiscard]] result<exit_status> wait(std::chrono::nanoseconds timeout);

  // The status if the child has exited (reaping it), or nullopt if it is still running.
  [[nodiscard]] result<std::optional<exit_status>> try_wait();

  // Sends a signal through the pidfd (through the pid where the kernel lacks pidfd_send_signal:
  // equally safe, since the pid stays reserved until this object reaps it). A child that has
  // exited but is not yet reaped accepts the signal and ignores it. Errors: ESRCH (the child has
  // been reaped), EINVAL (a bad signal).
  [[nodiscard]] result<void> kill(int signal = SIGTERM);

  // The status once the child has been reaped.
  [[nodiscard]] std::optional<exit_status> status() const noexcept { return status_; }

 private:
  friend result<child> spawn(std::span<const std::string>, const spawn_options&);
  friend result<child> spawn(std::span<const std::string>, unique_fd, const spawn_options&);
  friend result<child> fork_with_channel(const std::function<int(duplex::channel&)>&,
                                         const struct fork_options&);
  void reap_on_destruction() noexcept;

  pid_t pid_ = -1;
  unique_fd pidfd_;
  duplex::channel channel_;
  std::optional<exit_status> status_;
};

// Starts argv[0] (searched in PATH, from the child's environment, if it has no '/') with argv,
// holding one end of a new pair; returns the child with the other end as its channel.
// Errors: EINVAL (empty argv, child_fd below 3, an environment entry without '='), EBADF
// (child_fd at or above the soft RLIMIT_NOFILE), ENOENT / EACCES (no executable found in PATH),
// any errno of the exec itself (ENOEXEC, EACCES, ...) or of the steps before it (ENOENT for a
// working directory that does not exist), errors of socket_pair and channel::create, and
// EAGAIN/ENOMEM from clone. On error no child is left running and nothing leaks.
[[nodiscard]] result<child> spawn(std::span<const std::string> argv,
                                  const spawn_options& options = {});

// spawn, handing the child an end the caller already has instead of a new pair's: `end` (a
// connected socket, such as an accepted connection's, or any fd) is placed at child_fd with
// DUPLEX_FD naming it, exactly as a pair's end would be, and closed in this process once the
// child holds it (also on error). options.kind and options.channel are not used, and the
// returned child's channel() is empty: the conversation is the child's and its peer's. Errors:
// EBADF (end is empty), and those of spawn but socket_pair's and channel::create's.
[[nodiscard]] result<child> spawn(std::span<const std::string> argv, unique_fd end,
                                  const spawn_options& options = {});

// spawn with argv given as a list: spawn({"worker", "--flag"}).
[[nodiscard]] inline result<child> spawn(std::initializer_list<std::string> argv,
                                         const spawn_options& options = {}) {
  return spawn(std::span<const std::string>(argv.begin(), argv.size()), options);
}

// How fork_with_channel() starts a child.
struct fork_options {
  socket_kind kind = socket_kind::stream;
  channel_options channel{};          // for both ends
  bool kill_on_parent_death = false;  // as in spawn_options (thread-bound)
};

// The tutorial's pattern as one call: forks, runs fn(channel&) in the child with its end of a new
// pair, and exits the child with fn's return value (70 if fn throws). Returns the child with the
// parent's end. Only the calling thread exists in the child: in a multi-threaded program, fn
// must not take any lock another thread might have held at the fork (other than malloc's, which
// glibc resets), and should only do simple work or exec. The child leaves with _exit after
// flushing stdio, so no atexit handler or static destructor runs twice. Unlike spawn, fork
// copies the parent's memory (cheaply, copy-on-write, but page tables grow with its size).
[[nodiscard]] result<child> fork_with_channel(const std::function<int(duplex::channel&)>& fn,
                                              const fork_options& options = {});

// How inherited_channel() checks the end it finds.
struct inherited_options {
  // The kind the end must be; nullopt accepts stream or seqpacket.
  std::optional<socket_kind> kind{};
  channel_options channel{};
};

// In a child started by spawn (or any parent keeping the DUPLEX_FD contract): takes the end named
// by DUPLEX_FD, checks that it is an AF_UNIX stream or seqpacket socket, or a connected TCP
// stream (an endpoint's connection handed to a worker, which makes a tcp channel:
// docs/endpoints.md), of the expected kind, marks it close-on-exec so that programs this child
// starts do not inherit it, and returns it as a channel. The environment is left as it is. Call
// it once: the channel owns the fd.
// Errors: errc::not_inherited (DUPLEX_FD is not set), errc::bad_environment (DUPLEX_FD is set but
// is not an fd number: not digits alone, or beyond int), EBADF (no such fd is open), ENOTSOCK
// (the fd is not a socket), errc::wrong_kind (neither AF_UNIX nor a connected TCP stream, a
// datagram socket, not the kind asked for, or a seqpacket socket with framing::python), EINVAL
// (options.channel out of range, as channel::create refuses them), EBUSY (already taken by an
// earlier call in this process).
// Every check comes before the fd is taken: on any error the fd is left open and untaken, so a
// call with corrected options can still take it.
[[nodiscard]] result<channel> inherited_channel(const inherited_options& options = {});

// An error of inherited_channel() in words that name DUPLEX_FD and its value (read again from the
// environment, quoted, at most 32 bytes, unprintable bytes as \xNN), for a message to a person:
// "DUPLEX_FD is set to ' 3', which is not an fd number", "... to '9', which is not an open fd",
// "... to '1', which is not a socket"; likewise for wrong_kind, EINVAL and EBUSY, and any other
// error as "DUPLEX_FD is set to '3': " and ec.message(). With DUPLEX_FD unset, ec.message().
[[nodiscard]] std::string describe_inherited_error(const std::error_code& ec);

}  // namespace duplex
