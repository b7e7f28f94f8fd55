// spawn, child, inherited_channel and fork_with_channel, with a real helper program
// (duplex_test_child) as the child. Every test checks that no fd leaked and no child was left.
#include "duplex/process.hpp"

#include <fcntl.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <poll.h>
#include <spawn.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <latch>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "duplex/endpoint.hpp"
#include "duplex/socket_pair.hpp"
#include "duplex/waiter.hpp"
#include "support.hpp"

extern char** environ;

namespace duplex {
namespace {

using namespace std::chrono_literals;
using test::HasError;
using test::Succeeded;
using test::sys;

const std::string test_child = DUPLEX_TEST_CHILD;

class process_test : public test::process_checked {};
class process_kind_test : public test::process_checked,
                          public ::testing::WithParamInterface<socket_kind> {};

INSTANTIATE_TEST_SUITE_P(kinds, process_kind_test,
                         ::testing::Values(socket_kind::stream, socket_kind::seqpacket),
                         test::kind_name);

// Spawns the test child in a mode and returns its first message, or what went wrong instead.
// Never throws and checks nothing itself, so a forked process (in_a_process) may use it too.
std::string ask(const std::vector<std::string>& args, spawn_options options = {}) {
  std::vector<std::string> argv{test_child};
  argv.insert(argv.end(), args.begin(), args.end());
  auto c = spawn(argv, options);
  if (!c) return "spawn failed: " + c.error().message();
  auto m = c->channel().receive(30s);
  auto status = c->wait(30s);
  if (!m) return "error: " + m.error().message();
  if (!status) return "wait failed: " + status.error().message();
  if (!status->success()) return "the child " + status->describe();
  return std::string(m->text());
}

// Runs fn in a forked process, where it may change what the test process must keep as it is
// (its fd limit, its stdio), and returns the text fn returned, carried back through a pipe.
std::string in_a_process(const std::function<std::string()>& fn) {
  auto [read_end, write_end] = test::make_pipe();
  const int status = test::run_in_child([&fn, &write_end] {
    const std::string out = fn();
    const ssize_t n = ::write(write_end.get(), out.data(), out.size());  // less than a pipe holds
    return n == static_cast<ssize_t>(out.size()) ? 0 : 1;
  });
  write_end.reset();
  std::string out = test::read_to_end(read_end.get());
  EXPECT_EQ(status, 0);
  return out;
}

// Runs a program with exactly the given environment and returns its stdout.
std::string run_with_env(const std::vector<std::string>& argv, std::vector<std::string> env) {
  auto [read_end, write_end] = test::make_pipe();
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, write_end.get(), 1);
  std::vector<char*> c_argv;
  for (const auto& a : argv)
    c_argv.push_back(const_cast<char*>(a.c_str()));
  c_argv.push_back(nullptr);
  std::vector<char*> c_env;
  for (auto& e : env)
    c_env.push_back(e.data());
  c_env.push_back(nullptr);
  pid_t pid = -1;
  const int r =
      ::posix_spawn(&pid, argv[0].c_str(), &actions, nullptr, c_argv.data(), c_env.data());
  posix_spawn_file_actions_destroy(&actions);
  if (r != 0) return "posix_spawn failed";
  write_end.reset();
  std::string out = test::read_to_end(read_end.get());
  test::reap(pid);
  if (!out.empty() && out.back() == '\n') out.pop_back();
  return out;
}

// --- spawn with an end the caller has --------------------------------------------------------

TEST_P(process_kind_test, ASpawnedChildTalksOverAnEndItWasGiven) {
  auto pair = test::must(socket_pair(GetParam()));
  const int given = pair.second.native_handle();
  auto c = spawn(std::vector<std::string>{test_child, "echo"}, pair.second.release());
  ASSERT_THAT(c, Succeeded());
  EXPECT_FALSE(c->channel().is_open());    // the conversation is the child's
  EXPECT_EQ(::fcntl(given, F_GETFD), -1);  // closed here once the child held it
  auto mine = test::must(channel::create(std::move(pair.first)));
  ASSERT_THAT(mine.send(as_bytes("given")), Succeeded());
  auto m = mine.receive(30s);
  ASSERT_THAT(m, Succeeded());
  EXPECT_EQ(m->text(), "given");
  ASSERT_THAT(mine.shutdown_send(), Succeeded());
  auto status = c->wait();
  ASSERT_THAT(status, Succeeded());
  EXPECT_TRUE(status->success()) << status->describe();
}

TEST_F(process_test, AnEndThatCannotBeGivenIsRefusedAndClosed) {
  EXPECT_THAT(spawn(std::vector<std::string>{test_child, "echo"}, unique_fd()),
              HasError(sys(EBADF)));
  auto pair = test::must(socket_pair(socket_kind::stream));
  const int given = pair.second.native_handle();
  EXPECT_THAT(spawn(std::vector<std::string>{"/nonexistent/program"}, pair.second.release()),
              HasError(sys(ENOENT)));
  EXPECT_EQ(::fcntl(given, F_GETFD), -1);  // closed on error too
}

TEST_F(process_test, AChildInheritsAConnectedTcpStreamAsItsChannel) {
  auto l = test::must(listener::listen(test::must(address::parse("tcp:127.0.0.1:0"))));
  auto client = test::must(connect(l.local_address(), {}, 30s));
  auto conn = test::must(l.accept(30s));
  unique_fd end(::fcntl(conn.chan.native_handle(), F_DUPFD_CLOEXEC, 3));
  ASSERT_TRUE(end.valid());
  conn.chan.close();
  auto c = spawn(std::vector<std::string>{test_child, "echo"}, std::move(end));
  ASSERT_THAT(c, Succeeded());
  ASSERT_THAT(client.send(as_bytes("over tcp")), Succeeded());
  auto m = client.receive(30s);
  ASSERT_THAT(m, Succeeded());
  EXPECT_EQ(m->text(), "over tcp");
  ASSERT_THAT(client.shutdown_send(), Succeeded());
  auto status = c->wait();
  ASSERT_THAT(status, Succeeded());
  EXPECT_TRUE(status->success()) << status->describe();
  // A listening TCP socket is no channel's end: the child's inherited_channel refuses it (the
  // test child exits 100 then).
  unique_fd listening(::fcntl(l.native_handle(), F_DUPFD_CLOEXEC, 3));
  ASSERT_TRUE(listening.valid());
  spawn_options quiet;
  quiet.stderr_mode = stdio_mode::null;
  auto refused = spawn(std::vector<std::string>{test_child, "echo"}, std::move(listening), quiet);
  ASSERT_THAT(refused, Succeeded());
  auto refused_status = refused->wait();
  ASSERT_THAT(refused_status, Succeeded());
  EXPECT_EQ(refused_status->code(), 100);
}

// --- spawn and the channel -------------------------------------------------------------------

TEST_P(process_kind_test, ASpawnedChildTalksOverItsEnd) {
  spawn_options o;
  o.kind = GetParam();
  auto c = spawn({test_child, "echo"}, o);
  ASSERT_THAT(c, Succeeded());
  EXPECT_GT(c->pid(), 0);
  EXPECT_TRUE(test::fd_is_cloexec(c->pidfd()));
  for (const char* text : {"one", "", "three"}) {
    ASSERT_THAT(c->channel().send(as_bytes(text)), Succeeded());
    auto m = c->channel().receive(30s);
    ASSERT_THAT(m, Succeeded());
    EXPECT_EQ(m->text(), text);
  }
  ASSERT_THAT(c->channel().shutdown_send(), Succeeded());  // the child's cue to finish
  auto status = c->wait();
  ASSERT_THAT(status, Succeeded());
  EXPECT_TRUE(status->success()) << status->describe();
  EXPECT_EQ(c->wait().value(), *status);  // reaped once; the status is kept
}

TEST_F(process_test, TheChildHoldsOnlyStdioAndItsEnd) {
  EXPECT_EQ(ask({"fds"}), "0 1 2 3");
  spawn_options o;
  o.child_fd = 7;
  EXPECT_EQ(ask({"fds"}, o), "0 1 2 7");
  EXPECT_EQ(ask({"env", "DUPLEX_FD"}, o), "7");
  EXPECT_EQ(ask({"cloexec"}), "1");  // inherited_channel() protects it from the child's children
}

// Class 9: while other threads create channels and pass fds, each child still gets only its own.
TEST_F(process_test, OnlyItsOwnEndWhileOtherThreadsPassFds) {
  std::atomic<bool> stop{false};
  std::vector<std::thread> busy;
  for (int t = 0; t < 8; ++t) {
    busy.emplace_back([&stop] {
      while (!stop.load()) {
        auto ends = channel_pair(socket_kind::seqpacket);
        if (!ends) continue;
        auto [read_end, write_end] = test::make_pipe();
        const std::array<int, 2> fds{read_end.get(), write_end.get()};
        if (!ends->first.send(as_bytes("fds"), fds)) continue;
        auto m = ends->second.receive();  // two more fds in this process, briefly
      }
    });
  }
  for (int i = 0; i < 40; ++i)
    EXPECT_EQ(ask({"fds"}), "0 1 2 3") << "spawn " << i;
  stop = true;
  for (auto& t : busy)
    t.join();
}

// Starts the test child in "fds" mode with plain posix_spawn, as code that knows nothing of duplex
// starts a program: nothing is closed in the child but the close-on-exec fds. Its end of a new
// pair is dup2'ed to fd 3 (DUPLEX_FD=3). Returns the fds it reports: every fd of this process
// that was not close-on-exec at the moment of the spawn shows up there.
std::string fds_of_a_plain_child() {
  auto pair = test::must(socket_pair(socket_kind::stream));
  std::vector<std::string> env;
  for (char** e = environ; *e != nullptr; ++e) {
    if (!std::string_view(*e).starts_with("DUPLEX_FD=")) env.emplace_back(*e);
  }
  env.emplace_back("DUPLEX_FD=3");
  std::vector<char*> c_env;
  for (auto& e : env)
    c_env.push_back(e.data());
  c_env.push_back(nullptr);
  std::string mode = "fds";
  std::string path = test_child;
  std::array<char*, 3> c_argv{path.data(), mode.data(), nullptr};
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, pair.second.native_handle(), 3);
  pid_t pid = -1;
  const int r = ::posix_spawn(&pid, path.c_str(), &actions, nullptr, c_argv.data(), c_env.data());
  posix_spawn_file_actions_destroy(&actions);
  if (r != 0) return "posix_spawn failed";
  pair.second.close();
  auto ch = test::must(channel::create(std::move(pair.first)));
  auto m = ch.receive(30s);
  const int status = test::reap(pid);
  if (!m) return "error: " + m.error().message();
  EXPECT_EQ(status, 0);
  return std::string(m->text());
}

