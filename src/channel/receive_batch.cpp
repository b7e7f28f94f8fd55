// The channel's receive_batch: every message that can be had with at most one wait, handed to a
// callback in place where it can be (a stream's buffered frames), each delivered exactly once.
#include <atomic>
#include <new>
#include <thread>

#include "channel/state.hpp"

namespace duplex {

result<std::size_t> channel::impl::receive_batch(const wait_spec& w,
                                                 void (*call_fn)(void*, message_view&), void* fn,
                                                 std::size_t max) {
  const call c(*this);
  if (auto u = usable(c); !u) return std::unexpected(u.error());
  if (auto entered = enter_receive(w); !entered) return std::unexpected(entered.error());
  struct release_rx {
    impl& i;
    ~release_rx() {
      i.end_receive();
      i.rx.release();
    }
  } release{*this};
  // Each message is passed over before the callback sees it, or (shown in place) by the
  // callback's guard on the way out, even when the callback throws: a message is delivered once,
  // the one it threw on included, and the rest stay queued for the next call.
  const auto deliver_to_fn = [&](message_view& view) {
    const struct in_callback {
      std::atomic<std::thread::id>& who;
      explicit in_callback(std::atomic<std::thread::id>& w) : who(w) {
        who.store(std::this_thread::get_id(), std::memory_order_relaxed);
      }
      ~in_callback() { who.store(std::thread::id{}, std::memory_order_relaxed); }
    } mark{delivering};
    call_fn(fn, view);
  };
  std::size_t count = 0;
  if (stash) {
    message m = std::move(*stash);
    stash.reset();
    message_view view{std::as_const(m).bytes(), m.fds()};
    deliver_to_fn(view);
    ++count;
  }
  if (sock.kind() != socket_kind::stream) {
    // One packet, one read: deliver what can be had without waiting after the first.
    while (count < max) {
      message m;
      result<message_info> r = fail_errno(ENOMEM);
      try {
        r = receive_packet(count == 0 ? w : wait_spec::now(), destination{&m, {}, {}});
      } catch (const std::bad_alloc&) {
        arrived.clear();  // as in receive(): r stays ENOMEM
      }
      if (!r) {
        // The count first when the next call will hear the same again (as on a stream).
        if (count > 0 && (r.error() == errc::would_block || r.error() == errc::peer_closed)) {
          return count;
        }
        if (is_closed()) return fail(errc::closed);
        return std::unexpected(r.error());
      }
      message_view view{std::as_const(m).bytes(), m.fds()};
      deliver_to_fn(view);
      ++count;
    }
    return count;
  }
  spinner spin(options.busy_poll, w.until, w.kind != wait_kind::try_once);
  while (count < max) {
    if (const_buffer plain; decoder.next_plain(plain)) {
      // A small message without fds, the common case of a batch: in place, with no state change
      // but passing it over.
      message_view view{plain, {}};
      const struct finish_on_exit {
        detail::stream_decoder& d;
        const_buffer plain;
        ~finish_on_exit() { d.finish_plain(plain); }
      } finish{decoder, plain};
      deliver_to_fn(view);
      ++count;
      continue;
    }
    switch (decoder.next_event()) {
      case detail::stream_decoder::event::header_ready: {
        // In place: the bytes stay in the receive buffer, nothing is allocated.
        message_view view;
        if (decoder.in_place(view.bytes, view.fds)) {
          const struct finish_on_exit {
            detail::stream_decoder& d;
            ~finish_on_exit() { d.finish_view(); }  // closes the fds the callback did not take
          } finish{decoder};
          deliver_to_fn(view);
          ++count;
        } else {
          decoder.accept_owned();
        }
        continue;
      }
      case detail::stream_decoder::event::complete: {
        const std::uint8_t flags = decoder.pending_flags();
        message m = decoder.take_message();
        if (flags != 0) {
          result<std::optional<message>> resolved = fail_errno(ENOMEM);
          try {
            resolved = resolve(flags, std::as_const(m).bytes(), m.take_fds());
          } catch (const std::bad_alloc&) {
            // resolved stays ENOMEM: that message is skipped, as receive() reports it
          }
          if (!resolved) return std::unexpected(resolved.error());
          if (!*resolved) continue;  // a pool announce
          m = std::move(**resolved);
        }
        message_view view{std::as_const(m).bytes(), m.fds()};
        deliver_to_fn(view);
        ++count;
        continue;
      }
      case detail::stream_decoder::event::failed: {
        auto failed = decoder_failed();
        // close() from another thread shuts the socket down to wake this call: it reads as the
        // end of the stream, but what the caller must hear is closed.
        if (is_closed()) return fail(errc::closed);
        return failed;
      }
      case detail::stream_decoder::event::need_more:
        if (count > 0) return count;  // no more syscalls once something was delivered
        if (auto r = read_more(w, spin); !r) {
          if (is_closed()) return fail(errc::closed);
          return std::unexpected(r.error());
        }
        continue;
    }
  }
  return count;
}

}  // namespace duplex
