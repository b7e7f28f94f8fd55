// The channel's shared memory: on the send side this end's pool, memfds of their own for what
// the pool cannot hold (held back by memfd_room), allocate() and the send of a shared_buffer; on
// the receive side resolve(), which turns a received descriptor frame into its message.
#include <linux/sockios.h>
#include <sys/ioctl.h>

#include <algorithm>
#include <array>
#include <cassert>
#include <cstring>
#include <new>

#include "channel/state.hpp"
#include "framing/frame_check.hpp"

namespace duplex {

struct shared_buffer::state {
  const void* owner = nullptr;  // the channel it came from (checked at send)
  std::shared_ptr<detail::pool_tx> pool;
  detail::pool_tx::block block{};
  std::unique_ptr<detail::standalone_buffer> standalone;
  bool sent = false;

  ~state() {
    if (pool && !sent) pool->discard(block);  // never sent: the pool takes it back
  }
};

shared_buffer::shared_buffer() noexcept = default;
shared_buffer::shared_buffer(shared_buffer&&) noexcept = default;
shared_buffer& shared_buffer::operator=(shared_buffer&&) noexcept = default;
shared_buffer::~shared_buffer() = default;

std::span<std::byte> shared_buffer::bytes() noexcept {
  if (!state_) return {};
  if (state_->standalone) return state_->standalone->bytes();
  return {state_->block.data, static_cast<std::size_t>(state_->block.length)};
}

std::size_t shared_buffer::size() const noexcept {
  if (!state_) return 0;
  if (state_->standalone) return state_->standalone->bytes().size();
  return static_cast<std::size_t>(state_->block.length);
}

bool shared_buffer::in_pool() const noexcept { return state_ && state_->pool != nullptr; }

result<shared_buffer> channel::impl::allocate(std::size_t size) {
  const call c(*this);
  if (auto u = usable(c); !u) return std::unexpected(u.error());
  if (options.format != framing::native) return fail(errc::not_supported);
  if (size > options.max_message_size) return fail(errc::message_too_large);
  std::unique_ptr<shared_buffer::state> st(new (std::nothrow) shared_buffer::state);
  if (!st) return fail_errno(ENOMEM);
  st->owner = this;
  if (auto p = pool()) {
    if (auto b = p->allocate(size)) {
      st->pool = std::move(p);
      st->block = *b;
    }
  }
  if (!st->pool) {
    auto standalone = detail::standalone_buffer::create(size);
    if (!standalone) return std::unexpected(standalone.error());
    st->standalone = std::move(*standalone);
  }
  shared_buffer b;
  b.state_ = std::move(st);
  return b;
}

result<void> channel::impl::send(shared_buffer&& buffer, std::span<const int> fds) {
  const shared_buffer consumed = std::move(buffer);  // whatever happens, the caller's is spent
  auto* st = consumed.state_.get();
  if (st == nullptr || st->owner != this) return fail_errno(EINVAL);
  const call c(*this);
  if (auto u = usable(c); !u) return u;
  if (fds.size() > max_fds_per_message) return fail(errc::too_many_fds);
  const std::lock_guard lock(tx);
  if (auto flushed = flush_queue(true); !flushed) return std::unexpected(flushed.error());
  if (st->pool) {
    auto r = put_shared(st->block, fds, true);
    st->sent = r.has_value();
    return r;
  }
  if (fds.size() >= max_fds_per_message) return fail(errc::too_many_fds);  // one is the memfd's
  const std::size_t length = st->standalone->bytes().size();
  if (auto room = memfd_room(length, true); !room) return room;
  auto memfd = st->standalone->seal();
  if (!memfd) return std::unexpected(memfd.error());
  return put_memfd(std::move(*memfd), length, fds, true);
}

std::shared_ptr<detail::pool_tx> channel::impl::pool() {
  const std::lock_guard lock(pool_mutex);
  if (!pool_out) {
    auto p = detail::pool_tx::create(options.shared_memory.pool_size, options.shared_memory.slots);
    if (p) pool_out = std::move(*p);
  }
  return pool_out;
}

result<void> channel::impl::put_shared(const detail::pool_tx::block& b, std::span<const int> fds,
                                       bool blocking) {
  // The pool goes first, once: a small frame with the pool's memfd.
  if (!pool_announced) {
    const auto announce = wire::encode(pool_out->announce());
    const std::array<const_buffer, 1> parts{const_buffer(announce)};
    const std::array<int, 1> pool_fd{pool_out->fd()};
    if (auto r = put(parts, announce.size(), pool_fd, wire::flag_pool, blocking); !r) return r;
    pool_announced = true;
  }
  const auto ref = wire::encode(wire::shared_ref{b.slot, b.offset, b.length});
  const std::array<const_buffer, 1> parts{const_buffer(ref)};
  return put(parts, ref.size(), fds, wire::flag_shared, blocking);
}

result<void> channel::impl::memfd_room(std::uint64_t length, bool blocking) {
  const auto fits = [&] {
    return memfd_in_flight == 0 || memfd_in_flight + length <= options.shared_memory.max_in_flight;
  };
  if (fits()) return {};
  // The peer has taken every memfd this end sent once it has read everything this end wrote:
  // nothing left in the queue, and nothing in the socket (SIOCOUTQ: this end's bytes the peer
  // has not read). What it holds after that is its own memory, as any message it keeps. The
  // kernel tells no one when that moment comes, so a blocking send looks again after a pause
  // that doubles up to max_pause, or at once if the peer hangs up.
  constexpr auto max_pause = std::chrono::milliseconds(10);
  std::chrono::nanoseconds pause = std::chrono::microseconds(50);
  for (;;) {
    int unread = -1;
    if (queue.empty() && ::ioctl(sock.native_handle(), SIOCOUTQ, &unread) == 0 && unread == 0) {
      memfd_in_flight = 0;
      return {};
    }
    if (!blocking) return fail(errc::queue_full);
    if (is_closed()) return fail(errc::closed);
    auto woke = detail::wait_for(sock.native_handle(), 0, pause);
    // A hangup or error: the send that follows meets it and says what it is.
    if (woke) return {};
    if (woke.error() != errc::timed_out) return std::unexpected(woke.error());
    pause = std::min<std::chrono::nanoseconds>(pause * 2, max_pause);
  }
}

result<void> channel::impl::put_memfd(unique_fd memfd, std::uint64_t length,
                                      std::span<const int> fds, bool blocking) {
  // The memfd and the caller's fds, on the stack: callers pass fewer than max_fds_per_message.
  assert(fds.size() < max_fds_per_message);
  std::array<int, max_fds_per_message> all;  // NOLINT: only the first fds.size() + 1 are read
  all[0] = memfd.get();
  std::copy(fds.begin(), fds.end(), all.begin() + 1);
  const auto ref = wire::encode(wire::memfd_ref{length});
  const std::array<const_buffer, 1> parts{const_buffer(ref)};
  // Our copy of the memfd closes on return.
  auto r = put(parts, ref.size(), std::span<const int>(all.data(), fds.size() + 1),
               wire::flag_memfd, blocking);
  if (r) memfd_in_flight += length;
  return r;
}

result<std::optional<message>> channel::impl::resolve(std::uint8_t flags, const_buffer payload,
                                                      std::vector<unique_fd> fds) {
  // In one direction: the descriptor decoded whole (framing), then checked against this end's
  // limits, then one call into shm that checks the memory it names and maps it.
  const auto& shm = options.shared_memory;
  if (!shm.accept) return break_with(errc::protocol_error, "shared memory is not accepted here");
  std::string why;
  const auto d = detail::decode_descriptor(flags, payload, why);
  if (!d) return break_with(errc::protocol_error, std::move(why));
  switch (d->flags) {
    case wire::flag_pool: {
      if (pool_in || pool_lost) {
        return break_with(errc::protocol_error, "a second pool was announced");
      }
      auto mapped = detail::pool_rx::map(std::move(fds.front()), d->pool, shm.max_peer_pool, why);
      if (!mapped) {
        if (mapped.error() == errc::protocol_error) return break_with(errc::protocol_error, why);
        return lose_pool(flags, mapped.error());  // no room to map it here: a local limit
      }
      pool_in = std::move(*mapped);
      return std::optional<message>{};
    }
    case wire::flag_shared: {
      const wire::shared_ref& r = d->shared;
      if (!pool_in) {
        // The pool was announced but could not be had here: each of its messages is skipped with
        // the local error that lost it, and the channel goes on.
        if (pool_lost) return std::unexpected(pool_lost);
        return break_with(errc::protocol_error, "a shared-memory message came before its pool");
      }
      const auto bytes = pool_in->locate(r);
      if (!bytes) {
        return break_with(errc::protocol_error,
                          "a shared-memory reference is out of the pool's bounds");
      }
      if (r.length > options.max_message_size) {
        pool_in->release(r.slot);  // refused, and the sender gets its memory back
        return fail(errc::message_too_large);
      }
      if (shm.receive == shared_receive::view) {
        // Released when the last copy of the message's keeper goes.
        std::shared_ptr<const void> keeper(
            pool_in.get(), [pool = pool_in, slot = r.slot](const void*) { pool->release(slot); });
        return std::optional<message>{
            message::view(bytes->data(), bytes->size(), std::move(keeper), std::move(fds))};
      }
      message m;
      try {
        m = message::with_size(bytes->size());
      } catch (const std::bad_alloc&) {
        pool_in->release(r.slot);
        return fail_errno(ENOMEM);
      }
      if (!bytes->empty()) std::memcpy(m.bytes().data(), bytes->data(), bytes->size());
      pool_in->release(r.slot);
      m.fds() = std::move(fds);
      return std::optional<message>{std::move(m)};
    }
    default: {  // wire::flag_memfd
      const std::uint64_t length = d->memfd.length;
      if (length > options.max_message_size) return fail(errc::message_too_large);
      auto mapped = detail::map_sealed(fds.front().get(), length, why);
      if (!mapped) {
        if (mapped.error() == errc::protocol_error) return break_with(errc::protocol_error, why);
        return std::unexpected(mapped.error());  // a local limit: this message is skipped
      }
      fds.erase(fds.begin());  // the mapping outlives the memfd's fd
      const std::byte* data = (*mapped)->data();
      // Sealed against writing: safe to show in place, whoever sent it.
      return std::optional<message>{message::view(data, static_cast<std::size_t>(length),
                                                  std::move(*mapped), std::move(fds))};
    }
  }
}

}  // namespace duplex
