// The channel's public face: every public method of channel, each a forward to channel::impl
// (state.hpp) or a trivial accessor of it, and channel::create's checks of its options.
#include "duplex/channel.hpp"

#include <array>

#include "channel/channel_check.hpp"
#include "channel/state.hpp"
#include "duplex/socket_pair.hpp"

namespace duplex {

using detail::wait_spec;

channel::channel() noexcept = default;
channel::channel(channel&&) noexcept = default;
channel& channel::operator=(channel&&) noexcept = default;
channel::~channel() = default;

static_assert(max_shared_pool_slots == detail::max_pool_slots);

result<void> detail::check_channel(socket_kind kind, const channel_options& o) {
  if (kind == socket_kind::datagram) return fail(errc::wrong_kind);
  if (o.format != framing::native && o.format != framing::python) return fail_errno(EINVAL);
  if (o.format == framing::python && kind != socket_kind::stream) return fail(errc::wrong_kind);
  if (o.max_message_size == 0 || o.max_fds > max_fds_per_message) return fail_errno(EINVAL);
  if (o.receive_buffer_size > max_receive_buffer_size) return fail_errno(EINVAL);
  if (o.busy_poll < std::chrono::nanoseconds::zero() || o.busy_poll > max_busy_poll) {
    return fail_errno(EINVAL);
  }
  const auto& shm = o.shared_memory;
  if (shm.receive != shared_receive::copy && shm.receive != shared_receive::view) {
    return fail_errno(EINVAL);
  }
  if (shm.pool_size == 0 || shm.pool_size > max_shared_pool_size) return fail_errno(EINVAL);
  if (shm.slots == 0 || shm.slots > max_shared_pool_slots) return fail_errno(EINVAL);
  return {};
}

result<channel> channel::create(socket s, channel_options options) {
  if (auto ok = detail::check_channel(s.kind(), options); !ok) return std::unexpected(ok.error());
  channel c;
  try {
    c.impl_ = std::make_unique<impl>(std::move(s), options);
  } catch (const std::bad_alloc&) {
    return fail_errno(ENOMEM);  // s is closed on the way out
  }
  return c;
}

socket_kind channel::kind() const noexcept {
  return impl_ ? impl_->sock.kind() : socket_kind::stream;
}

const channel_options& channel::options() const noexcept {
  static const channel_options defaults;
  return impl_ ? impl_->options : defaults;
}

int channel::native_handle() const noexcept { return impl_ ? impl_->fd_copy.load() : -1; }

bool channel::is_broken() const noexcept { return impl_ && impl_->broken.load(); }

std::string channel::error_detail() const { return impl_ ? impl_->error_detail() : std::string(); }

result<void> channel::send(std::span<const const_buffer> parts, std::span<const int> fds) {
  if (!impl_) return fail(errc::closed);
  return impl_->send(parts, fds);
}

result<void> channel::send(const_buffer bytes) { return send(std::span(&bytes, 1), {}); }

result<void> channel::send(const_buffer bytes, std::span<const int> fds) {
  return send(std::span(&bytes, 1), fds);
}

result<void> channel::send(std::span<const const_buffer> parts) { return send(parts, {}); }

namespace {

// Calls send(parts, fds) with a message's bytes and its fds as raw numbers, on the stack, with no
// allocation. A message with more fds than one may carry passes only its first
// max_fds_per_message + 1: the send refuses that count (errc::too_many_fds) as it would the whole,
// after the checks that come before that one.
template <typename Send>
result<void> with_raw_fds(const message& m, Send send) {
  const const_buffer bytes = m.bytes();
  const auto parts = std::span(&bytes, 1);
  const auto& owned = m.fds();
  const std::size_t n = std::min(owned.size(), max_fds_per_message + 1);
  std::array<int, max_fds_per_message + 1> raw;  // NOLINT: only the first n are read
  for (std::size_t i = 0; i < n; ++i)
    raw[i] = owned[i].get();
  return send(parts, std::span<const int>(raw.data(), n));
}

}  // namespace

result<void> channel::send(const message& m) {
  return with_raw_fds(m, [this](std::span<const const_buffer> parts, std::span<const int> fds) {
    return send(parts, fds);
  });
}

result<void> channel::try_send(std::span<const const_buffer> parts, std::span<const int> fds) {
  if (!impl_) return fail(errc::closed);
  return impl_->try_send(parts, fds);
}

result<void> channel::try_send(const_buffer bytes, std::span<const int> fds) {
  return try_send(std::span(&bytes, 1), fds);
}

result<void> channel::try_send(const message& m) {
  return with_raw_fds(m, [this](std::span<const const_buffer> parts, std::span<const int> fds) {
    return try_send(parts, fds);
  });
}

result<shared_buffer> channel::allocate(std::size_t size) {
  if (!impl_) return fail(errc::closed);
  return impl_->allocate(size);
}

result<void> channel::send(shared_buffer&& buffer, std::span<const int> fds) {
  if (!impl_) return fail(errc::closed);
  return impl_->send(std::move(buffer), fds);
}

result<void> channel::send(const batch& b) {
  if (!impl_) return fail(errc::closed);
  return impl_->send(b);
}

result<bool> channel::flush() {
  if (!impl_) return fail(errc::closed);
  return impl_->flush();
}

bool channel::wants_write() const noexcept { return impl_ && impl_->queued.load() > 0; }

std::size_t channel::queued_bytes() const noexcept { return impl_ ? impl_->queued.load() : 0; }

result<message> channel::receive() { return receive(forever); }

result<message> channel::receive(std::chrono::nanoseconds timeout) {
  if (!impl_) return fail(errc::closed);
  return impl_->receive_message(wait_spec::from(timeout));
}

result<message> channel::try_receive() {
  if (!impl_) return fail(errc::closed);
  return impl_->receive_message(wait_spec::now());
}

result<message_info> channel::receive_into(mutable_buffer buf, std::span<unique_fd> fds) {
  return receive_into(buf, fds, forever);
}

result<message_info> channel::receive_into(mutable_buffer buf, std::span<unique_fd> fds,
                                           std::chrono::nanoseconds timeout) {
  if (!impl_) return fail(errc::closed);
  return impl_->receive(wait_spec::from(timeout), impl::destination{nullptr, buf, fds});
}

result<std::size_t> channel::receive_batch_impl(void (*call_fn)(void*, message_view&), void* fn,
                                                std::size_t max, std::chrono::nanoseconds timeout,
                                                bool try_only) {
  if (!impl_) return fail(errc::closed);
  if (max == 0) return std::size_t{0};
  return impl_->receive_batch(try_only ? wait_spec::now() : wait_spec::from(timeout), call_fn, fn,
                              max);
}

std::size_t channel::buffered_bytes() const noexcept { return impl_ ? impl_->buffered_bytes() : 0; }

bool channel::drained() const noexcept { return impl_ && impl_->is_drained(); }

result<void> channel::wait_readable(std::chrono::nanoseconds timeout) const {
  if (!impl_) return fail(errc::closed);
  return impl_->wait_readable(timeout);
}

result<void> channel::shutdown_send() {
  if (!impl_) return fail(errc::closed);
  return impl_->shutdown_send();
}

void channel::close() noexcept {
  if (impl_) impl_->close();
}

result<credentials> channel::peer_credentials() const {
  if (!impl_) return fail(errc::closed);
  return impl_->peer_credentials();
}

result<unique_fd> channel::peer_pidfd() const {
  if (!impl_) return fail(errc::closed);
  return impl_->peer_pidfd();
}

result<connected_channels> channel_pair(socket_kind kind, channel_options options) {
  auto pair = socket_pair(kind);
  if (!pair) return std::unexpected(pair.error());
  auto first = channel::create(std::move(pair->first), options);
  if (!first) return std::unexpected(first.error());
  auto second = channel::create(std::move(pair->second), options);
  if (!second) return std::unexpected(second.error());
  return connected_channels{std::move(*first), std::move(*second)};
}

bool channel::is_open() const noexcept {
  return impl_ && !impl_->is_closed() && impl_->fd_copy.load() >= 0;
}

}  // namespace duplex
