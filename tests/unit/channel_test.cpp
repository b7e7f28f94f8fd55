// channel: whole messages with fds, against well-behaved, crashed and hostile peers.
// The RELIABILITY classes each test belongs to are named in its comment.
#include "duplex/channel.hpp"

#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "duplex/socket_pair.hpp"
#include "socket/io.hpp"
#include "support.hpp"

namespace duplex {
namespace {

using namespace std::chrono_literals;
using test::HasError;
using test::inode_of;
using test::make_pipe;
using test::make_raw;
using test::pattern;
using test::python_frame;
using test::reap;
using test::same;
using test::Succeeded;
using test::sys;

connected_channels make(socket_kind kind, channel_options options = {}) {
  return test::must(channel_pair(kind, options));
}

// GCC 12 at -O2 reports false -Warray-bounds, -Wstringop-overread, -Wstringop-overflow and
// -Wnull-dereference in the vector copies below, however they are written: silenced here.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Warray-bounds"
#pragma GCC diagnostic ignored "-Wstringop-overread"
std::vector<std::byte> frame(const std::vector<std::byte>& body, std::uint16_t fds = 0,
                             std::optional<std::uint64_t> length = std::nullopt) {
  const auto h = wire::encode_native({length.value_or(body.size()), fds, 0});
  std::vector<std::byte> out(h.begin(), h.end());
  out.insert(out.end(), body.begin(), body.end());
  return out;
}
#pragma GCC diagnostic pop

std::vector<std::byte> text_bytes(std::string_view s) {
  const auto b = as_bytes(s);
  return {b.begin(), b.end()};
}

// A new memfd (close-on-exec) holding content, its file offset back at 0.
unique_fd memfd_holding(std::string_view content) {
  unique_fd fd(::memfd_create("duplex-test", MFD_CLOEXEC));
  if (!fd.valid()) throw std::system_error(errno, std::system_category(), "memfd_create");
  if (::pwrite(fd.get(), content.data(), content.size(), 0) !=
      static_cast<ssize_t>(content.size())) {
    throw std::system_error(errno, std::system_category(), "pwrite");
  }
  return fd;
}

// What a file holds (up to 256 bytes), read from offset 0.
std::string contents_of(int fd) {
  char buf[256];
  const ssize_t n = ::pread(fd, buf, sizeof buf, 0);
  return n < 0 ? std::string("<unreadable>") : std::string(buf, static_cast<std::size_t>(n));
}

pid_t fork_or_throw() {
  std::fflush(nullptr);
  const pid_t pid = ::fork();
  if (pid < 0) throw std::system_error(errno, std::system_category());
  return pid;
}

class channel_test : public test::fd_checked {};
class channel_kind_test : public test::kind_test {};

INSTANTIATE_TEST_SUITE_P(kinds, channel_kind_test,
                         ::testing::Values(socket_kind::stream, socket_kind::seqpacket),
                         test::kind_name);

// --- creation --------------------------------------------------------------------------------

TEST_F(channel_test, CreateRefusesWhatCannotKeepItsPromises) {
  auto dgram = socket_pair(socket_kind::datagram);
  EXPECT_THAT(channel::create(std::move(dgram->first)), HasError(errc::wrong_kind));
  auto seq = socket_pair(socket_kind::seqpacket);
  EXPECT_THAT(channel::create(std::move(seq->first), {.format = framing::python}),
              HasError(errc::wrong_kind));
  auto stream = socket_pair(socket_kind::stream);
  EXPECT_THAT(channel::create(std::move(stream->first), {.max_fds = 254}), HasError(sys(EINVAL)));
  EXPECT_THAT(channel::create(std::move(stream->second), {.max_message_size = 0}),
              HasError(sys(EINVAL)));
}

// Every option is checked at create, against the range channel.hpp gives it: what a channel
// cannot honour is refused there (EINVAL), never met later as an allocation that fails or a
// deadline that overflows. Each refusal closes the socket.
TEST_F(channel_test, CreateRefusesOptionsOutOfRange) {
  const std::vector<std::function<void(channel_options&)>> changes{
      [](channel_options& o) { o.receive_buffer_size = SIZE_MAX; },
      [](channel_options& o) { o.receive_buffer_size = std::size_t{1} << 40; },
      [](channel_options& o) { o.receive_buffer_size = max_receive_buffer_size + 1; },
      [](channel_options& o) { o.max_fds = 254; },
      [](channel_options& o) { o.max_message_size = 0; },
      [](channel_options& o) { o.busy_poll = -1ns; },
      [](channel_options& o) { o.busy_poll = std::chrono::nanoseconds::max(); },
      [](channel_options& o) { o.format = static_cast<framing>(7); },
      [](channel_options& o) { o.shared_memory.pool_size = 0; },
      [](channel_options& o) { o.shared_memory.pool_size = SIZE_MAX; },
      [](channel_options& o) { o.shared_memory.slots = 0; },
      [](channel_options& o) { o.shared_memory.slots = max_shared_pool_slots + 1; },
      [](channel_options& o) { o.shared_memory.receive = static_cast<shared_receive>(9); },
  };
  for (std::size_t i = 0; i < changes.size(); ++i) {
    channel_options o;
    changes[i](o);
    auto pair = test::must(socket_pair(socket_kind::stream));
    const int fd = pair.first.native_handle();
    EXPECT_THAT(channel::create(std::move(pair.first), o), HasError(sys(EINVAL))) << "change " << i;
    EXPECT_FALSE(test::fd_is_open(fd)) << "change " << i;
    EXPECT_THAT(channel_pair(socket_kind::seqpacket, o), HasError(sys(EINVAL))) << "change " << i;
  }
  // The bounds themselves are accepted, and a channel with the largest buffer works (the buffer
  // is address space until it is written).
  channel_options edge;
  edge.receive_buffer_size = max_receive_buffer_size;
  edge.busy_poll = max_busy_poll;
  edge.shared_memory.slots = max_shared_pool_slots;
  edge.shared_memory.pool_size = max_shared_pool_size;
  auto [a, b] = test::must(channel_pair(socket_kind::stream, edge));
  ASSERT_THAT(a.send(as_bytes("edge")), Succeeded());
  auto m = b.receive(10s);
  ASSERT_THAT(m, Succeeded());
  EXPECT_EQ(m->text(), "edge");
}

TEST_F(channel_test, AnEmptyChannelSaysClosed) {
  channel c;
  EXPECT_THAT(c.send(as_bytes("x")), HasError(errc::closed));
  EXPECT_THAT(c.receive(), HasError(errc::closed));
  EXPECT_THAT(c.wait_readable(1ms), HasError(errc::closed));
  EXPECT_EQ(c.native_handle(), -1);
  EXPECT_FALSE(c.is_open());
}

// is_open() is true from create() until close(), whatever the peer does; false for a moved-from
// channel and one made over an empty socket. While it is true native_handle() is the fd.
TEST_F(channel_test, IsOpenUntilCloseAndNotWhenMovedFrom) {
  auto [a, b] = test::must(channel_pair(socket_kind::stream));
  EXPECT_TRUE(a.is_open());
  EXPECT_GE(a.native_handle(), 0);
  channel moved = std::move(a);
  EXPECT_TRUE(moved.is_open());
  EXPECT_FALSE(a.is_open());  // NOLINT(bugprone-use-after-move): testing it
  EXPECT_EQ(a.native_handle(), -1);
  b.close();
  EXPECT_FALSE(b.is_open());
  EXPECT_EQ(b.native_handle(), -1);
  EXPECT_THAT(moved.receive(10s), HasError(errc::peer_closed));
  EXPECT_TRUE(moved.is_open());  // the peer's close does not close this end
  EXPECT_FALSE(moved.is_broken());
  auto empty = test::must(channel::create(socket{}));
  EXPECT_FALSE(empty.is_open());
  EXPECT_EQ(empty.native_handle(), -1);
}

// --- transfer --------------------------------------------------------------------------------

TEST_P(channel_kind_test, MessagesGoBothWaysWhole) {
  auto [a, b] = make(GetParam());
  ASSERT_THAT(a.send(as_bytes("ping")), Succeeded());
  ASSERT_THAT(a.send(as_bytes("")), Succeeded());
  ASSERT_THAT(b.send(as_bytes("pong")), Succeeded());
  EXPECT_EQ(b.receive()->text(), "ping");
  EXPECT_EQ(b.receive()->size(), 0U);
  EXPECT_EQ(a.receive()->text(), "pong");
}

TEST_P(channel_kind_test, ScatterGatherPartsBecomeOneMessage) {
  auto [a, b] = make(GetParam());
  const std::array<const_buffer, 4> parts = {as_bytes("one "), as_bytes(""), as_bytes("two "),
                                             as_bytes("three")};
  ASSERT_THAT(a.send(parts), Succeeded());
  EXPECT_EQ(b.receive()->text(), "one two three");
}

// Sends every size from 0 to 16 KiB from a to b (a thread sends) and checks each arrives alone,
// byte-exact. Message n is n bytes of a pattern starting at n % 251, so contents differ from size
// to size.
void every_size_up_to_16KiB(channel& a, channel& b, unsigned seed) {
  constexpr std::size_t top = 16 * 1024;
  const auto source = pattern(top + 251, seed);
  auto expected = [&source](std::size_t n) { return std::span(source).subspan(n % 251, n); };
  std::thread sender([&a, &expected] {
    for (std::size_t n = 0; n <= top; ++n) {
      if (!a.send(expected(n))) {
        ADD_FAILURE() << "send " << n;
        return;
      }
    }
  });
  [&] {
    for (std::size_t n = 0; n <= top; ++n) {
      auto m = b.receive(30s);
      ASSERT_THAT(m, Succeeded()) << "size " << n;
      ASSERT_EQ(m->size(), n);
      ASSERT_TRUE(same(m->bytes(), expected(n))) << "size " << n;
    }
  }();
  if (::testing::Test::HasFailure()) b.close();  // the receiver gave up: unblock the sender
  sender.join();
}

// Class 7: every size from 0 to 16 KiB, byte-exact, boundaries kept.
TEST_P(channel_kind_test, EverySizeFromZeroTo16KiB) {
  auto [a, b] = make(GetParam());
  every_size_up_to_16KiB(a, b, 99);
}

// Class 7: sizes at the socket buffer's edge, and the packet limit on seqpacket.
TEST_P(channel_kind_test, SizesAtTheSocketBufferEdge) {
  auto [a, b] = make(GetParam());
  auto probe = socket_pair(GetParam());
  const std::size_t sndbuf = probe->first.send_buffer_size().value();
  // A packet carries at most SO_SNDBUF - 32 bytes; the header takes 16 of them.
  const std::size_t packet_limit = sndbuf - 32 - wire::native_header_size;
  std::vector<std::size_t> sizes = {packet_limit - 1, packet_limit};
  if (GetParam() == socket_kind::stream)
    sizes.insert(sizes.end(), {sndbuf - 1, sndbuf, sndbuf + 1});
  for (std::size_t n : sizes) {
    const auto data = pattern(n, static_cast<unsigned>(n));
    std::thread sender([&a, &data] { EXPECT_THAT(a.send(data), Succeeded()); });
    auto m = b.receive(30s);
    sender.join();
    ASSERT_THAT(m, Succeeded()) << n;
    EXPECT_TRUE(same(m->bytes(), data)) << n;
  }
  if (GetParam() == socket_kind::seqpacket) {
    // One byte over what a packet can carry: a clear error, nothing sent, the channel still fine.
    EXPECT_THAT(a.send(pattern(packet_limit + 1, 1)), HasError(errc::message_too_large));
    EXPECT_THAT(b.try_receive(), HasError(errc::would_block));
    ASSERT_THAT(a.send(as_bytes("after")), Succeeded());
    EXPECT_EQ(b.receive()->text(), "after");
  }
}

// Class 7: a seqpacket channel reads each packet whole in one recvmsg, into a message the size
// of the last one and a spill area behind it. Sizes that stay, shrink a little, shrink a lot,
// grow past the spill area's first 64 KiB and come back, with fds on some; through receive(),
// receive_into() (buffers too small, exact and large) and receive_batch(): each arrives whole.
TEST_F(channel_test, SeqpacketMessagesOfChangingSizesEachArriveWhole) {
  auto [a, b] = make(socket_kind::seqpacket);
  auto [read_end, write_end] = make_pipe();
  const std::array<int, 2> two{read_end.get(), write_end.get()};
  const std::vector<std::size_t> sizes = {8,     8,  3,      0,      100, 60, 70000,  70000,
                                          5,     64, 200000, 150000, 4,   4,  0,      199999,
                                          65536, 7,  8,      8,      8,   8,  131072, 1};
  std::thread sender([&] {
    for (std::size_t i = 0; i < sizes.size(); ++i) {
      const auto data = pattern(sizes[i], static_cast<unsigned>(i));
      const auto fds = i % 5 == 2 ? std::span<const int>(two) : std::span<const int>();
      if (!a.send(data, fds)) return;
    }
  });
  const auto check = [&](std::size_t i, const_buffer bytes, std::size_t fds) {
    EXPECT_EQ(bytes.size(), sizes[i]) << "message " << i;
    EXPECT_TRUE(same(bytes, pattern(sizes[i], static_cast<unsigned>(i)))) << "message " << i;
    EXPECT_EQ(fds, i % 5 == 2 ? 2U : 0U) << "message " << i;
  };
  std::size_t i = 0;
  for (; i < 12; ++i) {  // receive()
    auto m = b.receive(30s);
    ASSERT_THAT(m, Succeeded()) << i;
    check(i, std::as_const(*m).bytes(), m->fds().size());
  }
  std::vector<std::byte> buf(200000);
  std::array<unique_fd, 2> fds;
  for (; i < 18; ++i) {  // receive_into(): too small first when it is not empty, then room
    if (sizes[i] > 0) {
      EXPECT_THAT(b.receive_into(std::span(buf).first(sizes[i] - 1), fds, 30s),
                  HasError(errc::buffer_too_small));
    }
    auto info = b.receive_into(std::span(buf).first(sizes[i] + (i % 2 == 0 ? 0 : 1000)), fds, 30s);
    ASSERT_THAT(info, Succeeded()) << i;
    check(i, std::span(buf).first(info->size), info->fds);
    for (auto& f : fds)
      f.reset();
  }
  while (i < sizes.size()) {  // receive_batch()
    auto n = b.receive_batch(
        [&](message_view& m) {
          check(i, m.bytes, m.fds.size());
          ++i;
        },
        SIZE_MAX, 30s);
    ASSERT_THAT(n, Succeeded());
  }
  sender.join();
  EXPECT_THAT(b.try_receive(), HasError(errc::would_block));
}

// Class 7: seqpacket payloads of 2 KiB to 64 KiB from buffers at page offsets where the kernel's
// copy would crawl (the channel gathers them first into a page-aligned buffer of its own) and
// where it would not, in one piece and in several, with and without fds, blocking and through
// try_send: each arrives byte-exact.
TEST_F(channel_test, SeqpacketPayloadsFromEveryPageOffsetArriveWhole) {
  auto [a, b] = make(socket_kind::seqpacket);
  auto [read_end, write_end] = make_pipe();
  const std::array<int, 1> one{read_end.get()};
  constexpr std::size_t page = 4096;
  std::vector<std::byte> arena((64 << 10) + 3 * page);
  auto* base = reinterpret_cast<std::byte*>(
      (reinterpret_cast<std::uintptr_t>(arena.data()) + page - 1) / page * page);
  unsigned seed = 0;
  for (const std::size_t size :
       {std::size_t{2048}, std::size_t{4096}, std::size_t{20000}, std::size_t{64} << 10}) {
    for (const std::size_t offset : {std::size_t{0}, std::size_t{8}, std::size_t{15},
                                     std::size_t{16}, page - 48, page - 47, page - 1}) {
      ++seed;
      const auto data = pattern(size, seed);
      std::byte* at = base + offset;
      std::memcpy(at, data.data(), size);
      const std::size_t cut = size / 3;
      const std::array<const_buffer, 2> parts{const_buffer(at, cut),
                                              const_buffer(at + cut, size - cut)};
      const auto fds = seed % 2 == 0 ? std::span<const int>(one) : std::span<const int>();
      if (seed % 3 == 0) {
        ASSERT_THAT(a.try_send(parts, fds), Succeeded()) << size << " at " << offset;
      } else if (seed % 3 == 1) {
        ASSERT_THAT(a.send(parts, fds), Succeeded()) << size << " at " << offset;
      } else {
        ASSERT_THAT(a.send(const_buffer(at, size), fds), Succeeded()) << size << " at " << offset;
      }
      std::memset(at, 0, size);  // what arrives was copied when it was sent
      auto m = b.receive(30s);
      ASSERT_THAT(m, Succeeded()) << size << " at " << offset;
      EXPECT_TRUE(same(std::as_const(*m).bytes(), data)) << size << " at " << offset;
      EXPECT_EQ(m->fds().size(), fds.size()) << size << " at " << offset;
    }
  }
}

// Class 7: with SO_SNDBUF raised, a packet far larger than the default socket buffer holds
// (1 MiB) arrives whole, through receive() and through a receive_into() that first finds its
// buffer too small (the message is kept whole for the next call).
TEST_F(channel_test, SeqpacketPacketsLargerThanTheDefaultBufferArriveWhole) {
  auto [a, b] = make(socket_kind::seqpacket);
  const int raised = 1 << 20;  // the kernel doubles it: 2 MiB
  ASSERT_EQ(::setsockopt(a.native_handle(), SOL_SOCKET, SO_SNDBUF, &raised, sizeof raised), 0);
  const std::size_t n = std::size_t{1} << 20;
  ASSERT_LE(n, detail::largest_packet().value());
  const auto data = pattern(n, 11);
  std::thread sender([&] {
    EXPECT_THAT(a.send(data), Succeeded());
    EXPECT_THAT(a.send(data), Succeeded());
  });
  auto m = b.receive(30s);
  ASSERT_THAT(m, Succeeded());
  EXPECT_TRUE(same(std::as_const(*m).bytes(), data));
  std::vector<std::byte> buf(n);
  EXPECT_THAT(b.receive_into(std::span(buf).first(4096), {}, 30s),
              HasError(errc::buffer_too_small));
  auto info = b.receive_into(buf, {}, 30s);
  sender.join();
  ASSERT_THAT(info, Succeeded());
  EXPECT_TRUE(same(buf, data));
}

// Class 7: a packet larger than any unprivileged sender can make (SO_SNDBUFFORCE, which needs
// CAP_NET_ADMIN, past twice net.core.wmem_max) is more than the channel reads: message_too_large
// with a detail, its fds closed, and the channel carries on. Skipped where such a packet cannot
// be made (no CAP_NET_ADMIN, or a wmem_max so large that the kernel cannot allocate the packet).
TEST_F(channel_test, SeqpacketPacketsBeyondTheUnprivilegedLimitAreRefusedAndTheChannelGoesOn) {
  auto [ch, raw] = make_raw(socket_kind::seqpacket);
  const std::size_t limit = detail::largest_packet().value();
  const int forced = static_cast<int>(std::min<std::size_t>(4 * limit, INT_MAX / 2));
  if (::setsockopt(raw.native_handle(), SOL_SOCKET, SO_SNDBUFFORCE, &forced, sizeof forced) != 0) {
    GTEST_SKIP() << "SO_SNDBUFFORCE: " << std::strerror(errno);
  }
  auto [read_end, write_end] = make_pipe();
  const std::array<int, 1> one{read_end.get()};
  const auto body = pattern(limit + 1, 3);
  const auto head = wire::encode_native({body.size(), 1, 0});
  const std::array<const_buffer, 2> parts{const_buffer(head), const_buffer(body)};
  auto sent = raw.send_msg(parts, one);
  if (!sent) GTEST_SKIP() << "the kernel would not make a packet of " << head.size() + body.size();
  ASSERT_THAT(raw.send(frame(text_bytes("next"))), Succeeded());
  const std::size_t before = test::open_fd_count();
  EXPECT_THAT(ch.receive(), HasError(errc::message_too_large));
  EXPECT_NE(ch.error_detail().find("wmem_max"), std::string::npos) << ch.error_detail();
  EXPECT_EQ(test::open_fd_count(), before);
  EXPECT_EQ(ch.receive()->text(), "next");
}

// Class 7: every size from 0 to 16 KiB in Python framing (stream only), byte-exact, boundaries
// kept.
TEST_F(channel_test, EverySizeFromZeroTo16KiBInPythonFraming) {
  auto [a, b] = make(socket_kind::stream, {.format = framing::python});
  every_size_up_to_16KiB(a, b, 98);
}

// Class 7: Python frames at the edges of the socket buffer (what one packet would hold, and
// SO_SNDBUF, each -1, exact and +1, also less the 4-byte header) and of the receiver's buffer
// (half of it, where payloads start to be read straight into their message, and all of it),
// byte-exact, each followed by a small message that must arrive intact too.
TEST_F(channel_test, PythonFramingSizesAtTheBufferEdges) {
  const std::size_t receive_buffer = channel_options{}.receive_buffer_size;
  auto [a, b] = make(socket_kind::stream, {.format = framing::python});
  auto probe = socket_pair(socket_kind::stream);
  const std::size_t sndbuf = probe->first.send_buffer_size().value();
  std::vector<std::size_t> sizes;
  for (const std::size_t edge :
       {sndbuf - 32, sndbuf, receive_buffer / 2, receive_buffer, 2 * receive_buffer}) {
    for (const std::size_t n : {edge - 5, edge - 4, edge - 3, edge - 1, edge, edge + 1})
      sizes.push_back(n);
  }
  for (const std::size_t n : sizes) {
    const auto data = pattern(n, static_cast<unsigned>(n));
    std::thread sender([&a, &data] {
      EXPECT_THAT(a.send(data), Succeeded());
      EXPECT_THAT(a.send(as_bytes("next")), Succeeded());
    });
    auto m = b.receive(30s);
    auto next = b.receive(30s);
    if (!m || !next) b.close();  // unblock the sender
    sender.join();
    ASSERT_THAT(m, Succeeded()) << n;
    EXPECT_EQ(m->size(), n);
    EXPECT_TRUE(same(m->bytes(), data)) << n;
    ASSERT_THAT(next, Succeeded()) << n;
    EXPECT_EQ(next->text(), "next") << n;
  }
}

// Class 7: 1 MiB, 16 MiB and 64 MiB (the default maximum) byte-exact; one byte more refused.
TEST_F(channel_test, LargeMessagesUpToTheMaximum) {
  auto [a, b] = make(socket_kind::stream);
  for (std::size_t n : {std::size_t{1} << 20, std::size_t{16} << 20, default_max_message_size}) {
    const auto data = pattern(n, static_cast<unsigned>(n >> 20));
    std::thread sender([&a, &data] { EXPECT_THAT(a.send(data), Succeeded()); });
    auto m = b.receive(60s);
    sender.join();
    ASSERT_THAT(m, Succeeded());
    EXPECT_EQ(m->size(), n);
    EXPECT_TRUE(same(m->bytes(), data));
  }
  EXPECT_THAT(a.send(pattern(default_max_message_size + 1, 0)), HasError(errc::message_too_large));
  ASSERT_THAT(a.send(as_bytes("still in step")), Succeeded());
  EXPECT_EQ(b.receive()->text(), "still in step");
}

TEST_F(channel_test, TheNativeFrameOnTheWireIsTheDocumentedOne) {
  auto [ch, raw] = make_raw(socket_kind::stream);
  auto [read_end, write_end] = make_pipe();
  const std::array<int, 1> fds{read_end.get()};
  ASSERT_THAT(ch.send(as_bytes("hi"), fds), Succeeded());
  std::array<std::byte, 64> buf{};
  const std::array<mutable_buffer, 1> in{buf};
  std::array<unique_fd, 2> got;
  auto r = raw.receive_msg(in, got);
  ASSERT_THAT(r, Succeeded());
  const std::vector<std::byte> expected = {
      std::byte{0x44}, std::byte{0x58}, std::byte{0x01}, std::byte{0x00},  // "DX", v1, no flags
      std::byte{0x01}, std::byte{0x00}, std::byte{0x00}, std::byte{0x00},  // 1 fd, reserved
      std::byte{0x02}, std::byte{0x00}, std::byte{0x00}, std::byte{0x00},  // length 2 ...
      std::byte{0x00}, std::byte{0x00}, std::byte{0x00}, std::byte{0x00},  // ... little-endian
      std::byte{'h'},  std::byte{'i'}};
  EXPECT_EQ(
      std::vector<std::byte>(buf.begin(), buf.begin() + static_cast<std::ptrdiff_t>(r->bytes)),
      expected);
  EXPECT_EQ(r->fds, 1U);  // with the frame's first byte
}

TEST_F(channel_test, ThePythonFrameOnTheWireIsCPythons) {
  auto [ch, raw] = make_raw(socket_kind::stream, {.format = framing::python});
  ASSERT_THAT(ch.send(as_bytes("abc")), Succeeded());
  std::array<std::byte, 7> buf{};
  ASSERT_THAT(raw.receive_exact(buf), Succeeded());
  const std::vector<std::byte> expected = {std::byte{0},  std::byte{0},   std::byte{0},
                                           std::byte{3},  std::byte{'a'}, std::byte{'b'},
                                           std::byte{'c'}};
  EXPECT_EQ(std::vector<std::byte>(buf.begin(), buf.end()), expected);
  auto [read_end, write_end] = make_pipe();
  const std::array<int, 1> fds{read_end.get()};
  EXPECT_THAT(ch.send(as_bytes("x"), fds), HasError(errc::not_supported));
}

// --- receive_into, try_receive, timeouts -----------------------------------------------------

TEST_P(channel_kind_test, ReceiveIntoASmallBufferConsumesNothing) {
  auto [a, b] = make(GetParam());
  auto [read_end, write_end] = make_pipe();
  const std::array<int, 2> two{read_end.get(), write_end.get()};
  ASSERT_THAT(a.send(as_bytes("a message of 27 bytes......")), Succeeded());
  ASSERT_THAT(a.send(as_bytes("with fds"), two), Succeeded());
  ASSERT_THAT(a.send(as_bytes("next")), Succeeded());
  std::array<std::byte, 8> small{};
  EXPECT_THAT(b.receive_into(small), HasError(errc::buffer_too_small));
  EXPECT_THAT(b.receive_into(small), HasError(errc::buffer_too_small));  // still there
  std::array<std::byte, 64> big{};
  auto info = b.receive_into(big);
  ASSERT_THAT(info, Succeeded());
  EXPECT_EQ(as_string_view(std::span(big).first(info->size)), "a message of 27 bytes......");
  std::array<unique_fd, 1> one;
  EXPECT_THAT(b.receive_into(big, one), HasError(errc::too_many_fds));  // needs room for 2
  EXPECT_FALSE(one[0].valid());
  std::array<unique_fd, 2> room;
  info = b.receive_into(big, room);
  ASSERT_THAT(info, Succeeded());
  EXPECT_EQ(info->fds, 2U);
  EXPECT_EQ(inode_of(room[0].get()), inode_of(read_end.get()));
  EXPECT_EQ(inode_of(room[1].get()), inode_of(write_end.get()));
  EXPECT_EQ(b.receive()->text(), "next");  // the stream stayed in step
}

TEST_P(channel_kind_test, TryReceiveAndTimeouts) {
  auto [a, b] = make(GetParam());
  EXPECT_THAT(b.try_receive(), HasError(errc::would_block));
  const auto start = std::chrono::steady_clock::now();
  EXPECT_THAT(b.receive(30ms), HasError(errc::timed_out));
  EXPECT_GE(std::chrono::steady_clock::now() - start, 30ms);
  EXPECT_THAT(b.wait_readable(10ms), HasError(errc::timed_out));
  ASSERT_THAT(a.send(as_bytes("now")), Succeeded());
  EXPECT_THAT(b.wait_readable(10s), Succeeded());
  EXPECT_EQ(b.try_receive()->text(), "now");
}

TEST_F(channel_test, APartialFrameWaitsForTheRestAcrossCalls) {
  auto [ch, raw] = make_raw(socket_kind::stream);
  const auto body = pattern(100000, 5);
  const auto wire_bytes = frame(body);
  ASSERT_THAT(raw.send_all(std::span(wire_bytes).first(30000)), Succeeded());
  EXPECT_THAT(ch.try_receive(), HasError(errc::would_block));
  std::vector<std::byte> callers(200000);
  EXPECT_THAT(ch.receive_into(callers, {}, 20ms), HasError(errc::timed_out));
  std::fill(callers.begin(), callers.end(), std::byte{0});  // the caller reuses its buffer
  ASSERT_THAT(raw.send_all(std::span(wire_bytes).subspan(30000)), Succeeded());
  auto m = ch.receive(10s);
  ASSERT_THAT(m, Succeeded());
  EXPECT_TRUE(same(m->bytes(), body));
}

// --- peer ends (class 1), SIGPIPE (class 2) --------------------------------------------------

TEST_P(channel_kind_test, EveryMessageBeforeAnOrderlyCloseThenPeerClosed) {
  auto [a, b] = make(GetParam());
  for (int i = 0; i < 100; ++i)
    ASSERT_THAT(a.send(as_bytes(std::to_string(i))), Succeeded());
  a = channel();  // destroyed: the fd is closed
  for (int i = 0; i < 100; ++i)
    ASSERT_EQ(b.receive()->text(), std::to_string(i));
  EXPECT_THAT(b.receive(), HasError(errc::peer_closed));
  EXPECT_THAT(b.receive(), HasError(errc::peer_closed));
  EXPECT_THAT(b.send(as_bytes("x")), HasError(errc::peer_closed));
}

TEST_P(channel_kind_test, APeerClosingWithUnreadDataStillDeliversEverything) {
  auto [a, b] = make(GetParam());
  ASSERT_THAT(a.send(as_bytes("never read by b")), Succeeded());
  for (int i = 0; i < 10; ++i)
    ASSERT_THAT(b.send(as_bytes(std::to_string(i))), Succeeded());
  b = channel();  // closes with a's message unread: ECONNRESET for a, after b's messages
  for (int i = 0; i < 10; ++i)
    ASSERT_EQ(a.receive()->text(), std::to_string(i));
  EXPECT_THAT(a.receive(), HasError(errc::peer_closed));
}

TEST_P(channel_kind_test, APeerThatExitsBeforeTheFirstMessage) {
  auto pair = socket_pair(GetParam());
  const pid_t pid = fork_or_throw();
  if (pid == 0) ::_exit(0);  // holds a copy of both ends, exits at once
  pair->second.close();
  auto ch = channel::create(std::move(pair->first));
  EXPECT_EQ(reap(pid), 0);
  EXPECT_THAT(ch->receive(10s), HasError(errc::peer_closed));
}

TEST_F(channel_test, APeerKilledInsideAFrameGivesTruncatedMessage) {
  auto pair = socket_pair(socket_kind::stream);
  const pid_t pid = fork_or_throw();
  if (pid == 0) {
    pair->first.close();
    const auto whole = frame(text_bytes("whole"));
    const auto big = frame(pattern(1 << 20, 1));
    // A whole message, then the start of a 1 MiB one; then wait to be killed.
    if (!pair->second.send_all(whole)) ::_exit(1);
    if (!pair->second.send_all(std::span(big).first(300000))) ::_exit(1);
    ::pause();
    ::_exit(2);
  }
  pair->second.close();
  auto ch = channel::create(std::move(pair->first));
  ASSERT_THAT(ch, Succeeded());
  EXPECT_EQ(ch->receive(10s)->text(), "whole");
  // Read part of the big frame, then kill the sender in the middle of it.
  EXPECT_THAT(ch->receive(50ms), HasError(errc::timed_out));
  ::kill(pid, SIGKILL);
  const int status = reap(pid);
  EXPECT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);
  EXPECT_THAT(ch->receive(10s), HasError(errc::truncated_message));
  EXPECT_THAT(ch->receive(10s), HasError(errc::peer_closed));
  EXPECT_FALSE(ch->is_broken());
}

// The peer is killed with our messages unread in its queue (class 1), so its end goes with
// ECONNRESET for us: on a stream after the peer's last byte, here inside a frame; on seqpacket
// before the packets still queued. Either way every whole message arrives, then (on a stream,
// whose last frame was cut) truncated_message, then peer_closed; the channel is not broken.
TEST_P(channel_kind_test, APeerKilledWithOurMessagesUnreadStillDeliversEveryWholeMessage) {
  const bool stream = GetParam() == socket_kind::stream;
  const auto one = frame(text_bytes("one"));
  const auto two = frame(pattern(5000, 8));
  const auto cut = frame(pattern(100000, 9));
  auto pair = test::must(socket_pair(GetParam()));
  auto [written_read, written_write] = make_pipe();
  const pid_t pid = fork_or_throw();
  if (pid == 0) {
    pair.first.close();
    written_read.reset();
    // Two whole messages; on a stream then a header and 1000 bytes of a 100000-byte frame.
    if (!pair.second.send_all(one) || !pair.second.send_all(two)) ::_exit(1);
    if (stream && !pair.second.send_all(std::span(cut).first(16 + 1000))) ::_exit(1);
    const char done = 'x';
    if (::write(written_write.get(), &done, 1) != 1) ::_exit(1);
    ::pause();  // until killed, never reading what the parent sends
    ::_exit(2);
  }
  pair.second.close();
  written_write.reset();
  auto ch = test::must(channel::create(std::move(pair.first)));
  for (int i = 0; i < 3; ++i)
    EXPECT_THAT(ch.send(as_bytes("never read")), Succeeded());
  char done = 0;
  const ssize_t got = ::read(written_read.get(), &done, 1);  // the peer has written everything
  ::kill(pid, SIGKILL);
  const int status = reap(pid);
  ASSERT_EQ(got, 1);
  EXPECT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);
  auto first = ch.receive(10s);
  ASSERT_THAT(first, Succeeded());
  EXPECT_EQ(first->text(), "one");
  auto second = ch.receive(10s);
  ASSERT_THAT(second, Succeeded());
  EXPECT_TRUE(same(second->bytes(), pattern(5000, 8)));
  if (stream) {
    EXPECT_THAT(ch.receive(10s), HasError(errc::truncated_message));
  }
  EXPECT_THAT(ch.receive(10s), HasError(errc::peer_closed));
  EXPECT_THAT(ch.receive(10s), HasError(errc::peer_closed));
  EXPECT_FALSE(ch.is_broken());
  EXPECT_THAT(ch.send(as_bytes("after")), HasError(errc::peer_closed));
}

