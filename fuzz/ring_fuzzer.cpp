// Fuzz target 4: a ring_channel whose peer is the input. The peer completes the handshake by
// hand, maps both rings, and from then on the input writes anywhere in either of them (shared
// memory is the peer's to scribble on, the owner's own fields included), moves the positions,
// wakes the victim, closes its wake sockets and its socket, between the victim's try_send,
// try_receive and receive_into calls. No crash, no hang (every call is non-blocking), no fd leaked,
// and every error is one the header documents.
//
// Input: byte 0: bit 0 the victim's ring is 8 KiB (else 4 KiB), bit 1 the peer's is 8 KiB.
// Then operations, an op byte each (its low 3 bits):
//   0: a length byte and that many bytes, written into the victim's ring at a u16 offset
//   1: the same into the peer's own ring (the one the victim writes)
//   2: the victim's tail set to a u16 (a position the victim reads up to)
//   3: the peer's own head set to a u16 (how far the victim may write)
//   4: the victim try_sends a length byte's worth of bytes
//   5: the victim try_receives; 6: receive_into a 64-byte buffer, not waiting
//   7: bit 3 sends a wake on each of the victim's wake sockets; bit 4 closes the peer's socket;
//      bit 5 closes the victim's wake sockets (the peer's copies, the only ones)
// At the end the victim receives until it would block or stops for good.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdio>
#include <cstring>

#include "duplex/ring.hpp"
#include "duplex/socket_pair.hpp"
#include "fuzz_support.hpp"
#include "ring/ring_layout.hpp"

namespace {

using duplex::errc;

namespace layout = duplex::detail::ring_layout;
constexpr std::size_t header_page = layout::header_size;  // a ring's header; its data follows

// A mapping unmapped on scope exit.
class mapping {
 public:
  mapping(int fd, std::size_t size) : size_(size) {
    void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) std::abort();
    base_ = static_cast<std::byte*>(p);
  }
  ~mapping() { ::munmap(base_, size_); }
  mapping(const mapping&) = delete;
  mapping& operator=(const mapping&) = delete;

  void write(std::size_t at, std::span<const std::byte> bytes) {
    at %= size_;
    const std::size_t n = std::min(bytes.size(), size_ - at);
    if (n > 0) std::memcpy(base_ + at, bytes.data(), n);
  }
  void set_u64(std::size_t at, std::uint64_t v) { std::memcpy(base_ + at, &v, sizeof v); }

 private:
  std::byte* base_ = nullptr;
  std::size_t size_;
};

bool documented_receive_error(std::error_code e) {
  return e == errc::would_block || e == errc::timed_out || e == errc::peer_closed ||
         e == errc::protocol_error || e == errc::broken || e == errc::closed ||
         e == errc::buffer_too_small || e == std::errc::not_enough_memory;
}

bool documented_send_error(std::error_code e) {
  return e == errc::would_block || e == errc::message_too_large || e == errc::peer_closed ||
         e == errc::protocol_error || e == errc::broken || e == errc::closed;
}

// True while the victim may have more to give.
bool receive_once(duplex::ring_channel& victim, bool into) {
  std::error_code e;
  if (into) {
    std::array<std::byte, 64> buf{};
    auto r = victim.receive_into(buf, std::chrono::nanoseconds(0));
    if (r) {
      if (r->size > buf.size() || r->fds != 0) std::abort();
      return true;
    }
    e = r.error();
  } else {
    auto r = victim.try_receive();
    if (r) return true;
    e = r.error();
  }
  if (!documented_receive_error(e)) {
    std::fprintf(stderr, "ring_fuzzer: undocumented receive error %s\n", e.message().c_str());
    std::abort();
  }
  return false;
}

