// duplex - the command-line face of the library: demo, info.
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
  } catch (const std::exception& e) {
    return duplex::cli::report_failure(e.what());
  }
  return 2;
}
