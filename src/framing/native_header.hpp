// Internal: the native frame header read as two little-endian 64-bit words, for the paths that
// read one header per small message (the stream decoder's fast path, decode_native). Not
// installed.
//
// Word 0: magic "DX", version, flags, fd count (16 bits), two reserved zero bytes. Word 1: the
// payload length. A frame with no flags and no fds has one fixed word 0, so one comparison
// checks everything but the length.
#pragma once

#include <cstddef>
#include <cstdint>

#include "base/byte_order.hpp"
#include "duplex/framing.hpp"

namespace duplex::detail {

// Word 0 of a native header with these flags and fd count: the first eight bytes that
// wire::encode_native writes, read back as a little-endian word (one definition of the layout).
[[nodiscard]] constexpr std::uint64_t native_word0(std::uint8_t flags,
                                                   std::uint16_t fd_count) noexcept {
  const auto bytes = wire::encode_native({0, fd_count, flags});
  return load_le<8>(bytes.data());
}

// Word 0 of every frame that carries its bytes and no fds.
inline constexpr std::uint64_t plain_native_word0 = native_word0(0, 0);

}  // namespace duplex::detail
