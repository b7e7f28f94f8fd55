// The channel's receive side: the public receives, the stream receive loop (driving the stream
// decoder), the seqpacket one (a packet per recvmsg, checked here), and delivery into the
// caller's message or buffer.
#include <linux/sockios.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/socket.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <new>
#include <string>

#include "channel/state.hpp"
#include "framing/frame_check.hpp"
#include "framing/native_header.hpp"

namespace duplex {

result<message_info> channel::impl::receive(const wait_spec& w, destination dest) {
  const call c(*this);
  if (auto u = usable(c); !u) return std::unexpected(u.error());
  if (auto entered = enter_receive(w); !entered) return std::unexpected(entered.error());
  const auto take_stash = [&] {
    message m = std::move(*stash);
    stash.reset();
    return deliver(std::move(m), dest);
  };
  result<message_info> r = fail_errno(ENOMEM);
  try {
    r = stash                                ? take_stash()
        : sock.kind() == socket_kind::stream ? receive_stream(w, dest)
                                             : receive_packet(w, dest);
  } catch (const std::bad_alloc&) {
    // Every allocation of a message's own is checked where it is made (the message is skipped
    // and reported as ENOMEM); this catches the small ones on the way (fd lists, shared-memory
    // keepers, error details), so that no exception leaves a result-returning call.
    arrived.clear();
  }
  end_receive();
  rx.release();
  if (!r && is_closed()) return fail(errc::closed);
  return r;
}

result<message_info> channel::impl::deliver(message m, destination dest) {
  message_info info{m.size(), m.fds().size()};
  if (dest.owned != nullptr) {
    *dest.owned = std::move(m);
    return info;
  }
  if (info.size > dest.buf.size() || info.fds > dest.fds.size()) {
    const errc why = info.size > dest.buf.size() ? errc::buffer_too_small : errc::too_many_fds;
    stash = std::move(m);  // kept whole for a call with room for it
    return fail(why);
  }
  if (info.size > 0) std::memcpy(dest.buf.data(), std::as_const(m).bytes().data(), info.size);
  for (std::size_t i = 0; i < info.fds; ++i)
    dest.fds[i] = std::move(m.fds()[i]);
  return info;
}

std::unexpected<std::error_code> channel::impl::decoder_failed() {
  if (decoder.fatal()) {
    set_detail(decoder.detail());
    broken.store(true);
    return std::unexpected(decoder.error());
  }
  // A frame skipped whole (pending_flags() are still its own): a pool announce among them takes
  // its pool with it.
  return lose_pool(decoder.pending_flags(), decoder.error());
}

result<void> channel::impl::wait(const wait_spec& w, short events) const {
  if (w.kind == wait_kind::try_once) return fail(errc::would_block);
  auto r = detail::wait_for(sock.native_handle(), events, w.until.remaining());
  if (!r) return std::unexpected(r.error());
  return {};
}

result<void> channel::impl::wait_readable(std::chrono::nanoseconds timeout) {
  const call c(*this);
  if (auto u = usable(c); !u) return u;
  // Inside this channel's receive_batch callback no receive can make progress until it returns.
  if (inside_callback()) return fail(errc::reentrant_call);
  // Buffered bytes (read by an earlier call) count: the socket alone would not show them.
  if (rx.acquire(wait_spec::now())) {
    const bool buffered = decoder.buffered() > 0;
    rx.release();
    if (buffered) return {};
  }
  auto r = detail::wait_for(sock.native_handle(), POLLIN, timeout);
  // A close() from another thread ends the wait with a shutdown, which polls as readable.
  if (is_closed()) return fail(errc::closed);
  if (!r) return std::unexpected(r.error());
  return {};
}

std::size_t channel::impl::buffered_bytes() noexcept {
  if (!rx.acquire(wait_spec::now())) return 0;
  std::size_t n = decoder.buffered();
  if (stash) n += stash->size() + 1;  // a whole message waits, even an empty one
  rx.release();
  return n;
}

bool channel::impl::is_drained() noexcept {
  if (!drained.load(std::memory_order_relaxed)) return false;
  if (mark_asked.load(std::memory_order_relaxed)) return true;
  // A stream read also stops short at an urgent byte (MSG_OOB) with more behind it: at the mark,
  // the socket is not empty. Asked here, once per receive call, so only drained()'s callers pay.
  const call c(*this);
  int at_mark = 0;
  if (!c.ok() || (::ioctl(sock.native_handle(), SIOCATMARK, &at_mark) == 0 && at_mark != 0)) {
    drained.store(false, std::memory_order_relaxed);
    return false;
  }
  mark_asked.store(true, std::memory_order_relaxed);
  return true;
}

result<void> channel::impl::read_more(const wait_spec& w, spinner& spin) {
  const int fd = sock.native_handle();
  for (;;) {
    const int flags = w.kind == wait_kind::block && !spin.active() ? 0 : MSG_DONTWAIT;
    mutable_buffer target;
    try {
      // The receive buffer is allocated on the first read, and room to keep this read's fds.
      target = decoder.read_target();
    } catch (const std::bad_alloc&) {
      return fail_errno(ENOMEM);  // nothing was read: a later call can try again
    }
    iovec v{target.data(), target.size()};
    auto r = detail::recv_with_fds(fd, &v, 1, flags, arrived);
    if (r) {
      // Shorter than the room it had, with no control message to stop it early: the read
      // found the socket empty (see drained()).
      read_emptied = r->bytes > 0 && r->bytes < target.size() && !r->control && !r->ctrunc;
      if (r->bytes == 0) {
        decoder.end_of_stream();
      } else {
        try {
          decoder.commit(r->bytes, arrived.taken(), r->ctrunc);
        } catch (const std::bad_alloc&) {
          // Not after read_target() above. Were it to happen, the read's bytes and fds
          // (closed here) would be in no decoder: the stream cannot go on.
          arrived.clear();
          set_detail("no memory to keep the fds that arrived with a read");
          broken.store(true);
          return fail_errno(ENOMEM);
        }
      }
      arrived.clear();
      return {};
    }
    if (auto again = retry_after(r.error(), w, spin, flags); !again) return again;
  }
}

result<void> channel::impl::retry_after(std::error_code e, const wait_spec& w, spinner& spin,
                                        int flags) const {
  if (e == errc::would_block) {
    if (spin.again()) return {};
    // The spin is over: block in recvmsg itself, unless that attempt already could block (an
    // O_NONBLOCK socket, or a deadline): then wait for readiness.
    if (w.kind == wait_kind::block && (flags & MSG_DONTWAIT) != 0) return {};
    return wait(w, POLLIN);
  }
  // The peer closed with our data unread. The error is reported once (on a stream after the
  // peer's last byte, on seqpacket before its queued packets); reading on delivers the rest.
  if (e == std::errc::connection_reset) return {};
  return std::unexpected(e);
}

result<message_info> channel::impl::receive_stream(const wait_spec& w, destination dest) {
  spinner spin(options.busy_poll, w.until, w.kind != wait_kind::try_once);
  for (;;) {
    if (const_buffer plain; decoder.next_plain(plain)) {
      // A whole message without flags or fds is buffered: copied out by the short path. What
      // does not fit the caller's buffer stays for a later call, as below; a message that cannot
      // be allocated goes the long way, which reports it.
      if (dest.owned == nullptr) {
        if (plain.size() > dest.buf.size()) return fail(errc::buffer_too_small);
        if (!plain.empty()) std::memcpy(dest.buf.data(), plain.data(), plain.size());
        decoder.finish_plain(plain);
        return message_info{plain.size(), 0};
      }
      try {
        dest.owned->assign(plain);
        decoder.finish_plain(plain);
        return message_info{plain.size(), 0};
      } catch (const std::bad_alloc&) {
        // poll() below meets the same frame and reports ENOMEM for it.
      }
    }
    switch (decoder.next_event()) {
      case detail::stream_decoder::event::complete: {
        if (const std::uint8_t flags = decoder.pending_flags(); flags != 0) {
          message d = decoder.take_message();
          auto resolved = resolve(flags, std::as_const(d).bytes(), d.take_fds());
          if (!resolved) return std::unexpected(resolved.error());
          if (!*resolved) continue;  // a pool announce: nothing to deliver
          return deliver(std::move(**resolved), dest);
        }
        message_info info{static_cast<std::size_t>(decoder.pending_size()), decoder.pending_fds()};
        if (dest.owned != nullptr) {
          *dest.owned = decoder.take_message();
        } else {
          if (info.size > dest.buf.size()) return fail(errc::buffer_too_small);
          if (info.fds > dest.fds.size()) return fail(errc::too_many_fds);
          decoder.take_into(dest.buf, dest.fds);
        }
        return info;
      }
      case detail::stream_decoder::event::header_ready:
        if (dest.owned != nullptr || decoder.pending_flags() != 0) {
          decoder.accept_owned();  // a descriptor frame is small: resolved at complete
        } else {
          // Nothing is consumed when it does not fit: the message stays for a later call.
          if (decoder.pending_size() > dest.buf.size()) return fail(errc::buffer_too_small);
          if (decoder.pending_fds() > dest.fds.size()) return fail(errc::too_many_fds);
          decoder.accept_into(dest.buf);
        }
        continue;
      case detail::stream_decoder::event::failed: return decoder_failed();
      case detail::stream_decoder::event::need_more:
        if (auto r = read_more(w, spin); !r) {
          // The caller's buffer must not be written to after this call returns.
          decoder.detach();
          return std::unexpected(r.error());
        }
        continue;
    }
  }
}

result<message_info> channel::impl::receive_packet(const wait_spec& w, destination dest) {
  const int fd = sock.native_handle();
  // Every packet is read whole by one recvmsg: header, then the caller's buffer (or a message
  // the size of the packet there, see below), then the spill area for whatever those cannot
  // hold, which is as large as any packet this channel can take (see docs/design.md).
  if (!spill.mapped()) {
    const auto limit = detail::largest_packet();
    if (!limit) return std::unexpected(limit.error());
    if (auto m = spill.map(std::min<std::size_t>(options.max_message_size, *limit)); !m) {
      return std::unexpected(m.error());
    }
  }
  spinner spin(options.busy_poll, w.until, w.kind != wait_kind::try_once);
  message first_part;  // made once, kept across attempts that would block
  bool first_made = false;
  for (;;) {
    const int flags = w.kind == wait_kind::block && !spin.active() ? 0 : MSG_DONTWAIT;
    if (dest.owned != nullptr && !first_made && last_packet_large) {
      // After a packet larger than the spill area keeps resident, the next may be as large: its
      // size is learned first (MSG_PEEK | MSG_TRUNC into the header alone, with no control
      // buffer, so its fds stay with it) and a message of exactly that size made, which the
      // packet is then read straight into. Never sized by an earlier packet: a small packet
      // after a large one costs its own size. If that message cannot be had, the packet is read
      // into the spill area and reported (ENOMEM) below, so one squeeze skips one message and
      // never blocks the ones after it. Smaller packets go to the spill area and are copied out.
      std::array<std::byte, wire::native_header_size> peek_head{};
      auto peeked =
          detail::recv_bytes(fd, peek_head.data(), peek_head.size(), MSG_PEEK | MSG_TRUNC | flags);
      if (!peeked) {
        if (auto again = retry_after(peeked.error(), w, spin, flags); !again) {
          return std::unexpected(again.error());
        }
        continue;
      }
      first_made = true;
      if (*peeked > peek_head.size() && *peeked - peek_head.size() <= options.max_message_size) {
        try {
          first_part = message::with_size(*peeked - peek_head.size());
        } catch (const std::bad_alloc&) {
          first_part = message();  // read into the spill area instead: ENOMEM below
        }
      }
    }
    const mutable_buffer first = dest.owned != nullptr ? first_part.bytes() : dest.buf;
    std::array<std::byte, wire::native_header_size> head{};
    const std::array<mutable_buffer, 3> parts{mutable_buffer(head), first, spill.bytes()};
    detail::iovec_array iov{std::span<const mutable_buffer>(parts)};
    auto r = detail::recv_with_fds(fd, iov.data(), iov.size(), MSG_TRUNC | flags, arrived);
    if (!r) {
      if (auto again = retry_after(r.error(), w, spin, flags); !again) {
        return std::unexpected(again.error());
      }
      continue;
    }
    // From here on the packet is consumed; any fd it brought is in `arrived`, closed unless
    // handed on. The pages of the spill area a large packet reached are given back on the way out.
    const std::size_t size = r->bytes;  // the whole packet's, MSG_TRUNC
    const std::size_t before_spill = head.size() + first.size();
    const struct trim_on_exit {
      detail::spill_area& area;
      std::size_t used;
      ~trim_on_exit() { area.trim(used); }
    } trim{spill, size > before_spill ? size - before_spill : 0};
    if (size == 0 && arrived.count == 0 && detail::seqpacket_at_end(fd)) {
      return fail(errc::peer_closed);
    }
    // Every check of the frame (detail::check_native_frame, check_frame_fds), and the one of a
    // packet cut short by the kernel. A frame that breaks the protocol breaks the channel; one
    // refused is skipped whole. Either way its fds are closed.
    std::string why;  // what the peer broke, if it did
    const auto refuse = [&](detail::frame_verdict v) {
      arrived.clear();
      if (v.what == detail::frame_verdict::outcome::fatal) {
        set_detail(std::move(why));
        broken.store(true);
      }
      return std::unexpected(v.error);
    };
    wire::native_header h;
    if (auto v = detail::check_native_frame(head, size, options.max_message_size, h, why);
        !v.accepted()) {
      return refuse(v);
    }
    if (r->trunc) {
      // Only a sender with CAP_NET_ADMIN (SO_SNDBUFFORCE) makes a packet this large.
      arrived.clear();
      set_detail("a packet of " + std::to_string(size) + " bytes is larger than " +
                 std::to_string(head.size() + first.size() + spill.bytes().size()) +
                 ", the most this end reads (twice net.core.wmem_max)");
      return fail(errc::message_too_large);
    }
    if (auto v = detail::check_frame_fds(h, arrived.count, r->ctrunc, options.max_fds, why);
        !v.accepted()) {
      // A pool announce skipped takes its pool with it.
      if (v.what == detail::frame_verdict::outcome::skip) {
        static_cast<void>(lose_pool(h.flags, v.error));
      }
      return refuse(v);
    }
    const auto length = static_cast<std::size_t>(h.length);
    const std::size_t in_first = std::min(length, first.size());
    const std::size_t spilled = length - in_first;
    auto got = arrived.taken();
    const message_info info{length, got.size()};
    // Straight into the caller's buffer and fds: no copy.
    if (h.flags == 0 && dest.owned == nullptr && spilled == 0 && got.size() <= dest.fds.size()) {
      for (std::size_t i = 0; i < got.size(); ++i)
        dest.fds[i] = std::move(got[i]);
      arrived.clear();
      return info;
    }
    message m;
    if (dest.owned != nullptr && spilled == 0 && length == first.size() && length > 0) {
      m = std::move(first_part);  // made to the packet's size: no copy
    } else {
      try {
        m = message::with_size(length);
      } catch (const std::bad_alloc&) {
        arrived.clear();
        return lose_pool(h.flags, std::error_code(ENOMEM, std::system_category()));
      }
      auto out = m.bytes();
      if (in_first > 0) std::memcpy(out.data(), first.data(), in_first);
      if (spilled > 0) std::memcpy(out.data() + in_first, spill.bytes().data(), spilled);
    }
    first_made = false;
    first_part = message();
    if (dest.owned != nullptr) last_packet_large = length > detail::spill_area::kept;
    m.fds().reserve(got.size());
    for (auto& f : got)
      m.fds().push_back(std::move(f));
    arrived.clear();
    if (h.flags != 0) {
      auto resolved = resolve(h.flags, std::as_const(m).bytes(), m.take_fds());
      if (!resolved) return std::unexpected(resolved.error());
      if (!*resolved) continue;  // a pool announce: nothing to deliver
      return deliver(std::move(**resolved), dest);
    }
    // Owned; or a caller's buffer or fd array too small for it: kept whole for the next call.
    return deliver(std::move(m), dest);
  }
}

}  // namespace duplex
