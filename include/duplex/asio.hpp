// duplex/asio.hpp - whole messages, with fds, for Asio (standalone Asio 1.22 or later); and
// accepting an endpoint's connections (basic_acceptor, at the end).
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
// How it works. Each operation is the channel's non-blocking call (try_receive, try_send,
// flush), run by Asio's reactor on a close-on-exec duplicate of the channel's fd, so Asio never
// closes the channel's own fd. The duplicate shares the socket's open file description, which the
// adapter puts in O_NONBLOCK mode as Asio's reactor needs: the channel's socket too. The
// channel's blocking calls still block (they poll when the socket would block).
//
// With Asio 1.22 to 1.27 on epoll (Linux's default), an operation is one of Asio's own reactor
// operations, like a socket's async_receive: the reactor tries it at once, in the initiating
// call, and queues it only if the channel would block; the epoll registration made when the
// channel was wrapped serves every later wait. A receive that read a stream socket empty tells
// the reactor so, which then waits for the next edge instead of trying the next receive in vain;
// an end watch (an epoll fd of its own per stream channel, so three fds in all) makes sure the
// peer's end is still heard (docs/design.md). Elsewhere (io_uring as Asio's default, other Asio
// versions, or DUPLEX_ASIO_PORTABLE defined) each operation is an async_compose over
// asio::posix::stream_descriptor::async_wait, built on Asio's public interface only; Asio then
// re-arms epoll (EPOLL_CTL_MOD) for every wait, one syscall more than a plain Asio socket makes.
// DUPLEX_ASIO_REACTOR says which is in use (1: reactor operations). The behaviour is the same.
//
// The rules are those of any Asio I/O object:
//
//   - A handler is never invoked from inside the initiating function: a message already
//     available (or an error already known) completes as if posted, without waiting for the
//     reactor.
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

// The operations, their state and the reactor's registration (not public). It defines
// DUPLEX_ASIO_REACTOR: 1 if operations are Asio reactor operations (Asio 1.22-1.27 on epoll,
// unless DUPLEX_ASIO_PORTABLE is defined), 0 if they are async_compose over async_wait.
#include "duplex/detail/asio.hpp"

#include <unistd.h>

#include <asio/any_io_executor.hpp>
#include <asio/async_result.hpp>
#include <asio/error.hpp>
#include <memory>
#include <span>
#include <system_error>
#include <utility>

#include "duplex/buffer.hpp"
#include "duplex/channel.hpp"
#include "duplex/endpoint.hpp"
#include "duplex/error.hpp"
#include "duplex/message.hpp"

namespace duplex::asio {

// The completion signature of async_receive.
using receive_signature = void(std::error_code, message);

// The completion signature of async_send.
using send_signature = void(std::error_code);

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
  // duplicated (EMFILE), put in O_NONBLOCK mode or registered with the reactor (ch is then
  // closed).
  basic_channel(const executor_type& ex, duplex::channel ch) : s_(make_state(ex, std::move(ch))) {}

  // Takes ownership of ch; its operations run on ctx's executor. Throws as the constructor above.
  template <detail::execution_context ExecutionContext>
  basic_channel(ExecutionContext& ctx, duplex::channel ch)
      : basic_channel(executor_type(ctx.get_executor()), std::move(ch)) {}

  // Takes over a channel of another executor type (no operation may be outstanding on it), as
  // Asio's I/O objects convert. Throws std::system_error if the fd cannot be registered with
  // this executor's reactor (the channel is then closed).
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
  [[nodiscard]] executor_type get_executor() const noexcept { return s_->ex; }

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
  void cancel() { s_->cancel(); }

  // Cancels every outstanding operation (asio::error::operation_aborted) and closes the channel
  // (duplex::channel::close: unsent queued bytes are dropped; the peer sees the end). Later
  // operations complete with errc::closed.
  void close() { s_->close(); }

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
    return detail::start<receive_signature>(
        s_.get(), [] { return detail::receive_steps{}; }, std::forward<Token>(token));
  }

  // Sends parts (scatter/gather) as one message with fds attached (the caller keeps its fds).
  // Completion: void(std::error_code), once the whole message has been handed to the kernel.
  // As with asio::async_write, the bytes, the parts array and the fds must stay valid until the
  // handler runs. Errors: those of channel::send (errc::message_too_large, errc::too_many_fds,
  // errc::peer_closed, EBADF, ...), errc::closed, and asio::error::operation_aborted.
  //
  // An error tells the truth about the message. One from before the channel took it (a local
  // limit such as ETOOMANYREFS met by try_send included) means nothing of it was sent. Once
  // taken, a local limit met while flushing it (ETOOMANYREFS, ENOBUFS, ENOMEM) is not an outcome:
  // the message stays queued, whole, and the send retries until it is out; only
  // errc::peer_closed, errc::broken, errc::closed or a cancellation (below) end it before. While
  // shared_memory.max_in_flight is reached (the peer has not read the memfds already sent), the
  // send waits for the peer to read. Neither wait has socket readiness to end it: the send
  // pauses on a timer, from 50 us doubling up to 10 ms, and tries again, rather than spin. A
  // peer that never reads, or a limit that never clears, keeps the send pending: bound it with
  // a timeout. A paused send sees a cancellation through its slot at the latest when it wakes.
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
  // errc::closed, asio::error::operation_aborted (every cancellation type: the queue is kept),
  // and the local limits of channel::flush (ETOOMANYREFS, ENOBUFS, ENOMEM: the queue is kept;
  // flush again later).
  template <::asio::completion_token_for<send_signature> Token =
                ::asio::default_completion_token_t<executor_type>>
  auto async_flush(Token&& token = ::asio::default_completion_token_t<executor_type>()) {
    return detail::start<send_signature>(
        s_.get(), [] { return detail::flush_steps{}; }, std::forward<Token>(token));
  }

 private:
  template <typename>
  friend class basic_channel;

  using state = detail::channel_state<Executor>;

  static std::unique_ptr<state> make_state(const executor_type& ex, duplex::channel ch) {
    const int fd = detail::watch_fd(ch);
    if (fd >= 0) {
      try {
        detail::set_non_blocking(fd);
      } catch (...) {
        ::close(fd);
        throw;
      }
    }
    return std::make_unique<state>(std::move(ch), ex, fd);
  }

  // The state of other, moved to this executor type: the duplicate fd is unregistered from one
  // and registered anew for the other (as Asio 1.22's descriptors, which do not convert).
  template <typename OtherExecutor>
  static std::unique_ptr<state> take_over(basic_channel<OtherExecutor>&& other) {
    auto& from = *other.s_;
    const int fd = from.release_fd();
    return std::make_unique<state>(std::move(from.ch), executor_type(from.ex), fd);
  }

  template <typename Token>
  auto start_send(detail::send_source what, Token&& token) {
    return detail::start<send_signature>(
        s_.get(), [what] { return detail::send_steps{what}; }, std::forward<Token>(token));
  }

  std::unique_ptr<state> s_;
};

