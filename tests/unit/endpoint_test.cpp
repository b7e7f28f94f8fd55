// Tests of duplex/endpoint.hpp and of what a tcp socket refuses: real sockets throughout (unix
// paths, abstract names, tcp over IPv4 and IPv6 loopback), including hostile clients.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <array>
#include <string>

#include "duplex/channel.hpp"
#include "duplex/socket.hpp"
#include "support.hpp"

namespace duplex {
namespace {

using namespace std::chrono_literals;
using test::HasError;
using test::Succeeded;

class endpoint_test : public test::fd_checked {};

// A connected TCP pair over IPv4 loopback, made with plain syscalls.
std::pair<unique_fd, unique_fd> raw_tcp_pair() {
  unique_fd l(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(a);
  EXPECT_EQ(::bind(l.get(), reinterpret_cast<sockaddr*>(&a), len), 0);
  EXPECT_EQ(::listen(l.get(), 1), 0);
  EXPECT_EQ(::getsockname(l.get(), reinterpret_cast<sockaddr*>(&a), &len), 0);
  unique_fd c(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  EXPECT_EQ(::connect(c.get(), reinterpret_cast<sockaddr*>(&a), len), 0);
  unique_fd s(::accept4(l.get(), nullptr, nullptr, SOCK_CLOEXEC));
  return {std::move(c), std::move(s)};
}

// --- what a tcp socket carries and refuses ----------------------------------------------------

TEST_F(endpoint_test, FromFdAdoptsAConnectedTcpStreamOnly) {
  auto [c, s] = raw_tcp_pair();
  auto adopted = socket::from_fd(std::move(c));
  ASSERT_THAT(adopted, Succeeded());
  EXPECT_EQ(adopted->kind(), socket_kind::stream);
  EXPECT_EQ(adopted->domain(), socket_domain::tcp);
  unique_fd udp(::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0));
  EXPECT_THAT(socket::from_fd(std::move(udp)), HasError(errc::wrong_kind));
  unique_fd unconnected(::socket(AF_INET6, SOCK_STREAM | SOCK_CLOEXEC, 0));
  EXPECT_THAT(socket::from_fd(std::move(unconnected)), HasError(errc::wrong_kind));
}

TEST_F(endpoint_test, TcpSocketRefusesFdsAndCredentialsSendingNothing) {
  auto [c, s] = raw_tcp_pair();
  auto a = test::must(socket::from_fd(std::move(c)));
  auto b = test::must(socket::from_fd(std::move(s)));
  const std::array<const_buffer, 1> bytes{as_bytes("x")};
  const std::array<int, 1> fds{0};
  EXPECT_THAT(a.send_msg(bytes, fds), HasError(errc::not_supported));
  EXPECT_THAT(a.peer_credentials(), HasError(errc::not_supported));
  EXPECT_THAT(a.peer_pidfd(), HasError(errc::not_supported));
  std::array<std::byte, 4> buf{};
  EXPECT_THAT(b.receive(buf, 50ms), HasError(errc::timed_out));  // nothing was sent
}

TEST_F(endpoint_test, TcpChannelRefusesFdsAndSharedMemorySendingNothing) {
  auto [c, s] = raw_tcp_pair();
  auto a = test::must(channel::create(test::must(socket::from_fd(std::move(c)))));
  auto b = test::must(channel::create(test::must(socket::from_fd(std::move(s)))));
  const std::array<int, 1> fds{0};
  EXPECT_THAT(a.send(as_bytes("x"), fds), HasError(errc::not_supported));
  EXPECT_THAT(a.try_send(as_bytes("x"), fds), HasError(errc::not_supported));
  auto buffer = a.allocate(16);
  ASSERT_THAT(buffer, Succeeded());
  EXPECT_THAT(a.send(std::move(*buffer)), HasError(errc::not_supported));  // the pool's memfd
  EXPECT_THAT(a.peer_credentials(), HasError(errc::not_supported));
  EXPECT_THAT(b.receive(50ms), HasError(errc::timed_out));  // nothing was sent
  ASSERT_THAT(a.send(as_bytes("after")), Succeeded());      // and the channel goes on
  auto m = b.receive(1s);
  ASSERT_THAT(m, Succeeded());
  EXPECT_EQ(m->text(), "after");
}

}  // namespace
}  // namespace duplex
