// duplex/asio.hpp - whole messages, with fds, for Asio (standalone Asio 1.22 or later).
//
// Asio moves bytes; it has no way to pass fds. duplex::asio::channel wraps a duplex::channel and
// gives Asio programs its messages as asynchronous operations: completion handlers, coroutines
// (use_awaitable), futures, per-operation cancellation and timeouts all work as with any Asio I/O
// object. The link target is duplex::asio (find_package(duplex COMPONENTS asio)).
//
//   asio::io_context io;
//   auto ends = duplex::channel_pair();
//   duplex::asio::channel a(io, std::move(ends->first));
//   asio::co_spawn(io, [&]() -> asio::awaitable<void> {
//     co_await a.async_send(duplex::as_bytes("hello"), fds, asio::use_awaitable);
//     duplex::message reply = co_await a.async_receive(asio::use_awaitable);
//   }, asio::detached);
//   io.run();
//
// With a timeout (asio/experimental/awaitable_operators.hpp):
//
//   asio::steady_timer timer(io, 5s);
//   auto r = co_await (a.async_receive(use_awaitable) || timer.async_wait(use_awaitable));
//   if (r.index() == 1) { /* timed out: the receive was cancelled, nothing was lost */ }
//
// How it works. Each operation calls the channel's non-blocking calls (try_receive, try_send,
// flush) and, when they would block, waits for the socket with Asio's reactor (an
// asio::posix::stream_descriptor over a close-on-exec duplicate of the channel's fd, so Asio
// never closes the channel's own fd). The duplicate shares the socket's open file description,
// which the adapter puts in O_NONBLOCK mode as Asio's reactor needs: the channel's socket too.
// The channel's blocking calls still block (they poll when the socket would block).
//
// Cost. An operation that completes at once makes the same syscalls as the channel's own call.
// One that must wait makes one more than a plain Asio socket would: Asio re-arms epoll
// (EPOLL_CTL_MOD) for every async_wait, where its own reads wait without one.
//
// The rules are those of any Asio I/O object:
//
//   - A handler is never invoked from inside the initiating function: a message already
//     available (or an error already known) completes through asio::post, without a round trip
//     through the reactor.
//   - Handlers run on the handler's associated executor, or else on the channel's executor.
//   - At most one async_receive and one async_send may be outstanding at a time on one channel
//     (one of each may run at once: that is full duplex). Do not use the channel's own receive
//     calls while an async_receive is outstanding, nor its send calls while an async_send is.
//   - Thread safety as an Asio socket: distinct objects are safe, one object is not. With an
//     io_context run by several threads, give the channel a strand as executor (and run
//     coroutines that use it on that strand), so that its operations' steps never run at once;
//     call cancel() and close() from that strand too.
//   - The channel must outlive its outstanding operations (until their handlers have run).
//   - Destroying the io_context before the channel is not allowed (as for any Asio I/O object).
#pragma once

#include <fcntl.h>
#include <unistd.h>

#include <asio/any_io_executor.hpp>
#include <asio/associated_executor.hpp>
#include <asio/async_result.hpp>
#include <asio/cancellation_type.hpp>
#include <asio/compose.hpp>
#include <asio/error.hpp>
#include <asio/execution_context.hpp>
#include <asio/posix/stream_descriptor.hpp>
#include <asio/post.hpp>
#include <atomic>
#include <cerrno>
#include <concepts>
#include <cstdint>
#include <memory>
#include <span>
#include <system_error>
#include <type_traits>
#include <utility>

#include "duplex/buffer.hpp"
#include "duplex/channel.hpp"
#include "duplex/error.hpp"
#include "duplex/message.hpp"

#if !defined(ASIO_HAS_CONCEPTS)
#error "duplex/asio.hpp needs Asio's C++20 concepts (do not define ASIO_DISABLE_CONCEPTS)"
#endif

