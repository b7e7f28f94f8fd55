// duplex_soak: long runs that count what a channel loses, duplicates, reorders or corrupts
// (all must be 0), what a killed peer turns into, and whether signals or fds leak through.
//
//   duplex_soak messages [--messages N] [--kind stream|seqpacket|all] [--framing native|python|all]
//                        [--shm] [--signals] [--big F] [--seed S] [--json]
//       A forked child sends N messages of random sizes (a fraction F, default 0.01, from 64 KiB
//       up to 16 MiB, the others up to 64 KiB, both log-uniform), every 50th with an fd (a memfd
//       holding its sequence number); each message carries its sequence number and a checksum of
//       its bytes. The parent checks every one.
//       --signals runs a 10 kHz SIGALRM storm (no SA_RESTART) in both processes throughout.
//       Counts the parent's fds before and after, and zombies left.
//   duplex_soak kills [--kills N] [--seed S] [--json]
//       N times: a child floods messages; the parent reads a random number of them, kills the child
//       with SIGKILL, and reads on: every message before the kill must be intact, and the end
//       must be errc::peer_closed or errc::truncated_message. Counts zombies and fds left.
//
// Exit status 0 when every count that must be 0 is 0.
#include <signal.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <dirent.h>
#include <atomic>
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "duplex/duplex.hpp"

namespace {

using namespace std::chrono_literals;

// --- the messages --------------------------------------------------------------------------

// A checksum of the payload: FNV-1a over 8-byte words (then the tail bytes), fast enough that
// the soak measures the channel rather than the checksum, and any changed byte changes it.
std::uint64_t checksum(std::span<const std::byte> b) {
  std::uint64_t h = 1469598103934665603ULL;
  std::size_t i = 0;
  for (; i + 8 <= b.size(); i += 8) {
    std::uint64_t w;
    std::memcpy(&w, b.data() + i, 8);
    h = (h ^ w) * 1099511628211ULL;
  }
  for (; i < b.size(); ++i)
    h = (h ^ std::to_integer<std::uint64_t>(b[i])) * 1099511628211ULL;
  return h ^ b.size();
}

struct header {
  std::uint64_t seq;
  std::uint64_t checksum;  // of the payload after the header
  std::uint32_t fd_count;
  std::uint32_t reserved;
};

std::size_t size_for(std::mt19937_64& rng, std::size_t max, double big_fraction) {
  std::uniform_real_distribution<double> u(0, 1);
  const bool big = u(rng) < big_fraction;
  const double lo = big ? 16.0 : 0.0;   // log2 of the range: 64 KiB .. 16 MiB
  const double hi = big ? 24.0 : 16.0;  // or 1 .. 64 KiB
  const auto n = static_cast<std::size_t>(std::exp2(lo + u(rng) * (hi - lo))) - (big ? 0 : 1);
  return std::min(n, max);
}

void fill(std::span<std::byte> b, std::uint64_t seed) {
  std::uint64_t x = seed * 0x9e3779b97f4a7c15ULL + 1;
  std::size_t i = 0;
  for (; i + 8 <= b.size(); i += 8) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    std::memcpy(b.data() + i, &x, 8);
  }
  for (; i < b.size(); ++i)
    b[i] = static_cast<std::byte>(x >> (8 * (i % 8)));
}

duplex::unique_fd memfd_holding(std::uint64_t seq) {
  duplex::unique_fd fd(::memfd_create("soak", MFD_CLOEXEC));
  if (fd.valid() && ::write(fd.get(), &seq, sizeof seq) != sizeof seq) fd.reset();
  return fd;
}

// --- a signal storm ----------------------------------------------------------------------------

std::atomic<long> g_signals{0};

void count_signal(int) { g_signals.fetch_add(1, std::memory_order_relaxed); }

struct storm {
  timer_t timer{};
  bool on = false;
  explicit storm(bool enable) {
    if (!enable) return;
    struct sigaction sa {};
    sa.sa_handler = count_signal;
    sigemptyset(&sa.sa_mask);
    ::sigaction(SIGALRM, &sa, nullptr);  // no SA_RESTART: every blocking call sees EINTR
    sigevent sev{};
    sev.sigev_notify = SIGEV_SIGNAL;
    sev.sigev_signo = SIGALRM;
    if (::timer_create(CLOCK_MONOTONIC, &sev, &timer) != 0) return;
    itimerspec spec{};
    spec.it_interval.tv_nsec = 100'000;  // 10 kHz
    spec.it_value.tv_nsec = 100'000;
    ::timer_settime(timer, 0, &spec, nullptr);
    on = true;
  }
  ~storm() {
    if (!on) return;
    ::timer_delete(timer);
    ::signal(SIGALRM, SIG_IGN);
  }
};

// --- helpers -------------------------------------------------------------------------------

