// One program, two roles: a parent that spawns itself as a worker and talks to it over a channel.
//
// Run plainly, this is the parent. duplex::spawn starts /proc/self/exe (this very program) with
// the argument "worker", holding one end of a new stream pair, and returns a duplex::child whose
// channel() is the other end. The worker finds its end with duplex::inherited_channel(): spawn put
// it at fd 3 and named it in the DUPLEX_FD environment variable.
//
// Each request is a typed value (send_value / receive_value with the built-in codec): a number
// to square. When the parent has no more requests it half-closes its side (shutdown_send); the
// worker receives every request sent before that, then errc::peer_closed, and exits 0. The
// parent can still read the worker's last replies after the half-close, and then reaps the worker
// with wait(), which says how it ended (an exit code, or the signal that killed it).
//
// What spawn adds over fork + exec by hand: the parent's memory is not copied, the child inherits
// its end and nothing else (every other fd is closed, signal handlers are reset), and a program
// that cannot be started is an error spawn returns (ENOENT below), not a child that exits 127
// and leaves the parent guessing. A duplex::child is never left a zombie: if the parent returns
// early, its destructor kills and reaps the worker.
#include <cstdint>
#include <cstdlib>
#include <iostream>
#include <string>
#include <string_view>
#include <system_error>

#include "duplex/duplex.hpp"

namespace {

int fail(const char* what, std::error_code ec) {
  std::cerr << what << ": " << ec.message() << '\n';
  return EXIT_FAILURE;
}

// The worker: squares each number it receives, until the parent closes its sending side.
int worker() {
  auto parent = duplex::inherited_channel();
  if (!parent) {
    // The error in words that name DUPLEX_FD and its value ("DUPLEX_FD is set to 'x', which is
    // not an fd number").
    std::cerr << "Worker: no inherited channel (run me without arguments): "
              << duplex::describe_inherited_error(parent.error()) << '\n';
    return EXIT_FAILURE;
  }
  int answered = 0;
  for (;;) {
    // A 32-bit request and a 64-bit reply: no value the parent sends can overflow the square.
    auto n = parent->receive_value<std::int32_t>();
    if (!n) {
      if (n.error() == duplex::errc::peer_closed) break;  // every request has been answered
      return fail("Worker: receive", n.error());
    }
    const std::int64_t square = std::int64_t{*n} * *n;
    if (auto r = parent->send_value(square); !r) return fail("Worker: send", r.error());
    ++answered;
  }
  std::cout << "Worker: End of requests after " << answered << " answers; exiting with 0."
            << std::endl;
  return EXIT_SUCCESS;
}

int parent() {
  // A failure handled first: a program that does not exist. spawn learns of the failed exec
  // before it returns, and reports its errno; no child is left behind.
  const std::string missing = "/nonexistent/duplex-worker";
  if (auto bad = duplex::spawn({missing}); !bad) {
    const bool enoent = bad.error() == std::errc::no_such_file_or_directory;
    std::cout << "Parent: Cannot start " << missing << ": " << bad.error().message()
              << (enoent ? " (ENOENT, reported by spawn)" : "") << std::endl;
  } else {
    std::cerr << "Parent: " << missing << " started?\n";
    return EXIT_FAILURE;
  }

  // The destructor of a duplex::child kills and reaps the worker, but a parent ended by a signal
  // (SIGTERM, SIGKILL) runs no destructor: kill_on_parent_death has the kernel kill the worker
  // then, rather than leave it orphaned. It is tied to the spawning thread: the main thread.
  duplex::spawn_options options;
  options.kill_on_parent_death = true;
  auto worker = duplex::spawn({"/proc/self/exe", "worker"}, options);
  if (!worker) return fail("Parent: spawn", worker.error());
  std::cout << "Parent: Started worker, pid " << worker->pid() << std::endl;
  duplex::channel& ch = worker->channel();

  for (const std::int32_t n : {7, -12, 46341}) {
    if (auto r = ch.send_value(n); !r) return fail("Parent: send", r.error());
    // If the worker died instead of answering, this returns errc::peer_closed: no hang.
    auto square = ch.receive_value<std::int64_t>();
    if (!square) return fail("Parent: receive", square.error());
    std::cout << "Parent: " << n << " squared is " << *square << std::endl;
  }

  // No more requests: the worker sees end-of-stream after the last one and exits.
  if (auto r = ch.shutdown_send(); !r) return fail("Parent: shutdown_send", r.error());
  auto status = worker->wait();
  if (!status) return fail("Parent: wait", status.error());
  std::cout << "Parent: Worker " << status->describe() << '.' << std::endl;
  return status->success() ? EXIT_SUCCESS : EXIT_FAILURE;
}

}  // namespace

int run(int argc, char** argv) {
  if (argc == 1) return parent();
  if (argc == 2 && std::string_view(argv[1]) == "worker") return worker();
  std::cerr << "usage: " << argv[0] << "   (the parent starts itself as '" << argv[0]
            << " worker')\n";
  return 2;
}

// What the example printed is its result: output that could not be written (a full disk, a
// closed pipe) is a failure, not an exit status of 0.
int main(int argc, char** argv) {
  const int status = run(argc, argv);
  if (!std::cout.flush()) {
    std::cerr << "spawn_worker: output lost\n";
    return EXIT_FAILURE;
  }
  return status;
}
