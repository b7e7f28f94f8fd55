// The subcommands of the duplex CLI. Each returns the process exit status: 0 on success, 1 on
// failure (after printing one line "duplex: ..." on stderr). `duplex bench`, a library of its own
// in bench/, is declared in bench/command.hpp, included here.
#pragma once

#include <chrono>
#include <cstddef>
#include <limits>
#include <string>
#include <string_view>
#include <vector>

#include "bench/command.hpp"
#include "duplex/channel.hpp"
#include "duplex/endpoint.hpp"

namespace duplex::cli {

// Runs one of the tutorial's scenarios: "fork", "dgram", "threads", or "all" of them in turn.
int run_demo(std::string_view scenario);

// Prints this system's facts for the library, as text or as one JSON object. A fact that could
// not be measured is printed as such (null in the JSON, named under "not_measured"); the status is
// then 1, after everything else was printed, with one line on stderr.
int run_info(bool json);

// What `duplex run` was asked to do.
struct run_options {
  socket_kind kind = socket_kind::stream;
  framing format = framing::native;
  int fd = 3;
  std::vector<std::string> command;  // argv of the child
};

// Runs a command holding a channel end: stdin lines become messages to it, its messages become
// stdout lines. Returns the child's exit code (128 + signal if killed); 2 if options.fd is not
// below RLIMIT_NOFILE's soft limit; 1, after killing and reaping the child, if it could not
// start, broke the protocol, or a line could not be sent, stdin read or stdout written. Does not
// return when duplex must die of a signal (SIGTERM, SIGINT, SIGHUP, SIGQUIT: passed on to the
// child first; SIGPIPE: stdout's reader left); the child is reaped before. Installs signal
// handlers for the rest of the process: call it once, from the main thread.
int run_command(const run_options& options);

// What `duplex connect` and `duplex serve` share: where, how, and the key.
struct endpoint_command_options {
  address at;
  socket_kind kind = socket_kind::stream;  // on unix addresses; tcp is always a stream
  framing format = framing::native;
  std::string authkey_file;  // empty: no handshake
};

// What `duplex connect` was asked to do.
struct connect_options : endpoint_command_options {
  std::chrono::nanoseconds timeout = forever;  // for the connection and its handshake
};

// Connects to an endpoint and relays as `duplex run` does (relay.hpp): stdin lines become
// messages, messages become stdout lines. Returns 0 once the peer has closed (and every message
// was printed); 1 with one line on stderr if the authkey file cannot be read, the connection is
// refused or times out, authentication fails, or the peer breaks the protocol (and on the
// relay's own failures). Dies of a signal as `duplex run` does. Call it once, from the main
// thread.
int connect_command(const connect_options& options);

// What `duplex serve` was asked to do.
struct serve_options : endpoint_command_options {
  std::size_t max_clients = std::numeric_limits<std::size_t>::max();  // children at once
  bool once = false;                 // serve one connection, exit with CMD's status
  std::vector<std::string> command;  // argv of each child
};

// Listens, and for each connection that authenticates starts the command holding it as its
// channel end (fd 3, DUPLEX_FD), at most max_clients at once. Returns, once every child has been
// reaped: 0 after SIGINT or SIGTERM (which stop the accepting); with once, the child's status
// (128 + N for signal N); 1 with one line on stderr if the listener cannot be made, the authkey
// file read, the command started, or accept fails. Each refused client is one line on stderr
// ("duplex: serve: PEER: WHY") and serving goes on. Call it once, from the main thread.
int serve_command(const serve_options& options);

}  // namespace duplex::cli