int open_fds() {
  int n = 0;
  DIR* d = ::opendir("/proc/self/fd");
  if (d == nullptr) return -1;
  while (const dirent* e = ::readdir(d))
    n += e->d_name[0] != '.';
  ::closedir(d);
  return n - 1;
}

int zombies() {
  int n = 0;
  DIR* d = ::opendir("/proc");
  if (d == nullptr) return -1;
  const pid_t self = ::getpid();
  while (const dirent* e = ::readdir(d)) {
    if (e->d_name[0] < '0' || e->d_name[0] > '9') continue;
    std::FILE* f = std::fopen((std::string("/proc/") + e->d_name + "/stat").c_str(), "r");
    if (f == nullptr) continue;
    char buf[512];
    const std::size_t got = std::fread(buf, 1, sizeof buf - 1, f);
    std::fclose(f);
    buf[got] = '\0';
    const char* close = std::strrchr(buf, ')');
    char state = 0;
    int ppid = 0;
    if (close != nullptr && std::sscanf(close + 1, " %c %d", &state, &ppid) == 2 && ppid == self &&
        state == 'Z') {
      ++n;
    }
  }
  ::closedir(d);
  return n;
}

struct counts {
  std::uint64_t sent = 0, received = 0, lost = 0, duplicated = 0, reordered = 0, corrupted = 0;
  std::uint64_t fd_mismatches = 0, bytes = 0, eintr = 0, other_errors = 0;
  long signals = 0;
  int fds_leaked = 0, zombies = 0;
  double seconds = 0;
};

// --- messages mode -------------------------------------------------------------------------

int sender(duplex::channel& ch, std::uint64_t n, std::uint64_t seed, std::size_t max,
           double big_fraction, bool signals, bool fds_allowed) {
  storm s(signals);
  std::mt19937_64 rng(seed);
  std::vector<std::byte> buf;
  for (std::uint64_t seq = 0; seq < n; ++seq) {
    const std::size_t size = size_for(rng, max, big_fraction);
    buf.resize(sizeof(header) + size);
    fill(std::span(buf).subspan(sizeof(header)), seed ^ seq);
    const bool with_fd = fds_allowed && seq % 50 == 49;
    header h{seq, checksum(std::span(buf).subspan(sizeof(header))), with_fd ? 1U : 0U, 0};
    std::memcpy(buf.data(), &h, sizeof h);
    duplex::unique_fd fd;
    std::vector<int> fds;
    if (with_fd) {
      fd = memfd_holding(seq);
      fds.push_back(fd.get());
    }
    if (auto r = ch.send(duplex::const_buffer(buf), fds); !r) {
      std::fprintf(stderr, "soak: send %" PRIu64 ": %s\n", seq, r.error().message().c_str());
      return r.error() == std::errc::interrupted ? 3 : 2;
    }
  }
  return 0;
}

counts run_messages(duplex::socket_kind kind, duplex::framing format, bool shm, bool signals,
                    std::uint64_t n, std::uint64_t seed, double big_fraction) {
  counts c;
  const int fds_before = open_fds();
  duplex::fork_options fo;
  fo.kind = kind;
  fo.channel.format = format;
  fo.channel.shared_memory.enabled = shm;
  fo.channel.max_message_size = std::size_t{16} << 20 | 4096;
  std::size_t max = std::size_t{16} << 20;
  if (kind == duplex::socket_kind::seqpacket && !shm) max = 200 * 1024;  // one packet each
  const auto start = std::chrono::steady_clock::now();
  auto child = duplex::fork_with_channel(
      [n, seed, max, big_fraction, signals, format](duplex::channel& ch) {
        return sender(ch, n, seed, max, big_fraction, signals, format == duplex::framing::native);
      },
      fo);
  if (!child) {
    std::fprintf(stderr, "soak: fork: %s\n", child.error().message().c_str());
    c.other_errors = 1;
    return c;
  }
  storm s(signals);
  std::uint64_t expected = 0;
  for (;;) {
    auto m = child->channel().receive();
    if (!m) {
      if (m.error() == duplex::errc::peer_closed) break;
      if (m.error() == std::errc::interrupted) {
        ++c.eintr;
        continue;
      }
      std::fprintf(stderr, "soak: receive: %s\n", m.error().message().c_str());
      ++c.other_errors;
      break;
    }
    const auto bytes = std::as_const(*m).bytes();
    header h{};
    if (bytes.size() < sizeof h) {
      ++c.corrupted;
      continue;
    }
    std::memcpy(&h, bytes.data(), sizeof h);
    ++c.received;
    c.bytes += bytes.size();
    if (checksum(bytes.subspan(sizeof h)) != h.checksum) ++c.corrupted;
    if (h.seq < expected) {
      ++c.duplicated;
    } else {
      if (h.seq > expected) {
        c.lost += h.seq - expected;
        ++c.reordered;
      }
      expected = h.seq + 1;
    }
    if (m->fds().size() != h.fd_count) {
      ++c.fd_mismatches;
    } else if (h.fd_count == 1) {
      std::uint64_t held = ~0ULL;
      if (::pread(m->fds()[0].get(), &held, sizeof held, 0) != sizeof held || held != h.seq) {
        ++c.fd_mismatches;
      }
    }
  }
  c.lost += n > expected ? n - expected : 0;
  c.sent = n;
  auto status = child->wait();
  if (!status || !status->success()) {
    std::fprintf(stderr, "soak: the sender %s\n",
                 status ? status->describe().c_str() : "could not be waited for");
    if (status && status->normal() && status->code() == 3) ++c.eintr;
    ++c.other_errors;
  }
  { const duplex::child gone = std::move(*child); }  // reaped already; its channel closes now
  c.fds_leaked = open_fds() - fds_before;
  c.zombies = zombies();
  c.signals = g_signals.load();
  c.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return c;
}

