// A C++ parent and a Python worker: duplex speaks CPython's multiprocessing.connection framing.
//
// The parent spawns `python3 python_worker.py` holding one end of a stream pair, with the
// channel's format set to framing::python: each message is a 4-byte big-endian length followed
// by the payload, exactly what Connection.send_bytes writes and recv_bytes reads (a stream pair,
// spawn's default, is what that framing needs). The worker wraps the end that DUPLEX_FD names as
// Connection(int(os.environ["DUPLEX_FD"])) and answers each line of text with its word count and
// the text upper-cased.
//
// One message is over 16 KiB: above that size CPython writes the length and the payload with
// two separate writes, and the reply comes back the same way. The channel reassembles a frame
// however the bytes arrive, so the parent always receives whole messages.
//
// When the parent has sent everything it half-closes (shutdown_send): the worker's recv_bytes
// raises EOFError after the last request, the worker exits 0, and the parent reaps it with
// wait(). If python3 cannot be found, spawn itself fails with ENOENT; no child is left behind.
//
// Usage: python_parent [PYTHON]   (PYTHON defaults to python3, searched in PATH)
#include <cctype>
#include <cstdlib>
#include <iostream>
#include <string>
#include <system_error>

#include "duplex/duplex.hpp"

#ifndef DUPLEX_PYTHON_WORKER
#error "DUPLEX_PYTHON_WORKER must name examples/python_worker.py (examples/CMakeLists.txt sets it)"
#endif

namespace {

int fail(const char* what, std::error_code ec) {
  std::cerr << what << ": " << ec.message() << '\n';
  return EXIT_FAILURE;
}

// The reply python_worker.py gives: "N words: TEXT IN UPPER CASE" (for ASCII text).
std::string expected_reply(const std::string& text) {
  std::size_t words = 0;
  bool in_word = false;
  std::string upper;
  for (const char c : text) {
    const bool space = std::isspace(static_cast<unsigned char>(c)) != 0;
    if (!space && !in_word) ++words;
    in_word = !space;
    upper += static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  }
  return std::to_string(words) + (words == 1 ? " word: " : " words: ") + upper;
}

}  // namespace

int run(int argc, char** argv) {
  const std::string python = argc > 1 ? argv[1] : "python3";
  duplex::spawn_options options;
  options.channel.format = duplex::framing::python;  // CPython's framing, on a stream pair
  // A parent ended by a signal (SIGTERM, SIGKILL) runs no destructor, which would kill and reap
  // the worker: the kernel kills it then instead of leaving it orphaned (tied to this thread).
  options.kill_on_parent_death = true;
  auto worker = duplex::spawn({python, DUPLEX_PYTHON_WORKER}, options);
  if (!worker) {
    if (worker.error() == std::errc::no_such_file_or_directory) {
      std::cerr << "Parent: " << python << " not found (ENOENT): this example needs Python 3\n";
      return EXIT_FAILURE;
    }
    return fail("Parent: spawn", worker.error());
  }
  std::cout << "Parent: Started " << python << " " << DUPLEX_PYTHON_WORKER << ", pid "
            << worker->pid() << std::endl;
  duplex::channel& ch = worker->channel();

  std::string large;  // 20000 bytes, 4000 words: over CPython's 16 KiB single-write limit
  for (int i = 0; i < 4000; ++i) {
    large += "spam ";
  }
  const std::string requests[] = {"hello world", "duplex speaks python", large};

  for (const std::string& text : requests) {
    if (auto r = ch.send(duplex::as_bytes(text)); !r) return fail("Parent: send", r.error());
    // If the worker died instead of answering, this returns errc::peer_closed: no hang.
    auto reply = ch.receive();
    if (!reply) return fail("Parent: receive", reply.error());
    if (reply->text() != expected_reply(text)) {
      std::cerr << "Parent: unexpected reply to a " << text.size() << "-byte message\n";
      return EXIT_FAILURE;
    }
    if (reply->size() <= 80) {
      std::cout << "Parent: Worker replied: " << reply->text() << std::endl;
    } else {
      std::cout << "Parent: Sent " << text.size() << " bytes, worker replied with " << reply->size()
                << " bytes: " << reply->text().substr(0, 30) << "..." << std::endl;
    }
  }

  // No more requests: recv_bytes raises EOFError in the worker, which exits.
  if (auto r = ch.shutdown_send(); !r) return fail("Parent: shutdown_send", r.error());
  auto status = worker->wait();
  if (!status) return fail("Parent: wait", status.error());
  std::cout << "Parent: Worker " << status->describe() << '.' << std::endl;
  return status->success() ? EXIT_SUCCESS : EXIT_FAILURE;
}

// What the example printed is its result: output that could not be written (a full disk, a
// closed pipe) is a failure, not an exit status of 0.
int main(int argc, char** argv) {
  const int status = run(argc, argv);
  if (!std::cout.flush()) {
    std::cerr << "python_parent: output lost\n";
    return EXIT_FAILURE;
  }
  return status;
}