// What an fd of this process refers to, as /proc/self/fd shows it ("pipe:[123]", ...).
std::string target_of(int fd) {
  std::error_code ec;
  return std::filesystem::read_symlink("/proc/self/fd/" + std::to_string(fd), ec).string();
}

// Class 9: every other kind of fd duplex opens, opened while children start. Before the spawns,
// fds of each kind are opened and kept open across all of them: shared-memory pools (both ways,
// on both kinds), try_send's queued duplicates of a message's fds, a waiter's epoll fd, and the
// channel ends and pidfds of a spawned and of a forked child (started from another thread). During
// the spawns, threads keep opening and closing more of each: pools and sealed memfds (a send over
// the pool's size), queued duplicates, waiters, and spawned children. Each child started
// with spawn holds only fds 0 to 3, and each started with plain posix_spawn (which closes nothing
// but close-on-exec fds) holds only what such a child held before any of this was open: so none
// of those fds was inheritable, not even for an instant.
TEST_F(process_test, OnlyItsOwnEndWhileOtherThreadsOpenEveryKindOfFd) {
  const std::string baseline = fds_of_a_plain_child();
  ASSERT_THAT(baseline, ::testing::StartsWith("0 1 2 3"));
  const auto before = test::open_fds();

  channel_options shm;
  shm.shared_memory.enabled = true;
  shm.shared_memory.threshold = 64 * 1024;
  shm.shared_memory.pool_size = 1U << 20;
  const auto pooled = test::pattern(256 * 1024, 1);   // into the pool
  const auto own_memfd = test::pattern(2U << 20, 2);  // over the pool: a sealed memfd
  const auto chunk = test::pattern(16 * 1024, 3);
  // A stream channel whose socket is full, so try_send queues duplicates of the fds it is given.
  auto fill = [&chunk](channel& ch) {
    const int small = 4096;
    if (::setsockopt(ch.native_handle(), SOL_SOCKET, SO_SNDBUF, &small, sizeof small) != 0)
      return false;
    while (!ch.wants_write()) {
      if (!ch.try_send(chunk)) return false;
    }
    auto [read_end, write_end] = test::make_pipe();
    const std::array<int, 2> fds{read_end.get(), write_end.get()};
    return ch.try_send(as_bytes("queued with fds"), fds).has_value();
  };  // the pipe is closed: only the queue's duplicates are left

  // Kept open across every spawn. The two children are started from another thread.
  std::optional<child> forked;
  std::optional<child> held;
  std::thread([&forked, &held] {
    auto f = fork_with_channel([](channel& parent) {
      if (!parent.send(as_bytes("ready"))) return 1;
      auto m = parent.receive();  // until the parent closes its end
      return !m && m.error() == errc::peer_closed ? 0 : 2;
    });
    if (f) forked.emplace(std::move(*f));
    auto h = spawn({test_child, "hold"});
    if (h) held.emplace(std::move(*h));
  }).join();
  ASSERT_TRUE(forked && held);
  ASSERT_EQ(forked->channel().receive(30s)->text(), "ready");
  ASSERT_EQ(held->channel().receive(30s)->text(), "ready");
  std::vector<connected_channels> pools;
  for (const auto kind : {socket_kind::stream, socket_kind::seqpacket}) {
    auto ends = test::must(channel_pair(kind, shm));
    ASSERT_THAT(ends.first.send(pooled), Succeeded());
    ASSERT_THAT(ends.second.send(pooled), Succeeded());
    ASSERT_THAT(ends.second.receive(30s), Succeeded());
    ASSERT_THAT(ends.first.receive(30s), Succeeded());
    pools.push_back(std::move(ends));
  }
  auto queued = test::must(channel_pair(socket_kind::stream));
  ASSERT_TRUE(fill(queued.first));
  auto watching = test::must(waiter::create());
  ASSERT_THAT(watching.add(queued.first, 1, readiness::writable), Succeeded());
  ASSERT_THAT(watching.add_exit(*held, 2), Succeeded());
  std::map<std::string, int> kinds;
  for (const int fd : test::open_fds()) {
    if (std::ranges::find(before, fd) != before.end()) continue;
    const std::string target = target_of(fd);
    for (const char* kind : {"memfd:duplex-pool", "pipe:", "eventpoll", "pidfd", "socket:"}) {
      if (target.find(kind) != std::string::npos) ++kinds[kind];
    }
  }
  EXPECT_EQ(kinds["memfd:duplex-pool"], 8);  // each end's own pool and its peer's, on both kinds
  EXPECT_EQ(kinds["pipe:"], 2);              // the queue's duplicates
  EXPECT_EQ(kinds["eventpoll"], 1);
  EXPECT_EQ(kinds["pidfd"], 2);
  EXPECT_EQ(kinds["socket:"], 4 + 2 + 2);  // the pools' pairs, the full pair, the children's ends

  // Opened and closed again and again while the children start; each thread goes round once
  // before the first spawn.
  std::atomic<bool> stop{false};
  std::atomic<int> failures{0};
  std::vector<std::function<bool()>> churn;
  for (const auto kind : {socket_kind::stream, socket_kind::seqpacket}) {
    churn.emplace_back([&, kind] {
      auto ends = channel_pair(kind, shm);
      if (!ends || !ends->first.send(pooled) || !ends->first.send(own_memfd)) return false;
      auto first = ends->second.receive(30s);
      auto second = ends->second.receive(30s);
      return first && first->size() == pooled.size() && second &&
             second->size() == own_memfd.size();
    });
  }
  churn.emplace_back([&fill] {
    auto ends = channel_pair(socket_kind::stream);
    return ends && fill(ends->first);
  });
  churn.emplace_back([&queued] {
    auto w = waiter::create();
    return w && w->add(queued.second, 1) && w->wait(0ms);  // readable: data waits there
  });
  churn.emplace_back([] {
    auto c = spawn({test_child, "exit", "0"});
    if (!c) return false;
    auto status = c->wait(30s);
    return status && status->success();
  });
  std::latch started(static_cast<std::ptrdiff_t>(churn.size()));
  std::vector<std::thread> busy;
  for (const auto& round : churn) {
    busy.emplace_back([&stop, &failures, &started, &round] {
      bool first = true;
      do {
        if (!round()) ++failures;
        if (std::exchange(first, false)) started.count_down();
      } while (!stop.load());
    });
  }
  started.wait();
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  constexpr int rounds = 8;  // every child (and this process's work) runs instrumented, slowly
#else
  constexpr int rounds = 20;
#endif
  for (int i = 0; i < rounds; ++i) {
    EXPECT_EQ(ask({"fds"}), "0 1 2 3") << "spawn " << i;
    EXPECT_EQ(fds_of_a_plain_child(), baseline) << "posix_spawn " << i;
  }
  stop = true;
  for (auto& t : busy)
    t.join();
  EXPECT_EQ(failures.load(), 0);

  forked->channel().close();
  held->channel().close();
  auto forked_status = forked->wait(30s);
  auto held_status = held->wait(30s);
  ASSERT_THAT(forked_status, Succeeded());
  ASSERT_THAT(held_status, Succeeded());
  EXPECT_EQ(forked_status->code(), 0);
  EXPECT_EQ(held_status->code(), 3);  // "hold" exits 3 at end-of-stream
}

