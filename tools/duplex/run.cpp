// duplex run: start a command holding a channel end; lines of stdin become messages to it, and
// messages from it become lines on stdout. Exits with the command's status.
#include <fmt/core.h>
#include <unistd.h>

#include <cstdio>
#include <iostream>
#include <memory>
#include <string>
#include <thread>

#include "commands.hpp"
#include "duplex/duplex.hpp"

namespace duplex::cli {
namespace {

// Why a run ends early, in words, for the one-line error.
std::string what_went_wrong(const std::string& name, const channel& ch, const std::error_code& ec) {
  if (ec == errc::truncated_message) return name + " stopped in the middle of a message";
  std::string detail = ch.error_detail();
  if (detail.empty()) detail = ec.message();
  return name + " broke the protocol: " + detail;
}

}  // namespace

int run_command(const run_options& o) {
  spawn_options options;
  options.kind = o.kind;
  options.child_fd = o.fd;
  options.channel.format = o.format;
  auto started = spawn(o.command, options);
  if (!started) {
    return report_failure(fmt::format("run: cannot start '{}'", o.command[0]), started.error());
  }
  // Shared with the feeder thread, which may still be inside a send when this function returns:
  // the channel lives as long as either of them needs it.
  auto child = std::make_shared<duplex::child>(std::move(*started));
  channel& ch = child->channel();

  // Lines of stdin to messages, on a thread of their own, so that a child that sends without
  // reading can never block the messages coming back.
  std::thread feeder([child, &ch] {
    std::string line;
    while (std::getline(std::cin, line)) {
      if (!ch.send(as_bytes(line))) return;  // the child is gone: nothing more to feed
    }
    static_cast<void>(ch.shutdown_send());  // end of input: the child sees end-of-stream
  });
  feeder.detach();  // it may be blocked reading stdin; the process exits without waiting for it

  const bool interactive = ::isatty(STDOUT_FILENO) != 0;
  for (;;) {
    auto m = ch.try_receive();
    if (!m && m.error() == errc::would_block) {
      std::fflush(stdout);  // everything so far is out before we wait
      m = ch.receive();
    }
    if (!m) {
      std::fflush(stdout);
      if (m.error() == errc::peer_closed) break;
      const std::string why = what_went_wrong(o.command[0], ch, m.error());
      static_cast<void>(child->kill(SIGKILL));
      static_cast<void>(child->wait());
      return report_failure("run: " + why);
    }
    // An empty message has no storage; fwrite must not be handed its null pointer.
    if (m->size() != 0) std::fwrite(m->bytes().data(), 1, m->size(), stdout);
    std::fputc('\n', stdout);
    if (interactive) std::fflush(stdout);
  }
  auto status = child->wait();
  if (!status) return report_failure("run: wait", status.error());
  std::fflush(stdout);
  return status->shell_code();
}

}  // namespace duplex::cli
