#include "duplex/error.hpp"

#include <string>

namespace duplex {
namespace {

class category_impl final : public std::error_category {
 public:
  const char* name() const noexcept override { return "duplex"; }

  std::string message(int value) const override {
    switch (static_cast<errc>(value)) {
      case errc::peer_closed: return "peer closed its end";
      case errc::message_too_large: return "message larger than the allowed maximum";
      case errc::truncated_message: return "stream ended inside a message";
      case errc::buffer_too_small: return "message larger than the receive buffer";
      case errc::fds_truncated:
        return "file descriptors were cut short in transit (MSG_CTRUNC); all received were closed";
      case errc::too_many_fds: return "too many file descriptors for one message";
      case errc::protocol_error: return "peer broke the protocol";
      case errc::broken: return "channel is broken by an earlier protocol error";
      case errc::would_block: return "operation would block";
      case errc::timed_out: return "operation timed out";
      case errc::not_supported: return "not supported by this kernel";
      case errc::wrong_kind: return "wrong kind of socket for this operation";
      case errc::closed: return "this end was closed";
      case errc::not_inherited: return "no channel was inherited (DUPLEX_FD is not set)";
      case errc::queue_full: return "the outgoing queue is full";
      case errc::bad_environment: return "DUPLEX_FD is set, but not to an fd number";
      case errc::reentrant_call:
        return "receive called from inside a receive_batch callback of the same channel";
      case errc::authentication_failed: return "the peer failed authentication, or refused ours";
    }
    return "unknown duplex error " + std::to_string(value);
  }

  std::error_condition default_error_condition(int value) const noexcept override {
    switch (static_cast<errc>(value)) {
      case errc::would_block: return std::errc::operation_would_block;
      case errc::timed_out: return std::errc::timed_out;
      case errc::message_too_large: return std::errc::message_size;
      case errc::not_supported: return std::errc::not_supported;
      default: return {value, *this};
    }
  }
};

}  // namespace

const std::error_category& error_category() noexcept {
  static const category_impl instance;
  return instance;
}

std::string_view to_string(errc e) noexcept {
  switch (e) {
    case errc::peer_closed: return "peer_closed";
    case errc::message_too_large: return "message_too_large";
    case errc::truncated_message: return "truncated_message";
    case errc::buffer_too_small: return "buffer_too_small";
    case errc::fds_truncated: return "fds_truncated";
    case errc::too_many_fds: return "too_many_fds";
    case errc::protocol_error: return "protocol_error";
    case errc::broken: return "broken";
    case errc::would_block: return "would_block";
    case errc::timed_out: return "timed_out";
    case errc::not_supported: return "not_supported";
    case errc::wrong_kind: return "wrong_kind";
    case errc::closed: return "closed";
    case errc::not_inherited: return "not_inherited";
    case errc::queue_full: return "queue_full";
    case errc::bad_environment: return "bad_environment";
    case errc::reentrant_call: return "reentrant_call";
    case errc::authentication_failed: return "authentication_failed";
  }
  return "unknown";
}

}  // namespace duplex
