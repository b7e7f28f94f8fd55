// The checks of one native frame from the peer (see frame_check.hpp).
#include "framing/frame_check.hpp"

namespace duplex::detail {
namespace {

frame_verdict fatal(std::string& why, std::string text, errc e = errc::protocol_error) {
  why = std::move(text);
  return {frame_verdict::outcome::fatal, make_error_code(e)};
}

frame_verdict skip(errc e) { return {frame_verdict::outcome::skip, make_error_code(e)}; }

// What a frame with descriptor flags must hold (payload size, fd count): why it does not, or an
// empty string.
std::string check_descriptor_frame(std::uint8_t flags, std::uint64_t length, std::uint16_t fds) {
  switch (flags) {
    case 0: return {};
    case wire::flag_pool:
      if (length != wire::pool_announce_size) return "a pool frame's payload is not 16 bytes";
      if (fds != 1) return "a pool frame does not carry exactly one fd";
      return {};
    case wire::flag_shared:
      if (length != wire::shared_ref_size) return "a shared-memory frame's payload is not 24 bytes";
      return {};
    case wire::flag_memfd:
      if (length != wire::memfd_ref_size) return "a memfd frame's payload is not 8 bytes";
      if (fds < 1) return "a memfd frame carries no fd";
      return {};
    default: return "unknown frame flags";
  }
}

}  // namespace

frame_verdict length_refused(std::uint64_t length, std::size_t max_message, bool skippable,
                             std::string& why) {
  if (skippable) return skip(errc::message_too_large);
  return fatal(why,
               "message length " + std::to_string(length) + " is over the maximum " +
                   std::to_string(max_message),
               errc::message_too_large);
}

frame_verdict check_native_frame_in_full(std::span<const std::byte> head,
                                         std::optional<std::uint64_t> packet_size,
                                         std::size_t max_message, wire::native_header& out,
                                         std::string& why) {
  if (packet_size && *packet_size < wire::native_header_size) {
    return fatal(why, "a packet of " + std::to_string(*packet_size) +
                          " bytes is shorter than a frame header");
  }
  const auto bytes = head.first<wire::native_header_size>();
  auto h = wire::decode_native(bytes);
  if (!h) return fatal(why, wire::explain_native(bytes));
  if (packet_size && h->length != *packet_size - wire::native_header_size) {
    return fatal(why, "a header says " + std::to_string(h->length) +
                          " bytes and its packet holds " +
                          std::to_string(*packet_size - wire::native_header_size));
  }
  if (auto wrong = check_descriptor_frame(h->flags, h->length, h->fd_count); !wrong.empty()) {
    return fatal(why, std::move(wrong));
  }
  out = *h;
  return check_length(h->length, max_message, packet_size.has_value(), why);
}

frame_verdict check_frame_fds_in_full(const wire::native_header& h, std::size_t arrived,
                                      bool ctrunc, std::size_t max_fds, std::string& why) {
  if (ctrunc) return skip(errc::fds_truncated);
  if (arrived != h.fd_count) {
    return fatal(why, "a frame announced " + std::to_string(h.fd_count) + " fds and " +
                          (arrived == 0 ? std::string("none") : std::to_string(arrived)) +
                          " arrived");
  }
  // The memfd of a pool or memfd frame is duplex's own, not one of the caller's fds.
  const std::size_t own = h.flags == wire::flag_pool || h.flags == wire::flag_memfd ? 1 : 0;
  if (arrived - std::min(own, arrived) > max_fds) return skip(errc::too_many_fds);
  return {};
}

result<descriptor> decode_descriptor(std::uint8_t flags, std::span<const std::byte> payload,
                                     std::string& why) {
  descriptor d;
  d.flags = flags;
  switch (flags) {
    case wire::flag_pool:
      if (auto a = wire::decode_pool_announce(payload)) {
        d.pool = *a;
        return d;
      }
      why = "a malformed pool announce";
      break;
    case wire::flag_shared:
      if (auto r = wire::decode_shared_ref(payload)) {
        d.shared = *r;
        return d;
      }
      why = "a malformed shared-memory reference";
      break;
    case wire::flag_memfd:
      if (auto r = wire::decode_memfd_ref(payload)) {
        d.memfd = *r;
        return d;
      }
      why = "a malformed memfd reference";
      break;
    default: why = "unknown frame flags";
  }
  return fail(errc::protocol_error);
}

}  // namespace duplex::detail
