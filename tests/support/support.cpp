#include "support.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <grp.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <system_error>

#include "duplex/socket_pair.hpp"

namespace duplex::test {
namespace {

std::atomic<long> g_signals{0};

void count_signal(int /*signal*/) { g_signals.fetch_add(1, std::memory_order_relaxed); }

}  // namespace

std::vector<int> open_fds() {
  DIR* dir = ::opendir("/proc/self/fd");
  if (dir == nullptr) throw std::runtime_error("cannot open /proc/self/fd");
  std::vector<int> fds;
  while (const dirent* entry = ::readdir(dir)) {
    if (entry->d_name[0] == '.') continue;
    const int fd = std::atoi(entry->d_name);
    if (fd != ::dirfd(dir)) fds.push_back(fd);
  }
  ::closedir(dir);
  return fds;
}

std::size_t open_fd_count() { return open_fds().size(); }

std::vector<open_file> open_files() {
  std::vector<int> fds = open_fds();
  std::sort(fds.begin(), fds.end());
  std::vector<open_file> files;
  files.reserve(fds.size());
  for (const int fd : fds) {
    struct stat st {};
    if (::fstat(fd, &st) != 0) continue;  // closed since it was listed (by another thread)
    files.push_back({fd, st.st_dev, st.st_ino});
  }
  return files;
}

std::string fd_changes(const std::vector<open_file>& before, const std::vector<open_file>& after) {
  std::string out;
  const auto line = [&out](int fd, const std::string& what) {
    out += "fd " + std::to_string(fd) + " " + what + "\n";
  };
  std::size_t i = 0;
  std::size_t j = 0;
  while (i < before.size() || j < after.size()) {
    if (j == after.size() || (i < before.size() && before[i].fd < after[j].fd)) {
      line(before[i++].fd, "was closed");
    } else if (i == before.size() || after[j].fd < before[i].fd) {
      line(after[j].fd, "was left open (inode " + std::to_string(after[j].ino) + ")");
      ++j;
    } else {
      if (before[i] != after[j]) line(after[j].fd, "now refers to another file");
      ++i;
      ++j;
    }
  }
  return out;
}

bool fd_is_open(int fd) { return ::fcntl(fd, F_GETFD) != -1; }

bool fd_is_cloexec(int fd) {
  const int flags = ::fcntl(fd, F_GETFD);
  return flags != -1 && (flags & FD_CLOEXEC) != 0;
}

default_sigpipe::default_sigpipe() {
  struct sigaction dfl {};
  dfl.sa_handler = SIG_DFL;
  sigemptyset(&dfl.sa_mask);
  if (::sigaction(SIGPIPE, &dfl, &previous_) != 0) throw std::runtime_error("sigaction");
}

default_sigpipe::~default_sigpipe() { ::sigaction(SIGPIPE, &previous_, nullptr); }

signal_storm::signal_storm(int signal, long interval_ns) : signal_(signal) {
  g_signals.store(0);
  struct sigaction sa {};
  sa.sa_handler = count_signal;
  sa.sa_flags = 0;  // no SA_RESTART: every blocking syscall sees EINTR
  sigemptyset(&sa.sa_mask);
  if (::sigaction(signal_, &sa, &previous_) != 0) throw std::runtime_error("sigaction");
  sigevent sev{};
  sev.sigev_notify = SIGEV_THREAD_ID;
  sev.sigev_signo = signal_;
  sev._sigev_un._tid = static_cast<pid_t>(::syscall(SYS_gettid));
  timer_t timer{};
  if (::timer_create(CLOCK_MONOTONIC, &sev, &timer) != 0) throw std::runtime_error("timer_create");
  timer_ = timer;
  itimerspec spec{};
  spec.it_interval.tv_nsec = interval_ns;
  spec.it_value.tv_nsec = interval_ns;
  if (::timer_settime(timer, 0, &spec, nullptr) != 0) throw std::runtime_error("timer_settime");
}

signal_storm::~signal_storm() {
  ::timer_delete(static_cast<timer_t>(timer_));
  // A signal of the deleted timer may still be pending; ignoring the signal discards it, so the
  // previous disposition (often "terminate") never sees it.
  struct sigaction ignore {};
  ignore.sa_handler = SIG_IGN;
  sigemptyset(&ignore.sa_mask);
  ::sigaction(signal_, &ignore, nullptr);
  ::sigaction(signal_, &previous_, nullptr);
}

long signal_storm::delivered() const noexcept { return g_signals.load(std::memory_order_relaxed); }

std::vector<std::byte> pattern(std::size_t n, unsigned seed) {
  std::vector<std::byte> v(n);
  std::uint64_t x = seed * 0x9e3779b97f4a7c15ULL + n + 1;
  std::size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    std::memcpy(v.data() + i, &x, 8);
  }
  for (; i < n; ++i)
    v[i] = static_cast<std::byte>(x >> (8 * (i % 8)));
  return v;
}

