#include "duplex/process.hpp"

#include <dlfcn.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <charconv>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "base/syscall.hpp"
#include "channel/channel_check.hpp"
#include "duplex/socket_pair.hpp"
#include "process/spawn_child.hpp"
#include "socket/classify.hpp"

#ifndef CLONE_PIDFD
#define CLONE_PIDFD 0x00001000
#endif
#ifndef P_PIDFD
#define P_PIDFD 3
#endif

extern char** environ;

namespace duplex {
namespace {

result<exit_status> status_from(const siginfo_t& info) {
  switch (info.si_code) {
    case CLD_EXITED: return exit_status::exited(info.si_status);
    case CLD_KILLED: return exit_status::killed(info.si_status, false);
    case CLD_DUMPED: return exit_status::killed(info.si_status, true);
    default: return fail_errno(EINVAL);
  }
}

// waitid on a pidfd; nullopt if WNOHANG and the child is still running.
result<std::optional<exit_status>> wait_pidfd(int pidfd, int options) {
  siginfo_t info{};
  if (detail::retry_eintr([&] {
        return ::waitid(static_cast<idtype_t>(P_PIDFD), static_cast<id_t>(pidfd), &info,
                        WEXITED | options);
      }) != 0) {
    return fail_errno(errno);
  }
  if (info.si_pid == 0) return std::optional<exit_status>{};  // WNOHANG: still running
  auto s = status_from(info);
  if (!s) return std::unexpected(s.error());
  return std::optional<exit_status>{*s};
}

// The value of NAME in a list of "NAME=value" entries, or nullptr.
const char* lookup(const std::vector<const char*>& env, std::string_view name) {
  for (const char* e : env) {
    if (e == nullptr) break;
    const std::string_view entry(e);
    if (entry.size() > name.size() && entry.starts_with(name) && entry[name.size()] == '=') {
      return e + name.size() + 1;
    }
  }
  return nullptr;
}

std::string_view name_of(std::string_view entry) { return entry.substr(0, entry.find('=')); }

// The child's environment, as pointers (nothing is copied but DUPLEX_FD=n, which the caller
// keeps alive): the parent's entries (unless cleared) that the additions do not replace, the
// additions, and DUPLEX_FD last. Null-terminated.
result<std::vector<const char*>> child_environment(const spawn_options& o,
                                                   const std::string& fd_entry) {
  for (const auto& add : o.environment) {
    if (add.find('=') == std::string::npos || add.front() == '=') return fail_errno(EINVAL);
  }
  auto replaced = [&](std::string_view entry) {
    const auto name = name_of(entry);
    if (name == inherited_fd_variable) return true;
    for (const auto& add : o.environment) {
      if (name_of(add) == name) return true;
    }
    return false;
  };
  std::vector<const char*> env;
  if (!o.clear_environment && environ != nullptr) {
    for (char** e = environ; *e != nullptr; ++e) {
      if (!replaced(*e)) env.push_back(*e);
    }
  }
  for (const auto& add : o.environment) {
    if (name_of(add) != inherited_fd_variable) env.push_back(add.c_str());
  }
  env.push_back(fd_entry.c_str());
  env.push_back(nullptr);
  return env;
}

// Finds the program as execvp would: as given if it contains '/', else in each PATH entry.
result<std::string> find_program(const std::string& name, const std::vector<const char*>& env) {
  if (name.empty()) return fail_errno(ENOENT);
  if (name.find('/') != std::string::npos) return name;
  const char* path = lookup(env, "PATH");
  if (path == nullptr) path = "/usr/local/bin:/usr/bin:/bin";
  int error = ENOENT;
  std::string_view dirs(path);
  std::string candidate;
  for (;;) {
    const auto colon = dirs.find(':');
    const std::string_view dir = dirs.substr(0, colon);
    candidate.assign(dir.empty() ? std::string_view(".") : dir);
    candidate.push_back('/');
    candidate.append(name);
    struct stat st {};
    if (::stat(candidate.c_str(), &st) == 0 && S_ISREG(st.st_mode)) {
      if (::access(candidate.c_str(), X_OK) == 0) return candidate;
      error = EACCES;
    }
    if (colon == std::string_view::npos) break;
    dirs.remove_prefix(colon + 1);
  }
  return fail_errno(error);
}

// A stack for the clone child. Its few steps need well under a page or two; 32 KiB leaves a
// wide margin without the cost of a guard page. Each thread maps one on its first spawn and keeps
// it until it exits (thread_stack()): the spawning thread is suspended while its child runs on
// the stack (CLONE_VFORK), so one per thread is enough, and keeping it spares every spawn an mmap,
// the page faults of a fresh stack and a munmap (which must flush the TLB of the CPU the child
// ran on): about a tenth of a spawn's cost when the program is small.
class child_stack {
 public:
  static constexpr std::size_t size = 32 * 1024;
  child_stack() = default;
  ~child_stack() {
    if (base_ != nullptr) ::munmap(base_, size);
  }
  child_stack(const child_stack&) = delete;
  child_stack& operator=(const child_stack&) = delete;
  // The top of the stack (it grows down), mapping it first if need be; nullptr if that failed
  // (the next call tries again).
  [[nodiscard]] void* top() noexcept {
    if (base_ == nullptr) {
      void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
      if (p == MAP_FAILED) return nullptr;
      base_ = static_cast<char*>(p);
    }
    return base_ + size;
  }
  // The lowest address; valid once top() has succeeded.
  [[nodiscard]] void* base() const noexcept { return base_; }

