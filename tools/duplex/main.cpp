// duplex - the command-line face of the library: demo, info, run, connect, serve, bench.
//
// Exit status: 0 on success, 2 on bad usage, 1 on failure with a one-line error on stderr.
#include <fmt/core.h>
#include <CLI/CLI.hpp>

#include <algorithm>
#include <cstdio>
#include <iostream>
#include <sstream>
#include <string>

#include "commands.hpp"
#include "duplex/version.hpp"
#include "report.hpp"
#include "stdio.hpp"

namespace duplex::cli {

// CLI11's help or version text, written as any other output so that finish_output can tell its
// loss with the reason (CLI11 itself ends the version with std::endl, a flush whose errno it
// drops).
int print_cli_exit(const CLI::App& app, const CLI::Error& e) {
  std::ostringstream out;
  std::ostringstream err;
  const int status = app.exit(e, out, err);
  static_cast<void>(write_stdout(out.str()));
  std::fputs(err.str().c_str(), stderr);
  return finish_output(status);
}

// The address, --kind and --framing of a verb that reaches an endpoint (connect, serve).
void add_endpoint_options(CLI::App* verb, std::string& address, std::string& kind,
                          std::string& format) {
  verb->add_option("address", address, "ADDRESS: unix:PATH, unix:@NAME or tcp:HOST:PORT")
      ->required();
  verb->add_option("--kind", kind, "Socket kind on unix addresses: stream or seqpacket")
      ->check(CLI::IsMember({"stream", "seqpacket"}));
  verb->add_option("--framing", format,
                   "Wire format: native (duplex's) or python (multiprocessing.connection)")
      ->check(CLI::IsMember({"native", "python"}));
}

}  // namespace duplex::cli

