#include "framing/stream_decoder.hpp"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <new>
#include <tuple>

#include "framing/frame_check.hpp"
#include "socket/io.hpp"

namespace duplex::detail {
namespace {

// More pending batches than this cannot come from an honest sender (each batch ends the read
// that carried it, and the decoder parses after every read).
constexpr std::size_t max_pending_batches = 8;
// The most fds one read can bring: the room of the fd_batch the channel reads them into.
constexpr std::size_t max_fds_per_read = std::tuple_size_v<decltype(fd_batch::fds)>;

}  // namespace

stream_decoder::stream_decoder(framing format, std::size_t max_message_size, std::size_t max_fds,
                               std::size_t buffer_size)
    : format_(format),
      max_message_(max_message_size),
      max_fds_(max_fds),
      capacity_(std::max<std::size_t>(buffer_size, 64)) {}

mutable_buffer stream_decoder::read_target() {
  // Room to keep the fds of the read that follows, so that commit() allocates nothing.
  if (batches_.capacity() < max_pending_batches) batches_.reserve(max_pending_batches);
  if (spare_fds_.capacity() < max_fds_per_read) spare_fds_.reserve(max_fds_per_read);
  direct_ = false;
  if (state_ == state::payload && begin_ == end_) {
    const std::uint64_t remaining = length_ - filled_;
    if (remaining >= capacity_ / 2) {
      // A large payload goes straight into its destination: no copy through the buffer, and no
      // byte of the next frame is read with it.
      direct_ = true;
      return dest_.subspan(filled_, remaining);
    }
  }
  // Allocated on the first read: a channel that only sends never needs it.
  if (!buf_) buf_ = std::make_unique_for_overwrite<std::byte[]>(capacity_);
  if (begin_ == end_) {
    begin_ = end_ = 0;
  } else if (begin_ > 0 && capacity_ - end_ < capacity_ / 4) {
    std::memmove(buf_.get(), buf_.get() + begin_, end_ - begin_);
    end_ -= begin_;
    begin_ = 0;
  }
  return {buf_.get() + end_, capacity_ - end_};
}

void stream_decoder::commit(std::size_t n, std::span<unique_fd> fds, bool ctrunc) {
  const bool control = !fds.empty() || ctrunc;
  const bool keep = !direct_ && control && state_ != state::failed && format_ != framing::python &&
                    batches_.size() < max_pending_batches;
  // What keeping the fds needs is had before anything changes, from what read_target() set
  // aside: if it still must be allocated and cannot be, bad_alloc leaves the decoder as it
  // was and the fds with the caller.
  std::vector<unique_fd> kept;
  if (keep) {
    if (batches_.capacity() == batches_.size()) batches_.reserve(max_pending_batches);
    kept = std::exchange(spare_fds_, {});
    kept.clear();
    kept.reserve(fds.size());
  }
  const std::uint64_t start = read_offset_;
  read_offset_ += n;
  auto close_all = [&fds] {
    for (auto& fd : fds)
      fd.reset();
  };
  if (direct_) {
    direct_ = false;
    filled_ += n;
    parse_offset_ += n;
    if (control) {
      // fds in the middle of a payload: no header starts here to own them.
      close_all();
      fail_for_ever(make_error_code(errc::protocol_error), "fds arrived inside a payload");
    }
    return;
  }
  end_ += n;
  if (!control) return;
  if (state_ == state::failed) {
    close_all();
    return;
  }
  if (format_ == framing::python) {
    close_all();
    fail_for_ever(make_error_code(errc::protocol_error), "fds arrived on a Python-framed channel");
    return;
  }
  if (batches_.size() >= max_pending_batches) {
    close_all();
    fail_for_ever(make_error_code(errc::protocol_error), "fds arrived that no frame announced");
    return;
  }
  for (auto& fd : fds)
    kept.push_back(std::move(fd));  // within its reserved capacity
  batches_.push_back(batch{start, start + n, std::move(kept), ctrunc});  // likewise
}

stream_decoder::event stream_decoder::fail_for_ever(std::error_code ec, std::string detail) {
  if (state_ != state::failed) {
    error_ = ec;
    detail_ = std::move(detail);
  }
  state_ = state::failed;
  batches_.clear();
  fds_.clear();
  owned_.reset();
  return event::failed;
}

void stream_decoder::drop_stray_batches_before(std::uint64_t offset) {
  while (!batches_.empty() && batches_.front().end <= offset) {
    batches_.erase(batches_.begin());  // closes its fds
    stray_ = true;
  }
}

void stream_decoder::start_frame(std::uint64_t length, std::size_t header_size) {
  begin_ += header_size;
  parse_offset_ += header_size;
  length_ = length;
  filled_ = 0;
  dest_ = {};
  owned_.reset();
}

stream_decoder::event stream_decoder::parse_header() {
  const std::size_t avail = end_ - begin_;
  const std::span<const std::byte> bytes(buf_.get() + begin_, avail);
  wire::native_header h;
  std::string why;  // what the peer broke, if it did
  std::size_t header_size = 0;
  if (format_ == framing::native) {
    if (avail < wire::native_header_size) return event::need_more;
    if (auto v = check_native_frame(bytes, std::nullopt, max_message_, h, why); !v.accepted()) {
      return fail_for_ever(v.error, std::move(why));
    }
    header_size = wire::native_header_size;
  } else {
    auto p = wire::decode_python(bytes);
    if (!p) {
      const auto raw = static_cast<std::int32_t>((std::to_integer<std::uint32_t>(bytes[0]) << 24) |
                                                 (std::to_integer<std::uint32_t>(bytes[1]) << 16) |
                                                 (std::to_integer<std::uint32_t>(bytes[2]) << 8) |
                                                 std::to_integer<std::uint32_t>(bytes[3]));
      return fail_for_ever(p.error(), "negative message length " + std::to_string(raw));
    }
    if (!*p) return event::need_more;
    h.length = (*p)->length;
    header_size = (*p)->header_size;
    // Checked before anything is allocated.
    if (auto v = check_length(h.length, max_message_, false, why); !v.accepted()) {
      return fail_for_ever(v.error, std::move(why));
    }
  }

  const std::uint64_t at = parse_offset_;
  drop_stray_batches_before(at);  // a batch that ends before this header is nobody's
  if (stray_)
    return fail_for_ever(make_error_code(errc::protocol_error),
                         "fds arrived that no frame announced");
  frame_verdict fds;
  if (h.fd_count > 0) {
    // The batch whose range holds this header's first byte is this frame's, whatever it holds.
    const bool claimed = !batches_.empty() && batches_.front().start <= at;
    batch* b = claimed ? &batches_.front() : nullptr;
    fds = check_frame_fds(h, b != nullptr ? b->fds.size() : 0, b != nullptr && b->ctrunc, max_fds_,
                          why);
    // Without a batch of its own the count disagrees: fatal. So b is set from here on.
    if (fds.what == frame_verdict::outcome::fatal || b == nullptr) {
      return fail_for_ever(fds.error, std::move(why));
    }
    if (fds.accepted()) fds_ = std::move(b->fds);
    batches_.erase(batches_.begin());  // closes the fds of a refused frame
  }
  start_frame(h.length, header_size);
  flags_ = h.flags;
  if (!fds.accepted()) {
    frame_error_ = fds.error;
    state_ = state::discard;
    return event::need_more;  // not returned: the caller loops while the state changes
  }
  state_ = state::header_ready;
  return event::header_ready;
}

stream_decoder::event stream_decoder::end_stream(errc first) {
  batches_.clear();
  fds_.clear();
  owned_.reset();
  state_ = state::ended;
  error_ = make_error_code(first);
  return event::failed;
}

stream_decoder::event stream_decoder::after_payload_bytes() {
  const std::size_t avail = end_ - begin_;
  const auto n = static_cast<std::size_t>(std::min<std::uint64_t>(avail, length_ - filled_));
  if (state_ == state::payload && n > 0) {
    std::memcpy(dest_.data() + filled_, buf_.get() + begin_, n);
  }
  begin_ += n;
  parse_offset_ += n;
  filled_ += n;
  if (filled_ == length_) {
    drop_stray_batches_before(parse_offset_);
    if (state_ == state::discard) {  // a refused frame, now skipped: report it, carry on
      state_ = state::idle;
      error_ = std::exchange(frame_error_, {});
      return event::failed;
    }
    state_ = state::complete;
    return event::complete;
  }
  if (eof_) return end_stream(errc::truncated_message);  // the peer is gone mid-frame
  return event::need_more;
}

stream_decoder::event stream_decoder::poll() {
  for (;;) {
    switch (state_) {
      case state::failed: return event::failed;
      case state::ended:
        // The first report said why the stream ended; every later one says it has.
        error_ = make_error_code(errc::peer_closed);
        return event::failed;
      case state::complete: return event::complete;
      case state::header_ready: return event::header_ready;
      case state::payload:
      case state::discard: return after_payload_bytes();
      case state::idle: {
        if (stray_) {
          return fail_for_ever(make_error_code(errc::protocol_error),
                               "fds arrived that no frame announced");
        }
        if (begin_ == end_ && eof_) {
          // fds that no frame claimed, then the end: the peer broke the protocol.
          if (!batches_.empty()) {
            return fail_for_ever(make_error_code(errc::protocol_error),
                                 "fds arrived that no frame announced");
          }
          return end_stream(errc::peer_closed);
        }
        const event e = parse_header();
        if (state_ == state::discard) continue;  // skip the refused frame's payload
        if (e == event::need_more && eof_) return end_stream(errc::truncated_message);
        return e;
      }
    }
  }
}

bool stream_decoder::in_place(const_buffer& payload, std::span<unique_fd>& fds) noexcept {
  if (state_ != state::header_ready || flags_ != 0 || end_ - begin_ < length_) return false;
  payload = {buf_.get() + begin_, static_cast<std::size_t>(length_)};
  fds = fds_;
  return true;
}

void stream_decoder::finish_view() {
  begin_ += static_cast<std::size_t>(length_);
  parse_offset_ += length_;
  filled_ = length_;
  fds_.clear();  // closes whatever the caller did not take
  drop_stray_batches_before(parse_offset_);
  state_ = state::idle;
}

void stream_decoder::accept_into(mutable_buffer dest) noexcept {
  dest_ = dest.first(static_cast<std::size_t>(length_));
  owned_.reset();
  state_ = length_ == 0 ? state::complete : state::payload;
}

void stream_decoder::accept_owned() {
  try {
    owned_ = message::with_size(static_cast<std::size_t>(length_));
  } catch (const std::bad_alloc&) {
    fds_.clear();
    frame_error_ = std::error_code(ENOMEM, std::system_category());
    state_ = state::discard;
    return;
  }
  dest_ = owned_->bytes();
  state_ = length_ == 0 ? state::complete : state::payload;
}

message stream_decoder::take_message() {
  message m = std::move(*owned_);
  owned_.reset();
  m.fds() = std::move(fds_);
  fds_.clear();
  state_ = state::idle;
  return m;
}

std::size_t stream_decoder::take_into(mutable_buffer buf, std::span<unique_fd> out) noexcept {
  const auto size = static_cast<std::size_t>(length_);
  if (owned_ && size > 0) std::memcpy(buf.data(), owned_->bytes().data(), size);
  for (std::size_t i = 0; i < fds_.size() && i < out.size(); ++i)
    out[i] = std::move(fds_[i]);
  fds_.clear();
  owned_.reset();
  dest_ = {};
  state_ = state::idle;
  return size;
}

void stream_decoder::detach() {
  if (!external_destination()) return;
  const mutable_buffer old = dest_;
  const bool was_complete = state_ == state::complete;
  accept_owned();
  if (state_ == state::discard) {
    // No memory: the bytes already copied count as skipped.
    if (was_complete) filled_ = length_;
    return;
  }
  if (filled_ > 0) std::memcpy(dest_.data(), old.data(), static_cast<std::size_t>(filled_));
  if (was_complete) state_ = state::complete;
}

}  // namespace duplex::detail