bool same(std::span<const std::byte> a, std::span<const std::byte> b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size()) == 0);
}

std::pair<unique_fd, unique_fd> make_pipe() {
  int p[2];
  if (::pipe2(p, O_CLOEXEC) != 0) throw std::system_error(errno, std::system_category(), "pipe2");
  return {unique_fd(p[0]), unique_fd(p[1])};
}

ino_t inode_of(int fd) {
  struct stat st {};
  return ::fstat(fd, &st) == 0 ? st.st_ino : 0;
}

int reap(pid_t pid) {
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0) {
    if (errno != EINTR) return -1;
  }
  return status;
}

std::vector<pid_t> child_processes() {
  std::vector<pid_t> out;
  DIR* dir = ::opendir("/proc");
  if (dir == nullptr) return out;
  const pid_t self = ::getpid();
  while (const dirent* entry = ::readdir(dir)) {
    if (entry->d_name[0] < '0' || entry->d_name[0] > '9') continue;
    std::FILE* f = std::fopen((std::string("/proc/") + entry->d_name + "/stat").c_str(), "r");
    if (f == nullptr) continue;
    char buf[1024];
    const std::size_t n = std::fread(buf, 1, sizeof buf - 1, f);
    std::fclose(f);
    buf[n] = '\0';
    // The command name may hold spaces and parentheses: the fields after it follow the last ')'.
    const char* close = std::strrchr(buf, ')');
    if (close == nullptr) continue;
    char state = 0;
    int ppid = 0;
    if (std::sscanf(close + 1, " %c %d", &state, &ppid) == 2 && ppid == self) {
      out.push_back(static_cast<pid_t>(std::atoi(entry->d_name)));
    }
  }
  ::closedir(dir);
  return out;
}

int run_in_child(const std::function<int()>& fn) {
  std::fflush(nullptr);
  const pid_t pid = ::fork();
  if (pid < 0) throw std::runtime_error("fork");
  if (pid == 0) ::_exit(fn());
  const int status = reap(pid);
  if (status < 0) throw std::runtime_error("waitpid");
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return -1;
}

bool become_unprivileged() {
  const auto uid = static_cast<id_t>(200000 + ::getpid() % 100000);
  if (::geteuid() == 0 && ::setgroups(0, nullptr) != 0) return false;
  if (::setresgid(uid, uid, uid) != 0) return false;
  return ::setresuid(uid, uid, uid) == 0;
}

bool set_nofile(rlim_t soft) {
  rlimit r{};
  ::getrlimit(RLIMIT_NOFILE, &r);
  r.rlim_cur = soft;
  return ::setrlimit(RLIMIT_NOFILE, &r) == 0;
}

std::string read_to_end(int fd) {
  std::string out;
  char buf[4096];
  ssize_t n = 0;
  while ((n = ::read(fd, buf, sizeof buf)) > 0 || (n < 0 && errno == EINTR)) {
    if (n > 0) out.append(buf, static_cast<std::size_t>(n));
  }
  return out;
}

raw_peer make_raw(socket_kind kind, channel_options options) {
  auto pair = must(socket_pair(kind));
  return {must(channel::create(std::move(pair.first), options)), std::move(pair.second)};
}

std::vector<std::byte> python_frame(const std::vector<std::byte>& body, bool long_form) {
  std::vector<std::byte> out;
  auto put_be = [&out](std::uint64_t v, int bytes) {
    for (int i = bytes - 1; i >= 0; --i)
      out.push_back(static_cast<std::byte>((v >> (8 * i)) & 0xff));
  };
  if (long_form) {
    put_be(0xffffffffU, 4);
    put_be(body.size(), 8);
  } else {
    put_be(body.size(), 4);
  }
  out.insert(out.end(), body.begin(), body.end());
  return out;
}

void make_buffers_tiny(connected_pair& pair) {
  for (socket* s : {&pair.first, &pair.second}) {
    EXPECT_THAT(s->set_send_buffer_size(1), Succeeded());
    EXPECT_THAT(s->set_receive_buffer_size(1), Succeeded());
  }
}

}  // namespace duplex::test
