#include "duplex/message.hpp"

#include <cstring>

namespace duplex {

void message::make_room(std::size_t size) {
  data_ = size > inline_capacity ? std::make_unique_for_overwrite<std::byte[]>(size) : nullptr;
  size_ = size;
}

message::message(const_buffer bytes, std::vector<unique_fd> fds) : fds_(std::move(fds)) {
  make_room(bytes.size());
  if (!bytes.empty()) std::memcpy(owned_bytes(), bytes.data(), bytes.size());
}

void message::assign(const_buffer bytes) {
  if (bytes.size() <= inline_capacity && !data_ && !keeper_) {
    // The common case of a small message received into a fresh one: no temporary.
    if (!bytes.empty()) std::memmove(inline_.data(), bytes.data(), bytes.size());
    size_ = bytes.size();
    fds_.clear();
    return;
  }
  *this = message(bytes);  // copied before this message's own bytes are let go
}

message message::with_size(std::size_t size) {
  message m;
  m.make_room(size);
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
  const std::byte* from = view_;
  make_room(size_);  // throws before anything changes if the memory cannot be had
  if (size_ > 0) std::memcpy(owned_bytes(), from, size_);
  view_ = nullptr;
  keeper_.reset();
}

}  // namespace duplex
