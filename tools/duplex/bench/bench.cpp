// duplex bench: latency and throughput of duplex beside the raw syscalls, pipes and memcpy, in one
// run. This file chooses the rows, measures them (warm-up and calibration, then repetitions that
// alternate between the rows of a group), and writes the table, the JSON and the SVG.
#include <fmt/core.h>
#include <sched.h>
#include <signal.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <fstream>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "bench.hpp"
#include "command.hpp"
#include "name_filter.hpp"
#include "report.hpp"

namespace duplex::cli {
namespace {

using namespace bench;

machine_info gather_machine() {
  machine_info m;
  utsname u{};
  if (::uname(&u) == 0) m.kernel = fmt::format("Linux {}", u.release);
  std::ifstream cpuinfo("/proc/cpuinfo");
  std::string line;
  while (std::getline(cpuinfo, line)) {
    if (line.starts_with("model name")) {
      const auto colon = line.find(':');
      if (colon != std::string::npos) {
        m.cpu = line.substr(line.find_first_not_of(" \t", colon + 1));
        break;
      }
    }
  }
  if (m.cpu.empty()) m.cpu = u.machine;
  m.cores = std::thread::hardware_concurrency();
  std::ifstream loadavg("/proc/loadavg");
  std::string one, five, fifteen;
  if (loadavg >> one >> five >> fifteen) m.load = fmt::format("{} {} {}", one, five, fifteen);
  const std::time_t now = std::time(nullptr);
  std::tm tm{};
  ::gmtime_r(&now, &tm);
  char date[32];
  std::strftime(date, sizeof(date), "%Y-%m-%dT%H:%M:%SZ", &tm);
  m.date = date;
  return m;
}

// The main thread's CPU mask, restored when the run ends however it ends.
class affinity_guard {
 public:
  affinity_guard() { saved_ = ::sched_getaffinity(0, sizeof(mask_), &mask_) == 0; }
  ~affinity_guard() {
    if (saved_) static_cast<void>(::sched_setaffinity(0, sizeof(mask_), &mask_));
  }
  affinity_guard(const affinity_guard&) = delete;
  affinity_guard& operator=(const affinity_guard&) = delete;

  // The first two CPUs this process may use, or none if it has only one.
  [[nodiscard]] placement choose() const {
    placement p;
    if (!saved_) return p;
    for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
      if (!CPU_ISSET(cpu, &mask_)) continue;
      if (p.a < 0) {
        p.a = cpu;
      } else {
        p.b = cpu;
        return p;
      }
    }
    return {};
  }

 private:
  cpu_set_t mask_{};
  bool saved_ = false;
};

// The progress line on stderr: only on a terminal, rewritten in place, erased at the end.
class progress {
 public:
  explicit progress(std::size_t total) : on_(::isatty(STDERR_FILENO) != 0), total_(total) {}
  ~progress() { clear(); }
  progress(const progress&) = delete;
  progress& operator=(const progress&) = delete;

  void show(std::size_t done, const std::string& row, const std::string& what) {
    if (!on_) return;
    // fputs: a progress line that cannot be written is no reason to stop the run.
    std::fputs(fmt::format("\r\033[Kduplex bench: {} ({}) - {} of {} rows left", row, what,
                           total_ - done, total_)
                   .c_str(),
               stderr);
    std::fflush(stderr);
    shown_ = true;
  }
  void clear() {
    if (!on_ || !shown_) return;
    std::fputs("\r\033[K", stderr);
    std::fflush(stderr);
    shown_ = false;
  }