TEST_F(channel_test, APeerKilledBetweenHeaderAndPayload) {
  auto [ch, raw] = make_raw(socket_kind::stream);
  const auto first = frame(text_bytes("complete"));
  const auto second = frame(pattern(1000, 2));
  ASSERT_THAT(raw.send_all(first), Succeeded());
  ASSERT_THAT(raw.send_all(std::span(second).first(16 + 10)), Succeeded());
  raw.close();
  EXPECT_EQ(ch.receive()->text(), "complete");
  EXPECT_THAT(ch.receive(), HasError(errc::truncated_message));
  EXPECT_THAT(ch.receive(), HasError(errc::peer_closed));
}

TEST_F(channel_test, APythonStreamThatEndsInsideAFrameGivesTruncatedMessage) {
  auto [ch, raw] = make_raw(socket_kind::stream, {.format = framing::python});
  const std::vector<std::byte> whole = {std::byte{0}, std::byte{0},   std::byte{0},
                                        std::byte{2}, std::byte{'o'}, std::byte{'k'}};
  ASSERT_THAT(raw.send_all(whole), Succeeded());
  // A header announcing 100 bytes, then 10 of them, then the end.
  const std::vector<std::byte> head = {std::byte{0}, std::byte{0}, std::byte{0}, std::byte{100}};
  ASSERT_THAT(raw.send_all(head), Succeeded());
  ASSERT_THAT(raw.send_all(pattern(10, 6)), Succeeded());
  raw.close();
  EXPECT_EQ(ch.receive(10s)->text(), "ok");
  EXPECT_THAT(ch.receive(10s), HasError(errc::truncated_message));
  EXPECT_THAT(ch.receive(10s), HasError(errc::peer_closed));
  EXPECT_FALSE(ch.is_broken());
}

