// A real CPython peer: framing::python against multiprocessing.connection.Connection.
//
// Each test starts python3 running python_peer.py (DUPLEX_PYTHON_PEER) with the child's end of a
// stream pair at fd 3 and every other fd of this process closed, and talks to it through a
// channel with framing::python. The script frames everything with CPython's own
// Connection.send_bytes / recv_bytes, so these tests pin the wire format to CPython's, not to
// duplex's idea of it. The child inherits stderr: whatever it reports shows in the test output.
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdint>
#include <span>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "duplex/channel.hpp"
#include "duplex/socket_pair.hpp"
#include "support.hpp"

extern char** environ;

namespace duplex {
namespace {

using namespace std::chrono_literals;
using test::HasError;
using test::Succeeded;

// No receive from the child waits longer than this, so a broken child cannot hang the suite.
constexpr auto receive_timeout = 60s;

// The sizes every test of contents sends both ways: empty, one byte, the largest message CPython
// writes in one piece with its header, the smallest it writes as header and payload apart, and
// 1 MiB and 64 MiB (the channel's default maximum), which take many reads and writes.
constexpr std::array<std::size_t, 6> sizes = {
    0, 1, 16384, 16385, std::size_t{1} << 20, default_max_message_size};

// The sizes as python_peer.py takes them: "0,1,16384,...".
std::string size_list() {
  std::string list;
  for (const std::size_t size : sizes) {
    if (!list.empty()) list += ',';
    list += std::to_string(size);
  }
  return list;
}

// The tests' own loops over buffers of up to 64 MiB, which only the calling thread touches, run
// uninstrumented under ThreadSanitizer, which would make them many times slower.
#if defined(__SANITIZE_THREAD__)
#define DUPLEX_UNINSTRUMENTED __attribute__((no_sanitize("thread")))
#else
#define DUPLEX_UNINSTRUMENTED
#endif

// The contents of message `seed - 1` (python_peer.py computes the same): byte i is
//   (i % 251 + 7 * (i / 251) + 13 * k + 29 * (k / 256) + seed) % 256,  k = i / 64256
// (64256 = 251 * 256). Its period is about 4 GiB, so a byte lost, doubled or moved shows.
// (Raw pointers in the loops: no per-byte call into the standard library's accessors.)
DUPLEX_UNINSTRUMENTED std::vector<std::byte> pattern(std::size_t size, unsigned seed) {
  constexpr std::size_t block = 251 * 256;
  std::array<std::uint8_t, block> base{};
  for (std::size_t i = 0; i < block; ++i) {
    base[i] = static_cast<std::uint8_t>(i % 251 + 7 * (i / 251));
  }
  std::vector<std::byte> out(size);
  std::byte* p = out.data();
  for (std::size_t start = 0, k = 0; start < size; start += block, ++k) {
    const auto add = static_cast<std::uint8_t>(13 * k + 29 * (k / 256) + seed);
    const std::size_t n = std::min(block, size - start);
    const std::uint8_t* b = base.data();
    for (std::size_t i = 0; i < n; ++i) {
      p[start + i] = static_cast<std::byte>(static_cast<std::uint8_t>(b[i] + add));
    }
  }
  return out;
}

// The bytes in reverse order: what python_peer.py's echo sends back.
DUPLEX_UNINSTRUMENTED std::vector<std::byte> reversed(std::span<const std::byte> bytes) {
  std::vector<std::byte> out(bytes.size());
  const std::byte* in = bytes.data();
  std::byte* p = out.data();
  for (std::size_t i = 0, n = bytes.size(); i < n; ++i)
    p[i] = in[n - 1 - i];
  return out;
}

// The offset of the first byte where a and b (of equal size) differ, or their size.
DUPLEX_UNINSTRUMENTED std::size_t first_difference(std::span<const std::byte> a,
                                                   std::span<const std::byte> b) {
  const std::byte* x = a.data();
  const std::byte* y = b.data();
  std::size_t i = 0;
  while (i < a.size() && x[i] == y[i])
    ++i;
  return i;
}

// Compares byte for byte and names the first difference (never prints 64 MiB).
::testing::AssertionResult same_bytes(std::span<const std::byte> actual,
                                      std::span<const std::byte> expected) {
  if (actual.size() != expected.size()) {
    return ::testing::AssertionFailure() << actual.size() << " bytes, expected " << expected.size();
  }
  const std::size_t at = first_difference(actual, expected);
  if (at == actual.size()) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << "byte " << at << " of " << actual.size() << " is " << std::to_integer<int>(actual[at])
         << ", expected " << std::to_integer<int>(expected[at]);
}

// A python3 child running python_peer.py with the given arguments, the other end of its fd 3
// held here as a channel. The destructor closes that end and reaps the child (killing it if it
// does not exit in time), so no test leaves a zombie or an fd behind, even when it fails early.
class python_peer {
 public:
  explicit python_peer(const std::vector<std::string>& args,
                       channel_options options = {.format = framing::python}) {
    auto pair = socket_pair(socket_kind::stream);  // both ends close-on-exec
    if (!pair) throw std::system_error(pair.error(), "socket_pair");

    std::vector<std::string> strings = {DUPLEX_PYTHON, DUPLEX_PYTHON_PEER};
    strings.insert(strings.end(), args.begin(), args.end());
    std::vector<char*> argv;
    for (auto& s : strings) {
      argv.push_back(s.data());
    }
    argv.push_back(nullptr);

    // In the child: its end at fd 3 (dup2 clears close-on-exec on the copy, and glibc clears it
    // even when the end already is fd 3), and every fd above 3 closed.
    posix_spawn_file_actions_t actions;
    if (const int err = ::posix_spawn_file_actions_init(&actions); err != 0) {
      throw std::system_error(err, std::system_category(), "posix_spawn_file_actions_init");
    }
    int err = ::posix_spawn_file_actions_adddup2(&actions, pair->second.native_handle(), 3);
    if (err == 0) err = ::posix_spawn_file_actions_addclosefrom_np(&actions, 4);
    if (err == 0) err = ::posix_spawn(&pid_, argv[0], &actions, nullptr, argv.data(), environ);
    ::posix_spawn_file_actions_destroy(&actions);
    if (err != 0) throw std::system_error(err, std::system_category(), "posix_spawn");

    pair->second.close();  // the child's end lives in the child alone now
    auto ch = channel::create(std::move(pair->first), options);
    if (!ch) {
      static_cast<void>(finish());
      throw std::system_error(ch.error(), "channel::create");
    }
    channel_ = std::move(*ch);
  }

