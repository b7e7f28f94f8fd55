// duplex/socket_pair.hpp - creating a connected pair of AF_UNIX sockets.
//
// socket_pair() is socketpair(2) with its traps removed: both ends are close-on-exec unless
// asked otherwise (a child started with exec never inherits an end by accident), and every
// failure comes back as an error_code naming the errno.
//
// Linux creates socket pairs only in the AF_UNIX (AF_LOCAL) domain. socketpair(AF_INET, ...)
// fails with EOPNOTSUPP (the family exists but has no pairs), an unknown family with
// EAFNOSUPPORT, and a protocol other than 0 (PF_UNSPEC) with EPROTONOSUPPORT.
//
//   auto pair = duplex::socket_pair(duplex::socket_kind::seqpacket);
//   if (!pair) { std::cerr << pair.error().message() << '\n'; return 1; }
//   duplex::socket parent_end = std::move(pair->first);
//   duplex::socket child_end = std::move(pair->second);
#pragma once

#include "duplex/error.hpp"
#include "duplex/socket.hpp"

namespace duplex {

// How a pair is created.
struct pair_options {
  // SOCK_CLOEXEC on both ends (the default): exec() closes them. Turn off only for an end you
  // are about to hand to an exec'd child yourself (spawn does this safely for you).
  bool close_on_exec = true;
  // SOCK_NONBLOCK on both ends: every call then behaves as with io_flags::dont_wait.
  bool non_blocking = false;
};

// The two connected ends of a pair. What one end sends, the other receives.
struct connected_pair {
  socket first;
  socket second;
};

// Creates a connected pair of AF_UNIX sockets of the given kind.
// Errors: EMFILE (process fd limit), ENFILE (system fd limit), ENOMEM/ENOBUFS (system_category).
[[nodiscard]] result<connected_pair> socket_pair(socket_kind kind,
                                                 pair_options options = {}) noexcept;

// socketpair(domain, type, protocol) as the system call takes it, for code written against the
// raw interface. SOCK_CLOEXEC is always added to type (SOCK_NONBLOCK is honoured if given).
// Errors (system_category, errno kept): EOPNOTSUPP (a family without pairs, e.g. AF_INET),
// EAFNOSUPPORT (unknown family), EPROTONOSUPPORT (protocol not 0 for AF_UNIX), ESOCKTNOSUPPORT
// or EPROTOTYPE (a type AF_UNIX lacks), EMFILE, ENFILE, EFAULT; errc::wrong_kind if the kernel
// made a pair of a type duplex does not model.
[[nodiscard]] result<connected_pair> socket_pair(int domain, int type, int protocol) noexcept;

}  // namespace duplex
