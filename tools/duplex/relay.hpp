// The relay of `duplex run` and `duplex connect`: each line of stdin is sent as one message on a
// channel, each message received is printed as one line on stdout; and the signal handling
// those commands and `duplex serve` share (a wake pipe the handlers write to).
//
// How a relay ends, in every case (the README's CLI section says the same to users):
// - The peer closes its end (with a child: and the child exits): every message has been printed;
//   the status is the child's (128 + N if signal N killed it), or 0 without a child. If the peer
//   closes before reading all of stdin, the rest of stdin is left unread: that is the peer's
//   choice, not a failure.
// - A failure of duplex's own (the peer breaks the protocol, a stdin line cannot be sent, stdin
//   cannot be read, stdout cannot be written): the child, if any, is killed (SIGKILL) and reaped,
//   what was received before is printed, and the status is 1 with one line on stderr.
// - EPIPE on stdout (the reader left, as in `... | head -1`): the child is killed and reaped, and
//   duplex dies of SIGPIPE without a word, as coreutils do; if SIGPIPE was ignored when duplex
//   started, it is a write error as above.
// - SIGTERM, SIGINT, SIGHUP or SIGQUIT: passed on to the child (unless the terminal sent it,
//   which reached the child too), SIGKILL after a grace period; once the child is reaped (at once
//   without one), duplex dies of the same signal. A signal ignored when duplex started stays
//   ignored (nohup).
#pragma once

#include <array>
#include <csignal>
#include <memory>
#include <span>
#include <string>
#include <system_error>

#include "duplex/channel.hpp"
#include "duplex/process.hpp"

namespace duplex::cli {

// The signals a relay catches and passes on to its child.
inline constexpr std::array relayed_signals{SIGTERM, SIGINT, SIGHUP, SIGQUIT};

// Makes the wake pipe (once) and installs handlers for `signals` that write each signal's number
// to it (+ 0x80 when the kernel sent it, e.g. the terminal's Ctrl-C), and an empty SIGPIPE
// handler so that writes to a closed stdout return EPIPE. A signal ignored when duplex started
// stays ignored. Call it from the main thread before starting any thread or child.
[[nodiscard]] std::error_code catch_signals(std::span<const int> signals);

// The wake pipe's read end (non-blocking), for poll: a byte per caught signal; -1 before
// catch_signals.
[[nodiscard]] int wake_read_end() noexcept;

// Dies of sig (its default action), as the shell expects of a program a signal ended; returns
// 128 + sig only if that somehow fails.
int die_of(int sig);

// Relays stdin lines to ch and ch's messages to stdout lines until one of the endings listed
// above, with c (null: none) the child at ch's other end, and returns the exit status. verb
// ("run", "connect") opens each one-line error; name says who the peer is in them ("CMD broke
// the protocol: ..."). catch_signals(relayed_signals) must have been called. Does not return
// when duplex must die of a signal. Call it once, from the main thread.
int relay_messages(std::shared_ptr<channel> ch, child* c, std::string verb, std::string name);

}  // namespace duplex::cli
