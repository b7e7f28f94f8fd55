// The cost of starting a child and reaping it, measured in one run, three ways, each of the same
// tiny program (spawn_bench_child.cpp: it exits 0 at once):
//
//   spawn/raw_posix_spawn/*   posix_spawn + waitpid: the reference, no channel.
//   spawn/raw_posix_spawn_pair/*  what the same takes by hand with a channel's worth of setup:
//                             socketpair, posix_spawn with the child's end dup2'ed to fd 3,
//                             pidfd_open, waitpid: how much of duplex_spawn's cost any
//                             socketpair-holding child pays.
//   spawn/duplex_spawn/*      duplex::spawn (a socketpair, a channel, the child's end at fd 3)
//                             + child::wait().
//   spawn/fork_exec/*         fork + execve + waitpid: the baseline that copies the parent's
//                             memory (its page tables), so its cost grows with the parent's size.
//
// Each at two sizes of this process: rss_small (as it starts) and rss_1GiB (after it has
// written one byte to each page of 1 GiB, in 4 KiB pages, kept resident for those cases). The
// small cases are registered first, so they run before the 1 GiB is touched.
//
// The goal: duplex_spawn within 1.10x of raw_posix_spawn at both sizes, and flat as the size
// grows. After the run a summary prints these ratios (of the medians when
// --benchmark_repetitions is above 1), of real time and of this process's CPU time: the parent's
// own work, steadier under load, without the child's exec. Use --child=PATH to start another
// program instead (it must exit 0), e.g. --child=/bin/true.
//
// The machine should be quiet. On a shared one, interleave the cases so that a burst of load
// hits them all alike (the 1 GiB is then dropped and touched again as needed, outside the timing):
//   duplex_spawn_bench --benchmark_repetitions=10 --benchmark_enable_random_interleaving=true
//       --benchmark_report_aggregates_only=true
#include <benchmark/benchmark.h>
#include <spawn.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <optional>
#include <ostream>
#include <string>
#include <string_view>
#include <vector>

#include "duplex/process.hpp"

extern char** environ;

namespace {

std::string child_program = DUPLEX_BENCH_CHILD;  // the path, from CMake; --child=PATH replaces it

constexpr std::size_t one_gib = std::size_t{1} << 30;

// The memory that makes this process big for the rss_1GiB cases: mapped and touched once, then
// kept. A small case unmaps it, which only happens if the cases run out of order (e.g.
// --benchmark_enable_random_interleaving).
struct resident_memory {
  void* base = nullptr;
  std::size_t size = 0;
};
resident_memory ballast;

void set_ballast(std::size_t size) {
  if (ballast.size == size) return;
  if (ballast.base != nullptr) ::munmap(ballast.base, ballast.size);
  ballast = {};
  if (size == 0) return;
  void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) {
    std::perror("spawn_bench: mmap of the 1 GiB");
    std::abort();
  }
  // Ordinary 4 KiB pages, as a grown heap has, even where transparent huge pages are "always":
  // with 2 MiB pages fork would copy 512 times fewer entries.
  ::madvise(p, size, MADV_NOHUGEPAGE);
  const auto page = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
  auto* bytes = static_cast<volatile unsigned char*>(p);
  for (std::size_t i = 0; i < size; i += page)
    bytes[i] = 1;
  ballast = {p, size};
}

// This process's resident set, in MiB (from /proc/self/statm).
double rss_mib() {
  std::ifstream statm("/proc/self/statm");
  long total = 0;
  long resident = 0;
  if (!(statm >> total >> resident)) return 0;
  return static_cast<double>(resident) * static_cast<double>(::sysconf(_SC_PAGESIZE)) /
         (1024.0 * 1024.0);
}

void reap(pid_t pid) {
  int status = 0;
  while (::waitpid(pid, &status, 0) != pid) {
    if (errno != EINTR) std::abort();
  }
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) std::abort();
}

void raw_posix_spawn(benchmark::State& state) {
  std::array<char*, 2> argv{child_program.data(), nullptr};
  for (auto _ : state) {
    pid_t pid = -1;
    if (::posix_spawn(&pid, child_program.c_str(), nullptr, nullptr, argv.data(), environ) != 0) {
      std::abort();
    }
    reap(pid);
  }
}

