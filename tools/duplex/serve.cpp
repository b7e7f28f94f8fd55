// duplex serve: listen on an endpoint, and for each connection that authenticates start a
// command holding it as its channel end (fd 3, DUPLEX_FD), as `duplex run` hands a child its
// end; at most --max-clients children at once, the other clients waiting in the backlog.
//
// How serving ends:
// - SIGINT or SIGTERM: the listener is closed (no new connection; a unix socket file it made is
//   removed), connections accepted but not yet given a child are closed, running children are
//   left to finish (a signal from the terminal reached them too, in duplex's process group), and
//   once each is reaped duplex exits 0.
// - --once: after the first connection that authenticates, the listener is closed; duplex exits
//   with its child's status (128 + N if signal N killed it), or 0 if a signal came first.
// - A failure of duplex's own (the command cannot start, accept fails): accepting stops, running
//   children are left to finish, and duplex exits 1 with one line on stderr.
// A client that fails (authentication, the handshake's deadline, a malformed handshake) is one
// line on stderr, "duplex: serve: PEER: WHY", and serving goes on.
//
// Threads: the main thread starts and reaps the children and takes the signals; an acceptor
// thread blocks in listener::accept, which runs the handshakes, while fewer than max_clients
// connections are in use.
#include <fcntl.h>
#include <fmt/core.h>
#include <poll.h>
#include <pthread.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <condition_variable>
#include <csignal>
#include <cstdint>
#include <deque>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "commands.hpp"
#include "duplex/endpoint.hpp"
#include "duplex/process.hpp"
#include "relay.hpp"
#include "report.hpp"

namespace duplex::cli {
namespace {

// The signals that stop a serve.
constexpr std::array stop_signals{SIGTERM, SIGINT};

// What the acceptor thread hands the main thread.
struct accept_queue {
  std::mutex mutex;
  std::condition_variable room;  // in_use fell below the limit, or stop
  std::size_t in_use = 0;        // connections accepted and not yet ended
  std::size_t limit = 1;
  bool once = false;
  bool stop = false;   // no more accept calls
  bool ended = false;  // the acceptor has returned
  std::deque<connection> ready;
  std::error_code failure;  // accept's own error, if that ended the acceptor
  unique_fd notify;         // an eventfd, written after each change above
};

void notify(accept_queue& q) {
  const std::uint64_t one = 1;
  static_cast<void>(::write(q.notify.get(), &one, sizeof one));
}

void acceptor(listener& l, accept_queue& q) {
  for (;;) {
    {
      std::unique_lock lock(q.mutex);
      q.room.wait(lock, [&] { return q.stop || q.in_use < q.limit; });
      if (q.stop) break;
    }
    auto c = l.accept();
    const std::lock_guard lock(q.mutex);
    if (!c) {
      if (c.error() != errc::closed) q.failure = c.error();
      break;
    }
    ++q.in_use;
    q.ready.push_back(std::move(*c));
    if (q.once) break;
    notify(q);
  }
  const std::lock_guard lock(q.mutex);
  q.stop = true;
  q.ended = true;
  notify(q);
}

}  // namespace

int serve_command(const serve_options& o) {
  listener_options options;
  options.endpoint.kind = o.kind;
  options.endpoint.channel.format = o.format;
  if (!o.authkey_file.empty()) {
    auto key = read_authkey_file(o.authkey_file);
    if (!key) {
      return report_failure(fmt::format("serve: cannot read the authkey file '{}'", o.authkey_file),
                            key.error());
    }
    options.endpoint.authkey = std::move(*key);
  }
  options.on_failure = [](const accept_failure& f) {
    report_failure(fmt::format("serve: {}: {}", f.peer, f.detail));
  };
  if (auto ec = catch_signals(stop_signals); ec)
    return report_failure("serve: signal handlers", ec);
  auto l = listener::listen(o.at, std::move(options));
  if (!l) {
    return report_failure(fmt::format("serve: cannot listen on {}", o.at.to_string()), l.error());
  }

  accept_queue q;
  q.limit = o.once ? 1 : o.max_clients;
  q.once = o.once;
  q.notify = unique_fd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!q.notify.valid()) return report_failure("serve: eventfd", {errno, std::system_category()});

