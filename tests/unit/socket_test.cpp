#include "duplex/socket.hpp"

#include <fcntl.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <numeric>
#include <string>
#include <thread>
#include <vector>

#include "duplex/socket_pair.hpp"
#include "support.hpp"

namespace duplex {
namespace {

using namespace std::chrono_literals;
using test::HasError;
using test::make_pipe;
using test::pattern;
using test::Succeeded;
using test::sys;

connected_pair make(socket_kind kind, pair_options options = {}) {
  return test::must(socket_pair(kind, options));
}

std::string text(std::span<const std::byte> b) { return std::string(as_string_view(b)); }

class socket_test : public test::fd_checked {};
class socket_kind_test : public test::kind_test {};

INSTANTIATE_TEST_SUITE_P(kinds, socket_kind_test,
                         ::testing::Values(socket_kind::stream, socket_kind::datagram,
                                           socket_kind::seqpacket),
                         test::kind_name);

class packet_kind_test : public test::kind_test {};

INSTANTIATE_TEST_SUITE_P(kinds, packet_kind_test,
                         ::testing::Values(socket_kind::datagram, socket_kind::seqpacket),
                         test::kind_name);

// --- basic transfer --------------------------------------------------------------------------

TEST_P(socket_kind_test, BothDirectionsCarryBytes) {
  auto [a, b] = make(GetParam());
  std::array<std::byte, 64> buf{};
  ASSERT_THAT(a.send(as_bytes("ping")), Succeeded());
  EXPECT_EQ(text(std::span(buf).first(b.receive(buf).value())), "ping");
  ASSERT_THAT(b.send(as_bytes("pong!")), Succeeded());
  EXPECT_EQ(text(std::span(buf).first(a.receive(buf).value())), "pong!");
}

TEST_P(socket_kind_test, ScatterGatherSendsOneMessage) {
  auto [a, b] = make(GetParam());
  const std::array<const_buffer, 3> parts = {as_bytes("head|"), as_bytes(""), as_bytes("tail")};
  EXPECT_EQ(a.send(parts).value(), 9U);
  std::array<std::byte, 64> buf{};
  EXPECT_EQ(text(std::span(buf).first(b.receive(buf).value())), "head|tail");
}

TEST_P(socket_kind_test, AnEmptySocketReportsEbadf) {
  socket empty;
  std::array<std::byte, 4> buf{};
  EXPECT_FALSE(empty.is_open());
  EXPECT_THAT(empty.send(as_bytes("x")), HasError(sys(EBADF)));
  EXPECT_THAT(empty.receive(buf), HasError(sys(EBADF)));
  EXPECT_THAT(empty.wait_readable(1ms), HasError(sys(EBADF)));
  EXPECT_THAT(empty.shutdown(shutdown_how::both), HasError(sys(EBADF)));
  EXPECT_THAT(empty.peer_credentials(), HasError(sys(EBADF)));
}

TEST_P(socket_kind_test, DontWaitGivesWouldBlockWithoutTouchingFileFlags) {
  auto [a, b] = make(GetParam());
  std::array<std::byte, 8> buf{};
  EXPECT_THAT(b.receive(buf, io_flags::dont_wait), HasError(errc::would_block));
  EXPECT_FALSE(b.is_non_blocking().value());
  EXPECT_THAT(b.receive(buf, 20ms), HasError(errc::timed_out));
}

TEST_P(socket_kind_test, PeekLeavesTheDataQueued) {
  auto [a, b] = make(GetParam());
  ASSERT_THAT(a.send(as_bytes("look")), Succeeded());
  std::array<std::byte, 16> buf{};
  EXPECT_EQ(b.receive(buf, io_flags::peek).value(), 4U);
  EXPECT_EQ(b.receive(buf).value(), 4U);
  EXPECT_EQ(text(std::span(buf).first(4)), "look");
}

TEST_P(socket_kind_test, BufferSizesCanBeSetAndRead) {
  auto [a, b] = make(GetParam());
  ASSERT_THAT(a.set_send_buffer_size(64 * 1024), Succeeded());
  ASSERT_THAT(a.set_receive_buffer_size(96 * 1024), Succeeded());
  // The kernel doubles what it is given, for its bookkeeping.
  EXPECT_EQ(a.send_buffer_size().value(), 128U * 1024);
  EXPECT_EQ(a.receive_buffer_size().value(), 192U * 1024);
}

// --- streams: partial transfers, end-of-stream, half-close -----------------------------------

TEST_F(socket_test, ATinySendBufferMakesSendsPartialAndSendAllFinishesThem) {
  auto [a, b] = make(socket_kind::stream);
  ASSERT_THAT(a.set_send_buffer_size(1), Succeeded());  // the kernel's minimum, a few KiB
  ASSERT_THAT(b.set_receive_buffer_size(1), Succeeded());
  const auto data = pattern(1 << 20);
  auto first = a.send(data, io_flags::dont_wait);
  ASSERT_THAT(first, Succeeded());
  EXPECT_GT(*first, 0U);
  EXPECT_LT(*first, data.size()) << "a tiny buffer must take only part of 1 MiB";

  std::vector<std::byte> got(data.size());
  std::thread reader([&b, &got] { EXPECT_THAT(b.receive_exact(got), Succeeded()); });
  EXPECT_THAT(a.send_all(std::span(data).subspan(*first)), Succeeded());
  reader.join();
  EXPECT_EQ(got, data);
}

TEST_F(socket_test, SendAllOnANonBlockingSocketWaitsForRoom) {
  auto [a, b] = make(socket_kind::stream, {.non_blocking = true});
  const auto data = pattern(4 << 20, 2);
  std::vector<std::byte> got(data.size());
  std::thread reader([&b, &got] { EXPECT_THAT(b.receive_exact(got, 30s), Succeeded()); });
  EXPECT_THAT(a.send_all(data), Succeeded());
  reader.join();
  EXPECT_EQ(got, data);
}

TEST_F(socket_test, SendAllTimesOutWhenThePeerNeverReads) {
  auto [a, b] = make(socket_kind::stream);
  const auto data = pattern(8 << 20);
  const auto start = std::chrono::steady_clock::now();
  EXPECT_THAT(a.send_all(data, 50ms), HasError(errc::timed_out));
  EXPECT_GE(std::chrono::steady_clock::now() - start, 50ms);
}

TEST_F(socket_test, EndOfStreamIsPeerClosed) {
  auto [a, b] = make(socket_kind::stream);
  ASSERT_THAT(a.send(as_bytes("last words")), Succeeded());
  a.close();
  std::array<std::byte, 64> buf{};
  EXPECT_EQ(b.receive(buf).value(), 10U);  // what was sent before the close is delivered
  EXPECT_THAT(b.receive(buf), HasError(errc::peer_closed));
  EXPECT_THAT(b.receive(buf), HasError(errc::peer_closed));  // and stays so
}

TEST_F(socket_test, HalfCloseLetsThePeerFinishAndStillReply) {
  auto [a, b] = make(socket_kind::stream);
  ASSERT_THAT(a.send_all(as_bytes("request")), Succeeded());
  ASSERT_THAT(a.shutdown(shutdown_how::write), Succeeded());
  std::array<std::byte, 7> req{};
  ASSERT_THAT(b.receive_exact(req), Succeeded());
  EXPECT_EQ(text(req), "request");
  std::array<std::byte, 8> more{};
  EXPECT_THAT(b.receive(more), HasError(errc::peer_closed));
  ASSERT_THAT(b.send_all(as_bytes("reply")), Succeeded());
  std::array<std::byte, 5> rep{};
  ASSERT_THAT(a.receive_exact(rep), Succeeded());
  EXPECT_EQ(text(rep), "reply");
  EXPECT_THAT(a.send(as_bytes("x")), HasError(sys(EPIPE)));  // our own write side is shut
}

TEST_F(socket_test, ReceiveExactReportsAStreamThatEndsInside) {
  auto [a, b] = make(socket_kind::stream);
  ASSERT_THAT(a.send_all(as_bytes("abc")), Succeeded());
  a.close();
  std::array<std::byte, 8> buf{};
  EXPECT_THAT(b.receive_exact(buf), HasError(errc::truncated_message));
  EXPECT_THAT(b.receive_exact(buf), HasError(errc::peer_closed));
}

TEST_F(socket_test, ClosingWithUnreadDataGivesDataThenEconnresetThenPeerClosed) {
  auto [a, b] = make(socket_kind::stream);
  ASSERT_THAT(a.send(as_bytes("never read")), Succeeded());
  ASSERT_THAT(b.send(as_bytes("bye")), Succeeded());
  b.close();  // with a's bytes unread in its queue
  std::array<std::byte, 16> buf{};
  EXPECT_EQ(a.receive(buf).value(), 3U);
  EXPECT_THAT(a.receive(buf), HasError(sys(ECONNRESET)));
  EXPECT_THAT(a.receive(buf), HasError(errc::peer_closed));
}

TEST_F(socket_test, OnSeqpacketEconnresetComesBeforeTheQueuedPackets) {
  auto [a, b] = make(socket_kind::seqpacket);
  ASSERT_THAT(a.send(as_bytes("never read")), Succeeded());
  ASSERT_THAT(b.send(as_bytes("one")), Succeeded());
  ASSERT_THAT(b.send(as_bytes("two")), Succeeded());
  b.close();
  std::array<std::byte, 16> buf{};
  EXPECT_THAT(a.receive(buf), HasError(sys(ECONNRESET)));
  EXPECT_EQ(a.receive(buf).value(), 3U);
  EXPECT_EQ(a.receive(buf).value(), 3U);
  EXPECT_THAT(a.receive(buf), HasError(errc::peer_closed));
}

TEST_F(socket_test, ReceiveExactAndNextPacketSizeCheckTheKind) {
  auto [a, b] = make(socket_kind::seqpacket);
  std::array<std::byte, 4> buf{};
  EXPECT_THAT(a.receive_exact(buf), HasError(errc::wrong_kind));
  auto [c, d] = make(socket_kind::stream);
  EXPECT_THAT(c.next_packet_size(), HasError(errc::wrong_kind));
}

// --- SIGPIPE ---------------------------------------------------------------------------------

TEST_P(socket_kind_test, WritingToAClosedPeerIsAnErrorNotSigpipe) {
  const test::default_sigpipe sigpipe;  // had a write raised it, this process would die
  auto [a, b] = make(GetParam());
  b.close();
  auto first = a.send(as_bytes("anyone there?"));
  auto second = a.send(as_bytes("anyone?"));
  if (GetParam() == socket_kind::datagram) {
    // A datagram pair is disconnected by the peer's close: refused once, then not connected.
    EXPECT_THAT(first, HasError(sys(ECONNREFUSED)));
    EXPECT_THAT(second, HasError(sys(ENOTCONN)));
  } else {
    EXPECT_THAT(first, HasError(sys(EPIPE)));
    EXPECT_THAT(second, HasError(sys(EPIPE)));
  }
  // Still alive: SIGPIPE at its default would have killed this process.
}

// --- packets: boundaries, truncation, end-of-stream ------------------------------------------

TEST_P(packet_kind_test, PacketsKeepBoundariesAndAreNeverCutSilently) {
  auto [a, b] = make(GetParam());
  const auto big = pattern(100);
  ASSERT_THAT(a.send(as_bytes("First message")), Succeeded());
  ASSERT_THAT(a.send(as_bytes("Second message is longer than the first one.")), Succeeded());
  ASSERT_THAT(a.send(big), Succeeded());
  ASSERT_THAT(a.send(big), Succeeded());
  ASSERT_THAT(a.send(big), Succeeded());
  std::array<std::byte, 256> buf{};
  EXPECT_EQ(b.receive(buf).value(), 13U);
  EXPECT_EQ(b.receive(buf).value(), 44U);
  // The size of the next packet, nothing consumed.
  EXPECT_EQ(b.next_packet_size().value(), 100U);
  EXPECT_EQ(b.next_packet_size().value(), 100U);
  std::array<std::byte, 10> small{};
  EXPECT_THAT(b.receive(small), HasError(errc::buffer_too_small));
  // Opting in to truncation reports the real size.
  const std::array<mutable_buffer, 1> bufs{small};
  auto cut = b.receive_msg(bufs, {}, io_flags::allow_truncation);
  ASSERT_THAT(cut, Succeeded());
  EXPECT_EQ(cut->bytes, 10U);
  EXPECT_EQ(cut->message_size, 100U);
  EXPECT_TRUE(std::equal(small.begin(), small.end(), big.begin()));
  EXPECT_THAT(b.receive_msg(bufs, {}), HasError(errc::buffer_too_small));
  EXPECT_THAT(b.receive(small, io_flags::dont_wait), HasError(errc::would_block));
}

// Class 7: a packet one byte over what the kernel takes (SO_SNDBUF - 32 on AF_UNIX) is refused
// with EMSGSIZE by send, send_msg (with an fd, which the caller keeps) and send_all; nothing is
// sent, and the socket then carries a packet of exactly the limit, byte-exact, and a small one.
// (Stops at the first failure: a packet sent in spite of all would fill the send buffer.)
TEST_P(packet_kind_test, APacketOverTheKernelsLimitIsEmsgsizeAndNothingIsSent) {
  auto [a, b] = make(GetParam());
  const std::size_t limit = a.send_buffer_size().value() - 32;
  const auto over = pattern(limit + 1, 1);
  ASSERT_THAT(a.send(over), HasError(sys(EMSGSIZE)));
  auto [read_end, write_end] = make_pipe();
  const std::array<const_buffer, 1> parts{over};
  const std::array<int, 1> fds{read_end.get()};
  ASSERT_THAT(a.send_msg(parts, fds), HasError(sys(EMSGSIZE)));
  EXPECT_TRUE(test::fd_is_open(read_end.get()));
  ASSERT_THAT(a.send_all(over), HasError(sys(EMSGSIZE)));
  std::vector<std::byte> buf(limit + 100);
  ASSERT_THAT(b.receive(buf, io_flags::dont_wait), HasError(errc::would_block));  // nothing sent

  const auto largest = pattern(limit, 2);
  ASSERT_THAT(a.send(largest), Succeeded());
  auto n = b.receive(buf, 10s);  // before the next send: this packet fills the send buffer
  ASSERT_THAT(n, Succeeded());
  ASSERT_EQ(*n, limit);
  EXPECT_TRUE(test::same(std::span(buf).first(limit), largest));
  ASSERT_THAT(a.send(as_bytes("after")), Succeeded());
  n = b.receive(buf, 10s);
  ASSERT_THAT(n, Succeeded());
  EXPECT_EQ(text(std::span(buf).first(*n)), "after");
}

TEST_F(socket_test, SeqpacketTellsEmptyPacketsFromEndOfStream) {
  auto [a, b] = make(socket_kind::seqpacket);
  ASSERT_THAT(a.send(const_buffer{}), Succeeded());
  ASSERT_THAT(a.send(as_bytes("after the empty one")), Succeeded());
  std::array<std::byte, 64> buf{};
  EXPECT_EQ(b.receive(buf).value(), 0U);  // an empty packet, the peer still open
  ASSERT_THAT(a.send(const_buffer{}), Succeeded());
  a.close();
  // An empty packet followed by data, with the peer gone: the data is not lost.
  EXPECT_EQ(b.receive(buf).value(), 19U);
  EXPECT_THAT(b.receive(buf), HasError(errc::peer_closed));
  EXPECT_THAT(b.next_packet_size(), HasError(errc::peer_closed));
}

TEST_F(socket_test, ADatagramPairHasNoEndOfStream) {
  auto [a, b] = make(socket_kind::datagram);
  ASSERT_THAT(a.send(as_bytes("queued")), Succeeded());
  a.close();
  std::array<std::byte, 16> buf{};
  EXPECT_EQ(b.receive(buf).value(), 6U);  // what was queued survives the close
  // Then nothing says the peer is gone: a receive waits (here until its timeout), and the socket
  // polls writable but never readable or hung up.
  EXPECT_THAT(b.receive(buf, 30ms), HasError(errc::timed_out));
  EXPECT_THAT(b.wait_readable(10ms), HasError(errc::timed_out));
  EXPECT_THAT(b.wait_writable(10ms), Succeeded());
  // Only a send finds out.
  EXPECT_THAT(b.send(as_bytes("x")), HasError(sys(ECONNREFUSED)));
}

// --- waiting and timeouts --------------------------------------------------------------------

TEST_F(socket_test, WaitsTimeOutAndWakeOnData) {
  auto [a, b] = make(socket_kind::stream);
  auto start = std::chrono::steady_clock::now();
  EXPECT_THAT(b.wait_readable(40ms), HasError(errc::timed_out));
  EXPECT_GE(std::chrono::steady_clock::now() - start, 40ms);
  EXPECT_THAT(b.wait_writable(0ms), Succeeded());
  std::thread writer([&a] {
    std::this_thread::sleep_for(20ms);
    EXPECT_THAT(a.send(as_bytes("late")), Succeeded());
  });
  std::array<std::byte, 8> buf{};
  EXPECT_EQ(b.receive(buf, 10s).value(), 4U);
  writer.join();
}

TEST_F(socket_test, WaitWritableTimesOutOnAFullSocket) {
  auto [a, b] = make(socket_kind::stream);
  const auto chunk = pattern(64 * 1024);
  while (a.send(chunk, io_flags::dont_wait)) {
  }
  EXPECT_THAT(a.send(chunk, io_flags::dont_wait), HasError(errc::would_block));
  const auto start = std::chrono::steady_clock::now();
  EXPECT_THAT(a.wait_writable(30ms), HasError(errc::timed_out));
  EXPECT_GE(std::chrono::steady_clock::now() - start, 30ms);
}

TEST_F(socket_test, ANegativeTimeoutIsAnImmediateCheck) {
  auto [a, b] = make(socket_kind::stream);
  std::array<std::byte, 8> buf{};
  EXPECT_THAT(b.receive(buf, -5s), HasError(errc::timed_out));
  ASSERT_THAT(a.send(as_bytes("now")), Succeeded());
  EXPECT_EQ(b.receive(buf, 0ms).value(), 3U);
}

// --- EINTR under a signal storm --------------------------------------------------------------

TEST_F(socket_test, BlockingCallsRideOutASignalStorm) {
  auto [a, b] = make(socket_kind::stream);
  const auto data = pattern(8 << 20, 3);
  std::thread writer([&a, &data] {
    std::this_thread::sleep_for(50ms);  // the reader is blocked, being interrupted, meanwhile
    EXPECT_THAT(a.send_all(data), Succeeded());
  });
  long delivered = 0;
  std::vector<std::byte> got(data.size());
  {
    test::signal_storm storm;  // 10 kHz at this thread, no SA_RESTART
    std::array<std::byte, 1> first{};
    EXPECT_THAT(b.receive_exact(first), Succeeded());
    got[0] = first[0];
    EXPECT_THAT(b.receive_exact(std::span(got).subspan(1)), Succeeded());
    EXPECT_THAT(b.wait_readable(30ms), HasError(errc::timed_out));  // timeouts still honoured
    delivered = storm.delivered();
  }
  writer.join();
  EXPECT_EQ(got, data);
  EXPECT_GT(delivered, 10) << "the storm did not reach the blocked thread";
}

TEST_F(socket_test, SendAllRidesOutASignalStorm) {
  auto [a, b] = make(socket_kind::stream);
  const auto data = pattern(8 << 20, 4);
  std::vector<std::byte> got(data.size());
  std::thread reader([&b, &got] {
    std::this_thread::sleep_for(50ms);  // the writer fills the buffer and blocks meanwhile
    EXPECT_THAT(b.receive_exact(got), Succeeded());
  });
  long delivered = 0;
  {
    test::signal_storm storm;
    EXPECT_THAT(a.send_all(data), Succeeded());
    const auto start = std::chrono::steady_clock::now();
    std::array<std::byte, 1> none{};
    EXPECT_THAT(a.receive(none, 30ms), HasError(errc::timed_out));
    EXPECT_GE(std::chrono::steady_clock::now() - start, 30ms);
    delivered = storm.delivered();
  }
  reader.join();
  EXPECT_EQ(got, data);
  EXPECT_GT(delivered, 10);
}

TEST_F(socket_test, PacketReceiveRidesOutASignalStorm) {
  auto [a, b] = make(socket_kind::seqpacket);
  auto [keep, passed] = make_pipe();
  long delivered = 0;
  {
    test::signal_storm storm;
    // The packet comes only once the blocked receive has been interrupted many times (not after a
    // fixed delay: a loaded machine may deliver far fewer signals in one).
    std::thread writer([&a, &passed, &storm] {
      const auto give_up = std::chrono::steady_clock::now() + 10s;
      while (storm.delivered() <= 60 && std::chrono::steady_clock::now() < give_up)
        std::this_thread::sleep_for(1ms);
      const std::array<const_buffer, 1> bufs{as_bytes("with an fd")};
      const std::array<int, 1> fds{passed.get()};
      EXPECT_THAT(a.send_msg(bufs, fds), Succeeded());
    });
    std::array<std::byte, 32> buf{};
    const std::array<mutable_buffer, 1> bufs{buf};
    std::array<unique_fd, 1> fds;
    auto r = b.receive_msg(bufs, fds);
    delivered = storm.delivered();
    writer.join();
    ASSERT_THAT(r, Succeeded());
    EXPECT_EQ(r->fds, 1U);
  }
  EXPECT_GT(delivered, 50);
}

// --- fd passing ------------------------------------------------------------------------------

TEST_P(socket_kind_test, AnFdTravelsAndWorksOnTheOtherSide) {
  auto [a, b] = make(GetParam());
  auto [read_end, write_end] = make_pipe();
  const std::array<const_buffer, 1> bufs{as_bytes("take this")};
  const std::array<int, 1> fds{read_end.get()};
  EXPECT_EQ(a.send_msg(bufs, fds).value(), 9U);
  EXPECT_TRUE(test::fd_is_open(read_end.get()));  // the sender keeps its fd

  std::array<std::byte, 32> buf{};
  const std::array<mutable_buffer, 1> in{buf};
  std::array<unique_fd, 4> got;
  auto r = b.receive_msg(in, got);
  ASSERT_THAT(r, Succeeded());
  EXPECT_EQ(r->bytes, 9U);
  ASSERT_EQ(r->fds, 1U);
  EXPECT_TRUE(got[0].valid());
  EXPECT_FALSE(got[1].valid());
  EXPECT_NE(got[0].get(), read_end.get());
  EXPECT_TRUE(test::fd_is_cloexec(got[0].get()));  // MSG_CMSG_CLOEXEC
  ASSERT_EQ(::write(write_end.get(), "ok", 2), 2);
  char two[2];
  ASSERT_EQ(::read(got[0].get(), two, 2), 2);
  EXPECT_EQ(std::string(two, 2), "ok");
}

TEST_P(socket_kind_test, The253rdFdGoesAndThe254thIsRefusedBeforeSending) {
  auto [a, b] = make(GetParam());
  auto [read_end, write_end] = make_pipe();
  const std::array<const_buffer, 1> bufs{as_bytes("x")};
  std::vector<int> fds(max_fds_per_message + 1, read_end.get());
  EXPECT_THAT(a.send_msg(bufs, fds), HasError(errc::too_many_fds));
  std::array<std::byte, 4> buf{};
  ASSERT_THAT(b.receive(buf, io_flags::dont_wait), HasError(errc::would_block));  // nothing sent
  fds.pop_back();
  ASSERT_THAT(a.send_msg(bufs, fds), Succeeded());
  std::vector<unique_fd> got(max_fds_per_message);
  const std::array<mutable_buffer, 1> in{buf};
  auto r = b.receive_msg(in, got);
  ASSERT_THAT(r, Succeeded());
  EXPECT_EQ(r->fds, max_fds_per_message);
  for (const auto& fd : got)
    EXPECT_TRUE(test::fd_is_cloexec(fd.get()));
}

TEST_P(socket_kind_test, MoreFdsThanAcceptedAreAllClosed) {
  auto [a, b] = make(GetParam());
  auto [read_end, write_end] = make_pipe();
  const std::array<const_buffer, 1> bufs{as_bytes("three")};
  const std::array<int, 3> fds{read_end.get(), read_end.get(), write_end.get()};
  ASSERT_THAT(a.send_msg(bufs, fds), Succeeded());
  const std::size_t before = test::open_fd_count();
  std::array<std::byte, 8> buf{};
  const std::array<mutable_buffer, 1> in{buf};
  std::array<unique_fd, 1> got;
  EXPECT_THAT(b.receive_msg(in, got), HasError(errc::too_many_fds));
  EXPECT_FALSE(got[0].valid());  // no fd is handed over on error
  EXPECT_EQ(test::open_fd_count(), before);
}

TEST_P(socket_kind_test, FdsWhereNoneWereExpectedAreClosed) {
  auto [a, b] = make(GetParam());
  auto [read_end, write_end] = make_pipe();
  const std::array<const_buffer, 1> bufs{as_bytes("stray")};
  const std::array<int, 2> fds{read_end.get(), write_end.get()};
  ASSERT_THAT(a.send_msg(bufs, fds), Succeeded());
  ASSERT_THAT(a.send_msg(bufs, fds), Succeeded());
  const std::size_t before = test::open_fd_count();
  std::array<std::byte, 8> buf{};
  // A plain receive takes the bytes; the kernel discards the fds (it has nowhere to put them).
  EXPECT_EQ(b.receive(buf).value(), 5U);
  EXPECT_EQ(test::open_fd_count(), before);
  // receive_msg with no room for fds: an error, and every fd closed.
  const std::array<mutable_buffer, 1> in{buf};
  EXPECT_THAT(b.receive_msg(in, {}), HasError(errc::too_many_fds));
  EXPECT_EQ(test::open_fd_count(), before);
}

TEST_F(socket_test, FdsNeedAtLeastOneByteOnAStream) {
  auto [a, b] = make(socket_kind::stream);
  auto [read_end, write_end] = make_pipe();
  const std::array<int, 1> fds{read_end.get()};
  EXPECT_THAT(a.send_msg({}, fds), HasError(sys(EINVAL)));
}

TEST_F(socket_test, PeekingWithFdsIsRefused) {
  auto [a, b] = make(socket_kind::stream);
  std::array<std::byte, 8> buf{};
  const std::array<mutable_buffer, 1> in{buf};
  std::array<unique_fd, 1> got;
  EXPECT_THAT(b.receive_msg(in, got, io_flags::peek), HasError(sys(EINVAL)));
}

TEST_F(socket_test, FdsCutShortAtRlimitNofileAreAllClosed) {
  // In a child: lowering RLIMIT_NOFILE must not disturb the test process.
  const int status = test::run_in_child([] {
    auto pair = socket_pair(socket_kind::seqpacket);
    if (!pair) return 10;
    auto [read_end, write_end] = make_pipe();
    const std::array<const_buffer, 1> bufs{as_bytes("fds")};
    const std::array<int, 3> fds{read_end.get(), write_end.get(), read_end.get()};
    if (!pair->first.send_msg(bufs, fds)) return 11;
    const std::size_t before = test::open_fd_count();
    // Room for exactly one new fd: the lowest free number is the only one below the limit.
    int lowest = 0;
    while (test::fd_is_open(lowest))
      ++lowest;
    rlimit old{};
    ::getrlimit(RLIMIT_NOFILE, &old);
    const rlimit lowered{static_cast<rlim_t>(lowest + 1), old.rlim_max};
    if (::setrlimit(RLIMIT_NOFILE, &lowered) != 0) return 12;
    std::array<std::byte, 8> buf{};
    const std::array<mutable_buffer, 1> in{buf};
    std::array<unique_fd, 3> got;
    auto r = pair->second.receive_msg(in, got);
    ::setrlimit(RLIMIT_NOFILE, &old);
    if (r || r.error() != errc::fds_truncated) return 13;
    if (got[0].valid() || got[1].valid() || got[2].valid()) return 14;
    if (test::fd_is_open(lowest)) return 15;  // the one fd the kernel installed was closed
    if (test::open_fd_count() != before) return 16;
    return 0;
  });
  EXPECT_EQ(status, 0);
}

// --- adopting fds, credentials ---------------------------------------------------------------

TEST_F(socket_test, FromFdLearnsTheKindAndRejectsOthers) {
  auto pair = make(socket_kind::seqpacket);
  auto adopted = socket::from_fd(pair.first.release());
  ASSERT_THAT(adopted, Succeeded());
  EXPECT_EQ(adopted->kind(), socket_kind::seqpacket);

  auto [read_end, write_end] = make_pipe();
  const int raw = read_end.get();
  EXPECT_THAT(socket::from_fd(std::move(read_end)), HasError(sys(ENOTSOCK)));
  EXPECT_FALSE(test::fd_is_open(raw));  // closed on error: it was moved in

  unique_fd inet(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  ASSERT_TRUE(inet.valid());
  EXPECT_THAT(socket::from_fd(std::move(inet)), HasError(errc::wrong_kind));
}

TEST_F(socket_test, PeerCredentialsNameTheCreatorOfThePair) {
  auto [a, b] = make(socket_kind::stream);
  auto cred = a.peer_credentials();
  ASSERT_THAT(cred, Succeeded());
  EXPECT_EQ(cred->pid, ::getpid());
  EXPECT_EQ(cred->uid, ::geteuid());
  EXPECT_EQ(cred->gid, ::getegid());
  // A forked child holding the other end still reads the creator's pid, not its own.
  const pid_t parent = ::getpid();
  const int status = test::run_in_child([&b, parent] {
    auto c = b.peer_credentials();
    if (!c) return 10;
    return c->pid == parent ? 0 : 11;
  });
  EXPECT_EQ(status, 0);
}

TEST_F(socket_test, PeerPidfdIsCloseOnExecAndNamesThePeerProcess) {
  auto [a, b] = make(socket_kind::stream);
  auto pidfd = a.peer_pidfd();
  if (!pidfd && pidfd.error() == errc::not_supported) GTEST_SKIP() << "kernel before 6.5";
  ASSERT_THAT(pidfd, Succeeded());
  EXPECT_TRUE(test::fd_is_cloexec(pidfd->get()));
  std::ifstream info("/proc/self/fdinfo/" + std::to_string(pidfd->get()));
  std::string line;
  bool found = false;
  while (std::getline(info, line)) {
    if (line.rfind("Pid:", 0) == 0) {
      found = true;
      EXPECT_EQ(std::stol(line.substr(4)), static_cast<long>(::getpid()));
    }
  }
  EXPECT_TRUE(found) << "fdinfo of a pidfd has a Pid: line";
}

}  // namespace
}  // namespace duplex
