// ring_channel: messages through shared-memory rings. Round trips and wrap-around, full and empty
// rings with and without spinning, limits, timeouts, close and peer death (threads and real
// processes), a signal storm, concurrent senders, and hostile peers: bad handshakes, and rings
// whose positions and lengths are written by hand.
#include "duplex/ring.hpp"

#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <csignal>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "duplex/socket_pair.hpp"
#include "support.hpp"

namespace duplex {
namespace {

using namespace std::chrono_literals;
using test::HasError;
using test::must;
using test::pattern;
using test::same;
using test::Succeeded;

class ring_test : public test::process_checked {};

ring_options small_ring(std::chrono::nanoseconds spin = 0ns) {
  ring_options o;
  o.capacity = 4096;
  o.max_message_size = 2048;
  o.busy_poll = spin;
  return o;
}

// A message that says which it is: 4 bytes of sequence number, then a pattern of its size.
std::vector<std::byte> numbered(std::uint32_t i, std::size_t size) {
  auto v = pattern(std::max<std::size_t>(size, 4), i);
  std::memcpy(v.data(), &i, 4);
  v.resize(std::max<std::size_t>(size, 4));
  return v;
}

TEST_F(ring_test, MessagesOfEverySizeArriveWholeInOrderBothWays) {
  auto [a, b] = must(ring_channel_pair());
  EXPECT_EQ(a.max_send_size(), std::size_t{64} << 10);
  const std::vector<std::size_t> sizes{0, 1, 7, 8, 9, 63, 64, 65, 4095, 4096, 65535, 65536};
  for (const auto n : sizes) {
    const auto data = pattern(n, static_cast<unsigned>(n));
    ASSERT_THAT(a.send(data), Succeeded()) << n;
    ASSERT_THAT(b.send(data), Succeeded()) << n;
  }
  for (const auto n : sizes) {
    const auto data = pattern(n, static_cast<unsigned>(n));
    auto m = b.receive(10s);
    ASSERT_THAT(m, Succeeded()) << n;
    EXPECT_TRUE(same(std::as_const(*m).bytes(), data)) << n;
    auto back = a.receive(10s);
    ASSERT_THAT(back, Succeeded()) << n;
    EXPECT_TRUE(same(std::as_const(*back).bytes(), data)) << n;
  }
  EXPECT_THAT(a.try_receive(), HasError(errc::would_block));
  EXPECT_THAT(b.try_receive(), HasError(errc::would_block));
}

TEST_F(ring_test, PiecesAreGatheredIntoOneMessage) {
  auto [a, b] = must(ring_channel_pair());
  const std::array<const_buffer, 3> pieces{as_bytes("he"), as_bytes(""), as_bytes("llo")};
  ASSERT_THAT(a.send(pieces), Succeeded());
  EXPECT_EQ(must(b.receive(10s)).text(), "hello");
}

// A 4 KiB ring and 20,000 messages of 0 to 2,000 bytes from another thread: the ring wraps
// thousands of times, the sender waits for room and the receiver for data, sleeping (no spin)
// and spinning.
TEST_F(ring_test, SmallRingWrapsAndBothSidesWaitWithoutLosingAnything) {
  for (const auto spin : {0ns, std::chrono::nanoseconds(200us)}) {
    auto [a, b] = must(ring_channel_pair(small_ring(spin)));
    constexpr std::uint32_t count = 20000;
    std::thread sender([&a] {
      for (std::uint32_t i = 0; i < count; ++i) {
        const auto data = numbered(i, (i * 7919) % 2001);
        if (!a.send(data, 10s)) return;
      }
    });
    std::vector<std::byte> buf(2048);
    for (std::uint32_t i = 0; i < count; ++i) {
      const auto expected = numbered(i, (i * 7919) % 2001);
      auto n = b.receive_into(buf, 10s);
      ASSERT_THAT(n, Succeeded()) << i;
      ASSERT_EQ(n->fds, 0U) << i;
      ASSERT_TRUE(same(std::span(buf).first(n->size), expected)) << i;
    }
    sender.join();
    EXPECT_THAT(b.try_receive(), HasError(errc::would_block));
  }
}

TEST_F(ring_test, ConcurrentSendersTakeTurnsAndEachKeepsItsOrder) {
  auto [a, b] = must(ring_channel_pair(small_ring()));
  constexpr std::uint32_t per_thread = 2000;
  std::vector<std::thread> senders;
  for (std::uint32_t t = 0; t < 4; ++t) {
    senders.emplace_back([&a, t] {
      for (std::uint32_t i = 0; i < per_thread; ++i) {
        const std::array<std::uint32_t, 2> v{t, i};
        if (!a.send(as_bytes(std::string_view(reinterpret_cast<const char*>(v.data()), 8)), 10s))
          return;
      }
    });
  }
  std::array<std::uint32_t, 4> next{};
  for (std::uint32_t k = 0; k < 4 * per_thread; ++k) {
    auto m = b.receive(10s);
    ASSERT_THAT(m, Succeeded()) << k;
    ASSERT_EQ(m->size(), 8U);
    std::array<std::uint32_t, 2> v{};
    std::memcpy(v.data(), std::as_const(*m).bytes().data(), 8);
    ASSERT_LT(v[0], 4U);
    EXPECT_EQ(v[1], next[v[0]]++) << "thread " << v[0];
  }
  for (auto& t : senders)
    t.join();
}

TEST_F(ring_test, LimitsAndTimeouts) {
  auto [a, b] = must(ring_channel_pair(small_ring()));
  EXPECT_EQ(a.max_send_size(), 2048U);
  // Over the receiver's limit: refused, nothing sent, the next message intact.
  EXPECT_THAT(a.send(pattern(2049)), HasError(errc::message_too_large));
  ASSERT_THAT(a.send(as_bytes("next")), Succeeded());
  EXPECT_EQ(must(b.receive(10s)).text(), "next");
  // Empty: would_block now, timed_out after a while.
  EXPECT_THAT(b.try_receive(), HasError(errc::would_block));
  EXPECT_THAT(b.receive(20ms), HasError(errc::timed_out));
  std::vector<std::byte> buf(16);
  EXPECT_THAT(b.receive_into(buf, 0ns), HasError(errc::timed_out));
  // Full: 2,048-byte messages take 2,056 bytes of 4,096, so one fits.
  ASSERT_THAT(a.try_send(pattern(2048)), Succeeded());
  EXPECT_THAT(a.try_send(pattern(2048)), HasError(errc::would_block));
  EXPECT_THAT(a.send(pattern(2048), 20ms), HasError(errc::timed_out));
  // A buffer too small leaves the message where it is.
  EXPECT_THAT(b.receive_into(buf, 10s), HasError(errc::buffer_too_small));
  std::vector<std::byte> big(4096);
  auto info = b.receive_into(big, 10s);
  ASSERT_THAT(info, Succeeded());
  EXPECT_EQ(info->size, 2048U);  // the message's size, not the buffer's
  EXPECT_EQ(info->fds, 0U);
  EXPECT_TRUE(same(std::span(big).first(2048), pattern(2048)));
}

// ring_channel_pair gives its ends as a named struct, like channel_pair; both are open and
// unbroken, and connected to each other.
TEST_F(ring_test, PairGivesConnectedRingsOpenAndUnbroken) {
  result<connected_rings> ends = ring_channel_pair(small_ring());
  ASSERT_THAT(ends, Succeeded());
  ring_channel& first = ends->first;
  ring_channel& second = ends->second;
  for (ring_channel* end : {&first, &second}) {
    EXPECT_TRUE(end->is_open());
    EXPECT_FALSE(end->is_broken());
    EXPECT_GE(end->native_handle(), 0);
  }
  ASSERT_THAT(first.send(as_bytes("to second")), Succeeded());
  EXPECT_EQ(must(second.receive(10s)).text(), "to second");
  ASSERT_THAT(second.send(as_bytes("to first")), Succeeded());
  EXPECT_EQ(must(first.receive(10s)).text(), "to first");
  // A moved-from end is neither open nor broken, and refuses every call with errc::closed.
  ring_channel moved = std::move(first);
  EXPECT_TRUE(moved.is_open());
  EXPECT_FALSE(first.is_open());  // NOLINT(bugprone-use-after-move): testing it
  EXPECT_FALSE(first.is_broken());
  EXPECT_THAT(first.send(as_bytes("x")), HasError(errc::closed));
  // A peer that closes breaks nothing.
  moved.close();
  EXPECT_FALSE(moved.is_open());
  EXPECT_THAT(second.receive(10s), HasError(errc::peer_closed));
  EXPECT_FALSE(second.is_broken());
}

TEST_F(ring_test, OptionsOutOfRangeAreRefused) {
  for (const auto& change : std::vector<std::function<void(ring_options&)>>{
           [](ring_options& o) { o.capacity = 5000; },
           [](ring_options& o) { o.capacity = 2048; },
           [](ring_options& o) { o.capacity = std::size_t{2} << 30; },
           [](ring_options& o) { o.max_message_size = o.capacity - 7; },
           [](ring_options& o) { o.max_message_size = 0; },
           [](ring_options& o) { o.max_peer_capacity = 4095; },
           [](ring_options& o) { o.busy_poll = -1ns; },
           [](ring_options& o) { o.busy_poll = max_busy_poll + 1ns; },
           [](ring_options& o) { o.busy_poll = std::chrono::nanoseconds::max(); },
           [](ring_options& o) { o.handshake_timeout = -1ns; },
       }) {
    ring_options o;
    change(o);
    EXPECT_THAT(ring_channel_pair(o), HasError(std::error_code(EINVAL, std::system_category())));
  }
  // create() refuses before it sends anything, and closes the socket it was given.
  {
    auto ends = must(socket_pair(socket_kind::stream));
    const int fd = ends.first.native_handle();
    EXPECT_THAT(ring_channel::create(std::move(ends.first), {.busy_poll = max_busy_poll + 1ns}),
                HasError(std::error_code(EINVAL, std::system_category())));
    EXPECT_EQ(::fcntl(fd, F_GETFD), -1);
    std::byte b{};
    EXPECT_EQ(::recv(ends.second.native_handle(), &b, 1, MSG_DONTWAIT), 0);  // end of stream
  }
  // Each bound itself is accepted, and a spin of max_busy_poll ends at a receive's timeout.
  {
    ring_options edge;
    edge.capacity = 4096;
    edge.max_message_size = 1;
    edge.max_peer_capacity = 4096;
    edge.busy_poll = max_busy_poll;
    edge.handshake_timeout = std::chrono::nanoseconds::max();
    auto [a, b] = must(ring_channel_pair(edge));
    ASSERT_THAT(a.send(as_bytes("x"), 10s), Succeeded());
    EXPECT_EQ(must(b.receive(10s)).text(), "x");
    EXPECT_THAT(b.receive(20ms), HasError(errc::timed_out));
    EXPECT_THAT(a.send(as_bytes("xy"), 10s), HasError(errc::message_too_large));
  }
  auto pair = must(socket_pair(socket_kind::datagram));
  EXPECT_THAT(ring_channel::create(std::move(pair.first)), HasError(errc::wrong_kind));
  ring_channel none;
  EXPECT_THAT(none.send(as_bytes("x")), HasError(errc::closed));
  EXPECT_THAT(none.receive(), HasError(errc::closed));
  EXPECT_FALSE(none.is_open());
  EXPECT_FALSE(none.is_broken());
  EXPECT_EQ(none.native_handle(), -1);
}

TEST_F(ring_test, EverythingSentBeforeCloseArrivesThenPeerClosed) {
  for (const bool destroy : {false, true}) {
    auto [a, b] = must(ring_channel_pair());
    for (int i = 0; i < 3; ++i)
      ASSERT_THAT(a.send(numbered(static_cast<std::uint32_t>(i), 100)), Succeeded());
    if (destroy) {
      a = ring_channel();
    } else {
      a.close();
      EXPECT_FALSE(a.is_open());
      EXPECT_THAT(a.send(as_bytes("late")), HasError(errc::closed));
      EXPECT_THAT(a.receive(), HasError(errc::closed));
    }
    for (int i = 0; i < 3; ++i) {
      auto m = b.receive(10s);
      ASSERT_THAT(m, Succeeded()) << i;
      EXPECT_TRUE(same(std::as_const(*m).bytes(), numbered(static_cast<std::uint32_t>(i), 100)));
    }
    EXPECT_THAT(b.receive(10s), HasError(errc::peer_closed));
    EXPECT_THAT(b.try_receive(), HasError(errc::peer_closed));
    EXPECT_THAT(b.send(as_bytes("to nobody"), 10s), HasError(errc::peer_closed));
  }
}

TEST_F(ring_test, CloseWakesCallsWaitingOnThisEnd) {
  for (const auto spin : {0ns, std::chrono::nanoseconds(1ms)}) {
    auto [a, b] = must(ring_channel_pair(small_ring(spin)));
    ASSERT_THAT(a.send(pattern(2048)), Succeeded());  // a's ring to b is now full
    std::atomic<int> waiting{0};
    std::thread receiver([&] {
      ++waiting;
      EXPECT_THAT(a.receive(), HasError(errc::closed));
    });
    std::thread sender([&] {
      ++waiting;
      EXPECT_THAT(a.send(pattern(2048)), HasError(errc::closed));
    });
    ASSERT_TRUE(test::eventually([&] { return waiting == 2; }));
    std::this_thread::sleep_for(5ms);  // let them block (either way the result is the same)
    a.close();
    receiver.join();
    sender.join();
  }
}

// A sleeping receiver keeps its wait through 10 kHz of signals (no EINTR surfaces).
TEST_F(ring_test, SignalStormSurfacesNoEintr) {
  auto [a, b] = must(ring_channel_pair(small_ring()));
  constexpr std::uint32_t count = 3000;
  std::thread sender([&a] {
    for (std::uint32_t i = 0; i < count; ++i) {
      if (!a.send(numbered(i, 1500), 10s)) return;
      if (i % 100 == 0) std::this_thread::sleep_for(1ms);  // the receiver sleeps meanwhile
    }
  });
  {
    test::signal_storm storm;
    for (std::uint32_t i = 0; i < count; ++i) {
      auto m = b.receive(10s);
      ASSERT_THAT(m, Succeeded()) << i;
      ASSERT_TRUE(same(std::as_const(*m).bytes(), numbered(i, 1500))) << i;
    }
    EXPECT_GT(storm.delivered(), 0);
  }
  sender.join();
}

// --- processes ----------------------------------------------------------------------------------

// A forked child that sets up its end on pair.second and runs fn; the parent keeps pair.first
// (and closes its copy of pair.second), the child closes its copy of pair.first. Reaped by the
// caller.
template <typename F>
pid_t child_with_ring(connected_pair& pair, const ring_options& o, F fn) {
  std::fflush(nullptr);
  const pid_t pid = ::fork();
  if (pid != 0) {
    pair.second.close();
    return pid;
  }
  pair.first.close();
  auto ch = ring_channel::create(std::move(pair.second), o);
  ::_exit(ch ? fn(*ch) : 90);
}

// Reads one byte from fd, waiting at most 10 s; false if none came.
bool await_byte(int fd) {
  pollfd p{fd, POLLIN, 0};
  char c = 0;
  return ::poll(&p, 1, 10000) == 1 && ::read(fd, &c, 1) == 1;
}

// Class: local resource exhaustion. The peer's hello (three fds) arrives when this process can
// take only one more fd (RLIMIT_NOFILE): create() says fds_truncated, a local error that does
// not blame the peer, and closes the fd that did arrive. The child lowers its limit only once its
// own hello has gone, so its half of the handshake is whole.
TEST_F(ring_test, AHelloCutShortAtRlimitNofileIsFdsTruncatedAndLeaksNothing) {
  auto pair = must(socket_pair(socket_kind::stream));
  auto [lower_read, lower_write] = test::make_pipe();
  auto [lowered_read, lowered_write] = test::make_pipe();
  std::fflush(nullptr);
  const pid_t pid = ::fork();
  if (pid == 0) {
    pair.first.close();
    lower_write.reset();
    lowered_read.reset();
    const int sock = pair.second.native_handle();
    auto before = test::open_fds();
    std::erase(before, sock);                 // create() takes the socket, and closes it on error
    std::erase(before, lowered_write.get());  // closed below
    rlimit old{};
    ::getrlimit(RLIMIT_NOFILE, &old);
    result<ring_channel> made = fail(errc::closed);
    std::thread t([&] {
      made = ring_channel::create(std::move(pair.second), small_ring());
      // Raised again at once: what runs after (a sanitizer's checks too) may need fds.
      ::setrlimit(RLIMIT_NOFILE, &old);
    });
    // This end's hello has reached the parent, and its offer has closed what it sent: only
    // the socket and the two wake sockets it sleeps on remain (with lowered_write).
    bool ok = await_byte(lower_read.get()) &&
              test::eventually([&] { return test::open_fd_count() == before.size() + 4; });
    if (ok) {
      int lowest = 0;
      while (test::fd_is_open(lowest))
        ++lowest;
      rlimit tight = old;
      tight.rlim_cur = static_cast<rlim_t>(lowest) + 1;  // one fd more, of the hello's three
      ok = ::setrlimit(RLIMIT_NOFILE, &tight) == 0 && ::write(lowered_write.get(), "l", 1) == 1;
    }
    lowered_write.reset();  // the parent goes on either way
    t.join();
    ::setrlimit(RLIMIT_NOFILE, &old);
    if (!ok) ::_exit(1);
    if (made) ::_exit(2);
    if (made.error() != errc::fds_truncated) ::_exit(3);
    ::_exit(test::open_fds() == before ? 0 : 4);
  }
  pair.second.close();
  lower_read.reset();
  lowered_write.reset();
  pollfd p{pair.first.native_handle(), POLLIN, 0};
  ASSERT_EQ(::poll(&p, 1, 10000), 1);  // the child's hello
  ASSERT_EQ(::write(lower_write.get(), "l", 1), 1);
  EXPECT_TRUE(await_byte(lowered_read.get()));
  auto parent = ring_channel::create(std::move(pair.first), small_ring());
  const int status = test::reap(pid);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status;
  // The child's end went with its error: this end's half of the handshake completed, and then
  // it sees the peer gone.
  ASSERT_THAT(parent, Succeeded());
  EXPECT_THAT(parent->receive(10s), HasError(errc::peer_closed));
}

TEST_F(ring_test, ChildProcessEchoesWithSpinningEnds) {
  auto pair = must(socket_pair(socket_kind::stream));
  const auto o = small_ring(std::chrono::nanoseconds(1ms));
  const pid_t pid = child_with_ring(pair, o, [](ring_channel& ch) {
    for (;;) {
      auto m = ch.receive();
      if (!m) return m.error() == errc::peer_closed ? 0 : 1;
      if (!ch.send(std::as_const(*m).bytes())) return 2;
    }
  });
  {
    auto ch = must(ring_channel::create(std::move(pair.first), o));
    for (std::uint32_t i = 0; i < 5000; ++i) {
      const auto data = numbered(i, i % 2000);
      ASSERT_THAT(ch.send(data, 10s), Succeeded()) << i;
      auto m = ch.receive(10s);
      ASSERT_THAT(m, Succeeded()) << i;
      ASSERT_TRUE(same(std::as_const(*m).bytes(), data)) << i;
    }
  }
  const int status = test::reap(pid);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status;
}

// A child that publishes messages and dies by SIGKILL, never closing: every message arrives,
// then peer_closed; a child killed while this end waits for room gives peer_closed too.
TEST_F(ring_test, PeerKilledDeliversWhatItSentThenPeerClosed) {
  auto pair = must(socket_pair(socket_kind::seqpacket));
  const pid_t pid = child_with_ring(pair, small_ring(), [](ring_channel& ch) {
    for (std::uint32_t i = 0; i < 3; ++i)
      if (!ch.send(numbered(i, 1000))) return 1;
    ::raise(SIGKILL);
    return 2;
  });
  auto ch = must(ring_channel::create(std::move(pair.first), small_ring()));
  for (std::uint32_t i = 0; i < 3; ++i) {
    auto m = ch.receive(10s);
    ASSERT_THAT(m, Succeeded()) << i;
    EXPECT_TRUE(same(std::as_const(*m).bytes(), numbered(i, 1000)));
  }
  EXPECT_THAT(ch.receive(10s), HasError(errc::peer_closed));
  const int status = test::reap(pid);
  EXPECT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL) << status;

