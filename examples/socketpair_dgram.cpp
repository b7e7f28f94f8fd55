// The tutorial's second program with duplex: datagrams keep their boundaries.
//
// What changed from the raw version: a datagram larger than the receive buffer is reported
// (errc::buffer_too_small) instead of being silently cut, and next_packet_size() tells the size
// of the next datagram before it is read, so a receiver can size its buffer and lose nothing.
#include <array>
#include <cstdlib>
#include <iostream>
#include <string_view>
#include <vector>

#include "duplex/duplex.hpp"

int run() {
  auto pair = duplex::socket_pair(duplex::socket_kind::datagram);
  if (!pair) {
    std::cerr << "socketpair: " << pair.error().message() << '\n';
    return EXIT_FAILURE;
  }
  auto& [sender, receiver] = *pair;

  const std::array<std::string_view, 2> messages = {"First message",
                                                    "Second message is longer than the first one."};
  std::cout << "Sending two messages..." << std::endl;
  for (auto m : messages) {
    if (auto r = sender.send(duplex::as_bytes(m)); !r) {
      std::cerr << "send: " << r.error().message() << '\n';
      return EXIT_FAILURE;
    }
  }

  std::cout << "Receiving messages..." << std::endl;
  for (int i = 1; i <= 2; ++i) {
    auto size = receiver.next_packet_size();  // exact size, nothing consumed
    if (!size) {
      std::cerr << "next_packet_size: " << size.error().message() << '\n';
      return EXIT_FAILURE;
    }
    std::vector<std::byte> buf(*size);
    auto n = receiver.receive(buf);
    if (!n) {
      std::cerr << "receive: " << n.error().message() << '\n';
      return EXIT_FAILURE;
    }
    std::cout << "Received message " << i << " (" << *n
              << " bytes): " << duplex::as_string_view(std::span(buf).first(*n)) << std::endl;
  }

  // A buffer too small for the datagram: an error, never a silently shortened message.
  if (auto r = sender.send(duplex::as_bytes(messages[1])); !r) return EXIT_FAILURE;
  std::array<std::byte, 8> small{};
  auto cut = receiver.receive(small);
  std::cout << "Into an 8-byte buffer: " << (cut ? "received (unexpected)" : cut.error().message())
            << std::endl;
  return cut ? EXIT_FAILURE : EXIT_SUCCESS;
}

// What the example printed is its result: output that could not be written (a full disk, a
// closed pipe) is a failure, not an exit status of 0.
int main() {
  const int status = run();
  if (!std::cout.flush()) {
    std::cerr << "socketpair_dgram: output lost\n";
    return EXIT_FAILURE;
  }
  return status;
}
