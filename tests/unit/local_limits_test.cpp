// Local resource exhaustion (docs/reliability.md): limits of this process or user, not faults of
// the peer. At the kernel's limit on fds in flight (ETOOMANYREFS), at RLIMIT_NOFILE while a
// receive needs an fd, and without the address space to map shared memory, the call that meets
// the limit reports it; nothing try_send or send accepted is lost, the channel is never broken,
// and no error is blamed on the peer. Each test runs in a forked child, since it lowers a limit
// (or drops privileges) for the whole process.
#include <sys/mman.h>
#include <sys/resource.h>
#include <unistd.h>

#include <array>
#include <cstdio>
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

using test::become_unprivileged;
using test::set_nofile;

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

// Class: local resource exhaustion, RLIMIT_NOFILE at the receiver. The pool's announce arrives
// when no fd can be had (MSG_CTRUNC): that call says fds_truncated, and so does each later
// message that lives in the pool it could not take (nothing of it can be read), while every
// other message (inline, or in a memfd of its own once the limit is gone) still arrives. Neither
// end is broken, and the peer is not blamed.
TEST_P(local_limits_test, APoolAnnounceCutShortAtRlimitNofileBreaksNothing) {
  const socket_kind kind = GetParam();
  const int status = test::run_in_child([kind] {
    auto [a, b] = test::must(channel_pair(kind, with_shm()));
    const auto in_pool = pattern(100000, 4);
    const auto own_memfd = pattern(std::size_t{2} << 20, 5);  // over the 1 MiB pool
    if (!a.send(as_bytes("before"))) return 10;
    auto first = b.receive(10s);  // the receive buffer or spill area is made first
    if (!first || first->text() != "before") return 11;
    if (!a.send(in_pool)) return 12;  // the announce, then the reference
    if (!a.send(as_bytes("inline"))) return 13;
    int lowest = 0;
    while (test::fd_is_open(lowest))
      ++lowest;
    rlimit old{};
    ::getrlimit(RLIMIT_NOFILE, &old);
    if (!set_nofile(static_cast<rlim_t>(lowest))) return 14;  // no fd can be received
    auto announce = b.receive(10s);
    auto reference = b.receive(10s);
    ::setrlimit(RLIMIT_NOFILE, &old);
    if (announce || announce.error() != errc::fds_truncated) return 15;
    if (reference || reference.error() != errc::fds_truncated) return 16;
    auto plain = b.receive(10s);
    if (!plain || plain->text() != "inline") return 17;
    if (!a.send(in_pool)) return 18;  // the same pool: still out of reach
    auto again = b.receive(10s);
    if (again || again.error() != errc::fds_truncated) return 19;
    if (!a.send(own_memfd)) return 20;
    auto big = b.receive(10s);
    if (!big || !same(std::as_const(*big).bytes(), own_memfd)) return 21;
    if (!a.send(as_bytes("after"))) return 22;
    auto last = b.receive(10s);
    if (!last || last->text() != "after") return 23;
    return a.is_broken() || b.is_broken() ? 24 : 0;
  });
  EXPECT_EQ(status, 0);
}

#if !defined(__SANITIZE_ADDRESS__) && !defined(__SANITIZE_THREAD__)
// This process's address space, in bytes (from /proc/self/statm).
std::size_t address_space() {
  std::FILE* f = std::fopen("/proc/self/statm", "r");
  if (f == nullptr) return 0;
  unsigned long pages = 0;
  const int got = std::fscanf(f, "%lu", &pages);
  std::fclose(f);
  return got == 1 ? pages * static_cast<std::size_t>(::sysconf(_SC_PAGESIZE)) : 0;
}
#endif

