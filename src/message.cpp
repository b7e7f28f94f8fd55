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

message message::view(const std::byte* data, std::size_t size, std::shared_ptr<const void> keeper,
                      std::vector<unique_fd> fds) {
  message m;
  m.view_ = data;
  m.size_ = size;
  m.keeper_ = keeper ? std::move(keeper) : std::make_shared<int>(0);
  m.fds_ = std::move(fds);
  return m;
}

void message::materialize() {
  auto copy = size_ > 0 ? std::make_unique_for_overwrite<std::byte[]>(size_) : nullptr;
  if (size_ > 0) std::memcpy(copy.get(), view_, size_);
  data_ = std::move(copy);
  view_ = nullptr;
  keeper_.reset();
}

}  // namespace duplex
