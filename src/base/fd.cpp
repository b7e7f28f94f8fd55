#include "duplex/fd.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>

namespace duplex {

void unique_fd::reset(int fd) noexcept {
  if (fd < 0) fd = -1;
  if (fd_ == fd) return;
  const int old = std::exchange(fd_, fd);
  // Never retried: Linux releases the fd even when close() is interrupted.
  if (old >= 0) static_cast<void>(::close(old));
}

result<unique_fd> duplicate(int fd) noexcept {
  const int copy = ::fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (copy < 0) return fail_errno(errno);
  return unique_fd{copy};
}

}  // namespace duplex
