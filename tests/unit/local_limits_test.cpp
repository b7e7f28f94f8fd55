// Local resource exhaustion (docs/reliability.md): limits of this process or user, not faults of
// the peer. At the kernel's limit on fds in flight (ETOOMANYREFS), at RLIMIT_NOFILE while a
// receive needs an fd, and without the address space to map shared memory, the call that meets
// the limit reports it; nothing try_send or send accepted is lost, the channel is never broken,
// and no error is blamed on the peer. Each test runs in a forked child, since it lowers a limit
// (or drops privileges) for the whole process.
#include <grp.h>
#include <sys/resource.h>
#include <unistd.h>

#include <array>
#include <vector>

#include "duplex/channel.hpp"
#include "duplex/socket_pair.hpp"
#include "support.hpp"

namespace duplex {
namespace {

using namespace std::chrono_literals;
using test::pattern;
using test::same;

class local_limits_test : public test::kind_test {};

INSTANTIATE_TEST_SUITE_P(kinds, local_limits_test,
                         ::testing::Values(socket_kind::stream, socket_kind::seqpacket),
                         test::kind_name);

const std::error_code too_many_refs(ETOOMANYREFS, std::system_category());

// The fds-in-flight limit (unix(7): a user may have at most RLIMIT_NOFILE fds sent and not yet
// received) does not apply to a process with CAP_SYS_RESOURCE or CAP_SYS_ADMIN: as root, sends
// never meet it. A forked child becomes the unprivileged user nobody to reach it. False if it
// cannot.
bool become_unprivileged() {
  constexpr id_t nobody = 65534;
  if (::geteuid() == 0 && ::setgroups(0, nullptr) != 0) return false;
  if (::setresgid(nobody, nobody, nobody) != 0) return false;
  return ::setresuid(nobody, nobody, nobody) == 0;
}

// Sets the soft RLIMIT_NOFILE (the hard one stays, so it can be raised again).
bool set_nofile(rlim_t soft) {
  rlimit r{};
  ::getrlimit(RLIMIT_NOFILE, &r);
  r.rlim_cur = soft;
  return ::setrlimit(RLIMIT_NOFILE, &r) == 0;
}

// Puts this user at the fds-in-flight limit: sends fds over a pair nobody reads until the
// kernel says ETOOMANYREFS. The fds stay in flight while the pair lives.
bool fill_fds_in_flight(connected_channels& hog, int fd) {
  const std::array<int, 1> one{fd};
  for (int i = 0; i < 4096; ++i) {
    auto r = hog.first.send(as_bytes("x"), one);
    if (!r) return r.error() == too_many_refs && !hog.first.is_broken();
  }
  return false;
}

// Fills the socket with fd-less messages through try_send, until they wait in the queue.
bool fill_until_queued(channel& a) {
  for (int i = 0; i < 10000 && !a.wants_write(); ++i) {
    if (!a.try_send(pattern(1000, static_cast<unsigned>(i)))) return false;
  }
  return a.wants_write();
}

// Class: local resource exhaustion, fds in flight. Three messages with fds wait in try_send's
// queue when the user reaches the kernel's fds-in-flight limit. flush() reports ETOOMANYREFS and
// keeps every one of them queued (flush and send meeting it again say so again); a blocking send
// of a message with fds reports it with nothing sent. Once fds in flight drop, everything
// arrives, in order, with its fds; neither end is ever broken.
TEST_P(local_limits_test, FdsInFlightLimitKeepsQueuedMessagesAndBreaksNothing) {
  const socket_kind kind = GetParam();
  const int status = test::run_in_child([kind] {
    if (!become_unprivileged()) return 9;
    auto [a, b] = test::must(channel_pair(kind));
    auto hog = test::must(channel_pair(socket_kind::stream));
    auto [read_end, write_end] = test::make_pipe();
    const std::array<int, 1> fd{read_end.get()};
    // A low limit, so that a few fds in flight reach it.
    if (!set_nofile(64)) return 10;
    if (!fill_fds_in_flight(hog, write_end.get())) return 11;
    auto blocked = a.send(as_bytes("blocking, with fd"), fd);
    if (blocked || blocked.error() != too_many_refs || a.wants_write()) return 12;
    if (!fill_until_queued(a)) return 13;
    const std::array<const char*, 3> texts{"first with fd", "second with fd", "third with fd"};
    for (const char* t : texts) {
      if (!a.try_send(as_bytes(t), fd)) return 14;
    }
    // The receiver drains what has no fds; the sender's flush meets the limit at the first fd.
    std::size_t plain = 0;
    std::error_code stopped;
    for (int i = 0; i < 100000 && !stopped; ++i) {
      auto m = b.try_receive();
      if (m) {
        if (!m->fds().empty()) return 15;
        ++plain;
        continue;
      }
      if (m.error() != errc::would_block) return 16;
      auto f = a.flush();
      if (!f) stopped = f.error();
    }
    if (stopped != too_many_refs) return 17;
    const std::size_t queued = a.queued_bytes();
    if (queued == 0 || !a.wants_write()) return 18;
    auto again = a.flush();
    if (again || again.error() != too_many_refs || a.queued_bytes() != queued) return 19;
    auto plain_send = a.send(as_bytes("no fd"));  // writes the queue first: meets it too
    if (plain_send || plain_send.error() != too_many_refs) return 20;
    if (a.is_broken() || b.is_broken()) return 21;
    // The fds in flight go with the pair that held them; the limit goes back up.
    hog.first.close();
    hog.second.close();
    if (!set_nofile(1024)) return 22;
    std::vector<std::string> got;
    for (int i = 0; i < 100000 && got.size() < texts.size(); ++i) {
      if (a.wants_write()) {
        if (auto f = a.flush(); !f) return 23;
      }
      auto m = b.try_receive();
      if (!m) {
        if (m.error() != errc::would_block) return 24;
        continue;
      }
      if (m->fds().empty()) {
        ++plain;  // the rest of the fillers
        continue;
      }
      if (m->fds().size() != 1 || test::inode_of(m->fds()[0].get()) != test::inode_of(fd[0])) {
        return 25;
      }
      got.emplace_back(m->text());
    }
    if (got != std::vector<std::string>(texts.begin(), texts.end())) return 26;
    if (!a.send(as_bytes("after, with fd"), fd)) return 27;
    auto last = b.receive(10s);
    if (!last || last->text() != "after, with fd" || last->fds().size() != 1) return 28;
    return a.is_broken() || b.is_broken() ? 29 : 0;
  });
  EXPECT_EQ(status, 0);
}

channel_options with_shm(std::size_t pool = std::size_t{1} << 20) {
  channel_options o;
  o.shared_memory.enabled = true;
  o.shared_memory.threshold = 64 * 1024;
  o.shared_memory.pool_size = pool;
  return o;
}

// The same with shared memory: the pool's announce (which carries the pool's memfd) waits in the
// queue when the limit is reached. It stays queued, and once it goes, every large message after
// it arrives: the peer never sees a shared-memory message before its pool.
TEST_P(local_limits_test, FdsInFlightLimitKeepsAQueuedPoolAnnounce) {
  const socket_kind kind = GetParam();
  const int status = test::run_in_child([kind] {
    if (!become_unprivileged()) return 9;
    auto [a, b] = test::must(channel_pair(kind, with_shm()));
    auto hog = test::must(channel_pair(socket_kind::stream));
    auto [read_end, write_end] = test::make_pipe();
    if (!set_nofile(64)) return 10;
    if (!fill_until_queued(a)) return 11;
    const auto large = pattern(100000, 3);
    if (!a.try_send(large)) return 12;  // the pool's announce and the reference, both queued
    if (!fill_fds_in_flight(hog, write_end.get())) return 13;
    std::error_code stopped;
    for (int i = 0; i < 100000 && !stopped; ++i) {
      auto m = b.try_receive();
      if (m) continue;  // fillers
      if (m.error() != errc::would_block) return 14;
      auto f = a.flush();
      if (!f) stopped = f.error();
    }
    if (stopped != too_many_refs || !a.wants_write()) return 15;
    hog.first.close();
    hog.second.close();
    if (!set_nofile(1024)) return 16;
    bool seen = false;
    for (int i = 0; i < 100000 && !seen; ++i) {
      if (a.wants_write()) {
        if (auto f = a.flush(); !f) return 17;
      }
      auto m = b.try_receive();
      if (!m) {
        if (m.error() != errc::would_block) return 18;
        continue;
      }
      if (m->size() == large.size()) {
        if (!same(std::as_const(*m).bytes(), large)) return 19;
        seen = true;
      }
    }
    if (!seen) return 20;
    for (unsigned i = 0; i < 3; ++i) {
      const auto more = pattern(200000, 10 + i);
      if (!a.send(more)) return 21;
      auto m = b.receive(10s);
      if (!m || !same(std::as_const(*m).bytes(), more)) return 22;
    }
    return a.is_broken() || b.is_broken() ? 23 : 0;
  });
  EXPECT_EQ(status, 0);
}

}  // namespace
}  // namespace duplex
