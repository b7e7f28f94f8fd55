#include "duplex/batch.hpp"

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstring>
#include <new>
#include <stdexcept>

#include "duplex/socket.hpp"

namespace duplex {

result<void> batch::add(const_buffer bytes, std::span<const int> fds) {
  if (fds.size() > max_fds_per_message) return fail(errc::too_many_fds);
  if (format_ == framing::python && !fds.empty()) return fail(errc::not_supported);
  const std::size_t offset = wire_.size();
  std::size_t head = wire::native_header_size;
  std::array<std::byte, wire::python_max_header_size> python{};
  if (format_ == framing::python) head = wire::encode_python(bytes.size(), python);
  // Room first, all of it: once the bytes are in, nothing may fail and leave a frame without its
  // fds. A reserve or resize that throws changes nothing, so the batch is as it was.
  try {
    if (!fds.empty()) {
      fd_frames_.reserve(fd_frames_.size() + 1);
      fds_.reserve(fds_.size() + fds.size());
    }
    wire_.resize(offset + head + bytes.size());  // grows geometrically; the new bytes are written
  } catch (const std::bad_alloc&) {
    return fail_errno(ENOMEM);
  } catch (const std::length_error&) {
    return fail_errno(ENOMEM);
  }
  std::byte* out = wire_.data() + offset;
  if (format_ == framing::native) {
    const auto native =
        wire::encode_native({bytes.size(), static_cast<std::uint16_t>(fds.size()), 0});
    std::memcpy(out, native.data(), head);
  } else {
    std::memcpy(out, python.data(), head);
  }
  if (bytes.size() <= small_message) {
    copy_small(out + head, bytes.data(), bytes.size());
  } else {
    std::memcpy(out + head, bytes.data(), bytes.size());
  }
  if (!fds.empty()) {
    fd_frames_.push_back({offset, fds_.size(), fds.size()});
    fds_.insert(fds_.end(), fds.begin(), fds.end());
  }
  ++count_;
  largest_ = std::max<std::uint64_t>(largest_, bytes.size());
  return {};
}

}  // namespace duplex
