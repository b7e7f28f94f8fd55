// Internal: what kind of channel end an fd is, asked of the kernel without taking the fd. One
// check for socket::from_fd and inherited_channel. Not installed.
#pragma once

#include "duplex/error.hpp"
#include "duplex/socket.hpp"

namespace duplex::detail {

// An fd's kind and domain as a socket would hold them.
struct socket_shape {
  socket_kind kind = socket_kind::stream;
  socket_domain domain = socket_domain::local;
};

// Asks SO_DOMAIN, SO_TYPE (and for AF_INET/AF_INET6: SO_PROTOCOL and getpeername) what fd is.
// Errors: EBADF, ENOTSOCK (system); errc::wrong_kind (neither an AF_UNIX stream, datagram or
// seqpacket socket nor a connected TCP stream). The fd is neither taken nor changed.
[[nodiscard]] result<socket_shape> classify_socket(int fd) noexcept;

}  // namespace duplex::detail
