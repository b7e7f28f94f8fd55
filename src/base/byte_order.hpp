// Internal: fixed-width integers read from and written to bytes in a stated byte order, for every
// wire format duplex speaks (the native frame header and descriptors are little-endian, CPython's
// length prefix big-endian). Not installed.
#pragma once

#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace duplex::detail {

// The N-byte little-endian unsigned integer at in (N from 1 to 8).
template <std::size_t N>
[[nodiscard]] constexpr std::uint64_t load_le(const std::byte* in) noexcept {
  static_assert(N >= 1 && N <= 8);
  if constexpr (N == 8) {
    if (!std::is_constant_evaluated()) {  // one load: the stream decoder reads a header this way
      std::uint64_t v;
      std::memcpy(&v, in, sizeof v);
      if constexpr (std::endian::native == std::endian::big) v = __builtin_bswap64(v);
      return v;
    }
  }
  std::uint64_t v = 0;
  for (std::size_t i = N; i-- > 0;)
    v = (v << 8) | std::to_integer<std::uint64_t>(in[i]);
  return v;
}

// Writes the low N bytes of v at out, little-endian.
template <std::size_t N>
constexpr void store_le(std::byte* out, std::uint64_t v) noexcept {
  static_assert(N >= 1 && N <= 8);
  for (std::size_t i = 0; i < N; ++i)
    out[i] = static_cast<std::byte>(v >> (8 * i));
}

// The N-byte big-endian unsigned integer at in (N from 1 to 8).
template <std::size_t N>
[[nodiscard]] constexpr std::uint64_t load_be(const std::byte* in) noexcept {
  static_assert(N >= 1 && N <= 8);
  std::uint64_t v = 0;
  for (std::size_t i = 0; i < N; ++i)
    v = (v << 8) | std::to_integer<std::uint64_t>(in[i]);
  return v;
}

// Writes the low N bytes of v at out, big-endian.
template <std::size_t N>
constexpr void store_be(std::byte* out, std::uint64_t v) noexcept {
  static_assert(N >= 1 && N <= 8);
  for (std::size_t i = 0; i < N; ++i)
    out[i] = static_cast<std::byte>(v >> (8 * (N - 1 - i)));
}

}  // namespace duplex::detail
