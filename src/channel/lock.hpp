// Internal: how long a channel call may wait (wait_spec), and the small lock that each of the
// channel's two directions is taken under (call_lock). Not installed.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>

#include "base/spin.hpp"
#include "base/syscall.hpp"

namespace duplex::detail {

// How long a call may wait.
enum class wait_kind { block, try_once, until };

struct wait_spec {
  wait_kind kind = wait_kind::block;
  deadline until{forever};

  static wait_spec from(std::chrono::nanoseconds timeout) {
    wait_spec w;
    w.until = deadline(timeout);
    w.kind = w.until.infinite() ? wait_kind::block : wait_kind::until;
    return w;
  }
  static wait_spec now() {
    wait_spec w;
    w.kind = wait_kind::try_once;
    return w;
  }
};

// Busy-polling before a receive blocks: a syscall per turn, so the clock is read every turn.
using receive_spinner = spinner<1>;

// The receive and send locks: a mutex that can be waited for with a deadline. (std::timed_mutex
// would do, but libstdc++ implements its timed waits with pthread_mutex_clocklock, which
// ThreadSanitizer does not see; a condition variable it does.) Uncontended, taking and releasing
// it is one atomic exchange and one store: a call from an event loop pays no pthread mutex and no
// notify. A waiter counts itself in waiters_ before it looks at busy_, and release() looks at
// waiters_ after it clears busy_ (both sequentially consistent), so a waiter that saw the lock
// busy is always notified.
class call_lock {
 public:
  // Takes the lock, waiting as w says; false if it could not be had in time. Inline for the
  // free lock, the case of every call that is not contended.
  [[nodiscard]] bool acquire(const wait_spec& w) {
    return !busy_.exchange(true) || wait_to_acquire(w);
  }
  // Lockable, for std::lock_guard and std::unique_lock: lock() waits as long as it takes.
  void lock() { static_cast<void>(acquire(wait_spec{})); }
  [[nodiscard]] bool try_lock() { return !busy_.exchange(true); }
  void unlock() { release(); }
  void release() {
    busy_.store(false);
    if (waiters_.load() > 0) {
      // Through m_: a waiter between its look at busy_ and its wait holds m_, so the notify
      // cannot fall between the two.
      { const std::lock_guard g(m_); }
      cv_.notify_all();
    }
  }

 private:
  // acquire() once the lock was found taken.
  [[nodiscard]] bool wait_to_acquire(const wait_spec& w) {
    if (w.kind == wait_kind::try_once) return false;
    std::unique_lock g(m_);
    waiters_.fetch_add(1);
    const auto take = [this] { return !busy_.exchange(true); };
    bool taken = true;
    if (w.kind == wait_kind::block) {
      cv_.wait(g, take);
    } else {
      taken = cv_.wait_for(g, w.until.remaining(), take);
    }
    waiters_.fetch_sub(1);
    return taken;
  }

  std::atomic<bool> busy_{false};
  std::atomic<int> waiters_{0};
  std::mutex m_;
  std::condition_variable cv_;
};

}  // namespace duplex::detail