 private:
  char* base_ = nullptr;
};

child_stack& thread_stack() {
  thread_local child_stack stack;
  return stack;
}

// struct clone_args as far as `tls` (CLONE_ARGS_SIZE_VER0), which every kernel with clone3 takes.
struct clone3_args {
  std::uint64_t flags;
  std::uint64_t pidfd;
  std::uint64_t child_tid;
  std::uint64_t parent_tid;
  std::uint64_t exit_signal;
  std::uint64_t stack;
  std::uint64_t stack_size;
  std::uint64_t tls;
};
constexpr std::uint64_t clone_clear_sighand = 0x100000000ULL;  // Linux 5.5

// Whether clone3 with CLONE_CLEAR_SIGHAND still looks usable: it stops being so at the first
// ENOSYS (before Linux 5.3, or a seccomp filter that hides clone3, as container runtimes' default
// profiles do so that callers fall back to clone), EINVAL (5.3 and 5.4 lack the flag) or EPERM
// (a filter that refuses it).
std::atomic<bool> clone3_usable{detail::have_clone3_vfork};

using clone_function = int (*)(int (*)(void*), void*, int, void*, ...);

// glibc's own clone(). A sanitizer runtime may interpose clone() (ThreadSanitizer does, and runs
// its fork bookkeeping in the child, which under CLONE_VM writes the parent's memory); the child
// here touches nothing but raw syscalls, so it needs no such help.
clone_function libc_clone() {
  static const clone_function fn = [] {
    clone_function found = &::clone;
    if (void* libc = ::dlopen("libc.so.6", RTLD_LAZY | RTLD_NOLOAD)) {
      if (void* sym = ::dlsym(libc, "clone")) found = reinterpret_cast<clone_function>(sym);
      ::dlclose(libc);
    }
    return found;
  }();
  return fn;
}

// Starts the child on `stack`, suspended until it has exec'd or exited (CLONE_VFORK), with its
// pidfd in *pidfd. Where clone3 works, the kernel resets the parent's signal handlers in the
// child (CLONE_CLEAR_SIGHAND), sparing the child 64 sigaction calls; otherwise clone(), and the
// child resets them itself. Returns the pid, or -errno.
long start_child(detail::spawn_plan& plan, child_stack& stack, int* pidfd) {
  constexpr std::uint64_t flags = CLONE_VM | CLONE_VFORK | CLONE_PIDFD;
  if constexpr (detail::have_clone3_vfork) {
    if (clone3_usable.load(std::memory_order_relaxed)) {
      clone3_args args{};
      args.flags = flags | clone_clear_sighand;
      args.pidfd = reinterpret_cast<std::uintptr_t>(pidfd);
      args.exit_signal = SIGCHLD;
      args.stack = reinterpret_cast<std::uintptr_t>(stack.base());
      args.stack_size = child_stack::size;
      plan.handlers_reset = true;
      const long pid =
          detail::duplex_detail_clone3(&args, sizeof args, detail::spawn_child_main, &plan);
      if (pid != -ENOSYS && pid != -EINVAL && pid != -EPERM) return pid;
      clone3_usable.store(false, std::memory_order_relaxed);
      plan.handlers_reset = false;
    }
  }
  const int pid = libc_clone()(detail::spawn_child_main, stack.top(),
                               static_cast<int>(flags) | SIGCHLD, &plan, pidfd);
  return pid < 0 ? -errno : pid;
}

}  // namespace

std::string exit_status::describe() const {
  if (normal()) return "exited with code " + std::to_string(code_);
  const char* abbrev = ::sigabbrev_np(signal_);
  std::string out = "killed by signal " + std::to_string(signal_);
  if (abbrev != nullptr) out += std::string(" (SIG") + abbrev + ")";
  if (core_) out += ", core dumped";
  return out;
}

child::child(child&& other) noexcept
    : pid_(std::exchange(other.pid_, -1)),
      pidfd_(std::move(other.pidfd_)),
      channel_(std::move(other.channel_)),
      status_(std::exchange(other.status_, std::nullopt)) {}

child& child::operator=(child&& other) noexcept {
  if (this != &other) {
    reap_on_destruction();
    pid_ = std::exchange(other.pid_, -1);
    pidfd_ = std::move(other.pidfd_);
    channel_ = std::move(other.channel_);
    status_ = std::exchange(other.status_, std::nullopt);
  }
  return *this;
}

child::~child() { reap_on_destruction(); }

void child::reap_on_destruction() noexcept {
  if (!pidfd_.valid() || status_) return;
  channel_.close();
  static_cast<void>(kill(SIGKILL));
  static_cast<void>(wait());
}

result<exit_status> child::wait() {
  if (status_) return *status_;
  if (!pidfd_.valid()) return fail_errno(ECHILD);
  auto r = wait_pidfd(pidfd_.get(), 0);
  if (!r) return std::unexpected(r.error());
  status_ = **r;
  return *status_;
}

result<exit_status> child::wait(std::chrono::nanoseconds timeout) {
  if (status_) return *status_;
  if (!pidfd_.valid()) return fail_errno(ECHILD);
  if (auto ready = detail::wait_for(pidfd_.get(), POLLIN, timeout); !ready) {
    return std::unexpected(ready.error());
  }
  return wait();
}

result<std::optional<exit_status>> child::try_wait() {
  if (status_) return status_;
  if (!pidfd_.valid()) return fail_errno(ECHILD);
  auto r = wait_pidfd(pidfd_.get(), WNOHANG);
  if (!r) return std::unexpected(r.error());
  if (*r) status_ = **r;
  return *r;
}

result<void> child::kill(int signal) {
  if (status_ || !pidfd_.valid()) return fail_errno(ESRCH);
  if (::syscall(SYS_pidfd_send_signal, pidfd_.get(), signal, nullptr, 0) == 0) return {};
  if (errno != ENOSYS) return fail_errno(errno);
  // Before Linux 5.1 (or under an emulator without it): the pid is as safe, because it stays
  // reserved for this child until it is reaped, and only this object reaps it.
  if (::kill(pid_, signal) != 0) return fail_errno(errno);
  return {};
}

result<child> spawn(std::span<const std::string> argv, const spawn_options& options) {
  auto pair = socket_pair(options.kind);  // close-on-exec; the child moves its end into place
  if (!pair) return std::unexpected(pair.error());
  auto parent_end = channel::create(std::move(pair->first), options.channel);
  if (!parent_end) return std::unexpected(parent_end.error());
  auto c = spawn(argv, pair->second.release(), options);  // closes the child's end here
  if (!c) return c;
  c->channel_ = std::move(*parent_end);
  return c;
}

result<child> spawn(std::span<const std::string> argv, unique_fd end,
                    const spawn_options& options) {
  if (!end.valid()) return fail_errno(EBADF);
  if (argv.empty() || options.child_fd < 3) return fail_errno(EINVAL);
  // The child inherits this process's fd limit, and no fd at or above it can exist there (dup2
  // itself says EBADF for such a number). Refused here, before anything starts.
  if (rlimit limit{}; ::getrlimit(RLIMIT_NOFILE, &limit) == 0 && limit.rlim_cur != RLIM_INFINITY &&
                      static_cast<rlim_t>(options.child_fd) >= limit.rlim_cur) {
    return fail_errno(EBADF);
  }
  const std::string fd_entry =
      std::string(inherited_fd_variable) + "=" + std::to_string(options.child_fd);
  auto env = child_environment(options, fd_entry);
  if (!env) return std::unexpected(env.error());
  auto path = find_program(argv[0], *env);
  if (!path) return std::unexpected(path.error());

  std::vector<const char*> c_argv;
  c_argv.reserve(argv.size() + 1);
  for (const auto& a : argv)
    c_argv.push_back(a.c_str());
  c_argv.push_back(nullptr);
  child_stack& stack = thread_stack();
  if (stack.top() == nullptr) return fail_errno(ENOMEM);

  detail::spawn_plan plan;
  plan.path = path->c_str();
  // execve takes char* const*; it does not write the strings.
  plan.argv = const_cast<char* const*>(c_argv.data());
  plan.envp = const_cast<char* const*>(env->data());
  plan.cwd = options.working_directory.empty() ? nullptr : options.working_directory.c_str();
  plan.end_fd = end.get();
  plan.child_fd = options.child_fd;
  plan.null_stdin = options.stdin_mode == stdio_mode::null;
  plan.null_stdout = options.stdout_mode == stdio_mode::null;
  plan.null_stderr = options.stderr_mode == stdio_mode::null;
  plan.kill_on_parent_death = options.kill_on_parent_death;
  if (options.kill_on_parent_death) plan.parent_pid = ::getpid();

  // Block every signal around the clone, so no handler of ours runs in the child before it has
  // reset them; the child restores this mask just before exec.
  sigset_t all;
  sigfillset(&all);
  ::pthread_sigmask(SIG_SETMASK, &all, &plan.parent_mask);
  int pidfd = -1;
  const long started = start_child(plan, stack, &pidfd);
  ::pthread_sigmask(SIG_SETMASK, &plan.parent_mask, nullptr);
  if (started < 0) return fail_errno(static_cast<int>(-started));
  const auto pid = static_cast<pid_t>(started);

  // CLONE_VFORK: the child has exec'd or exited by now.
  child c;
  c.pid_ = pid;
  c.pidfd_.reset(pidfd);
  if (plan.error != 0) {
    static_cast<void>(c.wait());  // reap the failed child: no zombie
    return fail_errno(plan.error);
  }
  return c;  // end is closed on the way out: the child's copy is its own now
}

result<child> fork_with_channel(const std::function<int(duplex::channel&)>& fn,
                                const fork_options& options) {
  auto pair = socket_pair(options.kind);
  if (!pair) return std::unexpected(pair.error());
  auto parent_end = channel::create(std::move(pair->first), options.channel);
  if (!parent_end) return std::unexpected(parent_end.error());
  const pid_t parent = ::getpid();
  std::fflush(nullptr);  // nothing buffered may be written twice
  const pid_t pid = ::fork();
  if (pid < 0) return fail_errno(errno);
  if (pid == 0) {
    *parent_end = channel();  // this process's copy of the parent's end
    if (options.kill_on_parent_death) {
      if (::prctl(PR_SET_PDEATHSIG, SIGKILL) != 0 || ::getppid() != parent) ::_exit(127);
    }
    int code = 70;  // EX_SOFTWARE, if fn throws
    try {
      auto mine = channel::create(std::move(pair->second), options.channel);
      if (mine) code = fn(*mine);
    } catch (...) {
    }
    std::fflush(nullptr);
    ::_exit(code);
  }
  pair->second.close();
  child c;
  c.pid_ = pid;
  const int pidfd = static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
  if (pidfd < 0) {
    const int err = errno;
    ::kill(pid, SIGKILL);
    int status = 0;
    static_cast<void>(detail::retry_eintr([&] { return ::waitpid(pid, &status, 0); }));
    return fail_errno(err);
  }
  c.pidfd_.reset(pidfd);
  c.channel_ = std::move(*parent_end);
  return c;
}

namespace {

// The fd number DUPLEX_FD names: digits only, within int. errc::not_inherited if it is unset,
// errc::bad_environment if it is anything else.
result<int> inherited_fd_number() {
  const char* value = std::getenv(std::string(inherited_fd_variable).c_str());
  if (value == nullptr) return fail(errc::not_inherited);
  const std::string_view text(value);
  // from_chars would take a leading '-'; an fd number has digits alone.
  if (text.empty() || text.front() < '0' || text.front() > '9') return fail(errc::bad_environment);
  int fd = -1;
  const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), fd);
  if (ec != std::errc() || end != text.data() + text.size()) return fail(errc::bad_environment);
  return fd;
}

