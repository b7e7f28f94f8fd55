// The subcommands of the duplex CLI. Each returns the process exit status: 0 on success, 1 on
// failure (after printing one line "duplex: ..." on stderr).
#pragma once

#include <string>
#include <string_view>
#include <vector>

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

// What `duplex bench` was asked to do.
struct bench_options {
  bool quick = false;  // fewer sizes, repetitions and iterations: under 20 s
  std::string json;    // write the JSON report here ("-": stdout, instead of the table)
  std::string svg;     // write the SVG chart here
  std::string filter;  // name_filter: rows whose name it matches (empty: every row)
  bool list = false;   // print the chosen rows' names and measure nothing
};

// Measures duplex beside the raw syscalls, pipes and memcpy and prints the table and the goals.
// Returns 0, 2 for a bad --filter (invalid, or matching no row), 1 on failure.
int run_bench(const bench_options& options);

// The end of `duplex bench --help`: row names, transports, how each row is measured.
std::string bench_help();

}  // namespace duplex::cli
