// Internal: the native frame header read as two little-endian 64-bit words, for the paths that
// read one header per small message (the stream decoder's fast path, decode_native). Not
// installed.
//
// Word 0: magic "DX", version, flags, fd count (16 bits), two reserved zero bytes. Word 1: the
// payload length. A frame with no flags and no fds has one fixed word 0, so one comparison
// checks everything but the length.
#pragma once

#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "duplex/framing.hpp"

namespace duplex::detail {

[[nodiscard]] inline std::uint64_t load_le64(const std::byte* in) noexcept {
  std::uint64_t v;
  std::memcpy(&v, in, sizeof v);
  if constexpr (std::endian::native == std::endian::big) v = __builtin_bswap64(v);
  return v;
}

// Word 0 of a native header with these flags and fd count: the first eight bytes that
// wire::encode_native writes, read back as a little-endian word (one definition of the layout).
[[nodiscard]] constexpr std::uint64_t native_word0(std::uint8_t flags,
                                                   std::uint16_t fd_count) noexcept {
  const auto bytes = wire::encode_native({0, fd_count, flags});
  std::uint64_t word = 0;
  for (std::size_t i = 0; i < 8; ++i)
    word |= std::to_integer<std::uint64_t>(bytes[i]) << (8 * i);
  return word;
}

// Word 0 of every frame that carries its bytes and no fds.
inline constexpr std::uint64_t plain_native_word0 = native_word0(0, 0);

}  // namespace duplex::detail
