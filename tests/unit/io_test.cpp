// The internal I/O helpers: the seqpacket size limit, the spill area, and the check and copy
// that keep a packet's copy out of rep movsb's slow band.
#include "socket/io.hpp"

#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <array>
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

// The band is exact: a piece of 256 bytes or more landing 1 to 63 bytes past its source,
// modulo 4 KiB, counting where each piece lands in the packet; smaller pieces do not count.
TEST_F(io_test, PacketCopyWouldCrawlExactlyInItsBand) {
  alignas(4096) static std::byte page[3 * 4096];
  std::byte head[16];
  const auto at = [](std::size_t offset) { return static_cast<void*>(page + offset); };
  const auto crawls = [&](std::size_t source_offset, std::size_t size = 4096) {
    const std::array<iovec, 2> v{iovec{head, sizeof head}, iovec{at(source_offset), size}};
    return packet_copy_would_crawl(v.data(), v.size());
  };
  // The payload lands at 16: a source at page offset s is 16 - s bytes behind.
  for (std::size_t s = 0; s < 16; ++s)
    EXPECT_TRUE(crawls(s)) << s;
  for (std::size_t s = 4096 - 47; s < 4096; ++s)
    EXPECT_TRUE(crawls(s)) << s;    // 17 to 63 bytes
  EXPECT_FALSE(crawls(16));         // 0: the same place in the page
  EXPECT_FALSE(crawls(4096 - 48));  // 64
  EXPECT_FALSE(crawls(17));         // 4095
  EXPECT_FALSE(crawls(2048));
  EXPECT_FALSE(crawls(0, 255));  // too small to matter
  EXPECT_TRUE(crawls(0, 256));
  // Later pieces land after the earlier ones.
  const std::array<iovec, 3> three{iovec{head, sizeof head}, iovec{at(1024), 1000},
                                   iovec{at(4096 + 1000), 3000}};  // lands at 1016: 24 behind
  EXPECT_TRUE(packet_copy_would_crawl(three.data(), three.size()));
  const std::array<iovec, 3> fine{iovec{head, sizeof head}, iovec{at(1024), 1000},
                                  iovec{at(4096 + 1016), 3000}};  // lands at 1016: in place
  EXPECT_FALSE(packet_copy_would_crawl(fine.data(), fine.size()));
}

// gather_in_steps puts the pieces one after another, whole, whatever their sizes.
TEST_F(io_test, GatherInStepsConcatenatesEveryPiece) {
  const auto a = test::pattern(1, 1);
  const auto b = test::pattern(1024, 2);
  const auto c = test::pattern(5000, 3);
  const auto d = test::pattern(1025, 4);
  const std::array<iovec, 5> v{iovec{const_cast<std::byte*>(a.data()), a.size()}, iovec{nullptr, 0},
                               iovec{const_cast<std::byte*>(b.data()), b.size()},
                               iovec{const_cast<std::byte*>(c.data()), c.size()},
                               iovec{const_cast<std::byte*>(d.data()), d.size()}};
  std::vector<std::byte> out(a.size() + b.size() + c.size() + d.size() + 1, std::byte{0xee});
  gather_in_steps(v.data(), v.size(), out.data());
  std::vector<std::byte> expected;
  for (const auto* p : {&a, &b, &c, &d})
    expected.insert(expected.end(), p->begin(), p->end());
  expected.push_back(std::byte{0xee});  // nothing written past the end
  EXPECT_EQ(out, expected);
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