// --- kills mode ----------------------------------------------------------------------------

struct kill_counts {
  std::uint64_t kills = 0, peer_closed = 0, truncated = 0, other = 0, corrupted = 0;
  int zombies = 0, fds_leaked = 0;
  double seconds = 0;
};

int flooder(duplex::channel& ch) {
  // Mostly small messages, and every tenth larger than a socket buffer, so that a kill often
  // lands in the middle of a frame.
  std::vector<std::byte> buf(300000 + sizeof(header));
  for (std::uint64_t seq = 0;; ++seq) {
    const std::size_t size = 1 + seq * 7919 % (seq % 10 == 9 ? 300000 : 4096);
    auto body = std::span(buf).subspan(sizeof(header), size);
    fill(body, seq);
    header h{seq, checksum(body), 0, 0};
    std::memcpy(buf.data(), &h, sizeof h);
    if (!ch.send(std::span(buf).first(sizeof(header) + size))) return 0;
  }
}

kill_counts run_kills(std::uint64_t n, std::uint64_t seed) {
  kill_counts k;
  std::mt19937_64 rng(seed);
  const int fds_before = open_fds();
  const auto start = std::chrono::steady_clock::now();
  for (std::uint64_t i = 0; i < n; ++i) {
    duplex::fork_options fo;
    // Stream only: a seqpacket packet is atomic, so only a stream can be cut inside a frame.
    fo.kind = duplex::socket_kind::stream;
    auto child = duplex::fork_with_channel(flooder, fo);
    if (!child) {
      ++k.other;
      continue;
    }
    const std::uint64_t before_kill = rng() % 200;
    std::uint64_t expected = 0;
    bool ended = false;
    for (std::uint64_t r = 0; r < before_kill; ++r) {
      auto m = child->channel().receive(10s);
      if (!m) break;
      header h{};
      std::memcpy(&h, std::as_const(*m).bytes().data(), sizeof h);
      if (h.seq != expected++ ||
          checksum(std::as_const(*m).bytes().subspan(sizeof h)) != h.checksum) {
        ++k.corrupted;
      }
    }
    static_cast<void>(child->kill(SIGKILL));
    ++k.kills;
    while (!ended) {  // every message sent before the kill, then a typed end
      auto m = child->channel().receive(10s);
      if (m) {
        header h{};
        std::memcpy(&h, std::as_const(*m).bytes().data(), sizeof h);
        if (h.seq != expected++ ||
            checksum(std::as_const(*m).bytes().subspan(sizeof h)) != h.checksum) {
          ++k.corrupted;
        }
        continue;
      }
      ended = true;
      if (m.error() == duplex::errc::peer_closed) {
        ++k.peer_closed;
      } else if (m.error() == duplex::errc::truncated_message) {
        ++k.truncated;
      } else {
        std::fprintf(stderr, "soak: after a kill: %s\n", m.error().message().c_str());
        ++k.other;
      }
    }
    auto status = child->wait();
    if (!status || status->signal() != SIGKILL) ++k.other;
  }
  k.zombies = zombies();
  k.fds_leaked = open_fds() - fds_before;
  k.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return k;
}

// --- the command line ----------------------------------------------------------------------

std::string option(std::vector<std::string>& args, const std::string& name, std::string fallback) {
  for (std::size_t i = 0; i + 1 < args.size(); ++i) {
    if (args[i] == name) return args[i + 1];
  }
  return fallback;
}

