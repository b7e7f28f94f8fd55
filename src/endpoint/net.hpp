// Internal: what the listener and connect share: socket addresses of an endpoint address,
// checks of endpoint options, tcp socket options, and the handshake driven over a non-blocking
// socket. Not installed.
#pragma once

#include <sys/socket.h>

#include <chrono>
#include <string>
#include <vector>

#include "duplex/endpoint.hpp"
#include "endpoint/handshake.hpp"

namespace duplex::detail {

// One socket address to bind or connect to.
struct sock_address {
  sockaddr_storage storage{};
  socklen_t size = 0;

  [[nodiscard]] const sockaddr* get() const noexcept {
    return reinterpret_cast<const sockaddr*>(&storage);
  }
  [[nodiscard]] int family() const noexcept { return storage.ss_family; }
};

// The socket addresses of a: one for unix, those getaddrinfo gives for tcp (passive: to bind).
// Errors: EINVAL (an empty address), EHOSTUNREACH (the name did not resolve; *detail says why),
// ENOMEM.
[[nodiscard]] result<std::vector<sock_address>> resolve(const address& a, bool passive,
                                                        std::string& detail);

// The address of a socket address (tcp, or a bound unix one; an unnamed one is an empty path).
[[nodiscard]] address to_address(const sockaddr_storage& s, socklen_t size);

// What connect and listen refuse before any syscall: EINVAL (an empty address, datagram, or
// seqpacket on tcp, or an option channel::create refuses), errc::not_supported (shared memory
// on tcp).
[[nodiscard]] result<void> check_endpoint(const address& a, const endpoint_options& o);

// Sets TCP_NODELAY and keepalive as options say. Errors: those of setsockopt.
[[nodiscard]] result<void> set_tcp_options(int fd, const endpoint_options& o);

// Moves the handshake's bytes over a non-blocking socket as far as they go without blocking.
// Returns the poll events to wait for before calling again (POLLIN or POLLOUT), or 0 once the
// handshake is done. Errors: the handshake's (after a best-effort write of its "#FAILURE#"),
// errc::peer_closed (the peer closed or reset the connection), errc::protocol_error (a packet
// over the limit), and the socket's own.
[[nodiscard]] result<short> pump(int fd, socket_kind kind, handshake& hs);

// Clears O_NONBLOCK and makes a channel of a connected socket. Errors: those of fcntl and
// channel::create.
[[nodiscard]] result<channel> make_channel(unique_fd fd, socket_kind kind, socket_domain domain,
                                           const channel_options& o);

}  // namespace duplex::detail
