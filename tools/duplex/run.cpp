// duplex run: start a command holding a channel end; lines of stdin become messages to it, and
// messages from it become lines on stdout (relay.hpp, which lists every way a run ends). Exits
// with the command's status. If duplex is killed by SIGKILL, the kernel kills CMD
// (PR_SET_PDEATHSIG).
#include <fmt/core.h>
#include <sys/resource.h>

#include <memory>
#include <string>

#include "commands.hpp"
#include "duplex/duplex.hpp"
#include "relay.hpp"
#include "report.hpp"

namespace duplex::cli {

int run_command(const run_options& o) {
  // The child's end is moved to o.fd, which the kernel refuses at or above the soft limit.
  rlimit files{};
  if (::getrlimit(RLIMIT_NOFILE, &files) == 0 && files.rlim_cur != RLIM_INFINITY &&
      static_cast<rlim_t>(o.fd) >= files.rlim_cur) {
    fmt::print(stderr,
               "duplex: run: --fd {} is not below the limit on open files (RLIMIT_NOFILE: {})\n",
               o.fd, files.rlim_cur);
    return 2;
  }
  // Before the child exists, so that no signal finds duplex at its default and the child orphaned.
  if (auto ec = catch_signals(relayed_signals); ec) {
    return report_failure("run: signal handlers", ec);
  }

  spawn_options options;
  options.kind = o.kind;
  options.child_fd = o.fd;
  options.channel.format = o.format;
  options.kill_on_parent_death = true;  // spawned from the main thread, which lives to the end
  auto started = spawn(o.command, options);
  if (!started) {
    return report_failure(fmt::format("run: cannot start '{}'", o.command[0]), started.error());
  }
  auto child = std::make_shared<duplex::child>(std::move(*started));
  std::shared_ptr<channel> ch(child, &child->channel());  // the child owns it
  return relay_messages(std::move(ch), child.get(), "run", o.command[0]);
}

}  // namespace duplex::cli
