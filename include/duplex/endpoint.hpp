// duplex/endpoint.hpp - channels between unrelated processes and hosts: addresses, listeners,
// connect, and CPython multiprocessing.connection's authentication handshake.
//
// A listener binds an address (a unix socket path, a name in Linux's abstract namespace, or a
// TCP host and port) and accepts connections from any process that connects to it; each one,
// once authenticated, is an ordinary `channel` with the listener's channel_options and the same
// promises as a channel of a pair. connect() is the other side. With an authkey, both sides run
// CPython's HMAC challenge-response (mutual: the listener challenges first, then answers the
// client's challenge), so a CPython `multiprocessing.connection.Listener(authkey=...)` or
// `Client(authkey=...)` is a valid peer of either. docs/endpoints.md has the handshake byte by
// byte, what crosses a host and what does not, and the limits that keep hostile clients from
// taking a listener down.
//
//   auto at = duplex::address::parse("unix:/run/app.sock");
//   auto l = duplex::listener::listen(*at, {.endpoint = {.authkey = key}});
//   auto conn = l->accept(5s);           // a channel, and who is at its other end
//   auto ch = duplex::connect(*at, {.authkey = key}, 5s);
//
// Threads: a listener's calls may be made from several threads (accept serialises them); a
// connection's channel is a channel like any other.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

#include "duplex/channel.hpp"
#include "duplex/error.hpp"
#include "duplex/fd.hpp"
#include "duplex/socket.hpp"

namespace duplex {

// What an address names.
enum class address_kind {
  unix_path,      // a filesystem socket: "unix:PATH"
  unix_abstract,  // a name in Linux's abstract namespace: "unix:@NAME"
  tcp,            // a host (IPv4, [IPv6] or a name) and a port: "tcp:HOST:PORT"
};

// The longest unix path, and the longest abstract name, an address can hold (sun_path's 108
// bytes, less the path's terminating NUL or the abstract name's leading one).
inline constexpr std::size_t max_unix_path_size = 107;

// The longest host an address can hold (a DNS name's limit).
inline constexpr std::size_t max_host_size = 253;

// Where an endpoint is, in one canonical text form that parse() reads and to_string() writes:
//   unix:/run/app.sock     a filesystem socket (any path, relative ones too)
//   unix:@app              an abstract name (Linux; no file, gone with its last socket)
//   tcp:127.0.0.1:7000     IPv4
//   tcp:[::1]:7000         IPv6, in brackets
//   tcp:example.org:7000   a name, resolved by getaddrinfo when connecting or listening
// Port 0 means "any free port" to a listener (listener::local_address() says which). A value.
class address {
 public:
  // An empty address (a unix path ""); connect and listen refuse it (EINVAL).
  address() = default;

  // Reads the text form. Errors: EINVAL for anything malformed (no "unix:" or "tcp:" scheme, an
  // empty path or name, one longer than max_unix_path_size, a NUL byte, a host without a port,
  // a port that is not a number from 0 to 65535, an IPv6 address without brackets, a bracketed
  // host that is not an IPv6 address, an empty host or one over max_host_size or with a space
  // or control byte). describe_address_error() says in words what is wrong.
  [[nodiscard]] static result<address> parse(std::string_view text);

  // A filesystem socket path. Errors: EINVAL (empty, over max_unix_path_size, or a NUL byte).
  [[nodiscard]] static result<address> unix_path(std::string_view path);

  // An abstract name (without the '@'). Errors: EINVAL (empty, over max_unix_path_size bytes,
  // or a NUL byte).
  [[nodiscard]] static result<address> unix_abstract(std::string_view name);

  // A TCP host (an IPv4 or IPv6 address without brackets, or a name) and port. Errors: EINVAL
  // (as parse).
  [[nodiscard]] static result<address> tcp(std::string_view host, std::uint16_t port);

  [[nodiscard]] address_kind kind() const noexcept { return kind_; }

  // The path (unix_path), the name without '@' (unix_abstract), or the host without brackets.
  [[nodiscard]] const std::string& name() const noexcept { return name_; }

  // The port (tcp), else 0.
  [[nodiscard]] std::uint16_t port() const noexcept { return port_; }

  // The canonical text form; parse(to_string()) gives this address back.
  [[nodiscard]] std::string to_string() const;

  friend bool operator==(const address&, const address&) = default;