// Under a low fd limit, any child_fd below it holds the end and nothing but stdio is open beside
// it: placing the end takes no fd number above child_fd, nor any slot the parent lacks.
TEST_F(process_test, AnyChildFdBelowALowFdLimitWorks) {
  struct scenario {
    rlim_t limit;
    int child_fd;
    bool null_stdio;
  };
  for (const scenario s :
       {scenario{10, 3, false}, scenario{10, 9, false}, scenario{10, 9, true},
        scenario{64, 3, false}, scenario{64, 63, false}, scenario{64, 63, true}}) {
    const std::string fd = std::to_string(s.child_fd);
    SCOPED_TRACE("limit " + std::to_string(s.limit) + ", child_fd " + fd +
                 (s.null_stdio ? ", stdio on /dev/null" : ""));
    const std::string seen = in_a_process([&s] {
      if (!test::set_nofile(s.limit)) return std::string("setrlimit failed");
      spawn_options o;
      o.child_fd = s.child_fd;
      if (s.null_stdio) o.stdin_mode = o.stdout_mode = o.stderr_mode = stdio_mode::null;
      std::string out = ask({"fds"}, o) + " | " + ask({"env", "DUPLEX_FD"}, o);
      if (s.null_stdio) out += " | " + ask({"stdio"}, o);
      return out;
    });
    std::string expected = "0 1 2 " + fd + " | " + fd;
    if (s.null_stdio) expected += " | /dev/null /dev/null /dev/null";
    EXPECT_EQ(seen, expected);
  }
}

