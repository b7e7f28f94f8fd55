// duplex/waiter.hpp - waiting on many channels, sockets and child processes at once (epoll).
//
//   auto w = duplex::waiter::create();
//   w->add(worker_a.channel(), /*key=*/1);
//   w->add(worker_b.channel(), 2);
//   w->add_exit(worker_a, 101);                       // the child's pidfd: readable on exit
//   for (;;) {
//     w->wait(std::chrono::seconds(1));               // errc::timed_out if nothing happened
//     while (auto e = w->next()) {
//       if (e->key == 1) drain(worker_a.channel());   // try_receive until errc::would_block
//       ...
//     }
//   }
//
// Level-triggered: an fd is reported as long as it is ready. A channel reads through a buffer,
// so after a readable event call try_receive() until it says errc::would_block: messages already
// buffered do not make the socket readable again.
//
// Adding, changing and removing registrations is safe from the waiting thread at any time, also
// between wait() and the last next(): an event of a registration removed (or replaced) since
// wait() is never returned. The waiter is not thread-safe otherwise: use it from one thread.
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <unordered_map>
#include <vector>

#include "duplex/error.hpp"
#include "duplex/fd.hpp"
#include "duplex/socket.hpp"

namespace duplex {

class channel;
class child;

// What an fd is, or is wanted to be, ready for; combine with |.
enum class readiness : unsigned {
  none = 0,
  readable = 1U << 0,  // EPOLLIN: data, end-of-stream, or (for a pidfd) the process exited
  writable = 1U << 1,  // EPOLLOUT: room to send (for try_send / flush)
  closed = 1U << 2,    // EPOLLHUP / EPOLLRDHUP / EPOLLERR: the peer is gone or an error waits
};

// Combines readiness flags.
[[nodiscard]] constexpr readiness operator|(readiness a, readiness b) noexcept {
  return static_cast<readiness>(static_cast<unsigned>(a) | static_cast<unsigned>(b));
}

// True if any flag of `flags` is set in `set`.
[[nodiscard]] constexpr bool any(readiness set, readiness flags) noexcept {
  return (static_cast<unsigned>(set) & static_cast<unsigned>(flags)) != 0;
}

// One ready registration.
struct ready_event {
  std::uint64_t key = 0;  // the key it was added with
  int fd = -1;            // its fd
  readiness ready = readiness::none;
};

// An epoll instance with the registrations it watches. Move-only.
class waiter {
 public:
  // An empty waiter (every call fails with EBADF); use create().
  waiter() noexcept = default;

  // A new waiter (epoll_create1, close-on-exec). Errors: EMFILE, ENFILE, ENOMEM.
  [[nodiscard]] static result<waiter> create();

  // Watches fd for `interest` (readable by default; closed is always reported), reporting it
  // with `key`. The fd stays owned by the caller and must stay open until removed. Errors:
  // EEXIST (fd already added), EBADF, EPERM (a regular file), ENOMEM, ENOSPC (max_user_watches).
  [[nodiscard]] result<void> add(int fd, std::uint64_t key,
                                 readiness interest = readiness::readable);

  // Watches a channel's socket. Add readiness::writable while channel::wants_write().
  [[nodiscard]] result<void> add(const channel& ch, std::uint64_t key,
                                 readiness interest = readiness::readable);

  // Watches a child's pidfd: readable once it has exited (then child::wait() does not block).
  [[nodiscard]] result<void> add_exit(const child& c, std::uint64_t key);

  // Changes what a registered fd is watched for. Errors: ENOENT (not added).
  [[nodiscard]] result<void> modify(int fd, readiness interest);

  // Stops watching fd; events of it already collected by wait() are dropped. Call it before the
  // fd is closed. Errors: ENOENT (not added).
  [[nodiscard]] result<void> remove(int fd);

  // Number of registrations.
  [[nodiscard]] std::size_t size() const noexcept { return by_fd_.size(); }

  // Waits until at least one registration is ready, or timeout passes (errc::timed_out); then
  // next() returns the ready ones. EINTR is retried with the time left. Returns how many events
  // were collected (at most 256 a call; the rest come with the next wait).
  [[nodiscard]] result<std::size_t> wait(std::chrono::nanoseconds timeout = forever);

  // The next event collected by the last wait() whose registration still exists; nullopt when
  // there are no more.
  [[nodiscard]] std::optional<ready_event> next();

  // The epoll fd itself, readable when a registration is ready: a waiter can be nested in
  // another event loop.
  [[nodiscard]] int native_handle() const noexcept { return epoll_.get(); }

 private:
  struct registration {
    std::uint64_t id;  // changes when an fd is added anew
    std::uint64_t key;
  };

  unique_fd epoll_;
  std::unordered_map<int, registration> by_fd_;
  std::unordered_map<std::uint64_t, int> by_id_;
  std::vector<ready_event> ready_;  // collected by wait(), with ids in place of keys
  std::vector<std::uint64_t> ready_ids_;
  std::size_t next_ = 0;
  std::uint64_t next_id_ = 1;
};

}  // namespace duplex