TEST_P(channel_kind_test, SendingToADeadPeerIsAnErrorNotSigpipe) {
  const test::default_sigpipe sigpipe;  // had a write raised it, this process would die
  auto [a, b] = make(GetParam());
  b = channel();
  auto first = a.send(as_bytes("anyone?"));
  auto second = a.send(pattern(GetParam() == socket_kind::stream ? 1 << 20 : 1000, 3));
  EXPECT_THAT(first, HasError(errc::peer_closed));
  EXPECT_THAT(second, HasError(errc::peer_closed));
}

TEST_P(channel_kind_test, SendingFdsToADeadPeerIsAnErrorNotSigpipe) {
  const test::default_sigpipe sigpipe;  // had a write raised it, this process would die
  auto [read_end, write_end] = make_pipe();
  const std::array<int, 2> fds{read_end.get(), write_end.get()};
  {
    auto [a, b] = make(GetParam());
    b = channel();
    EXPECT_THAT(a.send(as_bytes("with fds"), fds), HasError(errc::peer_closed));
    EXPECT_THAT(a.send(as_bytes("again"), fds), HasError(errc::peer_closed));
  }
  // A peer that dies while a send with fds is blocked on it, the frame's fds already out.
  auto [a, b] = make(GetParam());
  const std::size_t size = GetParam() == socket_kind::stream ? 8 << 20 : 60000;
  std::thread sender([&a, &fds, size] {
    for (;;) {  // on seqpacket, packets until the socket is full and one blocks
      auto r = a.send(pattern(size, 1), fds);
      if (!r) {
        EXPECT_THAT(r, HasError(errc::peer_closed));
        return;
      }
    }
  });
  std::this_thread::sleep_for(20ms);  // likely blocked by now; either way the outcome is the same
  b.close();
  sender.join();
  EXPECT_TRUE(test::fd_is_open(read_end.get()));  // the caller keeps its fds
}

