// duplex::asio: whole messages with fds as Asio operations, with completion handlers and
// coroutines, on stream and seqpacket channels: fds, errors, cancellation (object-wide,
// per operation, timeouts), two coroutines pushing 64 MiB at each other on one thread, and
// round trips on a strand of an io_context run by two threads. Built twice (see asio_build).
#include "duplex/asio.hpp"

// Asio's use_future, inlined with sanitizers, trips GCC's -Wmaybe-uninitialized (a false positive
// inside asio/impl/use_future.hpp): silenced for that header alone.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <asio/use_future.hpp>
#pragma GCC diagnostic pop

#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <asio/bind_cancellation_slot.hpp>
#include <asio/bind_executor.hpp>
#include <asio/cancellation_signal.hpp>
#include <asio/co_spawn.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/experimental/awaitable_operators.hpp>
#include <asio/io_context.hpp>
#include <asio/post.hpp>
#include <asio/steady_timer.hpp>
#include <asio/strand.hpp>
#include <asio/use_awaitable.hpp>
#include <atomic>
#include <cctype>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <filesystem>
#include <functional>
#include <future>
#include <memory>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <variant>
#include <vector>

#include "duplex/duplex.hpp"
#include "support.hpp"

namespace duplex {
namespace {

using namespace std::chrono_literals;
using namespace ::asio::experimental::awaitable_operators;
using ::asio::use_awaitable;
using test::HasError;
using test::pattern;
using test::same;
using test::Succeeded;

// Messages of this size fit a seqpacket packet with default buffers.
constexpr std::size_t packet_chunk = 60000;

// Runs io until it has no work left, at most `limit`; a test fails if work was left (a
// deadlock or a lost wake-up).
void run(::asio::io_context& io, std::chrono::seconds limit = 60s) {
  io.run_for(limit);
  EXPECT_TRUE(io.stopped()) << "the io_context still had work after " << limit.count() << " s";
}

// Starts a coroutine; an exception that escapes it fails the test.
template <typename ExecutorOrContext, typename Awaitable>
void spawn(ExecutorOrContext&& ex, Awaitable&& a) {
  ::asio::co_spawn(std::forward<ExecutorOrContext>(ex), std::forward<Awaitable>(a),
                   [](const std::exception_ptr& e) {
                     if (!e) return;
                     try {
                       std::rethrow_exception(e);
                     } catch (const std::exception& x) {
                       ADD_FAILURE() << "a coroutine threw: " << x.what();
                     }
                   });
}

// Both ends of a new pair, each an Asio channel on io.
struct asio_pair {
  duplex::asio::channel a;
  duplex::asio::channel b;
};

asio_pair make_pair(::asio::io_context& io, socket_kind kind, channel_options options = {}) {
  auto ends = test::must(channel_pair(kind, options));
  return {duplex::asio::channel(io, std::move(ends.first)),
          duplex::asio::channel(io, std::move(ends.second))};
}

// The outcome of one async_receive, as a handler saw it.
struct received {
  bool done = false;
  std::error_code ec;
  message m;
};

auto record(received& r) {
  return [&r](std::error_code ec, message m) {
    r.done = true;
    r.ec = ec;
    r.m = std::move(m);
  };
}

// The outcome of one async_send (or async_flush).
struct sent {
  bool done = false;
  std::error_code ec;
};

auto record(sent& s) {
  return [&s](std::error_code ec) {
    s.done = true;
    s.ec = ec;
  };
}

// A channel's socket filled until try_send had to queue: the next messages wait in the queue.
void fill(duplex::channel& ch, std::size_t size) {
  while (!ch.wants_write()) {
    if (!ch.try_send(pattern(size, 99))) break;
  }
  ASSERT_TRUE(ch.wants_write());
}

// Each test runs on both kinds, with fd accounting, and fails if it leaves a child process,
// running or zombie (some fork a peer).
class asio_test : public test::process_checked, public ::testing::WithParamInterface<socket_kind> {
 protected:
  // A large message: 1 MiB on a stream, what one packet holds on seqpacket.
  [[nodiscard]] std::size_t big() const {
    return GetParam() == socket_kind::stream ? std::size_t{1} << 20 : packet_chunk;
  }
};

INSTANTIATE_TEST_SUITE_P(kinds, asio_test,
                         ::testing::Values(socket_kind::stream, socket_kind::seqpacket),
                         test::kind_name);

class asio_stream_test : public test::fd_checked {};

// The suite is built twice: as is, where Asio 1.22-1.27 on epoll (Debian 12's Asio) gives
// reactor operations, and with DUPLEX_ASIO_PORTABLE, which forces the composed operations.
TEST(asio_build, OperationsRunTheWayTheBuildAsksFor) {
#if defined(DUPLEX_ASIO_PORTABLE)
  EXPECT_EQ(DUPLEX_ASIO_REACTOR, 0);
#elif defined(ASIO_HAS_EPOLL) && !defined(ASIO_HAS_IO_URING_AS_DEFAULT) && \
    ASIO_VERSION >= 102200 && ASIO_VERSION < 102800
  EXPECT_EQ(DUPLEX_ASIO_REACTOR, 1);
#else
  EXPECT_EQ(DUPLEX_ASIO_REACTOR, 0);
#endif
}

TEST_P(asio_test, HandlersRoundTrip) {
  ::asio::io_context io;
  auto [a, b] = make_pair(io, GetParam());
  std::vector<std::string> got;
  // b echoes three messages with "re: " in front, a sends them one by one and collects replies.
  std::function<void(int)> echo = [&](int left) {
    if (left == 0) return;
    b.async_receive([&, left](std::error_code ec, message m) {
      ASSERT_FALSE(ec) << ec.message();
      auto reply = std::make_shared<std::string>("re: " + std::string(m.text()));
      b.async_send(as_bytes(*reply), [&, left, reply](std::error_code ec2) {
        ASSERT_FALSE(ec2) << ec2.message();
        echo(left - 1);
      });
    });
  };
  echo(3);
  const std::array<std::string, 3> texts{"one", "two", "three"};
  std::function<void(std::size_t)> ask = [&](std::size_t i) {
    if (i == texts.size()) return;
    a.async_send(as_bytes(texts[i]), [&, i](std::error_code ec) {
      ASSERT_FALSE(ec) << ec.message();
      a.async_receive([&, i](std::error_code ec2, message m) {
        ASSERT_FALSE(ec2) << ec2.message();
        got.emplace_back(m.text());
        ask(i + 1);
      });
    });
  };
  ask(0);
  run(io);
  EXPECT_THAT(got, ::testing::ElementsAre("re: one", "re: two", "re: three"));
}

// A peer thread sends bursts of messages of random sizes, some with fds, and waits for the
// acknowledgement of each burst's last message before the next, so every read meets the stream
// at a different point. A receive left waiting for an edge that never comes (one whose data an
// earlier read already took, or whose edge the loop already spent) would stop the exchange.
TEST_P(asio_test, BurstsThatWaitForAnAcknowledgementArriveWhateverTheReadsMet) {
  const bool stream = GetParam() == socket_kind::stream;
  ::asio::io_context io;
  auto ends = test::must(channel_pair(GetParam()));
  duplex::asio::channel a(io, std::move(ends.first));
  duplex::channel peer = std::move(ends.second);
  auto [read_end, write_end] = test::make_pipe();
  constexpr int bursts = 300;
  std::atomic<int> sent{0};
  std::atomic<int> planned{0};
  std::thread sender([&] {
    std::mt19937 random(777);
    const std::size_t limit = stream ? 300000 : packet_chunk;
    int n = 0;
    for (int burst = 0; burst < bursts; ++burst) {
      const int count = 1 + static_cast<int>(random() % 8);
      planned += count;
      for (int i = 0; i < count; ++i, ++n) {
        const std::size_t size = random() % 4 == 0 ? random() % limit : random() % 200;
        const std::array<int, 1> fd{read_end.get()};
        if (!peer.send(pattern(size, static_cast<unsigned>(n)),
                       n % 5 == 0 ? std::span<const int>(fd) : std::span<const int>())) {
          return;
        }
        ++sent;
      }
      for (;;) {  // an acknowledgement of every message; this burst's last ends the wait
        auto ack = peer.receive(30s);
        if (!ack) return;
        if (ack->text() == std::to_string(n)) break;
      }
    }
    static_cast<void>(peer.shutdown_send());
  });
  int received = 0;
  spawn(io, [&]() -> ::asio::awaitable<void> {
    for (;;) {
      auto [ec, m] = co_await a.async_receive(::asio::experimental::as_tuple(use_awaitable));
      if (ec) {
        EXPECT_THAT(ec, HasError(errc::peer_closed));
        co_return;
      }
      EXPECT_EQ(m.fds().size(), received % 5 == 0 ? 1U : 0U) << received;
      ++received;
      const std::string ack = std::to_string(received);
      co_await a.async_send(as_bytes(ack), use_awaitable);
    }
  });
  run(io, 60s);
  if (!io.stopped()) a.close();  // the sender's wait then ends
  sender.join();
  EXPECT_EQ(received, sent.load());
  EXPECT_EQ(sent.load(), planned.load());
}

// A peer that sends and then closes, both before the loop's reactor looks: epoll reports the
// two as one edge, which the loop takes (and spends) before any receive is started. The first
// receive gets the message, the next must still hear peer_closed: a receive that read the
// message and then waited for another edge would wait forever.
TEST_P(asio_test, MessageThenCloseInOneEdgeAlreadyTakenStillEndsInPeerClosed) {
  ::asio::io_context io;
  auto ends = test::must(channel_pair(GetParam()));
  duplex::asio::channel a(io, std::move(ends.first));
  ASSERT_THAT(ends.second.send(as_bytes("last words")), Succeeded());
  ends.second.close();
  // Some work, so that poll() runs the reactor: it takes the edge while no receive waits.
  ::asio::steady_timer keep(io, 1h);
  keep.async_wait([](std::error_code) {});
  io.poll();
  std::vector<std::error_code> errors;
  std::string text;
  spawn(io, [&]() -> ::asio::awaitable<void> {
    text = (co_await a.async_receive(use_awaitable)).text();
    auto [ec, m] = co_await a.async_receive(::asio::experimental::as_tuple(use_awaitable));
    errors.push_back(ec);
    keep.cancel();
  });
  run(io, 10s);
  EXPECT_EQ(text, "last words");
  EXPECT_THAT(errors, ::testing::ElementsAre(HasError(errc::peer_closed)));
}

// Between two async_receives the channel's own receive calls may be used: one that leaves a
// message buffered, its edge spent or still pending, must not leave the next async_receive
// waiting for an edge.
TEST_P(asio_test, AnAsyncReceiveAfterTheChannelsOwnReceiveGetsWhatThatLeft) {
  ::asio::io_context io;
  auto ends = test::must(channel_pair(GetParam()));
  duplex::asio::channel a(io, std::move(ends.first));
  duplex::channel peer = std::move(ends.second);
  const auto next = [&](std::string_view want) {
    received r;
    a.async_receive(record(r));
    io.restart();
    run(io, 10s);
    EXPECT_TRUE(r.done);
    EXPECT_FALSE(r.ec) << r.ec.message();
    EXPECT_EQ(r.m.text(), want);
  };
  ASSERT_THAT(peer.send(as_bytes("1")), Succeeded());
  next("1");
  ASSERT_THAT(peer.send(as_bytes("2")), Succeeded());
  ASSERT_THAT(peer.send(as_bytes("3")), Succeeded());
  ASSERT_THAT(a.channel().wait_readable(10s), Succeeded());
  auto two = a.channel().try_receive();
  ASSERT_THAT(two, Succeeded());
  EXPECT_EQ(two->text(), "2");
  next("3");
  ASSERT_THAT(peer.send(as_bytes("4")), Succeeded());
  next("4");
  // And with the edge of what the channel's own receive read already taken by the loop.
  ASSERT_THAT(peer.send(as_bytes("5")), Succeeded());
  ASSERT_THAT(peer.send(as_bytes("6")), Succeeded());
  ASSERT_THAT(a.channel().wait_readable(10s), Succeeded());
  io.restart();
  io.poll();
  auto five = a.channel().try_receive();
  ASSERT_THAT(five, Succeeded());
  EXPECT_EQ(five->text(), "5");
  next("6");
}

// A receive that reads a stream socket empty tells the reactor so, which then waits for the next
// edge before trying the next receive. The peer's end is no byte: when it came before that read,
// with its edge already spent, the end watch must still make the next receive hear it. Both
// ways the peer can end (a half-close and the close of its last fd), the end's edge taken by the
// loop before the read, or arriving in one batch with the last message.
TEST_P(asio_test, ThePeersEndIsHeardAfterAReceiveThatReadTheSocketEmpty) {
  for (const bool half_close : {true, false}) {
    for (const bool edge_taken_first : {true, false}) {
      SCOPED_TRACE(::testing::Message()
                   << "half_close " << half_close << ", edge taken first " << edge_taken_first);
      ::asio::io_context io;
      auto ends = test::must(channel_pair(GetParam()));
      duplex::asio::channel a(io, std::move(ends.first));
      duplex::channel peer = std::move(ends.second);
      const auto end = [&] {
        ASSERT_THAT(peer.send(as_bytes("last")), Succeeded());
        if (half_close) {
          ASSERT_THAT(peer.shutdown_send(), Succeeded());
        } else {
          peer.close();
        }
      };
      std::vector<std::string> texts;
      std::vector<std::error_code> errors;
      ::asio::steady_timer keep(io, 1h);
      keep.async_wait([](std::error_code) {});
      // The first message is read whole by a receive: the socket is then empty.
      ASSERT_THAT(peer.send(as_bytes("first")), Succeeded());
      spawn(io, [&]() -> ::asio::awaitable<void> {
        texts.emplace_back((co_await a.async_receive(use_awaitable)).text());
        if (edge_taken_first) {
          end();
          // The loop takes the end's edge while no receive waits.
          co_await ::asio::post(io, use_awaitable);
          co_await ::asio::post(io, use_awaitable);
        } else {
          // The end comes while the next receive waits in the reactor.
          ::asio::post(io, end);
        }
        texts.emplace_back((co_await a.async_receive(use_awaitable)).text());
        for (int i = 0; i < 2; ++i) {
          auto [ec, m] = co_await a.async_receive(::asio::experimental::as_tuple(use_awaitable));
          errors.push_back(ec);
        }
        keep.cancel();
      });
      run(io, 10s);
      EXPECT_THAT(texts, ::testing::ElementsAre("first", "last"));
      EXPECT_THAT(errors,
                  ::testing::ElementsAre(HasError(errc::peer_closed), HasError(errc::peer_closed)));
    }
  }
}

// What wrapping a channel opens: the reactor's duplicate of its fd, and on a stream with reactor
// operations the end watch's epoll fd. Each is close-on-exec, and close() (as the destructor)
// closes them all.
TEST_P(asio_test, TheAdaptersOwnFdsAreCloseOnExecAndGoWithTheChannel) {
  ::asio::io_context io;
  auto ends = test::must(channel_pair(GetParam()));
  // The peer's end first: the reactor opens its own fds (epoll, eventfd, timerfd) on first use.
  duplex::asio::channel b(io, std::move(ends.second));
  const std::vector<int> before = test::open_fds();
  std::optional<duplex::asio::channel> a;
  a.emplace(io, std::move(ends.first));
  std::vector<int> opened;
  for (const int fd : test::open_fds()) {
    if (std::find(before.begin(), before.end(), fd) == before.end()) opened.push_back(fd);
  }
  // The end watch is the reactor operations' (DUPLEX_ASIO_REACTOR).
  const bool end_watch = DUPLEX_ASIO_REACTOR == 1 && GetParam() == socket_kind::stream;
  EXPECT_EQ(opened.size(), end_watch ? 2U : 1U);
  for (const int fd : opened)
    EXPECT_TRUE(test::fd_is_cloexec(fd)) << fd;
  a->close();
  for (const int fd : opened)
    EXPECT_FALSE(test::fd_is_open(fd)) << fd;
  EXPECT_EQ(test::open_fds().size(), before.size() - 1);  // the channel's own fd went too
  a.reset();
  EXPECT_EQ(test::open_fds().size(), before.size() - 1);
}

// A peer that sends an urgent byte (MSG_OOB, which duplex never sends) stops the kernel's read
// at it: nothing of the stream is lost, and the peer's end is still heard.
TEST(asio_stream, AnUrgentByteFromThePeerLosesNothing) {
  ::asio::io_context io;
  auto ends = test::must(channel_pair(socket_kind::stream));
  duplex::asio::channel a(io, std::move(ends.first));
  duplex::channel peer = std::move(ends.second);
  ASSERT_THAT(peer.send(as_bytes("before")), Succeeded());
  const char urgent = '!';
  if (::send(peer.native_handle(), &urgent, 1, MSG_OOB) != 1) {
    GTEST_SKIP() << "this kernel has no MSG_OOB for AF_UNIX";
  }
  ASSERT_THAT(peer.send(as_bytes("after")), Succeeded());
  peer.close();
  std::vector<std::string> texts;
  std::error_code last;
  spawn(io, [&]() -> ::asio::awaitable<void> {
    for (;;) {
      auto [ec, m] = co_await a.async_receive(::asio::experimental::as_tuple(use_awaitable));
      if (ec) {
        last = ec;
        co_return;
      }
      texts.emplace_back(m.text());
    }
  });
  run(io, 10s);
  EXPECT_THAT(texts, ::testing::ElementsAre("before", "after"));
  EXPECT_THAT(last, HasError(errc::peer_closed));
}

// drained(), which the adapter trusts: a read that stopped at the urgent byte did not empty the
// socket; the one after it did.
TEST(asio_stream, DrainedIsFalseAtAnUrgentMark) {
  auto ends = test::must(channel_pair(socket_kind::stream));
  ASSERT_THAT(ends.second.send(as_bytes("before")), Succeeded());
  const char urgent = '!';
  if (::send(ends.second.native_handle(), &urgent, 1, MSG_OOB) != 1) {
    GTEST_SKIP() << "this kernel has no MSG_OOB for AF_UNIX";
  }
  ASSERT_THAT(ends.second.send(as_bytes("after")), Succeeded());
  EXPECT_EQ(test::must(ends.first.try_receive()).text(), "before");
  EXPECT_FALSE(ends.first.drained());
  EXPECT_EQ(test::must(ends.first.try_receive()).text(), "after");
  EXPECT_TRUE(ends.first.drained());
}

// The same urgent byte from a peer that stays open and waits for a reply: the read that stops at
// the urgent byte did not empty the socket, so the receive after it must not wait for an edge
// (none comes: the peer sends nothing more until it has its reply).
TEST(asio_stream, AnUrgentByteFromAPeerThatStaysOpenDoesNotStallTheReply) {
  ::asio::io_context io;
  auto ends = test::must(channel_pair(socket_kind::stream));
  duplex::asio::channel a(io, std::move(ends.first));
  duplex::channel peer = std::move(ends.second);
  std::vector<std::string> texts;
  spawn(io, [&]() -> ::asio::awaitable<void> {
    for (int i = 0; i < 2; ++i) {
      auto [ec, m] = co_await a.async_receive(::asio::experimental::as_tuple(use_awaitable));
      EXPECT_FALSE(ec) << ec.message();
      if (ec) co_return;
      texts.emplace_back(m.text());
    }
    co_await a.async_send(as_bytes("reply"), use_awaitable);
  });
  // The first receive waits in the reactor; then everything arrives at once, in one edge.
  io.poll();
  ASSERT_TRUE(texts.empty());
  ASSERT_THAT(peer.send(as_bytes("before")), Succeeded());
  const char urgent = '!';
  if (::send(peer.native_handle(), &urgent, 1, MSG_OOB) != 1) {
    GTEST_SKIP() << "this kernel has no MSG_OOB for AF_UNIX";
  }
  ASSERT_THAT(peer.send(as_bytes("request")), Succeeded());
  run(io, 10s);
  EXPECT_THAT(texts, ::testing::ElementsAre("before", "request"));
  auto reply = peer.receive(10s);
  ASSERT_THAT(reply, Succeeded());
  EXPECT_EQ(reply->text(), "reply");
}

TEST_P(asio_test, CoroutinesRoundTripEveryOverload) {
  ::asio::io_context io;
  auto [a, b] = make_pair(io, GetParam());
  constexpr int rounds = 50;
  const std::size_t size = big();
  // b: echoes every message back whole (bytes and fds), until a half-closes.
  spawn(io, [&]() -> ::asio::awaitable<void> {
    for (;;) {
      auto [ec, m] = co_await b.async_receive(::asio::experimental::as_tuple(use_awaitable));
      if (ec) {
        EXPECT_THAT(ec, HasError(errc::peer_closed));
        co_return;
      }
      co_await b.async_send(m, use_awaitable);
    }
  });
  // a: a message of every size class, through each overload in turn.
  spawn(io, [&]() -> ::asio::awaitable<void> {
    for (int i = 0; i < rounds; ++i) {
      const std::size_t n = (i % 5 == 4) ? size : static_cast<std::size_t>(i * 37);
      const auto bytes = pattern(n, static_cast<unsigned>(i));
      switch (i % 4) {
        case 0: co_await a.async_send(bytes, use_awaitable); break;
        case 1: co_await a.async_send(bytes, std::span<const int>{}, use_awaitable); break;
        case 2: {
          const std::size_t half = n / 2;
          const std::array<const_buffer, 2> parts{const_buffer(bytes).first(half),
                                                  const_buffer(bytes).subspan(half)};
          co_await a.async_send(parts, {}, use_awaitable);
          break;
        }
        default: {
          const message m{const_buffer(bytes)};
          co_await a.async_send(m, use_awaitable);
          break;
        }
      }
      message echo = co_await a.async_receive(use_awaitable);
      EXPECT_TRUE(same(echo.bytes(), bytes)) << "round " << i << ", " << n << " bytes";
    }
    EXPECT_THAT(a.channel().shutdown_send(), Succeeded());
  });
  run(io);
}

TEST_P(asio_test, FdsTravelAndAreUsableOnTheOtherSide) {
  ::asio::io_context io;
  auto [a, b] = make_pair(io, GetParam());
  auto [read_end, write_end] = test::make_pipe();
  const ino_t inode = test::inode_of(read_end.get());
  spawn(io, [&]() -> ::asio::awaitable<void> {
    // One fd with bytes; then two fds with scatter/gather parts; then a message's own fds.
    const std::array<int, 1> one{read_end.get()};
    co_await a.async_send(as_bytes("a pipe"), one, use_awaitable);
    const std::array<int, 2> two{read_end.get(), write_end.get()};
    const std::array<const_buffer, 2> parts{as_bytes("both "), as_bytes("ends")};
    co_await a.async_send(parts, two, use_awaitable);
    std::vector<unique_fd> own;
    own.push_back(test::must(duplicate(write_end.get())));
    const message m(as_bytes("write end"), std::move(own));
    co_await a.async_send(m, use_awaitable);
  });
  spawn(io, [&]() -> ::asio::awaitable<void> {
    message first = co_await b.async_receive(use_awaitable);
    EXPECT_EQ(first.text(), "a pipe");
    EXPECT_EQ(first.fds().size(), 1U);
    message second = co_await b.async_receive(use_awaitable);
    EXPECT_EQ(second.text(), "both ends");
    EXPECT_EQ(second.fds().size(), 2U);
    message third = co_await b.async_receive(use_awaitable);
    EXPECT_EQ(third.text(), "write end");
    EXPECT_EQ(third.fds().size(), 1U);
    if (first.fds().size() != 1 || third.fds().size() != 1) co_return;
    // The received fds are the pipe: written through one, read through the other.
    EXPECT_EQ(test::inode_of(first.fds()[0].get()), inode);
    EXPECT_TRUE(test::fd_is_cloexec(first.fds()[0].get()));
    EXPECT_EQ(::write(third.fds()[0].get(), "through", 7), 7);
    std::array<char, 16> buf{};
    EXPECT_EQ(::read(first.fds()[0].get(), buf.data(), buf.size()), 7);
    EXPECT_EQ(std::string_view(buf.data(), 7), "through");
  });
  run(io);
}

TEST_P(asio_test, AnOutcomeKnownAtOnceNeverCompletesInsideTheInitiatingCall) {
  ::asio::io_context io;
  auto [a, b] = make_pair(io, GetParam());
  // A message already waiting, a send the kernel takes at once, and an error known at once.
  ASSERT_THAT(b.channel().send(as_bytes("waiting")), Succeeded());
  bool inside = true;
  received r;
  a.async_receive([&](std::error_code ec, message m) {
    EXPECT_FALSE(inside) << "async_receive's handler ran inside async_receive";
    record(r)(ec, std::move(m));
  });
  sent s;
  a.async_send(as_bytes("taken at once"), [&](std::error_code ec) {
    EXPECT_FALSE(inside) << "async_send's handler ran inside async_send";
    record(s)(ec);
  });
  duplex::asio::channel closed(io, duplex::channel{});
  received e;
  closed.async_receive([&](std::error_code ec, message m) {
    EXPECT_FALSE(inside);
    record(e)(ec, std::move(m));
  });
  inside = false;
  EXPECT_FALSE(r.done);
  EXPECT_FALSE(s.done);
  EXPECT_FALSE(e.done);
  run(io);
  ASSERT_TRUE(r.done && s.done && e.done);
  EXPECT_FALSE(r.ec);
  EXPECT_EQ(r.m.text(), "waiting");
  EXPECT_FALSE(s.ec);
  EXPECT_THAT(e.ec, HasError(errc::closed));
  EXPECT_EQ(test::must(b.channel().receive(1s)).text(), "taken at once");
}

TEST_P(asio_test, EveryMessageThenPeerClosedWhenThePeerDies) {
  ::asio::io_context io;
  auto worker = test::must(fork_with_channel(
      [](channel& parent) {
        if (!parent.send(as_bytes("last words"))) return 1;
        ::_exit(0);  // dies without a goodbye
      },
      {.kind = GetParam()}));
  duplex::asio::channel ch(io, std::move(worker.channel()));
  std::vector<std::error_code> errors;
  std::string text;
  spawn(io, [&]() -> ::asio::awaitable<void> {
    text = (co_await ch.async_receive(use_awaitable)).text();
    for (int i = 0; i < 2; ++i) {
      auto [ec, m] = co_await ch.async_receive(::asio::experimental::as_tuple(use_awaitable));
      errors.push_back(ec);
    }
  });
  run(io);
  EXPECT_EQ(text, "last words");
  EXPECT_THAT(errors, ::testing::Each(HasError(errc::peer_closed)));
  EXPECT_EQ(errors.size(), 2U);
  EXPECT_TRUE(test::must(worker.wait()).success());
}

// SIGPIPE at its default (class 2): async_send to a dead peer completes with peer_closed, the
// process surviving, whether the peer is gone before the call (the first try_send fails) or goes
// while the message waits for room (the flush after the wait fails).
TEST_P(asio_test, AsyncSendToADeadPeerIsAnErrorNotSigpipe) {
  const test::default_sigpipe sigpipe;  // had a write raised it, this process would die
  const auto large = pattern(big(), 7);
  {
    ::asio::io_context io;
    auto [a, b] = make_pair(io, GetParam());
    b.close();
    std::vector<std::error_code> errors;
    spawn(io, [&]() -> ::asio::awaitable<void> {
      for (const const_buffer bytes : {as_bytes("anyone?"), const_buffer(large)}) {
        auto [ec] = co_await a.async_send(bytes, ::asio::experimental::as_tuple(use_awaitable));
        errors.push_back(ec);
      }
    });
    run(io);
    EXPECT_EQ(errors.size(), 2U);
    EXPECT_THAT(errors, ::testing::Each(HasError(errc::peer_closed)));
  }
  ::asio::io_context io;
  auto [a, b] = make_pair(io, GetParam());
  fill(a.channel(), big());  // the socket is full and a message waits in the queue
  sent s;
  a.async_send(large, record(s));
  ASSERT_FALSE(s.done);
  ::asio::post(io, [&b] { b.close(); });  // the peer goes while the send waits
  run(io);
  EXPECT_TRUE(s.done);
  EXPECT_THAT(s.ec, HasError(errc::peer_closed));
  EXPECT_THAT(a.channel().send(as_bytes("later")), HasError(errc::peer_closed));
}

TEST_P(asio_test, ABrokenHeaderGivesProtocolErrorThenBroken) {
  ::asio::io_context io;
  auto raw = test::must(socket_pair(GetParam()));
  duplex::asio::channel ch(io, test::must(channel::create(std::move(raw.first))));
  auto head = wire::encode_native({.length = 4});
  head[0] = std::byte{'X'};  // not the magic
  const std::array<const_buffer, 2> frame{const_buffer(head), as_bytes("oops")};
  ASSERT_THAT(raw.second.send(frame), Succeeded());
  received first;
  received second;
  ch.async_receive([&](std::error_code ec, message m) {
    record(first)(ec, std::move(m));
    ch.async_receive(record(second));
  });
  run(io);
  EXPECT_THAT(first.ec, HasError(errc::protocol_error));
  EXPECT_THAT(second.ec, HasError(errc::broken));
  EXPECT_TRUE(ch.channel().is_broken());
}

TEST_P(asio_test, CancelAbortsBothOperationsAndTheChannelStaysInStep) {
  ::asio::io_context io;
  auto [a, b] = make_pair(io, GetParam(), {.max_queued_bytes = 64 << 10});
  // b's socket is full and its queue too: a send must wait; nothing is coming to b: a receive
  // must wait.
  fill(b.channel(), packet_chunk);
  const auto blocked = pattern(big(), 7);
  sent s;
  received r;
  b.async_send(blocked, record(s));
  b.async_receive(record(r));
  ::asio::steady_timer timer(io, 20ms);
  timer.async_wait([&](std::error_code) { b.cancel(); });
  run(io);
  ASSERT_TRUE(s.done && r.done);
  EXPECT_EQ(s.ec, ::asio::error::operation_aborted);
  EXPECT_EQ(r.ec, ::asio::error::operation_aborted);
  EXPECT_TRUE(r.m.empty());
  // In step: a gets whatever b had queued (never the cancelled message's bytes cut), and b then
  // receives a's next message whole.
  io.restart();
  spawn(io, [&]() -> ::asio::awaitable<void> {
    co_await b.async_flush(use_awaitable);
    co_await b.async_send(as_bytes("after"), use_awaitable);
    message m = co_await b.async_receive(use_awaitable);
    EXPECT_EQ(m.text(), "next");
  });
  spawn(io, [&]() -> ::asio::awaitable<void> {
    for (;;) {
      message m = co_await a.async_receive(use_awaitable);
      if (m.text() == "after") break;
      EXPECT_TRUE(same(m.bytes(), pattern(packet_chunk, 99)));
    }
    co_await a.async_send(as_bytes("next"), use_awaitable);
  });
  run(io);
}

TEST_P(asio_test, PerOperationCancellationOfEveryTypeAbortsAReceive) {
  ::asio::io_context io;
  auto [a, b] = make_pair(io, GetParam());
  for (auto type : {::asio::cancellation_type::terminal, ::asio::cancellation_type::partial,
                    ::asio::cancellation_type::total}) {
    ::asio::cancellation_signal signal;
    received r;
    a.async_receive(::asio::bind_cancellation_slot(signal.slot(), record(r)));
    ::asio::post(io, [&] { signal.emit(type); });
    io.restart();
    run(io);
    ASSERT_TRUE(r.done);
    EXPECT_EQ(r.ec, ::asio::error::operation_aborted) << static_cast<int>(type);
  }
  // The channel is in step: the next message arrives whole.
  ASSERT_THAT(b.channel().send(as_bytes("still here")), Succeeded());
  received r;
  a.async_receive(record(r));
  io.restart();
  run(io);
  EXPECT_EQ(r.m.text(), "still here");
}

TEST_F(asio_stream_test, AMessagePartlyReadWhenCancelledStaysBufferedWhole) {
  ::asio::io_context io;
  auto raw = test::must(socket_pair(socket_kind::stream));
  duplex::asio::channel ch(io, test::must(channel::create(std::move(raw.first))));
  const auto payload = pattern(1000, 3);
  const auto head = wire::encode_native({.length = payload.size()});
  // The header and half the payload: the receive reads them, then waits for the rest.
  const std::array<const_buffer, 2> half{const_buffer(head), const_buffer(payload).first(500)};
  ASSERT_THAT(raw.second.send(half), Succeeded());
  ::asio::cancellation_signal signal;
  received r;
  ch.async_receive(::asio::bind_cancellation_slot(signal.slot(), record(r)));
  io.poll();
  EXPECT_FALSE(r.done);
  signal.emit(::asio::cancellation_type::terminal);
  run(io);
  ASSERT_TRUE(r.done);
  EXPECT_EQ(r.ec, ::asio::error::operation_aborted);
  // The rest, and a second message: both whole.
  const auto head2 = wire::encode_native({.length = 6});
  const std::array<const_buffer, 3> rest{const_buffer(payload).subspan(500), const_buffer(head2),
                                         as_bytes("second")};
  ASSERT_THAT(raw.second.send(rest), Succeeded());
  received first;
  received second;
  ch.async_receive([&](std::error_code ec, message m) {
    record(first)(ec, std::move(m));
    ch.async_receive(record(second));
  });
  io.restart();
  run(io);
  EXPECT_FALSE(first.ec);
  EXPECT_TRUE(same(first.m.bytes(), payload));
  EXPECT_EQ(second.m.text(), "second");
}

// cancel() after a receive was woken by the socket and found only part of a message still aborts
// it, and the part stays buffered. The handler runs on a second io_context, so the test can call
// cancel() in between. (With reactor operations the reactor has tried the receive and queued it
// again; with composed operations its next step waits on the second io_context, and the reactor
// holds nothing to cancel.)
TEST_F(asio_stream_test, CancelBetweenTwoWaitsIsNotLost) {
  ::asio::io_context io;
  ::asio::io_context steps;
  auto raw = test::must(socket_pair(socket_kind::stream));
  duplex::asio::channel ch(io, test::must(channel::create(std::move(raw.first))));
  received r;
  ch.async_receive(::asio::bind_executor(steps, record(r)));
  const auto head = wire::encode_native({.length = 5});
  ASSERT_THAT(raw.second.send(const_buffer(head)), Succeeded());  // a header alone
  io.poll();  // the reactor sees the socket readable and hands the next step to `steps`
  EXPECT_FALSE(r.done);
  ch.cancel();
  io.poll();     // hands the aborted receive to `steps` (reactor operations)
  steps.poll();  // composed operations: reads the header, would wait again, aborts instead
  ASSERT_TRUE(r.done);
  EXPECT_EQ(r.ec, ::asio::error::operation_aborted);
  ASSERT_THAT(raw.second.send(as_bytes("whole")), Succeeded());
  received next;
  ch.async_receive(record(next));
  io.restart();
  run(io);
  EXPECT_EQ(next.m.text(), "whole");
}

TEST_P(asio_test, ASendCancelledBeforeTheChannelTookItSentNothing) {
  ::asio::io_context io;
  auto [a, b] = make_pair(io, GetParam(), {.max_queued_bytes = 64 << 10});
  fill(a.channel(), packet_chunk);
  const std::size_t queued = a.channel().queued_bytes();
  // The queue is full: the channel does not take this one; every cancellation type applies.
  const auto refused = pattern(big(), 5);
  ::asio::cancellation_signal signal;
  sent s;
  a.async_send(refused, ::asio::bind_cancellation_slot(signal.slot(), record(s)));
  io.poll();
  EXPECT_FALSE(s.done);
  EXPECT_EQ(a.channel().queued_bytes(), queued);
  signal.emit(::asio::cancellation_type::total);
  run(io);
  EXPECT_EQ(s.ec, ::asio::error::operation_aborted);
  // b receives the messages that filled the socket and nothing else.
  io.restart();
  int filled = 0;
  spawn(io, [&]() -> ::asio::awaitable<void> {
    co_await a.async_flush(use_awaitable);
    co_await a.async_send(as_bytes("end"), use_awaitable);
  });
  spawn(io, [&]() -> ::asio::awaitable<void> {
    for (;;) {
      message m = co_await b.async_receive(use_awaitable);
      if (m.text() == "end") break;
      EXPECT_EQ(m.size(), packet_chunk);
      ++filled;
    }
  });
  run(io);
  EXPECT_GT(filled, 0);
}

TEST_P(asio_test, ASendCancelledAfterTheChannelTookItIsDeliveredWholeByTheNextFlush) {
  ::asio::io_context io;
  auto [a, b] = make_pair(io, GetParam(), {.max_queued_bytes = 4 << 20});
  fill(a.channel(), packet_chunk);
  // The queue has room: the channel takes the message, which waits behind the others.
  const auto taken = pattern(big(), 6);
  ::asio::cancellation_signal signal;
  sent s;
  a.async_send(taken, ::asio::bind_cancellation_slot(signal.slot(), record(s)));
  io.poll();
  EXPECT_FALSE(s.done);
  // Total cancellation would need the message unsent: refused. Terminal is honoured.
  signal.emit(::asio::cancellation_type::total);
  io.poll();
  EXPECT_FALSE(s.done);
  signal.emit(::asio::cancellation_type::terminal);
  run(io);
  EXPECT_EQ(s.ec, ::asio::error::operation_aborted);
  EXPECT_TRUE(a.channel().wants_write());
  // async_flush delivers it; b receives the filler, then the message whole.
  io.restart();
  bool found = false;
  spawn(io, [&]() -> ::asio::awaitable<void> { co_await a.async_flush(use_awaitable); });
  spawn(io, [&]() -> ::asio::awaitable<void> {
    while (!found) {
      message m = co_await b.async_receive(use_awaitable);
      found = m.size() == taken.size() && same(m.bytes(), taken);
      if (!found) {
        EXPECT_TRUE(same(m.bytes(), pattern(packet_chunk, 99)));
      }
    }
  });
  run(io);
  EXPECT_TRUE(found);
  EXPECT_FALSE(a.channel().wants_write());
}

// The CPU time this process has used, all threads together.
std::chrono::nanoseconds process_cpu_time() {
  timespec t{};
  ::clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
  return std::chrono::seconds(t.tv_sec) + std::chrono::nanoseconds(t.tv_nsec);
}

// shared_memory.max_in_flight reached: the socket is writable, but the channel takes nothing
// until the peer has read the memfd already on its way, and no readiness says when. The send
// waits paused on a timer instead of spinning on writability: over half a second of waiting the
// process uses well under a third of the CPU time. Once the peer reads, the send completes and
// both messages arrive whole, in order. A paused send cancelled before sent nothing.
TEST_P(asio_test, ASendPastTheMemfdBoundWaitsWithoutSpinningUntilThePeerReads) {
  ::asio::io_context io;
  channel_options o;
  o.shared_memory.enabled = true;
  o.shared_memory.threshold = std::size_t{64} << 10;
  o.shared_memory.pool_size = std::size_t{64} << 10;  // too small: each message a memfd of its own
  o.shared_memory.max_in_flight = std::size_t{1} << 20;
  auto ends = test::must(channel_pair(GetParam(), o));
  duplex::asio::channel a(io, std::move(ends.first));
  duplex::channel& b = ends.second;
  const auto first = pattern(std::size_t{2} << 20, 7);
  const auto second = pattern(std::size_t{2} << 20, 8);
  sent s1;
  a.async_send(first, record(s1));  // nothing on its way yet: it goes
  run(io);
  ASSERT_TRUE(s1.done);
  ASSERT_FALSE(s1.ec) << s1.ec.message();
  // A paused send is cancelled as any send the channel has not taken: with nothing sent.
  ::asio::cancellation_signal signal;
  sent cancelled;
  a.async_send(second, ::asio::bind_cancellation_slot(signal.slot(), record(cancelled)));
  io.restart();
  io.run_for(50ms);
  EXPECT_FALSE(cancelled.done);
  signal.emit(::asio::cancellation_type::total);
  run(io);
  EXPECT_EQ(cancelled.ec, ::asio::error::operation_aborted);
  sent s2;
  a.async_send(second, record(s2));
  io.restart();
  const auto cpu_before = process_cpu_time();
  const auto wall_before = std::chrono::steady_clock::now();
  io.run_for(500ms);
  const auto cpu = process_cpu_time() - cpu_before;
  const auto wall = std::chrono::steady_clock::now() - wall_before;
  EXPECT_FALSE(s2.done);
  EXPECT_LT(cpu * 10, wall * 3) << "waiting used " << cpu.count() << " ns of CPU in "
                                << std::chrono::nanoseconds(wall).count() << " ns";
  auto m1 = b.receive(10s);
  ASSERT_THAT(m1, Succeeded());
  EXPECT_TRUE(same(std::as_const(*m1).bytes(), first));
  run(io);
  ASSERT_TRUE(s2.done);
  EXPECT_FALSE(s2.ec) << s2.ec.message();
  auto m2 = b.receive(10s);
  ASSERT_THAT(m2, Succeeded());
  EXPECT_TRUE(same(std::as_const(*m2).bytes(), second));
  EXPECT_THAT(b.try_receive(), HasError(errc::would_block));
}

// A send paused at the memfd bound when its channel goes completes with operation_aborted (the
// io_context run after), or is destroyed unrun with the io_context: nothing leaks (fd accounting
// here, the leak checker under the sanitizers).
TEST_P(asio_test, ASendPausedWhenItsChannelGoesIsAbortedAndLeavesNothing) {
  channel_options o;
  o.shared_memory.enabled = true;
  o.shared_memory.threshold = std::size_t{64} << 10;
  o.shared_memory.pool_size = std::size_t{64} << 10;
  o.shared_memory.max_in_flight = std::size_t{1} << 20;
  const auto large = pattern(std::size_t{2} << 20, 9);
  for (const bool run_after : {true, false}) {
    ::asio::io_context io;
    auto ends = test::must(channel_pair(GetParam(), o));
    std::optional<duplex::asio::channel> a(std::in_place, io, std::move(ends.first));
    ASSERT_THAT(a->channel().send(large), Succeeded());  // on its way, unread
    sent s;
    a->async_send(large, record(s));
    io.run_for(20ms);
    EXPECT_FALSE(s.done);
    a.reset();
    if (run_after) {
      io.restart();
      run(io);
      EXPECT_EQ(s.ec, ::asio::error::operation_aborted);
    }
  }
}

// A local limit met after the channel took the message (ETOOMANYREFS: this user's fds in flight,
// reached in an unprivileged child) leaves the message queued, whole, and it goes once the limit
// clears: async_send completes then, with success, and the peer gets it exactly once. Had the
// send completed with ETOOMANYREFS, its caller would have sent the message a second time.
TEST_P(asio_test, ALocalLimitMetAfterTheChannelTookTheMessageIsNotItsOutcome) {
  const socket_kind kind = GetParam();
  const int status = test::run_in_child([kind] {
    if (::geteuid() == 0 && !test::become_unprivileged()) return 9;
    ::asio::io_context io;
    auto ends = test::must(channel_pair(kind));
    duplex::asio::channel a(io, std::move(ends.first));
    duplex::channel& b = ends.second;
    auto hog = test::must(channel_pair(socket_kind::stream));
    auto [read_end, write_end] = test::make_pipe();
    const std::array<int, 1> fd{read_end.get()};
    if (!test::set_nofile(64)) return 10;  // a few fds in flight reach the limit
    for (unsigned i = 0; i < 10000 && !a.channel().wants_write(); ++i) {
      if (!a.channel().try_send(pattern(1000, i))) return 11;
    }
    if (!a.channel().wants_write()) return 11;
    sent s;
    a.async_send(as_bytes("with fd"), fd, record(s));
    io.poll();
    if (s.done) return 12;  // taken, behind the fillers
    // The user's fds in flight reach the limit: fds sent over a pair nobody reads.
    const std::array<int, 1> hog_fd{write_end.get()};
    bool at_limit = false;
    for (int i = 0; i < 4096 && !at_limit; ++i) {
      auto r = hog.first.send(as_bytes("x"), hog_fd);
      if (!r && r.error() != test::sys(ETOOMANYREFS)) return 13;
      at_limit = !r;
    }
    if (!at_limit) return 13;
    // b drains the fillers; the send's flush then meets the limit at the message's fd.
    std::size_t plain = 0;
    int quiet = 0;
    for (int i = 0; i < 20000 && quiet < 200 && !s.done; ++i) {
      io.run_for(1ms);
      auto m = b.try_receive();
      if (!m) {
        if (m.error() != errc::would_block) return 14;
        ++quiet;
        continue;
      }
      if (!m->fds().empty()) return 15;
      ++plain;
      quiet = 0;
    }
    if (s.done) return 16;
    if (plain == 0 || !a.channel().wants_write()) return 17;
    // The fds in flight go with the pair that held them; the limit goes back up.
    hog.first.close();
    hog.second.close();
    if (!test::set_nofile(1024)) return 18;
    for (int i = 0; i < 1000 && !s.done; ++i)
      io.run_for(10ms);
    if (!s.done || s.ec) return 19;
    bool got = false;
    for (;;) {
      auto m = b.try_receive();
      if (!m) {
        if (m.error() != errc::would_block) return 20;
        break;
      }
      if (m->fds().empty()) continue;  // the rest of the fillers
      if (got || m->text() != "with fd" || m->fds().size() != 1 ||
          test::inode_of(m->fds()[0].get()) != test::inode_of(fd[0])) {
        return 21;
      }
      got = true;
    }
    return got && !a.channel().wants_write() ? 0 : 22;
  });
  EXPECT_EQ(status, 0);
}

TEST_P(asio_test, TimeoutsWithATimer) {
  ::asio::io_context io;
  auto [a, b] = make_pair(io, GetParam());
  spawn(io, [&]() -> ::asio::awaitable<void> {
    // Nothing comes: the timer wins, the receive is cancelled.
    ::asio::steady_timer timer(io, 30ms);
    auto r = co_await (a.async_receive(use_awaitable) || timer.async_wait(use_awaitable));
    EXPECT_EQ(r.index(), 1U);
    // Something comes in time: the receive wins.
    EXPECT_THAT(b.channel().send(as_bytes("in time")), Succeeded());
    timer.expires_after(10s);
    auto r2 = co_await (a.async_receive(use_awaitable) || timer.async_wait(use_awaitable));
    EXPECT_EQ(r2.index(), 0U);
    if (r2.index() == 0) {
      EXPECT_EQ(std::get<0>(r2).text(), "in time");
    }
  });
  run(io);
  // The handler way: a timer that calls cancel().
  io.restart();
  ::asio::steady_timer timer(io, 30ms);
  timer.async_wait([&](std::error_code) { a.cancel(); });
  received r;
  a.async_receive([&](std::error_code ec, message m) {
    timer.cancel();
    record(r)(ec, std::move(m));
  });
  run(io);
  EXPECT_EQ(r.ec, ::asio::error::operation_aborted);
}

TEST_P(asio_test, CloseAbortsOutstandingOperationsAndLaterOnesSayClosed) {
  ::asio::io_context io;
  auto [a, b] = make_pair(io, GetParam());
  received r;
  a.async_receive(record(r));
  ::asio::post(io, [&] { a.close(); });
  run(io);
  EXPECT_EQ(r.ec, ::asio::error::operation_aborted);
  EXPECT_FALSE(a.is_open());
  received later;
  sent later_send;
  a.async_receive(record(later));
  a.async_send(as_bytes("x"), record(later_send));
  io.restart();
  run(io);
  EXPECT_THAT(later.ec, HasError(errc::closed));
  EXPECT_THAT(later_send.ec, HasError(errc::closed));
  // The peer sees the end at once: the reactor's duplicate fd was closed too.
  EXPECT_THAT(b.channel().receive(1s), HasError(errc::peer_closed));
}

TEST_P(asio_test, DefaultTokensMovesFuturesAndStrands) {
  ::asio::io_context io;
  auto ends = test::must(channel_pair(GetParam()));
  // use_awaitable as the default token, through rebind_executor and the converting constructor.
  auto a = ::asio::use_awaitable.as_default_on(duplex::asio::channel(io, std::move(ends.first)));
  static_assert(std::is_same_v<decltype(a),
                               ::asio::use_awaitable_t<>::as_default_on_t<duplex::asio::channel>>);
  duplex::asio::channel b0(::asio::make_strand(io), std::move(ends.second));
  std::future<message> first = b0.async_receive(::asio::use_future);
  // A moved channel keeps its outstanding operation.
  duplex::asio::channel b(std::move(b0));
  bool done = false;
  spawn(io, [&]() -> ::asio::awaitable<void> {
    co_await a.async_send(as_bytes("default token"));
    message m = co_await a.async_receive();
    EXPECT_EQ(m.text(), "future");
    done = true;
  });
  // use_future, with the io_context run by another thread.
  std::thread runner([&] { run(io); });
  EXPECT_EQ(first.get().text(), "default token");
  std::future<void> second = b.async_send(as_bytes("future"), ::asio::use_future);
  EXPECT_NO_THROW(second.get());
  runner.join();
  EXPECT_TRUE(done);
}

// Two coroutines per end on one single-threaded io_context, each end sending 64 MiB to the other
// while receiving: no operation ever blocks the thread, so nothing can deadlock.
TEST_P(asio_test, BothSidesSend64MiBAtOnceOnOneThread) {
  ::asio::io_context io(1);
  auto [a, b] = make_pair(io, GetParam());
  constexpr std::size_t total = 64U << 20;
  const std::size_t size = big();
  // A few distinct messages per direction, cycled: cheap to make, and a mix-up would show.
  auto make = [size](unsigned seed) {
    std::vector<std::vector<std::byte>> v;
    for (unsigned i = 0; i < 7; ++i)
      v.push_back(pattern(size, seed + i));
    return v;
  };
  const auto from_a = make(100);
  const auto from_b = make(200);
  std::size_t done = 0;
  auto sender = [&](duplex::asio::channel& ch,
                    const std::vector<std::vector<std::byte>>& msgs) -> ::asio::awaitable<void> {
    for (std::size_t i = 0, sent_bytes = 0; sent_bytes < total; ++i, sent_bytes += size)
      co_await ch.async_send(msgs[i % msgs.size()], use_awaitable);
    ++done;
  };
  auto receiver = [&](duplex::asio::channel& ch,
                      const std::vector<std::vector<std::byte>>& msgs) -> ::asio::awaitable<void> {
    std::size_t bad = 0;
    for (std::size_t i = 0, got = 0; got < total; ++i) {
      message m = co_await ch.async_receive(use_awaitable);
      if (!same(m.bytes(), msgs[i % msgs.size()])) ++bad;
      got += m.size();
    }
    EXPECT_EQ(bad, 0U);
    ++done;
  };
  spawn(io, sender(a, from_a));
  spawn(io, receiver(a, from_b));
  spawn(io, sender(b, from_b));
  spawn(io, receiver(b, from_a));
  run(io, 120s);
  EXPECT_EQ(done, 4U);
}

// An io_context run by two threads; each end on a strand of its own. a sends (with an fd every
// few messages) and receives at once, from two coroutines on its strand; b echoes.
TEST_P(asio_test, RoundTripsOnStrandsOfATwoThreadIoContext) {
  ::asio::io_context io(2);
  auto ends = test::must(channel_pair(GetParam()));
  duplex::asio::channel a(::asio::make_strand(io), std::move(ends.first));
  duplex::asio::channel b(::asio::make_strand(io), std::move(ends.second));
  constexpr int rounds = 2000;
  auto [read_end, write_end] = test::make_pipe();
  std::atomic<int> echoed{0};
  std::atomic<int> received_ok{0};
  spawn(b.get_executor(), [&]() -> ::asio::awaitable<void> {
    for (;;) {
      auto [ec, m] = co_await b.async_receive(::asio::experimental::as_tuple(use_awaitable));
      if (ec) {
        EXPECT_THAT(ec, HasError(errc::peer_closed));
        co_return;
      }
      co_await b.async_send(m, use_awaitable);
      ++echoed;
    }
  });
  spawn(a.get_executor(), [&]() -> ::asio::awaitable<void> {
    for (int i = 0; i < rounds; ++i) {
      const std::string text = "message " + std::to_string(i);
      const std::array<int, 1> fd{read_end.get()};
      co_await a.async_send(as_bytes(text),
                            i % 10 == 0 ? std::span<const int>(fd) : std::span<const int>(),
                            use_awaitable);
    }
  });
  spawn(a.get_executor(), [&]() -> ::asio::awaitable<void> {
    for (int i = 0; i < rounds; ++i) {
      message m = co_await a.async_receive(use_awaitable);
      const bool ok =
          m.text() == "message " + std::to_string(i) && m.fds().size() == (i % 10 == 0 ? 1U : 0U);
      EXPECT_TRUE(ok) << i << ": " << m.text();
      if (ok) ++received_ok;
    }
    EXPECT_THAT(a.channel().shutdown_send(), Succeeded());
  });
  std::thread second([&] { io.run_for(60s); });
  io.run_for(60s);
  second.join();
  EXPECT_TRUE(io.stopped());
  EXPECT_EQ(received_ok.load(), rounds);
  EXPECT_EQ(echoed.load(), rounds);
}

// --- acceptor ---------------------------------------------------------------------------------

// A directory of its own for unix socket paths, removed with what is in it.
class socket_dir {
 public:
  socket_dir() {
    std::string t = "/tmp/duplex-asio-XXXXXX";
    path_ = ::mkdtemp(t.data());
  }
  socket_dir(const socket_dir&) = delete;
  socket_dir& operator=(const socket_dir&) = delete;
  ~socket_dir() { static_cast<void>(std::system(("rm -rf '" + path_ + "'").c_str())); }
  [[nodiscard]] std::string file(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

std::vector<std::byte> key_of(std::string_view text) {
  const auto b = as_bytes(text);
  return {b.begin(), b.end()};
}

class asio_acceptor_test : public test::process_checked {};

// Connections of blocking clients on a thread, accepted with async_accept (with and without an
// authkey, over a unix path and tcp), each answered through a duplex::asio::channel.
TEST_F(asio_acceptor_test, AcceptsAuthenticatedClientsAndTheirChannelsTalk) {
  socket_dir dir;
  for (const bool with_key : {false, true}) {
    for (const bool tcp : {false, true}) {
      SCOPED_TRACE(std::string(with_key ? "key " : "no key ") + (tcp ? "tcp" : "unix"));
      listener_options lo;
      if (with_key) lo.endpoint.authkey = key_of("asio secret");
      const auto at = tcp ? test::must(address::parse("tcp:127.0.0.1:0"))
                          : test::must(address::unix_path(dir.file(with_key ? "k" : "n")));
      ::asio::io_context io;
      duplex::asio::acceptor acc(io, test::must(listener::listen(at, lo)));
      const address where = acc.listener().local_address();
      // One client after the other, then two at once: one accept takes both into their
      // handshakes, and the second is handed out by the next accept though the listening fd
      // shows nothing more.
      constexpr int clients = 5;
      const auto client = [&](int i) {
        auto ch = connect(where, lo.endpoint, 30s);
        ASSERT_THAT(ch, Succeeded());
        ASSERT_THAT(ch->send(as_bytes("client " + std::to_string(i))), Succeeded());
        auto reply = ch->receive(30s);
        ASSERT_THAT(reply, Succeeded());
        EXPECT_EQ(reply->text(), "CLIENT " + std::to_string(i));
      };
      std::thread peers([&] {
        for (int i = 0; i < 3; ++i)
          client(i);
        std::thread other([&] { client(3); });
        client(4);
        other.join();
      });
      int served = 0;
      spawn(io, [&]() -> ::asio::awaitable<void> {
        for (int i = 0; i < clients; ++i) {
          connection c = co_await acc.async_accept(use_awaitable);
          duplex::asio::channel ch(io, std::move(c.chan));
          message m = co_await ch.async_receive(use_awaitable);
          std::string text(m.text());
          EXPECT_TRUE(text.starts_with("client ")) << text;
          std::transform(text.begin(), text.end(), text.begin(),
                         [](unsigned char x) { return static_cast<char>(std::toupper(x)); });
          co_await ch.async_send(as_bytes(text), use_awaitable);
          ++served;
        }
      });
      run(io);
      peers.join();
      EXPECT_EQ(served, clients);
    }
  }
}

// A client with a wrong key is the listener's failure, not the operation's: the accept goes on
// to the next client. The handler never runs inside async_accept.
TEST_F(asio_acceptor_test, AWrongKeyIsTheListenersFailureAndTheNextClientIsAccepted) {
  socket_dir dir;
  listener_options lo;
  lo.endpoint.authkey = key_of("right");
  ::asio::io_context io;
  duplex::asio::acceptor acc(
      io, test::must(listener::listen(test::must(address::unix_path(dir.file("s"))), lo)));
  const address where = acc.listener().local_address();
  bool inside = true;
  bool done = false;
  acc.async_accept([&](std::error_code ec, connection c) {
    EXPECT_FALSE(inside);
    EXPECT_FALSE(ec) << ec.message();
    EXPECT_TRUE(c.chan.is_open());
    done = true;
  });
  inside = false;
  std::thread peers([&] {
    endpoint_options wrong;
    wrong.authkey = key_of("wrong");
    EXPECT_THAT(connect(where, wrong, 30s), HasError(make_error_code(errc::authentication_failed)));
    endpoint_options right;
    right.authkey = key_of("right");
    auto ch = connect(where, right, 30s);
    EXPECT_THAT(ch, Succeeded());
  });
  run(io);
  peers.join();
  EXPECT_TRUE(done);
  EXPECT_EQ(acc.listener().failures(), 1U);
}

// cancel(), a cancellation slot and close() end a waiting accept; after a cancellation the next
// accept takes the next client.
TEST_F(asio_acceptor_test, CancelAndCloseEndAWaitingAccept) {
  socket_dir dir;
  ::asio::io_context io;
  duplex::asio::acceptor acc(
      io, test::must(listener::listen(test::must(address::unix_path(dir.file("s"))))));
  std::error_code first;
  acc.async_accept([&](std::error_code ec, connection) { first = ec; });
  ::asio::post(io, [&] { acc.cancel(); });
  run(io);
  EXPECT_EQ(first, ::asio::error::operation_aborted);

  io.restart();
  ::asio::cancellation_signal signal;
  std::error_code second;
  acc.async_accept(::asio::bind_cancellation_slot(
      signal.slot(), [&](std::error_code ec, connection) { second = ec; }));
  ::asio::post(io, [&] { signal.emit(::asio::cancellation_type::total); });
  run(io);
  EXPECT_EQ(second, ::asio::error::operation_aborted);

  io.restart();
  auto client = connect(acc.listener().local_address(), {}, 30s);
  ASSERT_THAT(client, Succeeded());
  std::error_code third = make_error_code(errc::closed);
  acc.async_accept([&](std::error_code ec, connection) { third = ec; });
  run(io);
  EXPECT_FALSE(third) << third.message();

  io.restart();
  std::error_code fourth;
  acc.async_accept([&](std::error_code ec, connection) { fourth = ec; });
  ::asio::post(io, [&] { acc.close(); });
  run(io);
  EXPECT_EQ(fourth, make_error_code(errc::closed));
  EXPECT_FALSE(std::filesystem::exists(dir.file("s")));  // the listener's file went with it
}

// A client that connects and says nothing is dropped when its handshake deadline passes, while
// an accept waits with nothing else to wake it (the listener's timer does); the accept then takes
// the next, authenticated, client. No wait but the listener's readiness is involved.
TEST_F(asio_acceptor_test, ASilentClientIsDroppedAtItsDeadlineWhileAnAcceptWaits) {
  socket_dir dir;
  listener_options lo;
  lo.endpoint.authkey = key_of("key");
  lo.handshake_timeout = 300ms;
  const auto path = dir.file("s");
  ::asio::io_context io;
  duplex::asio::acceptor acc(
      io, test::must(listener::listen(test::must(address::unix_path(path)), lo)));
  unique_fd silent(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_un un{};
  un.sun_family = AF_UNIX;
  std::memcpy(un.sun_path, path.c_str(), path.size() + 1);
  ASSERT_EQ(::connect(silent.get(), reinterpret_cast<sockaddr*>(&un), sizeof un), 0);
  const address where = acc.listener().local_address();
  std::error_code got = make_error_code(errc::closed);
  acc.async_accept([&](std::error_code ec, connection c) {
    got = ec;
    EXPECT_TRUE(c.chan.is_open());
  });
  std::thread peer([&] {
    // Only once the silent one has been dropped, which nothing but its deadline can cause.
    EXPECT_TRUE(test::eventually([&] { return acc.listener().failures() == 1; }));
    auto ch = connect(where, lo.endpoint, 30s);
    EXPECT_THAT(ch, Succeeded());
  });
  run(io);
  peer.join();
  EXPECT_FALSE(got) << got.message();
  EXPECT_EQ(acc.listener().failures(), 1U);
}

}  // namespace
}  // namespace duplex
