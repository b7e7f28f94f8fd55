// What every command of the duplex CLI says and how it ends: output to stdout whose loss is kept
// and reported at the end, and the one-line failures on stderr with their exit status. Used by
// main and by every command; it depends on nothing else in the CLI.
#pragma once

#include <string_view>
#include <system_error>

namespace duplex::cli {

// Writes text to stdout (through stdio's buffer). False if it was lost; the first such error is
// kept for finish_output, which reports it.
bool write_stdout(std::string_view text) noexcept;

// Flushes stdout. False if that lost output; the error is kept for finish_output.
bool flush_stdout() noexcept;

// The end of every command (and of --help and --version): flushes stdout and returns status, or,
// when status is 0 but output to stdout was lost (a full disk, a closed pipe), prints
// "duplex: write error: <why>" on stderr and returns 1. A nonzero status is returned as it is: the
// command has reported its own failure.
int finish_output(int status) noexcept;

// The report_* functions never throw: a stderr that cannot be written loses the line, and the
// exit status still tells.

// Prints "duplex: <what>: <error message>" on stderr and returns exit status 1.
int report_failure(std::string_view what, const std::error_code& ec);

// Prints "duplex: <what>" on stderr and returns exit status 1.
int report_failure(std::string_view what);

// Prints "duplex: <what>" on stderr and returns exit status 2 (bad usage).
int report_usage(std::string_view what);

}  // namespace duplex::cli