TEST_P(channel_kind_test, SendingABatchToADeadPeerIsAnErrorNotSigpipe) {
  const test::default_sigpipe sigpipe;
  auto [read_end, write_end] = make_pipe();
  const std::array<int, 1> fd{read_end.get()};
  batch out;
  ASSERT_THAT(out.add(as_bytes("first")), Succeeded());
  ASSERT_THAT(out.add(as_bytes("with an fd"), fd), Succeeded());
  ASSERT_THAT(out.add(pattern(30000, 2)), Succeeded());
  auto [a, b] = make(GetParam());
  b = channel();
  EXPECT_THAT(a.send(out), HasError(errc::peer_closed));
  EXPECT_THAT(a.send(out), HasError(errc::peer_closed));
  // The peer dies with part of a batch delivered: the rest fails the same way.
  auto [c, d] = make(GetParam());
  batch big;
  for (int i = 0; i < 200; ++i)
    ASSERT_THAT(big.add(pattern(60000, static_cast<unsigned>(i))), Succeeded());
  std::thread sender([&c, &big] { EXPECT_THAT(c.send(big), HasError(errc::peer_closed)); });
  ASSERT_THAT(d.receive(30s), Succeeded());  // the batch is under way
  d.close();
  sender.join();
}

TEST_F(channel_test, SendingPythonFramesToADeadPeerIsAnErrorNotSigpipe) {
  const test::default_sigpipe sigpipe;
  auto [a, b] = make(socket_kind::stream, {.format = framing::python});
  b = channel();
  EXPECT_THAT(a.send(as_bytes("anyone?")), HasError(errc::peer_closed));
  EXPECT_THAT(a.send(pattern(1 << 20, 4)), HasError(errc::peer_closed));
  EXPECT_THAT(a.try_send(as_bytes("anyone?")), HasError(errc::peer_closed));
  batch out(framing::python);
  ASSERT_THAT(out.add(as_bytes("in a batch")), Succeeded());
  EXPECT_THAT(a.send(out), HasError(errc::peer_closed));
}

