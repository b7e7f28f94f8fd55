#include "duplex/batch.hpp"

#include <array>
#include <cstring>

#include "duplex/socket.hpp"

namespace duplex {

result<void> batch::add(const_buffer bytes) { return add(bytes, {}); }

result<void> batch::add(const_buffer bytes, std::span<const int> fds) {
  if (fds.size() > max_fds_per_message) return fail(errc::too_many_fds);
  if (format_ == framing::python && !fds.empty()) return fail(errc::not_supported);
  const std::size_t offset = wire_.size();
  std::size_t head = 0;
  if (format_ == framing::native) {
    const auto h = wire::encode_native({bytes.size(), static_cast<std::uint16_t>(fds.size()), 0});
    wire_.insert(wire_.end(), h.begin(), h.end());
    head = h.size();
  } else {
    std::array<std::byte, wire::python_max_header_size> h{};
    head = wire::encode_python(bytes.size(), h);
    wire_.insert(wire_.end(), h.begin(), h.begin() + static_cast<std::ptrdiff_t>(head));
  }
  wire_.insert(wire_.end(), bytes.begin(), bytes.end());
  frames_.push_back({offset, head + bytes.size(), fds_.size(), fds.size(), bytes.size()});
  fds_.insert(fds_.end(), fds.begin(), fds.end());
  return {};
}

}  // namespace duplex