// No fd at or above the limit can exist in the child, which inherits the limit: refused with
// EBADF before anything starts.
TEST_F(process_test, AChildFdAtOrAboveTheFdLimitIsRefused) {
  EXPECT_EQ(in_a_process([] {
              if (!test::set_nofile(64)) return std::string("setrlimit failed");
              const auto before = test::open_files();
              std::string out;
              for (const int fd : {64, 65, 1000}) {
                spawn_options o;
                o.child_fd = fd;
                auto c = spawn({test_child, "fds"}, o);
                out += c ? "started" : c.error() == sys(EBADF) ? "EBADF" : c.error().message();
                out += " ";
              }
              out += test::fd_changes(before, test::open_files());
              if (!test::child_processes().empty()) out += "a child is left";
              return out;
            }),
            "EBADF EBADF EBADF ");
}

// The end may already be where it must go, or on a stdio fd (the parent runs with some closed):
// either way the child holds it at child_fd, stdio as asked, and nothing else. Each case closes
// some stdio fds of a forked process, checks where a new pair lands there (the lowest free fds:
// spawn's pair lands there too), spawns, and reports what the child holds.
TEST_F(process_test, TheEndIsPlacedWhereverItsPairLands) {
  struct scenario {
    std::vector<int> closed;  // stdio fds the parent closes first
    bool end_at_child_fd;     // child_fd: the number the child's end lands on in the parent
    std::array<bool, 3> null;
    std::string expected;  // the child's fds
  };
  const std::vector<scenario> scenarios{
      // The end is at child_fd already.
      {{}, true, {false, false, false}, "0 1 2 <end>"},
      {{}, true, {true, true, true}, "0 1 2 <end>"},
      // The pair lands on 0 and 1 (the end on 1). The parent's fds there are close-on-exec, so
      // what the parent would pass on as stdin and stdout is closed in the child.
      {{0, 1}, false, {false, false, false}, "2 3"},
      {{0, 1}, false, {true, true, true}, "0 1 2 3"},
      {{0, 1}, false, {false, true, false}, "1 2 3"},
      {{0, 1}, false, {true, false, false}, "0 2 3"},
      // The pair lands on 1 and 2 (the end on 2).
      {{1, 2}, false, {false, false, true}, "0 2 3"},
      {{1, 2}, false, {false, true, false}, "0 1 3"},
      {{1, 2}, false, {true, true, true}, "0 1 2 3"},
  };
  for (const auto& s : scenarios) {
    const std::string seen = in_a_process([&s] {
      for (const int fd : s.closed)
        ::close(fd);
      int first = -1;
      int second = -1;
      {
        auto probe = socket_pair(socket_kind::stream);
        if (!probe) return "socket_pair failed: " + probe.error().message();
        first = probe->first.native_handle();
        second = probe->second.native_handle();
      }
      if (!s.closed.empty() && (first != s.closed[0] || second != s.closed[1])) {
        return "the pair landed on " + std::to_string(first) + " and " + std::to_string(second);
      }
      spawn_options o;
      o.child_fd = s.end_at_child_fd ? second : 3;
      o.stdin_mode = s.null[0] ? stdio_mode::null : stdio_mode::inherit;
      o.stdout_mode = s.null[1] ? stdio_mode::null : stdio_mode::inherit;
      o.stderr_mode = s.null[2] ? stdio_mode::null : stdio_mode::inherit;
      std::string out = ask({"fds"}, o);
      const std::string end = std::to_string(second);
      if (const auto at = out.find(end); s.end_at_child_fd && at != std::string::npos) {
        out.replace(at, end.size(), "<end>");
      }
      if (s.null == std::array{true, true, true}) out += " | " + ask({"stdio"}, o);
      return out;
    });
    std::string expected = s.expected;
    if (s.null == std::array{true, true, true}) expected += " | /dev/null /dev/null /dev/null";
    EXPECT_EQ(seen, expected) << "closed " << ::testing::PrintToString(s.closed) << ", null "
                              << ::testing::PrintToString(s.null)
                              << (s.end_at_child_fd ? ", the end at child_fd" : "");
  }
}

TEST_F(process_test, EnvironmentCanBeInheritedAddedToAndReplaced) {
  spawn_options add;
  add.environment = {"DUPLEX_TEST_ADDED=yes", "HOME=/nowhere", "DUPLEX_FD=99"};
  EXPECT_EQ(ask({"env", "DUPLEX_TEST_ADDED"}, add), "yes");
  EXPECT_EQ(ask({"env", "HOME"}, add), "/nowhere");
  EXPECT_EQ(ask({"env", "DUPLEX_FD"}, add), "3");  // the contract wins over the caller
  const char* path = std::getenv("PATH");
  EXPECT_EQ(ask({"env", "PATH"}), path != nullptr ? path : "<unset>");  // inherited
  spawn_options clean;
  clean.clear_environment = true;
  clean.environment = {"ONLY=this"};
  EXPECT_EQ(ask({"env", "PATH"}, clean), "<unset>");
  EXPECT_EQ(ask({"env", "ONLY"}, clean), "this");
}