void raw_posix_spawn_pair(benchmark::State& state) {
  std::array<char*, 2> argv{child_program.data(), nullptr};
  for (auto _ : state) {
    std::array<int, 2> sv{};
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv.data()) != 0) std::abort();
    posix_spawn_file_actions_t actions;
    ::posix_spawn_file_actions_init(&actions);
    ::posix_spawn_file_actions_adddup2(&actions, sv[1], 3);  // dup2 clears close-on-exec
    pid_t pid = -1;
    const int rc =
        ::posix_spawn(&pid, child_program.c_str(), &actions, nullptr, argv.data(), environ);
    ::posix_spawn_file_actions_destroy(&actions);
    if (rc != 0) std::abort();
    const int pidfd = static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
    if (pidfd < 0) std::abort();
    ::close(sv[1]);
    reap(pid);
    ::close(pidfd);
    ::close(sv[0]);
  }
}

void duplex_spawn(benchmark::State& state) {
  const std::array<std::string, 1> argv{child_program};
  for (auto _ : state) {
    auto child = duplex::spawn(argv);
    if (!child) std::abort();
    auto status = child->wait();
    if (!status || !status->success()) std::abort();
  }
}

void fork_exec(benchmark::State& state) {
  std::array<char*, 2> argv{child_program.data(), nullptr};
  for (auto _ : state) {
    const pid_t pid = ::fork();
    if (pid < 0) std::abort();
    if (pid == 0) {
      ::execve(child_program.c_str(), argv.data(), environ);
      ::_exit(127);
    }
    reap(pid);
  }
}

struct way {
  const char* name;
  void (*run)(benchmark::State&);
};
constexpr std::array<way, 4> ways{{
    {"raw_posix_spawn", raw_posix_spawn},
    {"duplex_spawn", duplex_spawn},
    {"fork_exec", fork_exec},
    {"raw_posix_spawn_pair", raw_posix_spawn_pair},
}};

struct size_case {
  const char* name;
  std::size_t ballast;
};
constexpr std::array<size_case, 2> sizes{{{"rss_small", 0}, {"rss_1GiB", one_gib}}};

std::string case_name(const way& w, const size_case& s) {
  return std::string("spawn/") + w.name + "/" + s.name;
}

void register_all() {
  for (const auto& s : sizes) {  // every small case before the 1 GiB is touched
    for (const auto& w : ways) {
      benchmark::RegisterBenchmark(case_name(w, s).c_str(),
                                   [s, w](benchmark::State& state) {
                                     set_ballast(s.ballast);  // before the timing starts
                                     w.run(state);
                                     state.counters["rss_MiB"] = rss_mib();
                                   })
          ->UseRealTime()
          ->Unit(benchmark::kMicrosecond);
    }
  }
}

// Passes everything to the reporter --benchmark_format asks for, and keeps the times per
// iteration of each case: the medians if there are repetitions, else the run's own.
class collecting_reporter final : public benchmark::BenchmarkReporter {
 public:
  // Real time (the goal's measure) and this process's CPU time (the parent's own work: the
  // child's exec and exit are not in it), per start+reap, in microseconds.
  struct times {
    double real = 0;
    double cpu = 0;
    bool median = false;  // of repetitions, else one run
  };

  explicit collecting_reporter(benchmark::BenchmarkReporter* display) : display_(display) {}

  bool ReportContext(const Context& context) override { return display_->ReportContext(context); }

  void ReportRuns(const std::vector<Run>& runs) override {
    display_->ReportRuns(runs);
    for (const auto& run : runs) {
      if (run.error_occurred) continue;
      const times t{run.GetAdjustedRealTime(), run.GetAdjustedCPUTime(), true};
      auto& r = results_[run.run_name.function_name];
      if (run.run_type == Run::RT_Aggregate) {
        if (run.aggregate_name == "median") r.median = t;
      } else {
        r.real.push_back(t.real);
        r.cpu.push_back(t.cpu);
      }
    }
  }

  void Finalize() override { display_->Finalize(); }

