// Non-blocking channels: try_send with its bounded outgoing queue, flush, try_receive, two
// single-threaded loops pushing 64 MiB at each other at once, and try_send and flush under a
// signal storm, from several threads at once, and racing close().
#include <fcntl.h>
#include <poll.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstring>
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
using test::eventually;
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

// drained(): the last receive call's last read came back short and clean, and nothing is left
// buffered. An edge-triggered loop relies on it to wait for the next edge without trying first,
// so each case where bytes may still wait says false.
TEST_P(nonblocking_test, DrainedSaysTheLastReadFoundTheSocketEmpty) {
  const bool stream = GetParam() == socket_kind::stream;
  auto [a, b] = test::must(channel_pair(GetParam()));
  EXPECT_FALSE(b.drained());
  ASSERT_THAT(a.send(as_bytes("one")), Succeeded());
  ASSERT_THAT(b.wait_readable(10s), Succeeded());
  EXPECT_EQ(b.try_receive()->text(), "one");
  EXPECT_EQ(b.drained(), stream);  // a packet read says nothing of the next
  EXPECT_THAT(b.try_receive(), HasError(errc::would_block));
  EXPECT_FALSE(b.drained());
  // Two frames in one read: the first call leaves the second buffered, the second reads nothing.
  ASSERT_THAT(a.send(as_bytes("two")), Succeeded());
  ASSERT_THAT(a.send(as_bytes("three")), Succeeded());
  EXPECT_EQ(b.receive()->text(), "two");
  EXPECT_FALSE(b.drained());
  EXPECT_EQ(b.receive()->text(), "three");
  EXPECT_FALSE(b.drained());
  // A read that carried fds: the kernel ends a read after their bytes, whatever follows.
  auto [read_end, write_end] = test::make_pipe();
  const std::array<int, 1> fds{read_end.get()};
  ASSERT_THAT(a.send(as_bytes("with an fd"), fds), Succeeded());
  auto with_fd = b.receive();
  ASSERT_THAT(with_fd, Succeeded());
  EXPECT_EQ(with_fd->fds().size(), 1U);
  EXPECT_FALSE(b.drained());
  ASSERT_THAT(a.send(as_bytes("four")), Succeeded());
  EXPECT_EQ(b.receive()->text(), "four");
  EXPECT_EQ(b.drained(), stream);
}

