// `duplex bench` as the CLI sees it: its options, the command, and the end of its help text. The
// rest of tools/duplex/bench/ (the rows, their sessions, the report) stays behind this header.
#pragma once

#include <string>

namespace duplex::cli {

// What `duplex bench` was asked to do.
struct bench_options {
  bool quick = false;  // fewer sizes, repetitions and iterations: under 20 s
  std::string json;    // write the JSON report here ("-": stdout, instead of the table)
  std::string svg;     // write the SVG chart here
  std::string filter;  // name_filter: rows whose name it matches (empty: every row)
  bool list = false;   // print the chosen rows' names and measure nothing
};

// Measures duplex beside the raw syscalls, pipes and memcpy and prints the table and the goals.
// Returns 0, 2 for a bad --filter (invalid, or matching no row), 1 on failure (after printing
// one line "duplex: bench: ..." on stderr).
int run_bench(const bench_options& options);

// The end of `duplex bench --help`: row names, transports, how each row is measured.
std::string bench_help();

}  // namespace duplex::cli