  auto pair2 = must(socket_pair(socket_kind::stream));
  const pid_t pid2 = child_with_ring(pair2, small_ring(), [](ring_channel&) {
    ::pause();  // never reads
    return 0;
  });
  auto ch2 = must(ring_channel::create(std::move(pair2.first), small_ring()));
  ASSERT_THAT(ch2.send(pattern(2048)), Succeeded());
  std::thread killer([pid2] {
    std::this_thread::sleep_for(20ms);
    ::kill(pid2, SIGKILL);
  });
  EXPECT_THAT(ch2.send(pattern(2048), 10s), HasError(errc::peer_closed));
  killer.join();
  static_cast<void>(test::reap(pid2));
}

// --- hostile peers ------------------------------------------------------------------------------

// The handshake as the peer sends it (docs/protocol.md).
struct hello {
  std::uint64_t magic = 0x31474e4952585044;
  std::uint32_t version = 2;
  std::uint32_t flags = 0;
  std::uint64_t capacity = 4096;
  std::uint64_t max_message_size = 2048;
  std::uint64_t reserved = 0;
};

unique_fd sealed_memfd(std::size_t size, bool seal = true) {
  unique_fd fd(::memfd_create("hostile", MFD_CLOEXEC | MFD_ALLOW_SEALING));
  if (!fd.valid() || ::ftruncate(fd.get(), static_cast<off_t>(size)) != 0) std::abort();
  if (seal && ::fcntl(fd.get(), F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW) != 0) std::abort();
  return fd;
}

unique_fd an_eventfd() { return unique_fd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)); }

