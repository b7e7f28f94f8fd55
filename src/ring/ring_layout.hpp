// Internal: the shared-memory layout of a ring_channel's rings and its handshake, as
// docs/protocol.md describes them. Used by ring.cpp and by the ring fuzz target, which plays a
// hand-made peer. Not installed.
//
// A ring is a memfd of one header page and `capacity` bytes of data. The owner (the receiver)
// writes head, closed and reader_sleeping; the peer (the sender) writes tail, writer_waiting and
// the data between tail and head + capacity. Each writer's fields sit on cache lines of their
// own. Positions count bytes from the start and never wrap; a record is an 8-byte header (the
// payload's length, then 4 zero bytes) and the payload, padded to 8 bytes, so a header never
// straddles the end of the data.
#pragma once

#include <cstddef>
#include <cstdint>

namespace duplex::detail::ring_layout {

constexpr std::size_t header_size = 4096;
constexpr std::size_t off_magic = 0;
constexpr std::size_t off_capacity = 8;
constexpr std::size_t off_head = 64;
constexpr std::size_t off_closed = 72;
constexpr std::size_t off_tail = 128;
constexpr std::size_t off_reader_sleeping = 192;
constexpr std::size_t off_writer_waiting = 256;
constexpr std::uint64_t ring_magic = 0x31474e4952585044;  // "DPXRING1", little-endian
constexpr std::size_t record_header = 8;
constexpr std::size_t min_capacity = 4096;
constexpr std::size_t max_capacity = std::size_t{1} << 30;

constexpr std::uint64_t record_size(std::uint64_t payload) noexcept {
  return record_header + ((payload + 7) & ~std::uint64_t{7});
}

// The handshake each end sends, with three fds: its ring's memfd, then the sending ends of its two
// wake sockets (AF_UNIX seqpacket pairs it made and keeps the other ends of): the peer sends a
// byte on the first to wake it when it sleeps for data, on the second when it waits for room.
constexpr std::uint32_t ring_version = 2;
struct hello {
  std::uint64_t magic = ring_magic;
  std::uint32_t version = ring_version;
  std::uint32_t flags = 0;
  std::uint64_t capacity = 0;
  std::uint64_t max_message_size = 0;
  std::uint64_t reserved = 0;
};
static_assert(sizeof(hello) == 40);
constexpr std::size_t hello_fds = 3;

}  // namespace duplex::detail::ring_layout