TEST_F(process_test, WorkingDirectoryAndStdio) {
  spawn_options o;
  o.working_directory = "/";
  EXPECT_EQ(ask({"cwd"}, o), "/");
  o.stdin_mode = o.stdout_mode = o.stderr_mode = stdio_mode::null;
  EXPECT_EQ(ask({"stdio"}, o), "/dev/null /dev/null /dev/null");
}

TEST_F(process_test, BadOptionsAreRefusedBeforeAnythingStarts) {
  EXPECT_THAT(spawn(std::vector<std::string>{}), HasError(sys(EINVAL)));
  spawn_options low;
  low.child_fd = 2;
  EXPECT_THAT(spawn({test_child, "fds"}, low), HasError(sys(EINVAL)));
  spawn_options bad_env;
  bad_env.environment = {"NO_EQUALS_SIGN"};
  EXPECT_THAT(spawn({test_child, "fds"}, bad_env), HasError(sys(EINVAL)));
}

// --- failures to start (class 10) ------------------------------------------------------------

TEST_F(process_test, AProgramThatCannotRunIsAnErrorNotAnExit127) {
  EXPECT_THAT(spawn({"/nonexistent/program"}), HasError(sys(ENOENT)));
  EXPECT_THAT(spawn({"duplex-no-such-program-anywhere"}), HasError(sys(ENOENT)));
  // Not executable, and executable but not a program.
  const std::string dir = ::testing::TempDir();
  const std::string plain = dir + "/duplex_not_executable";
  const std::string garbage = dir + "/duplex_garbage_program";
  std::ofstream(plain) << "just text\n";
  std::ofstream(garbage) << "\x01\x02\x03 not an ELF and no #!\n";
  ::chmod(plain.c_str(), 0644);
  ::chmod(garbage.c_str(), 0755);
  EXPECT_THAT(spawn({plain}), HasError(sys(EACCES)));
  EXPECT_THAT(spawn({garbage}), HasError(sys(ENOEXEC)));
  spawn_options nowhere;
  nowhere.working_directory = "/nonexistent/directory";
  EXPECT_THAT(spawn({test_child, "fds"}, nowhere), HasError(sys(ENOENT)));
  ::unlink(plain.c_str());
  ::unlink(garbage.c_str());
}

// --- lifecycle (class 10) --------------------------------------------------------------------

TEST_P(process_kind_test, AnEarlyExitIsSeenOnTheChannelAndInTheStatus) {
  spawn_options o;
  o.kind = GetParam();
  auto c = test::must(spawn({test_child, "exit", "7"}, o));
  EXPECT_THAT(c.channel().receive(30s), HasError(errc::peer_closed));
  auto status = c.wait();
  ASSERT_THAT(status, Succeeded());
  EXPECT_TRUE(status->normal());
  EXPECT_EQ(status->code(), 7);
  EXPECT_EQ(status->describe(), "exited with code 7");
}

TEST_F(process_test, ACrashIsSeenOnTheChannelAndInTheStatus) {
  auto c = test::must(spawn({test_child, "crash"}));
  EXPECT_THAT(c.channel().receive(30s), HasError(errc::peer_closed));
  auto status = c.wait();
  ASSERT_THAT(status, Succeeded());
  EXPECT_FALSE(status->normal());
  EXPECT_EQ(status->signal(), SIGSEGV);
  EXPECT_EQ(status->shell_code(), 128 + SIGSEGV);
  EXPECT_NE(status->describe().find("SIGSEGV"), std::string::npos) << status->describe();
}

TEST_F(process_test, KillWaitWithTimeoutAndThePidfd) {
  auto c = test::must(spawn({test_child, "sleep"}));
  ASSERT_EQ(c.channel().receive(30s)->text(), "ready");
  EXPECT_THAT(c.try_wait(), ::testing::Optional(::testing::Eq(std::nullopt)));
  EXPECT_THAT(c.wait(30ms), HasError(errc::timed_out));
  pollfd p{c.pidfd(), POLLIN, 0};
  EXPECT_EQ(::poll(&p, 1, 0), 0) << "the pidfd is readable only once the child exits";
  ASSERT_THAT(c.kill(SIGTERM), Succeeded());
  EXPECT_EQ(::poll(&p, 1, 30000), 1);
  auto status = c.wait(30s);
  ASSERT_THAT(status, Succeeded());
  EXPECT_EQ(status->signal(), SIGTERM);
  EXPECT_THAT(c.kill(SIGTERM), HasError(sys(ESRCH)));  // reaped: nothing can be signalled
  EXPECT_EQ(c.status(), status.value());
}

// The pidfd refers to this very child: its fdinfo names the child's pid.
TEST_F(process_test, ThePidfdNamesTheChild) {
  auto c = test::must(spawn({test_child, "sleep"}));
  ASSERT_EQ(c.channel().receive(30s)->text(), "ready");
  std::ifstream info("/proc/self/fdinfo/" + std::to_string(c.pidfd()));
  std::string line;
  std::string pid_line;
  while (std::getline(info, line)) {
    if (line.starts_with("Pid:")) pid_line = line;
  }
  EXPECT_EQ(pid_line, "Pid:\t" + std::to_string(c.pid()));
}

// kill_on_parent_death is tied to the thread that spawned (PR_SET_PDEATHSIG), as process.hpp
// warns: when that thread exits, the child is killed though the process lives on.
TEST_F(process_test, KillOnParentDeathFollowsTheSpawningThread) {
  std::optional<child> c;
  std::thread spawner([&c] {
    spawn_options o;
    o.kill_on_parent_death = true;
    c.emplace(test::must(spawn({test_child, "sleep"}, o)));
    ASSERT_EQ(c->channel().receive(30s)->text(), "ready");
  });
  spawner.join();
  ASSERT_TRUE(c.has_value());
  auto status = c->wait(30s);
  ASSERT_THAT(status, Succeeded());
  EXPECT_EQ(status->signal(), SIGKILL);
}

