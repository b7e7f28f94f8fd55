// duplex/detail/asio.hpp - the machinery behind duplex/asio.hpp. Not a public header: include
// duplex/asio.hpp; the names here may change.
//
// The three operations (receive, send, flush) are written once, as steps (receive_steps,
// send_steps, flush_steps: make the channel's non-blocking call, or say what to wait for), and run
// one of two ways, as DUPLEX_ASIO_REACTOR (below) says:
//
//   - 1: each operation is one of Asio's reactor operations (channel_op) on a registration of the
//     channel's duplicate fd with Asio's epoll reactor (reactor_watch), started through
//     `initiate`. This uses Asio's detail interface as Asio 1.22-1.27 have it.
//   - 0: each operation is an async_compose (composed_op) over
//     posix::stream_descriptor::async_wait, Asio's public interface only.
//
// Either way, channel_state holds what the operations share with the channel object (on the heap,
// so that a moved channel's operations carry on), and start() begins an operation.
#pragma once

#include <fcntl.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <asio/any_io_executor.hpp>
#include <asio/associated_cancellation_slot.hpp>
#include <asio/associated_executor.hpp>
#include <asio/async_result.hpp>
#include <asio/cancellation_type.hpp>
#include <asio/compose.hpp>
#include <asio/error.hpp>
#include <asio/execution_context.hpp>
#include <asio/posix/stream_descriptor.hpp>
#include <asio/post.hpp>
#include <asio/steady_timer.hpp>
#include <asio/version.hpp>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <concepts>
#include <cstdint>
#include <memory>
#include <span>
#include <system_error>
#include <type_traits>
#include <utility>

#include "duplex/buffer.hpp"
#include "duplex/channel.hpp"
#include "duplex/endpoint.hpp"
#include "duplex/error.hpp"
#include "duplex/message.hpp"

// 1 if operations are Asio reactor operations (Asio 1.22-1.27 on epoll, unless
// DUPLEX_ASIO_PORTABLE is defined), 0 if they are async_compose over async_wait.
#if !defined(DUPLEX_ASIO_PORTABLE) && defined(ASIO_HAS_EPOLL) && \
    !defined(ASIO_HAS_IO_URING_AS_DEFAULT) && ASIO_VERSION >= 102200 && ASIO_VERSION < 102800
#define DUPLEX_ASIO_REACTOR 1
#include <asio/detail/bind_handler.hpp>
#include <asio/detail/epoll_reactor.hpp>
#include <asio/detail/fenced_block.hpp>
#include <asio/detail/handler_alloc_helpers.hpp>
#include <asio/detail/handler_cont_helpers.hpp>
#include <asio/detail/handler_work.hpp>
#include <asio/detail/non_const_lvalue.hpp>
#include <asio/detail/reactor_op.hpp>
#include <asio/execution/context.hpp>
#include <asio/query.hpp>
#else
#define DUPLEX_ASIO_REACTOR 0
#endif

#if !defined(ASIO_HAS_CONCEPTS)
#error "duplex/asio.hpp needs Asio's C++20 concepts (do not define ASIO_DISABLE_CONCEPTS)"
#endif

namespace duplex::asio::detail {

// A duplicate of a channel's fd for the reactor (-1 for a closed channel). Throws
// std::system_error if no fd is left.
inline int watch_fd(const duplex::channel& ch) {
  const int fd = ch.native_handle();
  if (fd < 0) return -1;
  const int copy = ::fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (copy < 0) {
    throw std::system_error(errno, std::system_category(), "duplex::asio::channel: dup");
  }
  return copy;
}

// Puts the open file description behind fd in O_NONBLOCK mode, as Asio's reactor needs (done
// once, so that no operation changes the descriptor's state later). Throws std::system_error.
inline void set_non_blocking(int fd) {
  const int flags = ::fcntl(fd, F_GETFL);
  if (flags < 0 || ((flags & O_NONBLOCK) == 0 && ::fcntl(fd, F_SETFL, flags | O_NONBLOCK) != 0)) {
    throw std::system_error(errno, std::system_category(), "duplex::asio::channel: O_NONBLOCK");
  }
}

// What an async_send sends: one buffer or several parts with fds, or a message.
struct send_source {
  std::span<const const_buffer> parts;
  const_buffer bytes;
  std::span<const int> fds;
  const message* whole = nullptr;
  bool single = true;

  static send_source of(std::span<const const_buffer> parts, std::span<const int> fds) {
    send_source s;
    s.parts = parts;
    s.fds = fds;
    s.single = false;
    return s;
  }
  static send_source of(const_buffer bytes, std::span<const int> fds) {
    send_source s;
    s.bytes = bytes;
    s.fds = fds;
    return s;
  }
  static send_source of(const message& m) {
    send_source s;
    s.whole = &m;
    return s;
  }