namespace duplex::asio {

// The completion signature of async_receive.
using receive_signature = void(std::error_code, message);

// The completion signature of async_send.
using send_signature = void(std::error_code);

namespace detail {

// What the operations share with the channel object. On the heap, so that moving a channel
// leaves the address its operations use unchanged.
template <typename Executor>
struct channel_state {
  channel_state(duplex::channel c, ::asio::posix::basic_stream_descriptor<Executor> d)
      : ch(std::move(c)), descriptor(std::move(d)) {}

  duplex::channel ch;
  ::asio::posix::basic_stream_descriptor<Executor> descriptor;
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

// An execution context such as asio::io_context.
template <typename T>
concept execution_context = std::is_convertible_v<T&, ::asio::execution_context&>;

// An executor type other than E that converts to E.
template <typename T, typename E>
concept other_executor_of = !std::same_as<T, E> && std::is_convertible_v<const T&, E>;

enum class step : unsigned char {
  start,    // inside the initiating function
  waiting,  // resumed by the reactor (async_wait)
  posted,   // resumed by the post that completes an operation finished in the initiating call
};

// async_receive: try_receive; on would_block wait readable and try again.
template <typename Executor>
class receive_op {
 public:
  explicit receive_op(channel_state<Executor>* s) : s_(s), cancels_(s->cancels.load()) {}

  template <typename Self>
  void operator()(Self& self, std::error_code ec = {}) {
    switch (step_) {
      case step::start:
        // Nothing is lost by cancelling a receive at any time (a message partly read stays
        // buffered in the channel), so every kind of cancellation is honoured.
        self.reset_cancellation_state(::asio::enable_total_cancellation());
        // With nothing buffered, a receive needs the socket: wait for it rather than first make a
        // recvmsg that would most likely block (in a request-reply exchange the reply is rarely
        // there yet when the receive starts). A broken or closed channel answers at once.
        if ((s_->ch.buffered_bytes() > 0 || s_->ch.is_broken() || s_->ch.native_handle() < 0) &&
            attempt()) {
          step_ = step::posted;
          ::asio::post(std::move(self));
          return;
        }
        break;
      case step::posted: self.complete(ec_, std::move(message_)); return;
      case step::waiting:
        if (ec) {
          self.complete(ec, message{});
          return;
        }
        if (attempt()) {
          self.complete(ec_, std::move(message_));
          return;
        }
        if (s_->cancelled(self, cancels_)) {
          self.complete(::asio::error::operation_aborted, message{});
          return;
        }
        break;
    }
    step_ = step::waiting;
    s_->descriptor.async_wait(::asio::posix::descriptor_base::wait_read, std::move(self));
  }

 private:
  // True once the operation has its outcome (a message or an error).
  bool attempt() {
    auto r = s_->ch.try_receive();
    if (r) {
      message_ = std::move(*r);
      return true;
    }
    if (r.error() == errc::would_block) return false;
    ec_ = r.error();
    return true;
  }

  channel_state<Executor>* s_;
  std::uint64_t cancels_;
  message message_;
  std::error_code ec_;
  step step_ = step::start;
};

// async_send: try_send (while the queue is full: wait writable, flush, retry), then flush until
// the outgoing queue is empty.
template <typename Executor>
class send_op {
 public:
  send_op(channel_state<Executor>* s, send_source what)
      : s_(s), what_(what), cancels_(s->cancels.load()) {}

  template <typename Self>
  void operator()(Self& self, std::error_code ec = {}) {
    switch (step_) {
      case step::start:
        // Until the channel takes the message, cancelling has no side effect.
        self.reset_cancellation_state(::asio::enable_total_cancellation());
        if (advance(self)) {
          step_ = step::posted;
          ::asio::post(std::move(self));
          return;
        }
        break;
      case step::posted: self.complete(ec_); return;
      case step::waiting:
        if (ec) {
          self.complete(ec);
          return;
        }
        if (auto flushed = s_->ch.flush(); !flushed) {
          self.complete(flushed.error());
          return;
        }
        if (advance(self)) {
          self.complete(ec_);
          return;
        }
        if (s_->cancelled(self, cancels_)) {
          self.complete(::asio::error::operation_aborted);
          return;
        }
        break;
    }
    step_ = step::waiting;
    s_->descriptor.async_wait(::asio::posix::descriptor_base::wait_write, std::move(self));
  }