// A wake socket pair as an end makes it (docs/protocol.md): it keeps .first, the peer gets
// .second.
std::pair<unique_fd, unique_fd> wake_pair(int type = SOCK_SEQPACKET) {
  std::array<int, 2> sv{};
  if (::socketpair(AF_UNIX, type | SOCK_CLOEXEC, 0, sv.data()) != 0) std::abort();
  return {unique_fd(sv[0]), unique_fd(sv[1])};
}

// Sends a hello and fds on s, then sets up the other end and returns what create() said.
result<ring_channel> create_against(socket& s, socket victim, const hello& h,
                                    std::span<const int> fds) {
  const std::array<const_buffer, 1> parts{
      const_buffer(reinterpret_cast<const std::byte*>(&h), sizeof h)};
  if (!s.send_msg(parts, fds)) std::abort();
  ring_options o = small_ring();
  o.handshake_timeout = 2s;
  return ring_channel::create(std::move(victim), o);
}

TEST_F(ring_test, BadHandshakesAreRefusedAndLeakNothing) {
  struct bad {
    const char* what;
    std::function<void(hello&)> edit;
    int fds;        // how many of memfd, bell, bell to attach
    bool unsealed;  // the memfd is not sealed
    std::size_t memfd_size;
    const char* bell;  // what the first bell is: "wake", "eventfd", "pipe", "stream", "unconnected"
  };
  const std::vector<bad> cases{
      {"wrong magic", [](hello& h) { h.magic ^= 1; }, 3, false, 8192, "wake"},
      {"version 1", [](hello& h) { h.version = 1; }, 3, false, 8192, "wake"},
      {"wrong version", [](hello& h) { h.version = 3; }, 3, false, 8192, "wake"},
      {"capacity not a power of two", [](hello& h) { h.capacity = 6144; }, 3, false, 10240, "wake"},
      {"capacity over the limit", [](hello& h) { h.capacity = std::uint64_t{128} << 20; }, 3, false,
       8192, "wake"},
      {"no fds", [](hello&) {}, 0, false, 8192, "wake"},
      {"two fds", [](hello&) {}, 2, false, 8192, "wake"},
      {"unsealed memfd", [](hello&) {}, 3, true, 8192, "wake"},
      {"memfd of the wrong size", [](hello&) {}, 3, false, 4096, "wake"},
      {"an eventfd for a bell", [](hello&) {}, 3, false, 8192, "eventfd"},
      {"a pipe for a bell", [](hello&) {}, 3, false, 8192, "pipe"},
      {"a stream socket for a bell", [](hello&) {}, 3, false, 8192, "stream"},
      {"an unconnected socket for a bell", [](hello&) {}, 3, false, 8192, "unconnected"},
  };
  for (const auto& c : cases) {
    auto pair = must(socket_pair(socket_kind::stream));
    hello h;
    c.edit(h);
    auto memfd = sealed_memfd(c.memfd_size, !c.unsealed);
    auto bell = wake_pair();
    auto eventfd = an_eventfd();
    auto pipe = test::make_pipe();
    auto stream = wake_pair(SOCK_STREAM);
    const unique_fd unconnected(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
    const std::string_view kind = c.bell;
    const int first_bell = kind == "eventfd"       ? eventfd.get()
                           : kind == "pipe"        ? pipe.second.get()
                           : kind == "stream"      ? stream.second.get()
                           : kind == "unconnected" ? unconnected.get()
                                                   : bell.second.get();
    const std::array<int, 3> all{memfd.get(), first_bell, bell.second.get()};
    auto got = create_against(pair.second, std::move(pair.first), h,
                              std::span<const int>(all).first(static_cast<std::size_t>(c.fds)));
    EXPECT_THAT(got, HasError(errc::protocol_error)) << c.what;
  }
  // A peer that closes before its hello, and one that says nothing.
  {
    auto pair = must(socket_pair(socket_kind::stream));
    pair.second.close();
    EXPECT_THAT(ring_channel::create(std::move(pair.first)), HasError(errc::peer_closed));
  }
  {
    auto pair = must(socket_pair(socket_kind::stream));
    ring_options o;
    o.handshake_timeout = 20ms;
    EXPECT_THAT(ring_channel::create(std::move(pair.first), o), HasError(errc::timed_out));
  }
}

// A peer that completes the handshake by hand and then writes the victim's ring itself.
class hand_peer {
 public:
  explicit hand_peer(std::uint64_t capacity = 4096)
      : pair_(must(socket_pair(socket_kind::stream))),
        memfd_(sealed_memfd(4096 + capacity)),
        data_bell_(wake_pair()),
        room_bell_(wake_pair()),
        own_(map(memfd_.get(), 4096 + capacity)),
        own_size_(4096 + capacity) {
    hello h;
    h.capacity = capacity;
    const std::array<int, 3> fds{memfd_.get(), data_bell_.second.get(), room_bell_.second.get()};
    victim_ = must(create_against(pair_.second, std::move(pair_.first), h, fds));
    // The victim's hello: 40 bytes and its three fds.
    hello theirs;
    std::array<unique_fd, 3> got;
    const std::array<mutable_buffer, 1> into{
        mutable_buffer(reinterpret_cast<std::byte*>(&theirs), sizeof theirs)};
    const auto r = must(pair_.second.receive_msg(into, got));
    if (r.bytes != sizeof theirs || r.fds != 3) std::abort();
    victim_size_ = 4096 + theirs.capacity;
    victims_ = map(got[0].get(), victim_size_);
    theirs_ = {std::move(got[1]), std::move(got[2])};
  }
  ~hand_peer() {
    ::munmap(own_, own_size_);
    ::munmap(victims_, victim_size_);
  }
  hand_peer(const hand_peer&) = delete;
  hand_peer& operator=(const hand_peer&) = delete;

  ring_channel& victim() { return victim_; }
  // The victim's ring: the one this peer writes (tail at 128, data from 4096).
  void set_victim_tail(std::uint64_t t) { std::memcpy(victims_ + 128, &t, 8); }
  void write_victim_data(std::size_t at, const void* p, std::size_t n) {
    std::memcpy(victims_ + 4096 + at, p, n);
  }
  // This peer's own ring, which the victim writes: its head (at 64) is this peer's to move.
  void set_own_head(std::uint64_t h) { std::memcpy(own_ + 64, &h, 8); }

  // Closes the victim's wake sockets (this peer holds the only other ends): nothing can wake the
  // victim any more.
  void close_victims_bells() {
    theirs_[0].reset();
    theirs_[1].reset();
  }

  // Tries to make the victim block: brings every eventfd it shares with the victim to one short
  // of overflowing (a blocking write of 1 then waits for a read that never comes), fills every
  // socket it can send on, clears O_NONBLOCK on all of them, and sets the flags that make the
  // victim wake it: this peer's receiver asleep, its sender waiting for room.
  void wedge() {
    for (const int fd : shared_fds()) {
      if (fd_target(fd) == "anon_inode:[eventfd]") {
        std::uint64_t drained = 0;
        static_cast<void>(::read(fd, &drained, sizeof drained));
        const std::uint64_t most = 0xfffffffffffffffe;
        if (::write(fd, &most, sizeof most) != sizeof most) std::abort();
      } else if (fd_target(fd).starts_with("socket:")) {
        const char b = 'w';
        while (::send(fd, &b, 1, MSG_DONTWAIT | MSG_NOSIGNAL) == 1) {
        }
      }
      const int fl = ::fcntl(fd, F_GETFL);
      if (fl < 0 || ::fcntl(fd, F_SETFL, fl & ~O_NONBLOCK) != 0) std::abort();
    }
    const std::uint32_t one = 1;
    std::memcpy(own_ + 192, &one, 4);      // reader_sleeping of the ring the victim writes
    std::memcpy(victims_ + 256, &one, 4);  // writer_waiting of the ring the victim reads
  }

 private:
  // The fds this peer holds whose files the victim holds too, the rings' memfds aside.
  std::vector<int> shared_fds() const {
    return {data_bell_.second.get(), room_bell_.second.get(), theirs_[0].get(), theirs_[1].get()};
  }
  static std::byte* map(int fd, std::size_t size) {
    void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) std::abort();
    return static_cast<std::byte*>(p);
  }
  static std::string fd_target(int fd) {
    std::array<char, 128> target{};
    const auto path = "/proc/self/fd/" + std::to_string(fd);
    const ssize_t n = ::readlink(path.c_str(), target.data(), target.size());
    return n < 0 ? std::string() : std::string(target.data(), static_cast<std::size_t>(n));
  }

  connected_pair pair_;
  unique_fd memfd_;
  std::pair<unique_fd, unique_fd> data_bell_, room_bell_;  // this peer's wake sockets, both ends
  std::array<unique_fd, 2> theirs_;                        // the victim's, as it sent them
  std::byte* own_;
  std::size_t own_size_;
  ring_channel victim_;
  std::byte* victims_ = nullptr;
  std::size_t victim_size_ = 0;
};

