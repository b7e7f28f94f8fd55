// duplex/batch.hpp - many small messages, sent with as few syscalls as the kernel allows.
//
// AF_UNIX costs per kernel message, not per byte: sixty-four 64-byte messages written one by one
// cost sixty-four sendmsg calls and sixty-four skbs, but framed into one buffer they cost one.
// A batch frames messages as they are added (copying their bytes) and channel::send(batch) writes
// them in one sendmsg on a stream. On seqpacket each message stays one packet, one sendmsg each:
// the kernel charges per packet, so sendmmsg would save only the syscall entry, a small part of
// the cost. The receiving side gets them with channel::receive_batch() (each one a message_view,
// duplex/message.hpp), without an allocation per message.
//
//   duplex::batch b;
//   for (const auto& quote : quotes) b.add(duplex::as_bytes(quote));
//   ch.send(b);          // one syscall for all of them (on a stream)
//   b.clear();           // reuse the buffer
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <new>
#include <span>
#include <string_view>
#include <utility>
#include <vector>

#include "duplex/buffer.hpp"
#include "duplex/error.hpp"
#include "duplex/fd.hpp"
#include "duplex/framing.hpp"
#include "duplex/message.hpp"

namespace duplex {

namespace detail {
// Internal: a message with fds in a batch: where its header is in the batch's bytes, and which
// of the batch's fds are its own.
struct batch_fd_frame {
  std::size_t offset;
  std::size_t fds_begin;
  std::size_t fd_count;
};
}  // namespace detail

// Messages framed for one channel and waiting to be sent together. Not thread-safe (a value).
class batch {
 public:
  // An empty batch for channels of the given framing.
  explicit batch(framing format = framing::native) : format_(format) {}

  // Appends a message (its bytes are copied in). The channel's max_message_size is checked when
  // the batch is sent (errc::message_too_large, nothing sent). Errors: ENOMEM (the batch could
  // not grow; it is left as it was). Inline for the common case (native
  // framing, a message of at most 64 bytes, room without growing): a few moves per message.
  [[nodiscard]] result<void> add(const_buffer bytes) {
    const std::size_t offset = wire_.size();
    if (format_ != framing::native || bytes.size() > small_message ||
        wire_.capacity() - offset < wire::native_header_size + small_message) {
      return add(bytes, {});
    }
    wire_.resize(offset + wire::native_header_size + bytes.size());
    const auto head = wire::encode_native({bytes.size(), 0, 0});
    std::memcpy(wire_.data() + offset, head.data(), head.size());
    copy_small(wire_.data() + offset + wire::native_header_size, bytes.data(), bytes.size());
    ++count_;
    if (bytes.size() > largest_) largest_ = bytes.size();
    return {};
  }

  // Appends a message with fds. The fds are not duplicated: they must stay open until the batch
  // is sent. A message with fds starts a new sendmsg (its fds go with its first byte). Errors:
  // errc::too_many_fds (over 253), errc::not_supported (framing::python), ENOMEM (the batch
  // could not grow; it is left as it was).
  [[nodiscard]] result<void> add(const_buffer bytes, std::span<const int> fds);

  // Number of messages.
  [[nodiscard]] std::size_t size() const noexcept { return count_; }
  [[nodiscard]] bool empty() const noexcept { return count_ == 0; }

  // Bytes on the wire (headers included).
  [[nodiscard]] std::size_t wire_size() const noexcept { return wire_.size(); }

  // Removes every message, keeping the memory for reuse.
  void clear() noexcept {
    wire_.clear();
    count_ = 0;
    largest_ = 0;
    fd_frames_.clear();
    fds_.clear();
  }

  // The framing the batch was made for.
  [[nodiscard]] framing format() const noexcept { return format_; }

 private:
  friend class channel;

  // Messages up to this size take add()'s inline path.
  static constexpr std::size_t small_message = 64;

  // Copies n <= small_message bytes with a few fixed-size moves (that may overlap), instead of a
  // call to memcpy that costs as much as the copy itself at these sizes.
  static void copy_small(std::byte* to, const std::byte* from, std::size_t n) noexcept {
    if (n >= 32) {
      std::memcpy(to, from, 32);
      std::memcpy(to + n - 32, from + n - 32, 32);
    } else if (n >= 16) {
      std::memcpy(to, from, 16);
      std::memcpy(to + n - 16, from + n - 16, 16);
    } else if (n >= 8) {
      std::memcpy(to, from, 8);
      std::memcpy(to + n - 8, from + n - 8, 8);
    } else {
      for (std::size_t i = 0; i < n; ++i)
        to[i] = from[i];
    }
  }

  // Leaves the bytes it adds uninitialised (resize() is followed by memcpy()), so that adding a
  // message writes each byte once.
  template <typename T>
  struct uninitialised_allocator : std::allocator<T> {
    template <typename U>
    struct rebind {
      using other = uninitialised_allocator<U>;
    };
    using std::allocator<T>::allocator;
    template <typename U>
    void construct(U* p) noexcept {
      ::new (static_cast<void*>(p)) U;
    }
    template <typename U, typename... Args>
    void construct(U* p, Args&&... args) {
      std::allocator_traits<std::allocator<T>>::construct(*this, p, std::forward<Args>(args)...);
    }
  };

  framing format_;
  std::vector<std::byte, uninitialised_allocator<std::byte>> wire_;
  std::size_t count_ = 0;
  std::uint64_t largest_ = 0;  // the largest payload, checked against the channel's limit
  // Messages without fds need no record: a run of them goes out in one sendmsg on a stream, and
  // on seqpacket each one's place is read back from the headers.
  std::vector<detail::batch_fd_frame> fd_frames_;
  std::vector<int> fds_;
};

}  // namespace duplex
