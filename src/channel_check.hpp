// Internal: the checks channel::create makes of a socket's kind and of its options, for callers
// that must refuse what create would refuse before they take ownership of an fd
// (inherited_channel). Not installed.
#pragma once

#include "duplex/channel.hpp"
#include "duplex/error.hpp"
#include "duplex/socket.hpp"

namespace duplex::detail {

// Succeeds if channel::create accepts a socket of this kind with these options. Errors:
// errc::wrong_kind (a datagram socket, or framing::python on a packet socket), EINVAL (an option
// out of range).
[[nodiscard]] result<void> check_channel(socket_kind kind, const channel_options& options);

}  // namespace duplex::detail