// --- chopped I/O (class 3) -------------------------------------------------------------------

// A raw writer cuts frames into 143-byte slices (fds with each frame's first slice); the channel
// reads through a 137-byte buffer. Frames and fds come out exact.
TEST_F(channel_test, OddSlicesOnBothSidesWithFds) {
  auto [ch, raw] = make_raw(socket_kind::stream, {.receive_buffer_size = 137});
  auto [read_end, write_end] = make_pipe();
  const ino_t pipe_inode = inode_of(read_end.get());
  constexpr int count = 300;
  std::thread writer([&raw, &read_end] {
    for (int i = 0; i < count; ++i) {
      const std::uint16_t nfds = static_cast<std::uint16_t>(i % 4);
      const auto bytes =
          frame(pattern(static_cast<std::size_t>(i * 37 % 1500), static_cast<unsigned>(i)), nfds);
      const std::vector<int> fds(nfds, read_end.get());
      for (std::size_t at = 0; at < bytes.size(); at += 143) {
        const auto slice =
            std::span(bytes).subspan(at, std::min<std::size_t>(143, bytes.size() - at));
        const std::array<const_buffer, 1> parts{slice};
        auto sent =
            raw.send_msg(parts, at == 0 ? std::span<const int>(fds) : std::span<const int>{});
        ASSERT_TRUE(sent && *sent == slice.size());
      }
    }
  });
  for (int i = 0; i < count; ++i) {
    auto m = ch.receive(30s);
    ASSERT_THAT(m, Succeeded()) << "message " << i;
    EXPECT_TRUE(same(m->bytes(),
                     pattern(static_cast<std::size_t>(i * 37 % 1500), static_cast<unsigned>(i))));
    ASSERT_EQ(m->fds().size(), static_cast<std::size_t>(i % 4)) << "message " << i;
    for (const auto& fd : m->fds())
      EXPECT_EQ(inode_of(fd.get()), pipe_inode);
  }
  writer.join();
}

// Class 3: the same for Python framing (which carries no fds): 300 raw frames in both header
// forms (a 4-byte length; -1 then an 8-byte length, every third frame) written in 143-byte
// slices and read through a 137-byte buffer. Payloads from 0 to 1500 bytes, and every 50th of
// 70,000 (read straight into its message, past the buffer); each arrives byte-exact, in order.
TEST_F(channel_test, OddSlicesOnBothSidesInPythonFraming) {
  auto [ch, raw] =
      make_raw(socket_kind::stream, {.format = framing::python, .receive_buffer_size = 137});
  constexpr int count = 300;
  auto body = [](int i) {
    const std::size_t size = i % 50 == 49 ? 70000 : static_cast<std::size_t>(i * 37 % 1500);
    return pattern(size, static_cast<unsigned>(i) + 1000);
  };
  std::thread writer([&raw, &body] {
    for (int i = 0; i < count; ++i) {
      const auto bytes = python_frame(body(i), i % 3 == 1);
      for (std::size_t at = 0; at < bytes.size(); at += 143) {
        const auto slice =
            std::span(bytes).subspan(at, std::min<std::size_t>(143, bytes.size() - at));
        ASSERT_THAT(raw.send_all(slice), Succeeded());
      }
    }
  });
  [&] {
    for (int i = 0; i < count; ++i) {
      auto m = ch.receive(30s);
      ASSERT_THAT(m, Succeeded()) << "message " << i;
      const auto expected = body(i);
      ASSERT_EQ(m->size(), expected.size()) << "message " << i;
      EXPECT_TRUE(same(m->bytes(), expected)) << "message " << i;
    }
  }();
  if (HasFailure()) ch.close();  // the reader gave up: unblock the writer
  writer.join();
  EXPECT_THAT(ch.try_receive(), HasError(errc::would_block));  // nothing more, nothing left over
}

// Both ends non-blocking with tiny buffers: sends are cut short by the kernel again and again,
// fds travel once with their frame, and the reader polls.
TEST_P(channel_kind_test, NonBlockingShortWritesWithFds) {
  auto pair = socket_pair(GetParam(), {.non_blocking = true});
  ASSERT_THAT(pair->first.set_send_buffer_size(1), Succeeded());
  ASSERT_THAT(pair->second.set_receive_buffer_size(1), Succeeded());
  auto a = channel::create(std::move(pair->first));
  auto b = channel::create(std::move(pair->second));
  auto [read_end, write_end] = make_pipe();
  const std::size_t sndbuf_limit = 2000;  // packets must fit the tiny buffer
  const std::size_t big = GetParam() == socket_kind::stream ? 300000 : sndbuf_limit;
  constexpr int count = 40;
  std::thread writer([&] {
    for (int i = 0; i < count; ++i) {
      const std::array<int, 1> fds{read_end.get()};
      const auto data =
          pattern(static_cast<std::size_t>(i) * big / count, static_cast<unsigned>(i));
      ASSERT_THAT(a->send(data, fds), Succeeded()) << i;
    }
  });
  for (int i = 0; i < count;) {
    auto m = b->try_receive();
    if (!m && m.error() == errc::would_block) {
      ASSERT_THAT(b->wait_readable(30s), Succeeded());
      continue;
    }
    ASSERT_THAT(m, Succeeded()) << i;
    EXPECT_TRUE(same(m->bytes(),
                     pattern(static_cast<std::size_t>(i) * big / count, static_cast<unsigned>(i))));
    EXPECT_EQ(m->fds().size(), 1U);
    ++i;
  }
  writer.join();
}

// --- hostile headers written raw (class 6) ---------------------------------------------------

struct hostile_case {
  const char* name;
  std::vector<std::byte> bytes;
  errc expected;
  const char* detail;  // what error_detail() says the peer broke
};