 private:
  address_kind kind_ = address_kind::unix_path;
  std::string name_;
  std::uint16_t port_ = 0;
};

// Why `text` is not an address, in words ("port '70000' is over 65535", "an IPv6 host must be
// in brackets: tcp:[::1]:PORT", ...); empty if it is one.
[[nodiscard]] std::string describe_address_error(std::string_view text);

// TCP keepalive probes (SO_KEEPALIVE, TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT): a connection
// whose peer host vanished is reported dead after idle + interval * count instead of never.
struct tcp_keepalive {
  bool enabled = false;
  std::chrono::seconds idle{60};      // quiet time before the first probe (1 s to 32767 s)
  std::chrono::seconds interval{10};  // between probes (1 s to 32767 s)
  int count = 5;                      // unanswered probes before the connection is dead (1-127)
};

// How a connection is set up, on either side.
struct endpoint_options {
  // The socket kind on unix addresses (stream or seqpacket); tcp is always a stream.
  socket_kind kind = socket_kind::stream;
  // The options of each connection's channel. On tcp, shared_memory.enabled is refused
  // (errc::not_supported): a pool is memory of this host.
  channel_options channel{};
  // The shared secret of the handshake; empty: no handshake (then a CPython peer must have no
  // authkey either). Read it with read_authkey_file or read_authkey_fd, never from a command
  // line. Both sides must agree on whether there is one: a side with a key waiting for a
  // challenge that a side without one never sends fails at its timeout.
  std::vector<std::byte> authkey;
  // Whether HMAC-MD5 is accepted from a peer that speaks the legacy handshake (CPython 3.11 and
  // earlier) and used to answer such a peer. False: a legacy peer fails authentication.
  bool allow_legacy_md5 = true;
  // TCP_NODELAY on tcp connections: each message leaves at once rather than waiting to be
  // gathered with the next (Nagle's algorithm would delay a small reply by up to 40 ms).
  bool tcp_nodelay = true;
  // Keepalive on tcp connections.
  tcp_keepalive keepalive{};
};

// One failed incoming connection, as a listener reports it (listener_options::on_failure).
struct accept_failure {
  // Who it was: "tcp:[::1]:53124", or on unix "unix peer pid 4242 uid 1000".
  std::string peer;
  // What went wrong: errc::authentication_failed, errc::timed_out (the handshake deadline
  // passed), errc::protocol_error (a malformed or oversized handshake message), EACCES (a uid
  // not allowed), errc::peer_closed (it left mid-handshake), EMFILE/ENFILE (no fd to take it
  // with: it was accepted and closed at once), or another error of its socket.
  std::error_code error;
  // The same in words, with details ("answer of 300 bytes is over 256").
  std::string detail;
};

// How a listener accepts.
struct listener_options {
  endpoint_options endpoint{};
  // listen(2)'s backlog: connections the kernel completes and queues before accept takes them.
  int backlog = 128;
  // The most connections in the handshake at once (at least 1); more wait in the backlog.
  std::size_t max_handshakes = 64;
  // Each connection's whole handshake must end within this, however its bytes trickle in
  // (a client that sends nothing, or a byte a second, is dropped when it passes).
  std::chrono::nanoseconds handshake_timeout = std::chrono::seconds(10);
  // Unix only: accept only peers whose uid (SO_PEERCRED) is one of these, checked before any
  // byte is read or written; empty: any uid.
  std::vector<uid_t> allowed_uids;
  // Called (on the accepting thread, inside accept) for each connection that failed before it
  // became a channel (that connection is closed once the call returns). Optional; failures()
  // counts them either way. Must not call accept or close on this listener; an exception it
  // throws leaves accept (the listener stays usable).
  std::function<void(const accept_failure&)> on_failure;
};

// An accepted connection: a channel, and who is at its other end.
struct connection {
  channel chan;
  // tcp: the peer's address ("tcp:192.0.2.7:53124"); unix: the peer's own bound address, which
  // is usually none (an empty unix_path).
  address peer;
  // unix: the connecting process's credentials, as the kernel recorded them at connect(2).
  std::optional<credentials> peer_credentials;
  // unix: a pidfd of the connecting process (close-on-exec), when one could be had: from
  // SO_PEERPIDFD (Linux 6.5+), which names that process for sure; on older kernels from
  // pidfd_open(peer_credentials->pid), which races with the pid's reuse: if the connecting
  // process exited and its pid was reused between connect and this call, the pidfd names the
  // new process. Empty if neither worked (the process has already exited, or no pidfds).
  unique_fd peer_pidfd;
};

// A listening endpoint. Move-only; the destructor closes it, and removes the unix socket file
// it created (only if that file is still the one it bound).
class listener {
 public:
  // An empty listener; accept returns errc::closed.
  listener() noexcept;