void run(duplex::fuzz::input& in) {
  const std::uint8_t setup = in.byte();
  const std::size_t victim_capacity = (setup & 1) != 0 ? 8192 : 4096;
  const std::size_t peer_capacity = (setup & 2) != 0 ? 8192 : 4096;

  auto pair = duplex::socket_pair(duplex::socket_kind::stream);
  if (!pair) return;
  // The peer's half of the handshake, sent before the victim starts, so create() never waits.
  duplex::unique_fd memfd(::memfd_create("fuzz-ring", MFD_CLOEXEC | MFD_ALLOW_SEALING));
  if (!memfd.valid() ||
      ::ftruncate(memfd.get(), static_cast<off_t>(header_page + peer_capacity)) != 0 ||
      ::fcntl(memfd.get(), F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW) != 0) {
    std::abort();
  }
  // The peer's wake sockets: it keeps the first end of each pair and sends the second.
  std::array<int, 2> data_bell{};
  std::array<int, 2> room_bell{};
  if (::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, data_bell.data()) != 0) std::abort();
  if (::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, room_bell.data()) != 0) std::abort();
  const std::array<duplex::unique_fd, 4> bells{
      duplex::unique_fd(data_bell[0]), duplex::unique_fd(data_bell[1]),
      duplex::unique_fd(room_bell[0]), duplex::unique_fd(room_bell[1])};
  layout::hello mine;
  mine.capacity = peer_capacity;
  mine.max_message_size = 2048;
  const std::array<duplex::const_buffer, 1> parts{
      duplex::const_buffer(reinterpret_cast<const std::byte*>(&mine), sizeof mine)};
  const std::array<int, layout::hello_fds> fds{memfd.get(), data_bell[1], room_bell[1]};
  if (!pair->second.send_msg(parts, fds)) std::abort();
  duplex::ring_options o;
  o.capacity = victim_capacity;
  o.max_message_size = 2048;
  o.max_peer_capacity = 8192;
  o.handshake_timeout = std::chrono::seconds(5);
  auto victim = duplex::ring_channel::create(std::move(pair->first), o);
  if (!victim) std::abort();  // the handshake above is well formed
  // The victim's hello: its ring and the sending ends of its two wake sockets.
  layout::hello theirs;
  std::array<duplex::unique_fd, layout::hello_fds> got;
  const std::array<duplex::mutable_buffer, 1> into{
      duplex::mutable_buffer(reinterpret_cast<std::byte*>(&theirs), sizeof theirs)};
  auto r = pair->second.receive_msg(into, got);
  if (!r || r->bytes != sizeof theirs || r->fds != layout::hello_fds ||
      theirs.capacity != victim_capacity) {
    std::abort();
  }
  mapping victims(got[0].get(), header_page + victim_capacity);
  mapping own(memfd.get(), header_page + peer_capacity);

  for (int guard = 0; guard < 4096 && !in.empty(); ++guard) {
    const std::uint8_t op = in.byte();
    switch (op & 7) {
      case 0: {
        const std::size_t at = in.u16();
        victims.write(at, in.bytes(in.byte()));
        break;
      }
      case 1: {
        const std::size_t at = in.u16();
        own.write(at, in.bytes(in.byte()));
        break;
      }
      case 2: victims.set_u64(layout::off_tail, in.u16()); break;
      case 3: own.set_u64(layout::off_head, in.u16()); break;
      case 4: {
        const auto payload = in.bytes(in.byte());
        auto s = victim->try_send(payload);
        if (!s && !documented_send_error(s.error())) {
          std::fprintf(stderr, "ring_fuzzer: undocumented send error %s\n",
                       s.error().message().c_str());
          std::abort();
        }
        break;
      }
      case 5: static_cast<void>(receive_once(*victim, false)); break;
      case 6: static_cast<void>(receive_once(*victim, true)); break;
      default: {
        if ((op & 8) != 0) {
          const char wake = 1;
          static_cast<void>(::send(got[1].get(), &wake, 1, MSG_DONTWAIT | MSG_NOSIGNAL));
          static_cast<void>(::send(got[2].get(), &wake, 1, MSG_DONTWAIT | MSG_NOSIGNAL));
        }
        if ((op & 16) != 0) pair->second.close();
        if ((op & 32) != 0) {
          got[1].reset();
          got[2].reset();
        }
        break;
      }
    }
  }
  for (int guard = 0; guard < 1024 && receive_once(*victim, false); ++guard) {
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const int baseline = duplex::fuzz::open_fds();
  duplex::fuzz::input in(data, size);
  run(in);
  duplex::fuzz::check_no_fd_leaked(baseline);
  return 0;
}
