// The CLI's output to stdout and its one-line failures on stderr (see report.hpp).
#include "report.hpp"

#include <fmt/core.h>

#include <cerrno>
#include <cstdio>
#include <iostream>

namespace duplex::cli {

// fputs rather than fmt::print, which throws when stderr cannot be written: there is nowhere left
// to say so, and the exit status still tells.
int report_failure(std::string_view what, const std::error_code& ec) {
  std::fputs(fmt::format("duplex: {}: {}\n", what, ec.message()).c_str(), stderr);
  return 1;
}

int report_failure(std::string_view what) {
  std::fputs(fmt::format("duplex: {}\n", what).c_str(), stderr);
  return 1;
}

int report_usage(std::string_view what) {
  std::fputs(fmt::format("duplex: {}\n", what).c_str(), stderr);
  return 2;
}

namespace {
// The first error that lost output to stdout (0: none). stdio drops its buffer when a flush fails
// and keeps only the error flag, so the reason is kept here for finish_output.
int stdout_errno = 0;

bool stdout_failed(int err) noexcept {
  if (stdout_errno == 0) stdout_errno = err != 0 ? err : EIO;
  return false;
}
}  // namespace

bool write_stdout(std::string_view text) noexcept {
  if (std::fwrite(text.data(), 1, text.size(), stdout) != text.size()) {
    return stdout_failed(errno);
  }
  return true;
}

bool flush_stdout() noexcept {
  if (std::fflush(stdout) != 0) return stdout_failed(errno);
  return true;
}

int finish_output(int status) noexcept {
  // std::cout writes through stdout's stdio buffer, flushed first so that the reason of a failure
  // is kept; then std::cout's own state.
  const bool flushed = flush_stdout() && !std::cout.flush().bad();
  if (status != 0) return status;
  if (!flushed || std::ferror(stdout) != 0) {
    if (stdout_errno == 0) return report_failure("write error");
    return report_failure("write error", std::error_code(stdout_errno, std::system_category()));
  }
  return 0;
}

}  // namespace duplex::cli
