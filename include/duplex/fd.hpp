// duplex/fd.hpp - unique_fd, the one owner of a file descriptor.
//
// Every fd duplex creates or receives is held by exactly one unique_fd until it is closed or
// released. unique_fd is move-only, converts to nothing implicitly, and closes in its destructor
// without retrying on EINTR (on Linux the fd is released even when close() reports EINTR, so a
// retry could close an fd another thread has just opened).
//
//   duplex::unique_fd fd{::open("/etc/hostname", O_RDONLY | O_CLOEXEC)};
//   if (!fd.valid()) { ... }
//   int raw = fd.release();  // the caller owns raw now
#pragma once

#include <utility>

#include "duplex/error.hpp"

namespace duplex {

// Owns one file descriptor (or none: -1). Not thread-safe: one owner, one thread at a time, like
// any value type. Closing is noexcept; the result of close() is ignored (there is no way to
// recover an fd whose close failed, and the fd is gone either way).
class unique_fd {
 public:
  // An empty owner (holds -1).
  constexpr unique_fd() noexcept = default;

  // Takes ownership of fd (may be -1 for empty). Explicit: owning is never implied.
  constexpr explicit unique_fd(int fd) noexcept : fd_(fd < 0 ? -1 : fd) {}

  // Takes the other's fd; the other becomes empty.
  constexpr unique_fd(unique_fd&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}

  // Closes the fd held, then takes the other's; the other becomes empty. Self-move is a no-op.
  unique_fd& operator=(unique_fd&& other) noexcept {
    if (this != &other) reset(other.release());
    return *this;
  }

  unique_fd(const unique_fd&) = delete;
  unique_fd& operator=(const unique_fd&) = delete;

  // Closes the fd held, if any.
  ~unique_fd() { reset(); }

  // The fd held, or -1. Ownership stays here.
  [[nodiscard]] constexpr int get() const noexcept { return fd_; }

  // True if an fd is held.
  [[nodiscard]] constexpr bool valid() const noexcept { return fd_ >= 0; }

  // Gives up ownership: returns the fd (or -1) and leaves this empty. The caller must close it.
  [[nodiscard]] constexpr int release() noexcept { return std::exchange(fd_, -1); }

  // Closes the fd held (if any) and takes ownership of fd. reset(get()) is a no-op.
  void reset(int fd = -1) noexcept;

  // Exchanges the fds of two owners.
  friend constexpr void swap(unique_fd& a, unique_fd& b) noexcept { std::swap(a.fd_, b.fd_); }

 private:
  int fd_ = -1;
};

// Duplicates fd into a new close-on-exec fd (F_DUPFD_CLOEXEC) owned by the result.
// Errors: EBADF, EMFILE, ENFILE (system_category).
[[nodiscard]] result<unique_fd> duplicate(int fd) noexcept;

}  // namespace duplex