// The reaping hazards process.hpp names, as it describes them: with SIGCHLD ignored the kernel
// reaps the child itself, and a waitpid(-1) elsewhere takes it; either way wait() says ECHILD,
// the destructor does not hang, and no zombie is left.
TEST_F(process_test, ReapingHazardsGiveEchildNotAHang) {
  EXPECT_EQ(test::run_in_child([] {
              if (::signal(SIGCHLD, SIG_IGN) == SIG_ERR) return 10;
              auto c = spawn({test_child, "exit", "0"});
              if (!c) return 11;
              auto status = c->wait();
              if (status || status.error() != sys(ECHILD)) return 12;
              return 0;
            }),
            0);
  EXPECT_EQ(test::run_in_child([] {
              auto c = spawn({test_child, "exit", "0"});
              if (!c) return 20;
              int wstatus = 0;
              if (::waitpid(-1, &wstatus, 0) != c->pid()) return 21;
              auto status = c->wait();
              if (status || status.error() != sys(ECHILD)) return 22;
              return ::waitpid(-1, &wstatus, WNOHANG) == -1 && errno == ECHILD ? 0 : 23;
            }),
            0);
}

TEST_F(process_test, TheDestructorKillsAndReapsARunningChild) {
  pid_t pid = -1;
  {
    auto c = test::must(spawn({test_child, "sleep"}));
    pid = c.pid();
    ASSERT_EQ(c.channel().receive(30s)->text(), "ready");
  }
  EXPECT_EQ(::kill(pid, 0), -1);  // gone, and reaped (the fixture checks for zombies)
  EXPECT_EQ(errno, ESRCH);
}

TEST_F(process_test, MovingOverAChildReapsIt) {
  auto a = test::must(spawn({test_child, "sleep"}));
  auto b = test::must(spawn({test_child, "exit", "0"}));
  ASSERT_EQ(a.channel().receive(30s)->text(), "ready");
  a = std::move(b);  // the sleeping child is killed and reaped
  EXPECT_TRUE(a.wait(30s)->success());
}

// Parent death: the child learns of it on its channel, or dies with the parent if asked.
TEST_F(process_test, AChildLearnsOfItsParentsDeath) {
  struct scenario {
    const char* kill;
    const char* mode;
    int expect;  // shell code of the grandchild's end; 0: still running afterwards
  };
  for (const scenario s : {scenario{"kill", "sleep", 128 + SIGKILL}, scenario{"nokill", "hold", 3},
                           scenario{"nokill", "sleep", 0}}) {
    SCOPED_TRACE(std::string(s.kill) + " " + s.mode);
    const int status = test::run_in_child([&s] {
      // This process adopts orphans, so it can reap the grandchild once its parent is gone.
      if (::prctl(PR_SET_CHILD_SUBREAPER, 1) != 0) return 10;
      auto middle = spawn({test_child, "grandchild", s.kill, s.mode});
      if (!middle) return 11;
      auto pid_text = middle->channel().receive(30s);
      if (!pid_text) return 12;
      const pid_t grandchild = std::stoi(std::string(pid_text->text()));
      if (!middle->channel().send(as_bytes("go"))) return 13;
      if (!middle->wait(30s) || !middle->status()->success()) return 14;
      // The grandchild is ours now.
      const int pidfd = static_cast<int>(::syscall(SYS_pidfd_open, grandchild, 0));
      if (pidfd < 0) return 15;
      pollfd p{pidfd, POLLIN, 0};
      const int ready = ::poll(&p, 1, s.expect == 0 ? 200 : 30000);
      if (s.expect == 0) {
        if (ready != 0) return 16;  // it should still be running
        ::kill(grandchild, SIGKILL);
      }
      int wstatus = 0;
      if (::waitpid(grandchild, &wstatus, 0) != grandchild) return 17;
      ::close(pidfd);
      if (s.expect == 0) return 0;
      const int code = WIFEXITED(wstatus) ? WEXITSTATUS(wstatus) : 128 + WTERMSIG(wstatus);
      return code == s.expect ? 0 : 18;
    });
    EXPECT_EQ(status, 0);
  }
}

// --- signals across the spawn ----------------------------------------------------------------

// spawn starts the child with clone3 and CLONE_CLEAR_SIGHAND where the kernel allows it, and
// falls back to clone() where clone3 is missing or filtered (as container runtimes' seccomp
// profiles do). Each test below runs both ways: "clone3" as this machine allows, "clone" in a
// process whose seccomp filter makes clone3 fail with ENOSYS.
enum class start_path { clone3, clone };

std::string start_path_name(const ::testing::TestParamInfo<start_path>& info) {
  return info.param == start_path::clone3 ? "clone3" : "clone";
}

// Makes clone3 fail with ENOSYS in this process from now on. False if the filter cannot be set.
bool hide_clone3() {
  std::array<sock_filter, 4> code{{
      BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(seccomp_data, nr)),
      BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, 435 /* clone3 */, 0, 1),
      BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | ENOSYS),
      BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
  }};
  const sock_fprog program{static_cast<unsigned short>(code.size()), code.data()};
  return ::prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0 &&
         ::syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &program) == 0;
}

class spawn_signals_test : public test::process_checked,
                           public ::testing::WithParamInterface<start_path> {
 protected:
  // Runs fn in a forked process, with clone3 hidden there if the parameter says so.
  int run(const std::function<int()>& fn) {
    return test::run_in_child([&] {
      if (GetParam() == start_path::clone && !hide_clone3()) return 90;
      return fn();
    });
  }
};

INSTANTIATE_TEST_SUITE_P(paths, spawn_signals_test,
                         ::testing::Values(start_path::clone3, start_path::clone), start_path_name);

