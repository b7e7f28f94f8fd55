// Internal: every check a receiver makes of one native frame from the peer, whether the stream
// decoder cut it out of a byte stream or it came as one seqpacket packet: its header, its
// length against the packet that carried it and against this end's maximum, what its flags ask
// of its length and fds, the fds that arrived with it, and a descriptor frame's payload. The one
// place that judges peer frames and words what was wrong; the stream decoder and the channel's
// packet receive both call it, and the channel's resolve() decodes descriptors here. Not
// installed.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <system_error>

#include "duplex/framing.hpp"
#include "framing/native_header.hpp"

namespace duplex::detail {

// What becomes of a frame. A fatal verdict also says what the peer broke, in words, in the `why`
// its check was given (left alone otherwise, so that an accepted frame costs no string).
struct frame_verdict {
  enum class outcome : std::uint8_t {
    accept,  // deliver it
    skip,    // refuse this one frame (error): the channel goes on
    fatal,   // the peer broke the protocol (error, detail): the channel is broken
  };
  outcome what = outcome::accept;
  std::error_code error;

  [[nodiscard]] bool accepted() const noexcept { return what == outcome::accept; }
};

// Refuses a frame whose payload of `length` bytes is over max_message: skipped whole when it
// came in a packet (`skippable`), for ever on a stream, which cannot skip a length it cannot
// trust. Errors: errc::message_too_large.
[[nodiscard]] frame_verdict length_refused(std::uint64_t length, std::size_t max_message,
                                           bool skippable, std::string& why);
[[nodiscard]] inline frame_verdict check_length(std::uint64_t length, std::size_t max_message,
                                                bool skippable, std::string& why) {
  if (length <= max_message) return {};
  return length_refused(length, max_message, skippable, why);
}

// Decodes and checks a native header into out. packet_size: the size of the whole packet it came
// in (seqpacket), which must be the header's and its payload's; nullopt on a stream. In order:
// a packet shorter than a header, a malformed header (wire::explain_native), a length the packet
// disagrees with, a descriptor frame (flags) whose length or fd count is not its own: fatal,
// errc::protocol_error; then check_length (skippable for a packet).
[[nodiscard]] frame_verdict check_native_frame_in_full(std::span<const std::byte> head,
                                                       std::optional<std::uint64_t> packet_size,
                                                       std::size_t max_message,
                                                       wire::native_header& out, std::string& why);
[[nodiscard]] inline frame_verdict check_native_frame(std::span<const std::byte> head,
                                                      std::optional<std::uint64_t> packet_size,
                                                      std::size_t max_message,
                                                      wire::native_header& out, std::string& why) {
  // Inline, the frame of every plain message (no flags, no fds): its first word is one fixed
  // value (native_header.hpp), and only its length is left to check. The rest, in full, below.
  if (head.size() >= wire::native_header_size && load_le<8>(head.data()) == plain_native_word0) {
    const std::uint64_t length = load_le<8>(head.data() + 8);
    const bool whole = !packet_size || (*packet_size >= wire::native_header_size &&
                                        length == *packet_size - wire::native_header_size);
    if (whole && length <= max_message) {
      out = {length, 0, 0};
      return {};
    }
  }
  return check_native_frame_in_full(head, packet_size, max_message, out, why);
}

// Checks the fds that arrived for a frame with this header: `arrived` of them, cut short by the
// kernel if ctrunc (MSG_CTRUNC). In order: cut short: skipped, errc::fds_truncated; a count
// other than the header's: fatal, errc::protocol_error; more of the caller's fds than max_fds (a
// pool or memfd frame's first fd is duplex's own): skipped, errc::too_many_fds.
[[nodiscard]] frame_verdict check_frame_fds_in_full(const wire::native_header& h,
                                                    std::size_t arrived, bool ctrunc,
                                                    std::size_t max_fds, std::string& why);
[[nodiscard]] inline frame_verdict check_frame_fds(const wire::native_header& h,
                                                   std::size_t arrived, bool ctrunc,
                                                   std::size_t max_fds, std::string& why) {
  if (h.fd_count == 0 && arrived == 0 && !ctrunc) return {};  // inline, the common frame
  return check_frame_fds_in_full(h, arrived, ctrunc, max_fds, why);
}

// A descriptor frame's payload, decoded whole: the one of pool, shared or memfd its flags name.
struct descriptor {
  std::uint8_t flags = 0;  // wire::flag_pool, wire::flag_shared or wire::flag_memfd
  wire::pool_announce pool{};
  wire::shared_ref shared{};
  wire::memfd_ref memfd{};
};

// Decodes the payload of a frame with descriptor flags. Errors: errc::protocol_error (with why
// said) for a payload its flags do not describe, or flags that name no descriptor.
[[nodiscard]] result<descriptor> decode_descriptor(std::uint8_t flags,
                                                   std::span<const std::byte> payload,
                                                   std::string& why);

}  // namespace duplex::detail
