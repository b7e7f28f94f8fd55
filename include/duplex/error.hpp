// duplex/error.hpp - the error model: duplex::errc, its category, and result<T>.
//
// Every fallible call in duplex returns `result<T>`, a `std::expected<T, std::error_code>`.
// Failures of a system call keep their errno in `std::system_category()`; conditions that are
// duplex's own (a peer that closed, a message over a limit, a broken frame) carry a
// `duplex::errc` in `duplex::error_category()`. Would-block and timeout are ordinary results
// (`errc::would_block`, `errc::timed_out`), never exceptions.
//
//   duplex::result<std::size_t> n = sock.receive(buf);
//   if (!n && n.error() == duplex::errc::peer_closed) { /* orderly end */ }
//
// docs/errors.md lists every error each call can return.
#pragma once

#include <expected>
#include <string_view>
#include <system_error>
#include <type_traits>

namespace duplex {

// The outcome of a fallible call: a value, or the error that prevented it. Accessing the value
// of a result that holds an error throws std::bad_expected_access; it never yields a default.
template <typename T>
using result = std::expected<T, std::error_code>;

// duplex's own error conditions. Each maps to the closest std::errc where one exists (see
// default_error_condition), so `ec == std::errc::timed_out` also holds for errc::timed_out.
enum class errc : int {
  // The peer closed its end (end-of-stream); everything it sent before was delivered.
  peer_closed = 1,
  // A message is larger than a limit: the receiver's maximum, or the kernel's packet limit.
  message_too_large,
  // The stream ended (or a packet ended) inside a message: the peer died mid-message.
  truncated_message,
  // A packet was larger than the caller's buffer; the kernel discarded the rest of it.
  buffer_too_small,
  // Control data (fds) was cut short in transit (MSG_CTRUNC), e.g. at RLIMIT_NOFILE; every fd
  // that did arrive has been closed.
  fds_truncated,
  // More fds than allowed: over 253 (SCM_MAX_FD) to send, or more arrived than the receiver
  // accepts. Nothing was sent / every fd that arrived has been closed.
  too_many_fds,
  // The peer sent bytes that break the protocol (bad header, length, flag or version).
  protocol_error,
  // An earlier protocol error left this object unusable; every later call returns this.
  broken,
  // A non-blocking operation could not proceed now; retry when ready.
  would_block,
  // A timeout elapsed before the operation could complete.
  timed_out,
  // This kernel lacks the feature the call needs (e.g. SO_PEERPIDFD before Linux 6.5).
  not_supported,
  // The operation does not apply to this kind of socket (e.g. receive_exact on a packet socket),
  // or an fd handed to duplex is not the kind of socket expected.
  wrong_kind,
  // This end was closed (channel::close); the call was not attempted.
  closed,
  // No channel was inherited: DUPLEX_FD is not set.
  not_inherited,
  // A channel's outgoing queue is full: try_send took nothing; flush when writable and retry.
  queue_full,
  // DUPLEX_FD is set, but not to an fd number (digits only, within int): the environment that
  // was to name an inherited channel is malformed. describe_inherited_error() shows the value.
  bad_environment,
  // A receive call was made on a channel from inside that channel's own receive_batch callback,
  // on the thread running it: it cannot proceed until the callback returns, so it was refused
  // at once (nothing consumed). Receive after the batch instead.
  reentrant_call,
  // An endpoint's handshake failed: the peer's key is not ours (its answer to our challenge was
  // wrong, or it refused ours), or it speaks only the legacy HMAC-MD5 form and that is refused
  // (endpoint_options::allow_legacy_md5). The connection was closed.
  authentication_failed,
};

// The category of duplex::errc; its name is "duplex".
[[nodiscard]] const std::error_category& error_category() noexcept;

// Makes an error_code of duplex's category; found by ADL so `ec == errc::peer_closed` works.
[[nodiscard]] inline std::error_code make_error_code(errc e) noexcept {
  return {static_cast<int>(e), error_category()};
}

// A short, stable identifier of a duplex::errc ("peer_closed", ...), for logs and JSON.
[[nodiscard]] std::string_view to_string(errc e) noexcept;

// Shorthand for `std::unexpected(make_error_code(e))`, for returning from result<T> functions.
[[nodiscard]] inline std::unexpected<std::error_code> fail(errc e) noexcept {
  return std::unexpected(make_error_code(e));
}

// Shorthand for the failure of a system call with the given errno (system_category).
[[nodiscard]] inline std::unexpected<std::error_code> fail_errno(int err) noexcept {
  return std::unexpected(std::error_code(err, std::system_category()));
}

}  // namespace duplex

template <>
struct std::is_error_code_enum<duplex::errc> : std::true_type {};