std::vector<hostile_case> hostile_stream_cases() {
  auto patch = [](std::size_t at, int value) {
    auto b = frame(text_bytes("x"));
    b[at] = static_cast<std::byte>(value);
    return b;
  };
  const std::size_t max = 1000;
  return {
      {"length at the limit + 1", frame({}, 0, max + 1), errc::message_too_large,
       "message length 1001 is over the maximum 1000"},
      {"length 2^32 - 1", frame({}, 0, 0xffffffffULL), errc::message_too_large,
       "message length 4294967295 is over the maximum 1000"},
      {"length 2^64 - 1", frame({}, 0, ~0ULL), errc::message_too_large,
       "message length 18446744073709551615 is over the maximum 1000"},
      {"bad magic", patch(0, 'Z'), errc::protocol_error,
       "bad magic 0x5a 0x58 (a native frame starts with \"DX\")"},
      {"unknown version", patch(2, 9), errc::protocol_error,
       "frame version 9 is not supported (this end speaks 1)"},
      {"unknown flag", patch(3, 0x80), errc::protocol_error, "unknown frame flags 0x80"},
      {"254 fds announced", patch(4, 254), errc::protocol_error,
       "frame announces 254 fds (at most 253)"},
      {"reserved byte set", patch(6, 1), errc::protocol_error,
       "reserved header bytes are not zero"},
      {"fds announced, none sent", frame(text_bytes("x"), 2), errc::protocol_error,
       "a frame announced 2 fds and none arrived"},
  };
}

TEST_F(channel_test, HostileStreamHeadersBreakTheChannelWithoutAllocating) {
  for (const auto& c : hostile_stream_cases()) {
    SCOPED_TRACE(c.name);
    auto [ch, raw] = make_raw(socket_kind::stream, {.max_message_size = 1000});
    ASSERT_THAT(raw.send_all(frame(text_bytes("before"))), Succeeded());
    ASSERT_THAT(raw.send_all(c.bytes), Succeeded());
    ASSERT_THAT(raw.send_all(frame(text_bytes("after"))), Succeeded());
    EXPECT_EQ(ch.receive()->text(), "before");
    EXPECT_TRUE(ch.error_detail().empty());
    EXPECT_THAT(ch.receive(), HasError(c.expected));
    EXPECT_TRUE(ch.is_broken());
    EXPECT_EQ(ch.error_detail(), c.detail);
    EXPECT_THAT(ch.receive(), HasError(errc::broken));  // every later call says so
    EXPECT_THAT(ch.try_receive(), HasError(errc::broken));
    EXPECT_THAT(ch.send(as_bytes("x")), HasError(errc::broken));
  }
}

TEST_F(channel_test, HostilePythonLengths) {
  const std::vector<std::pair<std::vector<std::byte>, errc>> cases = {
      {{std::byte{0xff}, std::byte{0xff}, std::byte{0xff}, std::byte{0xfe}}, errc::protocol_error},
      {{std::byte{0x80}, std::byte{0}, std::byte{0}, std::byte{0}}, errc::protocol_error},
      {{std::byte{0}, std::byte{0}, std::byte{0x03}, std::byte{0xe9}}, errc::message_too_large},
      {{std::byte{0xff}, std::byte{0xff}, std::byte{0xff}, std::byte{0xff}, std::byte{0xff},
        std::byte{0xff}, std::byte{0xff}, std::byte{0xff}, std::byte{0xff}, std::byte{0xff},
        std::byte{0xff}, std::byte{0xff}},
       errc::message_too_large},
  };
  for (const auto& [bytes, expected] : cases) {
    auto [ch, raw] =
        make_raw(socket_kind::stream, {.format = framing::python, .max_message_size = 1000});
    ASSERT_THAT(raw.send_all(bytes), Succeeded());
    EXPECT_THAT(ch.receive(), HasError(expected));
    EXPECT_THAT(ch.receive(), HasError(errc::broken));
  }
}

TEST_F(channel_test, HostileSeqpacketPackets) {
  const std::vector<std::pair<std::vector<std::byte>, errc>> breaking = {
      {{}, errc::protocol_error},                              // an empty packet
      {text_bytes("short"), errc::protocol_error},             // shorter than a header
      {frame(text_bytes("abc"), 0, 4), errc::protocol_error},  // length disagrees
      {frame(text_bytes("abc"), 1), errc::protocol_error},     // an fd announced, none sent
  };
  for (const auto& [bytes, expected] : breaking) {
    auto [ch, raw] = make_raw(socket_kind::seqpacket);
    ASSERT_THAT(raw.send(bytes), Succeeded());
    EXPECT_THAT(ch.receive(), HasError(expected));
    EXPECT_FALSE(ch.error_detail().empty());
    EXPECT_THAT(ch.receive(), HasError(errc::broken));
  }
  // Over the maximum: a packet can be skipped whole, so the channel carries on.
  auto [ch, raw] = make_raw(socket_kind::seqpacket, {.max_message_size = 10});
  ASSERT_THAT(raw.send(frame(pattern(11, 1))), Succeeded());
  ASSERT_THAT(raw.send(frame(text_bytes("fits"))), Succeeded());
  EXPECT_THAT(ch.receive(), HasError(errc::message_too_large));
  EXPECT_EQ(ch.receive()->text(), "fits");
}

// --- EINTR under a signal storm (class 4) ----------------------------------------------------

// 8 MiB in messages of many sizes from a sender thread, while the receiving thread takes a
// 10 kHz signal storm (no SA_RESTART): every receive succeeds, no EINTR reaches the caller, and
// every byte arrives in order; then a receive timeout is still honoured in full.
TEST_P(channel_kind_test, ReceivingRidesOutASignalStorm) {
  auto [a, b] = make(GetParam());
  constexpr std::size_t total = 8 << 20;
  // Message n's size: 1 to 60000 bytes (a seqpacket packet holds them all).
  auto size_of = [](std::size_t n) { return 1 + (n * 104729) % 60000; };
  std::size_t count = 0;
  for (std::size_t sum = 0; sum < total; ++count)
    sum += size_of(count);
  std::thread sender([&a, &size_of, count] {
    std::this_thread::sleep_for(50ms);  // the receiver is blocked, being interrupted, meanwhile
    for (std::size_t n = 0; n < count; ++n) {
      ASSERT_THAT(a.send(pattern(size_of(n), static_cast<unsigned>(n))), Succeeded()) << n;
    }
  });
  long delivered = 0;
  std::size_t received = 0;
  {
    const test::signal_storm storm;  // 10 kHz at this thread, no SA_RESTART
    [&] {
      for (; received < count; ++received) {
        auto m = b.receive(30s);
        ASSERT_THAT(m, Succeeded()) << "message " << received;  // an EINTR would show here
        ASSERT_TRUE(same(m->bytes(), pattern(size_of(received), static_cast<unsigned>(received))))
            << "message " << received;
      }
      const auto start = std::chrono::steady_clock::now();
      EXPECT_THAT(b.receive(30ms), HasError(errc::timed_out));
      EXPECT_GE(std::chrono::steady_clock::now() - start, 30ms);
    }();
    delivered = storm.delivered();
  }
  if (received < count) b.close();  // the receiver gave up: unblock the sender
  sender.join();
  EXPECT_EQ(received, count);
  EXPECT_GT(delivered, 10) << "the storm did not reach the receiving thread";
}

// The same with the storm at the sending thread: blocking sends of 8 MiB (one message on a
// stream, 60000-byte packets on seqpacket) are interrupted again and again and still go out whole.
TEST_P(channel_kind_test, SendingRidesOutASignalStorm) {
  auto [a, b] = make(GetParam());
  const std::size_t size = GetParam() == socket_kind::stream ? 8 << 20 : 60000;
  const std::size_t count = (8 << 20) / size;
  std::thread receiver([&b, size, count] {
    std::this_thread::sleep_for(50ms);  // the sender fills the socket and blocks meanwhile
    for (std::size_t n = 0; n < count; ++n) {
      auto m = b.receive(30s);
      ASSERT_THAT(m, Succeeded()) << n;
      ASSERT_TRUE(same(m->bytes(), pattern(size, static_cast<unsigned>(n)))) << n;
    }
  });
  long delivered = 0;
  std::size_t sent = 0;
  {
    const test::signal_storm storm;
    for (; sent < count; ++sent) {
      auto r = a.send(pattern(size, static_cast<unsigned>(sent)));
      EXPECT_THAT(r, Succeeded()) << "message " << sent;  // an EINTR would show here
      if (!r) break;
    }
    delivered = storm.delivered();
  }
  if (sent < count) a.close();  // the sender gave up: end the receiver's wait
  receiver.join();
  EXPECT_GT(delivered, 10) << "the storm did not reach the sending thread";
}

// --- fd passing (class 8) --------------------------------------------------------------------

TEST_P(channel_kind_test, AnFdTravelsWithItsMessageAndWorks) {
  auto [a, b] = make(GetParam());
  auto [read_end, write_end] = make_pipe();
  const std::array<int, 1> fds{read_end.get()};
  ASSERT_THAT(a.send(as_bytes("a pipe"), fds), Succeeded());
  EXPECT_TRUE(test::fd_is_open(read_end.get()));  // the sender keeps its own
  auto m = b.receive();
  ASSERT_THAT(m, Succeeded());
  ASSERT_EQ(m->fds().size(), 1U);
  EXPECT_TRUE(test::fd_is_cloexec(m->fds()[0].get()));
  ASSERT_EQ(::write(write_end.get(), "ok", 2), 2);
  char buf[2];
  ASSERT_EQ(::read(m->fds()[0].get(), buf, 2), 2);
  EXPECT_EQ(std::string(buf, 2), "ok");
}

