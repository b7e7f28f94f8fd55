#include "duplex/message.hpp"

#include <cstring>

namespace duplex {

message::message(const_buffer bytes, std::vector<unique_fd> fds)
    : data_(bytes.empty() ? nullptr : std::make_unique_for_overwrite<std::byte[]>(bytes.size())),
      size_(bytes.size()),
      fds_(std::move(fds)) {
  if (!bytes.empty()) std::memcpy(data_.get(), bytes.data(), bytes.size());
}

message message::with_size(std::size_t size) {
  message m;
  if (size > 0) m.data_ = std::make_unique_for_overwrite<std::byte[]>(size);
  m.size_ = size;
  return m;
}

}  // namespace duplex
