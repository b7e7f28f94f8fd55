// The Asio adapter's own cost beside plain Asio, measured in one run: the round trip of an
// 8-byte message (send it, receive the peer's echo) through duplex::asio::channel
// (async_send + async_receive of whole messages), and through a plain Asio stream socket
// (asio::async_write + asio::async_read of 8 bytes) over the same kind of socketpair (stream).
//
// Each is measured with completion handlers and with coroutines (use_awaitable), and in two
// topologies: both peers on one io_context run by one thread (no context switch, no wake-up:
// the cost of the code and its syscalls alone), and each peer on an io_context of its own
// thread (a real round trip between threads).
//
// Every benchmark runs several times (--benchmark_repetitions, 5 unless given, in random order);
// at the end the program prints, per style and topology, the median round trip of each and
// their ratio (adapter / plain): CPU time with one thread (the whole cost, and what other
// processes on the machine disturb least), elapsed time with two. The project's goal: at most
// 1.05.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <array>
#include <asio/co_spawn.hpp>
#include <asio/experimental/as_tuple.hpp>
#include <asio/io_context.hpp>
#include <asio/local/connect_pair.hpp>
#include <asio/local/stream_protocol.hpp>
#include <asio/read.hpp>
#include <asio/use_awaitable.hpp>
#include <asio/write.hpp>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <map>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "duplex/asio.hpp"
#include "duplex/duplex.hpp"

namespace {

constexpr std::size_t message_size = 8;

using plain_socket = asio::local::stream_protocol::socket;
using asio::use_awaitable;

// A coroutine's failure ends the program: a benchmark that fails measures nothing.
void or_abort(const std::exception_ptr& e) {
  if (!e) return;
  try {
    std::rethrow_exception(e);
  } catch (const std::exception& x) {
    std::fprintf(stderr, "asio_bench: %s\n", x.what());
  }
  std::abort();
}

// ---------------------------------------------------------------------------------------------
// Coroutines.

asio::awaitable<void> plain_client(plain_socket& s, benchmark::State& state) {
  std::array<char, message_size> out{};
  std::array<char, message_size> in{};
  for (auto _ : state) {
    co_await asio::async_write(s, asio::buffer(out), use_awaitable);
    co_await asio::async_read(s, asio::buffer(in), use_awaitable);
  }
  s.shutdown(plain_socket::shutdown_send);
}

asio::awaitable<void> plain_echo(plain_socket& s) {
  std::array<char, message_size> buf{};
  for (;;) {
    auto [ec, n] = co_await asio::async_read(s, asio::buffer(buf),
                                             asio::experimental::as_tuple(use_awaitable));
    if (ec) co_return;  // the client's end of stream
    co_await asio::async_write(s, asio::buffer(buf), use_awaitable);
  }
}

asio::awaitable<void> adapter_client(duplex::asio::channel& ch, benchmark::State& state) {
  std::array<std::byte, message_size> out{};
  for (auto _ : state) {
    co_await ch.async_send(duplex::const_buffer(out), use_awaitable);
    duplex::message m = co_await ch.async_receive(use_awaitable);
    if (m.size() != message_size) std::abort();
  }
  if (!ch.channel().shutdown_send()) std::abort();
}

asio::awaitable<void> adapter_echo(duplex::asio::channel& ch) {
  for (;;) {
    auto [ec, m] = co_await ch.async_receive(asio::experimental::as_tuple(use_awaitable));
    if (ec) co_return;  // errc::peer_closed
    co_await ch.async_send(m, use_awaitable);
  }
}

// ---------------------------------------------------------------------------------------------
// Completion handlers.

class plain_client_handlers {
 public:
  plain_client_handlers(plain_socket& s, benchmark::State& state) : s_(s), state_(state) {}

  void next() {
    if (!state_.KeepRunning()) {
      s_.shutdown(plain_socket::shutdown_send);
      return;
    }
    asio::async_write(s_, asio::buffer(out_), [this](std::error_code ec, std::size_t) {
      if (ec) std::abort();
      asio::async_read(s_, asio::buffer(in_), [this](std::error_code ec2, std::size_t) {
        if (ec2) std::abort();
        next();
      });
    });
  }

