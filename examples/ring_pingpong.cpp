// A parent and a forked child play ping-pong through duplex::ring_channel: messages travel in
// shared memory, and with busy_poll both ends spin on the ring instead of sleeping in the kernel.
// The child echoes; the parent times 100,000 round trips and prints their mean. Then it closes,
// and the child, having read everything, sees peer_closed and exits. (Without busy_poll each end
// would sleep on a wake socket as soon as its ring is empty: a round trip then costs about what a
// socket's does.)
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>

#include "duplex/duplex.hpp"

namespace {

using namespace std::chrono_literals;

int child(duplex::socket s) {
  duplex::ring_options o;
  o.busy_poll = 10ms;  // spin up to 10 ms before sleeping: while the parent plays, never sleep
  auto ch = duplex::ring_channel::create(std::move(s), o);
  if (!ch) return 1;
  std::size_t echoed = 0;
  for (;;) {
    auto m = ch->receive();
    if (!m) {
      if (m.error() != duplex::errc::peer_closed) return 2;
      std::printf("Child: peer_closed after echoing %zu messages\n", echoed);
      return 0;
    }
    if (!ch->send(std::as_const(*m).bytes())) return 3;
    ++echoed;
  }
}

// Mean round trip of n pings, in nanoseconds; -1 if an echo is wrong.
double play(duplex::ring_channel& ch, int n) {
  char ping[8] = "ping";
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < n; ++i) {
    std::memcpy(ping + 4, &i, 4);
    if (!ch.send(duplex::as_bytes(std::string_view(ping, 8)))) return -1;
    auto m = ch.receive(5s);
    if (!m || m->size() != 8 || std::memcmp(std::as_const(*m).bytes().data(), ping, 8) != 0) {
      return -1;
    }
  }
  const std::chrono::duration<double, std::nano> took = std::chrono::steady_clock::now() - start;
  return took.count() / n;
}

}  // namespace

int run() {
  auto pair = duplex::socket_pair(duplex::socket_kind::stream);
  if (!pair) {
    std::fprintf(stderr, "socket_pair: %s\n", pair.error().message().c_str());
    return 1;
  }
  std::fflush(nullptr);
  const pid_t pid = ::fork();
  if (pid < 0) return 1;
  if (pid == 0) {
    pair->first.close();
    const int code = child(std::move(pair->second));
    std::fflush(nullptr);  // _exit does not flush stdio
    ::_exit(code);
  }
  pair->second.close();

  duplex::ring_options o;
  o.busy_poll = 10ms;
  auto ch = duplex::ring_channel::create(std::move(pair->first), o);
  if (!ch) {
    std::fprintf(stderr, "ring_channel::create: %s\n", ch.error().message().c_str());
    return 1;
  }
  const double spinning = play(*ch, 100000);
  if (spinning < 0) {
    std::fprintf(stderr, "a wrong echo\n");
    return 1;
  }
  std::printf("Parent: 100000 round trips, spinning: %.2f us each\n", spinning / 1000);
  ch->close();
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  std::printf("Parent: Child exited with status %d.\n",
              WIFEXITED(status) ? WEXITSTATUS(status) : -1);
  return WIFEXITED(status) && WEXITSTATUS(status) == 0 ? 0 : 1;
}

// What the example printed is its result: output that could not be written (a full disk, a
// closed pipe) is a failure, not an exit status of 0.
int main() {
  const int status = run();
  if (std::fflush(stdout) != 0 || std::ferror(stdout) != 0) {
    std::fprintf(stderr, "ring_pingpong: output lost\n");
    return 1;
  }
  return status;
}