TEST_F(nonblocking_test, DrainedIsFalseAfterAReadThatFilledItsRoom) {
  // A frame exactly the size of the receive buffer, then another: the first read fills the
  // buffer, so the second frame may (and does) still wait in the socket.
  constexpr std::size_t room = 4096;
  auto [a, b] = test::must(channel_pair(socket_kind::stream, {.receive_buffer_size = room}));
  ASSERT_THAT(a.send(pattern(room - 16, 5)), Succeeded());  // header and payload fill the room
  ASSERT_THAT(a.send(as_bytes("tail")), Succeeded());
  auto first = b.receive();
  ASSERT_THAT(first, Succeeded());
  EXPECT_EQ(first->size(), room - 16);
  EXPECT_EQ(b.buffered_bytes(), 0U);
  EXPECT_FALSE(b.drained());
  EXPECT_EQ(b.try_receive()->text(), "tail");
  EXPECT_TRUE(b.drained());
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

// --- try_send and flush under a signal storm (class 4) and from several threads (class 12) ---

// Channels over sockets with the smallest buffers (test::make_buffers_tiny), so that the outgoing
// queue fills at once and stream frames go out in pieces.
connected_channels tiny_buffers(socket_kind kind, channel_options options) {
  auto pair = test::must(socket_pair(kind));
  test::make_buffers_tiny(pair);
  return {test::must(channel::create(std::move(pair.first), options)),
          test::must(channel::create(std::move(pair.second), options))};
}

// The size of message n: on a stream often several times a tiny socket buffer (so the kernel
// takes it in pieces and the rest waits in the queue); on seqpacket what one packet of a tiny
// buffer holds.
std::size_t size_of(socket_kind kind, std::size_t n) {
  return (n * 7919) % (kind == socket_kind::stream ? 20000 : 2000);
}

// What /proc says of thread tid of this process (its "stat" or "syscall" file), or "".
std::string proc_task(pid_t tid, const char* file) {
  const std::string path = "/proc/self/task/" + std::to_string(tid) + "/" + file;
  const unique_fd f(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!f.valid()) return {};
  std::array<char, 512> buf{};
  const ssize_t n = ::read(f.get(), buf.data(), buf.size());
  return {buf.data(), n > 0 ? static_cast<std::size_t>(n) : 0};
}

// True if thread tid of this process is asleep (state S or D), e.g. blocked on a lock.
bool asleep(pid_t tid) {
  const std::string stat = proc_task(tid, "stat");
  const auto end_of_name = stat.rfind(')');
  if (end_of_name == std::string::npos || end_of_name + 2 >= stat.size()) return false;
  const char state = stat[end_of_name + 2];
  return state == 'S' || state == 'D';
}

// True if thread tid of this process is blocked in recv, recvmsg or ppoll: inside a receive
// call, waiting in the kernel, not merely asleep somewhere on its way there.
bool blocked_in_receive(pid_t tid) {
  const std::string syscall = proc_task(tid, "syscall");
  for (const long number : {SYS_recvfrom, SYS_recvmsg, SYS_ppoll}) {
    if (syscall.starts_with(std::to_string(number) + " ")) return true;
  }
  return false;
}

// An event loop's sender under a 10 kHz signal storm (no SA_RESTART), with a queue forced to fill
// again and again: the reader takes two messages only while the sender waits for room, and only
// after a signal more reached it. No EINTR, and no other error, ever reaches the caller of
// try_send, flush or the waiter; every message (every 16th with an fd) arrives byte-exact and in
// order; the queue stays within its bound; and half-closing flushes the rest, blocking, under the
// storm too.
TEST_P(nonblocking_test, TrySendAndFlushRideOutASignalStorm) {
  const socket_kind kind = GetParam();
  constexpr std::size_t limit = 32 * 1024;
  auto [a, b] = tiny_buffers(kind, {.max_queued_bytes = limit});
  auto [read_end, write_end] = test::make_pipe();
  const ino_t inode = test::inode_of(read_end.get());
  const std::array<int, 1> fd{read_end.get()};
  constexpr std::size_t count = 400;
  const auto has_fd = [](std::size_t n) { return n % 16 == 0; };

  std::atomic<bool> sender_waits{false};  // for room, in the waiter
  std::atomic<bool> all_sent{false};      // every try_send done (or the sender gave up)
  std::size_t queue_full = 0;
  std::size_t most_queued = 0;
  bool reader_done = false;
  bool sender_done = false;
  long delivered = 0;
  {
    const test::signal_storm storm;  // 10 kHz at this thread, no SA_RESTART
    std::thread reader([&] {
      [&] {
        long signals_seen = storm.delivered();
        const auto may_read = [&] {
          return (sender_waits.load() || all_sent.load()) && storm.delivered() > signals_seen;
        };
        for (std::size_t n = 0; n < count; ++n) {
          if (n % 2 == 0) {
            ASSERT_TRUE(eventually(may_read)) << "message " << n;
            signals_seen = storm.delivered();
          }
          auto m = b.receive(30s);
          ASSERT_THAT(m, Succeeded()) << "message " << n;
          ASSERT_TRUE(same(m->bytes(), pattern(size_of(kind, n), static_cast<unsigned>(n))))
              << "message " << n;
          ASSERT_EQ(m->fds().size(), has_fd(n) ? 1U : 0U) << "message " << n;
          if (has_fd(n)) {
            EXPECT_EQ(test::inode_of(m->fds()[0].get()), inode) << "message " << n;
          }
        }
        EXPECT_THAT(b.receive(30s), HasError(errc::peer_closed));
        reader_done = true;
      }();
      if (!reader_done) b.close();  // the reader gave up: end the sender's blocking flush
    });
    [&] {
      auto w = test::must(waiter::create());
      ASSERT_THAT(w.add(a, 1, readiness::writable), Succeeded());
      for (std::size_t n = 0; n < count; ++n) {
        const auto bytes = pattern(size_of(kind, n), static_cast<unsigned>(n));
        const auto fds = has_fd(n) ? std::span<const int>(fd) : std::span<const int>();
        for (;;) {
          auto r = a.try_send(bytes, fds);
          if (r) break;
          ASSERT_THAT(r, HasError(errc::queue_full)) << "message " << n;  // EINTR would show here
          ++queue_full;
          sender_waits = true;
          auto ready = w.wait(30s);
          sender_waits = false;
          ASSERT_THAT(ready, Succeeded()) << "message " << n;
          while (w.next()) {
          }
          ASSERT_THAT(a.flush(), Succeeded()) << "message " << n;
        }
        most_queued = std::max(most_queued, a.queued_bytes());
      }
      all_sent = true;
      // What is still queued goes out blocking, interrupted again and again, before the end.
      ASSERT_THAT(a.shutdown_send(), Succeeded());
      EXPECT_FALSE(a.wants_write());
      sender_done = true;
    }();
    all_sent = true;
    if (!sender_done) a.close();  // the sender gave up: end the reader's wait
    reader.join();
    delivered = storm.delivered();
  }
  EXPECT_GT(queue_full, 0U) << "the queue never filled";
  // Bounded: the limit, or the rest of the one frame an empty queue takes whatever its size.
  const std::size_t largest =
      (kind == socket_kind::stream ? 20000 : 2000) + wire::native_header_size;
  EXPECT_LE(most_queued, std::max(limit, largest));
  EXPECT_GT(delivered, 10) << "the storm did not reach the sending thread";
}

// Four threads try_send (and flush when the queue is full or another thread holds the send lock)
// into one channel with tiny socket buffers, while a reader takes eight messages at a time
// whenever a sender waits for room. Each message names its thread and number; every 10th carries
// its thread's pipe. Every message arrives whole and byte-exact with its own fd, each thread's in
// its order, none lost or duplicated.
TEST_P(nonblocking_test, SeveralThreadsTrySendAtOnceAndNothingInterleaves) {
  const socket_kind kind = GetParam();
  auto [a, b] = tiny_buffers(kind, {.max_queued_bytes = 16 * 1024});
  constexpr std::uint32_t threads = 4;
  constexpr std::uint32_t per_thread = 250;
  struct tag {
    std::uint32_t thread;
    std::uint32_t number;
  };
  const auto message_of = [kind](tag t) {
    const unsigned seed = t.thread * 100000 + t.number;
    auto bytes = pattern(sizeof(tag) + size_of(kind, seed), seed);
    std::memcpy(bytes.data(), &t, sizeof t);
    return bytes;
  };
  const auto has_fd = [](std::uint32_t number) { return number % 10 == 3; };
  std::vector<std::pair<unique_fd, unique_fd>> pipes;
  std::vector<ino_t> inodes;
  for (std::uint32_t t = 0; t < threads; ++t) {
    pipes.push_back(test::make_pipe());
    inodes.push_back(test::inode_of(pipes.back().first.get()));
  }
  std::atomic<int> waiting{0};  // senders waiting for room
  std::atomic<std::uint32_t> senders_done{0};
  std::atomic<std::size_t> queue_full{0};
  bool reader_done = false;

  std::thread reader([&] {
    [&] {
      std::vector<std::uint32_t> next(threads, 0);
      for (std::uint32_t n = 0; n < threads * per_thread; ++n) {
        if (n % 8 == 0) {
          ASSERT_TRUE(eventually([&] { return waiting.load() > 0 || senders_done == threads; }));
        }
        auto m = b.receive(30s);
        ASSERT_THAT(m, Succeeded()) << "message " << n;
        tag t{};
        ASSERT_GE(m->size(), sizeof t);
        std::memcpy(&t, m->bytes().data(), sizeof t);
        ASSERT_LT(t.thread, threads) << "message " << n << " is not one that was sent";
        ASSERT_EQ(t.number, next[t.thread]) << "thread " << t.thread << "'s order";
        ++next[t.thread];
        ASSERT_TRUE(same(m->bytes(), message_of(t))) << t.thread << "/" << t.number;
        ASSERT_EQ(m->fds().size(), has_fd(t.number) ? 1U : 0U) << t.thread << "/" << t.number;
        if (has_fd(t.number)) {
          EXPECT_EQ(test::inode_of(m->fds()[0].get()), inodes[t.thread]);
        }
      }
      EXPECT_EQ(next, std::vector<std::uint32_t>(threads, per_thread));
      reader_done = true;
    }();
    if (!reader_done) b.close();  // the reader gave up: end the senders' waits
  });
  std::vector<std::thread> senders;
  for (std::uint32_t t = 0; t < threads; ++t) {
    senders.emplace_back([&, t] {
      const std::array<int, 1> fd{pipes[t].first.get()};
      for (std::uint32_t number = 0; number < per_thread; ++number) {
        const auto bytes = message_of({t, number});
        const auto fds = has_fd(number) ? std::span<const int>(fd) : std::span<const int>();
        for (;;) {
          auto r = a.try_send(bytes, fds);
          if (r) break;
          if (r.error() == errc::queue_full) {
            ++queue_full;
          } else {
            ASSERT_THAT(r, HasError(errc::would_block));  // another thread holds the send lock
          }
          auto flushed = a.flush();  // false if the socket is full or another thread sends
          ASSERT_THAT(flushed, Succeeded());
          if (!*flushed) {
            ++waiting;
            pollfd p{a.native_handle(), POLLOUT, 0};
            ::poll(&p, 1, 10);  // may time out: the next round tries again
            --waiting;
            std::this_thread::yield();
          }
        }
      }
      ++senders_done;
    });
  }
  for (auto& s : senders)
    s.join();
  // The last messages may still be queued: written as the reader makes room.
  while (a.wants_write() && !::testing::Test::HasFatalFailure()) {
    auto flushed = a.flush();
    ASSERT_THAT(flushed, Succeeded());
    if (!*flushed) {
      pollfd p{a.native_handle(), POLLOUT, 0};
      ::poll(&p, 1, 10);
    }
  }
  reader.join();
  EXPECT_FALSE(a.wants_write());
  EXPECT_GT(queue_full.load(), 0U) << "the queue never filled";
}

// close() while one thread loops try_send and another flush on a channel whose queue holds
// messages and fd duplicates, and two more are blocked in receive_batch and receive_into. Every
// call returns a value or errc::closed (never another error, a crash or a hang), later calls
// all say closed, and what the peer received before the close is intact and in order. In half
// the rounds the peer reads during the race (so flushes write), in the other half it never
// reads (so the queue stays full); the close comes after a different number of sender calls in
// each round. fd accounting covers the queued duplicates.
TEST_P(nonblocking_test, CloseWhileOtherThreadsTrySendFlushAndReceive) {
  const socket_kind kind = GetParam();
  auto [read_end, write_end] = test::make_pipe();
  const ino_t inode = test::inode_of(read_end.get());
  const std::array<int, 1> fd{read_end.get()};
  const auto has_fd = [](unsigned n) { return n % 4 == 1; };
  for (int round = 0; round < 20; ++round) {
    SCOPED_TRACE("round " + std::to_string(round));
    const bool peer_reads = round % 2 == 1;
    auto [a, b] = tiny_buffers(kind, {.max_queued_bytes = 16 * 1024});
    unsigned sent = 0;  // messages a took, in order
    while (!a.wants_write()) {
      const auto fds = has_fd(sent) ? std::span<const int>(fd) : std::span<const int>();
      ASSERT_THAT(a.try_send(pattern(size_of(kind, sent), sent), fds), Succeeded());
      ++sent;
    }
    std::atomic<int> sender_calls{0};
    std::atomic<pid_t> batch_tid{0};
    std::atomic<pid_t> into_tid{0};
    std::thread sender([&] {
      for (;;) {
        const auto fds = has_fd(sent) ? std::span<const int>(fd) : std::span<const int>();
        auto r = a.try_send(pattern(size_of(kind, sent), sent), fds);
        ++sender_calls;
        if (r) {
          ++sent;
          continue;
        }
        if (r.error() == errc::closed) break;
        ASSERT_THAT(r, ::testing::AnyOf(HasError(errc::queue_full), HasError(errc::would_block)));
      }
    });
    std::thread flusher([&] {
      for (;;) {
        auto r = a.flush();
        if (!r) {
          EXPECT_THAT(r, HasError(errc::closed));
          break;
        }
      }
    });
    std::thread batch_receiver([&] {
      batch_tid = static_cast<pid_t>(::syscall(SYS_gettid));
      std::size_t got = 0;
      auto r = a.receive_batch([&got](message_view&) { ++got; }, SIZE_MAX, 30s);
      EXPECT_EQ(got, 0U);
      EXPECT_THAT(r, HasError(errc::closed));
    });
    std::thread into_receiver([&] {
      into_tid = static_cast<pid_t>(::syscall(SYS_gettid));
      std::array<std::byte, 64> buf{};
      std::array<unique_fd, 1> fds;
      EXPECT_THAT(a.receive_into(buf, fds, 30s), HasError(errc::closed));
    });
    std::thread peer;
    if (peer_reads) {
      peer = std::thread([&] {
        for (unsigned n = 0;; ++n) {
          auto m = b.receive(30s);
          if (!m) {
            // A frame cut by the close (stream) is reported once, then the end.
            if (m.error() == errc::truncated_message) m = b.receive(30s);
            EXPECT_THAT(m, HasError(errc::peer_closed));
            break;
          }
          ASSERT_TRUE(same(m->bytes(), pattern(size_of(kind, n), n))) << "message " << n;
          ASSERT_EQ(m->fds().size(), has_fd(n) ? 1U : 0U) << "message " << n;
          if (has_fd(n)) {
            EXPECT_EQ(test::inode_of(m->fds()[0].get()), inode) << "message " << n;
          }
        }
      });
    }
    // Both receivers blocked, one in the kernel and the other there too or on the receive
    // lock; the senders busy. (With a receiver inside the channel throughout, no other call can
    // be the last to leave just as close() begins:
    // CallsComingAndGoingDuringCloseNeverUseAReleasedFd below has that case.)
    EXPECT_TRUE(eventually([&] {
      return batch_tid != 0 && into_tid != 0 &&
             ((blocked_in_receive(batch_tid) && asleep(into_tid)) ||
              (blocked_in_receive(into_tid) && asleep(batch_tid))) &&
             sender_calls >= round * 5;
    })) << "receivers in syscalls "
        << proc_task(batch_tid, "syscall") << " and " << proc_task(into_tid, "syscall") << ", "
        << sender_calls << " sender calls";
    a.close();
    sender.join();
    flusher.join();
    batch_receiver.join();
    into_receiver.join();
    if (peer.joinable()) peer.join();
    EXPECT_THAT(a.try_send(as_bytes("after")), HasError(errc::closed));
    EXPECT_THAT(a.flush(), HasError(errc::closed));
    EXPECT_THAT(a.receive_batch([](message_view&) {}, SIZE_MAX, 1s), HasError(errc::closed));
    std::array<std::byte, 64> buf{};
    EXPECT_THAT(a.receive_into(buf, {}, 1s), HasError(errc::closed));
  }
}

// close() from another thread wakes a receive_batch blocked in the kernel, and it returns
// errc::closed, as close() promises and receive and receive_into do.
// On a stream the shutdown that wakes it reads as the end of the stream: the call must still
// say closed, not peer_closed.
TEST_P(nonblocking_test, CloseWakesABlockedReceiveBatchWithClosed) {
  auto [a, b] = test::must(channel_pair(GetParam()));
  std::atomic<pid_t> tid{0};
  std::thread receiver([&] {
    tid = static_cast<pid_t>(::syscall(SYS_gettid));
    EXPECT_THAT(a.receive_batch([](message_view&) {}, SIZE_MAX, 30s), HasError(errc::closed));
  });
  EXPECT_TRUE(eventually([&] { return tid != 0 && blocked_in_receive(tid); }));
  a.close();
  receiver.join();
}

// The same for wait_readable blocked in ppoll: the shutdown makes the socket readable, but the
// wait was ended by close(), so it says closed, not that a receive could go ahead.
TEST_P(nonblocking_test, CloseWakesABlockedWaitReadableWithClosed) {
  auto [a, b] = test::must(channel_pair(GetParam()));
  std::atomic<pid_t> tid{0};
  std::thread waiting([&] {
    tid = static_cast<pid_t>(::syscall(SYS_gettid));
    EXPECT_THAT(a.wait_readable(30s), HasError(errc::closed));
  });
  EXPECT_TRUE(eventually([&] { return tid != 0 && blocked_in_receive(tid); }));
  a.close();
  waiting.join();
  EXPECT_THAT(a.wait_readable(0s), HasError(errc::closed));
}

// close() while other threads' calls come and go, none of them blocked inside. Found by
// ThreadSanitizer in an early version of CloseWhileOtherThreadsTrySendFlushAndReceive: when the
// closed flag and the count of calls inside were two atomics, a call leaving as the last one
// could see another thread's close() and release the fd while a call that had entered in between
// (and found the channel open) went on to use it, or while close() shut it down; such a call
// could act on a reused fd number. Under the tsan preset this reported a data race between
// unique_fd::reset (from release_fd) and recvmsg or socket::shutdown in most runs.
TEST_P(nonblocking_test, CallsComingAndGoingDuringCloseNeverUseAReleasedFd) {
  for (int round = 0; round < 200; ++round) {
    auto [a, b] = test::must(channel_pair(GetParam()));
    std::atomic<int> calls{0};
    std::thread flusher([&] {
      while (a.flush())
        ++calls;
    });
    std::thread receiver([&] {
      for (;;) {
        auto m = a.try_receive();
        ++calls;
        if (!m && m.error() == errc::closed) break;
        EXPECT_THAT(m, HasError(errc::would_block));
      }
    });
    EXPECT_TRUE(eventually([&] { return calls > round % 50; }));
    a.close();
    flusher.join();
    receiver.join();
    EXPECT_THAT(a.flush(), HasError(errc::closed));
  }
}

}  // namespace
}  // namespace duplex