 private:
  plain_socket& s_;
  benchmark::State& state_;
  std::array<char, message_size> out_{};
  std::array<char, message_size> in_{};
};

class plain_echo_handlers {
 public:
  explicit plain_echo_handlers(plain_socket& s) : s_(s) {}

  void next() {
    asio::async_read(s_, asio::buffer(buf_), [this](std::error_code ec, std::size_t) {
      if (ec) return;  // the client's end of stream
      asio::async_write(s_, asio::buffer(buf_), [this](std::error_code ec2, std::size_t) {
        if (ec2) std::abort();
        next();
      });
    });
  }

 private:
  plain_socket& s_;
  std::array<char, message_size> buf_{};
};

class adapter_client_handlers {
 public:
  adapter_client_handlers(duplex::asio::channel& ch, benchmark::State& state)
      : ch_(ch), state_(state) {}

  void next() {
    if (!state_.KeepRunning()) {
      if (!ch_.channel().shutdown_send()) std::abort();
      return;
    }
    ch_.async_send(duplex::const_buffer(out_), [this](std::error_code ec) {
      if (ec) std::abort();
      ch_.async_receive([this](std::error_code ec2, duplex::message m) {
        if (ec2 || m.size() != message_size) std::abort();
        next();
      });
    });
  }

 private:
  duplex::asio::channel& ch_;
  benchmark::State& state_;
  std::array<std::byte, message_size> out_{};
};

class adapter_echo_handlers {
 public:
  explicit adapter_echo_handlers(duplex::asio::channel& ch) : ch_(ch) {}

  void next() {
    ch_.async_receive([this](std::error_code ec, duplex::message m) {
      if (ec) return;  // errc::peer_closed
      m_ = std::move(m);
      ch_.async_send(m_, [this](std::error_code ec2) {
        if (ec2) std::abort();
        next();
      });
    });
  }

 private:
  duplex::asio::channel& ch_;
  duplex::message m_;
};

// ---------------------------------------------------------------------------------------------
// The benchmarks.

enum class style { handlers, coroutines };
enum class topology { one_thread, two_threads };

// Runs the client on `client_io` in this thread, the echo on `peer_io` (the same io_context, or
// one run by a second thread), until the client has done state's iterations and the echo has
// seen its end of stream.
template <typename Start>
void run(asio::io_context& client_io, asio::io_context& peer_io, Start start) {
  start();
  std::thread peer;
  if (&peer_io != &client_io) peer = std::thread([&peer_io] { peer_io.run(); });
  client_io.run();
  if (peer.joinable()) peer.join();
}

void plain_round_trip(benchmark::State& state, style st, topology t) {
  asio::io_context client_io(1);
  asio::io_context other_io(1);
  asio::io_context& peer_io = t == topology::one_thread ? client_io : other_io;
  plain_socket a(client_io);
  plain_socket b(peer_io);
  asio::local::connect_pair(a, b);
  plain_client_handlers client(a, state);
  plain_echo_handlers echo(b);
  run(client_io, peer_io, [&] {
    if (st == style::handlers) {
      echo.next();
      client.next();
    } else {
      asio::co_spawn(peer_io, plain_echo(b), or_abort);
      asio::co_spawn(client_io, plain_client(a, state), or_abort);
    }
  });
}

void adapter_round_trip(benchmark::State& state, style st, topology t) {
  asio::io_context client_io(1);
  asio::io_context other_io(1);
  asio::io_context& peer_io = t == topology::one_thread ? client_io : other_io;
  auto ends = duplex::channel_pair(duplex::socket_kind::stream);
  if (!ends) std::abort();
  duplex::asio::channel a(client_io, std::move(ends->first));
  duplex::asio::channel b(peer_io, std::move(ends->second));
  adapter_client_handlers client(a, state);
  adapter_echo_handlers echo(b);
  run(client_io, peer_io, [&] {
    if (st == style::handlers) {
      echo.next();
      client.next();
    } else {
      asio::co_spawn(peer_io, adapter_echo(b), or_abort);
      asio::co_spawn(client_io, adapter_client(a, state), or_abort);
    }
  });
}

struct variant {
  const char* name;
  style st;
  topology t;
};

constexpr std::array<variant, 4> variants{{
    {"handlers/one_thread", style::handlers, topology::one_thread},
    {"coroutines/one_thread", style::coroutines, topology::one_thread},
    {"handlers/two_threads", style::handlers, topology::two_threads},
    {"coroutines/two_threads", style::coroutines, topology::two_threads},
}};

// The console report, plus the median time of each benchmark over its repetitions.
class ratio_reporter : public benchmark::ConsoleReporter {
 public:
  void ReportRuns(const std::vector<Run>& runs) override {
    for (const Run& r : runs) {
      if (r.run_type == Run::RT_Iteration && !r.error_occurred) {
        // With one thread, its CPU time is the round trip's whole cost, and the part of the
        // measurement the rest of the machine disturbs least; with two, the elapsed time.
        const bool one_thread = r.run_name.function_name.ends_with("one_thread");
        times_[r.run_name.function_name].push_back(one_thread ? r.GetAdjustedCPUTime()
                                                              : r.GetAdjustedRealTime());
      }
    }
    ConsoleReporter::ReportRuns(runs);
  }