  [[nodiscard]] result<void> try_send(duplex::channel& ch) const {
    if (whole != nullptr) return ch.try_send(*whole);
    if (single) return ch.try_send(bytes, fds);
    return ch.try_send(parts, fds);
  }
};

// The steps of the three operations, the same whichever way they are run. attempt() makes the
// non-blocking call(s) and returns true once the operation has its outcome (an error in ec, or
// success); false means: wait until the socket is ready (readable: wants_read) and attempt again.

// async_receive: try_receive.
struct receive_steps {
  static constexpr bool wants_read = true;
  // Built once, in the operation (the initiation carries a maker of steps, not steps). Not a
  // std::optional: GCC 12 warns, in sanitizer builds, that a disengaged one's payload may be
  // used uninitialised when it is moved.
  message received;

  bool attempt(duplex::channel& ch, std::error_code& ec) {
    auto r = ch.try_receive();
    if (r) {
      received = std::move(*r);
      return true;
    }
    if (r.error() == errc::would_block) return false;
    ec = r.error();
    return true;
  }
  // Once true, a cancellation of type total can no longer be honoured (never, for a receive:
  // a message partly read stays buffered in the channel).
  [[nodiscard]] bool taken() const noexcept { return false; }
  // False when an attempt would most likely only be a recvmsg that fails with EAGAIN: nothing is
  // buffered and the channel is open and whole (in a request-reply exchange the reply is rarely
  // there yet when the receive starts).
  [[nodiscard]] static bool worth_trying(const duplex::channel& ch) noexcept {
    return ch.buffered_bytes() > 0 || ch.is_broken() || ch.native_handle() < 0;
  }
};

// async_send: try_send until the channel takes the message (while its outgoing queue is full,
// try_send takes nothing), then flush until the queue is empty.
//
// Two waits have no socket readiness to end them, so they are paused out on a timer instead,
// for a pause that doubles from min_pause to max_pause (as the channel's blocking send does):
// shared_memory.max_in_flight reached (errc::queue_full with nothing queued: the socket is
// writable, the memfds wait for the peer to read), and a local limit met by a flush once the
// message is taken (ETOOMANYREFS, ENOBUFS, ENOMEM: the message stays queued, whole, and the
// channel is fine; the operation completes once it has gone out, as any send does). Waiting for
// writability instead would spin, the socket being writable all along.
struct send_steps {
  static constexpr bool wants_read = false;
  static constexpr std::chrono::microseconds min_pause{50};
  static constexpr std::chrono::milliseconds max_pause{10};
  send_source what;
  bool accepted = false;
  // After an attempt that returned false: how long to pause before the next one (zero: wait
  // until the socket is writable).
  std::chrono::nanoseconds pause{0};
  std::chrono::nanoseconds next_pause{min_pause};

  bool attempt(duplex::channel& ch, std::error_code& ec) {
    pause = std::chrono::nanoseconds{0};
    if (!accepted) {
      auto r = what.try_send(ch);
      if (!r) {
        if (r.error() == errc::would_block) return false;
        if (r.error() == errc::queue_full) {
          if (!ch.wants_write()) back_off();  // not the queue: the memfd bound
          return false;
        }
        ec = r.error();
        return true;
      }
      accepted = true;
      next_pause = min_pause;
    } else if (auto flushed = ch.flush(); !flushed) {
      if (is_local_limit(flushed.error())) {
        back_off();
        return false;
      }
      ec = flushed.error();
      return true;
    }
    return !ch.wants_write();
  }
  // The message is in the channel's queue and cannot be taken back: a cancellation from here on
  // has a side effect (the rest of the message is still delivered later), which total
  // cancellation forbids. Terminal and partial cancellation are still honoured.
  [[nodiscard]] bool taken() const noexcept { return accepted; }
  [[nodiscard]] static bool worth_trying(const duplex::channel&) noexcept { return true; }

 private:
  void back_off() noexcept {
    pause = next_pause;
    next_pause = std::min<std::chrono::nanoseconds>(next_pause * 2, max_pause);
  }
  // A limit of this process or user, not a fault of the socket or the peer: the flush that met
  // it kept the queue (channel::flush).
  static bool is_local_limit(const std::error_code& e) noexcept {
    return e.category() == std::system_category() &&
           (e.value() == ETOOMANYREFS || e.value() == ENOBUFS || e.value() == ENOMEM);
  }
};

// async_flush: flush until the outgoing queue is empty.
struct flush_steps {
  static constexpr bool wants_read = false;