 private:
  bool on_;
  std::size_t total_;
  bool shown_ = false;
};

struct plan {
  double target;  // seconds per repetition of one row
  unsigned reps;
  double warm;  // seconds of warm-up (and calibration) at least
};

constexpr plan full_plan{0.1, 9, 0.05};
constexpr plan quick_plan{0.025, 7, 0.01};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 == 1 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

// Warms the session up and finds how many operations make one repetition last about the target.
std::uint64_t calibrate(session& s, const row_spec& spec, const plan& p) {
  std::uint64_t n = 1;
  double spent = 0;
  std::uint64_t bytes = 0;
  const double enough = p.target / 4;
  for (;;) {
    const double d = s.run(n);
    spent += d;
    bytes += n * spec.size;
    if (d >= enough) {
      if (spent >= p.warm && bytes >= s.warm_bytes()) {
        return std::max<std::uint64_t>(
            1, static_cast<std::uint64_t>(std::llround(static_cast<double>(n) * p.target / d)));
      }
      continue;
    }
    const double grow = d > 0 ? std::clamp(enough / d * 1.2, 2.0, 100.0) : 100.0;
    n = static_cast<std::uint64_t>(std::ceil(static_cast<double>(n) * grow));
  }
}

const row_result* find(const std::vector<row_result>& rows, pattern pat, peers who,
                       std::size_t size, const std::string& transport) {
  for (const auto& r : rows) {
    const row_spec& s = *r.spec;
    if (s.pat == pat && s.who == who && s.size == size && s.transport == transport) return &r;
  }
  return nullptr;
}

// The measured row that row's ratio over transport needs (see row_spec::needs), if any.
const row_result* reference(const std::vector<row_result>& rows, const row_spec& row,
                            const std::string& transport) {
  for (const auto& r : rows) {
    if (row.needs(*r.spec) && r.spec->transport == transport) return &r;
  }
  return nullptr;
}

double metric(const row_result& r) {
  return r.spec->pat == pattern::rtt ? r.ns_per_op : r.bytes_per_s;
}

void compare(std::vector<row_result>& rows) {
  for (auto& r : rows) {
    const row_spec& s = *r.spec;
    if (const auto* b = reference(rows, s, s.baseline)) r.ratio = metric(r) / metric(*b);
    if (const auto* b = reference(rows, s, s.blocking_baseline)) {
      r.ratio_to_blocking = metric(r) / metric(*b);
    }
  }
}

std::vector<goal> goals_of(const std::vector<row_result>& rows) {
  // A goal, with its value when the rows it needs were measured.
  const auto make = [](std::string short_name, std::string name, double target, bool at_most,
                       std::optional<double> value) {
    goal g;
    g.short_name = std::move(short_name);
    g.name = std::move(name);
    g.target = target;
    g.at_most = at_most;
    g.value = value;
    return g;
  };
  const auto* rtt = find(rows, pattern::rtt, peers::processes, 8, "duplex-stream");
  const auto* spin = find(rows, pattern::rtt, peers::processes, 8, "duplex-ring-busypoll");
  // At one size, the ratio of bytes per second is the ratio of messages per second.
  const auto* batch = find(rows, pattern::throughput, peers::threads, 64, "duplex-stream-batch");
  const auto* shm =
      find(rows, pattern::throughput, peers::threads, std::size_t{16} << 20, "duplex-shm");
  constexpr std::size_t mib = std::size_t{1} << 20;
  const auto* unix_rtt = find(rows, pattern::rtt, peers::threads, 8, "duplex-unix");
  const auto* tcp_rtt = find(rows, pattern::rtt, peers::threads, 8, "duplex-tcp");
  const auto* unix_bytes = find(rows, pattern::throughput, peers::threads, mib, "duplex-unix");
  const auto* tcp_bytes = find(rows, pattern::throughput, peers::threads, mib, "duplex-tcp");
  using opt = std::optional<double>;
  return {
      make("duplex-stream rtt vs raw-stream",
           "duplex-stream round trip of 8 B between processes, blocking, over raw-stream's (ratio)",
           1.05, true, rtt != nullptr ? opt(rtt->ratio) : std::nullopt),
      make("busy-poll rtt vs blocking raw-stream",
           "duplex-ring-busypoll round trip of 8 B between processes over raw-stream's "
           "blocking round trip (ratio)",
           0.10, true, spin != nullptr ? opt(spin->ratio_to_blocking) : std::nullopt),
      make("batch msgs/s vs raw-stream",
           "duplex-stream-batch 64 B messages per second over raw-stream's, one write per "
           "message (ratio)",
           20, false, batch != nullptr ? opt(batch->ratio) : std::nullopt),
      make("shm 16 MiB bytes/s vs raw-stream",
           "duplex-shm 16 MiB bytes per second over raw-stream's (ratio)", 2.5, false,
           shm != nullptr ? opt(shm->ratio) : std::nullopt),
      make("duplex-unix rtt vs raw-unix",
           "duplex-unix round trip of 8 B between threads over a raw AF_UNIX path socket's "
           "(ratio)",
           1.05, true, unix_rtt != nullptr ? opt(unix_rtt->ratio) : std::nullopt),
      make("duplex-tcp rtt vs raw-tcp",
           "duplex-tcp round trip of 8 B between threads over raw TCP loopback's with "
           "TCP_NODELAY (ratio)",
           1.05, true, tcp_rtt != nullptr ? opt(tcp_rtt->ratio) : std::nullopt),
      make("duplex-unix 1 MiB bytes/s vs raw-unix",
           "duplex-unix 1 MiB bytes per second over a raw AF_UNIX path socket's (ratio)", 1.0,
           false, unix_bytes != nullptr ? opt(unix_bytes->ratio) : std::nullopt),
      make("duplex-tcp 1 MiB bytes/s vs raw-tcp",
           "duplex-tcp 1 MiB bytes per second over raw TCP loopback's (ratio)", 1.0, false,
           tcp_bytes != nullptr ? opt(tcp_bytes->ratio) : std::nullopt),
  };
}

// An output file, opened before the run so that a bad path fails at once.
struct output {
  std::string path;
  std::FILE* f = nullptr;
  output() = default;
  output(const output&) = delete;
  output& operator=(const output&) = delete;
  ~output() {
    if (f != nullptr && f != stdout) std::fclose(f);
  }
  [[nodiscard]] bool open(const std::string& p, bool dash_is_stdout) {
    path = p;
    if (p.empty()) return true;
    f = p == "-" && dash_is_stdout ? stdout : std::fopen(p.c_str(), "w");
    return f != nullptr;
  }
  [[nodiscard]] bool write(const std::string& text) {
    if (f == nullptr) return true;
    const bool ok = std::fwrite(text.data(), 1, text.size(), f) == text.size();
    if (f == stdout) return ok && std::fflush(f) == 0;
    const bool closed = std::fclose(f) == 0;
    f = nullptr;
    return ok && closed;
  }
};

}  // namespace

