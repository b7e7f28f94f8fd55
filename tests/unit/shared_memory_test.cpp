// Large payloads through shared memory: the pool, the sealed-memfd fallback, allocate() for zero
// copy, the two receive modes, and peers that send hostile pools and references.
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <thread>
#include <vector>

#include "duplex/channel.hpp"
#include "duplex/socket_pair.hpp"
#include "shm/shm.hpp"
#include "support.hpp"

namespace duplex {
namespace {

using namespace std::chrono_literals;
using test::HasError;
using test::pattern;
using test::same;
using test::Succeeded;

class shared_memory_test : public test::kind_test {};

INSTANTIATE_TEST_SUITE_P(kinds, shared_memory_test,
                         ::testing::Values(socket_kind::stream, socket_kind::seqpacket),
                         test::kind_name);

channel_options with_shm(std::size_t pool = 8U << 20, shared_receive mode = shared_receive::copy) {
  channel_options o;
  o.shared_memory.enabled = true;
  o.shared_memory.threshold = 64 * 1024;
  o.shared_memory.pool_size = pool;
  o.shared_memory.receive = mode;
  return o;
}

TEST_P(shared_memory_test, LargeMessagesGoThroughThePoolByteExact) {
  for (const auto mode : {shared_receive::copy, shared_receive::view}) {
    auto [a, b] = test::must(channel_pair(GetParam(), with_shm(8U << 20, mode)));
    // On seqpacket, 1 MiB is far over what one packet carries: shared memory makes it possible.
    for (unsigned i = 0; i < 20; ++i) {
      const auto data = pattern((1U << 20) + i, i);
      ASSERT_THAT(a.send(data), Succeeded()) << i;
      auto m = b.receive(10s);
      ASSERT_THAT(m, Succeeded()) << i;
      EXPECT_EQ(m->is_view(), mode == shared_receive::view);
      EXPECT_TRUE(same(std::as_const(*m).bytes(), data)) << i;
    }
    // Small messages still travel inline.
    ASSERT_THAT(a.send(as_bytes("small")), Succeeded());
    EXPECT_EQ(b.receive(10s)->text(), "small");
  }
}

// Class 7: 16 MiB and 64 MiB (the default maximum) through shared memory, byte-exact, on both
// kinds (on seqpacket no packet could carry them): through the default 64 MiB pool, received as a
// copy and as a view, and with a 4 MiB pool, each in a sealed memfd of its own (received as a
// view). A view is what proves the payload came through shared memory.
TEST_P(shared_memory_test, SixteenAndSixtyFourMiBGoThroughSharedMemoryByteExact) {
#if defined(__SANITIZE_THREAD__)
  // Under ThreadSanitizer every byte copied and compared is checked: 16 MiB only (64 MiB would
  // take over 10 s per kind).
  const std::vector<std::vector<std::byte>> payloads = {pattern(std::size_t{16} << 20, 16)};
#else
  const std::vector<std::vector<std::byte>> payloads = {pattern(std::size_t{16} << 20, 16),
                                                        pattern(default_max_message_size, 64)};
#endif
  struct setup {
    const char* name;
    std::size_t pool;
    shared_receive mode;
  };
  for (const auto& s : {setup{"64 MiB pool, copy", std::size_t{64} << 20, shared_receive::copy},
                        setup{"64 MiB pool, view", std::size_t{64} << 20, shared_receive::view},
                        setup{"4 MiB pool: memfds", std::size_t{4} << 20, shared_receive::view}}) {
    SCOPED_TRACE(s.name);
    auto [a, b] = test::must(channel_pair(GetParam(), with_shm(s.pool, s.mode)));
    for (const auto& data : payloads) {
      ASSERT_THAT(a.send(data), Succeeded()) << data.size();
      auto m = b.receive(10s);
      ASSERT_THAT(m, Succeeded()) << data.size();
      EXPECT_EQ(m->size(), data.size());
      if (s.mode == shared_receive::view) {
        EXPECT_TRUE(m->is_view()) << data.size();
      }
      EXPECT_TRUE(same(std::as_const(*m).bytes(), data)) << data.size();
    }
    ASSERT_THAT(a.send(as_bytes("small")), Succeeded());
    EXPECT_EQ(b.receive(10s)->text(), "small");
  }
}

class shared_memory_seqpacket_test : public test::fd_checked {};

TEST_F(shared_memory_seqpacket_test, APacketTooLargeBelowTheThresholdStillGoesThroughSharedMemory) {
  // The default threshold (256 KiB) is above what one packet holds with a small send buffer:
  // a message in between must not be refused while the channel has shared memory.
  channel_options o;
  o.shared_memory.enabled = true;
  auto [a, b] = test::must(channel_pair(socket_kind::seqpacket, o));
  const int small = 32 * 1024;
  ASSERT_EQ(::setsockopt(a.native_handle(), SOL_SOCKET, SO_SNDBUF, &small, sizeof small), 0);
  for (const std::size_t size : {std::size_t{100} << 10, std::size_t{200} << 10}) {
    ASSERT_LT(size, o.shared_memory.threshold);
    const auto data = pattern(size, static_cast<unsigned>(size));
    ASSERT_THAT(a.send(data), Succeeded()) << size;
    auto m = b.receive(10s);
    ASSERT_THAT(m, Succeeded()) << size;
    EXPECT_TRUE(same(std::as_const(*m).bytes(), data)) << size;
  }
  // Without shared memory the same message is refused whole, and the channel goes on.
  auto [c, d] = test::must(channel_pair(socket_kind::seqpacket));
  ASSERT_EQ(::setsockopt(c.native_handle(), SOL_SOCKET, SO_SNDBUF, &small, sizeof small), 0);
  EXPECT_THAT(c.send(pattern(std::size_t{100} << 10, 1)), HasError(errc::message_too_large));
  ASSERT_THAT(c.send(as_bytes("after")), Succeeded());
  EXPECT_EQ(d.receive(10s)->text(), "after");
}

TEST_P(shared_memory_test, AFullPoolFallsBackToSealedMemfds) {
  // The receiver keeps every message (views hold their blocks): the 2 MiB pool fills up, and the
  // rest travel in memfds of their own. All arrive intact.
  auto [a, b] = test::must(channel_pair(GetParam(), with_shm(2U << 20, shared_receive::view)));
  std::vector<message> kept;
  for (unsigned i = 0; i < 8; ++i) {
    ASSERT_THAT(a.send(pattern(700000, i)), Succeeded());
    auto m = b.receive(10s);
    ASSERT_THAT(m, Succeeded());
    EXPECT_TRUE(m->is_view());
    kept.push_back(std::move(*m));
  }
  for (unsigned i = 0; i < kept.size(); ++i) {
    EXPECT_TRUE(same(std::as_const(kept[i]).bytes(), pattern(700000, i))) << i;
  }
  // A view made writable is copied out: the message is then the process's own.
  auto writable = kept[0].bytes();
  writable[0] = std::byte{42};
  EXPECT_FALSE(kept[0].is_view());
}

// A receiver that never reads cannot make the sender's shared memory grow without bound: once
// the pool is full and max_in_flight bytes of memfds are on their way, try_send takes nothing
// (queue_full) and send waits. When the receiver reads, the waiting send goes on, every message
// arrives byte-exact and in order, and sending goes on as before. close() ends a waiting send.
TEST_P(shared_memory_test, AReceiverThatNeverReadsHoldsBackSharedMemoryAtItsBound) {
  auto options = with_shm(1U << 20);
  options.shared_memory.max_in_flight = 4U << 20;
  auto [a, b] = test::must(channel_pair(GetParam(), options));
  constexpr std::size_t size = 1U << 20;  // the pool holds one; then a memfd each
  unsigned accepted = 0;
  result<void> r;
  for (; accepted < 64; ++accepted) {
    r = a.try_send(pattern(size, accepted));
    if (!r) break;
  }
  ASSERT_THAT(r, HasError(errc::queue_full));
  EXPECT_LE(accepted, 1U + 4U);  // the pool's one, and max_in_flight in memfds
  EXPECT_GE(accepted, 1U + 4U);
  std::atomic<bool> done{false};
  std::thread sender([&, n = accepted] {
    EXPECT_THAT(a.send(pattern(size, n)), Succeeded());
    done = true;
  });
  // Not a timing test: the send is held back as long as the receiver does not read, so it can
  // only still be waiting here (a slow machine makes that more likely, never less).
  std::this_thread::sleep_for(100ms);
  EXPECT_FALSE(done.load()) << "a send past the bound did not wait for the receiver";
  for (unsigned i = 0; i <= accepted; ++i) {
    auto m = b.receive(10s);
    ASSERT_THAT(m, Succeeded()) << i;
    ASSERT_TRUE(same(std::as_const(*m).bytes(), pattern(size, i))) << i;
  }
  sender.join();
  EXPECT_TRUE(done.load());
  for (unsigned i = 0; i < 8; ++i) {
    ASSERT_THAT(a.send(pattern(size, 100 + i)), Succeeded());
    auto m = b.receive(10s);
    ASSERT_THAT(m, Succeeded());
    ASSERT_TRUE(same(std::as_const(*m).bytes(), pattern(size, 100 + i))) << i;
  }
  // Held back again, and ended by close().
  for (unsigned i = 0; i < 64 && a.try_send(pattern(size, i)); ++i) {
  }
  std::thread waiting([&] { EXPECT_THAT(a.send(pattern(size, 0)), HasError(errc::closed)); });
  std::this_thread::sleep_for(50ms);
  a.close();
  waiting.join();
  EXPECT_FALSE(b.is_broken());
}

TEST_P(shared_memory_test, BlocksAreReusedAsTheReceiverReleasesThem) {
  auto [a, b] = test::must(channel_pair(GetParam(), with_shm(2U << 20)));
  // 100 MiB through a 2 MiB pool: only possible if blocks come back.
  for (unsigned i = 0; i < 100; ++i) {
    std::thread sender([&a, i] { EXPECT_THAT(a.send(pattern(1U << 20, i)), Succeeded()); });
    auto m = b.receive(10s);
    sender.join();
    ASSERT_THAT(m, Succeeded());
    ASSERT_TRUE(same(std::as_const(*m).bytes(), pattern(1U << 20, i))) << i;
  }
}

TEST_P(shared_memory_test, AllocateWritesInPlaceWithoutACopy) {
  auto [a, b] = test::must(channel_pair(GetParam(), with_shm(4U << 20, shared_receive::view)));
  auto buffer = a.allocate(3U << 20);
  ASSERT_THAT(buffer, Succeeded());
  EXPECT_TRUE(buffer->in_pool());
  EXPECT_EQ(buffer->size(), 3U << 20);
  const auto data = pattern(3U << 20, 7);
  std::memcpy(buffer->bytes().data(), data.data(), data.size());
  auto [read_end, write_end] = test::make_pipe();
  const std::array<int, 1> fds{read_end.get()};
  ASSERT_THAT(a.send(std::move(*buffer), fds), Succeeded());
  auto m = b.receive(10s);
  ASSERT_THAT(m, Succeeded());
  EXPECT_TRUE(m->is_view());
  EXPECT_TRUE(same(std::as_const(*m).bytes(), data));
  ASSERT_EQ(m->fds().size(), 1U);
  EXPECT_EQ(test::inode_of(m->fds()[0].get()), test::inode_of(read_end.get()));
  // Larger than the pool: a memfd of its own, the same way out.
  auto big = a.allocate(6U << 20);
  ASSERT_THAT(big, Succeeded());
  EXPECT_FALSE(big->in_pool());
  std::memset(big->bytes().data(), 0x5a, big->size());
  std::thread sender([&a, &big] { EXPECT_THAT(a.send(std::move(*big)), Succeeded()); });
  auto m2 = b.receive(10s);
  sender.join();
  ASSERT_THAT(m2, Succeeded());
  EXPECT_EQ(m2->size(), 6U << 20);
  EXPECT_EQ(std::as_const(*m2).bytes()[12345], std::byte{0x5a});
}

TEST_P(shared_memory_test, BuffersDroppedUnsentAreGivenBack) {
  auto [a, b] = test::must(channel_pair(GetParam(), with_shm(1U << 20)));
  for (int i = 0; i < 50; ++i) {
    auto buffer = a.allocate(700000);
    ASSERT_THAT(buffer, Succeeded());
    EXPECT_TRUE(buffer->in_pool()) << "allocation " << i << " found the pool full";
  }
  auto other = test::must(channel_pair(GetParam(), with_shm()));
  auto foreign = test::must(other.first.allocate(100));
  EXPECT_THAT(a.send(std::move(foreign)), HasError(test::sys(EINVAL)));
}

TEST_P(shared_memory_test, ReceiveIntoAndBatchesSeeSharedMessagesWhole) {
  auto [a, b] = test::must(channel_pair(GetParam(), with_shm()));
  ASSERT_THAT(a.send(pattern(300000, 1)), Succeeded());
  ASSERT_THAT(a.send(pattern(300000, 2)), Succeeded());
  std::vector<std::byte> small(1000);
  EXPECT_THAT(b.receive_into(small), HasError(errc::buffer_too_small));
  std::vector<std::byte> room(300000);
  auto info = b.receive_into(room);
  ASSERT_THAT(info, Succeeded());
  EXPECT_TRUE(same(room, pattern(300000, 1)));
  std::size_t seen = 0;
  ASSERT_THAT(b.receive_batch(
                  [&seen](message_view& m) {
                    EXPECT_TRUE(same(m.bytes, pattern(300000, 2)));
                    ++seen;
                  },
                  SIZE_MAX, 10s),
              Succeeded());
  EXPECT_EQ(seen, 1U);
}

TEST_P(shared_memory_test, TrySendUsesSharedMemoryToo) {
  auto [a, b] = test::must(channel_pair(GetParam(), with_shm()));
  ASSERT_THAT(a.try_send(pattern(2U << 20, 3)), Succeeded());
  auto m = b.receive(10s);
  ASSERT_THAT(m, Succeeded());
  EXPECT_TRUE(same(std::as_const(*m).bytes(), pattern(2U << 20, 3)));
}

// SIGPIPE at its default (class 2): every way a payload leaves through shared memory returns
// peer_closed when the peer is dead, and the process survives. The first large send (the pool's
// announce, with its memfd); after the pool was announced, a pool reference, a payload too large
// for the pool (a sealed memfd of its own), allocate()d buffers of both kinds, and try_send.
TEST_P(shared_memory_test, SendingThroughSharedMemoryToADeadPeerIsAnErrorNotSigpipe) {
  const test::default_sigpipe sigpipe;  // had a write raised it, this process would die
  const auto large = pattern(1U << 20, 3);
  {
    auto [a, b] = test::must(channel_pair(GetParam(), with_shm()));
    b = channel();
    EXPECT_THAT(a.send(large), HasError(errc::peer_closed));
    EXPECT_THAT(a.send(large), HasError(errc::peer_closed));
  }
  auto [a, b] = test::must(channel_pair(GetParam(), with_shm(2U << 20)));
  ASSERT_THAT(a.send(large), Succeeded());
  ASSERT_THAT(b.receive(10s), Succeeded());  // the pool is announced, its block given back
  b = channel();
  EXPECT_THAT(a.send(large), HasError(errc::peer_closed));
  EXPECT_THAT(a.send(pattern(3U << 20, 4)), HasError(errc::peer_closed));
  auto in_pool = test::must(a.allocate(1U << 20));
  EXPECT_TRUE(in_pool.in_pool());  // the failed sends gave their blocks back
  EXPECT_THAT(a.send(std::move(in_pool)), HasError(errc::peer_closed));
  auto own = test::must(a.allocate(3U << 20));
  EXPECT_FALSE(own.in_pool());
  EXPECT_THAT(a.send(std::move(own)), HasError(errc::peer_closed));
  EXPECT_THAT(a.try_send(large), HasError(errc::peer_closed));
}

// Class 12: close() while another thread allocates buffers (in the pool, or in memfds of their
// own once the reader lags and the pool is full), fills them and sends them. Each allocate and
// send returns a value or errc::closed, later ones say closed, and the peer gets messages 0, 1,
// 2... intact and in order, then the end. The close comes after a different number of sends in
// each round; fd accounting covers the pool's memfd and the fallback memfds.
TEST_P(shared_memory_test, CloseWhileAnotherThreadAllocatesAndSends) {
  const std::size_t size = 300 * 1024;  // three to a 1 MiB pool
  for (unsigned round = 0; round < 12; ++round) {
    SCOPED_TRACE("round " + std::to_string(round));
    auto [a, b] = test::must(channel_pair(GetParam(), with_shm(1U << 20)));
    std::atomic<unsigned> sent{0};
    std::thread sender([&] {
      for (unsigned i = 0;; ++i) {
        auto buffer = a.allocate(size + i);
        if (!buffer) {
          EXPECT_THAT(buffer, HasError(errc::closed));
          return;
        }
        const auto data = pattern(size + i, i);
        std::memcpy(buffer->bytes().data(), data.data(), data.size());
        auto r = a.send(std::move(*buffer));
        if (!r) {
          EXPECT_THAT(r, HasError(errc::closed));
          return;
        }
        sent = i + 1;
      }
    });
    unsigned received = 0;
    std::thread reader([&] {
      for (;; ++received) {
        if (received % 4 == 3) std::this_thread::sleep_for(1ms);  // lag now and then
        auto m = b.receive(30s);
        if (!m) {
          EXPECT_THAT(m, HasError(errc::peer_closed));
          return;
        }
        ASSERT_TRUE(same(std::as_const(*m).bytes(), pattern(size + received, received)))
            << "message " << received;
      }
    });
    EXPECT_TRUE(test::eventually([&] { return sent >= 1 + round * 3; }));
    a.close();
    sender.join();
    reader.join();
    EXPECT_GE(received, sent.load());      // every send that returned arrived
    EXPECT_LE(received, sent.load() + 1);  // and at most the one close() cut short
    EXPECT_THAT(a.allocate(size), HasError(errc::closed));
    EXPECT_THAT(a.send(pattern(size, 0)), HasError(errc::closed));
  }
}

// --- the trust model, and hostile senders ------------------------------------------------------

// A sender that builds its own pool by hand, to do what duplex never does.
struct rogue {
  socket raw;
  unique_fd memfd;
  std::byte* base = nullptr;
  detail::pool_layout layout;