  static bool attempt(duplex::channel& ch, std::error_code& ec) {
    auto flushed = ch.flush();
    if (!flushed) ec = flushed.error();
    return !flushed || *flushed;
  }
  [[nodiscard]] static bool taken() noexcept { return false; }
  [[nodiscard]] static bool worth_trying(const duplex::channel&) noexcept { return true; }
};

// How long an operation pauses before its next attempt (zero: until the socket is ready).
template <typename Steps>
std::chrono::nanoseconds pause_of(const Steps& steps) noexcept {
  if constexpr (std::is_same_v<Steps, send_steps>) {
    return steps.pause;
  } else {
    return std::chrono::nanoseconds{0};
  }
}

// The timer a send pauses on (see send_steps).
template <typename Executor>
using pause_timer =
    ::asio::basic_waitable_timer<std::chrono::steady_clock,
                                 ::asio::wait_traits<std::chrono::steady_clock>, Executor>;

// An execution context such as asio::io_context.
template <typename T>
concept execution_context = std::is_convertible_v<T&, ::asio::execution_context&>;

// An executor type other than E that converts to E.
template <typename T, typename E>
concept other_executor_of = !std::same_as<T, E> && std::is_convertible_v<const T&, E>;

#if DUPLEX_ASIO_REACTOR

using reactor = ::asio::detail::epoll_reactor;

// The registration of a channel's duplicate fd with Asio's epoll reactor: what Asio's own
// descriptor service keeps for a descriptor, kept here so that operations can be started with
// allow_speculative, as a socket's reads and writes are.
//
// A receive that reads a stream socket empty tells the reactor so (done_and_exhausted, as Asio's
// own sends do when the socket is full): the reactor then starts the next receive without trying
// it, and tries it at the socket's next edge. In a request-reply exchange that saves the recvmsg
// that would fail with EAGAIN, once per message. The socket's end of stream is not a byte,
// though: if the peer ended its side before that read, its edge is spent and no other will come.
// The end watch covers that: an epoll fd of its own that holds the socket, level-triggered, for
// EPOLLRDHUP (EPOLLHUP and EPOLLERR come with any registration), registered with the reactor as
// Asio registers its own internal descriptors, with one operation that never completes. Once
// the peer's end shows, no receive claims an empty socket again, and a shutdown(SHUT_RD) of this
// end (a no-op for the stream then: nothing more can arrive) wakes the socket's waiters, so the
// reactor tries a receive it queued on such a claim.
class reactor_watch {
 public:
  // Registers fd (owned from here on; -1 for a closed channel: nothing to watch) with ctx's
  // reactor, with an end watch if stream. Throws std::system_error if the reactor refuses fd (fd
  // is closed). Without an end watch (no fd left for it), receives never claim an empty socket.
  reactor_watch(::asio::execution_context& ctx, int fd, bool stream)
      : reactor_(::asio::use_service<reactor>(ctx)) {
    reactor_.init_task();
    if (fd < 0) return;
    if (const int err = reactor_.register_descriptor(fd, data_); err != 0) {
      ::close(fd);
      throw std::system_error(err, std::system_category(),
                              "duplex::asio::channel: register with the reactor");
    }
    fd_ = fd;
    if (stream) watch_end();
  }
  reactor_watch(const reactor_watch&) = delete;
  reactor_watch& operator=(const reactor_watch&) = delete;
  ~reactor_watch() { close(); }

  // Aborts every queued operation (operation_aborted).
  void cancel() {
    if (fd_ >= 0) reactor_.cancel_ops(fd_, data_);
  }
  // Aborts the queued operation of op_type registered under key, if any.
  void cancel(int op_type, void* key) {
    if (fd_ >= 0) reactor_.cancel_ops_by_key(fd_, data_, op_type, key);
  }
  // Aborts every queued operation, unregisters the fd and closes it.
  void close() noexcept {
    if (const int fd = release(); fd >= 0) ::close(fd);
  }
  // Aborts every queued operation and unregisters the fd; returns it (-1 if none).
  int release() noexcept {
    if (fd_ < 0) return -1;
    stop_end_watch();
    // Not "closing": the socket stays open through the channel's own fd, so epoll must be told.
    reactor_.deregister_descriptor(fd_, data_, false);
    reactor_.cleanup_descriptor_data(data_);
    return std::exchange(fd_, -1);
  }
  // Starts op: the reactor performs it at once and, if it cannot finish yet, queues it until the
  // fd is ready for op_type. Without an fd (a closed channel), op is performed once and
  // completes (with errc::closed). Never completes inside this call.
  void start(int op_type, ::asio::detail::reactor_op* op, bool is_continuation) {
    if (fd_ < 0) {
      static_cast<void>(op->perform());
      reactor_.post_immediate_completion(op, is_continuation);
      return;
    }
    reactor_.start_op(op_type, fd_, data_, op, is_continuation, true);
  }
  // Completes op, which has its outcome, as if posted.
  void post(::asio::detail::reactor_op* op, bool is_continuation) {
    reactor_.post_immediate_completion(op, is_continuation);
  }
  // The reactor (lives as long as the execution context).
  reactor& service() noexcept { return reactor_; }