// Class: local resource exhaustion, address space (RLIMIT_AS; the vm.max_map_count limit on
// mappings fails mmap the same way, with ENOMEM). The receiver cannot map the peer's pool or a
// message's memfd: each such call says ENOMEM, that message is skipped (the pool's messages
// with it), nothing is blamed on the peer, and once there is room again a memfd message maps and
// arrives. Sanitizers reserve terabytes of address space: there the limit cannot be set.
TEST_P(local_limits_test, NoAddressSpaceToMapSharedMemoryBreaksNothing) {
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  GTEST_SKIP() << "a sanitizer's shadow memory needs an unlimited address space";
#else
  const socket_kind kind = GetParam();
  const int status = test::run_in_child([kind] {
    auto [a, b] = test::must(channel_pair(kind, with_shm()));
    const auto in_pool = pattern(100000, 6);
    const auto own_memfd = pattern(std::size_t{2} << 20, 7);  // over the 1 MiB pool
    if (!a.send(as_bytes("before"))) return 10;
    auto first = b.receive(10s);  // the receive buffer or spill area is made first
    if (!first || first->text() != "before") return 11;
    if (!a.send(in_pool)) return 12;
    if (!a.send(own_memfd)) return 13;
    if (!a.send(as_bytes("inline"))) return 14;
    const std::error_code no_memory(ENOMEM, std::system_category());
    rlimit old{};
    ::getrlimit(RLIMIT_AS, &old);
    // Room for small allocations, none for a mapping of 1 MiB or more.
    const rlimit tight{address_space() + (std::size_t{256} << 10), old.rlim_max};
    if (::setrlimit(RLIMIT_AS, &tight) != 0) return 15;
    auto announce = b.receive(10s);
    auto reference = b.receive(10s);
    auto memfd = b.receive(10s);
    auto plain = b.receive(10s);
    ::setrlimit(RLIMIT_AS, &old);
    if (announce || announce.error() != no_memory) return 16;
    if (reference || reference.error() != no_memory) return 17;
    if (memfd || memfd.error() != no_memory) return 18;
    if (!plain || plain->text() != "inline") return 19;
    if (b.is_broken()) return 20;
    if (!a.send(own_memfd)) return 21;
    auto big = b.receive(10s);
    if (!big || !same(std::as_const(*big).bytes(), own_memfd)) return 22;
    return a.is_broken() || b.is_broken() ? 23 : 0;
  });
  EXPECT_EQ(status, 0);
#endif
}

// Class: local resource exhaustion, vm.max_map_count: the process has as many mappings as the
// kernel allows (an honest receiver holding some 65,000 shared messages as views gets there).
// The next memfd message cannot be mapped: ENOMEM, that message skipped, the one behind it
// delivered, nothing broken; with mappings to spare again, memfd messages arrive. Sanitizers map
// memory of their own at any moment, so there the limit cannot be held.
TEST_P(local_limits_test, NoMappingLeftForAMemfdBreaksNothing) {
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  GTEST_SKIP() << "a sanitizer needs mappings of its own at any moment";
#else
  const socket_kind kind = GetParam();
  constexpr int no_limit_reached = 77;
  const int status = test::run_in_child([kind] {
    auto [a, b] = test::must(channel_pair(kind, with_shm()));
    const auto own_memfd = pattern(std::size_t{2} << 20, 8);  // over the 1 MiB pool
    if (!a.send(as_bytes("before"))) return 10;
    auto first = b.receive(10s);
    if (!first || first->text() != "before") return 11;
    if (!a.send(own_memfd)) return 12;
    if (!a.send(as_bytes("inline"))) return 13;
    // One page each, protections alternating so that neighbours never merge into one mapping.
    const long page = ::sysconf(_SC_PAGESIZE);
    std::vector<void*> held;
    held.reserve(std::size_t{1} << 21);
    for (std::size_t i = 0; i < held.capacity(); ++i) {
      void* p = ::mmap(nullptr, static_cast<std::size_t>(page), i % 2 ? PROT_READ : PROT_NONE,
                       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (p == MAP_FAILED) break;
      held.push_back(p);
    }
    const bool at_limit = held.size() < held.capacity();
    auto memfd = b.receive(10s);
    auto plain = b.receive(10s);
    for (void* p : held)
      ::munmap(p, static_cast<std::size_t>(page));
    if (!at_limit) return no_limit_reached;
    if (memfd || memfd.error() != std::error_code(ENOMEM, std::system_category())) return 14;
    if (!plain || plain->text() != "inline") return 15;
    if (!a.send(own_memfd)) return 16;
    auto big = b.receive(10s);
    if (!big || !same(std::as_const(*big).bytes(), own_memfd)) return 17;
    return a.is_broken() || b.is_broken() ? 18 : 0;
  });
  if (status == no_limit_reached) GTEST_SKIP() << "vm.max_map_count is over two million here";
  EXPECT_EQ(status, 0);
#endif
}

}  // namespace
}  // namespace duplex
