// Internal: cuts a byte stream (with the fds that arrived alongside) into messages, for either
// framing. It does no I/O: the caller reads into read_target(), reports with commit(), and asks
// poll() what happened, so it is testable and fuzzable without sockets. Each frame's header and
// fds are judged by frame_check.hpp, which the seqpacket receive shares; what is the stream's
// alone (fds matched to frames by stream offset, stray fds, the end of the stream) is here.
//
// fd attribution. A sender attaches a frame's fds to a sendmsg whose first byte is that frame's
// header, and puts no other frame header in that sendmsg. The kernel hands the fds to the one
// recvmsg that reads the first byte of that sendmsg's first skb, and ends that recvmsg at the
// end of the skb. So the fds of a frame arrive with the read whose byte range contains the
// frame's first byte, and no later header starts within that range. The decoder records each
// batch of fds with its range and, when it parses a header announcing n fds at offset p, claims
// the batch whose range contains p: it must exist and hold exactly n fds. A batch that no header
// claims, fds that arrive while a payload is read directly into its destination, or a count that
// disagrees, are protocol errors. Every fd not handed over is closed.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <system_error>
#include <vector>

#include "duplex/buffer.hpp"
#include "duplex/fd.hpp"
#include "duplex/framing.hpp"
#include "duplex/message.hpp"
#include "framing/native_header.hpp"

namespace duplex::detail {

class stream_decoder {
 public:
  enum class event {
    need_more,     // read more bytes (into read_target()) and commit them
    header_ready,  // a header was parsed: choose a destination (accept_into / accept_owned)
    complete,      // a whole message is ready: take_message() / take_into()
    failed,        // error(): fatal() ones are for ever; others concern one message only
  };

  stream_decoder(framing format, std::size_t max_message_size, std::size_t max_fds,
                 std::size_t buffer_size);

  // Where the next read should put its bytes; not empty while poll() says need_more. Also sets
  // aside what the next commit() needs to keep the fds of one read, so that commit() allocates
  // nothing. Throws bad_alloc (with nothing changed) if the buffer or that room cannot be had,
  // before anything is read.
  [[nodiscard]] mutable_buffer read_target();

  // n bytes were read into the last read_target(); fds arrived with them (taken over here);
  // ctrunc if the kernel cut control data short. Allocates nothing.
  void commit(std::size_t n, std::span<unique_fd> fds, bool ctrunc);

  // The peer's end-of-stream was seen: once the buffered bytes are used up, poll() reports
  // peer_closed (at a frame boundary) or truncated_message (inside a frame).
  void end_of_stream() noexcept { eof_ = true; }

  // Advances over the buffered bytes and says what happened.
  [[nodiscard]] event poll();

  // After header_ready (and until the next frame): the frame's flags (wire::flag_*, or 0).
  [[nodiscard]] std::uint8_t pending_flags() const noexcept { return flags_; }

  // After header_ready: the size and fd count of the message.
  [[nodiscard]] std::uint64_t pending_size() const noexcept { return length_; }
  [[nodiscard]] std::size_t pending_fds() const noexcept { return fds_.size(); }

  // After header_ready: if the frame has no flags and its whole payload is already buffered,
  // sets payload to its bytes and fds to its fds, seen in place, and returns true; finish_view()
  // then passes the frame over (closing the fds not taken), with no copy and no allocation.
  // Otherwise returns false: choose a destination as usual.
  [[nodiscard]] bool in_place(const_buffer& payload, std::span<unique_fd>& fds) noexcept;
  void finish_view();

  // The fast path for runs of small messages: if the next frame is a native one with no flags
  // and no fds, within max_message_size, and buffered whole, sets payload to its bytes (seen in
  // place) and returns true; finish_plain() then passes it over. Otherwise returns false and
  // poll() takes the frame the usual way. Only between frames, with no fds pending: what it
  // accepts, parse_header() would accept the same way.
  [[nodiscard]] bool next_plain(const_buffer& payload) const noexcept {
    if (state_ != state::idle || format_ != framing::native || stray_ || !batches_.empty())
      return false;
    const std::size_t avail = end_ - begin_;
    if (avail < wire::native_header_size) return false;
    const std::byte* at = buf_.get() + begin_;
    if (load_le<8>(at) != plain_native_word0) return false;
    const std::uint64_t length = load_le<8>(at + 8);
    if (length > avail - wire::native_header_size || length > max_message_) return false;
    payload = {at + wire::native_header_size, static_cast<std::size_t>(length)};
    return true;
  }
  // True when poll() could only say need_more: between frames, nothing buffered, no stray fds
  // to report and no end of stream. Lets a caller that just emptied the buffer read at once.
  [[nodiscard]] bool starved() const noexcept {
    return state_ == state::idle && begin_ == end_ && !eof_ && !stray_;
  }
  // poll(), without its call when starved() already says need_more: what the channel's receive
  // loops ask after each read.
  [[nodiscard]] event next_event() { return starved() ? event::need_more : poll(); }

