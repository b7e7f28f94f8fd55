// waiter: readiness of many channels, sockets and child processes from one thread.
#include "duplex/waiter.hpp"

#include <algorithm>
#include <chrono>
#include <random>
#include <set>
#include <thread>
#include <vector>

#include "duplex/channel.hpp"
#include "duplex/endpoint.hpp"
#include "duplex/process.hpp"
#include "support.hpp"

namespace duplex {
namespace {

using namespace std::chrono_literals;
using test::HasError;
using test::Succeeded;
using test::sys;

class waiter_test : public test::process_checked {};

std::vector<ready_event> drain(waiter& w) {
  std::vector<ready_event> out;
  while (auto e = w.next())
    out.push_back(*e);
  return out;
}

TEST_F(waiter_test, ReportsReadableWritableAndClosedWithTheirKeys) {
  auto w = test::must(waiter::create());
  EXPECT_TRUE(test::fd_is_cloexec(w.native_handle()));
  auto [a, b] = test::must(channel_pair(socket_kind::stream));
  ASSERT_THAT(w.add(a, 7), Succeeded());
  EXPECT_THAT(w.add(a, 8), HasError(sys(EEXIST)));
  EXPECT_THAT(w.wait(20ms), HasError(errc::timed_out));
  ASSERT_THAT(b.send(as_bytes("hi")), Succeeded());
  ASSERT_THAT(w.wait(1s), Succeeded());
  auto events = drain(w);
  ASSERT_EQ(events.size(), 1U);
  EXPECT_EQ(events[0].key, 7U);
  EXPECT_EQ(events[0].fd, a.native_handle());
  EXPECT_TRUE(any(events[0].ready, readiness::readable));
  EXPECT_EQ(a.try_receive()->text(), "hi");
  ASSERT_THAT(w.modify(a.native_handle(), readiness::writable), Succeeded());
  ASSERT_THAT(w.wait(1s), Succeeded());
  EXPECT_TRUE(any(drain(w).at(0).ready, readiness::writable));
  ASSERT_THAT(w.modify(a.native_handle(), readiness::readable), Succeeded());
  b = channel();  // the peer dies
  ASSERT_THAT(w.wait(1s), Succeeded());
  events = drain(w);
  ASSERT_EQ(events.size(), 1U);
  EXPECT_TRUE(any(events[0].ready, readiness::closed));
  EXPECT_THAT(a.try_receive(), HasError(errc::peer_closed));
  ASSERT_THAT(w.remove(a.native_handle()), Succeeded());
  EXPECT_THAT(w.remove(a.native_handle()), HasError(sys(ENOENT)));
}

TEST_F(waiter_test, EventsOfRemovedRegistrationsAreNeverReturned) {
  auto w = test::must(waiter::create());
  auto [a, b] = test::must(channel_pair(socket_kind::seqpacket));
  auto [c, d] = test::must(channel_pair(socket_kind::seqpacket));
  ASSERT_THAT(w.add(a, 1), Succeeded());
  ASSERT_THAT(w.add(c, 2), Succeeded());
  ASSERT_THAT(b.send(as_bytes("to a")), Succeeded());
  ASSERT_THAT(d.send(as_bytes("to c")), Succeeded());
  ASSERT_THAT(w.wait(1s), ::testing::Optional(2U));
  // While handling the first event, both registrations go; one comes back under a new key.
  auto first = w.next();
  ASSERT_TRUE(first);
  ASSERT_THAT(w.remove(a.native_handle()), Succeeded());
  ASSERT_THAT(w.remove(c.native_handle()), Succeeded());
  ASSERT_THAT(w.add(c, 3), Succeeded());
  EXPECT_EQ(w.next(), std::nullopt) << "a stale event was returned";
  ASSERT_THAT(w.wait(1s), Succeeded());
  auto again = drain(w);
  ASSERT_EQ(again.size(), 1U);
  EXPECT_EQ(again[0].key, 3U);
}

TEST_F(waiter_test, AChildsExitMakesItsPidfdReadable) {
  auto w = test::must(waiter::create());
  auto c = test::must(spawn({"sleep", "0.05"}));
  ASSERT_THAT(w.add_exit(c, 42), Succeeded());
  ASSERT_THAT(w.add(c.channel(), 43), Succeeded());
  std::set<std::uint64_t> seen;
  while (seen.size() < 2) {
    ASSERT_THAT(w.wait(30s), Succeeded());
    for (auto e = w.next(); e; e = w.next()) {
      seen.insert(e->key);
      if (e->key == 42) {
        ASSERT_THAT(w.remove(c.pidfd()), Succeeded());
      }
      if (e->key == 43) {
        EXPECT_THAT(c.channel().try_receive(), HasError(errc::peer_closed));
        ASSERT_THAT(w.remove(c.channel().native_handle()), Succeeded());
      }
    }
  }
  EXPECT_TRUE(c.try_wait().value().has_value());  // exited: reaped without blocking
}

// Under a 10 kHz storm without SA_RESTART, waiter::wait and child::wait(timeout) neither return
// EINTR nor give up early, and still wake for what they wait for.
TEST_F(waiter_test, WaitsRideOutASignalStorm) {
  using std::chrono::steady_clock;
  auto [a, b] = test::must(channel_pair());
  auto w = test::must(waiter::create());
  ASSERT_THAT(w.add(a, 1), Succeeded());
  auto c = test::must(spawn({"sleep", "0.3"}));
  test::signal_storm storm;
  auto start = steady_clock::now();
  EXPECT_THAT(w.wait(30ms), HasError(errc::timed_out));
  EXPECT_GE(steady_clock::now() - start, 30ms);
  std::thread peer([&b] {
    std::this_thread::sleep_for(50ms);
    static_cast<void>(b.send(as_bytes("x")));
  });
  const auto woken = w.wait(10s);
  peer.join();
  ASSERT_THAT(woken, Succeeded());
  const auto e = w.next();
  ASSERT_TRUE(e.has_value());
  EXPECT_EQ(e->key, 1U);
  start = steady_clock::now();
  EXPECT_THAT(c.wait(30ms), HasError(errc::timed_out));
  EXPECT_GE(steady_clock::now() - start, 30ms);
  const auto status = c.wait(10s);
  ASSERT_THAT(status, Succeeded());
  EXPECT_TRUE(status->success());
  EXPECT_GT(storm.delivered(), 10);
}

// A thousand channels on one waiter, messages to random ones, and peers dying while waited on.
TEST_F(waiter_test, AThousandChannelsAndDyingPeers) {
  constexpr int n = 1000;
  auto w = test::must(waiter::create());
  std::vector<channel> mine;
  std::vector<channel> theirs;
  mine.reserve(n);
  theirs.reserve(n);
  for (int i = 0; i < n; ++i) {
    auto ends = test::must(channel_pair(i % 2 == 0 ? socket_kind::stream : socket_kind::seqpacket));
    mine.push_back(std::move(ends.first));
    theirs.push_back(std::move(ends.second));
    ASSERT_THAT(w.add(mine.back(), static_cast<std::uint64_t>(i)), Succeeded());
  }
  EXPECT_EQ(w.size(), static_cast<std::size_t>(n));
  std::mt19937 rng(7);
  std::vector<int> expected(n, 0);
  std::thread peers([&] {
    for (int k = 0; k < 5000; ++k) {
      const int i = static_cast<int>(rng() % n);
      if (!theirs[static_cast<std::size_t>(i)].send(as_bytes(std::to_string(k)))) ADD_FAILURE();
      ++expected[static_cast<std::size_t>(i)];
    }
    for (int i = 0; i < n; i += 3)
      theirs[static_cast<std::size_t>(i)] = channel();  // a third die
  });
  peers.join();
  std::vector<int> got(n, 0);
  std::vector<bool> ended(n, false);
  int ended_count = 0;
  const int dying = (n + 2) / 3;
  while (ended_count < dying) {
    ASSERT_THAT(w.wait(30s), Succeeded());
    while (auto e = w.next()) {
      channel& ch = mine[e->key];
      for (;;) {
        auto m = ch.try_receive();
        if (m) {
          ++got[e->key];
          continue;
        }
        if (m.error() == errc::peer_closed) {
          ended[e->key] = true;
          ++ended_count;
          ASSERT_THAT(w.remove(ch.native_handle()), Succeeded());
        } else {
          ASSERT_THAT(m, HasError(errc::would_block));
        }
        break;
      }
    }
  }
  // Collect what is left on the living channels.
  while (w.wait(50ms)) {
    while (auto e = w.next()) {
      while (mine[e->key].try_receive())
        ++got[e->key];
    }
  }
  EXPECT_EQ(got, expected);
  for (int i = 0; i < n; ++i)
    EXPECT_EQ(ended[static_cast<std::size_t>(i)], i % 3 == 0) << i;
}

// A listener in a waiter: its fd is readable when a connection waits; accept then takes it
// (without an authkey at once; with one, accept's timeout covers the handshake, which the client
// thread drives from its side).
TEST_F(waiter_test, AListenersFdIsReadableWhenAConnectionWaits) {
  for (const bool with_key : {false, true}) {
    SCOPED_TRACE(with_key ? "with a key" : "without a key");
    listener_options lo;
    if (with_key) {
      const auto b = as_bytes("waiter key");
      lo.endpoint.authkey.assign(b.begin(), b.end());
    }
    auto l = test::must(listener::listen(test::must(address::parse("tcp:127.0.0.1:0")), lo));
    auto w = test::must(waiter::create());
    ASSERT_THAT(w.add(l.native_handle(), 7), Succeeded());
    EXPECT_THAT(w.wait(20ms), HasError(make_error_code(errc::timed_out)));
    std::thread client([&] {
      auto ch = connect(l.local_address(), lo.endpoint, 30s);
      ASSERT_THAT(ch, Succeeded());
      ASSERT_THAT(ch->send(as_bytes("through a waiter")), Succeeded());
    });
    ASSERT_THAT(w.wait(30s), Succeeded());
    auto e = w.next();
    ASSERT_TRUE(e.has_value());
    EXPECT_EQ(e->key, 7U);
    auto c = l.accept(30s);
    ASSERT_THAT(c, Succeeded());
    auto m = c->chan.receive(30s);
    ASSERT_THAT(m, Succeeded());
    EXPECT_EQ(m->text(), "through a waiter");
    client.join();
    EXPECT_THAT(w.wait(20ms), HasError(make_error_code(errc::timed_out)));  // nothing waits now
    ASSERT_THAT(w.remove(l.native_handle()), Succeeded());
  }
}

}  // namespace
}  // namespace duplex
