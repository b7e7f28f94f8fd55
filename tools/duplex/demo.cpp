// duplex demo: the socketpair tutorial's three scenarios, done with the library.
#include <fmt/core.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cstdio>
#include <optional>
#include <string>
#include <system_error>
#include <thread>

#include "commands.hpp"
#include "duplex/duplex.hpp"
#include "report.hpp"

namespace duplex::cli {
namespace {

// One line on stdout, flushed at once so that the parent's and the child's lines interleave in
// the order they happened. A write error is kept and reported when the command ends.
void say(std::string_view line) {
  static_cast<void>(write_stdout(fmt::format("{}\n", line)));
  static_cast<void>(flush_stdout());
}

// Reads a stream until the peer's end-of-stream: the whole message, however the kernel cut it.
result<std::string> read_to_end(socket& s) {
  std::string out;
  std::array<std::byte, 256> buf{};
  for (;;) {
    auto n = s.receive(buf);
    if (!n) {
      if (n.error() == errc::peer_closed) return out;
      return std::unexpected(n.error());
    }
    out += as_string_view(std::span(buf).first(*n));
  }
}

// The child's side of the fork scenario; returns its exit status.
int fork_child(socket& s) {
  say("Child: sending message to parent...");
  if (auto r = s.send_all(as_bytes("Hello from child process!")); !r) {
    return report_failure("demo fork: child: send", r.error());
  }
  // Half-close: the parent sees end-of-stream after our message, and can still reply.
  if (auto r = s.shutdown(shutdown_how::write); !r) {
    return report_failure("demo fork: child: shutdown", r.error());
  }
  auto reply = read_to_end(s);
  if (!reply) return report_failure("demo fork: child: receive", reply.error());
  say(fmt::format("Child: received from parent: {}", *reply));
  return 0;
}

int demo_fork() {
  say("== fork: a parent and a forked child over a stream pair ==");
  auto pair = socket_pair(socket_kind::stream);
  if (!pair) return report_failure("demo fork: socketpair", pair.error());
  static_cast<void>(flush_stdout());  // nothing buffered is left to be written twice
  const pid_t pid = ::fork();
  if (pid < 0)
    return report_failure("demo fork: fork", std::error_code(errno, std::system_category()));
  if (pid == 0) {
    pair->first.close();
    // The child's lines are output of the command too: their loss is the child's failure.
    ::_exit(finish_output(fork_child(pair->second)));
  }
  pair->second.close();
  socket& s = pair->first;
  auto message = read_to_end(s);
  if (!message) return report_failure("demo fork: parent: receive", message.error());
  say(fmt::format("Parent: received from child: {}", *message));
  say("Parent: sending reply to child...");
  if (auto r = s.send_all(as_bytes("Hello from parent process!")); !r) {
    return report_failure("demo fork: parent: send", r.error());
  }
  s.close();
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0) {
    if (errno != EINTR)
      return report_failure("demo fork: waitpid", std::error_code(errno, std::system_category()));
  }
  // Status 1 is a failure the child has reported on stderr itself; one line says it.
  if (WIFEXITED(status) && WEXITSTATUS(status) == 1) return 1;
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    return report_failure(
        fmt::format("demo fork: child did not exit cleanly (status {:#x})", status));
  }
  say("Parent: child exited with status 0.");
  return 0;
}

int demo_dgram() {
  say("== dgram: two datagrams of different lengths keep their boundaries ==");
  auto pair = socket_pair(socket_kind::datagram);
  if (!pair) return report_failure("demo dgram: socketpair", pair.error());
  auto& [a, b] = *pair;
  const std::array<std::string_view, 2> messages = {"First message",
                                                    "Second message is longer than the first one."};
  for (auto m : messages) {
    if (auto r = a.send(as_bytes(m)); !r) return report_failure("demo dgram: send", r.error());
  }
  say("Sent two datagrams.");
  std::array<std::byte, 256> buf{};
  for (std::size_t i = 0; i < messages.size(); ++i) {
    auto n = b.receive(buf);
    if (!n) return report_failure("demo dgram: receive", n.error());
    const auto text = as_string_view(std::span(buf).first(*n));
    say(fmt::format("Received message {} ({} bytes): {}", i + 1, *n, text));
    if (text != messages[i]) return report_failure("demo dgram: a datagram lost its boundaries");
  }
  // What raw read() would do silently, duplex reports: a datagram larger than the buffer.
  if (auto r = a.send(as_bytes(messages[1])); !r)
    return report_failure("demo dgram: send", r.error());
  std::array<std::byte, 8> small{};
  auto cut = b.receive(small);
  if (cut || cut.error() != errc::buffer_too_small) {
    return report_failure("demo dgram: a datagram larger than the buffer was not reported");
  }
  say(fmt::format("A {}-byte datagram into an 8-byte buffer: {}", messages[1].size(),
                  cut.error().message()));
  return 0;
}

// What failed on one side of the threads scenario, reported once both sides are done.
struct side_failure {
  std::string what;
  std::error_code ec;
};

int demo_threads() {
  say("== threads: a thread and the main thread over a seqpacket pair ==");
  auto pair = socket_pair(socket_kind::seqpacket);
  if (!pair) return report_failure("demo threads: socketpair", pair.error());
  auto& [main_end, thread_end] = *pair;
  // A side that fails closes its end, so that the other is not left waiting; the other's failure
  // (peer_closed) is then only the echo of the first one, which alone is reported.
  std::optional<side_failure> thread_failed;
  std::thread worker([&thread_end, &thread_failed] {
    say("Thread: sending message...");
    if (auto r = thread_end.send(as_bytes("Message from thread")); !r) {
      thread_failed = side_failure{"demo threads: thread: send", r.error()};
      thread_end.close();
      return;
    }
    std::array<std::byte, 128> buf{};
    auto n = thread_end.receive(buf, std::chrono::seconds(10));
    if (!n) {
      thread_failed = side_failure{"demo threads: thread: receive", n.error()};
      thread_end.close();
      return;
    }
    say(fmt::format("Thread: received reply: {}", as_string_view(std::span(buf).first(*n))));
  });
  std::optional<side_failure> main_failed;
  std::array<std::byte, 128> buf{};
  auto n = main_end.receive(buf, std::chrono::seconds(10));
  if (!n) {
    main_failed = side_failure{"demo threads: main: receive", n.error()};
  } else {
    say(fmt::format("Main: received from thread: {}", as_string_view(std::span(buf).first(*n))));
    if (auto r = main_end.send(as_bytes("Reply from main")); !r) {
      main_failed = side_failure{"demo threads: main: send", r.error()};
    }
  }
  if (main_failed) main_end.close();
  worker.join();
  const bool main_is_echo = main_failed && thread_failed && main_failed->ec == errc::peer_closed;
  if (main_failed && !main_is_echo) return report_failure(main_failed->what, main_failed->ec);
  if (thread_failed) return report_failure(thread_failed->what, thread_failed->ec);
  return 0;
}

}  // namespace

int run_demo(std::string_view scenario) {
  if (scenario == "fork") return demo_fork();
  if (scenario == "dgram") return demo_dgram();
  if (scenario == "threads") return demo_threads();
  for (auto* run : {&demo_fork, &demo_dgram, &demo_threads}) {
    if (const int status = run(); status != 0) return status;
  }
  return 0;
}

}  // namespace duplex::cli
