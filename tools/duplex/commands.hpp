// The subcommands of the duplex CLI. Each returns the process exit status: 0 on success, 1 on
// failure (after printing one line "duplex: ..." on stderr). `duplex bench`, a library of its own
// in bench/, is declared in bench/command.hpp, included here.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "bench/command.hpp"
#include "duplex/channel.hpp"

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

}  // namespace duplex::cli
