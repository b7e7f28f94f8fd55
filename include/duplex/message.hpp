// duplex/message.hpp - a whole message: bytes plus the fds that travelled with them; and the two
// lighter forms a receive can give instead (message_view, message_info).
//
// A message owns its bytes and its fds (as unique_fd: closed when the message is destroyed unless
// taken). Up to message::inline_capacity bytes are kept inside the object itself, so a small
// message costs no allocation (as a short std::string); larger ones are one heap block, not
// zero-filled when received into. A large message received through shared memory may instead be
// a read-only view of it (is_view()), kept mapped while the message lives. It is move-only; as
// with std::string, moving a small message copies its bytes, so a span from bytes() refers to
// the object it was taken from.
//
//   duplex::message m("hello");                 // bytes copied in
//   channel.send(m);                             // the channel sends bytes and fds
//   auto r = channel.receive();                  // result<message>
//   std::string_view text = r->text();
//   std::vector<duplex::unique_fd> fds = r->take_fds();
#pragma once

#include <array>
#include <cstddef>
#include <memory>
#include <span>
#include <string_view>
#include <vector>

#include "duplex/buffer.hpp"
#include "duplex/fd.hpp"

namespace duplex {

// Bytes plus fds. Not thread-safe (a value type).
class message {
 public:
  // Messages of at most this many bytes keep them inside the object: no allocation.
  static constexpr std::size_t inline_capacity = 48;

  // An empty message: no bytes, no fds.
  message() noexcept = default;

  // Copies bytes in; takes ownership of fds.
  explicit message(const_buffer bytes, std::vector<unique_fd> fds = {});

  // Copies the characters of text in.
  explicit message(std::string_view text) : message(as_bytes(text)) {}

  // A message of `size` bytes whose contents are unspecified (not zero-filled), to be written
  // into. Throws std::bad_alloc if the memory cannot be had.
  [[nodiscard]] static message with_size(std::size_t size);

  message(message&&) noexcept = default;
  message& operator=(message&&) noexcept = default;

  // Makes this message a copy of bytes, with no fds (any it held are closed). bytes may be this
  // message's own. Throws std::bad_alloc if the memory cannot be had (the message is then
  // unchanged).
  void assign(const_buffer bytes);

  // A read-only view of size bytes at data, kept alive (and released) by keeper: how a message
  // received in place from shared memory is made. fds are taken over.
  [[nodiscard]] static message view(const std::byte* data, std::size_t size,
                                    std::shared_ptr<const void> keeper,
                                    std::vector<unique_fd> fds = {});

  // The bytes, writable. A view (is_view()) is read-only memory: on a non-const message this
  // copies it out first (throws std::bad_alloc if that memory cannot be had).
  [[nodiscard]] std::span<std::byte> bytes() {
    if (keeper_) materialize();
    return {owned_bytes(), size_};
  }

  // The bytes.
  [[nodiscard]] std::span<const std::byte> bytes() const noexcept {
    return {keeper_ ? view_ : owned_bytes(), size_};
  }

  // True if the bytes are a read-only view of shared memory rather than a copy of their own.
  [[nodiscard]] bool is_view() const noexcept { return keeper_ != nullptr; }

  // The bytes seen as characters (no copy).
  [[nodiscard]] std::string_view text() const noexcept { return as_string_view(bytes()); }

  // Number of bytes.
  [[nodiscard]] std::size_t size() const noexcept { return size_; }

  // True if there are no bytes (there may still be fds).
  [[nodiscard]] bool empty() const noexcept { return size_ == 0; }

  // The fds (owned by the message until taken).
  [[nodiscard]] std::vector<unique_fd>& fds() noexcept { return fds_; }
  [[nodiscard]] const std::vector<unique_fd>& fds() const noexcept { return fds_; }

  // Moves the fds out; the message keeps its bytes and has no fds afterwards.
  [[nodiscard]] std::vector<unique_fd> take_fds() noexcept { return std::move(fds_); }

 private:
  void materialize();

  [[nodiscard]] std::byte* owned_bytes() noexcept { return data_ ? data_.get() : inline_.data(); }
  [[nodiscard]] const std::byte* owned_bytes() const noexcept {
    return data_ ? data_.get() : inline_.data();
  }
  // Sets size_ and makes room for that many owned bytes: inline_, or data_ past its capacity.
  void make_room(std::size_t size);

  std::unique_ptr<std::byte[]> data_;  // the bytes, when owned and over inline_capacity
  std::size_t size_ = 0;
  std::vector<unique_fd> fds_;
  const std::byte* view_ = nullptr;                  // the bytes, when a view
  std::shared_ptr<const void> keeper_;               // keeps a view's memory; set only for views
  std::array<std::byte, inline_capacity> inline_{};  // the bytes, when owned and small
};

// A received message seen in place (channel::receive_batch): its bytes are valid only during the
// callback; take the fds (std::move) to keep them, the others are closed after the callback (also
// when it throws). The callback must not receive on the same channel (errc::reentrant_call): see
// channel::receive_batch.
struct message_view {
  const_buffer bytes;
  std::span<unique_fd> fds;

  // The bytes seen as characters.
  [[nodiscard]] std::string_view text() const noexcept { return as_string_view(bytes); }
};

// What a receive_into (channel or ring_channel) delivered. A ring_channel carries no fds: fds is
// always 0 there.
struct message_info {
  std::size_t size = 0;  // bytes stored in the caller's buffer
  std::size_t fds = 0;   // fds stored in the caller's array (from index 0)
};

}  // namespace duplex
