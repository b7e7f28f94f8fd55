// The CLI's guard of fds 0, 1 and 2: run first in main, so that no fd the program opens later
// (a socket pair, a pidfd, an epoll) can take the number of a closed stdin, stdout or stderr.
#pragma once

#include <system_error>

namespace duplex::cli {

// Opens /dev/null on each of fds 0, 1 and 2 that is closed (fcntl(F_GETFD) fails with EBADF),
// in the mode contrary to the fd's use, as gnulib's stdopen does for coreutils: write-only on
// fd 0, read-only on fds 1 and 2. Reads of a closed stdin and writes to a closed stdout or stderr
// therefore still fail with EBADF, exactly as they would on the closed fd, but the numbers are
// taken. The fds are inherited (not close-on-exec): a child started with inherited stdio sees
// the same. Call it before anything else opens an fd. Returns the errno of the open that failed
// (e.g. ENOENT without /dev/null), with the fd still closed; the program should then stop.
[[nodiscard]] std::error_code keep_stdio_open() noexcept;

}  // namespace duplex::cli
