// duplex/batch.hpp - many small messages, sent with as few syscalls as the kernel allows.
//
// AF_UNIX costs per kernel message, not per byte: sixty-four 64-byte messages written one by one
// cost sixty-four sendmsg calls and sixty-four skbs, but framed into one buffer they cost one.
// A batch frames messages as they are added (copying their bytes) and channel::send(batch) writes
// them in one sendmsg on a stream. On seqpacket each message stays one packet, one sendmsg each:
// the kernel charges per packet, so sendmmsg would save only the syscall entry (about 5% here).
// The receiving side gets them with channel::receive_batch(), without an allocation per message.
//
//   duplex::batch b;
//   for (const auto& quote : quotes) b.add(duplex::as_bytes(quote));
//   ch.send(b);          // one syscall for all of them (on a stream)
//   b.clear();           // reuse the buffer
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "duplex/buffer.hpp"
#include "duplex/error.hpp"
#include "duplex/fd.hpp"
#include "duplex/framing.hpp"

namespace duplex {

// Messages framed for one channel and waiting to be sent together. Not thread-safe (a value).
class batch {
 public:
  // An empty batch for channels of the given framing.
  explicit batch(framing format = framing::native) : format_(format) {}

  // Appends a message (its bytes are copied in). Errors: errc::message_too_large (over
  // max_message_size, also checked again when the batch is sent).
  [[nodiscard]] result<void> add(const_buffer bytes);

  // Appends a message with fds. The fds are not duplicated: they must stay open until the batch
  // is sent. A message with fds starts a new sendmsg (its fds go with its first byte). Errors:
  // errc::too_many_fds (over 253), errc::not_supported (framing::python).
  [[nodiscard]] result<void> add(const_buffer bytes, std::span<const int> fds);

  // Number of messages.
  [[nodiscard]] std::size_t size() const noexcept { return frames_.size(); }
  [[nodiscard]] bool empty() const noexcept { return frames_.empty(); }

  // Bytes on the wire (headers included).
  [[nodiscard]] std::size_t wire_size() const noexcept { return wire_.size(); }

  // Removes every message, keeping the memory for reuse.
  void clear() noexcept {
    wire_.clear();
    frames_.clear();
    fds_.clear();
  }

  // The framing the batch was made for.
  [[nodiscard]] framing format() const noexcept { return format_; }

 private:
  friend class channel;
  struct frame {
    std::size_t offset;     // of its header in wire_
    std::size_t size;       // header and payload
    std::size_t fds_begin;  // its fds are fds_[fds_begin, fds_begin + fd_count)
    std::size_t fd_count;
    std::uint64_t payload;  // payload bytes
  };

  framing format_;
  std::vector<std::byte> wire_;
  std::vector<frame> frames_;
  std::vector<int> fds_;
};

// A received message seen in place (receive_batch): its bytes are valid only during the callback;
// take the fds (std::move) to keep them, the others are closed after the callback.
struct message_view {
  const_buffer bytes;
  std::span<unique_fd> fds;

  // The bytes seen as characters.
  [[nodiscard]] std::string_view text() const noexcept { return as_string_view(bytes); }
};

}  // namespace duplex