  // The acceptor starts with the stop signals blocked, so they all reach the main thread.
  sigset_t blocked;
  sigset_t old;
  sigemptyset(&blocked);
  for (const int sig : stop_signals)
    sigaddset(&blocked, sig);
  ::pthread_sigmask(SIG_BLOCK, &blocked, &old);
  std::thread accepting(acceptor, std::ref(*l), std::ref(q));
  ::pthread_sigmask(SIG_SETMASK, &old, nullptr);

  bool joined = false;
  // Stops the accepting for good: the acceptor leaves accept (close wakes it) and is joined;
  // connections it took that have no child yet are closed.
  auto stop_accepting = [&] {
    if (joined) return;
    {
      const std::lock_guard lock(q.mutex);
      q.stop = true;
    }
    q.room.notify_all();
    l->close();
    accepting.join();
    joined = true;
    const std::lock_guard lock(q.mutex);
    q.in_use -= q.ready.size();
    q.ready.clear();
  };

  spawn_options spawning;
  spawning.stdin_mode = stdio_mode::null;  // duplex's stdin is not the children's
  std::vector<child> children;
  std::optional<exit_status> once_status;
  int status = 0;
  bool stopping = false;
  for (;;) {
    // Connections to start a child for.
    std::deque<connection> taken;
    bool ended = false;
    std::error_code failure;
    {
      const std::lock_guard lock(q.mutex);
      taken.swap(q.ready);
      ended = q.ended;
      failure = q.failure;
    }
    for (auto& c : taken) {
      // The child gets a copy of the connection's fd; this process keeps none.
      unique_fd end;
      int dup_error = 0;
      if (!stopping) {
        end = unique_fd(::fcntl(c.chan.native_handle(), F_DUPFD_CLOEXEC, 3));
        if (!end.valid()) dup_error = errno;
      }
      c.chan.close();
      c.peer_pidfd.reset();
      if (stopping) {
        const std::lock_guard lock(q.mutex);
        --q.in_use;
        continue;
      }
      auto started =
          end.valid()
              ? spawn(o.command, std::move(end), spawning)
              : result<child>(std::unexpected(std::error_code(dup_error, std::system_category())));
      if (!started) {
        {
          const std::lock_guard lock(q.mutex);
          --q.in_use;
        }
        status =
            report_failure(fmt::format("serve: cannot start '{}'", o.command[0]), started.error());
        stopping = true;
        continue;
      }
      children.push_back(std::move(*started));
    }
    if (ended && !stopping) {
      if (failure) status = report_failure("serve: accept", failure);
      stopping = true;  // with --once: the one connection is served
    }
    if (stopping) stop_accepting();
    if (stopping && children.empty()) break;

    std::vector<pollfd> fds;
    fds.push_back({wake_read_end(), POLLIN, 0});
    fds.push_back({q.notify.get(), POLLIN, 0});
    for (const auto& c : children)
      fds.push_back({c.pidfd(), POLLIN, 0});
    if (::poll(fds.data(), fds.size(), -1) < 0 && errno != EINTR) {
      status = report_failure("serve: poll", {errno, std::system_category()});
      stopping = true;
      continue;
    }
    if (fds[0].revents != 0) {
      std::array<unsigned char, 64> bytes{};
      while (::read(wake_read_end(), bytes.data(), bytes.size()) > 0) {
      }
      stopping = true;
    }
    if (fds[1].revents != 0) {
      std::uint64_t count = 0;
      static_cast<void>(::read(q.notify.get(), &count, sizeof count));
    }
    // Reap the children that ended; each frees a place for the next client.
    std::size_t reaped = 0;
    for (std::size_t i = fds.size(); i-- > 2;) {
      if (fds[i].revents == 0) continue;
      child& c = children[i - 2];
      auto s = c.try_wait();
      if (s && !*s) continue;
      if (s && o.once) once_status = **s;
      children.erase(children.begin() + static_cast<std::ptrdiff_t>(i - 2));
      ++reaped;
    }
    if (reaped != 0) {
      {
        const std::lock_guard lock(q.mutex);
        q.in_use -= reaped;
      }
      q.room.notify_all();
    }
  }
  if (status == 0 && once_status) return once_status->shell_code();
  return status;
}

}  // namespace duplex::cli