TEST_F(ring_test, HandWrittenRingIsReadWhenWellFormed) {
  hand_peer peer;
  const std::array<std::uint32_t, 2> header{5, 0};
  peer.write_victim_data(0, header.data(), 8);
  peer.write_victim_data(8, "hello", 5);
  peer.set_victim_tail(16);
  EXPECT_EQ(must(peer.victim().receive(10s)).text(), "hello");
  EXPECT_THAT(peer.victim().try_receive(), HasError(errc::would_block));
}

TEST_F(ring_test, BrokenPositionsAndLengthsBreakTheRing) {
  struct bad {
    const char* what;
    std::uint64_t tail;
    std::uint32_t length;
    std::uint32_t pad;
  };
  const std::vector<bad> cases{
      {"tail not a multiple of 8", 13, 5, 0},
      {"tail past the capacity", 8192, 5, 0},
      {"tail behind the head", ~std::uint64_t{0} - 7, 5, 0},
      {"length over the maximum", 4096, 3000, 0},
      {"length past the tail", 16, 9, 0},
      {"reserved bytes set", 16, 5, 1},
  };
  for (const auto& c : cases) {
    hand_peer peer;
    const std::array<std::uint32_t, 2> header{c.length, c.pad};
    peer.write_victim_data(0, header.data(), 8);
    peer.set_victim_tail(c.tail);
    EXPECT_FALSE(peer.victim().is_broken()) << c.what;
    EXPECT_THAT(peer.victim().receive(10s), HasError(errc::protocol_error)) << c.what;
    EXPECT_TRUE(peer.victim().is_broken()) << c.what;
    EXPECT_THAT(peer.victim().receive(10s), HasError(errc::broken)) << c.what;
    EXPECT_THAT(peer.victim().send(as_bytes("x")), HasError(errc::broken)) << c.what;
    peer.victim().close();
    EXPECT_TRUE(peer.victim().is_broken()) << c.what;  // close() does not unbreak it
  }
  // The head of the ring the victim writes, moved where it cannot be.
  for (const std::uint64_t head : {std::uint64_t{3}, std::uint64_t{8192}}) {
    hand_peer peer;
    peer.set_own_head(head);
    EXPECT_FALSE(peer.victim().is_broken()) << head;
    EXPECT_THAT(peer.victim().send(as_bytes("x"), 10s), HasError(errc::protocol_error)) << head;
    EXPECT_TRUE(peer.victim().is_broken()) << head;
    EXPECT_THAT(peer.victim().send(as_bytes("x"), 10s), HasError(errc::broken)) << head;
  }
}

