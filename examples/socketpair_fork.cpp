// The tutorial's first program with duplex: a parent and a forked child talk over a stream pair.
//
// What changed from the raw version: both ends are close-on-exec, a write to a dead peer returns
// an error instead of killing the process with SIGPIPE, partial writes and EINTR are handled, and
// each message is read whole: the sender half-closes (shutdown of its write side) so the reader
// reads until end-of-stream instead of hoping one read() returns the whole message.
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cstdlib>
#include <iostream>
#include <string>

#include "duplex/duplex.hpp"

namespace {

// Reads until the peer's end-of-stream.
duplex::result<std::string> read_all(duplex::socket& s) {
  std::string text;
  std::array<std::byte, 256> buf{};
  for (;;) {
    auto n = s.receive(buf);
    if (!n) {
      if (n.error() == duplex::errc::peer_closed) return text;
      return std::unexpected(n.error());
    }
    text += duplex::as_string_view(std::span(buf).first(*n));
  }
}

// Sends one message and half-closes: the peer reads it whole, then end-of-stream.
duplex::result<void> send_and_finish(duplex::socket& s, std::string_view message) {
  if (auto r = s.send_all(duplex::as_bytes(message)); !r) return r;
  return s.shutdown(duplex::shutdown_how::write);
}

int fail(const char* what, std::error_code ec) {
  std::cerr << what << ": " << ec.message() << '\n';
  return EXIT_FAILURE;
}

}  // namespace

int run() {
  auto pair = duplex::socket_pair(duplex::socket_kind::stream);
  if (!pair) return fail("socketpair", pair.error());
  std::cout << "Socket pair created: fds " << pair->first.native_handle() << " and "
            << pair->second.native_handle() << std::endl;

  const pid_t pid = ::fork();
  if (pid < 0) return fail("fork", {errno, std::system_category()});

  if (pid == 0) {  // child: keeps the second end
    pair->first.close();
    std::cout << "Child: Sending message to parent..." << std::endl;
    if (auto r = send_and_finish(pair->second, "Hello from child process!"); !r) {
      ::_exit(fail("Child: send", r.error()));
    }
    auto reply = read_all(pair->second);
    if (!reply) ::_exit(fail("Child: receive", reply.error()));
    std::cout << "Child: Received from parent: " << *reply << std::endl;
    ::_exit(EXIT_SUCCESS);
  }

  // parent: keeps the first end
  pair->second.close();
  auto message = read_all(pair->first);
  if (!message) return fail("Parent: receive", message.error());
  std::cout << "Parent: Received from child: " << *message << std::endl;
  if (auto r = send_and_finish(pair->first, "Hello from parent process!"); !r) {
    return fail("Parent: send", r.error());
  }
  std::cout << "Parent: Message sent." << std::endl;

  int status = 0;
  while (::waitpid(pid, &status, 0) < 0) {
    if (errno != EINTR) return fail("waitpid", {errno, std::system_category()});
  }
  if (WIFEXITED(status)) {
    std::cout << "Parent: Child exited with status " << WEXITSTATUS(status) << '.' << std::endl;
    return WEXITSTATUS(status);
  }
  std::cout << "Parent: Child did not exit normally." << std::endl;
  return EXIT_FAILURE;
}

// What the example printed is its result: output that could not be written (a full disk, a
// closed pipe) is a failure, not an exit status of 0.
int main() {
  const int status = run();
  if (!std::cout.flush()) {
    std::cerr << "socketpair_fork: output lost\n";
    return EXIT_FAILURE;
  }
  return status;
}