  // True if a receive that read the socket empty may tell the reactor so: the end watch is on and
  // has not seen the peer's end.
  [[nodiscard]] bool may_claim_empty() const noexcept {
    return end_fd_ >= 0 && !peer_ended_.load();
  }
  // Whether the reactor was last told that the socket is read empty (it then starts the next
  // receive without trying it). Set by the receives, under the descriptor's lock.
  [[nodiscard]] bool claimed_empty() const noexcept {
    return claimed_empty_.load(std::memory_order_relaxed);
  }
  void set_claimed_empty(bool v) noexcept { claimed_empty_.store(v, std::memory_order_relaxed); }

 private:
  // The end watch's operation: performed by the reactor when the peer's end shows; never
  // completes (destroyed with the registration, and a member: nothing to free).
  class end_watcher : public ::asio::detail::reactor_op {
   public:
    explicit end_watcher(reactor_watch* w)
        : reactor_op(std::error_code(), &end_watcher::do_perform, &end_watcher::do_complete),
          w_(w) {}

   private:
    static status do_perform(reactor_op* base) {
      static_cast<end_watcher*>(base)->w_->peer_end_seen();
      return not_done;
    }
    static void do_complete(void*, ::asio::detail::operation*, const std::error_code&,
                            std::size_t) {}
    reactor_watch* w_;
  };

  void watch_end() noexcept {
    const int e = ::epoll_create1(EPOLL_CLOEXEC);
    if (e < 0) return;
    epoll_event ev{};
    ev.events = EPOLLRDHUP;
    if (::epoll_ctl(e, EPOLL_CTL_ADD, fd_, &ev) != 0) {
      ::close(e);
      return;
    }
    if (reactor_.register_internal_descriptor(reactor::read_op, e, end_data_, &end_watcher_) != 0) {
      // The state goes back to the reactor's pool without the watcher in its queue.
      reactor_.deregister_internal_descriptor(e, end_data_);
      reactor_.cleanup_descriptor_data(end_data_);
      ::close(e);
      return;
    }
    end_fd_ = e;
  }
  void stop_end_watch() noexcept {
    if (end_fd_ < 0) return;
    // Waits for a watcher being performed (the descriptor's lock): none runs after this.
    reactor_.deregister_internal_descriptor(end_fd_, end_data_);
    reactor_.cleanup_descriptor_data(end_data_);
    ::close(std::exchange(end_fd_, -1));
  }
  // Run by the reactor, under the end watch's lock. The order matters: a receive that read
  // peer_ended_ false before this store is woken by the shutdown after it.
  void peer_end_seen() noexcept {
    if (!peer_ended_.exchange(true)) ::shutdown(fd_, SHUT_RD);
  }

  reactor& reactor_;
  int fd_ = -1;
  reactor::per_descriptor_data data_ = nullptr;
  int end_fd_ = -1;
  reactor::per_descriptor_data end_data_ = nullptr;
  end_watcher end_watcher_{this};
  std::atomic<bool> peer_ended_{false};
  std::atomic<bool> claimed_empty_{false};
};

// What the operations share with the channel object. On the heap, so that moving a channel
// leaves the address its operations use unchanged.
template <typename Executor>
struct channel_state {
  channel_state(duplex::channel c, const Executor& e, int fd)
      : ch(std::move(c)),
        ex(e),
        watch(::asio::query(e, ::asio::execution::context), fd, ch.kind() == socket_kind::stream) {}

  // basic_channel::cancel: aborts the queued operations and the pause of a send; an operation
  // between two steps sees cancels changed.
  void cancel() {
    cancels.fetch_add(1);
    watch.cancel();
    timer.cancel();
  }
  // basic_channel::close: cancel(), then the duplicate fd and the channel are closed.
  void close() {
    cancels.fetch_add(1);
    watch.close();
    timer.cancel();
    ch.close();
  }
  // Unregisters the duplicate fd and gives it up (-1 if none), for another state to take.
  int release_fd() noexcept { return watch.release(); }

