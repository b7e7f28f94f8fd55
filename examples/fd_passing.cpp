// Passing an open file to a forked child: the fd travels with a message (SCM_RIGHTS).
//
// The parent writes a line into an anonymous file (memfd_create) and sends the open fd over a
// seqpacket channel; the child reads the file through the fd it received. What the child gets
// is a new fd number for the same open file, not a copy of the number: the parent may close its
// own fd as soon as send() returns. The two fds share one file offset, which the parent's write
// left at the end, so the child seeks back to the start before reading.
//
// What duplex adds over raw sendmsg/recvmsg: the fd arrives close-on-exec and owned by a
// unique_fd (closed if nobody takes it), the message and its fds arrive together or not at all,
// and a receive that times out or fails never leaks an fd.
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cstdlib>
#include <iostream>
#include <string>
#include <string_view>

#include "duplex/duplex.hpp"

namespace {

int fail(const char* what, std::error_code ec) {
  std::cerr << what << ": " << ec.message() << '\n';
  return EXIT_FAILURE;
}

std::error_code last_error() { return {errno, std::system_category()}; }

// The child: receives the fd, reads the file through it, and says what it read.
int child(duplex::channel& parent) {
  auto m = parent.receive();
  if (!m) return fail("Child: receive", m.error());
  std::cout << "Child: Received \"" << m->text() << "\" with " << m->fds().size() << " fd"
            << std::endl;
  if (m->fds().size() != 1) return EXIT_FAILURE;
  const duplex::unique_fd file = std::move(m->take_fds().front());  // closed when we return

  if (::lseek(file.get(), 0, SEEK_SET) < 0) return fail("Child: lseek", last_error());
  std::array<char, 256> buf{};
  const ssize_t n = ::read(file.get(), buf.data(), buf.size());
  if (n < 0) return fail("Child: read", last_error());
  std::string line(buf.data(), static_cast<std::size_t>(n));
  if (!line.empty() && line.back() == '\n') line.pop_back();
  std::cout << "Child: read through the passed fd: " << line << std::endl;

  const std::string reply = "read " + std::to_string(n) + " bytes";
  if (auto r = parent.send(duplex::as_bytes(reply)); !r) return fail("Child: send", r.error());
  return EXIT_SUCCESS;
}

}  // namespace

int run() {
  // A file with a known line in it. MFD_CLOEXEC: an exec'd program would not inherit it.
  duplex::unique_fd file{::memfd_create("duplex-fd-passing", MFD_CLOEXEC)};
  if (!file.valid()) return fail("memfd_create", last_error());
  constexpr std::string_view line = "The quick brown fox jumps over the lazy dog.\n";
  if (::write(file.get(), line.data(), line.size()) != static_cast<ssize_t>(line.size())) {
    return fail("write", last_error());
  }

  // Seqpacket: each message is one packet, and fds ride with it.
  auto ends = duplex::channel_pair(duplex::socket_kind::seqpacket);
  if (!ends) return fail("channel_pair", ends.error());

  const pid_t pid = ::fork();
  if (pid < 0) return fail("fork", last_error());

  if (pid == 0) {         // child: keeps the second end
    ends->first.close();  // this process's copy only; the parent keeps its end
    ::_exit(child(ends->second));
  }

  // parent: keeps the first end
  ends->second.close();
  duplex::channel& child_end = ends->first;
  std::cout << "Parent: Sending the fd of a file holding: " << line.substr(0, line.size() - 1)
            << std::endl;
  const int fds[] = {file.get()};
  if (auto r = child_end.send(duplex::as_bytes("here is a file"), fds); !r) {
    return fail("Parent: send", r.error());
  }
  file.reset();  // our fd only: the child's fd, in flight or received, stays valid
  std::cout << "Parent: Closed its own fd after sending." << std::endl;

  // No timeout needed: if the child dies, its end closes and this returns errc::peer_closed.
  auto reply = child_end.receive();
  if (!reply) return fail("Parent: receive", reply.error());
  std::cout << "Parent: Child replied: " << reply->text() << std::endl;

  int status = 0;
  while (::waitpid(pid, &status, 0) < 0) {
    if (errno != EINTR) return fail("waitpid", last_error());
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
    std::cerr << "fd_passing: output lost\n";
    return EXIT_FAILURE;
  }
  return status;
}
