// Uses the installed (or add_subdirectory'd) duplex: one round trip over a seqpacket pair.
#include <duplex/duplex.hpp>

#include <array>
#include <cstdio>
#include <cstring>

int main() {
  auto pair = duplex::socket_pair(duplex::socket_kind::seqpacket);
  if (!pair) return 1;
  if (!pair->first.send(duplex::as_bytes("consumer"))) return 2;
  std::array<std::byte, 16> buf{};
  auto n = pair->second.receive(buf);
  if (!n || duplex::as_string_view(std::span(buf).first(*n)) != "consumer") return 3;
  if (std::strcmp(duplex::library_version(), DUPLEX_VERSION_STRING) != 0) return 4;
  std::printf("consumer OK with duplex %s\n", duplex::library_version());
  return 0;
}