int main(int argc, char** argv) {
  // First of all: no fd opened below may take the number of a closed stdin, stdout or stderr.
  if (const auto ec = duplex::cli::keep_stdio_open(); ec) {
    return duplex::cli::report_failure("cannot hold a closed stdin, stdout or stderr open", ec);
  }
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
      "duplex exits with CMD's status (128 + N if a signal N killed it). If CMD breaks the "
      "protocol, a line cannot be sent (over the maximum message size, or a seqpacket packet), "
      "or stdin cannot be read or stdout written, CMD is killed and duplex exits 1 with one "
      "line; a closed stdout pipe ends CMD and duplex dies of SIGPIPE. SIGTERM, SIGINT, SIGHUP "
      "and SIGQUIT are passed on to CMD (SIGKILL after 5 s), then duplex dies of the signal.");
  run->add_option("--kind", kind, "Socket kind of the pair: stream or seqpacket")
      ->check(CLI::IsMember({"stream", "seqpacket"}));
  run->add_option("--framing", format,
                  "Wire format: native (duplex's) or python (multiprocessing.connection)")
      ->check(CLI::IsMember({"native", "python"}));
  run->add_option("--fd", run_opts.fd,
                  "The fd number of the child's end (default 3; below the open-file limit, "
                  "RLIMIT_NOFILE)")
      ->check(CLI::Range(3, 1 << 20));
  run->add_option("command", run_opts.command, "CMD [ARG...], after --")->required();
  run->footer("Example: duplex run --framing python -- python3 worker.py < requests.txt");

  duplex::cli::connect_options connect_opts;
  std::string connect_address;
  std::string connect_kind = "stream";
  std::string connect_format = "native";
  double connect_timeout = -1;
  CLI::App* connect = app.add_subcommand(
      "connect",
      "Connect to an endpoint (unix:PATH, unix:@NAME, tcp:HOST:PORT), authenticated with a key "
      "from a file if given, as CPython's multiprocessing.connection.Client does: each line of "
      "stdin is sent as one message, each message received is printed as one line. Exits 0 once "
      "stdin has ended and the peer has closed; 1 with one line on stderr if the connection is "
      "refused or times out, authentication fails, or the peer breaks the protocol. Signals and "
      "output errors end it as they end 'duplex run'.");
  duplex::cli::add_endpoint_options(connect, connect_address, connect_kind, connect_format);
  connect
      ->add_option("--authkey-file", connect_opts.authkey_file,
                   "Authenticate with the key in FILE (every byte of it; CPython's authkey)")
      ->type_name("FILE");
  connect
      ->add_option("--timeout", connect_timeout,
                   "Give up connecting and authenticating after SECONDS (default: no limit)")
      ->type_name("SECONDS")
      ->check(CLI::Range(0.0, 1e9));
  connect->footer(
      "Example: duplex connect --framing python --authkey-file key tcp:127.0.0.1:6000 < "
      "requests.txt");

  duplex::cli::serve_options serve_opts;
  std::string serve_address;
  std::string serve_kind = "stream";
  std::string serve_format = "native";
  std::size_t max_clients = 0;
  CLI::App* serve = app.add_subcommand(
      "serve",
      "Listen on an endpoint (unix:PATH, unix:@NAME, tcp:HOST:PORT) and, for each connection "
      "that authenticates (with a key from a file if given, as CPython's "
      "multiprocessing.connection.Listener does), start CMD holding it as its channel end (at "
      "fd 3, named by DUPLEX_FD, as 'duplex run' does). At most --max-clients children run at "
      "once; other clients wait. A refused client is one line on stderr. SIGINT and SIGTERM "
      "stop the accepting, let running children finish, and exit 0; --once serves one "
      "connection and exits with CMD's status.");
  duplex::cli::add_endpoint_options(serve, serve_address, serve_kind, serve_format);
  serve
      ->add_option("--authkey-file", serve_opts.authkey_file,
                   "Authenticate each client with the key in FILE (every byte of it)")
      ->type_name("FILE");
  serve
      ->add_option("--max-clients", max_clients,
                   "Run at most N children at once (default: no limit)")
      ->type_name("N")
      ->check(CLI::Range(1, 1 << 20));
  serve->add_flag("--once", serve_opts.once, "Serve one connection, then exit with CMD's status");
  serve->add_option("command", serve_opts.command, "CMD [ARG...], after --")->required();
  serve->footer(
      "Example: duplex serve --framing python --authkey-file key unix:/run/app.sock -- python3 "
      "worker.py");

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
                   "anywhere in the name), with the raw rows their ratios need. Syntax: . [ ] ^ $ "
                   "( ) | * + ? and \\ before punctuation; matched in time linear in the name")
      ->type_name("REGEX");
  bench->add_flag("--list", bench_opts.list,
                  "Print the names of the rows that would be measured, one a line, and measure "
                  "nothing");
  bench->footer(duplex::cli::bench_help());

  const auto is_command = [&app](const std::string& name) {
    const auto all = app.get_subcommands([](CLI::App*) { return true; });
    return std::any_of(all.begin(), all.end(), [&](CLI::App* c) { return c->check_name(name); });
  };
  if (argc > 1 && argv[1][0] != '-' && !is_command(argv[1])) {
    return duplex::cli::report_usage(
        fmt::format("unknown command '{}' (see 'duplex --help')", argv[1]));
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return duplex::cli::print_cli_exit(app, e);
  } catch (const CLI::CallForAllHelp& e) {
    return duplex::cli::print_cli_exit(app, e);
  } catch (const CLI::CallForVersion& e) {
    return duplex::cli::print_cli_exit(app, e);
  } catch (const CLI::ParseError& e) {
    return duplex::cli::report_usage(fmt::format("{} (see 'duplex --help')", e.what()));
  }

  try {
    if (demo->parsed()) return duplex::cli::finish_output(duplex::cli::run_demo(scenario));
    if (info->parsed()) return duplex::cli::finish_output(duplex::cli::run_info(json));
    if (bench->parsed()) return duplex::cli::finish_output(duplex::cli::run_bench(bench_opts));
    if (connect->parsed() || serve->parsed()) {
      const bool is_connect = connect->parsed();
      const std::string verb = is_connect ? "connect" : "serve";
      const std::string& text = is_connect ? connect_address : serve_address;
      auto at = duplex::address::parse(text);
      if (!at) {
        return duplex::cli::report_usage(
            fmt::format("{}: '{}' is not an address: {} (see 'duplex {} --help')", verb, text,
                        duplex::describe_address_error(text), verb));
      }
      duplex::cli::endpoint_command_options& e =
          is_connect ? static_cast<duplex::cli::endpoint_command_options&>(connect_opts)
                     : static_cast<duplex::cli::endpoint_command_options&>(serve_opts);
      e.at = *at;
      const std::string& k = is_connect ? connect_kind : serve_kind;
      const std::string& f = is_connect ? connect_format : serve_format;
      e.kind = k == "seqpacket" ? duplex::socket_kind::seqpacket : duplex::socket_kind::stream;
      e.format = f == "python" ? duplex::framing::python : duplex::framing::native;
      if (e.kind == duplex::socket_kind::seqpacket && at->kind() == duplex::address_kind::tcp) {
        return duplex::cli::report_usage(fmt::format(
            "{}: --kind seqpacket needs a unix address (see 'duplex {} --help')", verb, verb));
      }
      if (e.format == duplex::framing::python && e.kind != duplex::socket_kind::stream) {
        return duplex::cli::report_usage(fmt::format(
            "{}: --framing python needs --kind stream (see 'duplex {} --help')", verb, verb));
      }
      if (is_connect) {
        if (connect_timeout >= 0) {
          connect_opts.timeout = std::chrono::duration_cast<std::chrono::nanoseconds>(
              std::chrono::duration<double>(connect_timeout));
        }
        return duplex::cli::finish_output(duplex::cli::connect_command(connect_opts));
      }
      if (max_clients != 0) serve_opts.max_clients = max_clients;
      return duplex::cli::finish_output(duplex::cli::serve_command(serve_opts));
    }
    if (run->parsed()) {
      run_opts.kind =
          kind == "seqpacket" ? duplex::socket_kind::seqpacket : duplex::socket_kind::stream;
      run_opts.format = format == "python" ? duplex::framing::python : duplex::framing::native;
      if (run_opts.format == duplex::framing::python &&
          run_opts.kind != duplex::socket_kind::stream) {
        return duplex::cli::report_usage(
            "run: --framing python needs --kind stream (see 'duplex run --help')");
      }
      return duplex::cli::finish_output(duplex::cli::run_command(run_opts));
    }
  } catch (const std::exception& e) {
    return duplex::cli::report_failure(e.what());
  }
  return 2;
}
