#include "duplex/socket_pair.hpp"

#include <fcntl.h>
#include <sys/resource.h>
#include <sys/socket.h>

#include "support.hpp"

namespace duplex {
namespace {

using test::HasError;
using test::Succeeded;
using test::sys;

class socket_pair_test : public test::kind_test {};

TEST_P(socket_pair_test, CreatesAConnectedPairOfTheKind) {
  auto pair = socket_pair(GetParam());
  ASSERT_THAT(pair, Succeeded());
  EXPECT_TRUE(pair->first.is_open());
  EXPECT_TRUE(pair->second.is_open());
  EXPECT_EQ(pair->first.kind(), GetParam());
  int type = 0;
  socklen_t len = sizeof(type);
  ASSERT_EQ(::getsockopt(pair->first.native_handle(), SOL_SOCKET, SO_TYPE, &type, &len), 0);
  EXPECT_EQ(type, to_socket_type(GetParam()));
  // Connected both ways.
  ASSERT_THAT(pair->first.send(as_bytes("a")), Succeeded());
  ASSERT_THAT(pair->second.send(as_bytes("b")), Succeeded());
  std::array<std::byte, 4> buf{};
  EXPECT_EQ(pair->second.receive(buf).value(), 1U);
  EXPECT_EQ(buf[0], std::byte{'a'});
  EXPECT_EQ(pair->first.receive(buf).value(), 1U);
  EXPECT_EQ(buf[0], std::byte{'b'});
}

TEST_P(socket_pair_test, EndsAreCloseOnExecByDefault) {
  auto pair = socket_pair(GetParam());
  ASSERT_THAT(pair, Succeeded());
  EXPECT_TRUE(test::fd_is_cloexec(pair->first.native_handle()));
  EXPECT_TRUE(test::fd_is_cloexec(pair->second.native_handle()));
  EXPECT_FALSE(pair->first.is_non_blocking().value());
}

TEST_P(socket_pair_test, OptionsAreHonoured) {
  auto pair = socket_pair(GetParam(), {.close_on_exec = false, .non_blocking = true});
  ASSERT_THAT(pair, Succeeded());
  EXPECT_FALSE(test::fd_is_cloexec(pair->first.native_handle()));
  EXPECT_FALSE(test::fd_is_cloexec(pair->second.native_handle()));
  EXPECT_TRUE(pair->first.is_non_blocking().value());
  std::array<std::byte, 4> buf{};
  EXPECT_THAT(pair->first.receive(buf), HasError(errc::would_block));
}

TEST_P(socket_pair_test, DestroyingThePairClosesBothEnds) {
  int a = -1;
  int b = -1;
  {
    auto pair = socket_pair(GetParam());
    ASSERT_THAT(pair, Succeeded());
    a = pair->first.native_handle();
    b = pair->second.native_handle();
  }
  EXPECT_FALSE(test::fd_is_open(a));
  EXPECT_FALSE(test::fd_is_open(b));
}

INSTANTIATE_TEST_SUITE_P(kinds, socket_pair_test,
                         ::testing::Values(socket_kind::stream, socket_kind::datagram,
                                           socket_kind::seqpacket),
                         test::kind_name);

class raw_socket_pair_test : public test::fd_checked {};

TEST_F(raw_socket_pair_test, TheTutorialCallWorksAndAddsCloseOnExec) {
  auto pair = socket_pair(AF_UNIX, SOCK_SEQPACKET, 0);
  ASSERT_THAT(pair, Succeeded());
  EXPECT_EQ(pair->first.kind(), socket_kind::seqpacket);
  EXPECT_TRUE(test::fd_is_cloexec(pair->first.native_handle()));
  auto nb = socket_pair(AF_LOCAL, SOCK_DGRAM | SOCK_NONBLOCK, 0);
  ASSERT_THAT(nb, Succeeded());
  EXPECT_EQ(nb->second.kind(), socket_kind::datagram);
  EXPECT_TRUE(nb->second.is_non_blocking().value());
}

TEST_F(raw_socket_pair_test, AfInetHasNoPairsOnLinux) {
  // The tutorial says AF_INET pairs work on some systems; on Linux they never do.
  EXPECT_THAT(socket_pair(AF_INET, SOCK_STREAM, 0), HasError(sys(EOPNOTSUPP)));
  EXPECT_THAT(socket_pair(AF_INET6, SOCK_DGRAM, 0), HasError(sys(EOPNOTSUPP)));
}

TEST_F(raw_socket_pair_test, ABadProtocolIsEprotonosupport) {
  EXPECT_THAT(socket_pair(AF_UNIX, SOCK_STREAM, 6), HasError(sys(EPROTONOSUPPORT)));
}

TEST_F(raw_socket_pair_test, AnUnknownFamilyIsEafnosupport) {
  EXPECT_THAT(socket_pair(AF_MAX + 1, SOCK_STREAM, 0), HasError(sys(EAFNOSUPPORT)));
}

TEST_F(raw_socket_pair_test, ATypeAfUnixLacksIsRefused) {
  EXPECT_THAT(socket_pair(AF_UNIX, SOCK_PACKET, 0), HasError(sys(ESOCKTNOSUPPORT)));
}

TEST_F(raw_socket_pair_test, TheKindIsWhatTheKernelMade) {
  // AF_UNIX quietly turns SOCK_RAW into SOCK_DGRAM; the pair reports what it really is.
  auto pair = socket_pair(AF_UNIX, SOCK_RAW, 0);
  ASSERT_THAT(pair, Succeeded());
  EXPECT_EQ(pair->first.kind(), socket_kind::datagram);
  EXPECT_EQ(pair->second.kind(), socket_kind::datagram);
}

TEST_F(raw_socket_pair_test, RunningOutOfFdsIsEmfile) {
  // In a child, so that lowering RLIMIT_NOFILE cannot disturb this process.
  const int status = test::run_in_child([] {
    rlimit old{};
    ::getrlimit(RLIMIT_NOFILE, &old);
    const rlimit lowered{0, old.rlim_max};
    if (::setrlimit(RLIMIT_NOFILE, &lowered) != 0) return 10;
    auto kinded = socket_pair(socket_kind::stream);
    auto raw = socket_pair(AF_UNIX, SOCK_STREAM, 0);
    // Restored before the results are looked at: UBSan's checks need free fds of their own.
    ::setrlimit(RLIMIT_NOFILE, &old);
    if (kinded || kinded.error() != std::error_code(EMFILE, std::system_category())) return 11;
    if (raw || raw.error() != std::error_code(EMFILE, std::system_category())) return 12;
    return 0;
  });
  EXPECT_EQ(status, 0);
}

}  // namespace
}  // namespace duplex