TEST_P(channel_kind_test, The253rdFdGoesThe254thIsRefusedAndTheCallerKeepsItsFds) {
  auto [a, b] = make(GetParam());
  auto [read_end, write_end] = make_pipe();
  std::vector<int> fds(max_fds_per_message + 1, read_end.get());
  EXPECT_THAT(a.send(as_bytes("too many"), fds), HasError(errc::too_many_fds));
  EXPECT_THAT(b.try_receive(), HasError(errc::would_block));  // nothing was sent
  EXPECT_TRUE(test::fd_is_open(read_end.get()));
  fds.pop_back();
  ASSERT_THAT(a.send(as_bytes("253"), fds), Succeeded());
  auto m = b.receive();
  ASSERT_THAT(m, Succeeded());
  EXPECT_EQ(m->fds().size(), max_fds_per_message);
}

TEST_P(channel_kind_test, MoreFdsThanThisEndAcceptsAreClosedAndTheNextMessageIsIntact) {
  auto [a, b] = make(GetParam(), {.max_fds = 2});
  auto [read_end, write_end] = make_pipe();
  const std::array<int, 3> three{read_end.get(), read_end.get(), read_end.get()};
  const std::array<int, 2> two{read_end.get(), write_end.get()};
  const std::size_t before = test::open_fd_count();
  ASSERT_THAT(a.send(pattern(5000, 1), three), Succeeded());
  ASSERT_THAT(a.send(as_bytes("two"), two), Succeeded());
  EXPECT_THAT(b.receive(), HasError(errc::too_many_fds));
  EXPECT_EQ(test::open_fd_count(), before);
  auto m = b.receive();
  ASSERT_THAT(m, Succeeded());
  EXPECT_EQ(m->text(), "two");
  EXPECT_EQ(m->fds().size(), 2U);
}

TEST_P(channel_kind_test, FdsWhereNoneWereAnnouncedAreClosed) {
  auto [ch, raw] = make_raw(GetParam());
  auto [read_end, write_end] = make_pipe();
  const auto bytes = frame(text_bytes("no fds here"));
  const std::array<const_buffer, 1> parts{bytes};
  const std::array<int, 2> fds{read_end.get(), write_end.get()};
  ASSERT_THAT(raw.send_msg(parts, fds), Succeeded());
  const std::size_t before = test::open_fd_count();
  if (GetParam() == socket_kind::stream) {
    // The message itself is intact; the stray fds are then reported and closed.
    EXPECT_EQ(ch.receive()->text(), "no fds here");
  }
  EXPECT_THAT(ch.receive(), HasError(errc::protocol_error));
  EXPECT_EQ(test::open_fd_count(), before);
}

TEST_P(channel_kind_test, AFdCountThatDisagreesIsAProtocolError) {
  auto [ch, raw] = make_raw(GetParam());
  auto [read_end, write_end] = make_pipe();
  const auto bytes = frame(text_bytes("two announced"), 2);
  const std::array<const_buffer, 1> parts{bytes};
  const std::array<int, 1> fds{read_end.get()};
  ASSERT_THAT(raw.send_msg(parts, fds), Succeeded());
  const std::size_t before = test::open_fd_count();
  EXPECT_THAT(ch.receive(), HasError(errc::protocol_error));
  EXPECT_EQ(test::open_fd_count(), before);
}

TEST_P(channel_kind_test, CredentialsControlMessagesAreIgnored) {
  auto [ch, raw] = make_raw(GetParam());
  const int on = 1;
  ASSERT_EQ(::setsockopt(ch.native_handle(), SOL_SOCKET, SO_PASSCRED, &on, sizeof(on)), 0);
  ASSERT_THAT(raw.send(frame(text_bytes("with credentials"))), Succeeded());
  EXPECT_EQ(ch.receive()->text(), "with credentials");
}

// SO_PASSPIDFD (Linux 6.5) makes the kernel attach an SCM_PIDFD to every message: an fd the peer
// never sent. The channel closes it (the fixture counts fds) and delivers the message alone.
TEST_P(channel_kind_test, PidfdControlMessagesAreClosedNotDelivered) {
#ifndef SO_PASSPIDFD
  constexpr int SO_PASSPIDFD = 76;
#endif
  auto [ch, raw] = make_raw(GetParam());
  const int on = 1;
  if (::setsockopt(ch.native_handle(), SOL_SOCKET, SO_PASSPIDFD, &on, sizeof(on)) != 0) {
    GTEST_SKIP() << "SO_PASSPIDFD is not supported by this kernel";
  }
  for (int i = 0; i < 3; ++i) {
    ASSERT_THAT(raw.send(frame(text_bytes("with a pidfd"))), Succeeded());
    auto m = ch.receive();
    ASSERT_THAT(m, Succeeded());
    EXPECT_EQ(m->text(), "with a pidfd");
    EXPECT_TRUE(m->fds().empty());
  }
}

TEST_P(channel_kind_test, FdsCutShortAtRlimitNofileRefuseOneMessageOnly) {
  const socket_kind kind = GetParam();
  const int status = test::run_in_child([kind] {
    auto ends = channel_pair(kind);
    if (!ends) return 10;
    auto [read_end, write_end] = make_pipe();
    const std::array<int, 3> fds{read_end.get(), write_end.get(), read_end.get()};
    if (!ends->first.send(as_bytes("three fds"), fds)) return 11;
    if (!ends->first.send(as_bytes("after"))) return 12;
    const std::size_t before = test::open_fd_count();
    int lowest = 0;
    while (test::fd_is_open(lowest))
      ++lowest;
    rlimit old{};
    ::getrlimit(RLIMIT_NOFILE, &old);
    const rlimit lowered{static_cast<rlim_t>(lowest + 1), old.rlim_max};  // room for one fd
    if (::setrlimit(RLIMIT_NOFILE, &lowered) != 0) return 13;
    auto first = ends->second.receive();
    ::setrlimit(RLIMIT_NOFILE, &old);
    if (first || first.error() != errc::fds_truncated) return 14;
    if (test::fd_is_open(lowest)) return 15;  // the one fd the kernel installed was closed
    if (test::open_fd_count() != before) return 16;
    auto second = ends->second.receive();
    if (!second || second->text() != "after") return 17;
    return 0;
  });
  EXPECT_EQ(status, 0);
}

TEST_F(channel_test, FdsTravelOnceWithALargeFrameCutIntoManyWrites) {
  auto [a, b] = make(socket_kind::stream);
  auto [read_end, write_end] = make_pipe();
  const std::array<int, 3> fds{read_end.get(), write_end.get(), read_end.get()};
  const auto data = pattern(8 << 20, 4);
  std::thread sender([&] {
    ASSERT_THAT(a.send(data, fds), Succeeded());
    ASSERT_THAT(a.send(as_bytes("then none")), Succeeded());
  });
  auto m = b.receive(30s);
  ASSERT_THAT(m, Succeeded());
  EXPECT_EQ(m->fds().size(), 3U);
  EXPECT_TRUE(same(m->bytes(), data));
  auto next = b.receive(30s);
  ASSERT_THAT(next, Succeeded());
  EXPECT_TRUE(next->fds().empty());
  sender.join();
}

// --- threads (class 12) ----------------------------------------------------------------------

TEST_P(channel_kind_test, ConcurrentSendersNeverInterleave) {
  auto [a, b] = make(GetParam());
  constexpr int threads = 4;
  constexpr int per_thread = 400;
  std::vector<std::thread> senders;
  for (int t = 0; t < threads; ++t) {
    senders.emplace_back([&a, t] {
      for (int i = 0; i < per_thread; ++i) {
        // thread, sequence number, then a body whose size and contents both depend on them
        std::vector<std::byte> m(8 + static_cast<std::size_t>((t * 7919 + i * 104729) % 20000));
        const std::uint32_t id[2] = {static_cast<std::uint32_t>(t), static_cast<std::uint32_t>(i)};
        std::memcpy(m.data(), id, 8);
        const auto body = pattern(m.size() - 8, static_cast<unsigned>(t * 100000 + i));
        std::copy(body.begin(), body.end(), m.begin() + 8);
        ASSERT_THAT(a.send(m), Succeeded());
      }
    });
  }
  std::map<std::uint32_t, std::uint32_t> next;
  for (int n = 0; n < threads * per_thread; ++n) {
    auto m = b.receive(30s);
    ASSERT_THAT(m, Succeeded());
    std::uint32_t id[2];
    ASSERT_GE(m->size(), 8U);
    std::memcpy(id, m->bytes().data(), 8);
    EXPECT_EQ(id[1], next[id[0]]++) << "thread " << id[0] << " out of order";
    EXPECT_EQ(m->size(), 8 + static_cast<std::size_t>((id[0] * 7919 + id[1] * 104729) % 20000));
    EXPECT_TRUE(same(m->bytes().subspan(8), pattern(m->size() - 8, id[0] * 100000 + id[1])));
  }
  for (auto& s : senders)
    s.join();
}

