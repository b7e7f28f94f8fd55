// Shared by the fuzz targets: reading the input as a stream of choices, and checking that an
// iteration left no fd behind.
#pragma once

#include <dirent.h>
#include <fcntl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <span>

namespace duplex::fuzz {

// Takes values off the front of the fuzzer's input; zeros once it runs out.
class input {
 public:
  input(const std::uint8_t* data, std::size_t size) : data_(data), size_(size) {}
  [[nodiscard]] bool empty() const noexcept { return at_ >= size_; }
  [[nodiscard]] std::uint8_t byte() noexcept { return at_ < size_ ? data_[at_++] : 0; }
  [[nodiscard]] std::uint16_t u16() noexcept {
    const std::uint16_t lo = byte();
    return static_cast<std::uint16_t>(lo | (byte() << 8));
  }
  // Up to n bytes, as they are.
  [[nodiscard]] std::span<const std::byte> bytes(std::size_t n) noexcept {
    if (at_ > size_) at_ = size_;
    if (n > size_ - at_) n = size_ - at_;
    const auto* p = reinterpret_cast<const std::byte*>(data_ + at_);
    at_ += n;
    return {p, n};
  }

 private:
  const std::uint8_t* data_;
  std::size_t size_;
  std::size_t at_ = 0;
};

// /dev/null, opened once and kept open: some_fd() duplicates it, which costs a fifth of opening
// it anew (opening was a fifth of an iteration of the decoder target).
inline int null_fd() {
  static const int fd = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
  if (fd < 0) std::abort();
  return fd;
}

// The number of open fds, from /proc/self/fd, read with getdents64 on a directory fd kept open
// for the purpose (not counted). Taken before and after each iteration: exact, whatever the
// fuzzing engine opens between iterations, and cheap enough for every iteration. The first call
// also opens null_fd(), so that it is part of every baseline.
inline int open_fds() {
  static const int dir = ::open("/proc/self/fd", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  static_cast<void>(null_fd());
  if (dir < 0 || ::lseek(dir, 0, SEEK_SET) != 0) std::abort();
  alignas(8) char buf[8192];
  int n = 0;
  for (;;) {
    const long got = ::syscall(SYS_getdents64, dir, buf, sizeof buf);
    if (got < 0) std::abort();
    if (got == 0) break;
    for (long at = 0; at < got;) {
      const auto* e = reinterpret_cast<const dirent64*>(buf + at);
      if (e->d_name[0] != '.') ++n;
      at += e->d_reclen;
    }
  }
  return n - 1;  // the directory fd itself
}

// Aborts (a crash the fuzzer reports) if the iteration left more fds open than it found.
inline void check_no_fd_leaked(int before) {
  const int now = open_fds();
  if (now != before) {
    std::fprintf(stderr, "fd leak: %d fds open before the iteration, %d after\n", before, now);
    std::abort();
  }
}

// A fresh fd to pass around: a close-on-exec duplicate of null_fd().
inline int some_fd() {
  const int fd = ::fcntl(null_fd(), F_DUPFD_CLOEXEC, 0);
  if (fd < 0) std::abort();
  return fd;
}

}  // namespace duplex::fuzz