std::string bench_help() {
  return fmt::format(
      "Rows are named PATTERN/PEERS/TRANSPORT/SIZE, e.g. rtt/processes/duplex-stream/8B or "
      "throughput/threads/duplex-shm/16MiB. Transports: raw-stream, raw-seqpacket, "
      "raw-stream-busypoll, pipe, memcpy (baselines); duplex-stream, duplex-seqpacket, "
      "duplex-python, duplex-stream-busypoll, duplex-stream-batch, duplex-shm, duplex-shm-copy, "
      "duplex-ring, duplex-ring-busypoll (shared-memory rings); endpoints beside raw sockets of "
      "the same kind: duplex-unix and raw-unix (a unix socket path), duplex-tcp and raw-tcp (tcp "
      "loopback, TCP_NODELAY), and a connection with one 8 B round trip over it, "
      "duplex-unix-connect and duplex-tcp-connect (with the authkey handshake) beside "
      "raw-unix-connect and raw-tcp-connect.\n"
      "\n"
      "How: the rows of a group (same pattern, peers and size) are open together and their "
      "repetitions alternate, so that a noisy machine slows them alike; each row is warmed up "
      "and calibrated, then its value is the median of {} repetitions of about {:g} s ({} of "
      "{:g} s with --quick). Busy-poll rows run alone. The caller and its peer (a thread, or a "
      "forked child) are pinned to two CPUs.\n"
      "rtt: one message each way, echoed by the peer; busy-poll rows spin on both ends "
      "(recv(MSG_DONTWAIT), channel_options::busy_poll = 1 s, or ring_options::busy_poll = 1 s).\n"
      "Throughput: from the producer's first byte to the consumer's last. Every producer fills "
      "the whole payload of every message (memset into its own buffer; into the allocate()d "
      "buffer for duplex-shm) and every consumer reads and checks the first byte of each "
      "message and one byte per 4 KiB page of it, so no transport can skip work. Raw consumers "
      "receive in bulk (256 KiB buffers); duplex consumers receive_into() a reused buffer, "
      "receive_batch() for batches (64 messages per batch), receive() for shared memory.\n"
      "Ratios: ns_per_op over the baseline's for rtt (lower is better), bytes/s over the "
      "baseline's for throughput (higher is better). The JSON gives each row's method, samples "
      "and ratio, and the goals.\n"
      "\n"
      "Exit status: 0 when the run completes (whatever the goals say), 2 on bad usage "
      "(including a --filter that is invalid or matches no row), 1 on failure.",
      full_plan.reps, full_plan.target, quick_plan.reps, quick_plan.target);
}

