// The tutorial's third program with duplex: a thread and the main thread talk over a pair.
//
// What changed from the raw version: no global fd array (each thread owns its end), a seqpacket
// pair keeps each message whole (a stream could split or join them), and the receives have a
// timeout, so a thread that dies early cannot leave the other waiting forever.
#include <array>
#include <chrono>
#include <cstdlib>
#include <iostream>
#include <thread>

#include "duplex/duplex.hpp"

using namespace std::chrono_literals;

int run() {
  auto pair = duplex::socket_pair(duplex::socket_kind::seqpacket);
  if (!pair) {
    std::cerr << "socketpair: " << pair.error().message() << '\n';
    return EXIT_FAILURE;
  }
  std::cout << "Main: Socket pair created." << std::endl;

  std::thread thread([end = std::move(pair->second)]() mutable {
    std::cout << "Thread: Sending message..." << std::endl;
    if (auto r = end.send(duplex::as_bytes("Message from thread")); !r) {
      std::cerr << "Thread: send: " << r.error().message() << '\n';
      return;
    }
    std::array<std::byte, 128> buf{};
    auto n = end.receive(buf, 10s);
    if (!n) {
      std::cerr << "Thread: receive: " << n.error().message() << '\n';
      return;
    }
    std::cout << "Thread: Received reply: " << duplex::as_string_view(std::span(buf).first(*n))
              << std::endl;
  });

  duplex::socket& end = pair->first;
  std::array<std::byte, 128> buf{};
  auto n = end.receive(buf, 10s);
  int status = EXIT_SUCCESS;
  if (!n) {
    std::cerr << "Main: receive: " << n.error().message() << '\n';
    status = EXIT_FAILURE;
  } else {
    std::cout << "Main: Received from thread: " << duplex::as_string_view(std::span(buf).first(*n))
              << std::endl;
    if (auto r = end.send(duplex::as_bytes("Reply from main")); !r) {
      std::cerr << "Main: send: " << r.error().message() << '\n';
      status = EXIT_FAILURE;
    }
  }
  thread.join();
  std::cout << "Main: Exiting." << std::endl;
  return status;
}

// What the example printed is its result: output that could not be written (a full disk, a
// closed pipe) is a failure, not an exit status of 0.
int main() {
  const int status = run();
  if (!std::cout.flush()) {
    std::cerr << "socketpair_threads: output lost\n";
    return EXIT_FAILURE;
  }
  return status;
}