// Each message carries one memfd that names it ("thread:seq", also the payload's first line):
// with senders racing, every fd still arrives with its own message, in each sender's order, and
// none is lost or duplicated. On a stream every 16th message is larger than the socket buffer, so
// the kernel takes it in several pieces that another thread's write could land between.
TEST_P(channel_kind_test, ConcurrentSendersWithFdsKeepEachFdWithItsMessage) {
  auto [a, b] = make(GetParam());
  constexpr int threads = 4;
  constexpr int per_thread = 150;
  const bool stream = GetParam() == socket_kind::stream;
  auto padding = [stream](std::uint32_t t, std::uint32_t i) {
    const std::size_t size =
        (t * 7919 + i * 104729) % 20000 + (stream && i % 16 == 15 ? 300000 : 0);
    return pattern(size, t * 100000 + i);
  };
  std::vector<std::thread> senders;
  for (int t = 0; t < threads; ++t) {
    senders.emplace_back([&a, &padding, t] {
      for (int i = 0; i < per_thread; ++i) {
        const std::string id = std::to_string(t) + ":" + std::to_string(i);
        const unique_fd fd = memfd_holding(id);
        const std::string head = id + "\n";
        const auto body = padding(static_cast<std::uint32_t>(t), static_cast<std::uint32_t>(i));
        const std::array<const_buffer, 2> parts{as_bytes(head), body};
        const std::array<int, 1> fds{fd.get()};
        ASSERT_THAT(a.send(parts, fds), Succeeded());
      }  // the sender closes its memfd at once: the message holds its own
    });
  }
  std::map<std::uint32_t, std::uint32_t> next;
  const auto receive_all = [&] {
    for (int n = 0; n < threads * per_thread; ++n) {
      auto m = b.receive(30s);
      ASSERT_THAT(m, Succeeded()) << "message " << n;
      const std::string_view text = m->text();
      const std::size_t end = text.find('\n');
      ASSERT_NE(end, std::string_view::npos) << "message " << n;
      const std::string id(text.substr(0, end));
      ASSERT_EQ(m->fds().size(), 1U) << id;
      EXPECT_EQ(contents_of(m->fds()[0].get()), id) << "an fd travelled with another message";
      std::uint32_t t = 0;
      std::uint32_t i = 0;
      ASSERT_EQ(std::sscanf(id.c_str(), "%u:%u", &t, &i), 2) << id;
      EXPECT_EQ(i, next[t]++) << "thread " << t << " out of order";
      EXPECT_TRUE(same(m->bytes().subspan(end + 1), padding(t, i))) << id;
    }
  };
  receive_all();
  if (HasFailure()) b.close();  // the receiver may have given up: unblock the senders
  for (auto& s : senders)
    s.join();
  if (HasFailure()) return;
  EXPECT_THAT(b.try_receive(), HasError(errc::would_block));  // nothing more, nothing twice
  ASSERT_EQ(next.size(), static_cast<std::size_t>(threads));
  for (const auto& [t, count] : next)
    EXPECT_EQ(count, static_cast<std::uint32_t>(per_thread)) << "thread " << t;
}

// The receive lock. While one thread holds it (inside receive_batch's callback), another's
// try_receive says would_block and a receive with a deadline gives up with timed_out, though a
// message is there; a blocking receive waits its turn, and is woken when the lock is released.
TEST_P(channel_kind_test, ReceiversWaitForTheReceiveLockAsTheirDeadlinesSay) {
  auto [a, b] = make(GetParam());
  ASSERT_THAT(a.send(as_bytes("one")), Succeeded());
  std::atomic<bool> holding{false};
  std::atomic<bool> let_go{false};
  std::thread holder([&] {
    auto n = b.receive_batch(
        [&](message_view& m) {
          EXPECT_EQ(m.text(), "one");
          holding = true;
          while (!let_go)
            std::this_thread::sleep_for(1ms);
        },
        1, 30s);
    EXPECT_THAT(n, Succeeded());
  });
  while (!holding)
    std::this_thread::sleep_for(1ms);
  ASSERT_THAT(a.send(as_bytes("two")), Succeeded());
  ASSERT_THAT(a.send(as_bytes("three")), Succeeded());
  EXPECT_THAT(b.try_receive(), HasError(errc::would_block));
  EXPECT_THAT(b.receive(30ms), HasError(errc::timed_out));
  std::atomic<bool> waiting{false};
  std::thread waiter([&] {
    waiting = true;
    auto m = b.receive(20s);  // waits for the lock
    ASSERT_THAT(m, Succeeded());
    EXPECT_EQ(m->text(), "two");
  });
  while (!waiting)
    std::this_thread::sleep_for(1ms);
  std::this_thread::sleep_for(20ms);
  let_go = true;
  holder.join();
  waiter.join();
  EXPECT_EQ(b.try_receive()->text(), "three");
}

TEST_P(channel_kind_test, ConcurrentReceiversEachGetWholeMessagesExactlyOnce) {
  auto [a, b] = make(GetParam());
  constexpr int total = 2000;
  std::vector<std::vector<int>> got(3);
  std::vector<std::thread> receivers;
  for (int r = 0; r < 3; ++r) {
    receivers.emplace_back([&b, &got, r] {
      for (;;) {
        auto m = b.receive(30s);
        if (!m) {
          EXPECT_THAT(m, HasError(errc::peer_closed));
          return;
        }
        const int n = std::stoi(std::string(m->text().substr(0, m->text().find(' '))));
        EXPECT_EQ(m->size(), std::to_string(n).size() + 1 + static_cast<std::size_t>(n % 3000));
        got[static_cast<std::size_t>(r)].push_back(n);
      }
    });
  }
  for (int i = 0; i < total; ++i) {
    std::string text =
        std::to_string(i) + " " + std::string(static_cast<std::size_t>(i % 3000), 'x');
    ASSERT_THAT(a.send(as_bytes(text)), Succeeded());
  }
  a = channel();
  for (auto& r : receivers)
    r.join();
  std::vector<int> all;
  for (const auto& g : got) {
    EXPECT_TRUE(std::ranges::is_sorted(g));  // each receiver sees stream order
    all.insert(all.end(), g.begin(), g.end());
  }
  std::ranges::sort(all);
  ASSERT_EQ(all.size(), static_cast<std::size_t>(total));
  for (int i = 0; i < total; ++i)
    EXPECT_EQ(all[static_cast<std::size_t>(i)], i);
}

TEST_P(channel_kind_test, CloseWhileOtherThreadsSendAndReceive) {
  auto [a, b] = make(GetParam());
  std::atomic<int> sent{0};
  std::thread sender([&] {
    const auto data = pattern(GetParam() == socket_kind::stream ? 100000 : 1000, 1);
    for (;;) {
      auto r = a.send(data);  // b never reads: this blocks once the buffers are full
      if (!r) {
        EXPECT_THAT(r, HasError(errc::closed));
        return;
      }
      ++sent;
    }
  });
  std::thread receiver([&] {
    auto r = a.receive();  // nothing ever comes to a
    EXPECT_THAT(r, HasError(errc::closed));
  });
  while (sent.load() < 2)
    std::this_thread::sleep_for(1ms);
  std::this_thread::sleep_for(20ms);
  a.close();
  sender.join();
  receiver.join();
  EXPECT_THAT(a.send(as_bytes("x")), HasError(errc::closed));
  EXPECT_THAT(a.receive(), HasError(errc::closed));
  EXPECT_THAT(a.peer_credentials(), HasError(errc::closed));
}

TEST_F(channel_test, CloseOnAnIdleChannelClosesTheFdAtOnce) {
  auto [a, b] = make(socket_kind::stream);
  const int fd = a.native_handle();
  a.close();
  EXPECT_FALSE(test::fd_is_open(fd));
  EXPECT_EQ(a.native_handle(), -1);
  EXPECT_THAT(a.send(as_bytes("x")), HasError(errc::closed));
  EXPECT_THAT(b.receive(), HasError(errc::peer_closed));
}

TEST_P(channel_kind_test, ClosingTheChildsEndInTheParentLeavesTheChildConnected) {
  auto ends = make(GetParam());
  const pid_t pid = fork_or_throw();
  if (pid == 0) {
    ends.first.close();
    auto ping = ends.second.receive(10s);
    if (!ping || ping->text() != "ping") ::_exit(1);
    ::_exit(ends.second.send(as_bytes("pong")) ? 0 : 2);
  }
  ends.second.close();  // the parent's copy only: no shutdown of the child's connection
  ASSERT_THAT(ends.first.send(as_bytes("ping")), Succeeded());
  auto pong = ends.first.receive(10s);
  ASSERT_THAT(pong, Succeeded());
  EXPECT_EQ(pong->text(), "pong");
  EXPECT_EQ(reap(pid), 0);
}

// --- half-close and credentials --------------------------------------------------------------

TEST_P(channel_kind_test, HalfCloseDeliversEverythingAndTheReplyStillComes) {
  auto [a, b] = make(GetParam());
  ASSERT_THAT(a.send(as_bytes("request")), Succeeded());
  ASSERT_THAT(a.shutdown_send(), Succeeded());
  EXPECT_EQ(b.receive()->text(), "request");
  EXPECT_THAT(b.receive(), HasError(errc::peer_closed));
  ASSERT_THAT(b.send(as_bytes("reply")), Succeeded());
  EXPECT_EQ(a.receive()->text(), "reply");
  EXPECT_THAT(a.send(as_bytes("late")), HasError(errc::peer_closed));
}

TEST_F(channel_test, CredentialsNameTheCreatorOfThePair) {
  auto [a, b] = make(socket_kind::seqpacket);
  auto cred = a.peer_credentials();
  ASSERT_THAT(cred, Succeeded());
  EXPECT_EQ(cred->pid, ::getpid());
  auto pidfd = b.peer_pidfd();
  if (!pidfd && pidfd.error() == errc::not_supported) GTEST_SKIP() << "kernel before 6.5";
  ASSERT_THAT(pidfd, Succeeded());
  EXPECT_TRUE(test::fd_is_cloexec(pidfd->get()));
}

}  // namespace
}  // namespace duplex
