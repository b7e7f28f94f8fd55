// Fuzz target 1: bytes into the stream decoder, in both framings, in slices the input chooses,
// with fds attached to some reads (as the kernel would hand them over) and some reads cut short
// (MSG_CTRUNC). Whatever the bytes, the decoder must not crash, must never allocate more than
// its maximum, and must close every fd it does not hand over.
//
// Input: byte 0: framing (bit 0), max message size (bits 1-3: 2^(6+2k) bytes), buffer size
// (bits 4-7). Then chunks: a control byte (bits 0-1: fds to attach, bit 2: ctrunc, bits 3-7:
// how to take messages), a length byte, and that many stream bytes.
#include <cstring>
#include <vector>

#include "framing/stream_decoder.hpp"
#include "fuzz_support.hpp"

using duplex::detail::stream_decoder;

namespace {

void drain(stream_decoder& d, std::uint8_t how) {
  std::vector<std::byte> into(256);
  std::span<duplex::unique_fd> in_place_fds;
  for (int guard = 0; guard < 100000; ++guard) {
    switch (d.poll()) {
      case stream_decoder::event::need_more:
        d.detach();  // `into` goes away now: as the channel does before it returns
        return;
      case stream_decoder::event::failed:
        if (d.fatal() || d.ended()) return;
        continue;
      case stream_decoder::event::complete:
        // take_into needs room for the whole message, as channel::receive_into checks first.
        if ((how & 1) && d.pending_size() <= into.size()) {
          std::vector<duplex::unique_fd> fds(d.pending_fds());
          (void)d.take_into(into, fds);
        } else {
          (void)d.take_message();
        }
        continue;
      case stream_decoder::event::header_ready:
        if (duplex::const_buffer bytes; (how & 2) && d.in_place(bytes, in_place_fds)) {
          d.finish_view();
        } else if ((how & 1) && d.pending_size() <= into.size()) {
          d.accept_into(into);
        } else {
          d.accept_owned();
        }
        continue;
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const int baseline = duplex::fuzz::open_fds();
  duplex::fuzz::input in(data, size);
  {
    const std::uint8_t setup = in.byte();
    const auto format = (setup & 1) != 0 ? duplex::framing::python : duplex::framing::native;
    const std::size_t max_message = std::size_t{1} << (6 + 2 * ((setup >> 1) & 7));
    const std::size_t buffer = std::size_t{64} << ((setup >> 4) & 7);
    stream_decoder d(format, max_message, 4, buffer);
    std::uint8_t how = 0;
    while (!in.empty()) {
      const std::uint8_t control = in.byte();
      how = static_cast<std::uint8_t>(control >> 3);
      auto chunk = in.bytes(in.byte());
      bool first = true;
      while (!chunk.empty() || first) {
        // A read takes what the decoder has room for; the chunk's fds come with its first read.
        const auto target = d.read_target();
        if (target.empty()) break;
        const std::size_t n = std::min(target.size(), chunk.size());
        if (n > 0) std::memcpy(target.data(), chunk.data(), n);
        std::vector<duplex::unique_fd> fds;
        if (first) {
          for (int i = 0; i < (control & 3); ++i)
            fds.emplace_back(duplex::fuzz::some_fd());
        }
        const bool ctrunc = first && (control & 4) != 0;
        if (n > 0) d.commit(n, fds, ctrunc);  // a stream never hands over fds with no bytes
        chunk = chunk.subspan(n);
        first = false;
        drain(d, how);
        if (n == 0) break;
      }
    }
    d.end_of_stream();
    drain(d, how);
  }
  duplex::fuzz::check_no_fd_leaked(baseline);
  return 0;
}