  void finish_plain(const_buffer payload) noexcept {
    const std::size_t n = wire::native_header_size + payload.size();
    begin_ += n;
    parse_offset_ += n;
  }

  // After header_ready: the payload goes into dest (at least pending_size() bytes).
  void accept_into(mutable_buffer dest) noexcept;

  // After header_ready: the payload goes into a new message. If it cannot be allocated, the
  // payload is skipped and poll() reports ENOMEM for this message.
  void accept_owned();

  // After complete (accept_owned): the message, with its fds.
  [[nodiscard]] message take_message();

  // After complete: copies the payload into buf unless it is already there (accept_into with
  // buf) and moves the fds into out. buf and out must have room for pending_size() bytes and
  // pending_fds() fds. Returns the message's size.
  std::size_t take_into(mutable_buffer buf, std::span<unique_fd> out) noexcept;

  // True while the payload's destination is a caller's buffer (accept_into).
  [[nodiscard]] bool external_destination() const noexcept {
    return (state_ == state::payload || state_ == state::complete) && !owned_;
  }

  // Moves a payload that is being written into a caller's buffer into a message of its own (the
  // caller's buffer is about to go away). If that cannot be allocated, the frame is skipped and
  // reported as ENOMEM.
  void detach();

  // After failed: what went wrong, and whether it is for ever.
  [[nodiscard]] std::error_code error() const noexcept { return error_; }

  // After a fatal failure: what the peer broke, in words.
  [[nodiscard]] const std::string& detail() const noexcept { return detail_; }
  [[nodiscard]] bool fatal() const noexcept { return state_ == state::failed; }

  // True once the stream has ended (end-of-stream reported, or a frame cut short by it).
  [[nodiscard]] bool ended() const noexcept { return state_ == state::ended; }

  // Bytes buffered but not yet used.
  [[nodiscard]] std::size_t buffered() const noexcept { return end_ - begin_; }

 private:
  enum class state { idle, header_ready, payload, discard, complete, failed, ended };

  struct batch {
    std::uint64_t start = 0;
    std::uint64_t end = 0;
    std::vector<unique_fd> fds;
    bool ctrunc = false;
  };

  event fail_for_ever(std::error_code ec, std::string detail);
  event parse_header();
  event after_payload_bytes();
  event end_stream(errc first);
  void start_frame(std::uint64_t length, std::size_t header_size);
  void drop_stray_batches_before(std::uint64_t offset);

  framing format_;
  std::size_t max_message_;
  std::size_t max_fds_;
  std::size_t capacity_;
  std::unique_ptr<std::byte[]> buf_;
  std::size_t begin_ = 0;           // first unused buffered byte
  std::size_t end_ = 0;             // one past the last buffered byte
  std::uint64_t parse_offset_ = 0;  // stream offset of buf_[begin_]
  std::uint64_t read_offset_ = 0;   // stream offset of the next byte to be read
  bool eof_ = false;
  bool direct_ = false;               // the last read_target() was the payload's destination
  bool stray_ = false;                // a batch of fds no frame claimed was seen (and closed)
  std::vector<batch> batches_;        // in order of arrival; at most max_pending_batches
  std::vector<unique_fd> spare_fds_;  // read_target()'s room for the next batch's fds

  state state_ = state::idle;
  std::error_code error_;
  std::string detail_;
  std::error_code frame_error_;  // reported once the refused frame's payload is skipped
  std::uint64_t length_ = 0;
  std::uint8_t flags_ = 0;
  std::uint64_t filled_ = 0;
  std::vector<unique_fd> fds_;
  mutable_buffer dest_;
  std::optional<message> owned_;
};

}  // namespace duplex::detail