  // Binds and listens. A tcp host that is a name is resolved (getaddrinfo, blocking) and the
  // first address that binds is used; tcp listeners set SO_REUSEADDR, and an IPv6 one accepts
  // IPv6 only. A unix path where a socket file already exists is taken over only if nothing
  // listens on it (a connect is tried: refused means stale, and the file is replaced); anything
  // else there is left alone: EADDRINUSE. Errors: EINVAL (an empty address; kind datagram, or
  // seqpacket on tcp; max_handshakes 0; an option channel::create would refuse),
  // errc::not_supported (shared memory asked on tcp), EADDRINUSE, EACCES, ENOENT (the path's
  // directory does not exist), EAI errors of getaddrinfo as EHOSTUNREACH (the name did not
  // resolve), and those of socket/bind/listen.
  [[nodiscard]] static result<listener> listen(const address& at, listener_options options = {});

  listener(listener&&) noexcept;
  listener& operator=(listener&&) noexcept;
  ~listener();

  // Waits up to timeout for the next connection to be accepted and, with an authkey,
  // authenticated, and returns it as a channel (blocking, with the listener's channel_options).
  // Handshakes run concurrently inside accept, each with its own deadline; a connection that
  // fails (authentication, deadline, a malformed message, a uid not allowed, its peer leaving)
  // is closed, counted and reported to on_failure, and accept goes on with the next. Handshakes
  // still in progress when accept returns carry on in the next accept call.
  // Errors (the listener's own only): errc::timed_out, errc::closed (close() was called, also
  // from another thread while accept waited), ENOMEM, and errors of epoll_wait.
  [[nodiscard]] result<connection> accept(std::chrono::nanoseconds timeout = forever);

  // The address bound: with its real port when listen was given port 0.
  [[nodiscard]] const address& local_address() const noexcept;

  // An fd for poll, epoll or waiter::add_fd, readable when accept(0) may make progress: a
  // connection waits in the backlog (while fewer than max_handshakes are in progress), a
  // handshake's bytes arrived or it can write, a handshake's deadline passed, or close() was
  // called. Call accept(0) then, which may still return errc::timed_out (a handshake moved on
  // but is not done): wait again. It is an epoll fd, not the listening socket. -1 once closed.
  // Owned here.
  [[nodiscard]] int native_handle() const noexcept;

  // How many incoming connections have failed so far (see on_failure).
  [[nodiscard]] std::uint64_t failures() const noexcept;

  // The last failure, or nullopt if none.
  [[nodiscard]] std::optional<accept_failure> last_failure() const;

  // Stops listening: closes the fd and every connection in handshake, removes the socket file
  // it created, and wakes an accept waiting in another thread (errc::closed). Idempotent.
  void close() noexcept;

 private:
  struct impl;
  std::unique_ptr<impl> impl_;
};

// Connects to a listening endpoint and, with an authkey, runs the handshake (answering the
// listener's challenge, then challenging it), all within timeout. A tcp name is resolved with
// getaddrinfo (blocking; it is not interrupted by the timeout, which counts it) and each of its
// addresses is tried in turn. The channel is blocking, with options.channel. Errors: EINVAL (an
// empty address or a port 0; kind datagram, or seqpacket on tcp; options channel::create
// refuses), errc::not_supported (shared memory asked on tcp), errc::timed_out,
// errc::authentication_failed (a wrong key on either side, or a legacy peer with
// allow_legacy_md5 off), errc::protocol_error (the peer's handshake messages are malformed),
// errc::peer_closed (the listener closed the connection, e.g. it refused our uid),
// ECONNREFUSED, ENOENT (no socket at that path), EHOSTUNREACH (the name did not resolve), and
// connect's other errors. Nothing is left open on error.
[[nodiscard]] result<channel> connect(const address& to, const endpoint_options& options = {},
                                      std::chrono::nanoseconds timeout = forever);

// connect, with on failure a description in words put in *detail (which handshake message was
// wrong, which address refused): for logs and the CLI's one-line errors.
[[nodiscard]] result<channel> connect(const address& to, const endpoint_options& options,
                                      std::chrono::nanoseconds timeout, std::string& detail);

// The largest authkey read_authkey_file and read_authkey_fd accept: 64 KiB.
inline constexpr std::size_t max_authkey_size = std::size_t{64} << 10;

// Reads an authkey: every byte of the file, as CPython's `open(path, 'rb').read()` would (no
// newline is stripped). Errors: EINVAL (the file is empty), EFBIG (over max_authkey_size), and
// those of open and read.
[[nodiscard]] result<std::vector<std::byte>> read_authkey_file(const std::string& path);

// Reads an authkey from fd to its end (a pipe, or a file from its current offset); fd stays
// open and the caller's. Errors as read_authkey_file.
[[nodiscard]] result<std::vector<std::byte>> read_authkey_fd(int fd);

}  // namespace duplex