// A channel whose operations run on any executor (the usual choice).
using channel = basic_channel<>;

// The completion signature of async_accept.
using accept_signature = void(std::error_code, duplex::connection);

// A duplex::listener as an Asio I/O object: async_accept gives the next connection, once
// accepted and (with an authkey) authenticated, without blocking the executor. Move-only; owns
// the listener.
//
//   duplex::asio::acceptor acc(io, std::move(*duplex::listener::listen(at, options)));
//   duplex::connection c = co_await acc.async_accept(asio::use_awaitable);
//   duplex::asio::channel ch(io, std::move(c.chan));
//
// How it works: each operation waits for the listener's native_handle() (a close-on-exec
// duplicate of it) to be readable, which it is whenever the listener's accept may make progress
// (a new connection, a handshake's bytes, a handshake's deadline), and then calls the listener's
// accept with a zero timeout, which takes the waiting connections and moves their handshakes on;
// when that gives no connection yet, it waits again. The rules of basic_channel hold: at most one
// async_accept outstanding; handlers never run inside the initiating call; the acceptor must
// outlive its operations.
template <typename Executor = ::asio::any_io_executor>
class basic_acceptor {
 public:
  using executor_type = Executor;

  // Takes ownership of l; its operations run on ex. A closed (or empty) listener is accepted:
  // its operations complete with errc::closed. Throws std::system_error if native_handle()
  // cannot be duplicated or registered with the reactor.
  basic_acceptor(const executor_type& ex, duplex::listener l)
      : s_(std::make_unique<state>(ex, std::move(l))) {}

  // Takes ownership of l; its operations run on ctx's executor.
  template <detail::execution_context ExecutionContext>
  basic_acceptor(ExecutionContext& ctx, duplex::listener l)
      : basic_acceptor(executor_type(ctx.get_executor()), std::move(l)) {}

  basic_acceptor(basic_acceptor&&) noexcept = default;
  basic_acceptor& operator=(basic_acceptor&&) noexcept = default;
  basic_acceptor(const basic_acceptor&) = delete;
  basic_acceptor& operator=(const basic_acceptor&) = delete;

  // Closes the listener; an outstanding operation completes with errc::closed.
  ~basic_acceptor() {
    if (s_) s_->close();
  }

  [[nodiscard]] executor_type get_executor() const noexcept { return s_->ex; }

  // The listener: local_address(), failures(), last_failure(). Do not call its accept while an
  // async_accept is outstanding.
  [[nodiscard]] duplex::listener& listener() noexcept { return s_->l; }

  // Makes an outstanding async_accept complete with asio::error::operation_aborted. A
  // connection in its handshake stays with the listener: the next accept takes it.
  void cancel() {
    std::error_code ignored;
    static_cast<void>(s_->watch.cancel(ignored));
  }

  // Closes the listener (its unix socket file is removed); an outstanding async_accept, and
  // every later one, completes with errc::closed.
  void close() { s_->close(); }

  // Accepts the next connection. Completion: void(std::error_code, duplex::connection); on error
  // the connection is empty. Errors: those of listener::accept but errc::timed_out (errc::closed,
  // ENOMEM, errors of epoll_wait), errors of the reactor's wait, and
  // asio::error::operation_aborted (cancelled, by cancel() or the handler's cancellation slot:
  // every cancellation type; nothing is lost). A connection that fails its handshake is the
  // listener's failure (on_failure, failures()), not the operation's: it goes on waiting.
  template <::asio::completion_token_for<accept_signature> Token =
                ::asio::default_completion_token_t<executor_type>>
  auto async_accept(Token&& token = ::asio::default_completion_token_t<executor_type>()) {
    return ::asio::async_compose<Token, accept_signature>(detail::accept_op<Executor>(s_.get()),
                                                          token, s_->ex);
  }

 private:
  using state = detail::acceptor_state<Executor>;
  std::unique_ptr<state> s_;
};

// An acceptor whose operations run on any executor.
using acceptor = basic_acceptor<>;

}  // namespace duplex::asio
