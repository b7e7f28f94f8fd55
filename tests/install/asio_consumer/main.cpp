// Uses the asio component of an installed duplex: one asynchronous round trip, with an fd.
#include <unistd.h>

#include <asio.hpp>
#include <duplex/asio.hpp>
#include <duplex/duplex.hpp>

#include <cstdio>
#include <cstring>
#include <string>
#include <utility>

int main() {
  auto ends = duplex::channel_pair(duplex::socket_kind::stream);
  if (!ends) return 1;
  asio::io_context io;
  duplex::asio::channel a(io, std::move(ends->first));
  duplex::asio::channel b(io, std::move(ends->second));
  const int fds[] = {STDOUT_FILENO};
  std::string reply;
  std::size_t fds_received = 0;
  a.async_send(duplex::as_bytes("consumer"), fds, [&](std::error_code ec) {
    if (ec) return;
    b.async_receive([&](std::error_code ec2, duplex::message m) {
      if (ec2) return;
      reply = m.text();
      fds_received = m.fds().size();
    });
  });
  io.run();
  if (reply != "consumer" || fds_received != 1) return 2;
  if (std::strcmp(duplex::library_version(), DUPLEX_VERSION_STRING) != 0) return 3;
  std::printf("asio consumer OK with duplex %s and Asio %d.%d.%d\n", duplex::library_version(),
              ASIO_VERSION / 100000, ASIO_VERSION / 100 % 1000, ASIO_VERSION % 100);
  return 0;
}
