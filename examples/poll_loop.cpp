// Driving several workers from one thread with a plain poll() loop.
//
// Every duplex object hands out the fd and the readiness it needs, and each step is a call that
// never blocks: try_send (the channel queues what the kernel does not take), flush when the
// socket is writable, try_receive until errc::would_block (a channel reads through a buffer, so a
// readable event may bring several messages), and a child's pidfd becomes readable when it exits.
// This is the whole contract an event loop needs; docs/event-loops.md shows it with libuv and
// Asio too.
#include <poll.h>

#include <cstdlib>
#include <iostream>
#include <string>
#include <vector>

#include "duplex/duplex.hpp"

namespace {

constexpr int workers = 3;
constexpr int requests_each = 4;

// A worker: answers every request with its upper-cased text, until the parent half-closes.
int worker(duplex::channel& parent) {
  for (;;) {
    auto m = parent.receive();
    if (!m) return m.error() == duplex::errc::peer_closed ? 0 : 1;
    std::string text(m->text());
    for (char& c : text)
      c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
    if (!parent.send(duplex::as_bytes(text))) return 2;
  }
}

}  // namespace

int run() {
  std::vector<duplex::child> children;
  for (int i = 0; i < workers; ++i) {
    // Killed by the kernel if this process dies by a signal, when no destructor reaps it.
    auto c = duplex::fork_with_channel(worker, {.kill_on_parent_death = true});
    if (!c) {
      std::cerr << "fork_with_channel: " << c.error().message() << '\n';
      return EXIT_FAILURE;
    }
    children.push_back(std::move(*c));
  }

  // Queue every request at once: try_send never blocks.
  for (int i = 0; i < workers; ++i) {
    for (int r = 0; r < requests_each; ++r) {
      const std::string text = "request " + std::to_string(r) + " for worker " + std::to_string(i);
      if (auto s = children[i].channel().try_send(duplex::as_bytes(text)); !s) {
        std::cerr << "try_send: " << s.error().message() << '\n';
        return EXIT_FAILURE;
      }
    }
  }

  std::vector<int> replies(workers, 0);
  std::vector<bool> exited(workers, false);
  int running = workers;
  while (running > 0) {
    // One pollfd per channel (readable, and writable while its queue is not empty) and one per
    // child (its pidfd is readable once it has exited).
    std::vector<pollfd> fds;
    for (int i = 0; i < workers; ++i) {
      auto& ch = children[i].channel();
      const short events = static_cast<short>(POLLIN | (ch.wants_write() ? POLLOUT : 0));
      fds.push_back({ch.native_handle(), events, 0});
      fds.push_back({exited[i] ? -1 : children[i].pidfd(), POLLIN, 0});
    }
    if (::poll(fds.data(), fds.size(), 10000) <= 0) {
      std::cerr << "poll: nothing happened for 10 s\n";
      return EXIT_FAILURE;
    }
    for (int i = 0; i < workers; ++i) {
      auto& ch = children[i].channel();
      const pollfd& c = fds[2 * i];
      if ((c.revents & POLLOUT) != 0) static_cast<void>(ch.flush());
      if ((c.revents & (POLLIN | POLLHUP)) != 0) {
        for (;;) {  // drain: messages may already be buffered
          auto m = ch.try_receive();
          if (!m) break;  // errc::would_block, or errc::peer_closed once the worker is gone
          std::cout << "Worker " << i << " replied: " << m->text() << std::endl;
          if (++replies[i] == requests_each) static_cast<void>(ch.shutdown_send());
        }
      }
      if ((fds[2 * i + 1].revents & POLLIN) != 0) {
        auto status = children[i].try_wait();  // it has exited: this does not block
        if (status && *status) {
          std::cout << "Worker " << i << " " << (*status)->describe() << std::endl;
          exited[i] = true;
          --running;
        }
      }
    }
  }
  for (int i = 0; i < workers; ++i) {
    if (replies[i] != requests_each) return EXIT_FAILURE;
  }
  std::cout << "All " << workers * requests_each << " replies received from one thread."
            << std::endl;
  return EXIT_SUCCESS;
}

// What the example printed is its result: output that could not be written (a full disk, a
// closed pipe) is a failure, not an exit status of 0.
int main() {
  const int status = run();
  if (!std::cout.flush()) {
    std::cerr << "poll_loop: output lost\n";
    return EXIT_FAILURE;
  }
  return status;
}
