// duplex/framing.hpp - the wire formats a channel speaks, as pure encode/decode functions.
//
// A channel cuts a byte stream into messages with one of two framings:
//
//   framing::native  duplex's own 16-byte header (version, flags, fd count, 64-bit length),
//                    documented byte by byte in docs/protocol.md. fds ride as SCM_RIGHTS with
//                    the first byte of their frame.
//   framing::python  exactly the framing of CPython's multiprocessing.connection.Connection
//                    (send_bytes / recv_bytes): a 4-byte big-endian signed length, or -1 followed
//                    by an 8-byte big-endian length for payloads over 2 GiB - 1. No fds.
//
// These functions touch no socket; the channel uses them, and so can a peer written by hand or a
// fuzzer. Every decode checks everything a peer could get wrong and never allocates.
#pragma once

#include <array>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>

#include "duplex/error.hpp"

namespace duplex {

// How a channel delimits messages on the wire.
enum class framing {
  native,  // duplex's header: lengths, fd counts, versioning; fds allowed.
  python,  // CPython multiprocessing.connection's length prefix; no fds.
};

namespace wire {

// Size of the native frame header.
inline constexpr std::size_t native_header_size = 16;

// The two magic bytes that open every native frame: "DX".
inline constexpr std::byte native_magic[2] = {std::byte{0x44}, std::byte{0x58}};

// The native format version this library writes and reads.
inline constexpr std::uint8_t native_version = 1;

// Frame flags (at most one is set). A frame without flags carries its message's bytes.
// The others carry a small descriptor instead, for payloads that travel in shared memory:
inline constexpr std::uint8_t flag_pool = 0x01;    // announces the sender's pool: pool_announce,
                                                   // with the pool's memfd as its only fd
inline constexpr std::uint8_t flag_shared = 0x02;  // a message in the pool: shared_ref
inline constexpr std::uint8_t flag_memfd = 0x04;   // a message in a sealed memfd of its own:
                                                   // memfd_ref, the memfd being its first fd
inline constexpr std::uint8_t known_flags = flag_pool | flag_shared | flag_memfd;

// A decoded native header.
struct native_header {
  std::uint64_t length = 0;    // payload bytes that follow the header
  std::uint16_t fd_count = 0;  // fds attached to the first byte of this frame (0..253)
  std::uint8_t flags = 0;      // 0, or one of the flags above

  friend bool operator==(const native_header&, const native_header&) = default;
};

// The payload of a flag_pool frame (16 bytes): the layout of the pool memfd that comes with it.
struct pool_announce {
  std::uint64_t data_size = 0;  // bytes of the data region
  std::uint32_t slots = 0;      // entries of the slot table
  friend bool operator==(const pool_announce&, const pool_announce&) = default;
};
inline constexpr std::size_t pool_announce_size = 16;

// The payload of a flag_shared frame (24 bytes): where the message is in the sender's pool.
struct shared_ref {
  std::uint32_t slot = 0;    // the slot the receiver marks released when done
  std::uint64_t offset = 0;  // in the data region
  std::uint64_t length = 0;  // the message's size
  friend bool operator==(const shared_ref&, const shared_ref&) = default;
};
inline constexpr std::size_t shared_ref_size = 24;

// The payload of a flag_memfd frame (8 bytes): the message's size in its memfd.
struct memfd_ref {
  std::uint64_t length = 0;
  friend bool operator==(const memfd_ref&, const memfd_ref&) = default;
};
inline constexpr std::size_t memfd_ref_size = 8;

// Encoders and decoders of the three descriptors (little-endian, reserved bytes zero). The
// decoders check the size and the reserved bytes: errc::protocol_error.
[[nodiscard]] std::array<std::byte, pool_announce_size> encode(const pool_announce& p) noexcept;
[[nodiscard]] std::array<std::byte, shared_ref_size> encode(const shared_ref& r) noexcept;
[[nodiscard]] std::array<std::byte, memfd_ref_size> encode(const memfd_ref& r) noexcept;
[[nodiscard]] result<pool_announce> decode_pool_announce(std::span<const std::byte> b) noexcept;
[[nodiscard]] result<shared_ref> decode_shared_ref(std::span<const std::byte> b) noexcept;
[[nodiscard]] result<memfd_ref> decode_memfd_ref(std::span<const std::byte> b) noexcept;

// Encodes a native header (little-endian fields). fd_count must be at most 253. Inline, and two
// 64-bit stores once compiled: a batch of small messages encodes one header per message.
[[nodiscard]] constexpr std::array<std::byte, native_header_size> encode_native(
    const native_header& h) noexcept {
  // Bytes 0-7: magic, version, flags, fd count, two reserved zero bytes. Bytes 8-15: length.
  struct words {
    std::uint64_t head;
    std::uint64_t length;
  };
  words w{std::to_integer<std::uint64_t>(native_magic[0]) |
              std::to_integer<std::uint64_t>(native_magic[1]) << 8 |
              std::uint64_t{native_version} << 16 | std::uint64_t{h.flags} << 24 |
              std::uint64_t{h.fd_count} << 32,
          h.length};
  if constexpr (std::endian::native == std::endian::big) {
    w.head = __builtin_bswap64(w.head);
    w.length = __builtin_bswap64(w.length);
  }
  return std::bit_cast<std::array<std::byte, native_header_size>>(w);
}

// Decodes and validates a native header: magic, version, flags (none, or exactly one known
// flag), reserved bytes (zero), fd count (at most 253). Errors: errc::protocol_error. The length is
// not checked here: the receiver compares it with its own maximum.
[[nodiscard]] result<native_header> decode_native(
    std::span<const std::byte, native_header_size> bytes) noexcept;

// Says in words what is wrong with a native header that decode_native rejects ("version 2 is
// not supported", ...), or returns an empty string if nothing is.
[[nodiscard]] std::string explain_native(std::span<const std::byte, native_header_size> bytes);

// Largest Python header: the -1 marker and an 8-byte length.
inline constexpr std::size_t python_max_header_size = 12;

// Lengths above this use the -1 marker and an 8-byte length (0x7fffffff, as CPython does).
inline constexpr std::uint64_t python_short_limit = 0x7fffffff;

// Encodes a Python length prefix into out; returns how many bytes it used (4 or 12).
std::size_t encode_python(std::uint64_t length,
                          std::span<std::byte, python_max_header_size> out) noexcept;

// A decoded Python length prefix.
struct python_header {
  std::size_t header_size = 0;  // 4, or 12 with the -1 marker
  std::uint64_t length = 0;     // payload bytes that follow
};

// Decodes a Python length prefix from the start of bytes: nullopt if more bytes are needed,
// errc::protocol_error for a negative length other than -1 (which CPython would misread as an
// empty message).
[[nodiscard]] result<std::optional<python_header>> decode_python(
    std::span<const std::byte> bytes) noexcept;

}  // namespace wire
}  // namespace duplex