// A value from the environment, quoted for a message: at most 32 bytes, a byte outside printable
// ASCII as \xNN, so that no value can garble the line or the terminal it is printed on.
std::string quoted(std::string_view value) {
  constexpr std::size_t shown = 32;
  std::string out = "'";
  for (const char ch : value.substr(0, shown)) {
    const auto byte = static_cast<unsigned char>(ch);
    if (byte >= 0x20 && byte < 0x7f && byte != '\\') {
      out.push_back(ch);
    } else {
      char hex[5];
      std::snprintf(hex, sizeof hex, "\\x%02x", byte);
      out += hex;
    }
  }
  out += value.size() > shown ? "'..." : "'";
  return out;
}

}  // namespace

result<channel> inherited_channel(const inherited_options& options) {
  static std::atomic<bool> taken{false};
  auto number = inherited_fd_number();
  if (!number) return std::unexpected(number.error());
  const int fd = *number;
  // Check before owning: an fd that is not ours to take must not be closed on the way out, and
  // options channel::create refuses must not cost the caller its end.
  if (::fcntl(fd, F_GETFD) < 0) return fail_errno(errno);
  auto shape = detail::classify_socket(fd);
  if (!shape) return std::unexpected(shape.error());
  const socket_kind kind = shape->kind;
  if (kind == socket_kind::datagram) return fail(errc::wrong_kind);
  if (options.kind && *options.kind != kind) return fail(errc::wrong_kind);
  if (auto ok = detail::check_channel(kind, options.channel); !ok) {
    return std::unexpected(ok.error());
  }
  if (taken.exchange(true)) return fail_errno(EBUSY);
  // Close-on-exec: programs this child starts must not inherit its end.
  if (::fcntl(fd, F_SETFD, FD_CLOEXEC) != 0) {
    taken.store(false);
    return fail_errno(errno);
  }
  return channel::create(socket(unique_fd(fd), kind, shape->domain), options.channel);
}

std::string describe_inherited_error(const std::error_code& ec) {
  const char* value = std::getenv(std::string(inherited_fd_variable).c_str());
  if (value == nullptr) return ec.message();
  const std::string named = std::string(inherited_fd_variable) + " is set to " + quoted(value);
  if (ec == errc::bad_environment) return named + ", which is not an fd number";
  if (ec == std::error_code(EBADF, std::system_category())) {
    return named + ", which is not an open fd";
  }
  if (ec == std::error_code(ENOTSOCK, std::system_category())) {
    return named + ", which is not a socket";
  }
  if (ec == errc::wrong_kind) {
    return named +
           ", which is not an AF_UNIX stream or seqpacket socket (or a connected TCP "
           "stream) of the kind asked for";
  }
  if (ec == std::error_code(EINVAL, std::system_category())) {
    return named + ", but the channel options are out of range (the end was not taken)";
  }
  if (ec == std::error_code(EBUSY, std::system_category())) {
    return named + ", whose channel this process has taken already";
  }
  return named + ": " + ec.message();
}

}  // namespace duplex