  // The times of a case; nullopt if it did not run.
  [[nodiscard]] std::optional<times> times_of(const std::string& name) const {
    const auto it = results_.find(name);
    if (it == results_.end()) return std::nullopt;
    const auto& r = it->second;
    if (r.median) return r.median;
    if (r.real.empty()) return std::nullopt;
    return times{median_of(r.real), median_of(r.cpu), r.real.size() > 1};
  }

  // Where the summary goes: after the table on the console, else on stderr (so that JSON or CSV
  // on stdout stays parseable).
  [[nodiscard]] std::ostream& summary_stream() const {
    if (dynamic_cast<benchmark::ConsoleReporter*>(display_) != nullptr) {
      return display_->GetOutputStream();
    }
    return display_->GetErrorStream();
  }

 private:
  struct collected {
    std::optional<times> median;    // the aggregate, with --benchmark_repetitions
    std::vector<double> real, cpu;  // each run's, without it (or with display of each run)
  };

  static double median_of(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    const auto n = v.size();
    return n % 2 == 1 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
  }

  benchmark::BenchmarkReporter* display_;
  std::map<std::string, collected> results_;
};

void print_summary(const collecting_reporter& reporter) {
  auto& out = reporter.summary_stream();
  bool any = false;
  bool all_medians = true;
  auto ratio = [&](const std::string& what, const std::string& top, const std::string& bottom,
                   std::string_view note) {
    const auto t = reporter.times_of(top);
    const auto b = reporter.times_of(bottom);
    if (!t || !b || b->real <= 0 || b->cpu <= 0) return;
    if (!any) {
      out << "\nspawn summary (" << child_program << "):\n"
          << "  " << std::string(50, ' ') << "      real  parent CPU\n";
    }
    any = true;
    all_medians = all_medians && t->median && b->median;
    char line[200];
    std::snprintf(line, sizeof line, "  %-50s %8.2fx %10.2fx%s%.*s\n", what.c_str(),
                  t->real / b->real, t->cpu / b->cpu, note.empty() ? "" : "   ",
                  static_cast<int>(note.size()), note.data());
    out << line;
  };
  for (const auto& s : sizes) {
    ratio(std::string("duplex_spawn / raw_posix_spawn, ") + s.name, case_name(ways[1], s),
          case_name(ways[0], s), "goal (real) <= 1.10x");
    ratio(std::string("duplex_spawn / raw_posix_spawn_pair, ") + s.name, case_name(ways[1], s),
          case_name(ways[3], s), "");
    ratio(std::string("raw_posix_spawn_pair / raw_posix_spawn, ") + s.name, case_name(ways[3], s),
          case_name(ways[0], s), "");
    ratio(std::string("fork_exec / raw_posix_spawn, ") + s.name, case_name(ways[2], s),
          case_name(ways[0], s), "");
  }
  for (const auto& w : ways) {
    ratio(std::string(w.name) + ", rss_1GiB / rss_small", case_name(w, sizes[1]),
          case_name(w, sizes[0]), w.run == fork_exec ? "expected to grow" : "goal: flat");
  }
  if (any) {
    out << (all_medians ? "  (ratios of medians)\n"
                        : "  (ratios of single runs: --benchmark_repetitions=N gives medians)\n");
  }
  out.flush();
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  int kept = 1;
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg(argv[i]);
    if (arg.starts_with("--child=")) {
      child_program = std::string(arg.substr(8));
    } else {
      argv[kept++] = argv[i];
    }
  }
  argc = kept;
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  if (child_program.find('/') == std::string::npos || ::access(child_program.c_str(), X_OK) != 0) {
    std::fprintf(stderr, "spawn_bench: %s: not an executable path\n", child_program.c_str());
    return 1;
  }

  register_all();
  // The default reporter is made by the library and never freed by it (nor here): it may be a
  // static of its own.
  collecting_reporter reporter(benchmark::CreateDefaultDisplayReporter());
  benchmark::RunSpecifiedBenchmarks(&reporter);
  print_summary(reporter);
  benchmark::Shutdown();
  set_ballast(0);
  return 0;
}
