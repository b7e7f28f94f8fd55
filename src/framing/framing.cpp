#include "duplex/framing.hpp"

#include "duplex/constants.hpp"
#include "framing/native_header.hpp"

#include <cstdio>

namespace duplex::wire {
namespace {

void put_le(std::byte* out, std::uint64_t v, int bytes) noexcept {
  for (int i = 0; i < bytes; ++i)
    out[i] = static_cast<std::byte>(v >> (8 * i));
}

std::uint64_t get_le(const std::byte* in, int bytes) noexcept {
  std::uint64_t v = 0;
  for (int i = bytes - 1; i >= 0; --i)
    v = (v << 8) | std::to_integer<std::uint64_t>(in[i]);
  return v;
}

void put_be(std::byte* out, std::uint64_t v, int bytes) noexcept {
  for (int i = 0; i < bytes; ++i)
    out[i] = static_cast<std::byte>(v >> (8 * (bytes - 1 - i)));
}

std::uint64_t get_be(const std::byte* in, int bytes) noexcept {
  std::uint64_t v = 0;
  for (int i = 0; i < bytes; ++i)
    v = (v << 8) | std::to_integer<std::uint64_t>(in[i]);
  return v;
}

}  // namespace

result<native_header> decode_native(std::span<const std::byte, native_header_size> b) noexcept {
  const std::uint64_t word0 = detail::load_le64(b.data());
  native_header h;
  h.length = detail::load_le64(b.data() + 8);
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
  put_le(&out[0], p.data_size, 8);
  put_le(&out[8], p.slots, 4);
  return out;
}

std::array<std::byte, shared_ref_size> encode(const shared_ref& r) noexcept {
  std::array<std::byte, shared_ref_size> out{};
  put_le(&out[0], r.slot, 4);
  put_le(&out[8], r.offset, 8);
  put_le(&out[16], r.length, 8);
  return out;
}

std::array<std::byte, memfd_ref_size> encode(const memfd_ref& r) noexcept {
  std::array<std::byte, memfd_ref_size> out{};
  put_le(&out[0], r.length, 8);
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
  return pool_announce{get_le(&b[0], 8), static_cast<std::uint32_t>(get_le(&b[8], 4))};
}

result<shared_ref> decode_shared_ref(std::span<const std::byte> b) noexcept {
  if (b.size() != shared_ref_size || !zero(b.subspan(4, 4))) return fail(errc::protocol_error);
  return shared_ref{static_cast<std::uint32_t>(get_le(&b[0], 4)), get_le(&b[8], 8),
                    get_le(&b[16], 8)};
}

result<memfd_ref> decode_memfd_ref(std::span<const std::byte> b) noexcept {
  if (b.size() != memfd_ref_size) return fail(errc::protocol_error);
  return memfd_ref{get_le(&b[0], 8)};
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
  const auto fds = static_cast<unsigned>(get_le(&b[4], 2));
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
    put_be(out.data(), length, 4);
    return 4;
  }
  put_be(out.data(), 0xffffffffU, 4);  // -1 as a 4-byte signed big-endian integer
  put_be(out.data() + 4, length, 8);
  return 12;
}

result<std::optional<python_header>> decode_python(std::span<const std::byte> b) noexcept {
  if (b.size() < 4) return std::optional<python_header>{};
  const auto raw = static_cast<std::uint32_t>(get_be(b.data(), 4));
  const auto size = static_cast<std::int32_t>(raw);
  if (size >= 0)
    return std::optional<python_header>{python_header{4, static_cast<std::uint64_t>(size)}};
  if (size != -1) return fail(errc::protocol_error);
  if (b.size() < 12) return std::optional<python_header>{};
  return std::optional<python_header>{python_header{12, get_be(b.data() + 4, 8)}};
}

}  // namespace duplex::wire