// The peer changes a message's bytes after the victim took it: the victim's copy stays.
TEST_F(ring_test, ReceivedMessagesAreTheReceiversOwnCopy) {
  hand_peer peer;
  const std::array<std::uint32_t, 2> header{5, 0};
  peer.write_victim_data(0, header.data(), 8);
  peer.write_victim_data(8, "hello", 5);
  peer.set_victim_tail(16);
  auto m = must(peer.victim().receive(10s));
  peer.write_victim_data(8, "XXXXX", 5);
  EXPECT_EQ(m.text(), "hello");
}

// A peer that completes the handshake honestly and then does all it can to make the victim block
// (hand_peer::wedge): a send that wakes it, a receive that makes room for it, a receive that
// waits, and close() each return. Each runs in a child process killed by SIGALRM after 10 s, so
// a call that blocks fails the test instead of hanging it.
TEST_F(ring_test, APeerCannotMakeTheVictimBlock) {
  const std::vector<std::pair<const char*, std::function<int(hand_peer&)>>> cases{
      {"send into a ring whose reader sleeps",
       [](hand_peer& peer) { return peer.victim().send(as_bytes("x"), 1s) ? 0 : 1; }},
      {"receive from a ring whose writer waits",
       [](hand_peer& peer) {
         const std::array<std::uint32_t, 2> header{5, 0};
         peer.write_victim_data(0, header.data(), 8);
         peer.write_victim_data(8, "hello", 5);
         peer.set_victim_tail(16);
         auto m = peer.victim().receive(1s);
         return m && m->text() == "hello" ? 0 : 1;
       }},
      {"receive that waits",
       [](hand_peer& peer) {
         return peer.victim().receive(1s).error() == errc::timed_out ? 0 : 1;
       }},
      {"close", [](hand_peer& peer) {
         peer.victim().close();
         return peer.victim().is_open() ? 1 : 0;
       }}};
  for (const auto& [what, call] : cases) {
    const int status = test::run_in_child([&call] {
      ::alarm(10);
      hand_peer peer;
      peer.wedge();
      return call(peer);
    });
    EXPECT_EQ(status, 0) << what << (status == 128 + SIGALRM ? ": blocked" : "");
  }
}

// A peer that closes the victim's wake sockets can never wake it again: a receive that waits
// returns errc::peer_closed at once, after delivering what the peer published.
TEST_F(ring_test, APeerThatClosesTheWakeSocketsIsGone) {
  hand_peer peer;
  const std::array<std::uint32_t, 2> header{5, 0};
  peer.write_victim_data(0, header.data(), 8);
  peer.write_victim_data(8, "hello", 5);
  peer.set_victim_tail(16);
  peer.close_victims_bells();
  EXPECT_EQ(must(peer.victim().receive(10s)).text(), "hello");
  EXPECT_THAT(peer.victim().receive(10s), HasError(errc::peer_closed));
}

}  // namespace
}  // namespace duplex
