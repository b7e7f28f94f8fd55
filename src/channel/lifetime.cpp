// The channel's lifetime: close() (which wakes the calls inside with a shutdown; the last call
// out releases the fd, see state.hpp), what the peer broke, and the socket's own questions.
#include "channel/state.hpp"

namespace duplex {

void channel::impl::close() noexcept {
  // close() counts as a call itself, so the fd stays valid while it looks at it; whichever call
  // leaves last releases the fd.
  const call c(*this);
  if (!c.ok()) return;  // closed already
  const std::uint64_t before = state.fetch_or(closed_bit);
  if ((before & closed_bit) != 0) return;  // another thread's close() came first
  if (before > one_call) {
    // Other threads are inside and may be blocked in the kernel: only a shutdown wakes them.
    static_cast<void>(sock.shutdown(shutdown_how::both));
  }
}

std::string channel::impl::error_detail() const {
  const std::lock_guard g(detail_mutex);
  return detail;
}

result<credentials> channel::impl::peer_credentials() {
  const call c(*this);
  if (!c.ok()) return fail(errc::closed);
  return sock.peer_credentials();
}

result<unique_fd> channel::impl::peer_pidfd() {
  const call c(*this);
  if (!c.ok()) return fail(errc::closed);
  return sock.peer_pidfd();
}

}  // namespace duplex