  python_peer(const python_peer&) = delete;
  python_peer& operator=(const python_peer&) = delete;

  ~python_peer() {
    if (pid_ <= 0) return;
    // Only a test that stopped early gets here; say how the child ended too.
    if (const int status = finish(10s); status != 0) {
      ADD_FAILURE() << "the Python peer exited with status " << status;
    }
  }

  // This end of the child's fd 3.
  channel& ch() { return channel_; }

  // Waits for the child to exit and returns its exit code (128 + signal if it was killed). If it
  // has not exited within timeout, it is killed and reaped, and the test fails.
  int wait(std::chrono::nanoseconds timeout = 60s) {
    if (pid_ <= 0) return status_;
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    int status = 0;
    for (;;) {
      const pid_t r = ::waitpid(pid_, &status, WNOHANG);
      if (r == pid_) break;
      if (r < 0 && errno != EINTR) {
        ADD_FAILURE() << "waitpid: " << std::error_code(errno, std::system_category()).message();
        pid_ = -1;
        return status_ = -1;
      }
      if (std::chrono::steady_clock::now() > deadline) {
        ADD_FAILURE() << "the Python peer did not exit in time; killing it";
        ::kill(pid_, SIGKILL);
        while (::waitpid(pid_, &status, 0) < 0 && errno == EINTR) {
        }
        break;
      }
      std::this_thread::sleep_for(5ms);
    }
    pid_ = -1;
    if (WIFEXITED(status)) return status_ = WEXITSTATUS(status);
    if (WIFSIGNALED(status)) return status_ = 128 + WTERMSIG(status);
    return status_ = -1;
  }

  // Closes this end (the child sees end-of-stream), then waits as wait() does.
  int finish(std::chrono::nanoseconds timeout = 60s) {
    channel_ = channel{};
    return wait(timeout);
  }

 private:
  channel channel_;
  pid_t pid_ = -1;
  int status_ = -1;
};

class python_interop : public test::fd_checked {};

// --- contents, both ways, at every size --------------------------------------------------------

TEST_F(python_interop, PythonReceivesEveryMessageIntact) {
  python_peer peer({"recv", size_list()});
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    SCOPED_TRACE("message " + std::to_string(i) + " of " + std::to_string(sizes[i]) + " bytes");
    ASSERT_THAT(peer.ch().send(pattern(sizes[i], static_cast<unsigned>(i + 1))), Succeeded());
    // Python checked every byte against the pattern before it answers.
    auto reply = peer.ch().receive(receive_timeout);
    ASSERT_THAT(reply, Succeeded());
    EXPECT_EQ(reply->text(), "ok " + std::to_string(i) + ' ' + std::to_string(sizes[i]));
  }
  EXPECT_EQ(peer.finish(), 0);  // and it saw our end-of-stream as EOFError
}

TEST_F(python_interop, EveryMessageFromPythonArrivesIntact) {
  python_peer peer({"send", size_list()});
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    SCOPED_TRACE("message " + std::to_string(i) + " of " + std::to_string(sizes[i]) + " bytes");
    auto m = peer.ch().receive(receive_timeout);
    ASSERT_THAT(m, Succeeded());
    EXPECT_TRUE(same_bytes(m->bytes(), pattern(sizes[i], static_cast<unsigned>(i + 1))));
    EXPECT_TRUE(m->fds().empty());
  }
  EXPECT_THAT(peer.ch().receive(receive_timeout), HasError(errc::peer_closed));
  EXPECT_EQ(peer.finish(), 0);
}