  duplex::channel ch;
  Executor ex;
  reactor_watch watch;
  // What a send pauses on (see send_steps). A paused send is not in the reactor: cancel() and
  // close() cancel the timer and bump cancels, which a send about to pause checks.
  pause_timer<Executor> timer{ex};
  std::atomic<std::uint64_t> cancels{0};
  // Expires with the state: a paused send that wakes after it completes with operation_aborted.
  std::shared_ptr<char> alive = std::make_shared<char>();
};

// An operation's cancellation slot handler. An operation is queued under the key `this` until
// its steps say taken(), and under its late key from then on: terminal and partial
// cancellation reach it under either key, total cancellation only under the first. The reactor
// compares keys under the descriptor's lock, the same lock the operation's steps run under, so a
// cancellation never lands between the message being taken and the key changing.
//
// A send paused on the timer (see channel_op) is in no queue of the reactor: the types asked for
// are kept in `requested`, which the send looks at before it pauses and when it wakes.
class cancel_handler {
 public:
  cancel_handler(reactor_watch* w, int op_type, void* late_key, std::atomic<unsigned>* requested)
      : watch_(w), op_type_(op_type), late_key_(late_key), requested_(requested) {}

  void operator()(::asio::cancellation_type_t type) {
    using ::asio::cancellation_type;
    requested_->fetch_or(static_cast<unsigned>(type));
    if (!!(type &
           (cancellation_type::terminal | cancellation_type::partial | cancellation_type::total))) {
      watch_->cancel(op_type_, this);
    }
    if (!!(type & (cancellation_type::terminal | cancellation_type::partial))) {
      watch_->cancel(op_type_, late_key_);
    }
  }

 private:
  reactor_watch* watch_;
  int op_type_;
  void* late_key_;
  std::atomic<unsigned>* requested_;
};

// One operation as an Asio reactor operation: the reactor calls do_perform (in the initiating
// call, then whenever the fd is ready), and the scheduler calls do_complete, which invokes the
// handler through its executor as Asio's own operations do.
//
// A send whose steps ask for a pause (no readiness of the socket tells when to try again) leaves
// the reactor: do_perform says done, and do_complete, instead of invoking the handler, waits on
// the channel's timer (armed on the channel's executor, as cancel() and close() touch it there),
// then starts the operation again. The operation is owned by the timer's handler meanwhile.
template <typename Steps, typename Handler, typename IoExecutor>
class channel_op : public ::asio::detail::reactor_op {
 public:
  ASIO_DEFINE_HANDLER_PTR(channel_op);

  // make() gives the steps, built in place here.
  template <typename Make>
  channel_op(channel_state<IoExecutor>& s, const Make& make, Handler& handler)
      : reactor_op(std::error_code(), &channel_op::do_perform, &channel_op::do_complete),
        s_(s),
        reactor_(s.watch.service()),
        ex_(s.ex),
        alive_(s.alive),
        cancels_(s.cancels.load()),
        steps_(make()),
        handler_(std::move(handler)),
        work_(handler_, s.ex) {}

  // The key the operation is queued under once its steps say taken().
  void* late_key() noexcept { return &steps_; }

  // The cancellation types asked for through the slot (see cancel_handler).
  std::atomic<unsigned>* requested() noexcept { return &requested_; }

  // An attempt made outside the reactor, for a receive that the reactor would not try (see
  // initiate). True once the operation has its outcome.
  bool attempt_now() { return steps_.attempt(s_.ch, ec_); }

 private:
  static status do_perform(reactor_op* base) {
    auto* o = static_cast<channel_op*>(base);
    if (o->steps_.attempt(o->s_.ch, o->ec_)) {
      if constexpr (Steps::wants_read) {
        // See reactor_watch: a receive that read the socket empty says so.
        const bool empty = !o->ec_ && o->s_.ch.drained() && o->s_.watch.may_claim_empty();
        o->s_.watch.set_claimed_empty(empty);
        return empty ? done_and_exhausted : done;
      }
      return done;
    }
    if constexpr (Steps::wants_read) o->s_.watch.set_claimed_empty(false);
    if (o->steps_.taken() && o->cancellation_key_ != nullptr) o->cancellation_key_ = o->late_key();
    if (pause_of(o->steps_).count() > 0) {
      o->pausing_ = true;
      return done;
    }
    return not_done;
  }

  static void do_complete(void* owner, ::asio::detail::operation* base, const std::error_code&,
                          std::size_t) {
    auto* o = static_cast<channel_op*>(base);
    if (owner != nullptr && std::exchange(o->pausing_, false) && !o->ec_) {
      o->pause();
      return;
    }
    ptr p = {std::addressof(o->handler_), o, o};
    ::asio::detail::handler_work<Handler, IoExecutor> w(std::move(o->work_));
    // The handler and its arguments leave the operation before its memory is freed.
    auto bound = bind(*o);
    p.h = std::addressof(bound.handler_);
    p.reset();
    if (owner != nullptr) {
      // The slot's handler points into the channel: it must not outlive the operation.
      ::asio::get_associated_cancellation_slot(bound.handler_).clear();
      ::asio::detail::fenced_block b(::asio::detail::fenced_block::half);
      w.complete(bound, bound.handler_);
    }
  }

