// Non-blocking channels: try_send with its bounded outgoing queue, flush, try_receive, and two
// single-threaded loops pushing 64 MiB at each other at once.
#include <poll.h>
#include <sys/resource.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <deque>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "duplex/channel.hpp"
#include "duplex/process.hpp"
#include "duplex/socket_pair.hpp"
#include "duplex/waiter.hpp"
#include "support.hpp"

namespace duplex {
namespace {

using namespace std::chrono_literals;
using test::HasError;
using test::pattern;
using test::same;
using test::Succeeded;

class nonblocking_test : public test::kind_test {};

INSTANTIATE_TEST_SUITE_P(kinds, nonblocking_test,
                         ::testing::Values(socket_kind::stream, socket_kind::seqpacket),
                         test::kind_name);

// Messages of this size fit a seqpacket packet with default buffers.
constexpr std::size_t chunk = 60000;

TEST_P(nonblocking_test, TrySendQueuesWhatTheKernelDoesNotTakeAndLosesNothing) {
  auto [a, b] = test::must(channel_pair(GetParam(), {.max_queued_bytes = 256 * 1024}));
  int accepted = 0;
  for (;; ++accepted) {
    auto r = a.try_send(pattern(chunk, static_cast<unsigned>(accepted)));
    if (!r) {
      EXPECT_THAT(r, HasError(errc::queue_full));
      break;
    }
    ASSERT_LT(accepted, 10000) << "the queue never filled";
  }
  EXPECT_TRUE(a.wants_write());
  EXPECT_GT(a.queued_bytes(), 0U);
  // Bounded: the queue's limit, plus the one message an empty queue takes whatever its size.
  EXPECT_LE(a.queued_bytes(), 256U * 1024 + chunk + wire::native_header_size);
  // The reader drains; the writer flushes when it may. Everything arrives, in order.
  int received = 0;
  while (received < accepted) {
    auto m = b.try_receive();
    if (m) {
      ASSERT_TRUE(same(m->bytes(), pattern(chunk, static_cast<unsigned>(received)))) << received;
      ++received;
      continue;
    }
    ASSERT_THAT(m, HasError(errc::would_block));
    ASSERT_THAT(a.flush(), Succeeded());
  }
  EXPECT_FALSE(a.wants_write());
  EXPECT_EQ(a.queued_bytes(), 0U);
  EXPECT_THAT(b.try_receive(), HasError(errc::would_block));
}

TEST_P(nonblocking_test, QueuedFdsAreDuplicatesTheCallerMayCloseAtOnce) {
  auto [a, b] = test::must(channel_pair(GetParam(), {.max_queued_bytes = 1 << 20}));
  // Fill the socket so that the next messages must wait in the queue.
  while (a.try_send(pattern(chunk, 1)) && !a.wants_write()) {
  }
  ASSERT_TRUE(a.wants_write());
  const std::size_t before = test::open_fd_count();
  ino_t inode = 0;
  {
    auto [read_end, write_end] = test::make_pipe();
    inode = test::inode_of(read_end.get());
    const std::array<int, 2> fds{read_end.get(), write_end.get()};
    ASSERT_THAT(a.try_send(as_bytes("with fds"), fds), Succeeded());
  }  // the caller's fds are closed here; the queue holds its own copies
  EXPECT_EQ(test::open_fd_count(), before + 2);
  bool found = false;
  while (!found) {
    auto m = b.try_receive();
    if (!m) {
      ASSERT_THAT(m, HasError(errc::would_block));
      ASSERT_THAT(a.flush(), Succeeded());
      continue;
    }
    if (m->text() == "with fds") {
      found = true;
      ASSERT_EQ(m->fds().size(), 2U);
      EXPECT_EQ(test::inode_of(m->fds()[0].get()), inode);
    }
  }
  EXPECT_FALSE(a.wants_write());
}

// Every fd duplex opens on its own is close-on-exec (RELIABILITY class 9): shared-memory pools
// of both ends, a sealed memfd for a payload too big for the pool, the outgoing queue's
// duplicates, a waiter's epoll fd, a child's pidfd, and the ends themselves.
TEST_P(nonblocking_test, EveryFdTheLibraryOpensIsCloseOnExec) {
  const auto before = test::open_fds();
  channel_options o;
  o.max_queued_bytes = 1 << 20;
  o.shared_memory.enabled = true;
  o.shared_memory.pool_size = std::size_t{4} << 20;
  o.shared_memory.receive = shared_receive::view;
  auto [a, b] = test::must(channel_pair(GetParam(), o));
  ASSERT_THAT(a.send(pattern(std::size_t{1} << 20, 1)), Succeeded());  // a's pool
  ASSERT_THAT(b.send(pattern(std::size_t{1} << 20, 2)), Succeeded());  // b's pool
  ASSERT_THAT(a.send(pattern(std::size_t{6} << 20, 3)), Succeeded());  // over the pool: a memfd
  auto m1 = test::must(b.receive());
  auto m2 = test::must(a.receive());
  auto m3 = test::must(b.receive());  // views: they keep what they map
  while (a.try_send(pattern(chunk, 4)) && !a.wants_write()) {
  }
  ASSERT_TRUE(a.wants_write());
  {
    auto [read_end, write_end] = test::make_pipe();
    const std::array<int, 2> fds{read_end.get(), write_end.get()};
    ASSERT_THAT(a.try_send(as_bytes("queued with fds"), fds), Succeeded());
  }  // only the queue's duplicates are left
  auto w = test::must(waiter::create());
  ASSERT_THAT(w.add(a, 1), Succeeded());
  auto c = test::must(spawn({DUPLEX_TEST_CHILD, "exit", "0"}));
  ASSERT_THAT(w.add_exit(c, 2), Succeeded());

  int checked = 0;
  for (const int fd : test::open_fds()) {
    if (std::find(before.begin(), before.end(), fd) != before.end()) continue;
    ++checked;
    std::error_code ec;
    EXPECT_TRUE(test::fd_is_cloexec(fd))
        << "fd " << fd << " ("
        << std::filesystem::read_symlink("/proc/self/fd/" + std::to_string(fd), ec).string()
        << ") is not close-on-exec";
  }
  // The 4 ends, the queue's 2 duplicates, the epoll fd and the pidfd at least.
  EXPECT_GE(checked, 8);
  EXPECT_THAT(c.wait(), Succeeded());
}

TEST_P(nonblocking_test, ABlockingSendWritesTheQueueFirst) {
  auto [a, b] = test::must(channel_pair(GetParam()));
  int queued = 0;
  while (!a.wants_write()) {
    ASSERT_THAT(a.try_send(pattern(chunk, static_cast<unsigned>(queued))), Succeeded());
    ++queued;
  }
  std::thread reader([&b, queued] {
    for (int i = 0; i < queued; ++i) {
      auto m = b.receive(30s);
      ASSERT_THAT(m, Succeeded());
      EXPECT_TRUE(same(m->bytes(), pattern(chunk, static_cast<unsigned>(i)))) << i;
    }
    EXPECT_EQ(b.receive(30s)->text(), "last, and in order");
  });
  ASSERT_THAT(a.send(as_bytes("last, and in order")), Succeeded());
  EXPECT_FALSE(a.wants_write());
  reader.join();
}

TEST_P(nonblocking_test, HalfCloseDeliversTheQueueBeforeTheEnd) {
  auto [a, b] = test::must(channel_pair(GetParam()));
  int queued = 0;
  while (!a.wants_write()) {
    ASSERT_THAT(a.try_send(pattern(chunk, static_cast<unsigned>(queued))), Succeeded());
    ++queued;
  }
  std::thread reader([&b, &queued] {
    int n = 0;
    for (;;) {
      auto m = b.receive(30s);
      if (!m) {
        EXPECT_THAT(m, HasError(errc::peer_closed));
        break;
      }
      ++n;
    }
    EXPECT_EQ(n, queued);
  });
  ASSERT_THAT(a.shutdown_send(), Succeeded());
  reader.join();
}

TEST_P(nonblocking_test, ClosingOrLosingThePeerDropsTheQueueAndItsFds) {
  const std::size_t before = test::open_fd_count();
  {
    auto [a, b] = test::must(channel_pair(GetParam()));
    auto [read_end, write_end] = test::make_pipe();
    const std::array<int, 1> fds{read_end.get()};
    while (!a.wants_write())
      ASSERT_THAT(a.try_send(pattern(chunk, 2), fds), Succeeded());
    b = channel();
    auto r = a.flush();
    EXPECT_THAT(r, HasError(errc::peer_closed));
    EXPECT_FALSE(a.wants_write());
    auto [c, d] = test::must(channel_pair(GetParam()));
    while (!c.wants_write())
      ASSERT_THAT(c.try_send(pattern(chunk, 3), fds), Succeeded());
    c.close();  // queued messages and their fd copies are dropped
  }
  EXPECT_EQ(test::open_fd_count(), before);
}

TEST_P(nonblocking_test, TrySendAndFlushToADeadPeerAreErrorsNotSigpipe) {
  const test::default_sigpipe sigpipe;  // had a write raised it, this process would die
  auto [read_end, write_end] = test::make_pipe();
  const std::array<int, 1> fds{read_end.get()};
  {
    auto [a, b] = test::must(channel_pair(GetParam()));
    b = channel();
    EXPECT_THAT(a.try_send(as_bytes("anyone?")), HasError(errc::peer_closed));
    EXPECT_THAT(a.try_send(as_bytes("with an fd"), fds), HasError(errc::peer_closed));
    EXPECT_FALSE(a.wants_write());
  }
  // A frame partly written and partly queued (on seqpacket, a whole packet queued), then the
  // peer dies: flush, and every later try_send, say so.
  auto [a, b] = test::must(channel_pair(GetParam(), {.max_queued_bytes = 16 << 20}));
  const std::size_t size = GetParam() == socket_kind::stream ? 4 << 20 : chunk;
  while (!a.wants_write())
    ASSERT_THAT(a.try_send(pattern(size, 5), fds), Succeeded());
  if (GetParam() == socket_kind::stream) {
    // One try_send of 4 MiB: the kernel took part of it, the rest waits in the queue.
    EXPECT_GT(a.queued_bytes(), 0U);
    EXPECT_LT(a.queued_bytes(), size + wire::native_header_size);
  }
  ASSERT_THAT(a.flush(), ::testing::Optional(false));  // the socket is still full
  b = channel();
  EXPECT_THAT(a.flush(), HasError(errc::peer_closed));
  EXPECT_FALSE(a.wants_write());
  EXPECT_EQ(a.queued_bytes(), 0U);
  EXPECT_THAT(a.try_send(as_bytes("after"), fds), HasError(errc::peer_closed));
  EXPECT_THAT(a.send(as_bytes("after")), HasError(errc::peer_closed));
}

TEST_P(nonblocking_test, AnFdThatCannotBeSentOrQueuedFailsTheMessageWhole) {
  const socket_kind kind = GetParam();
  const int status = test::run_in_child([kind] {
    auto [a, b] = test::must(channel_pair(kind));
    auto [read_end, write_end] = test::make_pipe();
    const std::array<int, 1> bad{1000};  // not open
    auto r = a.try_send(as_bytes("bad fd, empty queue"), bad);
    if (r || r.error() != std::error_code(EBADF, std::system_category())) return 10;
    while (!a.wants_write()) {
      if (!a.try_send(pattern(chunk, 1))) return 11;
    }
    r = a.try_send(as_bytes("bad fd, queued"), bad);
    if (r || r.error() != std::error_code(EBADF, std::system_category())) return 12;
    // At RLIMIT_NOFILE the queue cannot duplicate a good fd: the message is refused whole.
    int lowest = 0;
    while (test::fd_is_open(lowest))
      ++lowest;
    rlimit old{};
    ::getrlimit(RLIMIT_NOFILE, &old);
    const rlimit full{static_cast<rlim_t>(lowest), old.rlim_max};
    if (::setrlimit(RLIMIT_NOFILE, &full) != 0) return 13;
    const std::array<int, 1> good{read_end.get()};
    r = a.try_send(as_bytes("no room to duplicate"), good);
    ::setrlimit(RLIMIT_NOFILE, &old);
    if (r || r.error() != std::error_code(EMFILE, std::system_category())) return 14;
    // Everything queued still arrives intact, and nothing of the refused messages.
    int received = 0;
    for (;;) {
      auto m = b.try_receive();
      if (!m) {
        if (m.error() != errc::would_block) return 15;
        if (!a.wants_write()) break;
        if (!a.flush()) return 16;
        continue;
      }
      if (m->size() != chunk || !m->fds().empty()) return 17;
      ++received;
    }
    return received > 0 && !a.is_broken() && !b.is_broken() ? 0 : 18;
  });
  EXPECT_EQ(status, 0);
}

TEST_P(nonblocking_test, BufferedBytesSaysWhetherAReceiveNeedsTheSocket) {
  auto [a, b] = test::must(channel_pair(GetParam()));
  EXPECT_EQ(b.buffered_bytes(), 0U);
  ASSERT_THAT(a.send(as_bytes("one")), Succeeded());
  ASSERT_THAT(a.send(as_bytes("two")), Succeeded());
  ASSERT_THAT(b.wait_readable(10s), Succeeded());
  EXPECT_EQ(b.receive()->text(), "one");
  if (GetParam() == socket_kind::stream) {
    EXPECT_GT(b.buffered_bytes(), 0U);  // both frames came in one read
  }
  EXPECT_EQ(b.receive()->text(), "two");
  EXPECT_EQ(b.buffered_bytes(), 0U);
}

TEST_F(nonblocking_test, TrySendSaysWouldBlockWhileAnotherThreadIsSending) {
  auto [a, b] = test::must(channel_pair(socket_kind::stream));
  std::thread sender([&a] { EXPECT_THAT(a.send(pattern(8 << 20, 4)), Succeeded()); });
  // The blocking send holds the channel's send lock until the reader below drains it.
  bool saw_would_block = false;
  for (int i = 0; i < 1000 && !saw_would_block; ++i) {
    auto r = a.try_send(as_bytes("x"));
    if (!r) {
      EXPECT_THAT(r, HasError(errc::would_block));
      saw_would_block = true;
    } else {
      std::this_thread::sleep_for(1ms);
    }
  }
  EXPECT_TRUE(saw_would_block);
  for (;;) {
    auto m = b.receive(30s);
    ASSERT_THAT(m, Succeeded()) << b.error_detail();
    if (m->size() == (8U << 20)) break;
  }
  sender.join();
  while (a.wants_write())
    ASSERT_THAT(a.flush(), Succeeded());
}

TEST_P(nonblocking_test, BusyPollReceivesWhatArrivesDuringAndAfterTheSpin) {
  for (const bool nonblocking_socket : {false, true}) {
    auto pair = test::must(socket_pair(GetParam(), {.non_blocking = nonblocking_socket}));
    channel_options o;
    o.busy_poll = 20ms;
    auto a = test::must(channel::create(std::move(pair.first), o));
    auto b = test::must(channel::create(std::move(pair.second), o));
    for (const auto delay : {1ms, 100ms}) {  // within the spin, and after it gave up
      std::thread sender([&a, delay] {
        std::this_thread::sleep_for(delay);
        EXPECT_THAT(a.send(as_bytes("late")), Succeeded());
      });
      auto m = b.receive();
      sender.join();
      ASSERT_THAT(m, Succeeded());
      EXPECT_EQ(m->text(), "late");
    }
    // A timeout shorter than the spin still ends the call in time.
    const auto start = std::chrono::steady_clock::now();
    EXPECT_THAT(b.receive(5ms), HasError(errc::timed_out));
    EXPECT_LT(std::chrono::steady_clock::now() - start, 10s);
    EXPECT_THAT(b.try_receive(), HasError(errc::would_block));
  }
}

// Two single-threaded event loops, one per end, each sending 64 MiB to the other while
// receiving: neither ever blocks, so neither can deadlock.
TEST_P(nonblocking_test, BothSidesSend64MiBAtOnceFromSingleThreadedLoops) {
  auto [a, b] = test::must(channel_pair(GetParam()));
  constexpr std::size_t total = 64U << 20;
  const std::size_t size = GetParam() == socket_kind::stream ? (1U << 20) : chunk;
  auto loop = [size, total](channel& ch, unsigned seed, unsigned peer_seed) {
    auto w = test::must(waiter::create());
    EXPECT_THAT(w.add(ch, 1, readiness::readable | readiness::writable), Succeeded());
    std::size_t sent = 0;
    std::size_t received = 0;
    std::size_t n_sent = 0;
    std::size_t n_received = 0;
    while (sent < total || received < total || ch.wants_write()) {
      EXPECT_THAT(w.wait(30s), Succeeded());
      while (w.next()) {
      }
      // Send while the channel takes messages.
      if (ch.wants_write()) {
        EXPECT_THAT(ch.flush(), Succeeded());
      }
      while (sent < total && !ch.wants_write()) {
        const std::size_t n = std::min(size, total - sent);
        auto r = ch.try_send(pattern(n, seed + static_cast<unsigned>(n_sent)));
        if (!r) {
          EXPECT_THAT(r, HasError(errc::queue_full));
          break;
        }
        sent += n;
        ++n_sent;
      }
      // Receive everything there is.
      for (;;) {
        auto m = ch.try_receive();
        if (!m) {
          EXPECT_THAT(m, HasError(errc::would_block));
          break;
        }
        const std::size_t n = std::min(size, total - received);
        EXPECT_TRUE(same(m->bytes(), pattern(n, peer_seed + static_cast<unsigned>(n_received))));
        received += m->size();
        ++n_received;
      }
      const readiness want = ch.wants_write() || sent < total
                                 ? readiness::readable | readiness::writable
                                 : readiness::readable;
      EXPECT_THAT(w.modify(ch.native_handle(), want), Succeeded());
    }
    EXPECT_EQ(received, total);
  };
  std::thread other([&] { loop(b, 1000, 0); });
  loop(a, 0, 1000);
  other.join();
}

}  // namespace
}  // namespace duplex