int run_bench(const bench_options& o) {
  // The filter as messages quote it: a pattern too long to be read is cut.
  const std::string quoted =
      o.filter.size() <= 80
          ? o.filter
          : o.filter.substr(0, 80) + fmt::format("... ({} bytes)", o.filter.size());
  const auto filter = name_filter::compile(o.filter);
  if (!filter) {
    return report_usage(fmt::format("bench: --filter '{}': {} (see 'duplex bench --help')", quoted,
                                    filter.error()));
  }
  const std::vector<row_spec> rows = all_rows(o.quick);
  // The rows asked for, and the rows their ratios refer to.
  std::vector<bool> chosen(rows.size(), false);
  bool any = false;
  for (std::size_t i = 0; i < rows.size(); ++i) {
    if (!filter->search(rows[i].name)) continue;
    chosen[i] = any = true;
    for (std::size_t j = 0; j < rows.size(); ++j) {
      if (rows[i].needs(rows[j])) chosen[j] = true;
    }
  }
  if (!any) {
    return report_usage(
        fmt::format("bench: no row matches --filter '{}' (see 'duplex bench --help')", quoted));
  }
  std::vector<const row_spec*> selected;
  for (std::size_t i = 0; i < rows.size(); ++i) {
    if (chosen[i]) selected.push_back(&rows[i]);
  }
  if (o.list) {
    std::string names;
    for (const row_spec* r : selected)
      names += r->name + "\n";
    static_cast<void>(write_stdout(names));  // finish_output reports a loss
    return 0;
  }

  output json;
  output svg;
  if (!json.open(o.json, true)) {
    return report_failure(
        fmt::format("bench: cannot write '{}': {}", o.json, std::strerror(errno)));
  }
  if (!svg.open(o.svg, false)) {
    return report_failure(fmt::format("bench: cannot write '{}': {}", o.svg, std::strerror(errno)));
  }

  // A peer that dies must be an error of the row, not the end of this process.
  ::signal(SIGPIPE, SIG_IGN);
  const plan p = o.quick ? quick_plan : full_plan;
  report rep;
  rep.machine = gather_machine();
  rep.quick = o.quick;
  rep.repetitions = p.reps;
  const auto started = std::chrono::steady_clock::now();
  {
    const affinity_guard affinity;
    rep.cpus = affinity.choose();
    pin_to(rep.cpus.a);
    progress bar(selected.size());
    std::size_t done = 0;
    const row_spec* current = nullptr;
    try {
      for (std::size_t g = 0; g < selected.size();) {
        std::size_t h = g;
        while (h < selected.size() && selected[h]->group == selected[g]->group)
          ++h;
        const std::size_t k = h - g;
        // Open every row of the group, warm each up, then alternate their repetitions.
        std::vector<std::unique_ptr<session>> open;
        std::vector<std::uint64_t> n(k);
        std::vector<std::vector<double>> samples(k);
        for (std::size_t i = 0; i < k; ++i) {
          current = selected[g + i];
          bar.show(done, current->name, "starting");
          open.push_back(current->open(rep.cpus));
        }
        for (std::size_t i = 0; i < k; ++i) {
          current = selected[g + i];
          bar.show(done, current->name, "warming up");
          n[i] = calibrate(*open[i], *current, p);
        }
        for (unsigned r = 0; r < p.reps; ++r) {
          for (std::size_t j = 0; j < k; ++j) {
            const std::size_t i = (r + j) % k;  // a different row goes first each time
            current = selected[g + i];
            bar.show(done, current->name, fmt::format("repetition {} of {}", r + 1, p.reps));
            const double d = open[i]->run(n[i]);
            const auto ops = static_cast<double>(n[i]);
            samples[i].push_back(current->pat == pattern::rtt
                                     ? d * 1e9 / ops
                                     : ops * static_cast<double>(current->size) / d);
          }
        }
        for (std::size_t i = 0; i < k; ++i) {
          row_result res;
          res.spec = selected[g + i];
          res.iterations = n[i];
          res.notes = open[i]->notes();
          const double m = median(samples[i]);
          if (res.spec->pat == pattern::rtt) {
            res.ns_per_op = m;
          } else {
            res.bytes_per_s = m;
            res.msgs_per_s = m / static_cast<double>(res.spec->size);
          }
          res.samples = std::move(samples[i]);
          rep.rows.push_back(std::move(res));
        }
        current = selected[h - 1];
        bar.show(done, current->name, "finishing");
        while (!open.empty())
          open.pop_back();  // the last opened closes first: children end in order
        done += k;
        g = h;
      }
    } catch (const std::exception& e) {
      bar.clear();
      return report_failure(fmt::format("bench: {}: {}", current ? current->name : "", e.what()));
    }
  }
  rep.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  compare(rep.rows);
  rep.goals = goals_of(rep.rows);

  // A lost table is reported by finish_output when the command ends; the files are still written.
  if (o.json != "-") static_cast<void>(write_stdout(format_table(rep)) && flush_stdout());
  if (!json.write(format_json(rep) + "\n")) {
    return report_failure(
        fmt::format("bench: cannot write '{}': {}", o.json, std::strerror(errno)));
  }
  if (!svg.write(format_svg(rep))) {
    return report_failure(fmt::format("bench: cannot write '{}': {}", o.svg, std::strerror(errno)));
  }
  return 0;
}

}  // namespace duplex::cli
