// Internal: making an anonymous memory file, for the shared-memory pool and the ring alike.
// Not installed.
#pragma once

#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>

#include "duplex/error.hpp"
#include "duplex/fd.hpp"

namespace duplex::detail {

// A new memfd of `size` bytes (zero-filled), close-on-exec and open to sealing, so that its
// maker can seal it before a peer maps it. Errors: the errno of memfd_create or ftruncate
// (EMFILE, ENFILE, ENOMEM, EFBIG, ...).
[[nodiscard]] inline result<unique_fd> new_memfd(const char* name, std::size_t size) noexcept {
  unique_fd fd(::memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING));
  if (!fd.valid()) return fail_errno(errno);
  if (::ftruncate(fd.get(), static_cast<off_t>(size)) != 0) return fail_errno(errno);
  return fd;
}

}  // namespace duplex::detail