  // The operation, held by a handler of the pause: destroyed with it if that is never invoked
  // (the io_context shut down first).
  struct holder {
    channel_op* op;
    explicit holder(channel_op* o) noexcept : op(o) {}
    holder(holder&& other) noexcept : op(std::exchange(other.op, nullptr)) {}
    holder& operator=(holder&&) = delete;
    ~holder() {
      if (op != nullptr) op->destroy();
    }
    channel_op* release() noexcept { return std::exchange(op, nullptr); }
  };

  // True if the operation was cancelled since it started: by cancel() or close() (cancels), or
  // through its slot with a type it still honours.
  bool cancelled() const noexcept {
    using ::asio::cancellation_type;
    const auto asked = static_cast<cancellation_type>(requested_.load());
    return s_.cancels.load() != cancels_ ||
           !!(asked & (cancellation_type::terminal | cancellation_type::partial)) ||
           (!steps_.taken() && !!(asked & cancellation_type::total));
  }

  // Completes the operation with operation_aborted (through the scheduler: not inside the
  // caller's frame).
  void abort(holder h) {
    ec_ = ::asio::error::operation_aborted;
    reactor_.post_immediate_completion(h.release(), true);
  }

  // Waits steps_.pause on the timer, then starts again (see above). Runs on a thread of the
  // scheduler, where the channel may be gone: the state is touched only on its executor, and
  // only while alive.
  void pause() {
    ::asio::post(ex_, [h = holder(this), alive = alive_]() mutable {
      channel_op* o = h.op;
      if (alive.expired() || o->cancelled()) {
        o->abort(std::move(h));
        return;
      }
      o->s_.timer.expires_after(pause_of(o->steps_));
      o->s_.timer.async_wait(
          [h = std::move(h), alive = std::move(alive)](std::error_code e) mutable {
            channel_op* w = h.op;
            if (e || alive.expired() || w->cancelled()) {
              w->abort(std::move(h));
              return;
            }
            w->s_.watch.start(reactor::write_op, h.release(), true);
          });
    });
  }

  static auto bind(channel_op& o) {
    if constexpr (std::is_same_v<Steps, receive_steps>) {
      return ::asio::detail::move_binder2<Handler, std::error_code, message>(
          0, std::move(o.handler_), o.ec_, std::move(o.steps_.received));
    } else {
      return ::asio::detail::binder1<Handler, std::error_code>(o.handler_, o.ec_);
    }
  }

  channel_state<IoExecutor>& s_;
  reactor& reactor_;
  IoExecutor ex_;
  std::weak_ptr<char> alive_;
  std::uint64_t cancels_;
  std::atomic<unsigned> requested_{0};
  bool pausing_ = false;
  Steps steps_;
  Handler handler_;
  ::asio::detail::handler_work<Handler, IoExecutor> work_;
};

// The initiation of an operation (for asio::async_initiate). It carries make, which gives the
// operation's steps, rather than the steps themselves: the initiation is moved and copied on its
// way, and a receive's steps hold a message, which each copy would build and destroy.
template <typename Executor, typename Make>
class initiate {
 public:
  using executor_type = Executor;
  using steps_type = std::invoke_result_t<const Make&>;

  initiate(channel_state<Executor>* s, Make make) : s_(s), make_(std::move(make)) {}

  [[nodiscard]] executor_type get_executor() const noexcept { return s_->ex; }

  template <typename Handler>
  void operator()(Handler&& handler) const {
    ::asio::detail::non_const_lvalue<Handler> h(handler);
    using op = channel_op<steps_type, std::decay_t<Handler>, Executor>;
    constexpr int op_type = steps_type::wants_read ? reactor::read_op : reactor::write_op;
    const bool is_continuation = asio_handler_cont_helpers::is_continuation(h.value);
    auto slot = ::asio::get_associated_cancellation_slot(h.value);
    typename op::ptr p = {std::addressof(h.value), op::ptr::allocate(h.value), nullptr};
    p.p = new (p.v) op(*s_, make_, h.value);
    if (slot.is_connected()) {
      p.p->cancellation_key_ = &slot.template emplace<cancel_handler>(
          &s_->watch, op_type, p.p->late_key(), p.p->requested());
    }
    if constexpr (steps_type::wants_read) {
      // Told that the socket was read empty, the reactor will not try this receive before the
      // next edge. That is right unless the channel's own calls were used since: a receive that
      // left bytes buffered or whose last read did not empty the socket (either way, drained()
      // is false), or a close. Then the attempt is made here.
      if (s_->watch.claimed_empty() && (!s_->ch.drained() || s_->ch.native_handle() < 0) &&
          p.p->attempt_now()) {
        s_->watch.post(p.p, is_continuation);
        p.v = p.p = nullptr;
        return;
      }
    }
    s_->watch.start(op_type, p.p, is_continuation);
    p.v = p.p = nullptr;
  }

