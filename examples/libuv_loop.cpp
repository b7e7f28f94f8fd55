// A duplex channel in a libuv loop: uv_poll_t watches the channel's fd and the child's pidfd;
// the callbacks make duplex's non-blocking calls.
#include <uv.h>

#include <cstdlib>
#include <iostream>
#include <string>

#include "duplex/duplex.hpp"

namespace {

constexpr int requests = 5;

// The worker process: doubles every number it receives until the parent half-closes.
int worker(duplex::channel& parent) {
  for (;;) {
    auto n = parent.receive_value<int>();
    if (!n) return n.error() == duplex::errc::peer_closed ? 0 : 1;
    if (!parent.send_value(*n * 2)) return 2;
  }
}

struct state {
  duplex::child child;
  uv_poll_t channel_watch{};
  uv_poll_t exit_watch{};
  int replies = 0;
};

void on_channel(uv_poll_t* handle, int status, int events) {
  auto* s = static_cast<state*>(handle->data);
  auto& ch = s->child.channel();
  if (status < 0) {
    std::cerr << "uv_poll: " << uv_strerror(status) << '\n';
    uv_stop(handle->loop);
    return;
  }
  if ((events & UV_WRITABLE) != 0) static_cast<void>(ch.flush());
  if ((events & (UV_READABLE | UV_DISCONNECT)) != 0) {
    for (;;) {  // drain: several replies may be buffered
      auto m = ch.try_receive();
      if (!m) break;
      auto value = duplex::codec<int>::decode(m->bytes());
      std::cout << "Reply " << s->replies << ": " << (value ? *value : -1) << std::endl;
      if (++s->replies == requests) static_cast<void>(ch.shutdown_send());
    }
  }
  // Watch for writability only while the channel has queued bytes.
  const int wanted = UV_READABLE | UV_DISCONNECT | (ch.wants_write() ? UV_WRITABLE : 0);
  if (s->replies == requests) {
    uv_poll_stop(handle);
  } else {
    uv_poll_start(handle, wanted, on_channel);
  }
}

void on_exit(uv_poll_t* handle, int /*status*/, int /*events*/) {
  auto* s = static_cast<state*>(handle->data);
  auto status = s->child.try_wait();  // the pidfd is readable: the child has exited
  if (status && *status) {
    std::cout << "Worker " << (*status)->describe() << std::endl;
    uv_poll_stop(handle);
    uv_poll_stop(&s->channel_watch);
  }
}

}  // namespace

int run() {
  // Killed by the kernel if this process dies by a signal, when no destructor reaps it.
  auto c = duplex::fork_with_channel(worker, {.kill_on_parent_death = true});
  if (!c) {
    std::cerr << "fork_with_channel: " << c.error().message() << '\n';
    return EXIT_FAILURE;
  }
  state s{std::move(*c)};
  for (int i = 1; i <= requests; ++i) {
    std::vector<std::byte> bytes;
    duplex::codec<int>::encode(i * 10, bytes);
    if (!s.child.channel().try_send(bytes)) return EXIT_FAILURE;  // queued if need be
  }

  uv_loop_t* loop = uv_default_loop();
  uv_poll_init(loop, &s.channel_watch, s.child.channel().native_handle());
  uv_poll_init(loop, &s.exit_watch, s.child.pidfd());
  s.channel_watch.data = &s;
  s.exit_watch.data = &s;
  uv_poll_start(&s.channel_watch, UV_READABLE | UV_DISCONNECT | UV_WRITABLE, on_channel);
  uv_poll_start(&s.exit_watch, UV_READABLE, on_exit);
  uv_run(loop, UV_RUN_DEFAULT);

  uv_close(reinterpret_cast<uv_handle_t*>(&s.channel_watch), nullptr);
  uv_close(reinterpret_cast<uv_handle_t*>(&s.exit_watch), nullptr);
  uv_run(loop, UV_RUN_DEFAULT);  // let the closes finish
  uv_loop_close(loop);
  std::cout << "Done: " << s.replies << " replies through libuv." << std::endl;
  return s.replies == requests && s.child.status() && s.child.status()->success() ? EXIT_SUCCESS
                                                                                  : EXIT_FAILURE;
}

// What the example printed is its result: output that could not be written (a full disk, a
// closed pipe) is a failure, not an exit status of 0.
int main() {
  const int status = run();
  if (!std::cout.flush()) {
    std::cerr << "libuv_loop: output lost\n";
    return EXIT_FAILURE;
  }
  return status;
}
