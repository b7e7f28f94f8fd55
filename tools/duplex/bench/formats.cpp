// duplex bench: the report as a table (stdout), JSON and an SVG chart.
#include <fmt/core.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "bench.hpp"
#include "duplex/version.hpp"

namespace duplex::cli::bench {

const char* const method_summary =
    "Rows of one group (same pattern, peers and size) are open at once and their repetitions "
    "alternate, so that a noisy machine slows them alike; each row is warmed up and calibrated "
    "so that one repetition lasts about the target time, and its value is the median of its "
    "repetitions. Busy-poll rows are measured alone (a spinning idle peer would take a CPU). "
    "The caller or producer and its peer are pinned to two different CPUs. Round trips (rtt): "
    "ns_per_op is one message each way, the peer echoing it. Throughput: the time runs from the "
    "producer's first byte to the consumer's last; for every transport the producer fills the "
    "whole payload of every message (memset, into its own buffer, or into the buffer allocate() "
    "gave for duplex-shm) and the consumer reads and checks the first byte of every message and "
    "one byte per 4 KiB page of it; raw baselines receive in bulk (256 KiB buffers); kernel "
    "buffer sizes are the defaults. Ratios: ns_per_op over the baseline's for rtt (lower is "
    "better), bytes_per_s over the baseline's for throughput (higher is better).";

namespace {

std::string format_ns(double ns) {
  if (ns < 1e3) return fmt::format("{:.0f} ns", ns);
  if (ns < 1e6) return fmt::format("{:.2f} us", ns / 1e3);
  return fmt::format("{:.2f} ms", ns / 1e6);
}

std::string format_rate(double per_s) {
  if (per_s >= 1e6) return fmt::format("{:.2f} M/s", per_s / 1e6);
  if (per_s >= 1e3) return fmt::format("{:.2f} k/s", per_s / 1e3);
  return fmt::format("{:.1f} /s", per_s);
}

std::string format_gbs(double bytes_per_s) {
  const double g = bytes_per_s / 1e9;
  if (g >= 10) return fmt::format("{:.1f} GB/s", g);
  if (g >= 1) return fmt::format("{:.2f} GB/s", g);
  return fmt::format("{:.3f} GB/s", g);
}

std::string format_ratio(double r) {
  return r < 10 ? fmt::format("{:.2f}x", r) : fmt::format("{:.1f}x", r);
}

// The spread of a row's repetitions: (max - min) / median, in percent.
double spread(const row_result& r) {
  const auto [lo, hi] = std::minmax_element(r.samples.begin(), r.samples.end());
  const double m = r.spec->pat == pattern::rtt ? r.ns_per_op : r.bytes_per_s;
  return m > 0 ? (*hi - *lo) / m * 100 : 0;
}

std::string comparison(const row_result& r) {
  std::string s;
  if (r.ratio) s = fmt::format("{} {}", format_ratio(*r.ratio), r.spec->baseline);
  if (r.ratio_to_blocking) {
    if (!s.empty()) s += ", ";
    s += fmt::format("{} raw-stream (blocking)", format_ratio(*r.ratio_to_blocking));
  }
  return s;
}

std::string goal_text(const goal& g, std::size_t i) {
  const char* op = g.at_most ? "<=" : ">=";
  const auto pass = g.pass();
  const char* verdict = !pass ? "SKIP" : *pass ? "PASS" : "FAIL";
  const std::string value = g.value ? format_ratio(*g.value) : std::string("not measured");
  return fmt::format("{}  ({}) {}: {} (target {} {})", verdict, i + 1, g.name, value, op,
                     format_ratio(g.target));
}

std::string title_line(const report& r) {
  return fmt::format("duplex bench: {}, {} ({} cores), {}", r.machine.kernel, r.machine.cpu,
                     r.machine.cores, r.machine.date);
}

std::string load_text(const report& r) {
  return r.machine.load.empty() ? std::string()
                                : fmt::format("; load average at the start {}", r.machine.load);
}

std::string placement_text(const report& r) {
  if (r.cpus.a < 0) return "peers not pinned (one CPU)";
  return fmt::format("caller and peer pinned to CPUs {} and {}", r.cpus.a, r.cpus.b);
}

}  // namespace

std::string format_table(const report& r) {
  std::string out = title_line(r) + "\n";
  out += fmt::format("{} run: median of {} repetitions per row; {}{}; {:.1f} s\n",
                     r.quick ? "quick" : "full", r.repetitions, placement_text(r), load_text(r),
                     r.seconds);
  std::size_t width = 0;
  for (const auto& row : r.rows)
    width = std::max(width, row.spec->name.size());
  width += 2;
  const auto section = [&](pattern pat) {
    bool first = true;
    for (const auto& row : r.rows) {
      if (row.spec->pat != pat) continue;
      if (first) {
        if (pat == pattern::rtt) {
          out += fmt::format("\nRound trips, one message each way (lower is better)\n");
          out += fmt::format("  {:<{}}{:>12}{:>9}  {}\n", "row", width, "rtt", "spread",
                             "vs baseline");
        } else {
          out += fmt::format("\nThroughput, producer to consumer (higher is better)\n");
          out += fmt::format("  {:<{}}{:>12}{:>13}{:>9}  {}\n", "row", width, "bytes", "messages",
                             "spread", "vs baseline");
        }
        first = false;
      }
      const std::string spread_text = fmt::format("{:.0f}%", spread(row));
      std::string line = pat == pattern::rtt
                             ? fmt::format("  {:<{}}{:>12}{:>9}  {}", row.spec->name, width,
                                           format_ns(row.ns_per_op), spread_text, comparison(row))
                             : fmt::format("  {:<{}}{:>12}{:>13}{:>9}  {}", row.spec->name, width,
                                           format_gbs(row.bytes_per_s), format_rate(row.msgs_per_s),
                                           spread_text, comparison(row));
      line.erase(line.find_last_not_of(' ') + 1);
      out += line + "\n";
      if (!row.notes.empty()) out += fmt::format("    note: {}\n", row.notes);
    }
  };
  section(pattern::rtt);
  section(pattern::throughput);
  out += "\nGoals\n";
  for (std::size_t i = 0; i < r.goals.size(); ++i)
    out += "  " + goal_text(r.goals[i], i) + "\n";
  return out;
}

std::string format_json(const report& r) {
  using json = nlohmann::ordered_json;  // members in the order they are set
  const auto optional = [](const auto& v) { return v ? json(*v) : json(nullptr); };
  json results = json::array();
  for (const auto& row : r.rows) {
    const row_spec& s = *row.spec;
    json o = {{"name", s.name},
              {"transport", s.transport},
              {"pattern", to_string(s.pat)},
              {"peers", to_string(s.who)},
              {"size", s.size}};
    if (s.pat == pattern::rtt) {
      o["ns_per_op"] = row.ns_per_op;
    } else {
      o["bytes_per_s"] = row.bytes_per_s;
      o["msgs_per_s"] = row.msgs_per_s;
    }
    if (!s.baseline.empty()) {
      o["baseline"] = s.baseline;
      o["ratio"] = optional(row.ratio);
    }
    if (row.ratio_to_blocking) {
      o["blocking_baseline"] = s.blocking_baseline;
      o["ratio_to_blocking"] = *row.ratio_to_blocking;
    }
    o["iterations"] = row.iterations;
    o["samples"] = row.samples;
    o["samples_unit"] = s.pat == pattern::rtt ? "ns_per_op" : "bytes_per_s";
    o["method"] = s.method;
    if (!row.notes.empty()) o["notes"] = row.notes;
    results.push_back(std::move(o));
  }
  json goals = json::array();
  for (const auto& g : r.goals) {
    goals.push_back({{"name", g.name},
                     {"value", optional(g.value)},
                     {"target", g.target},
                     {"comparison", g.at_most ? "<=" : ">="},
                     {"pass", optional(g.pass())}});
  }
  const json j = {
      {"duplex_version", DUPLEX_VERSION_STRING},
      {"machine",
       {{"kernel", r.machine.kernel},
        {"cpu", r.machine.cpu},
        {"cores", r.machine.cores},
        {"date", r.machine.date},
        {"load_average", r.machine.load}}},
      {"quick", r.quick},
      {"repetitions", r.repetitions},
      {"seconds", r.seconds},
      {"pinned_cpus", r.cpus.a < 0 ? json(nullptr) : json::array({r.cpus.a, r.cpus.b})},
      {"method", method_summary},
      {"results", std::move(results)},
      {"goals", std::move(goals)},
  };
  // Bytes that are not UTF-8 (a CPU's name) become U+FFFD, never invalid JSON; NaN is null.
  return j.dump(-1, ' ', false, json::error_handler_t::replace);
}

// --- the SVG chart ------------------------------------------------------------------------------

namespace {

std::string xml_escape(std::string_view s) {
  std::string out;
  for (const char c : s) {
    switch (c) {
      case '&': out += "&amp;"; break;
      case '<': out += "&lt;"; break;
      case '>': out += "&gt;"; break;
      case '"': out += "&quot;"; break;
      case '\'': out += "&apos;"; break;
      default:
        // Control characters are not allowed in XML 1.0.
        if (static_cast<unsigned char>(c) >= 0x20 || c == '\t' || c == '\n') out += c;
    }
  }
  return out;
}

const char* color_of(const std::string& transport) {
  if (transport == "raw-stream") return "#7f7f7f";
  if (transport == "raw-seqpacket") return "#a3a3a3";
  if (transport == "raw-stream-busypoll") return "#5e5e5e";
  if (transport == "pipe") return "#c2c2c2";
  if (transport == "memcpy") return "#3b3b3b";
  if (transport == "duplex-stream") return "#1f77b4";
  if (transport == "duplex-seqpacket") return "#5fa2dd";
  if (transport == "duplex-python") return "#8cc2ea";
  if (transport == "duplex-stream-busypoll") return "#0b3d6e";
  if (transport == "duplex-stream-batch") return "#2b8cbe";
  if (transport == "duplex-shm") return "#08519c";
  if (transport == "duplex-shm-copy") return "#6baed6";
  if (transport == "duplex-ring") return "#2ca02c";
  if (transport == "duplex-ring-busypoll") return "#1a6b1a";
  return transport.starts_with("duplex") ? "#1f77b4" : "#999999";
}

constexpr int svg_width = 1100;
constexpr int label_right = 250;  // transport names end here
constexpr int bar_left = 258;
constexpr int bar_right = 820;  // the largest value's bar ends here; its label follows
constexpr int bar_height = 13;
constexpr int bar_step = 17;
constexpr int group_gap = 22;

// One panel: bars grouped by (peers, size), a log scale with a tick per decade.
int panel(std::string& out, int y, const report& r, pattern pat) {
  std::vector<const row_result*> rows;
  for (const auto& row : r.rows) {
    if (row.spec->pat == pat) rows.push_back(&row);
  }
  if (rows.empty()) return y;
  const bool rtt = pat == pattern::rtt;
  // rtt in ns; throughput in GB/s.
  const auto value = [rtt](const row_result& row) {
    return rtt ? row.ns_per_op : row.bytes_per_s / 1e9;
  };
  double lo = value(*rows.front());
  double hi = lo;
  for (const auto* row : rows) {
    lo = std::min(lo, value(*row));
    hi = std::max(hi, value(*row));
  }
  const double d0 = std::floor(std::log10(lo));
  const double d1 = std::max(d0 + 1, std::ceil(std::log10(hi)));
  const auto x_of = [&](double v) {
    return bar_left + (std::log10(v) - d0) / (d1 - d0) * (bar_right - bar_left);
  };
  const std::string heading =
      rtt ? "Round trip, one message each way (log scale; shorter is better)"
          : "Throughput, producer thread to consumer thread (GB/s, log "
            "scale; longer is better)";
  out += fmt::format("<text x=\"20\" y=\"{}\" font-size=\"15\" font-weight=\"bold\">{}</text>\n",
                     y + 16, xml_escape(heading));
  y += 30;
  const int top = y;
  // Count the rows to size the grid first.
  int height = 0;
  std::string previous;
  for (const auto* row : rows) {
    const std::string group =
        fmt::format("{}, {}", to_string(row->spec->who), size_words(row->spec->size));
    if (group != previous) height += group_gap;
    previous = group;
    height += bar_step;
  }
  // Grid lines and tick labels, one per decade.
  for (double d = d0; d <= d1 + 1e-9; d += 1) {
    const double v = std::pow(10.0, d);
    const double x = x_of(v);
    std::string label;
    if (rtt) {
      label = v < 1e3   ? fmt::format("{:g} ns", v)
              : v < 1e6 ? fmt::format("{:g} \u00b5s", v / 1e3)
                        : fmt::format("{:g} ms", v / 1e6);
    } else {
      label = fmt::format("{:g}", v);
    }
    out += fmt::format(
        "<line x1=\"{:.1f}\" y1=\"{}\" x2=\"{:.1f}\" y2=\"{}\" stroke=\"#dddddd\"/>\n"
        "<text x=\"{:.1f}\" y=\"{}\" font-size=\"11\" text-anchor=\"middle\" "
        "fill=\"#555555\">{}</text>\n",
        x, top, x, top + height, x, top + height + 14, xml_escape(label));
  }
  out += fmt::format("<text x=\"{}\" y=\"{}\" font-size=\"12\" text-anchor=\"middle\">{}</text>\n",
                     (bar_left + bar_right) / 2, top + height + 30,
                     rtt ? "round trip time (log scale)" : "GB/s (log scale)");
  previous.clear();
  for (const auto* row : rows) {
    const std::string group =
        fmt::format("{}, {}", to_string(row->spec->who), size_words(row->spec->size));
    if (group != previous) {
      y += group_gap;
      out += fmt::format(
          "<text x=\"20\" y=\"{}\" font-size=\"12\" font-weight=\"bold\" fill=\"#333333\">{}"
          "</text>\n",
          y - 6, xml_escape(group));
    }
    previous = group;
    const double v = value(*row);
    const double x = x_of(v);
    const std::string& t = row->spec->transport;
    out += fmt::format(
        "<text x=\"{}\" y=\"{}\" font-size=\"12\" text-anchor=\"end\">{}</text>\n"
        "<rect x=\"{}\" y=\"{}\" width=\"{:.1f}\" height=\"{}\" fill=\"{}\"><title>{}</title>"
        "</rect>\n",
        label_right, y + bar_height - 2, xml_escape(t), bar_left, y, std::max(1.0, x - bar_left),
        bar_height, color_of(t), xml_escape(row->spec->name));
    std::string text = rtt ? format_ns(row->ns_per_op) : format_gbs(row->bytes_per_s);
    if (rtt) {
      if (text.ends_with(" us")) text = text.substr(0, text.size() - 3) + " \u00b5s";
    } else {
      // "1.23 M/s" -> "1.23 M msg/s"; "75.0 /s" -> "75.0 msg/s".
      const std::string rate = format_rate(row->msgs_per_s);
      const std::string head = rate.substr(0, rate.size() - 2);
      text += ", " + head + (head.ends_with(' ') ? "msg/s" : " msg/s");
    }
    const std::string cmp = comparison(*row);
    if (!cmp.empty()) text += "  (" + cmp + ")";
    out += fmt::format("<text x=\"{:.1f}\" y=\"{}\" font-size=\"11\" fill=\"#222222\">{}</text>\n",
                       x + 5, y + bar_height - 3, xml_escape(text));
    y += bar_step;
  }
  return top + height + 44;
}

}  // namespace

std::string format_svg(const report& r) {
  std::string body;
  int y = 20;
  body += fmt::format("<text x=\"20\" y=\"{}\" font-size=\"18\" font-weight=\"bold\">{}</text>\n",
                      y + 10, xml_escape(title_line(r)));
  body += fmt::format(
      "<text x=\"20\" y=\"{}\" font-size=\"12\" fill=\"#444444\">{} run, median of {} "
      "repetitions per row; {}{}.</text>\n"
      "<text x=\"20\" y=\"{}\" font-size=\"12\" fill=\"#444444\">Grey: raw syscalls, pipes, "
      "memcpy (the baselines). Blue: duplex; in brackets, its ratio to the raw baseline.</text>\n",
      y + 30, r.quick ? "Quick" : "Full", r.repetitions, xml_escape(placement_text(r)),
      xml_escape(load_text(r)), y + 46);
  y += 60;
  y = panel(body, y, r, pattern::rtt);
  y = panel(body, y, r, pattern::throughput);
  body += fmt::format(
      "<text x=\"20\" y=\"{}\" font-size=\"15\" font-weight=\"bold\">Goals</text>\n", y + 10);
  y += 30;
  for (std::size_t i = 0; i < r.goals.size(); ++i) {
    const auto pass = r.goals[i].pass();
    const char* color = !pass ? "#777777" : *pass ? "#1a7f37" : "#cf222e";
    body += fmt::format("<text x=\"20\" y=\"{}\" font-size=\"12\" fill=\"{}\">{}</text>\n", y,
                        color, xml_escape(goal_text(r.goals[i], i)));
    y += 18;
  }
  y += 10;
  std::string out = fmt::format(
      "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{0}\" height=\"{1}\" "
      "viewBox=\"0 0 {0} {1}\" font-family=\"DejaVu Sans, Helvetica, Arial, sans-serif\">\n"
      "<title>{2}</title>\n"
      "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n",
      svg_width, y, xml_escape(title_line(r)));
  out += body;
  out += "</svg>\n";
  return out;
}

}  // namespace duplex::cli::bench