 private:
  channel_state<Executor>* s_;
  Make make_;
};

// Starts an operation whose steps make() gives.
template <typename Signature, typename Executor, typename Make, typename Token>
auto start(channel_state<Executor>* s, Make make, Token&& token) {
  return ::asio::async_initiate<Token, Signature>(initiate<Executor, Make>(s, std::move(make)),
                                                  token);
}

#else  // !DUPLEX_ASIO_REACTOR

// What the operations share with the channel object. On the heap, so that moving a channel
// leaves the address its operations use unchanged.
template <typename Executor>
struct channel_state {
  channel_state(duplex::channel c, const Executor& e, int fd)
      : ch(std::move(c)), ex(e), descriptor(e) {
    if (fd < 0) return;
    std::error_code ec;
    descriptor.assign(fd, ec);
    if (ec) {
      ::close(fd);
      throw std::system_error(ec, "duplex::asio::channel: register with the reactor");
    }
    // Once and for all here, so that no async_wait changes the descriptor's state later.
    descriptor.non_blocking(true, ec);
    if (ec) throw std::system_error(ec, "duplex::asio::channel: O_NONBLOCK");
  }

  // basic_channel::cancel: aborts the waits and the pause of a send; an operation between two
  // waits sees cancels changed.
  void cancel() {
    cancels.fetch_add(1);
    std::error_code ignored;
    descriptor.cancel(ignored);
    timer.cancel();
  }
  // basic_channel::close: cancel(), then the duplicate fd and the channel are closed.
  void close() {
    cancels.fetch_add(1);
    std::error_code ignored;
    descriptor.close(ignored);
    timer.cancel();
    ch.close();
  }
  // Gives up the duplicate fd (-1 if none), for another state to take.
  int release_fd() noexcept { return descriptor.is_open() ? descriptor.release() : -1; }

  duplex::channel ch;
  Executor ex;
  ::asio::posix::basic_stream_descriptor<Executor> descriptor;
  pause_timer<Executor> timer{ex};
  // Bumped by cancel() and close(): an operation that started before gives up at its next wait,
  // even if cancel() came while it was between two waits (when the reactor holds nothing of it).
  std::atomic<std::uint64_t> cancels{0};

  // True if the operation that started when cancels was `since` has been cancelled, by cancel(),
  // close() or its own cancellation slot.
  template <typename Self>
  bool cancelled(Self& self, std::uint64_t since) const {
    return cancels.load() != since ||
           self.get_cancellation_state().cancelled() != ::asio::cancellation_type::none;
  }
};

enum class step : unsigned char {
  start,    // inside the initiating function
  waiting,  // resumed by the reactor (async_wait)
  posted,   // resumed by the post that completes an operation finished in the initiating call
};

// One operation as an async_compose: attempt; while it would block, wait for the socket and
// attempt again.
template <typename Executor, typename Steps>
class composed_op {
 public:
  composed_op(channel_state<Executor>* s, Steps steps)
      : s_(s), steps_(std::move(steps)), cancels_(s->cancels.load()) {}

  template <typename Self>
  void operator()(Self& self, std::error_code ec = {}) {
    switch (step_) {
      case step::start:
        self.reset_cancellation_state(::asio::enable_total_cancellation());
        // Without a speculative attempt, async_wait costs Asio an epoll_ctl: skip only an
        // attempt that would almost surely be in vain.
        if (Steps::worth_trying(s_->ch) && attempt(self)) {
          step_ = step::posted;
          ::asio::post(std::move(self));
          return;
        }
        break;
      case step::posted: finish(self); return;
      case step::waiting:
        if (ec) {
          ec_ = ec;
          finish(self);
          return;
        }
        if (attempt(self)) {
          finish(self);
          return;
        }
        if (s_->cancelled(self, cancels_)) {
          ec_ = ::asio::error::operation_aborted;
          finish(self);
          return;
        }
        break;
    }
    step_ = step::waiting;
    if (const auto pause = pause_of(steps_); pause.count() > 0) {
      s_->timer.expires_after(pause);
      s_->timer.async_wait(std::move(self));
      return;
    }
    s_->descriptor.async_wait(Steps::wants_read ? ::asio::posix::descriptor_base::wait_read
                                                : ::asio::posix::descriptor_base::wait_write,
                              std::move(self));
  }

