#include "duplex/socket_pair.hpp"

#include <sys/socket.h>

#include <cerrno>

namespace duplex {

result<connected_pair> socket_pair(socket_kind kind, pair_options options) noexcept {
  int type = to_socket_type(kind);
  if (options.close_on_exec) type |= SOCK_CLOEXEC;
  if (options.non_blocking) type |= SOCK_NONBLOCK;
  int sv[2] = {-1, -1};
  if (::socketpair(AF_UNIX, type, 0, sv) != 0) return fail_errno(errno);
  return connected_pair{socket(unique_fd(sv[0]), kind), socket(unique_fd(sv[1]), kind)};
}

result<connected_pair> socket_pair(int domain, int type, int protocol) noexcept {
  int sv[2] = {-1, -1};
  if (::socketpair(domain, type | SOCK_CLOEXEC, protocol, sv) != 0) return fail_errno(errno);
  unique_fd second(sv[1]);
  // Ask the kernel what it made rather than trusting the request: AF_UNIX turns SOCK_RAW into
  // SOCK_DGRAM, for instance.
  auto first = socket::from_fd(unique_fd(sv[0]));
  if (!first) return std::unexpected(first.error());
  const socket_kind kind = first->kind();
  return connected_pair{std::move(*first), socket(std::move(second), kind)};
}

}  // namespace duplex
