// Fuzz target 5: bytes from a peer into the endpoint handshake (either role, MD5 allowed or
// not, a stream's slices or a seqpacket's packets). Whatever the bytes, the machine must not
// crash, must never ask for more than one bounded message, and must end done or failed.
//
// Input: byte 0: role (bit 0), allow MD5 (bit 1), packets (bit 2). Byte 1: key length (0-31),
// then the key. Then chunks: a length byte and that many bytes, fed as the machine asks (a
// stream: at most input_wanted() at a time; packets: each chunk is one packet).
#include <cstdlib>
#include <vector>

#include "endpoint/handshake.hpp"
#include "fuzz_support.hpp"

using duplex::detail::handshake;
using duplex::detail::handshake_role;
using duplex::detail::max_handshake_message;

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  duplex::fuzz::input in(data, size);
  const std::uint8_t mode = in.byte();
  const auto key_bytes = in.bytes(in.byte() % 32);
  const std::vector<std::byte> key(key_bytes.begin(), key_bytes.end());
  handshake hs((mode & 1) != 0 ? handshake_role::listener : handshake_role::client, key,
               (mode & 2) != 0);
  if (!hs.start()) return 0;
  const bool packets = (mode & 4) != 0;
  while (!in.empty() && !hs.failed() && !hs.done()) {
    hs.wrote(hs.output().size());  // whatever it says goes out whole
    if (hs.input_wanted() > 4 + max_handshake_message) std::abort();
    const auto chunk = in.bytes(in.byte());
    if (packets) {
      (void)hs.feed_packet(chunk);
      continue;
    }
    std::size_t at = 0;
    while (at < chunk.size() && hs.input_wanted() > 0) {
      const std::size_t n = std::min(hs.input_wanted(), chunk.size() - at);
      (void)hs.feed(chunk.subspan(at, n));
      at += n;
      hs.wrote(hs.output().size());
    }
  }
  if (hs.failed() && hs.detail().empty()) std::abort();  // every failure says why
  return 0;
}
