// duplex_test_child: the program the process tests spawn. It finds its end with
// inherited_channel() and does what its first argument says:
//
//   echo            send every message back until the parent's end-of-stream; exit 0
//   fds             send the list of open fds (from /proc/self/fd), one message; exit 0
//   env NAME        send the value of NAME ("<unset>" if unset); exit 0
//   cwd             send the working directory; exit 0
//   stdio           send what fds 0, 1 and 2 refer to, space-separated; exit 0
//   exit N          exit with code N at once (without touching the channel)
//   crash           die of SIGSEGV
//   hold            send "ready", then wait for the parent's end-of-stream; exit 3 on it
//   sleep           send "ready", then sleep until killed, never looking at the channel
//   grandchild KILL MODE
//                   spawn this program in MODE (hold or sleep), with kill_on_parent_death if
//                   KILL is "kill"; send its pid; wait for any message from the parent; then
//                   exit 0 at once, leaving the grandchild running and orphaned
//   inherited [stream|seqpacket]
//                   report the error inherited_channel() gives ("ok" if none) on stdout
//   inherited-why   as inherited, in the words of describe_inherited_error()
//   inherited-twice report what a second inherited_channel() call gives, on stdout
//   bad-options     call inherited_channel() with max_message_size 0, then with the defaults;
//                   send the first call's error message over the channel the second one took
//   cloexec         send "1" if its end is close-on-exec after inherited_channel(), else "0"
//   peercred        send "<SO_PEERCRED pid> <own pid> <parent pid>"
//   signals         send its blocked and ignored signal sets, the hex masks of /proc/self/status:
//                   "<SigBlk> <SigIgn>"
#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <climits>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "duplex/duplex.hpp"

namespace {

std::string link_of(const std::string& path) {
  std::error_code ec;
  auto target = std::filesystem::read_symlink(path, ec);
  return ec ? std::string("?") : target.string();
}

int run(const std::vector<std::string>& args) {
  const std::string mode = args.empty() ? "" : args[0];
  if (mode == "exit") return std::atoi(args.at(1).c_str());
  if (mode == "crash") {
    ::signal(SIGSEGV, SIG_DFL);
    ::raise(SIGSEGV);
    return 1;
  }
  if (mode == "inherited" || mode == "inherited-why") {
    duplex::inherited_options o;
    if (args.size() > 1)
      o.kind =
          args[1] == "seqpacket" ? duplex::socket_kind::seqpacket : duplex::socket_kind::stream;
    auto c = duplex::inherited_channel(o);
    const std::string verdict = c ? "ok"
                                : mode == "inherited-why"
                                    ? duplex::describe_inherited_error(c.error())
                                    : c.error().message();
    std::printf("%s\n", verdict.c_str());
    return 0;
  }
  if (mode == "bad-options") {
    duplex::inherited_options bad;
    bad.channel.max_message_size = 0;
    auto first = duplex::inherited_channel(bad);
    if (first) return 108;
    auto second = duplex::inherited_channel();
    if (!second) {
      std::fprintf(stderr, "duplex_test_child: inherited_channel after %s: %s\n",
                   first.error().message().c_str(), second.error().message().c_str());
      return 109;
    }
    return second->send(duplex::as_bytes(first.error().message())) ? 0 : 101;
  }
  if (mode == "inherited-twice") {
    auto first = duplex::inherited_channel();
    auto second = duplex::inherited_channel();
    std::printf("%s %s\n", first ? "ok" : first.error().message().c_str(),
                second ? "ok" : second.error().message().c_str());
    return 0;
  }
  auto parent = duplex::inherited_channel();
  if (!parent) {
    std::fprintf(stderr, "duplex_test_child: inherited_channel: %s\n",
                 parent.error().message().c_str());
    return 100;
  }
  auto reply = [&](const std::string& text) {
    return parent->send(duplex::as_bytes(text)) ? 0 : 101;
  };
  if (mode == "echo") {
    for (;;) {
      auto m = parent->receive();
      if (!m) return m.error() == duplex::errc::peer_closed ? 0 : 102;
      if (!parent->send(*m)) return 103;
    }
  }
  if (mode == "fds") {
    std::string list;
    std::vector<int> fds;
    for (const auto& entry : std::filesystem::directory_iterator("/proc/self/fd")) {
      fds.push_back(std::stoi(entry.path().filename().string()));
    }
    // The directory iterator's own fd is in the list; it is closed by now.
    for (int fd : fds) {
      if (::fcntl(fd, F_GETFD) == -1) continue;
      if (!list.empty()) list.push_back(' ');
      list.append(std::to_string(fd));
    }
    return reply(list);
  }
  if (mode == "env") {
    const char* v = std::getenv(args.at(1).c_str());
    return reply(v != nullptr ? v : "<unset>");
  }
  if (mode == "cwd") {
    char buf[PATH_MAX];
    return reply(::getcwd(buf, sizeof buf) != nullptr ? buf : "?");
  }
  if (mode == "stdio") {
    return reply(link_of("/proc/self/fd/0") + " " + link_of("/proc/self/fd/1") + " " +
                 link_of("/proc/self/fd/2"));
  }
  if (mode == "hold") {
    if (reply("ready") != 0) return 101;
    auto m = parent->receive();
    return m ? 104 : 3;
  }
  if (mode == "cloexec") {
    const int flags = ::fcntl(parent->native_handle(), F_GETFD);
    return reply((flags & FD_CLOEXEC) != 0 ? "1" : "0");
  }
  if (mode == "peercred") {
    auto cred = parent->peer_credentials();
    if (!cred) return 107;
    return reply(std::to_string(cred->pid) + " " + std::to_string(::getpid()) + " " +
                 std::to_string(::getppid()));
  }
  if (mode == "signals") {
    std::ifstream status("/proc/self/status");
    std::string line;
    std::string blocked = "?";
    std::string ignored = "?";
    while (std::getline(status, line)) {
      if (line.starts_with("SigBlk:")) blocked = line.substr(line.find_first_not_of(" \t", 7));
      if (line.starts_with("SigIgn:")) ignored = line.substr(line.find_first_not_of(" \t", 7));
    }
    return reply(blocked + " " + ignored);
  }
  if (mode == "sleep") {
    if (reply("ready") != 0) return 101;
    for (;;)
      ::pause();
  }
  if (mode == "grandchild") {
    duplex::spawn_options o;
    o.kill_on_parent_death = args.at(1) == "kill";
    const auto self = std::filesystem::read_symlink("/proc/self/exe").string();
    auto g = duplex::spawn({self, args.at(2)}, o);
    if (!g) return 105;
    auto ready = g->channel().receive();
    if (!ready || ready->text() != "ready") return 106;
    if (reply(std::to_string(g->pid())) != 0) return 101;
    static_cast<void>(parent->receive());
    // Leave without the child's destructor (which would kill and reap the grandchild).
    std::fflush(nullptr);
    ::_exit(0);
  }
  std::fprintf(stderr, "duplex_test_child: unknown mode '%s'\n", mode.c_str());
  return 99;
}

}  // namespace

int main(int argc, char** argv) { return run(std::vector<std::string>(argv + 1, argv + argc)); }
