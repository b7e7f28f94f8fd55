#include "duplex/framing.hpp"

#include "base/byte_order.hpp"
#include "duplex/constants.hpp"
#include "framing/native_header.hpp"

#include <cstdio>

namespace duplex::wire {
using detail::load_be;
using detail::load_le;
using detail::store_be;
using detail::store_le;

result<native_header> decode_native(std::span<const std::byte, native_header_size> b) noexcept {
  const std::uint64_t word0 = load_le<8>(b.data());
  native_header h;
  h.length = load_le<8>(b.data() + 8);
  if (word0 == detail::plain_native_word0) return h;  // the common case: no flags, no fds
  h.flags = static_cast<std::uint8_t>(word0 >> 24);
  h.fd_count = static_cast<std::uint16_t>(word0 >> 32);
  // Magic, version and the reserved bytes: all of word 0 but the flags and the fd count.
  if (word0 != detail::native_word0(h.flags, h.fd_count)) return fail(errc::protocol_error);
  // Unknown flags, or more than one: a frame this end cannot read correctly.
  if ((h.flags & ~known_flags) != 0 || (h.flags & (h.flags - 1)) != 0)
    return fail(errc::protocol_error);
  if (h.fd_count > max_fds_per_message) return fail(errc::protocol_error);
  return h;
}

std::array<std::byte, pool_announce_size> encode(const pool_announce& p) noexcept {
  std::array<std::byte, pool_announce_size> out{};
  store_le<8>(&out[0], p.data_size);
  store_le<4>(&out[8], p.slots);
  return out;
}

std::array<std::byte, shared_ref_size> encode(const shared_ref& r) noexcept {
  std::array<std::byte, shared_ref_size> out{};
  store_le<4>(&out[0], r.slot);
  store_le<8>(&out[8], r.offset);
  store_le<8>(&out[16], r.length);
  return out;
}

std::array<std::byte, memfd_ref_size> encode(const memfd_ref& r) noexcept {
  std::array<std::byte, memfd_ref_size> out{};
  store_le<8>(&out[0], r.length);
  return out;
}

namespace {

bool zero(std::span<const std::byte> b) noexcept {
  for (auto x : b) {
    if (x != std::byte{0}) return false;
  }
  return true;
}

}  // namespace

result<pool_announce> decode_pool_announce(std::span<const std::byte> b) noexcept {
  if (b.size() != pool_announce_size || !zero(b.subspan(12))) return fail(errc::protocol_error);
  return pool_announce{load_le<8>(&b[0]), static_cast<std::uint32_t>(load_le<4>(&b[8]))};
}

result<shared_ref> decode_shared_ref(std::span<const std::byte> b) noexcept {
  if (b.size() != shared_ref_size || !zero(b.subspan(4, 4))) return fail(errc::protocol_error);
  return shared_ref{static_cast<std::uint32_t>(load_le<4>(&b[0])), load_le<8>(&b[8]),
                    load_le<8>(&b[16])};
}

result<memfd_ref> decode_memfd_ref(std::span<const std::byte> b) noexcept {
  if (b.size() != memfd_ref_size) return fail(errc::protocol_error);
  return memfd_ref{load_le<8>(&b[0])};
}

std::string explain_native(std::span<const std::byte, native_header_size> b) {
  auto byte = [&b](std::size_t i) { return std::to_integer<unsigned>(b[i]); };
  char text[96];
  if (b[0] != native_magic[0] || b[1] != native_magic[1]) {
    std::snprintf(text, sizeof text, "bad magic 0x%02x 0x%02x (a native frame starts with \"DX\")",
                  byte(0), byte(1));
    return text;
  }
  if (byte(2) != native_version) {
    std::snprintf(text, sizeof text, "frame version %u is not supported (this end speaks %u)",
                  byte(2), unsigned{native_version});
    return text;
  }
  if ((byte(3) & ~unsigned{known_flags}) != 0 || (byte(3) & (byte(3) - 1)) != 0) {
    std::snprintf(text, sizeof text, "unknown frame flags 0x%02x", byte(3));
    return text;
  }
  const auto fds = static_cast<unsigned>(load_le<2>(&b[4]));
  if (fds > max_fds_per_message) {
    std::snprintf(text, sizeof text, "frame announces %u fds (at most %zu)", fds,
                  max_fds_per_message);
    return text;
  }
  if (b[6] != std::byte{0} || b[7] != std::byte{0}) return "reserved header bytes are not zero";
  return {};
}

std::size_t encode_python(std::uint64_t length,
                          std::span<std::byte, python_max_header_size> out) noexcept {
  if (length <= python_short_limit) {
    store_be<4>(out.data(), length);
    return 4;
  }
  store_be<4>(out.data(), 0xffffffffU);  // -1 as a 4-byte signed big-endian integer
  store_be<8>(out.data() + 4, length);
  return 12;
}

result<std::optional<python_header>> decode_python(std::span<const std::byte> b) noexcept {
  if (b.size() < 4) return std::optional<python_header>{};
  const auto raw = static_cast<std::uint32_t>(load_be<4>(b.data()));
  const auto size = static_cast<std::int32_t>(raw);
  if (size >= 0)
    return std::optional<python_header>{python_header{4, static_cast<std::uint64_t>(size)}};
  if (size != -1) return fail(errc::protocol_error);
  if (b.size() < 12) return std::optional<python_header>{};
  return std::optional<python_header>{python_header{12, load_be<8>(b.data() + 4)}};
}

}  // namespace duplex::wire
