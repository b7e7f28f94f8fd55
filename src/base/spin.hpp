// Internal: busy-polling before a blocking wait, shared by the channel and the ring. relax() is the
// CPU's spin-wait hint; spinner is the budget a busy-polling call spends before it sleeps.
// Not installed.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>

#include "base/syscall.hpp"

namespace duplex::detail {

// Tells the CPU this thread is spinning (x86 pause, arm64 yield): the sibling hyperthread gets
// the core's resources, and leaving the loop does not pay a memory-order mis-speculation.
inline void relax() noexcept {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// Spinning for at most a budget, and never past a deadline. A call that busy-polls makes
// non-blocking attempts while active(), calls again() after each that found nothing, and blocks
// as usual once again() says false.
//
// ClockEvery is how many turns pass between two reads of the clock: 1 where a turn is a syscall
// (the clock is cheap beside it), more where a turn is a few loads from shared memory.
template <std::uint32_t ClockEvery = 1>
class spinner {
  static_assert(ClockEvery > 0 && (ClockEvery & (ClockEvery - 1)) == 0, "a power of two");

 public:
  // A zero (or negative) budget never spins; neither does a call that must not wait at all
  // (`enabled` false).
  spinner(std::chrono::nanoseconds budget, const deadline& until, bool enabled = true) noexcept
      : active_(enabled && budget.count() > 0) {
    if (!active_) return;
    until_ = std::chrono::steady_clock::now() + budget;
    if (!until.infinite()) until_ = std::min(until_, until.at());
  }

  // True while spinning: the next attempt must not block.
  [[nodiscard]] bool active() const noexcept { return active_; }

  // After an attempt that found nothing: true to try again at once (after a relax()), false once
  // the budget is spent; from then on active() is false.
  [[nodiscard]] bool again() noexcept {
    if (!active_) return false;
    if ((++turns_ & (ClockEvery - 1)) == 0 && std::chrono::steady_clock::now() >= until_) {
      active_ = false;
      return false;
    }
    relax();
    return true;
  }

 private:
  bool active_;
  std::uint32_t turns_ = 0;
  std::chrono::steady_clock::time_point until_{};
};

}  // namespace duplex::detail