  static rogue make(socket s, std::uint64_t data_size = 1U << 20, bool seal = true) {
    rogue r;
    r.raw = std::move(s);
    r.layout = detail::pool_layout::of(data_size, 4);
    r.memfd = unique_fd(::memfd_create("rogue", MFD_CLOEXEC | MFD_ALLOW_SEALING));
    if (::ftruncate(r.memfd.get(), static_cast<off_t>(r.layout.total)) != 0)
      throw std::runtime_error("ftruncate");
    if (seal) ::fcntl(r.memfd.get(), F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW);
    r.base = static_cast<std::byte*>(
        ::mmap(nullptr, r.layout.total, PROT_READ | PROT_WRITE, MAP_SHARED, r.memfd.get(), 0));
    return r;
  }
  ~rogue() {
    if (base != nullptr) ::munmap(base, layout.total);
  }
  rogue() = default;
  rogue(rogue&& o) noexcept
      : raw(std::move(o.raw)),
        memfd(std::move(o.memfd)),
        base(std::exchange(o.base, nullptr)),
        layout(o.layout) {}

  result<std::size_t> frame(std::uint8_t flags, const_buffer payload, std::span<const int> fds) {
    const auto h =
        wire::encode_native({payload.size(), static_cast<std::uint16_t>(fds.size()), flags});
    const std::array<const_buffer, 2> parts{const_buffer(h), payload};
    return raw.send_msg(parts, fds);
  }
  result<std::size_t> announce(std::uint64_t data_size = 1U << 20, int fd = -1) {
    const auto a = wire::encode(wire::pool_announce{data_size, 4});
    const std::array<int, 1> fds{fd >= 0 ? fd : memfd.get()};
    return frame(wire::flag_pool, a, fds);
  }
  result<std::size_t> refer(std::uint32_t slot, std::uint64_t offset, std::uint64_t length) {
    const auto r = wire::encode(wire::shared_ref{slot, offset, length});
    return frame(wire::flag_shared, r, {});
  }
  std::byte* data() { return base + layout.data_offset; }
};

TEST_P(shared_memory_test, CopyModeIsImmuneToASenderWritingAfterTheFact) {
  for (const auto mode : {shared_receive::copy, shared_receive::view}) {
    auto pair = test::must(socket_pair(GetParam()));
    auto ch = test::must(channel::create(std::move(pair.first), with_shm(1U << 20, mode)));
    auto r = rogue::make(std::move(pair.second));
    std::memset(r.data(), 'A', 4096);
    ASSERT_THAT(r.announce(), Succeeded());
    ASSERT_THAT(r.refer(0, 0, 4096), Succeeded());
    auto m = ch.receive(10s);
    ASSERT_THAT(m, Succeeded());
    std::memset(r.data(), 'B', 4096);  // the sender changes the block after sending it
    const auto first = std::as_const(*m).bytes()[0];
    if (mode == shared_receive::copy) {
      EXPECT_EQ(first, std::byte{'A'}) << "a copied message must never change";
    } else {
      EXPECT_EQ(first, std::byte{'B'}) << "a view shows the pool as it is: for trusted peers";
    }
  }
}

TEST_P(shared_memory_test, HostilePoolsAndReferencesBreakTheChannel) {
  struct scenario {
    const char* name;
    std::function<void(rogue&)> act;
    const char* detail;
  };
  auto [read_end, write_end] = test::make_pipe();
  const int pipe_fd = read_end.get();
  const std::vector<scenario> scenarios = {
      {"a pipe as the pool",
       [pipe_fd](rogue& r) { ASSERT_THAT(r.announce(1U << 20, pipe_fd), Succeeded()); },
       "the pool's fd is not a memfd"},
      {"a pool of the wrong size", [](rogue& r) { ASSERT_THAT(r.announce(2U << 20), Succeeded()); },
       "the pool's memfd is not the announced size"},
      {"a second pool",
       [](rogue& r) {
         ASSERT_THAT(r.announce(), Succeeded());
         ASSERT_THAT(r.announce(), Succeeded());
       },
       "a second pool was announced"},
      {"a reference before any pool", [](rogue& r) { ASSERT_THAT(r.refer(0, 0, 10), Succeeded()); },
       "a shared-memory message came before its pool"},
      {"an offset out of bounds",
       [](rogue& r) {
         ASSERT_THAT(r.announce(), Succeeded());
         ASSERT_THAT(r.refer(0, (1U << 20) - 10, 11), Succeeded());
       },
       "a shared-memory reference is out of the pool's bounds"},
      {"a slot out of bounds",
       [](rogue& r) {
         ASSERT_THAT(r.announce(), Succeeded());
         ASSERT_THAT(r.refer(4, 0, 10), Succeeded());
       },
       "a shared-memory reference is out of the pool's bounds"},
      {"a huge length",
       [](rogue& r) {
         ASSERT_THAT(r.announce(), Succeeded());
         ASSERT_THAT(r.refer(0, 1, ~0ULL), Succeeded());
       },
       "a shared-memory reference is out of the pool's bounds"},
  };
  for (const auto& sc : scenarios) {
    SCOPED_TRACE(sc.name);
    auto pair = test::must(socket_pair(GetParam()));
    auto ch = test::must(channel::create(std::move(pair.first), with_shm()));
    auto r = rogue::make(std::move(pair.second));
    sc.act(r);
    EXPECT_THAT(ch.receive(10s), HasError(errc::protocol_error));
    EXPECT_EQ(ch.error_detail(), sc.detail);
    EXPECT_THAT(ch.receive(10s), HasError(errc::broken));
  }
}

TEST_P(shared_memory_test, AnUnsealedPoolOrMemfdIsRefused) {
  {
    auto pair = test::must(socket_pair(GetParam()));
    auto ch = test::must(channel::create(std::move(pair.first), with_shm()));
    auto r = rogue::make(std::move(pair.second), 1U << 20, /*seal=*/false);
    ASSERT_THAT(r.announce(), Succeeded());
    EXPECT_THAT(ch.receive(10s), HasError(errc::protocol_error));
    EXPECT_EQ(ch.error_detail(), "the pool's memfd is not sealed against shrinking");
  }
  {
    auto pair = test::must(socket_pair(GetParam()));
    auto ch = test::must(channel::create(std::move(pair.first), with_shm()));
    auto r = rogue::make(std::move(pair.second), 1U << 20, /*seal=*/true);  // not write-sealed
    const auto ref = wire::encode(wire::memfd_ref{100});
    const std::array<int, 1> fds{r.memfd.get()};
    ASSERT_THAT(r.frame(wire::flag_memfd, ref, fds), Succeeded());
    EXPECT_THAT(ch.receive(10s), HasError(errc::protocol_error));
    EXPECT_EQ(ch.error_detail(),
              "a memfd frame's memfd is not sealed against writing and shrinking");
  }
}

TEST_P(shared_memory_test, AReceiverCanRefuseSharedMemoryAndLimitsStillHold) {
  auto o = with_shm();
  o.shared_memory.accept = false;
  auto pair = test::must(socket_pair(GetParam()));
  auto sender = test::must(channel::create(std::move(pair.first), with_shm()));
  auto refusing = test::must(channel::create(std::move(pair.second), o));
  ASSERT_THAT(sender.send(pattern(200000, 1)), Succeeded());
  EXPECT_THAT(refusing.receive(10s), HasError(errc::protocol_error));
  EXPECT_EQ(refusing.error_detail(), "shared memory is not accepted here");
  // A message over the receiver's maximum is refused, and its block given back.
  auto small_max = with_shm();
  small_max.max_message_size = 100000;
  auto p2 = test::must(socket_pair(GetParam()));
  auto big_sender = test::must(channel::create(std::move(p2.first), with_shm()));
  auto small_receiver = test::must(channel::create(std::move(p2.second), small_max));
  ASSERT_THAT(big_sender.send(pattern(200000, 2)), Succeeded());
  ASSERT_THAT(big_sender.send(as_bytes("next")), Succeeded());
  EXPECT_THAT(small_receiver.receive(10s), HasError(errc::message_too_large));
  EXPECT_EQ(small_receiver.receive(10s)->text(), "next");
}

}  // namespace
}  // namespace duplex