TEST_F(python_interop, PythonEchoesEveryMessageReversed) {
  python_peer peer({"echo"});
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    SCOPED_TRACE("message " + std::to_string(i) + " of " + std::to_string(sizes[i]) + " bytes");
    const auto data = pattern(sizes[i], static_cast<unsigned>(i + 1));
    ASSERT_THAT(peer.ch().send(data), Succeeded());
    auto back = peer.ch().receive(receive_timeout);
    ASSERT_THAT(back, Succeeded());
    EXPECT_TRUE(same_bytes(back->bytes(), reversed(data)));
  }
  // Our half-close is Python's EOFError: it stops echoing, exits, and we see its end close.
  ASSERT_THAT(peer.ch().shutdown_send(), Succeeded());
  EXPECT_THAT(peer.ch().receive(receive_timeout), HasError(errc::peer_closed));
  EXPECT_EQ(peer.wait(), 0);
}

// --- what Python may legally send -------------------------------------------------------------

TEST_F(python_interop, ClosingAfterSendingDeliversEveryMessageThenPeerClosed) {
  python_peer peer({"close-after", "5"});
  // Python has sent, closed its Connection and exited before a single byte is read here.
  ASSERT_EQ(peer.wait(), 0);
  for (int i = 0; i < 5; ++i) {
    auto m = peer.ch().receive(receive_timeout);
    ASSERT_THAT(m, Succeeded()) << "message " << i;
    EXPECT_EQ(m->text(), "message " + std::to_string(i));
  }
  EXPECT_THAT(peer.ch().receive(receive_timeout), HasError(errc::peer_closed));
  EXPECT_THAT(peer.ch().receive(receive_timeout), HasError(errc::peer_closed));  // and stays so
  EXPECT_FALSE(peer.ch().is_broken());
}

TEST_F(python_interop, TheLongHeaderFormIsAccepted) {
  // -1, then an 8-byte length: CPython writes this above 2 GiB - 1 and reads it at any size.
  python_peer peer({"long-header"});
  auto hello = peer.ch().receive(receive_timeout);
  ASSERT_THAT(hello, Succeeded());
  EXPECT_EQ(hello->text(), "hello");
  auto after = peer.ch().receive(receive_timeout);  // and the stream is still in step
  ASSERT_THAT(after, Succeeded());
  EXPECT_EQ(after->text(), "after");
  EXPECT_EQ(peer.finish(), 0);
}

// --- what this end refuses --------------------------------------------------------------------

TEST_F(python_interop, AMessageOverTheMaximumIsMessageTooLargeThenBroken) {
  python_peer peer({"oversize", "1024"}, {.format = framing::python, .max_message_size = 1024});
  auto at_limit = peer.ch().receive(receive_timeout);  // exactly the maximum is fine
  ASSERT_THAT(at_limit, Succeeded());
  EXPECT_TRUE(same_bytes(at_limit->bytes(), pattern(1024, 1)));
  EXPECT_THAT(peer.ch().receive(receive_timeout), HasError(errc::message_too_large));
  // A stream cannot skip a length it will not accept: the channel is broken.
  EXPECT_TRUE(peer.ch().is_broken());
  EXPECT_THAT(peer.ch().receive(receive_timeout), HasError(errc::broken));
  EXPECT_EQ(peer.finish(), 0);
}

class python_interop_bad_length : public test::fd_checked,
                                  public ::testing::WithParamInterface<std::int32_t> {};

// Names a length parameter: "minus_2", "int32_min".
std::string length_name(const ::testing::TestParamInfo<std::int32_t>& param) {
  return param.param == INT32_MIN ? "int32_min" : "minus_" + std::to_string(-param.param);
}

INSTANTIATE_TEST_SUITE_P(negative, python_interop_bad_length, ::testing::Values(-2, INT32_MIN),
                         length_name);

// CPython's own reader would take such a length as an empty message; duplex refuses it.
TEST_P(python_interop_bad_length, IsAProtocolErrorThenBroken) {
  python_peer peer({"bad-length", std::to_string(GetParam())});
  EXPECT_THAT(peer.ch().receive(receive_timeout), HasError(errc::protocol_error));
  EXPECT_TRUE(peer.ch().is_broken());
  EXPECT_THAT(peer.ch().receive(receive_timeout), HasError(errc::broken));
  EXPECT_THAT(peer.ch().send(as_bytes("anything")), HasError(errc::broken));
  EXPECT_EQ(peer.finish(), 0);
}

}  // namespace
}  // namespace duplex
