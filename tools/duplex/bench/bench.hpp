// duplex bench, inside: the rows it can measure, how one is measured, and what the report needs.
//
// A row is one (pattern, peers, transport, size). Measuring it opens a session (the pair, the
// peer thread or process, the buffers), whose run(n) does n operations (round trips, or messages
// from producer to consumer) and returns how long they took. Rows that are compared with each
// other (same pattern, peers and size) form a group: their sessions are open at once and their
// repetitions alternate, so that a noisy neighbour slows them all alike.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace duplex::cli::bench {

enum class pattern { rtt, throughput };
enum class peers { threads, processes };

[[nodiscard]] const char* to_string(pattern p) noexcept;
[[nodiscard]] const char* to_string(peers p) noexcept;

// "8B", "4KiB", "16MiB" (in row names); "8 B", "4 KiB", "16 MiB" (in words).
[[nodiscard]] std::string size_label(std::size_t bytes);
[[nodiscard]] std::string size_words(std::size_t bytes);

// A failure that ends the run: one line, the row's name is added by the caller.
class failure : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// An open row: run(n) does n operations and returns the seconds they took.
class session {
 public:
  session() = default;
  session(const session&) = delete;
  session& operator=(const session&) = delete;
  virtual ~session() = default;
  [[nodiscard]] virtual double run(std::uint64_t n) = 0;
  // Bytes that must go through before the timings count (a shared pool must be cycled once).
  [[nodiscard]] virtual std::uint64_t warm_bytes() const { return 0; }
  // Anything the reader should know about this row's run (e.g. pool fallbacks); empty if none.
  [[nodiscard]] virtual std::string notes() const { return {}; }
};

// The two CPUs peers are pinned to (the producer or caller on `a`, the peer on `b`), or -1.
struct placement {
  int a = -1;
  int b = -1;
};

// Pins the calling thread to cpu (nothing if cpu < 0).
void pin_to(int cpu) noexcept;

struct row_spec {
  std::string name;       // "rtt/processes/duplex-stream/8B"
  std::string transport;  // "duplex-stream"
  pattern pat = pattern::rtt;
  peers who = peers::threads;
  std::size_t size = 0;
  std::string baseline;  // transport this row is compared with; empty for baselines
  // busy-poll rows: the blocking transport their ratio_to_blocking is taken over; else empty.
  std::string blocking_baseline;
  std::string group;   // rows of one group are measured alternately
  std::string method;  // how it is measured, in words
  std::function<std::unique_ptr<session>(const placement&)> open;

  // Whether this row's ratios are taken over other's measurement: other is its baseline or its
  // blocking baseline, at the same pattern, peers and size. The one rule for choosing the rows a
  // filtered run needs and for computing the ratios.
  [[nodiscard]] bool needs(const row_spec& other) const {
    const bool same_place = other.pat == pat && other.who == who && other.size == size;
    return same_place && !other.transport.empty() &&
           (other.transport == baseline || other.transport == blocking_baseline);
  }
};

// Every row there is; quick keeps the sizes the goals need and a few more.
[[nodiscard]] std::vector<row_spec> all_rows(bool quick);

struct row_result {
  const row_spec* spec = nullptr;
  std::uint64_t iterations = 0;  // operations per repetition
  std::vector<double> samples;   // per repetition: ns per op (rtt) or bytes/s (throughput)
  double ns_per_op = 0;          // rtt: the median
  double bytes_per_s = 0;        // throughput: the median
  double msgs_per_s = 0;
  std::string notes;
  // duplex rows: the metric over the baseline's (ns ratio for rtt, bytes/s ratio for throughput).
  std::optional<double> ratio;
  // busy-poll rows: the rtt over raw-stream's blocking rtt of the same peers and size.
  std::optional<double> ratio_to_blocking;
};

struct goal {
  std::string name;        // what is compared, in words
  std::string short_name;  // "duplex-stream rtt overhead"
  std::optional<double> value;
  double target = 0;
  bool at_most = true;  // value <= target passes (else value >= target)
  [[nodiscard]] std::optional<bool> pass() const {
    if (!value) return std::nullopt;
    return at_most ? *value <= target : *value >= target;
  }
};

struct machine_info {
  std::string kernel, cpu, date;
  unsigned cores = 0;
  std::string load;  // /proc/loadavg's three averages when the run started: others' work
};

struct report {
  machine_info machine;
  bool quick = false;
  unsigned repetitions = 0;
  double seconds = 0;  // the whole run
  placement cpus;
  std::vector<row_result> rows;
  std::vector<goal> goals;
};

// The table and the goals, as text for stdout.
[[nodiscard]] std::string format_table(const report& r);
[[nodiscard]] std::string format_json(const report& r);
[[nodiscard]] std::string format_svg(const report& r);

// How every row is measured, for the help text and the JSON.
extern const char* const method_summary;

}  // namespace duplex::cli::bench