 private:
  // True once the operation has its outcome (in ec_ and steps_).
  template <typename Self>
  bool attempt(Self& self) {
    const bool was_taken = steps_.taken();
    if (steps_.attempt(s_->ch, ec_)) return true;
    if (!was_taken && steps_.taken()) {
      if (self.get_cancellation_state().cancelled() != ::asio::cancellation_type::none) {
        ec_ = ::asio::error::operation_aborted;
        return true;
      }
      self.reset_cancellation_state(::asio::enable_partial_cancellation());
    }
    return false;
  }

  template <typename Self>
  void finish(Self& self) {
    if constexpr (std::is_same_v<Steps, receive_steps>) {
      self.complete(ec_, ec_ ? message{} : std::move(steps_.received));
    } else {
      self.complete(ec_);
    }
  }

  channel_state<Executor>* s_;
  Steps steps_;
  std::uint64_t cancels_;
  std::error_code ec_;
  step step_ = step::start;
};

// Starts an operation whose steps make() gives.
template <typename Signature, typename Executor, typename Make, typename Token>
auto start(channel_state<Executor>* s, Make make, Token&& token) {
  using steps_type = std::invoke_result_t<const Make&>;
  return ::asio::async_compose<Token, Signature>(composed_op<Executor, steps_type>(s, make()),
                                                 token, s->descriptor);
}

#endif  // DUPLEX_ASIO_REACTOR

// --- accept --------------------------------------------------------------------------------
//
// async_accept is an async_compose over async_wait on a duplicate of the listener's
// native_handle(), which is readable whenever its accept(0) may make progress (a new connection,
// a handshake's bytes, a handshake's deadline, close): the listener's own accept(0) does the work
// (accept4, the handshakes, their deadlines), and a timed_out from it means wait again.

// What an acceptor's operations share with it (on the heap: a moved acceptor's operation carries
// on).
template <typename Executor>
struct acceptor_state {
  acceptor_state(const Executor& e, duplex::listener listening)
      : ex(e), l(std::move(listening)), watch(e) {
    if (l.native_handle() >= 0) {
      const int copy = ::fcntl(l.native_handle(), F_DUPFD_CLOEXEC, 0);
      if (copy < 0) {
        throw std::system_error(errno, std::system_category(), "duplex::asio::acceptor: dup");
      }
      watch.assign(copy);
    }
  }
  void close() {
    std::error_code ignored;
    static_cast<void>(watch.close(ignored));
    l.close();
  }

  Executor ex;
  duplex::listener l;
  ::asio::posix::stream_descriptor watch;  // native_handle()'s duplicate, for readiness
};

template <typename Executor>
class accept_op {
 public:
  explicit accept_op(acceptor_state<Executor>* s) : s_(s) {}

  template <typename Self>
  void operator()(Self& self, std::error_code ec = {}) {
    switch (step_) {
      case step::start:
        self.reset_cancellation_state(::asio::enable_total_cancellation());
        if (attempt()) {  // known at once: completes as if posted
          step_ = step::posted;
          ::asio::post(std::move(self));
          return;
        }
        break;
      case step::posted: return finish(self);
      case step::waiting: {
        if (self.get_cancellation_state().cancelled() != ::asio::cancellation_type::none) {
          ec_ = ::asio::error::operation_aborted;
          return finish(self);
        }
        if (ec) {
          // closed (the descriptor went with the listener), cancel(), or the reactor's error
          ec_ = s_->l.native_handle() < 0 ? make_error_code(errc::closed) : ec;
          return finish(self);
        }
        if (attempt()) return finish(self);
        break;
      }
    }
    step_ = step::waiting;
    s_->watch.async_wait(::asio::posix::stream_descriptor::wait_read, std::move(self));
  }

 private:
  enum class step { start, posted, waiting };

  // True once the operation has its outcome (in ec_ and c_).
  bool attempt() {
    if (s_->l.native_handle() < 0) {
      ec_ = make_error_code(errc::closed);
      return true;
    }
    auto c = s_->l.accept(std::chrono::nanoseconds::zero());
    if (c) {
      c_ = std::move(*c);
      return true;
    }
    if (c.error() == errc::timed_out) return false;
    ec_ = c.error();
    return true;
  }

  template <typename Self>
  void finish(Self& self) {
    self.complete(ec_, ec_ ? connection{} : std::move(c_));
  }

  acceptor_state<Executor>* s_;
  step step_ = step::start;
  std::error_code ec_;
  connection c_;
};

}  // namespace duplex::asio::detail
