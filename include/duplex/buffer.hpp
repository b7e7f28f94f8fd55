// duplex/buffer.hpp - byte views used by every send and receive call.
//
// A buffer is a std::span of bytes: it never owns memory. Scatter/gather calls take a span of
// buffers, which is turned into one iovec array for one syscall.
//
//   std::string_view hello = "hello";
//   sock.send(duplex::as_bytes(hello));
#pragma once

#include <cstddef>
#include <span>
#include <string>
#include <string_view>

namespace duplex {

// A read-only view of bytes to send.
using const_buffer = std::span<const std::byte>;

// A writable view of bytes to receive into.
using mutable_buffer = std::span<std::byte>;

// Views the characters of a string as bytes (no copy; the string must outlive the view).
[[nodiscard]] inline const_buffer as_bytes(std::string_view s) noexcept {
  return {reinterpret_cast<const std::byte*>(s.data()), s.size()};
}

// Views the characters of a string as writable bytes (no copy).
[[nodiscard]] inline mutable_buffer as_writable_bytes(std::string& s) noexcept {
  return {reinterpret_cast<std::byte*>(s.data()), s.size()};
}

// Views bytes as characters (no copy), e.g. to print a received text message.
[[nodiscard]] inline std::string_view as_string_view(const_buffer b) noexcept {
  return {reinterpret_cast<const char*>(b.data()), b.size()};
}

}  // namespace duplex
