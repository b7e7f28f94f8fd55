// The channel's send side: the public sends' checks, framing, writing to the socket, and the
// outgoing queue that try_send leaves and flush() empties.
#include <limits.h>
#include <poll.h>
#include <sys/socket.h>

#include <array>
#include <cassert>
#include <cstring>
#include <new>

#include "base/syscall.hpp"
#include "channel/state.hpp"
#include "framing/native_header.hpp"

namespace duplex {

using detail::peer_gone;

// A frame ready to go out: its header (the payload stays in the caller's buffers). A value: the
// header is reached through head(), never through a pointer that a copy would leave dangling.
struct channel::impl::frame {
  std::array<std::byte, wire::native_header_size> head_storage{};
  std::size_t head_size = 0;
  std::uint64_t total = 0;  // header and payload

  [[nodiscard]] const_buffer head() const noexcept {
    return std::span(head_storage).first(head_size);
  }
};

channel::impl::frame channel::impl::make_frame(std::uint64_t payload, std::size_t fd_count,
                                               std::uint8_t flags) const noexcept {
  static_assert(wire::native_header_size >= wire::python_max_header_size);
  frame f;
  if (options.format == framing::native) {
    f.head_storage = wire::encode_native({payload, static_cast<std::uint16_t>(fd_count), flags});
    f.head_size = wire::native_header_size;
  } else {
    const auto python_head = std::span(f.head_storage).first<wire::python_max_header_size>();
    f.head_size = wire::encode_python(payload, python_head);
  }
  f.total = f.head_size + payload;
  return f;
}

result<std::size_t> channel::impl::write(detail::iovec_array& iov, std::span<const int> fds,
                                         bool blocking, std::size_t sent) {
  // A TCP stream would carry the frame and silently drop its fds (and a pool's memfd).
  if (sent == 0 && !fds.empty() && sock.domain() != socket_domain::local) {
    return fail(errc::not_supported);
  }
  const int fd = sock.native_handle();
  std::size_t written = sent;
  while (iov.size() > 0) {
    // The fds go with the first byte, and never again.
    const auto with = written == 0 ? fds : std::span<const int>{};
    auto n = detail::send_with_fds(fd, iov.data(), iov.size(), with, blocking ? 0 : MSG_DONTWAIT);
    if (n) {
      written += *n;
      iov.advance(*n);
      if (sock.kind() == socket_kind::seqpacket) break;  // a packet goes whole
      continue;
    }
    if (n.error() == errc::would_block) {
      if (!blocking) return written;
      auto ready = detail::wait_for(fd, POLLOUT, forever);  // an O_NONBLOCK socket
      if (!ready) return std::unexpected(ready.error());
      continue;
    }
    if (is_closed()) return fail(errc::closed);
    if (peer_gone(n.error())) return fail(errc::peer_closed);
    if (n.error() == std::errc::message_size) return fail(errc::message_too_large);
    // A local error (ETOOMANYREFS at the fds-in-flight limit, ENOBUFS, ENOMEM): the socket and
    // the peer are fine. Before the frame's first byte nothing has changed and the error is the
    // caller's to report; after it, the rest of the frame must still follow, so the bytes out
    // are returned with the rest left in iov and the error kept in write_stopped.
    if (written == 0) return std::unexpected(n.error());
    write_stopped = n.error();
    return written;
  }
  return written;
}

result<bool> channel::impl::flush_queue(bool blocking) {
  while (!queue.empty()) {
    outgoing& q = queue.front();
    const std::array<const_buffer, 1> rest{std::span(q.bytes).subspan(q.sent)};
    detail::iovec_array iov{std::span<const const_buffer>(rest)};
    std::array<int, max_fds_per_message> raw{};
    for (std::size_t i = 0; i < q.fds.size(); ++i)
      raw[i] = q.fds[i].get();
    write_stopped.clear();
    auto n = write(iov, std::span(raw).first(q.sent == 0 ? q.fds.size() : 0), blocking);
    if (!n) {
      // Only the end of the channel or of the peer drops what was queued: nothing queued can be
      // delivered any more. A local error (ETOOMANYREFS, ENOBUFS, ...) leaves every queued
      // message where it is, for a later flush or send once the limit is no longer reached.
      if (n.error() == errc::peer_closed || n.error() == errc::closed) {
        queue.clear();
        queued = 0;
      }
      return std::unexpected(n.error());
    }
    if (*n > 0) q.fds.clear();  // they went with the frame's first byte
    q.sent += *n;
    queued -= *n;
    if (q.sent < q.bytes.size()) {
      if (write_stopped) return std::unexpected(write_stopped);  // kept: reported, not dropped
      return false;
    }
    queue.pop_front();
  }
  return true;
}

result<void> channel::impl::enqueue(detail::iovec_array& iov, std::span<const int> fds,
                                    bool started) {
  // Everything is allocated and copied before the queue changes: if memory runs out (ENOMEM) or
  // a duplicate cannot be made, nothing is queued and the duplicates made so far close with q.
  try {
    outgoing q;
    if (!started) {
      // The caller keeps its fds: the queue holds duplicates until they are sent. If one cannot
      // be made (EBADF, EMFILE), nothing is queued: a frame must never go out short of its fds.
      q.fds.reserve(fds.size());
      for (int fd : fds) {
        auto copy = duplicate(fd);
        if (!copy) return std::unexpected(copy.error());
        q.fds.push_back(std::move(*copy));
      }
    }
    q.bytes.reserve(iov.total());
    for (std::size_t i = 0; i < iov.size(); ++i) {
      const auto* p = static_cast<const std::byte*>(iov.data()[i].iov_base);
      q.bytes.insert(q.bytes.end(), p, p + iov.data()[i].iov_len);
    }
    const std::size_t size = q.bytes.size();
    queue.push_back(std::move(q));  // unchanged if it throws
    queued += size;
  } catch (const std::bad_alloc&) {
    return fail_errno(ENOMEM);
  }
  return {};
}

result<void> channel::impl::put(std::span<const const_buffer> parts, std::uint64_t payload,
                                std::span<const int> fds, std::uint8_t flags, bool blocking) {
  // check_message() passed this message (or it is one of duplex's own descriptor frames).
  assert(fds.size() <= max_fds_per_message);
  assert(options.format == framing::native || (fds.empty() && flags == 0));
  if (parts.size() + 1 > IOV_MAX) return fail_errno(EMSGSIZE);
  const frame f = make_frame(payload, fds.size(), flags);
  std::optional<detail::iovec_array> framed(std::in_place, parts, f.head());
  if (sock.kind() == socket_kind::seqpacket && f.total >= staging_from && f.total <= staging_size &&
      detail::packet_copy_would_crawl(framed->data(), framed->size())) {
    // Copied once here, at a distance the copy runs at full speed, so that the kernel's copy
    // into the packet does too: from a page-aligned buffer into a page-aligned packet.
    if (!staging) staging.reset(static_cast<std::byte*>(std::aligned_alloc(4096, staging_size)));
    if (staging) {
      detail::gather_in_steps(framed->data(), framed->size(), staging.get());
      const std::array<const_buffer, 1> whole{const_buffer(staging.get(), f.total)};
      framed.emplace(std::span<const const_buffer>(whole));
    }
  }
  return put_framed(*framed, fds, f.total, blocking);
}

result<void> channel::impl::put_small(std::span<const const_buffer> parts, std::uint64_t payload,
                                      bool blocking) {
  // Written before it is read: header, then payload.
  std::array<std::byte, wire::native_header_size + small_payload> bytes;  // NOLINT
  const auto head = wire::encode_native({payload, 0, 0});
  std::memcpy(bytes.data(), head.data(), head.size());
  const std::size_t total = head.size() + detail::copy_parts(parts, bytes.data() + head.size());
  std::size_t sent = 0;
  if (blocking || queue.empty()) {
    auto n =
        detail::send_bytes(sock.native_handle(), bytes.data(), total, blocking ? 0 : MSG_DONTWAIT);
    if (n && *n == total) return {};
    // A partial send, a full socket or an error: put_framed goes on from here (and its own send
    // meets an error again and reports it as for any frame).
    if (n) sent = *n;
  }
  const std::array<const_buffer, 1> whole{std::span(bytes).first(total)};
  detail::iovec_array iov{std::span<const const_buffer>(whole)};
  iov.advance(sent);
  return put_framed(iov, {}, total, blocking, sent);
}

result<void> channel::impl::put_framed(detail::iovec_array& iov, std::span<const int> fds,
                                       std::uint64_t total, bool blocking, std::size_t sent) {
  if (blocking) {
    write_stopped.clear();
    auto n = write(iov, fds, true, sent);
    if (!n) return std::unexpected(n.error());
    // A local error stopped the frame after its first byte (and its fds) went out: the rest
    // waits in the queue, as try_send's would, and goes first with the next flush or send. The
    // message is accepted: the caller must not send it again.
    if (iov.size() > 0) return enqueue_rest(iov);
    return {};
  }
  if (!queue.empty()) {
    if (queued + total > options.max_queued_bytes) return fail(errc::queue_full);
    return enqueue(iov, fds, false);
  }
  write_stopped.clear();
  auto n = write(iov, fds, false, sent);
  if (!n) return std::unexpected(n.error());
  // What the kernel did not take waits in the queue (the first message of an empty queue is
  // taken whatever its size).
  if (iov.size() > 0) {
    if (*n > 0) return enqueue_rest(iov);
    return enqueue(iov, fds, false);
  }
  return {};
}

result<void> channel::impl::enqueue_rest(detail::iovec_array& iov) {
  auto q = enqueue(iov, {}, true);
  if (!q) broken.store(true);  // part of the frame is out and the rest cannot follow
  return q;
}

result<void> channel::impl::send_payload(std::span<const const_buffer> parts, std::uint64_t payload,
                                         std::span<const int> fds, bool blocking) {
  const auto& shm = options.shared_memory;
  const bool can_share = shm.enabled && options.format == framing::native;
  if (payload <= small_payload && fds.empty() && options.format == framing::native &&
      sock.kind() == socket_kind::stream && (!can_share || payload < shm.threshold)) {
    return put_small(parts, payload, blocking);
  }
  if (!can_share || payload < shm.threshold) {
    auto r = put(parts, payload, fds, 0, blocking);
    // A packet the kernel refuses as too large (seqpacket, below the threshold but above what
    // one packet holds) still goes, through shared memory, when this channel has it.
    if (r || r.error() != errc::message_too_large || !can_share) return r;
  }
  // Into the pool if it has room; else a sealed memfd of its own (which takes one fd more).
  if (auto p = pool()) {
    if (auto b = p->allocate(static_cast<std::size_t>(payload))) {
      detail::copy_parts(parts, b->data);
      auto r = put_shared(*b, fds, blocking);
      if (!r) p->discard(*b);
      return r;
    }
  }
  if (fds.size() < max_fds_per_message) {
    // Held back while the peer has not taken max_in_flight of them: a peer that never reads must
    // not make this end's shared memory grow without bound.
    if (auto room = memfd_room(payload, blocking); !room) return room;
    if (auto memfd = detail::sealed_memfd(parts, static_cast<std::size_t>(payload))) {
      return put_memfd(std::move(*memfd), payload, fds, blocking);
    }
  }
  return put(parts, payload, fds, 0, blocking);  // no shared memory to be had: inline, as usual
}

result<void> channel::impl::send(std::span<const const_buffer> parts, std::span<const int> fds) {
  const call c(*this);
  if (auto u = usable(c); !u) return u;
  const auto payload = check_message(parts, fds);
  if (!payload) return std::unexpected(payload.error());
  const std::lock_guard lock(tx);
  if (auto u = usable(c); !u) return u;
  // What try_send queued goes first: messages leave in the order they were given.
  if (auto flushed = flush_queue(true); !flushed) return std::unexpected(flushed.error());
  return send_payload(parts, *payload, fds, true);
}

result<void> channel::impl::try_send(std::span<const const_buffer> parts,
                                     std::span<const int> fds) {
  const call c(*this);
  if (auto u = usable(c); !u) return u;
  const auto payload = check_message(parts, fds);
  if (!payload) return std::unexpected(payload.error());
  const std::unique_lock lock(tx, std::try_to_lock);
  if (!lock.owns_lock()) return fail(errc::would_block);  // another thread is sending
  if (auto u = usable(c); !u) return u;
  if (!queue.empty()) {
    if (auto flushed = flush_queue(false); !flushed) return std::unexpected(flushed.error());
  }
  return send_payload(parts, *payload, fds, false);
}

result<void> channel::impl::send(const batch& b) {
  if (b.format() != options.format) return fail_errno(EINVAL);
  return send_frames(std::span(b.wire_.data(), b.wire_.size()), b.largest_, b.fd_frames_, b.fds_);
}

result<void> channel::impl::send_frames(std::span<const std::byte> wire, std::uint64_t largest,
                                        std::span<const detail::batch_fd_frame> fd_frames,
                                        std::span<const int> fds) {
  const call c(*this);
  if (auto u = usable(c); !u) return u;
  if (largest > options.max_message_size) return fail(errc::message_too_large);
  const std::lock_guard lock(tx);
  if (auto u = usable(c); !u) return u;
  if (auto flushed = flush_queue(true); !flushed) return std::unexpected(flushed.error());
  const auto send_run = [&](std::size_t begin, std::size_t end,
                            std::span<const int> with) -> result<void> {
    const std::array<const_buffer, 1> run{wire.subspan(begin, end - begin)};
    detail::iovec_array iov{std::span<const const_buffer>(run)};
    // Once a local error left part of a run queued, the runs after it follow it there.
    if (!queue.empty()) return enqueue(iov, with, false);
    write_stopped.clear();
    auto n = write(iov, with, true);
    if (!n) return std::unexpected(n.error());
    if (iov.size() > 0) return enqueue_rest(iov);  // its first byte and fds are out: accepted
    return {};
  };
  const auto fds_of = [&](const detail::batch_fd_frame& f) {
    return fds.subspan(f.fds_begin, f.fd_count);
  };
  if (sock.kind() == socket_kind::stream) {
    // A run of frames in one sendmsg; a frame with fds starts a run, so its fds go with its own
    // first byte.
    std::size_t begin = 0;
    std::span<const int> with;
    for (std::size_t k = 0; k <= fd_frames.size(); ++k) {
      const std::size_t end = k < fd_frames.size() ? fd_frames[k].offset : wire.size();
      if (end > begin) {
        if (auto r = send_run(begin, end, with); !r) return r;
      }
      if (k < fd_frames.size()) {
        begin = end;
        with = fds_of(fd_frames[k]);
      }
    }
    return {};
  }
  // Seqpacket: one frame, one packet. The batch wrote the headers (native framing: a batch of
  // another framing cannot reach a seqpacket channel), so their lengths are trusted.
  std::size_t next_fd_frame = 0;
  for (std::size_t at = 0; at < wire.size();) {
    const std::size_t end = at + wire::native_header_size +
                            static_cast<std::size_t>(detail::load_le<8>(wire.data() + at + 8));
    std::span<const int> with;
    if (next_fd_frame < fd_frames.size() && fd_frames[next_fd_frame].offset == at) {
      with = fds_of(fd_frames[next_fd_frame++]);
    }
    if (auto r = send_run(at, end, with); !r) return r;
    at = end;
  }
  return {};
}

result<bool> channel::impl::flush() {
  const call c(*this);
  if (auto u = usable(c); !u) return std::unexpected(u.error());
  const std::unique_lock lock(tx, std::try_to_lock);
  if (!lock.owns_lock()) return false;  // a send in another thread is writing (and flushing)
  return flush_queue(false);
}

result<void> channel::impl::shutdown_send() {
  const call c(*this);
  if (!c.ok()) return fail(errc::closed);
  const std::lock_guard lock(tx);  // never in the middle of someone's frame
  // Whatever try_send queued goes out before the end-of-stream.
  if (auto flushed = flush_queue(true); !flushed) return std::unexpected(flushed.error());
  return sock.shutdown(shutdown_how::write);
}

}  // namespace duplex
