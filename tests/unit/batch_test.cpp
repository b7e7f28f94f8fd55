// Batches: many messages per syscall out, many per read in, with no allocation for messages
// already buffered; under a signal storm, and with fds through short writes.
#include "duplex/batch.hpp"

#include <fcntl.h>
#include <poll.h>
#include <unistd.h>

#include <atomic>
#include <csignal>
#include <functional>
#include <stdexcept>

#include <array>
#include <chrono>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "duplex/channel.hpp"
#include "duplex/framing.hpp"
#include "duplex/socket_pair.hpp"
#include "support.hpp"

namespace duplex {
namespace {

using namespace std::chrono_literals;
using test::eventually;
using test::HasError;
using test::inode_of;
using test::pattern;
using test::same;
using test::Succeeded;
using test::sys;

class batch_test : public test::kind_test {};

INSTANTIATE_TEST_SUITE_P(kinds, batch_test,
                         ::testing::Values(socket_kind::stream, socket_kind::seqpacket),
                         test::kind_name);

TEST_P(batch_test, ABatchArrivesWholeAndInOrder) {
  auto [a, b] = test::must(channel_pair(GetParam()));
  batch out;
  constexpr int count = 1000;
  for (int i = 0; i < count; ++i) {
    ASSERT_THAT(out.add(pattern(static_cast<std::size_t>(i % 301), static_cast<unsigned>(i))),
                Succeeded());
  }
  EXPECT_EQ(out.size(), static_cast<std::size_t>(count));
  std::thread sender([&a, &out] { EXPECT_THAT(a.send(out), Succeeded()); });
  int seen = 0;
  while (seen < count) {
    auto n = b.receive_batch(
        [&seen](message_view& m) {
          EXPECT_TRUE(same(
              m.bytes, pattern(static_cast<std::size_t>(seen % 301), static_cast<unsigned>(seen))))
              << seen;
          ++seen;
        },
        SIZE_MAX, 30s);
    ASSERT_THAT(n, Succeeded());
    EXPECT_GT(*n, 0U);
  }
  sender.join();
  EXPECT_EQ(seen, count);
  EXPECT_THAT(b.try_receive_batch([](message_view&) {}), HasError(errc::would_block));
}

TEST_P(batch_test, FdsTravelWithTheirMessagesInsideABatch) {
  auto [a, b] = test::must(channel_pair(GetParam()));
  auto [read_end, write_end] = test::make_pipe();
  const ino_t inode = test::inode_of(read_end.get());
  batch out;
  const std::array<int, 2> two{read_end.get(), write_end.get()};
  const std::array<int, 1> one{read_end.get()};
  ASSERT_THAT(out.add(as_bytes("none")), Succeeded());
  ASSERT_THAT(out.add(as_bytes("two fds"), two), Succeeded());
  ASSERT_THAT(out.add(as_bytes("none again")), Succeeded());
  ASSERT_THAT(out.add(as_bytes("one fd"), one), Succeeded());
  ASSERT_THAT(out.add(as_bytes("last")), Succeeded());
  ASSERT_THAT(a.send(out), Succeeded());
  std::vector<std::pair<std::string, std::size_t>> got;
  std::vector<unique_fd> kept;
  while (got.size() < 5) {
    auto n = b.receive_batch(
        [&](message_view& m) {
          got.emplace_back(std::string(m.text()), m.fds.size());
          for (auto& fd : m.fds) {
            EXPECT_EQ(test::inode_of(fd.get()), inode);
            kept.push_back(std::move(fd));  // taken: stays open
          }
        },
        SIZE_MAX, 10s);
    ASSERT_THAT(n, Succeeded());
  }
  const std::vector<std::pair<std::string, std::size_t>> expected = {
      {"none", 0}, {"two fds", 2}, {"none again", 0}, {"one fd", 1}, {"last", 0}};
  EXPECT_EQ(got, expected);
  EXPECT_EQ(kept.size(), 3U);
  for (const auto& fd : kept)
    EXPECT_TRUE(test::fd_is_cloexec(fd.get()));
}

TEST_P(batch_test, FdsNotTakenInTheCallbackAreClosed) {
  auto [a, b] = test::must(channel_pair(GetParam()));
  auto [read_end, write_end] = test::make_pipe();
  const std::array<int, 2> two{read_end.get(), write_end.get()};
  ASSERT_THAT(a.send(as_bytes("with fds"), two), Succeeded());
  const std::size_t before = test::open_fd_count();
  auto n = b.receive_batch([](message_view& m) { EXPECT_EQ(m.fds.size(), 2U); }, SIZE_MAX, 10s);
  ASSERT_THAT(n, ::testing::Optional(1U));
  EXPECT_EQ(test::open_fd_count(), before);
}

TEST_P(batch_test, MaxLimitsHowManyAreDeliveredAndTheRestWait) {
  auto [a, b] = test::must(channel_pair(GetParam()));
  batch out;
  for (int i = 0; i < 10; ++i)
    ASSERT_THAT(out.add(as_bytes(std::to_string(i))), Succeeded());
  ASSERT_THAT(a.send(out), Succeeded());
  std::string seen;
  auto first = b.receive_batch([&seen](message_view& m) { seen += m.text(); }, 3, 10s);
  EXPECT_THAT(first, ::testing::Optional(3U));
  EXPECT_EQ(seen, "012");
  EXPECT_EQ(b.receive()->text(), "3");  // the ordinary calls see the same stream
  while (seen.size() < 9) {
    ASSERT_THAT(b.receive_batch([&seen](message_view& m) { seen += m.text(); }, SIZE_MAX, 10s),
                Succeeded());
  }
  EXPECT_EQ(seen, "012456789");
}

TEST_P(batch_test, LargeMessagesAmongSmallOnes) {
  auto [a, b] = test::must(channel_pair(GetParam()));
  const std::size_t big = GetParam() == socket_kind::stream ? (4U << 20) : 100000;
  batch out;
  ASSERT_THAT(out.add(as_bytes("small")), Succeeded());
  ASSERT_THAT(out.add(pattern(big, 9)), Succeeded());
  ASSERT_THAT(out.add(as_bytes("small again")), Succeeded());
  std::thread sender([&a, &out] { EXPECT_THAT(a.send(out), Succeeded()); });
  std::vector<std::size_t> sizes;
  while (sizes.size() < 3) {
    ASSERT_THAT(b.receive_batch(
                    [&](message_view& m) {
                      if (m.bytes.size() == big) {
                        EXPECT_TRUE(same(m.bytes, pattern(big, 9)));
                      }
                      sizes.push_back(m.bytes.size());
                    },
                    SIZE_MAX, 30s),
                Succeeded());
  }
  sender.join();
  EXPECT_EQ(sizes, (std::vector<std::size_t>{5, big, 11}));
}

TEST_F(batch_test, ABatchIsForOneFramingAndChecksLimits) {
  auto [a, b] = test::must(channel_pair(socket_kind::stream, {.max_message_size = 100}));
  batch python(framing::python);
  ASSERT_THAT(python.add(as_bytes("x")), Succeeded());
  EXPECT_THAT(a.send(python), HasError(sys(EINVAL)));
  auto [read_end, write_end] = test::make_pipe();
  const std::array<int, 1> fd{read_end.get()};
  EXPECT_THAT(python.add(as_bytes("x"), fd), HasError(errc::not_supported));
  std::vector<int> too_many(max_fds_per_message + 1, read_end.get());
  batch native;
  EXPECT_THAT(native.add(as_bytes("x"), too_many), HasError(errc::too_many_fds));
  ASSERT_THAT(native.add(pattern(101, 1)), Succeeded());
  EXPECT_THAT(a.send(native), HasError(errc::message_too_large));
  EXPECT_THAT(b.try_receive(), HasError(errc::would_block));  // nothing was sent
  native.clear();
  EXPECT_TRUE(native.empty());
  EXPECT_THAT(a.send(native), Succeeded());  // an empty batch sends nothing
}

// add() has an inline path (native framing, up to 64 bytes, room without growing) beside the
// general one (fds, larger messages, growth). Both must write the same frames: a header that
// says the size, then the bytes. Every size from 0 to 130 goes through each path, and the peer
// reads the stream byte by byte as it arrived.
TEST_F(batch_test, BothWaysOfAddingWriteTheSameFrames) {
  std::vector<std::byte> expected;
  batch inline_path;
  batch general_path;
  for (unsigned n = 0; n <= 130; ++n) {
    const auto body = pattern(n, n);
    const auto head = wire::encode_native({n, 0, 0});
    expected.insert(expected.end(), head.begin(), head.end());
    expected.insert(expected.end(), body.begin(), body.end());
    ASSERT_THAT(inline_path.add(body), Succeeded());
    ASSERT_THAT(general_path.add(body, {}), Succeeded());
  }
  for (const batch* b : {&inline_path, &general_path}) {
    ASSERT_EQ(b->size(), 131U);
    ASSERT_EQ(b->wire_size(), expected.size());
    auto pair = test::must(socket_pair(socket_kind::stream));
    auto ch = test::must(channel::create(std::move(pair.first)));
    std::thread sender([&ch, b] { EXPECT_THAT(ch.send(*b), Succeeded()); });
    std::vector<std::byte> got(expected.size());
    std::size_t have = 0;
    while (have < got.size()) {
      const ssize_t r = ::read(pair.second.native_handle(), got.data() + have, got.size() - have);
      ASSERT_GT(r, 0);
      have += static_cast<std::size_t>(r);
    }
    sender.join();
    EXPECT_TRUE(got == expected) << (b == &inline_path ? "inline" : "general");
  }
}

// receive_batch takes buffered frames without flags or fds by a short path. It must still refuse
// what the full checks refuse: a frame over max_message_size after good ones, and a header whose
// reserved bytes are not zero; the good ones come first, then the error, and the channel is
// broken.
TEST_F(batch_test, TheShortPathOfReceiveBatchRefusesWhatTheFullChecksRefuse) {
  for (const bool over_limit : {true, false}) {
    auto pair = test::must(socket_pair(socket_kind::stream));
    auto ch = test::must(channel::create(std::move(pair.first), {.max_message_size = 100}));
    std::vector<std::byte> stream;
    for (const std::size_t n : {10U, 100U, 0U}) {
      const auto head = wire::encode_native({n, 0, 0});
      const auto body = pattern(n, static_cast<unsigned>(n));
      stream.insert(stream.end(), head.begin(), head.end());
      stream.insert(stream.end(), body.begin(), body.end());
    }
    auto bad = wire::encode_native({over_limit ? 101U : 4U, 0, 0});
    if (!over_limit) bad[6] = std::byte{1};  // a reserved byte
    stream.insert(stream.end(), bad.begin(), bad.end());
    const auto tail = pattern(over_limit ? 101 : 4, 7);
    stream.insert(stream.end(), tail.begin(), tail.end());
    ASSERT_EQ(::write(pair.second.native_handle(), stream.data(), stream.size()),
              static_cast<ssize_t>(stream.size()));
    std::vector<std::size_t> sizes;
    result<std::size_t> n = std::size_t{0};
    while (n) {
      n = ch.receive_batch([&](message_view& m) { sizes.push_back(m.bytes.size()); }, SIZE_MAX,
                           10s);
    }
    EXPECT_EQ(sizes, (std::vector<std::size_t>{10, 100, 0}));
    EXPECT_THAT(n, HasError(over_limit ? errc::message_too_large : errc::protocol_error));
    EXPECT_THAT(ch.try_receive_batch([](message_view&) {}), HasError(errc::broken));
  }
}

TEST_F(batch_test, PythonFramedBatches) {
  auto [a, b] = test::must(channel_pair(socket_kind::stream, {.format = framing::python}));
  batch out(framing::python);
  for (const char* text : {"alpha", "", "gamma"})
    ASSERT_THAT(out.add(as_bytes(text)), Succeeded());
  ASSERT_THAT(a.send(out), Succeeded());
  std::vector<std::string> got;
  while (got.size() < 3) {
    ASSERT_THAT(
        b.receive_batch([&](message_view& m) { got.emplace_back(m.text()); }, SIZE_MAX, 10s),
        Succeeded());
  }
  EXPECT_EQ(got, (std::vector<std::string>{"alpha", "", "gamma"}));
}

TEST_F(batch_test, AProtocolErrorComesAfterTheMessagesBeforeIt) {
  auto pair = test::must(socket_pair(socket_kind::stream));
  auto ch = test::must(channel::create(std::move(pair.first)));
  batch good;
  ASSERT_THAT(good.add(as_bytes("one")), Succeeded());
  ASSERT_THAT(good.add(as_bytes("two")), Succeeded());
  auto raw = test::must(channel::create(std::move(pair.second)));
  ASSERT_THAT(raw.send(good), Succeeded());
  // Then garbage, written under the channel's feet.
  ASSERT_EQ(::write(raw.native_handle(), "garbage garbage!", 16), 16);
  std::vector<std::string> got;
  auto n = ch.receive_batch([&](message_view& m) { got.emplace_back(m.text()); }, SIZE_MAX, 10s);
  if (n) {  // the two good ones may come in a call of their own
    n = ch.receive_batch([&](message_view& m) { got.emplace_back(m.text()); }, SIZE_MAX, 10s);
  }
  EXPECT_THAT(n, HasError(errc::protocol_error));
  EXPECT_EQ(got, (std::vector<std::string>{"one", "two"}));
  EXPECT_THAT(ch.receive_batch([](message_view&) {}), HasError(errc::broken));
}

// Messages delivered before the peer's end are counted in the call that delivered them, and the
// end comes with the next call, on both kinds (a peer_closed at once would lose the count). The
// callback may be a const lvalue.
TEST_P(batch_test, TheCountComesBeforeThePeersEnd) {
  auto [a, b] = test::must(channel_pair(GetParam()));
  batch three;
  for (const char* text : {"one", "two", "three"})
    ASSERT_THAT(three.add(as_bytes(text)), Succeeded());
  ASSERT_THAT(b.send(three), Succeeded());
  b.close();
  std::vector<std::string> got;
  const auto keep = [&got](message_view& m) { got.emplace_back(m.text()); };
  std::size_t delivered = 0;
  while (delivered < 3) {
    auto n = a.receive_batch(keep, SIZE_MAX, 10s);
    ASSERT_THAT(n, Succeeded()) << "after " << delivered << " messages";
    delivered += *n;
  }
  EXPECT_EQ(got, (std::vector<std::string>{"one", "two", "three"}));
  EXPECT_THAT(a.receive_batch(keep, SIZE_MAX, 10s), HasError(errc::peer_closed));
}

// --- batches under a signal storm (class 4) and cut into short writes with fds (class 3) ----

// Rounds of batch out, batch back, with the thread that sends and receives them under a 10 kHz
// signal storm (no SA_RESTART) and tiny socket buffers, so that its sendmsg and recvmsg calls
// block again and again. The echoing peer reads each batch ten messages at a time, each time
// only after a signal more reached the storm's thread, and echoes only after one more (so that
// thread waits in receive_batch meanwhile). No EINTR, and no other error, reaches send(batch) or
// receive_batch; every message arrives byte-exact and in order, both ways.
TEST_P(batch_test, BatchesRideOutASignalStorm) {
  const socket_kind kind = GetParam();
  auto pair = test::must(socket_pair(kind));
  test::make_buffers_tiny(pair);
  auto a = test::must(channel::create(std::move(pair.first)));
  auto b = test::must(channel::create(std::move(pair.second)));
  constexpr unsigned rounds = 12;
  constexpr unsigned per_batch = 50;
  // The size of the message with a seed: on a stream up to about 3 tiny socket buffers, on
  // seqpacket what one packet of a tiny buffer holds.
  const auto size_of = [kind](unsigned seed) -> std::size_t {
    return (seed * 7919U) % (kind == socket_kind::stream ? 15000U : 2000U);
  };
  const auto seed_of = [](unsigned round, unsigned i) { return round * 1000 + i; };
  long delivered = 0;
  unsigned rounds_done = 0;
  bool peer_done = false;
  {
    const test::signal_storm storm;  // 10 kHz at this thread, no SA_RESTART
    std::thread peer([&] {
      [&] {
        long signals_seen = storm.delivered();
        const auto next_signal = [&] {  // false if none came in 10 s
          const bool came = eventually([&] { return storm.delivered() > signals_seen; });
          signals_seen = storm.delivered();
          return came;
        };
        for (unsigned round = 0; round < rounds; ++round) {
          batch echo;
          unsigned i = 0;
          auto check_and_echo = [&](message_view& m) {
            const unsigned seed = seed_of(round, i);
            EXPECT_TRUE(same(m.bytes, pattern(size_of(seed), seed)))
                << "round " << round << " message " << i;
            EXPECT_THAT(echo.add(m.bytes), Succeeded());
            ++i;
          };
          while (i < per_batch) {
            ASSERT_TRUE(next_signal());
            auto n = b.receive_batch(check_and_echo, 10, 30s);
            ASSERT_THAT(n, Succeeded()) << "round " << round << " message " << i;
          }
          ASSERT_TRUE(next_signal());
          ASSERT_THAT(b.send(echo), Succeeded()) << "round " << round;
        }
        peer_done = true;
      }();
      if (!peer_done) b.close();  // the peer gave up: end the other side's waits
    });
    [&] {
      for (unsigned round = 0; round < rounds; ++round) {
        batch out;
        for (unsigned i = 0; i < per_batch; ++i) {
          const unsigned seed = seed_of(round, i);
          ASSERT_THAT(out.add(pattern(size_of(seed), seed)), Succeeded());
        }
        ASSERT_THAT(a.send(out), Succeeded()) << "round " << round;  // EINTR would show here
        // Without a timeout: the wait is in recvmsg itself (with one, it would be in ppoll).
        // Should the peer give up, it closes its end, and this ends with an error.
        unsigned i = 0;
        while (i < per_batch) {
          auto n = a.receive_batch([&](message_view& m) {
            const unsigned seed = seed_of(round, i);
            EXPECT_TRUE(same(m.bytes, pattern(size_of(seed), seed)))
                << "round " << round << " echo " << i;
            ++i;
          });
          ASSERT_THAT(n, Succeeded()) << "round " << round << " echo " << i;  // or here
        }
        ASSERT_EQ(i, per_batch) << "round " << round;  // no message more than was sent
        ++rounds_done;
      }
    }();
    if (rounds_done < rounds) a.close();  // this side gave up: end the peer's waits
    peer.join();
    delivered = storm.delivered();
  }
  EXPECT_EQ(rounds_done, rounds);
  EXPECT_GT(delivered, 10) << "the storm did not reach the thread";
}

// One batch of 150 messages through non-blocking sockets with tiny buffers, so that sendmsg
// takes what room there is and the rest waits for more: on a stream every 7th message is 4 to 14
// times the send buffer (the kernel takes it in many pieces), and many messages carry fds, each
// from pipes of its own, among them large ones and runs of consecutive ones. The receiver takes
// at most three messages a call. Each message arrives byte-exact with exactly its own fds (by
// inode, in order): none lost, none moved to a neighbour, none sent again with a later piece.
TEST_P(batch_test, FdsKeepToTheirMessagesWhenABatchGoesOutInShortWrites) {
  const socket_kind kind = GetParam();
  auto pair = test::must(socket_pair(kind, {.non_blocking = true}));
  test::make_buffers_tiny(pair);
  const std::size_t sndbuf = test::must(pair.first.send_buffer_size());
  auto a = test::must(channel::create(std::move(pair.first)));
  auto b = test::must(channel::create(std::move(pair.second)));
  constexpr unsigned count = 150;
  const auto size_of = [kind, sndbuf](unsigned i) -> std::size_t {
    if (kind == socket_kind::stream && i % 7 == 3) return sndbuf * (4 + i % 11) + i;
    return (i * 7919U) % 2000U;
  };
  // Messages 3, 10, 17, ... are large (on a stream); fds go with every 5th message, with each
  // large one and the one after it, and with runs of four consecutive messages.
  const auto fd_count = [](unsigned i) -> std::size_t {
    if (i % 5 == 0) return 1 + i % 3;
    if (i % 7 == 3 || i % 7 == 4) return i % 2 + 1;
    if (i % 30 >= 20 && i % 30 < 24) return 1;
    return 0;
  };
  std::vector<std::pair<unique_fd, unique_fd>> pipes;  // open until the batch is sent
  std::vector<std::vector<ino_t>> inodes(count);
  std::size_t fds_sent = 0;
  batch out;
  for (unsigned i = 0; i < count; ++i) {
    std::vector<int> fds;
    for (std::size_t k = 0; k < fd_count(i); ++k) {
      pipes.push_back(test::make_pipe());
      fds.push_back(pipes.back().first.get());
      inodes[i].push_back(test::inode_of(fds.back()));
    }
    fds_sent += fds.size();
    ASSERT_THAT(out.add(pattern(size_of(i), i), fds), Succeeded());
  }
  ASSERT_GT(out.wire_size(), 20 * sndbuf);
  std::thread sender([&] {
    EXPECT_THAT(a.send(out), Succeeded());
    pipes.clear();  // sent: the receiver's copies are its own
  });
  unsigned received = 0;
  std::size_t fds_received = 0;
  [&] {
    while (received < count) {
      auto n = b.receive_batch(
          [&](message_view& m) {
            const unsigned i = received++;
            if (i >= count) return;
            EXPECT_TRUE(same(m.bytes, pattern(size_of(i), i))) << "message " << i;
            std::vector<ino_t> got;
            for (const auto& fd : m.fds)
              got.push_back(test::inode_of(fd.get()));
            EXPECT_EQ(got, inodes[i]) << "message " << i;
            fds_received += m.fds.size();
          },
          3, 30s);
      ASSERT_THAT(n, Succeeded()) << "after message " << received << ": " << b.error_detail();
      ASSERT_LE(*n, 3U);
    }
  }();
  if (received < count) b.close();  // the receiver gave up: end the sender's wait
  sender.join();
  EXPECT_EQ(received, count);
  EXPECT_EQ(fds_received, fds_sent);
  EXPECT_THAT(b.try_receive_batch([](message_view&) {}), HasError(errc::would_block));
}

// --- the callback's limits ---------------------------------------------------------------------

// The error of a result, or none.
template <typename T>
std::error_code error_of(const result<T>& r) {
  return r ? std::error_code{} : r.error();
}

// Every receive-side call made on a channel from inside its own receive_batch callback is refused
// at once with errc::reentrant_call (the callback holds the receive lock: a call that waited for it
// would wait for ever). Nothing is consumed by the refused call: the batch goes on and every
// message arrives once, in order, and the channel works afterwards. Each case runs in a child with
// an alarm, so a call that hangs fails the test instead of hanging the suite.
TEST_P(batch_test, AReceiveFromInsideTheCallbackIsRefusedAtOnce) {
  using inner_call = std::function<std::error_code(channel&)>;
  const std::vector<std::pair<std::string, inner_call>> calls{
      {"receive()", [](channel& c) { return error_of(c.receive()); }},
      {"receive(timeout)", [](channel& c) { return error_of(c.receive(10s)); }},
      {"try_receive", [](channel& c) { return error_of(c.try_receive()); }},
      {"receive_into",
       [](channel& c) {
         std::array<std::byte, 64> buf{};
         return error_of(c.receive_into(buf));
       }},
      {"receive_into(timeout)",
       [](channel& c) {
         std::array<std::byte, 64> buf{};
         std::array<unique_fd, 4> fds;
         return error_of(c.receive_into(buf, fds, 10s));
       }},
      {"receive_batch",
       [](channel& c) { return error_of(c.receive_batch([](message_view&) {}, SIZE_MAX, 10s)); }},
      {"try_receive_batch",
       [](channel& c) { return error_of(c.try_receive_batch([](message_view&) {})); }},
      {"receive_value", [](channel& c) { return error_of(c.receive_value<std::uint16_t>(10s)); }},
      {"wait_readable", [](channel& c) { return error_of(c.wait_readable(10s)); }},
  };
  const std::vector<std::string> sent{"m0", "m1", "m2", "m3", "m4"};
  for (const auto& [name, call] : calls) {
    const int status = test::run_in_child([&, &call = call] {
      ::alarm(20);  // a call that hangs ends the child with SIGALRM
      auto [a, b] = test::must(channel_pair(GetParam()));
      for (const auto& text : sent) {
        if (!a.send(as_bytes(text))) return 10;
      }
      std::vector<std::string> got;
      std::error_code inner;
      auto n = b.receive_batch(
          [&](message_view& m) {
            got.emplace_back(m.text());
            if (got.size() == 1) inner = call(b);
          },
          SIZE_MAX, 10s);
      if (inner != errc::reentrant_call) return 1;
      if (!n) return 2;
      while (got.size() < sent.size()) {
        auto more =
            b.receive_batch([&](message_view& m) { got.emplace_back(m.text()); }, SIZE_MAX, 10s);
        if (!more) return 3;
      }
      if (got != sent) return 4;
      if (error_of(b.try_receive()) != errc::would_block) return 5;
      if (!a.send(as_bytes("after"))) return 10;
      auto after = b.receive(10s);
      if (!after || after->text() != "after") return 6;
      return 0;
    });
    EXPECT_EQ(status, 0) << name << " (1: not refused with reentrant_call, 2-3: the batch failed, "
                         << "4: messages lost or repeated, 5-6: the channel stopped working, "
                         << 128 + SIGALRM << ": hung)";
  }
}

// Another thread's receive during a callback waits for the batch, as any concurrent receive does:
// only the callback's own thread is refused.
TEST_P(batch_test, AnotherThreadsReceiveDuringTheCallbackWaits) {
  auto [a, b] = test::must(channel_pair(GetParam()));
  ASSERT_THAT(a.send(as_bytes("first")), Succeeded());
  ASSERT_THAT(a.send(as_bytes("second")), Succeeded());
  std::error_code other;
  std::atomic<bool> done{false};
  auto n = b.receive_batch(
      [&](message_view&) {
        std::thread t([&] {
          other = error_of(b.receive(50ms));  // the callback holds the lock all along
          done = true;
        });
        t.join();
      },
      1, 10s);
  EXPECT_THAT(n, ::testing::Optional(1U));
  EXPECT_TRUE(done);
  EXPECT_EQ(other, make_error_code(errc::timed_out));
  auto second = b.receive(10s);
  ASSERT_THAT(second, Succeeded());
  EXPECT_EQ(second->text(), "second");
}

// A callback that throws: the message it threw on counts as delivered (the fds it did not take
// are closed), the exception reaches the caller, the receive lock is released, and every later
// message arrives once, in order, with its own fds. Covered for each way a stream batch shows a
// message (small and plain, with fds in place, large through a message of its own) and on
// seqpacket.
TEST_P(batch_test, ACallbackThatThrowsConsumesOnlyTheMessageItThrewOn) {
  struct thrown : std::runtime_error {
    thrown() : std::runtime_error("from the callback") {}
  };
  enum class shape { plain, with_fds, large };
  for (const shape kind : {shape::plain, shape::with_fds, shape::large}) {
    SCOPED_TRACE(static_cast<int>(kind));
    auto [a, b] = test::must(channel_pair(GetParam()));
    constexpr std::size_t count = 5;
    constexpr std::size_t throw_on = 1;
    // Message i is "m<i>" (or, for large, a pattern made from i, larger than half the receive
    // buffer, so that a stream receives it into a message of its own), with, for with_fds, the
    // read end of pipe i. A thread sends them: large ones do not all fit the socket at once.
    const std::size_t large = GetParam() == socket_kind::stream ? 200000 : 100000;
    std::vector<std::pair<unique_fd, unique_fd>> pipes;
    std::vector<ino_t> inodes;
    std::vector<std::vector<std::byte>> bodies;
    for (std::size_t i = 0; i < count; ++i) {
      bodies.push_back(kind == shape::large
                           ? pattern(large, static_cast<unsigned>(i + 1))
                           : std::vector<std::byte>{std::byte{'m'}, std::byte('0' + i)});
      if (kind == shape::with_fds) {
        pipes.push_back(test::make_pipe());
        inodes.push_back(inode_of(pipes.back().first.get()));
      }
    }
    std::thread sender([&] {
      for (std::size_t i = 0; i < count; ++i) {
        if (kind == shape::with_fds) {
          const std::array<int, 1> fd{pipes[i].first.get()};
          EXPECT_THAT(a.send(bodies[i], fd), Succeeded());
          pipes[i].first.reset();  // the message holds the only read end now
        } else {
          EXPECT_THAT(a.send(bodies[i]), Succeeded());
        }
      }
    });
    std::vector<std::vector<std::byte>> got;
    std::vector<ino_t> got_inodes;
    std::vector<unique_fd> kept;
    const auto take = [&](message_view& m) {
      got.emplace_back(m.bytes.begin(), m.bytes.end());
      for (auto& fd : m.fds) {
        got_inodes.push_back(inode_of(fd.get()));
        kept.push_back(std::move(fd));
      }
    };
    bool threw = false;
    while (!threw && got.size() < count) {
      try {
        auto n = b.receive_batch(
            [&](message_view& m) {
              if (got.size() == throw_on) {
                got.emplace_back(m.bytes.begin(), m.bytes.end());
                throw thrown();
              }
              take(m);
            },
            SIZE_MAX, 10s);
        ASSERT_THAT(n, Succeeded());
      } catch (const thrown&) {
        threw = true;
      }
    }
    EXPECT_TRUE(threw);
    while (got.size() < count) {
      auto n = b.receive_batch(take, SIZE_MAX, 10s);
      ASSERT_THAT(n, Succeeded()) << "after " << got.size() << " messages";
    }
    sender.join();
    EXPECT_EQ(got, bodies) << "each message exactly once, in order";
    EXPECT_THAT(b.try_receive(), HasError(errc::would_block));
    if (kind == shape::with_fds) {
      std::vector<ino_t> expected = inodes;
      expected.erase(expected.begin() + throw_on);
      EXPECT_EQ(got_inodes, expected);
      // The thrown-on message's fd was closed: its pipe has no reader left.
      ASSERT_TRUE(test::fd_is_open(pipes[throw_on].second.get()));
      pollfd p{pipes[throw_on].second.get(), 0, 0};
      ASSERT_EQ(::poll(&p, 1, 0), 1);
      EXPECT_NE(p.revents & POLLERR, 0) << "a reader of the thrown-on message's pipe is still open";
    }
    ASSERT_THAT(a.send(as_bytes("after")), Succeeded());
    auto after = b.receive(10s);
    ASSERT_THAT(after, Succeeded());
    EXPECT_EQ(after->text(), "after");
  }
}

}  // namespace
}  // namespace duplex
