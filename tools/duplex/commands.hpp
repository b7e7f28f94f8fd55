// The subcommands of the duplex CLI. Each returns the process exit status: 0 on success, 1 on
// failure (after printing one line "duplex: ..." on stderr).
#pragma once

#include <string>
#include <string_view>
#include <system_error>

namespace duplex::cli {

// Runs one of the tutorial's scenarios: "fork", "dgram", "threads", or "all" of them in turn.
int run_demo(std::string_view scenario);

// Prints this system's facts for the library, as text or as one JSON object.
int run_info(bool json);

// Prints "duplex: <what>: <error message>" on stderr and returns exit status 1.
int report_failure(std::string_view what, const std::error_code& ec);

// Prints "duplex: <what>" on stderr and returns exit status 1.
int report_failure(std::string_view what);

}  // namespace duplex::cli
