// Internal: the checks channel::create makes of a socket's kind and of its options, for callers
// that must refuse what create would refuse before they take ownership of an fd
// (inherited_channel). Not installed.
#pragma once

#include "duplex/channel.hpp"
#include "duplex/error.hpp"
#include "duplex/socket.hpp"

namespace duplex::detail {

// Succeeds if channel::create accepts a socket of this kind with these options. Errors:
// errc::wrong_kind (a datagram socket, or framing::python on a packet socket); EINVAL for the first
// option out of its documented range (channel.hpp): format or shared_memory.receive not one of
// their enumerators; max_message_size 0; max_fds over 253; receive_buffer_size over
// max_receive_buffer_size; busy_poll negative or over max_busy_poll; shared_memory.pool_size 0 or
// over max_shared_pool_size; shared_memory.slots 0 or over max_shared_pool_slots. Allocates
// nothing.
[[nodiscard]] result<void> check_channel(socket_kind kind, const channel_options& options);

}  // namespace duplex::detail