 private:
  // True once the operation has its outcome (in ec_).
  template <typename Self>
  bool advance(Self& self) {
    if (!accepted_) {
      auto r = what_.try_send(s_->ch);
      if (!r) {
        if (r.error() == errc::queue_full || r.error() == errc::would_block) return false;
        ec_ = r.error();
        return true;
      }
      accepted_ = true;
      if (!s_->ch.wants_write()) return true;
      // The message is in the channel's queue now and cannot be taken back: a cancellation from
      // here on has a side effect (the rest of the message is still delivered later), which
      // total cancellation forbids. Terminal and partial cancellation are still honoured.
      if (self.get_cancellation_state().cancelled() != ::asio::cancellation_type::none) {
        ec_ = ::asio::error::operation_aborted;
        return true;
      }
      self.reset_cancellation_state(::asio::enable_partial_cancellation());
      return false;
    }
    return !s_->ch.wants_write();
  }

  channel_state<Executor>* s_;
  send_source what_;
  std::uint64_t cancels_;
  std::error_code ec_;
  bool accepted_ = false;
  step step_ = step::start;
};

// async_flush: wait writable and flush until the outgoing queue is empty.
template <typename Executor>
class flush_op {
 public:
  explicit flush_op(channel_state<Executor>* s) : s_(s), cancels_(s->cancels.load()) {}

  template <typename Self>
  void operator()(Self& self, std::error_code ec = {}) {
    switch (step_) {
      case step::start:
        self.reset_cancellation_state(::asio::enable_total_cancellation());
        if (auto flushed = s_->ch.flush(); !flushed || *flushed) {
          if (!flushed) ec_ = flushed.error();
          step_ = step::posted;
          ::asio::post(std::move(self));
          return;
        }
        break;
      case step::posted: self.complete(ec_); return;
      case step::waiting:
        if (ec) {
          self.complete(ec);
          return;
        }
        if (auto flushed = s_->ch.flush(); !flushed || *flushed) {
          self.complete(flushed ? std::error_code{} : flushed.error());
          return;
        }
        if (s_->cancelled(self, cancels_)) {
          self.complete(::asio::error::operation_aborted);
          return;
        }
        break;
    }
    step_ = step::waiting;
    s_->descriptor.async_wait(::asio::posix::descriptor_base::wait_write, std::move(self));
  }

 private:
  channel_state<Executor>* s_;
  std::uint64_t cancels_;
  std::error_code ec_;
  step step_ = step::start;
};

}  // namespace detail

// A duplex::channel as an Asio I/O object. Move-only; owns the channel.
template <typename Executor = ::asio::any_io_executor>
class basic_channel {
 public:
  using executor_type = Executor;

  // The same channel type on another executor (for as_default_on and the like).
  template <typename OtherExecutor>
  struct rebind_executor {
    using other = basic_channel<OtherExecutor>;
  };

  // Takes ownership of ch; its operations run on ex. A closed (or empty) channel is accepted: its
  // operations complete with errc::closed. Throws std::system_error if the fd cannot be
  // duplicated (EMFILE) or registered with the reactor.
  basic_channel(const executor_type& ex, duplex::channel ch) : s_(make_state(ex, std::move(ch))) {}

  // Takes ownership of ch; its operations run on ctx's executor.
  template <detail::execution_context ExecutionContext>
  basic_channel(ExecutionContext& ctx, duplex::channel ch)
      : basic_channel(executor_type(ctx.get_executor()), std::move(ch)) {}

  // Takes over a channel of another executor type (no operation may be outstanding on it), as
  // Asio's I/O objects convert.
  template <detail::other_executor_of<Executor> OtherExecutor>
  basic_channel(basic_channel<OtherExecutor>&& other) : s_(take_over(std::move(other))) {}

