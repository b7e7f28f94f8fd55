// The CLI's guard of fds 0, 1 and 2 (see stdio.hpp).
#include "stdio.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>

namespace duplex::cli {

std::error_code keep_stdio_open() noexcept {
  for (int fd = STDIN_FILENO; fd <= STDERR_FILENO; ++fd) {
    if (::fcntl(fd, F_GETFD) != -1 || errno != EBADF) continue;
    // The contrary mode keeps the meaning of the closed fd: `duplex run <&-` is a read error
    // (EBADF) and `>&-` a write error, as for `cat <&-` and `echo >&-`, rather than an empty
    // input or output silently thrown away. Only the number is held.
    const int mode = fd == STDIN_FILENO ? O_WRONLY : O_RDONLY;
    const int got = ::open("/dev/null", mode);  // the lowest free number: fd itself
    if (got < 0) return {errno, std::system_category()};
    if (got != fd) {  // cannot happen while the lower fds are open; never leave it elsewhere
      ::close(got);
      return {EBADF, std::system_category()};
    }
  }
  return {};
}

}  // namespace duplex::cli