  // Prints each variant's medians and their ratio.
  void print_ratios() const {
    std::printf("\nRound trip of an %zu-byte message, median of each (adapter / plain Asio):\n",
                message_size);
    for (const variant& v : variants) {
      const double adapter = median("adapter/" + std::string(v.name));
      const double plain = median("plain/" + std::string(v.name));
      if (adapter <= 0 || plain <= 0) continue;  // filtered out
      std::printf("  %-24s adapter %7.0f ns   plain %7.0f ns   ratio %.3fx   (%s time)\n", v.name,
                  adapter, plain, adapter / plain, v.t == topology::one_thread ? "CPU" : "elapsed");
    }
    std::printf("The goal: a ratio of at most 1.05.\n");
  }

 private:
  [[nodiscard]] double median(const std::string& name) const {
    const auto it = times_.find(name);
    if (it == times_.end()) return 0;
    std::vector<double> v = it->second;
    std::sort(v.begin(), v.end());
    const std::size_t n = v.size();
    return n % 2 == 1 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
  }

  std::map<std::string, std::vector<double>> times_;
};

}  // namespace

int main(int argc, char** argv) {
  // Unless the command line says otherwise: several repetitions, run in random order, so that
  // the machine's drifts in speed hit adapter and plain alike.
  std::vector<char*> args(argv, argv + argc);
  std::string repetitions = "--benchmark_repetitions=5";
  std::string interleave = "--benchmark_enable_random_interleaving=true";
  const auto given = [&args](std::string_view flag) {
    return std::any_of(args.begin(), args.end(),
                       [flag](const char* a) { return std::string_view(a).starts_with(flag); });
  };
  if (!given("--benchmark_repetitions")) args.push_back(repetitions.data());
  if (!given("--benchmark_enable_random_interleaving")) args.push_back(interleave.data());
  int n = static_cast<int>(args.size());

  // Plain and adapter side by side, variant by variant, so that drifts in the machine's speed
  // hit both alike.
  for (const variant& v : variants) {
    for (const bool adapter : {false, true}) {
      const std::string name = std::string(adapter ? "adapter/" : "plain/") + v.name;
      auto* b = benchmark::RegisterBenchmark(name.c_str(), [v, adapter](benchmark::State& state) {
        if (adapter) {
          adapter_round_trip(state, v.st, v.t);
        } else {
          plain_round_trip(state, v.st, v.t);
        }
      });
      if (v.t == topology::two_threads) b->UseRealTime();
    }
  }
  benchmark::Initialize(&n, args.data());
  if (benchmark::ReportUnrecognizedArguments(n, args.data())) return 1;
  ratio_reporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  reporter.print_ratios();
  benchmark::Shutdown();
  return 0;
}
