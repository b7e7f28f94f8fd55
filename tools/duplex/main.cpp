// duplex - the command-line face of the library: demo, info, run, bench.
//
// Exit status: 0 on success, 2 on bad usage, 1 on failure with a one-line error on stderr.
#include <fmt/core.h>
#include <CLI/CLI.hpp>

#include <algorithm>
#include <string>

#include "commands.hpp"
#include "duplex/version.hpp"

namespace duplex::cli {

int report_failure(std::string_view what, const std::error_code& ec) {
  fmt::print(stderr, "duplex: {}: {}\n", what, ec.message());
  return 1;
}

int report_failure(std::string_view what) {
  fmt::print(stderr, "duplex: {}\n", what);
  return 1;
}

}  // namespace duplex::cli

int main(int argc, char** argv) {
  CLI::App app{"duplex: full-duplex local communication over socketpair(2).", "duplex"};
  app.set_version_flag("--version", std::string("duplex ") + DUPLEX_VERSION_STRING);
  app.require_subcommand(1);
  app.footer("Run 'duplex COMMAND --help' for the options of a command.");

  std::string scenario;
  CLI::App* demo = app.add_subcommand(
      "demo",
      "Run the socketpair tutorial's scenarios with the library: a parent and a forked "
      "child (fork), datagram boundaries (dgram), two threads (threads), or all.");
  demo->add_option("scenario", scenario, "fork, dgram, threads or all")
      ->required()
      ->check(CLI::IsMember({"fork", "dgram", "threads", "all"}));

  bool json = false;
  CLI::App* info = app.add_subcommand(
      "info",
      "Print this system's facts for the library: kernel, socket buffer sizes, the "
      "largest datagram and seqpacket that really go through, fds per message, and "
      "which features work.");
  info->add_flag("--json", json, "Print one JSON object instead of text");

  duplex::cli::run_options run_opts;
  std::string kind = "stream";
  std::string format = "native";
  CLI::App* run = app.add_subcommand(
      "run",
      "Start CMD holding one end of a channel (at fd 3, named by DUPLEX_FD): each line of "
      "stdin is sent as one message, each message received is printed as one line, and "
      "duplex exits with CMD's status (128 + N if a signal N killed it).");
  run->add_option("--kind", kind, "Socket kind of the pair: stream or seqpacket")
      ->check(CLI::IsMember({"stream", "seqpacket"}));
  run->add_option("--framing", format,
                  "Wire format: native (duplex's) or python (multiprocessing.connection)")
      ->check(CLI::IsMember({"native", "python"}));
  run->add_option("--fd", run_opts.fd, "The fd number of the child's end (default 3)")
      ->check(CLI::Range(3, 1 << 20));
  run->add_option("command", run_opts.command, "CMD [ARG...], after --")->required();
  run->footer("Example: duplex run --framing python -- python3 worker.py < requests.txt");

  duplex::cli::bench_options bench_opts;
  CLI::App* bench = app.add_subcommand(
      "bench",
      "Measure duplex beside the raw syscalls, pipes and memcpy, in one run: round trips "
      "(threads and forked processes; blocking and busy-poll) and throughput (64 B to 16 MiB; "
      "batches; shared memory). Prints a table with each duplex row's ratio to its raw "
      "baseline, then the project's goals with PASS or FAIL.");
  bench->add_flag("--quick", bench_opts.quick,
                  "Fewer sizes, repetitions and iterations (under 20 s); every goal is still "
                  "measured");
  bench
      ->add_option("--json", bench_opts.json,
                   "Write the results as one JSON object to FILE ('-': to stdout, instead of "
                   "the table)")
      ->type_name("FILE");
  bench->add_option("--svg", bench_opts.svg, "Write a self-contained SVG chart to FILE")
      ->type_name("FILE");
  bench
      ->add_option("--filter", bench_opts.filter,
                   "Measure only the rows whose name the regular expression matches (searched "
                   "anywhere in the name), with the raw rows their ratios need")
      ->type_name("REGEX")
      ->check(duplex::cli::bench_filter_error);
  bench->footer(duplex::cli::bench_help());

  const auto is_command = [&app](const std::string& name) {
    const auto all = app.get_subcommands([](CLI::App*) { return true; });
    return std::any_of(all.begin(), all.end(), [&](CLI::App* c) { return c->check_name(name); });
  };
  if (argc > 1 && argv[1][0] != '-' && !is_command(argv[1])) {
    fmt::print(stderr, "duplex: unknown command '{}' (see 'duplex --help')\n", argv[1]);
    return 2;
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    fmt::print(stderr, "duplex: {} (see 'duplex --help')\n", e.what());
    return 2;
  }

  try {
    if (demo->parsed()) return duplex::cli::run_demo(scenario);
    if (info->parsed()) return duplex::cli::run_info(json);
    if (bench->parsed()) return duplex::cli::run_bench(bench_opts);
    if (run->parsed()) {
      run_opts.kind =
          kind == "seqpacket" ? duplex::socket_kind::seqpacket : duplex::socket_kind::stream;
      run_opts.format = format == "python" ? duplex::framing::python : duplex::framing::native;
      if (run_opts.format == duplex::framing::python &&
          run_opts.kind != duplex::socket_kind::stream) {
        fmt::print(stderr,
                   "duplex: run: --framing python needs --kind stream (see 'duplex run --help')\n");
        return 2;
      }
      return duplex::cli::run_command(run_opts);
    }
  } catch (const std::exception& e) {
    return duplex::cli::report_failure(e.what());
  }
  return 2;
}