  // A moved-from channel may only be destroyed or assigned to. Operations outstanding on the
  // channel moved from carry on unharmed.
  basic_channel(basic_channel&&) noexcept = default;
  basic_channel& operator=(basic_channel&&) noexcept = default;
  basic_channel(const basic_channel&) = delete;
  basic_channel& operator=(const basic_channel&) = delete;

  // Closes the channel; outstanding operations complete with asio::error::operation_aborted.
  ~basic_channel() = default;

  // The executor operations run on when their handler has none of its own.
  [[nodiscard]] executor_type get_executor() const noexcept {
    return s_->descriptor.get_executor();
  }

  // The underlying channel: for kind(), peer_credentials(), shutdown_send(), or its blocking
  // calls (see the rules above). Close it with close() below, not channel().close(): the
  // reactor's duplicate fd keeps the socket open until then.
  [[nodiscard]] duplex::channel& channel() noexcept { return s_->ch; }
  [[nodiscard]] const duplex::channel& channel() const noexcept { return s_->ch; }

  // True until close() (or the channel itself) was closed.
  [[nodiscard]] bool is_open() const noexcept { return s_->ch.native_handle() >= 0; }

  // Makes every outstanding operation complete as soon as it can with
  // asio::error::operation_aborted (one that already has its outcome completes with it: a
  // message received is never dropped). A message partly received stays buffered in the
  // channel; see async_send for a message partly sent.
  void cancel() {
    s_->cancels.fetch_add(1);
    std::error_code ignored;
    s_->descriptor.cancel(ignored);
  }

  // Cancels every outstanding operation (asio::error::operation_aborted) and closes the channel
  // (duplex::channel::close: unsent queued bytes are dropped; the peer sees the end). Later
  // operations complete with errc::closed.
  void close() {
    s_->cancels.fetch_add(1);
    std::error_code ignored;
    s_->descriptor.close(ignored);
    s_->ch.close();
  }

  // Receives the next whole message, with its fds. Completion: void(std::error_code, message);
  // on error the message is empty. Errors: those of channel::receive (errc::peer_closed once
  // every message sent before the peer's end was delivered, errc::truncated_message,
  // errc::protocol_error (then errc::broken), errc::message_too_large, errc::too_many_fds,
  // errc::fds_truncated, ENOMEM: the refused message was skipped, the next is intact),
  // errc::closed, and asio::error::operation_aborted (cancelled: nothing of the stream was lost;
  // the next receive gets the next whole message). Every cancellation type is supported.
  template <::asio::completion_token_for<receive_signature> Token =
                ::asio::default_completion_token_t<executor_type>>
  auto async_receive(Token&& token = ::asio::default_completion_token_t<executor_type>()) {
    return ::asio::async_compose<Token, receive_signature>(detail::receive_op<Executor>(s_.get()),
                                                           token, s_->descriptor);
  }

  // Sends parts (scatter/gather) as one message with fds attached (the caller keeps its fds).
  // Completion: void(std::error_code), once the whole message has been handed to the kernel.
  // As with asio::async_write, the bytes, the parts array and the fds must stay valid until the
  // handler runs. Errors: those of channel::send (errc::message_too_large, errc::too_many_fds,
  // errc::peer_closed, EBADF, ...), errc::closed, and asio::error::operation_aborted.
  //
  // Cancellation. Before the channel has taken the message (it waits while the outgoing queue is
  // full), a cancelled send has sent nothing (total, partial and terminal cancellation are
  // supported). Once taken, a message cannot be unsent: a cancelled send then completes with
  // operation_aborted (terminal and partial cancellation only) and the rest of the message stays
  // in the channel's outgoing queue, whole and in order; it goes out first with the next
  // async_send or with async_flush (channel().wants_write() says whether bytes wait), or is
  // dropped by close(). The peer never sees a cut message.
  template <::asio::completion_token_for<send_signature> Token =
                ::asio::default_completion_token_t<executor_type>>
  auto async_send(std::span<const const_buffer> parts, std::span<const int> fds,
                  Token&& token = ::asio::default_completion_token_t<executor_type>()) {
    return start_send(detail::send_source::of(parts, fds), std::forward<Token>(token));
  }