// The child starts with the spawning thread's signal mask and with ignored signals still
// ignored, as after posix_spawn; handlers do not survive the exec.
TEST_P(spawn_signals_test, TheMaskAndIgnoredSignalsCarryOver) {
  EXPECT_EQ(run([] {
              if (::signal(SIGUSR2, SIG_IGN) == SIG_ERR) return 10;
              sigset_t mask;
              sigemptyset(&mask);
              sigaddset(&mask, SIGWINCH);
              if (::pthread_sigmask(SIG_SETMASK, &mask, nullptr) != 0) return 11;
              auto c = spawn({test_child, "signals"});
              if (!c) return 12;
              auto m = c->channel().receive(30s);
              if (!m || !c->wait(30s) || !c->status()->success()) return 13;
              char expected[64];
              std::snprintf(expected, sizeof expected, "%016llx %016llx", 1ULL << (SIGWINCH - 1),
                            1ULL << (SIGUSR2 - 1));
              return m->text() == expected ? 0 : 14;
            }),
            0);
}

// Between the clone and the exec the child runs in its parent's memory. A handler of the
// parent's that ran there would run in the parent's memory under another pid: a signal storm
// at the whole process group must find every handler reset to its default in the child (so a
// child signalled before its exec dies of the signal, and the handler never runs there).
std::atomic<pid_t> storm_parent{0};
std::atomic<int> handler_ran_elsewhere{0};
extern "C" void note_where_the_handler_ran(int) {
  if (static_cast<pid_t>(::syscall(SYS_getpid)) != storm_parent.load()) {
    handler_ran_elsewhere.store(1);
  }
}

TEST_P(spawn_signals_test, AParentsHandlerNeverRunsInTheChild) {
  EXPECT_EQ(run([] {
              if (::setpgid(0, 0) != 0) return 10;  // the storm hits this group alone
              storm_parent.store(::getpid());
              struct sigaction sa {};
              sa.sa_handler = note_where_the_handler_ran;  // no SA_RESTART: EINTR everywhere
              if (::sigaction(SIGUSR1, &sa, nullptr) != 0) return 11;
              std::atomic<bool> stop{false};
              std::thread storm([&stop] {
                while (!stop.load()) {
                  ::kill(0, SIGUSR1);
                  std::this_thread::yield();
                }
              });
              int killed = 0;
              int failures = 0;
              for (int i = 0; i < 200; ++i) {
                auto c = spawn({test_child, "exit", "0"});
                if (!c) {
                  ++failures;
                  continue;
                }
                auto status = c->wait();
                if (!status) {
                  ++failures;
                } else if (!status->normal() && status->signal() == SIGUSR1) {
                  ++killed;  // signalled before or after its exec: either way, by default
                } else if (!status->success()) {
                  ++failures;
                }
              }
              stop.store(true);
              storm.join();
              if (failures != 0) return 12;
              if (killed == 0) return 13;  // the storm never reached a child: proves nothing
              return handler_ran_elsewhere.load() == 0 ? 0 : 14;
            }),
            0);
}

// --- inherited_channel -----------------------------------------------------------------------

// Each way DUPLEX_FD can be wrong has an error of its own, and describe_inherited_error() says
// it with the value.
TEST_F(process_test, InheritedChannelSaysWhatIsWrong) {
  auto verdicts = [](std::vector<std::string> env) {
    return run_with_env({test_child, "inherited"}, env) + " | " +
           run_with_env({test_child, "inherited-why"}, env);
  };
  const std::string unset = "no channel was inherited (DUPLEX_FD is not set)";
  EXPECT_EQ(verdicts({}), unset + " | " + unset);
  for (const std::string value :
       {"three", " 3", "3 ", "+3", "x", "3x", "", "-1", "-0", "99999999999", "2147483648"}) {
    EXPECT_EQ(verdicts({"DUPLEX_FD=" + value}),
              "DUPLEX_FD is set, but not to an fd number | DUPLEX_FD is set to '" + value +
                  "', which is not an fd number");
  }
  // Unprintable bytes are shown as escapes, and a long value is cut short.
  EXPECT_EQ(run_with_env({test_child, "inherited-why"}, {"DUPLEX_FD=3\x1b[2J\\"}),
            "DUPLEX_FD is set to '3\\x1b[2J\\x5c', which is not an fd number");
  EXPECT_EQ(run_with_env({test_child, "inherited-why"}, {"DUPLEX_FD=" + std::string(100, '7')}),
            "DUPLEX_FD is set to '" + std::string(32, '7') + "'..., which is not an fd number");
  EXPECT_EQ(verdicts({"DUPLEX_FD=99"}),
            "Bad file descriptor | DUPLEX_FD is set to '99', which is not an open fd");
  EXPECT_EQ(verdicts({"DUPLEX_FD=1"}),  // a pipe
            "Socket operation on non-socket | DUPLEX_FD is set to '1', which is not a socket");
}

// Options that channel::create refuses are refused before the end is taken: a corrected call
// still takes it and talks to the parent.
TEST_F(process_test, InheritedChannelRefusesBadOptionsWithoutTakingTheEnd) {
  EXPECT_EQ(ask({"bad-options"}), "Invalid argument");
}

TEST_F(process_test, InheritedChannelChecksTheKindAndIsTakenOnce) {
  // The child prints its verdicts on stdout: capture them through a pipe.
  auto [read_end, write_end] = test::make_pipe();
  auto capture = [&](const std::vector<std::string>& args, socket_kind kind) {
    const int status = test::run_in_child([&] {
      ::dup2(write_end.get(), 1);
      spawn_options o;
      o.kind = kind;
      std::vector<std::string> argv{test_child};
      argv.insert(argv.end(), args.begin(), args.end());
      auto c = spawn(argv, o);
      return c && c->wait(30s) && c->status()->success() ? 0 : 1;
    });
    EXPECT_EQ(status, 0);
    char buf[256];
    const ssize_t n = ::read(read_end.get(), buf, sizeof buf);
    std::string out(buf, n > 0 ? static_cast<std::size_t>(n) : 0);
    if (!out.empty() && out.back() == '\n') out.pop_back();
    return out;
  };
  EXPECT_EQ(capture({"inherited", "seqpacket"}, socket_kind::seqpacket), "ok");
  EXPECT_EQ(capture({"inherited", "stream"}, socket_kind::seqpacket),
            "wrong kind of socket for this operation");
  EXPECT_EQ(capture({"inherited-twice"}, socket_kind::stream), "ok Device or resource busy");
}