bool flag(const std::vector<std::string>& args, const std::string& name) {
  for (const auto& a : args) {
    if (a == name) return true;
  }
  return false;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.empty() || (args[0] != "messages" && args[0] != "kills")) {
    std::fprintf(stderr, "usage: duplex_soak messages|kills [options] (see the source's header)\n");
    return 2;
  }
  const bool json = flag(args, "--json");
  const std::uint64_t seed = std::stoull(option(args, "--seed", "1"));
  if (args[0] == "kills") {
    const auto k = run_kills(std::stoull(option(args, "--kills", "100")), seed);
    if (json) {
      std::printf("{\"mode\":\"kills\",\"kills\":%" PRIu64 ",\"peer_closed\":%" PRIu64
                  ",\"truncated_message\":%" PRIu64 ",\"other\":%" PRIu64 ",\"corrupted\":%" PRIu64
                  ",\"zombies\":%d,\"fds_leaked\":%d,\"seconds\":%.1f}\n",
                  k.kills, k.peer_closed, k.truncated, k.other, k.corrupted, k.zombies,
                  k.fds_leaked, k.seconds);
    } else {
      std::printf("kills %" PRIu64 ": peer_closed %" PRIu64 ", truncated_message %" PRIu64
                  ", other %" PRIu64 ", corrupted %" PRIu64
                  ", zombies %d, fds leaked %d (%.1f s)\n",
                  k.kills, k.peer_closed, k.truncated, k.other, k.corrupted, k.zombies,
                  k.fds_leaked, k.seconds);
    }
    return k.other == 0 && k.corrupted == 0 && k.zombies == 0 && k.fds_leaked == 0 ? 0 : 1;
  }
  const std::uint64_t n = std::stoull(option(args, "--messages", "10000"));
  const std::string kinds = option(args, "--kind", "all");
  const std::string framings = option(args, "--framing", "all");
  const bool shm = flag(args, "--shm");
  const bool signals = flag(args, "--signals");
  const double big_fraction = std::stod(option(args, "--big", "0.01"));
  bool ok = true;
  for (const auto kind : {duplex::socket_kind::stream, duplex::socket_kind::seqpacket}) {
    if (kinds != "all" && kinds != duplex::to_string(kind)) continue;
    for (const auto format : {duplex::framing::native, duplex::framing::python}) {
      const char* fname = format == duplex::framing::native ? "native" : "python";
      if (framings != "all" && framings != fname) continue;
      if (format == duplex::framing::python && (kind != duplex::socket_kind::stream || shm))
        continue;
      g_signals = 0;
      const auto c = run_messages(kind, format, shm, signals, n, seed, big_fraction);
      const bool clean = c.lost == 0 && c.duplicated == 0 && c.reordered == 0 && c.corrupted == 0 &&
                         c.fd_mismatches == 0 && c.eintr == 0 && c.other_errors == 0 &&
                         c.fds_leaked == 0 && c.zombies == 0 && c.received == n;
      ok = ok && clean;
      if (json) {
        std::printf(
            "{\"mode\":\"messages\",\"kind\":\"%s\",\"framing\":\"%s\",\"shm\":%s,"
            "\"signals\":%s,\"sent\":%" PRIu64 ",\"received\":%" PRIu64 ",\"lost\":%" PRIu64
            ",\"duplicated\":%" PRIu64 ",\"reordered\":%" PRIu64 ",\"corrupted\":%" PRIu64
            ",\"fd_mismatches\":%" PRIu64 ",\"bytes\":%" PRIu64
            ",\"signals_delivered\":%ld,\"eintr_surfaced\":%" PRIu64 ",\"other_errors\":%" PRIu64
            ",\"fds_leaked\":%d,\"zombies\":%d,\"seconds\":%.1f}\n",
            std::string(duplex::to_string(kind)).c_str(), fname, shm ? "true" : "false",
            signals ? "true" : "false", c.sent, c.received, c.lost, c.duplicated, c.reordered,
            c.corrupted, c.fd_mismatches, c.bytes, c.signals, c.eintr, c.other_errors, c.fds_leaked,
            c.zombies, c.seconds);
      } else {
        std::printf("%s/%s%s%s: sent %" PRIu64 ", received %" PRIu64 ", lost %" PRIu64
                    ", duplicated %" PRIu64 ", reordered %" PRIu64 ", corrupted %" PRIu64
                    ", fd mismatches %" PRIu64 ", %.2f GB, signals %ld, EINTR surfaced %" PRIu64
                    ", fds leaked %d, zombies %d (%.1f s)\n",
                    std::string(duplex::to_string(kind)).c_str(), fname, shm ? "+shm" : "",
                    signals ? "+signals" : "", c.sent, c.received, c.lost, c.duplicated,
                    c.reordered, c.corrupted, c.fd_mismatches, static_cast<double>(c.bytes) / 1e9,
                    c.signals, c.eintr, c.fds_leaked, c.zombies, c.seconds);
      }
      std::fflush(stdout);
    }
  }
  return ok ? 0 : 1;
}