  // Sends bytes with fds as one message (see above).
  template <::asio::completion_token_for<send_signature> Token =
                ::asio::default_completion_token_t<executor_type>>
  auto async_send(const_buffer bytes, std::span<const int> fds,
                  Token&& token = ::asio::default_completion_token_t<executor_type>()) {
    return start_send(detail::send_source::of(bytes, fds), std::forward<Token>(token));
  }

  // Sends bytes as one message (see above).
  template <::asio::completion_token_for<send_signature> Token =
                ::asio::default_completion_token_t<executor_type>>
  auto async_send(const_buffer bytes,
                  Token&& token = ::asio::default_completion_token_t<executor_type>()) {
    return start_send(detail::send_source::of(bytes, {}), std::forward<Token>(token));
  }

  // Sends a message's bytes and fds (the message keeps its fds, and must stay valid until the
  // handler runs; see above).
  template <::asio::completion_token_for<send_signature> Token =
                ::asio::default_completion_token_t<executor_type>>
  auto async_send(const message& m,
                  Token&& token = ::asio::default_completion_token_t<executor_type>()) {
    return start_send(detail::send_source::of(m), std::forward<Token>(token));
  }

  // Completes once the channel's outgoing queue is empty (at once if it is): after an
  // async_send was cancelled, or to deliver what channel().try_send() queued. Counts as the one
  // outstanding async_send. Errors: errc::peer_closed (the queue was dropped), errc::broken,
  // errc::closed, asio::error::operation_aborted (every cancellation type: the queue is kept).
  template <::asio::completion_token_for<send_signature> Token =
                ::asio::default_completion_token_t<executor_type>>
  auto async_flush(Token&& token = ::asio::default_completion_token_t<executor_type>()) {
    return ::asio::async_compose<Token, send_signature>(detail::flush_op<Executor>(s_.get()), token,
                                                        s_->descriptor);
  }

 private:
  template <typename>
  friend class basic_channel;

  using descriptor_type = ::asio::posix::basic_stream_descriptor<Executor>;
  using state = detail::channel_state<Executor>;

  static std::unique_ptr<state> make_state(const executor_type& ex, duplex::channel ch) {
    descriptor_type d = watch(ex, detail::watch_fd(ch));
    return std::make_unique<state>(std::move(ch), std::move(d));
  }

  // A descriptor on ex that owns fd (none if fd is -1), registered with the reactor.
  static descriptor_type watch(const executor_type& ex, int fd) {
    descriptor_type d(ex);
    if (fd < 0) return d;
    std::error_code ec;
    d.assign(fd, ec);
    if (ec) {
      ::close(fd);
      throw std::system_error(ec, "duplex::asio::channel: register with the reactor");
    }
    // Once and for all here, so that no async_wait changes the descriptor's state later.
    d.non_blocking(true, ec);
    if (ec) throw std::system_error(ec, "duplex::asio::channel: O_NONBLOCK");
    return d;
  }

  // The state of other, moved to this executor type (Asio 1.22's descriptors do not convert:
  // the duplicate fd is released from one and assigned to the other).
  template <typename OtherExecutor>
  static std::unique_ptr<state> take_over(basic_channel<OtherExecutor>&& other) {
    auto& from = *other.s_;
    const executor_type ex(from.descriptor.get_executor());
    const int fd = from.descriptor.is_open() ? from.descriptor.release() : -1;
    return std::make_unique<state>(std::move(from.ch), watch(ex, fd));
  }

  template <typename Token>
  auto start_send(detail::send_source what, Token&& token) {
    return ::asio::async_compose<Token, send_signature>(detail::send_op<Executor>(s_.get(), what),
                                                        token, s_->descriptor);
  }

  std::unique_ptr<state> s_;
};

// A channel whose operations run on any executor (the usual choice).
using channel = basic_channel<>;

}  // namespace duplex::asio
