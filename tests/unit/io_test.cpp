// The internal receive helpers: the seqpacket size limit and the spill area.
#include "io.hpp"

#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>
#include <vector>

#include "support.hpp"

namespace duplex::detail {
namespace {

using test::Succeeded;

// How many of the pages of [data, data + size) are resident.
std::size_t resident_pages(const std::byte* data, std::size_t size) {
  const auto page = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
  std::vector<unsigned char> in((size + page - 1) / page);
  if (::mincore(const_cast<std::byte*>(data), size, in.data()) != 0) {
    throw std::system_error(errno, std::system_category(), "mincore");
  }
  std::size_t n = 0;
  for (const unsigned char c : in)
    n += c & 1U;
  return n;
}

class io_test : public test::fd_checked {};

// largest_packet() is what an unprivileged sender can put in one packet: exactly that goes, one
// byte more is refused.
TEST_F(io_test, LargestPacketIsTheKernelsLimitForAnUnprivilegedSender) {
  auto limit = largest_packet();
  ASSERT_THAT(limit, Succeeded());
  EXPECT_EQ(largest_packet().value(), *limit);  // learned once
  int sv[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv), 0);
  const unique_fd a(sv[0]);
  const unique_fd b(sv[1]);
  int big = INT_MAX;
  ASSERT_EQ(::setsockopt(a.get(), SOL_SOCKET, SO_SNDBUF, &big, sizeof big), 0);
  int sndbuf = 0;
  socklen_t len = sizeof sndbuf;
  ASSERT_EQ(::getsockopt(a.get(), SOL_SOCKET, SO_SNDBUF, &sndbuf, &len), 0);
  EXPECT_EQ(*limit, static_cast<std::size_t>(sndbuf) - 32);
  // One byte over is refused before anything is allocated (a packet at the limit itself may be
  // more than the kernel can allocate in one piece when wmem_max is large, so it is not sent).
  std::vector<char> over(*limit + 1);
  errno = 0;
  EXPECT_EQ(::send(a.get(), over.data(), over.size(), MSG_DONTWAIT), -1);
  EXPECT_EQ(errno, EMSGSIZE);
}

// A large packet's pages go back after it; the first 64 KiB stay (small packets reuse them).
TEST_F(io_test, TrimGivesBackThePagesALargePacketTouched) {
  spill_area area;
  EXPECT_FALSE(area.mapped());
  const std::size_t size = std::size_t{1} << 20;
  ASSERT_THAT(area.map(size), Succeeded());
  ASSERT_TRUE(area.mapped());
  ASSERT_EQ(area.bytes().size(), size);
  const auto page = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
  EXPECT_EQ(resident_pages(area.bytes().data(), size), 0U);  // nothing touched, nothing resident
  std::memset(area.bytes().data(), 1, size);
  EXPECT_EQ(resident_pages(area.bytes().data(), size), size / page);
  area.trim(100);  // within what is kept: nothing happens
  EXPECT_EQ(resident_pages(area.bytes().data(), size), size / page);
  area.trim(size);
  EXPECT_EQ(resident_pages(area.bytes().data(), size), spill_area::kept / page);
  EXPECT_EQ(area.bytes()[spill_area::kept - 1], std::byte{1});  // the kept part is untouched
  EXPECT_EQ(area.bytes()[spill_area::kept], std::byte{0});      // the rest reads as new
}

}  // namespace
}  // namespace duplex::detail
