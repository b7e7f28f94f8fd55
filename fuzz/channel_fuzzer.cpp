// Fuzz target 2: bytes pushed through a real socketpair into a channel, in slices the input
// chooses (stream) or as packets (seqpacket), some with fds attached: /dev/null, or memfds sealed
// or not (so that shared-memory frames can be tried). Then the channel receives, in every way it
// can, until it would block, the peer is gone, or it is broken. No crash, no hang, no fd leaked.
//
// Input: byte 0: bit 0 seqpacket, bit 1 python framing (streams only), bit 2 close the writer
// afterwards, bits 3-4 receive style, bits 5-7 max message size (2^(8+2k)). Then chunks: a
// control byte (bits 0-1: fds, bit 2: fds are memfds, bit 3: seal them), a length byte, bytes.
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <array>
#include <vector>

#include "duplex/channel.hpp"
#include "duplex/socket_pair.hpp"
#include "fuzz_support.hpp"

namespace {

// A memfd of 8 KiB made once, sealed against writing and resizing or not, kept open for the whole
// run. Every fd the input attaches is a fresh duplicate of one of these (or of /dev/null): the
// receiver sees the same file type, seals, size and contents as with a new memfd (seals belong to
// the file; it reads them, stats and maps; the only thing it may write is an unsealed pool's slot
// table, which reset_memfd() zeroes before every iteration). Creating, sizing and finally freeing
// a memfd per fd was half of an iteration's time.
int memfd_once(bool seal) {
  const int fd = ::memfd_create("fuzz", MFD_CLOEXEC | MFD_ALLOW_SEALING);
  if (fd < 0 || ::ftruncate(fd, 8192) != 0) std::abort();
  if (seal && ::fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE) != 0) {
    std::abort();
  }
  return fd;
}

int shared_memfd(bool seal) {
  static const int open = memfd_once(false);
  static const int sealed = memfd_once(true);
  return seal ? sealed : open;
}

// Back to a new memfd's zeros, for an iteration that does not depend on the ones before it.
void reset_memfd() {
  static const std::array<char, 8192> zeros{};
  if (::pwrite(shared_memfd(false), zeros.data(), zeros.size(), 0) != 8192) std::abort();
}

int make_fd(bool memfd, bool seal) {
  if (!memfd) return duplex::fuzz::some_fd();
  const int fd = ::fcntl(shared_memfd(seal), F_DUPFD_CLOEXEC, 0);
  if (fd < 0) std::abort();
  return fd;
}

void receive_all(duplex::channel& ch, int style) {
  std::array<std::byte, 512> buf{};
  std::array<duplex::unique_fd, 4> fds;
  for (int guard = 0; guard < 10000; ++guard) {
    duplex::result<std::size_t> got = std::size_t{0};
    switch (style) {
      case 0: {
        auto m = ch.try_receive();
        if (!m) got = std::unexpected(m.error());
        break;
      }
      case 1: {
        auto m = ch.receive(std::chrono::nanoseconds(0));
        if (!m) got = std::unexpected(m.error());
        break;
      }
      case 2: {
        auto m = ch.receive_into(buf, fds, std::chrono::nanoseconds(0));
        if (!m && m.error() == duplex::errc::buffer_too_small) {
          auto whole = ch.try_receive();  // the message waits for a bigger buffer: take it
          if (!whole) got = std::unexpected(whole.error());
        } else if (!m) {
          got = std::unexpected(m.error());
        }
        for (auto& fd : fds)
          fd.reset();
        break;
      }
      default: got = ch.try_receive_batch([](duplex::message_view&) {}); break;
    }
    if (!got) {
      const auto e = got.error();
      if (e == duplex::errc::would_block || e == duplex::errc::timed_out ||
          e == duplex::errc::peer_closed || e == duplex::errc::broken || ch.is_broken()) {
        return;
      }
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  reset_memfd();  // which also opens the memfds before the first count, like null_fd()
  const int baseline = duplex::fuzz::open_fds();
  duplex::fuzz::input in(data, size);
  {
    const std::uint8_t setup = in.byte();
    const auto kind =
        (setup & 1) != 0 ? duplex::socket_kind::seqpacket : duplex::socket_kind::stream;
    duplex::channel_options o;
    if ((setup & 2) != 0 && kind == duplex::socket_kind::stream) o.format = duplex::framing::python;
    o.max_message_size = std::size_t{1} << (8 + 2 * ((setup >> 5) & 7));
    o.max_fds = 3;
    o.receive_buffer_size = 128;
    o.shared_memory.max_peer_pool = 1 << 20;
    auto pair = duplex::socket_pair(kind, {.non_blocking = true});
    if (!pair) return 0;
    auto ch = duplex::channel::create(std::move(pair->first), o);
    if (!ch) return 0;
    duplex::socket& writer = pair->second;
    while (!in.empty()) {
      const std::uint8_t control = in.byte();
      const auto chunk = in.bytes(in.byte());
      std::vector<duplex::unique_fd> owned;
      std::vector<int> fds;
      for (int i = 0; i < (control & 3); ++i) {
        owned.emplace_back(make_fd((control & 4) != 0, (control & 8) != 0));
        fds.push_back(owned.back().get());
      }
      const std::array<duplex::const_buffer, 1> parts{chunk};
      // A full socket just drops the rest: the channel must cope with whatever arrived.
      if (!writer.send_msg(parts, chunk.empty() && kind == duplex::socket_kind::stream
                                      ? std::span<const int>{}
                                      : std::span<const int>(fds))) {
        break;
      }
    }
    if ((setup & 4) != 0) writer.close();
    receive_all(*ch, (setup >> 3) & 3);
  }
  duplex::fuzz::check_no_fd_leaked(baseline);
  return 0;
}