// --- credentials (class 11) ------------------------------------------------------------------

TEST_F(process_test, PeerCredentialsNameTheCreatorNotTheChild) {
  auto c = test::must(spawn({test_child, "peercred"}));
  auto m = c.channel().receive(30s);
  ASSERT_THAT(m, Succeeded());
  // In the child: SO_PEERCRED names the parent (who created the pair), as does getppid().
  const std::string expected =
      std::to_string(::getpid()) + " " + std::to_string(c.pid()) + " " + std::to_string(::getpid());
  EXPECT_EQ(m->text(), expected);
  // In the parent: its own pid, not the child's. The child is known by its pid and pidfd.
  EXPECT_EQ(c.channel().peer_credentials()->pid, ::getpid());
  EXPECT_TRUE(c.wait(30s)->success());
}

// --- fork_with_channel -----------------------------------------------------------------------

TEST_P(process_kind_test, ForkWithChannelRunsTheTutorialsPattern) {
  fork_options o;
  o.kind = GetParam();
  auto c = fork_with_channel(
      [](channel& parent) {
        if (!parent.send(as_bytes("Hello from child process!"))) return 1;
        auto reply = parent.receive();
        return reply && reply->text() == "Hello from parent process!" ? 0 : 2;
      },
      o);
  ASSERT_THAT(c, Succeeded());
  EXPECT_EQ(c->channel().receive(30s)->text(), "Hello from child process!");
  ASSERT_THAT(c->channel().send(as_bytes("Hello from parent process!")), Succeeded());
  auto status = c->wait(30s);
  ASSERT_THAT(status, Succeeded());
  EXPECT_TRUE(status->success()) << status->describe();
}

TEST_F(process_test, ForkWithChannelReportsAThrowingFunction) {
  auto c = fork_with_channel([](channel&) -> int { throw std::runtime_error("boom"); });
  ASSERT_THAT(c, Succeeded());
  EXPECT_EQ(c->wait(30s)->code(), 70);
  EXPECT_THAT(c->channel().receive(30s), HasError(errc::peer_closed));
}

// Parent death with fork_with_channel (class 10), as AChildLearnsOfItsParentsDeath does for
// spawn. A subreaper forks a middle process, which forks a grandchild with fork_with_channel and
// exits. The grandchild blocks in receive on its channel (end-of-stream when the middle dies),
// then in receive on the middle's channel to the subreaper (end-of-stream only when the
// subreaper closes its end, which it does after reaping the middle: by then the middle's death
// has sent any PR_SET_PDEATHSIG signal). So with kill_on_parent_death the grandchild dies of
// SIGKILL, and without it it sees peer_closed twice and exits 3, with no race either way.
TEST_F(process_test, ForkWithChannelKillsTheChildOnParentDeathOnlyIfAsked) {
  for (const bool kill : {true, false}) {
    SCOPED_TRACE(kill ? "kill_on_parent_death" : "no kill_on_parent_death");
    const int code = test::run_in_child([kill] {
      // This process adopts orphans, so it can reap the grandchild once its parent is gone.
      if (::prctl(PR_SET_CHILD_SUBREAPER, 1) != 0) return 10;
      auto middle = fork_with_channel([kill](channel& up) {
        fork_options o;
        o.kill_on_parent_death = kill;
        auto grandchild = fork_with_channel(
            [&up](channel& down) {
              if (!down.send(as_bytes("ready"))) return 4;
              auto first = down.receive();  // until the middle process dies
              auto second = up.receive();   // until the subreaper closes its end
              if (first || first.error() != errc::peer_closed) return 5;
              return !second && second.error() == errc::peer_closed ? 3 : 6;
            },
            o);
        if (!grandchild) return 1;
        // "ready": the grandchild is past its PR_SET_PDEATHSIG, inside the function.
        auto ready = grandchild->channel().receive(30s);
        if (!ready || ready->text() != "ready") return 2;
        if (!up.send(as_bytes(std::to_string(grandchild->pid())))) return 3;
        // Leave without the child's destructor (which would kill and reap the grandchild).
        std::fflush(nullptr);
        ::_exit(0);
      });
      if (!middle) return 11;
      auto pid_text = middle->channel().receive(30s);
      if (!pid_text) return 12;
      const pid_t grandchild = std::stoi(std::string(pid_text->text()));
      auto status = middle->wait(30s);
      if (!status || !status->success()) return 13;
      middle->channel().close();                   // the grandchild's second receive ends
      const int wstatus = test::reap(grandchild);  // ours now: we are its subreaper
      if (wstatus == -1) return 14;
      if (!test::child_processes().empty()) return 15;
      return WIFEXITED(wstatus) ? WEXITSTATUS(wstatus) : 128 + WTERMSIG(wstatus);
    });
    EXPECT_EQ(code, kill ? 128 + SIGKILL : 3);
  }
}

// --- many spawns under load (classes 9, 10) --------------------------------------------------

TEST_F(process_test, AThousandSpawnsWhileEightThreadsUseChannels) {
  std::atomic<bool> stop{false};
  std::atomic<long> exchanged{0};
  std::vector<std::thread> busy;
  for (int t = 0; t < 8; ++t) {
    busy.emplace_back([&] {
      auto ends = test::must(channel_pair(socket_kind::stream));
      auto [read_end, write_end] = test::make_pipe();
      const std::array<int, 1> fds{read_end.get()};
      while (!stop.load()) {
        if (!ends.first.send(as_bytes("ping"), fds)) return;
        auto m = ends.second.receive();
        if (!m || m->fds().size() != 1) return;
        ++exchanged;
      }
    });
  }
  int ok = 0;
  for (int i = 0; i < 1000; ++i) {
    auto c = spawn({"true"});
    if (!c) {
      ADD_FAILURE() << "spawn " << i << ": " << c.error().message();
      break;
    }
    auto status = c->wait(30s);
    if (status && status->success()) ++ok;
  }
  stop = true;
  for (auto& t : busy)
    t.join();
  EXPECT_EQ(ok, 1000);
  EXPECT_GT(exchanged.load(), 0);
}

}  // namespace
}  // namespace duplex
