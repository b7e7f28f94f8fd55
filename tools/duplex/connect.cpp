// duplex connect: connect to an endpoint (authenticating with a key from a file) and relay stdin
// lines to it and its messages to stdout, as `duplex run` relays with a child (relay.hpp).
#include <fmt/core.h>

#include <memory>
#include <string>

#include "commands.hpp"
#include "duplex/endpoint.hpp"
#include "relay.hpp"
#include "report.hpp"

namespace duplex::cli {

int connect_command(const connect_options& o) {
  endpoint_options options;
  options.kind = o.kind;
  options.channel.format = o.format;
  if (!o.authkey_file.empty()) {
    auto key = read_authkey_file(o.authkey_file);
    if (!key) {
      return report_failure(
          fmt::format("connect: cannot read the authkey file '{}'", o.authkey_file), key.error());
    }
    options.authkey = std::move(*key);
  }
  // The signals keep their default actions while connecting: a signal then ends duplex at once.
  std::string detail;
  auto ch = connect(o.at, options, o.timeout, detail);
  if (!ch) {
    if (detail.empty()) detail = o.at.to_string();
    // The detail names the step; the error's own words are added unless it has them already.
    const std::string why = ch.error().message();
    if (detail.find(why) == std::string::npos) detail += ": " + why;
    return report_failure("connect: " + detail);
  }
  if (auto ec = catch_signals(relayed_signals); ec) {
    return report_failure("connect: signal handlers", ec);
  }
  return relay_messages(std::make_shared<channel>(std::move(*ch)), nullptr, "connect",
                        o.at.to_string());
}

}  // namespace duplex::cli
