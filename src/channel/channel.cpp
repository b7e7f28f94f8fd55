#include "duplex/channel.hpp"

#include <fcntl.h>
#include <limits.h>
#include <linux/sockios.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/socket.h>

#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <new>
#include <optional>
#include <string>
#include <thread>

#include "base/spin.hpp"
#include "base/syscall.hpp"
#include "channel/channel_check.hpp"
#include "duplex/socket_pair.hpp"
#include "framing/native_header.hpp"
#include "framing/stream_decoder.hpp"
#include "shm/shm.hpp"
#include "socket/io.hpp"

namespace duplex {
namespace {

// How long a receive may wait.
enum class wait_kind { block, try_once, until };

struct wait_spec {
  wait_kind kind = wait_kind::block;
  detail::deadline until{forever};

  static wait_spec from(std::chrono::nanoseconds timeout) {
    wait_spec w;
    w.until = detail::deadline(timeout);
    w.kind = w.until.infinite() ? wait_kind::block : wait_kind::until;
    return w;
  }
  static wait_spec now() {
    wait_spec w;
    w.kind = wait_kind::try_once;
    return w;
  }
};

// Busy-polling before a receive blocks: a syscall per turn, so the clock is read every turn.
using spinner = detail::spinner<1>;

// The peer is gone, as a send or receive sees it.
bool peer_gone(const std::error_code& ec) {
  return ec == std::errc::broken_pipe || ec == std::errc::connection_reset;
}

// The receive and send locks: a mutex that can be waited for with a deadline. (std::timed_mutex
// would do, but libstdc++ implements its timed waits with pthread_mutex_clocklock, which
// ThreadSanitizer does not see; a condition variable it does.) Uncontended, taking and releasing
// it is one atomic exchange and one store: a call from an event loop pays no pthread mutex and no
// notify. A waiter counts itself in waiters_ before it looks at busy_, and release() looks at
// waiters_ after it clears busy_ (both sequentially consistent), so a waiter that saw the lock
// busy is always notified.
class call_lock {
 public:
  // Takes the lock, waiting as w says; false if it could not be had in time. Inline for the
  // free lock, the case of every call that is not contended.
  [[nodiscard]] bool acquire(const struct wait_spec& w) {
    return !busy_.exchange(true) || wait_to_acquire(w);
  }
  // Lockable, for std::lock_guard and std::unique_lock: lock() waits as long as it takes.
  void lock();
  [[nodiscard]] bool try_lock() { return !busy_.exchange(true); }
  void unlock() { release(); }
  void release() {
    busy_.store(false);
    if (waiters_.load() > 0) {
      // Through m_: a waiter between its look at busy_ and its wait holds m_, so the notify
      // cannot fall between the two.
      { const std::lock_guard g(m_); }
      cv_.notify_all();
    }
  }

 private:
  // acquire() once the lock was found taken.
  [[nodiscard]] bool wait_to_acquire(const struct wait_spec& w);

  std::atomic<bool> busy_{false};
  std::atomic<int> waiters_{0};
  std::mutex m_;
  std::condition_variable cv_;
};

// Where a received message goes: a new message, or a caller's buffer and fd array.
struct destination {
  message* owned = nullptr;
  mutable_buffer buf;
  std::span<unique_fd> fds;
};

void call_lock::lock() { static_cast<void>(acquire(wait_spec{})); }

bool call_lock::wait_to_acquire(const wait_spec& w) {
  if (w.kind == wait_kind::try_once) return false;
  std::unique_lock g(m_);
  waiters_.fetch_add(1);
  const auto take = [this] { return !busy_.exchange(true); };
  bool taken = true;
  if (w.kind == wait_kind::block) {
    cv_.wait(g, take);
  } else {
    taken = cv_.wait_for(g, w.until.remaining(), take);
  }
  waiters_.fetch_sub(1);
  return taken;
}

}  // namespace

struct channel::impl {
  impl(socket s, channel_options o)
      : sock(std::move(s)),
        options(o),
        decoder(o.format, o.max_message_size, o.max_fds, o.receive_buffer_size) {}

  socket sock;
  channel_options options;
  std::atomic<bool> broken{false};
  // Bit 0: closed. Above it, the calls inside the channel right now (one_call each). One word, so
  // that "closed, and no call inside" is made true by exactly one atomic step, which releases the
  // fd: no call that found the channel open can ever act on a closed (and perhaps reused) fd
  // number. (With a flag and a count apart, a call could enter between the last call's leaving
  // and its look at the flag, and have the fd closed under it.)
  static constexpr std::uint64_t closed_bit = 1;
  static constexpr std::uint64_t one_call = 2;
  std::atomic<std::uint64_t> state{0};
  std::atomic<bool> released{false};

  [[nodiscard]] bool is_closed() const noexcept { return (state.load() & closed_bit) != 0; }
  std::atomic<int> fd_copy{sock.native_handle()};  // for native_handle(); -1 once released
  call_lock tx;
  call_lock rx;
  // The thread running a receive_batch callback of this channel right now (under rx), or none.
  // Only that thread ever finds its own id here, so a relaxed load tells it whether it is inside
  // the callback.
  std::atomic<std::thread::id> delivering{};
  [[nodiscard]] bool inside_callback() const noexcept {
    return delivering.load(std::memory_order_relaxed) == std::this_thread::get_id();
  }
  // Takes rx for a receive call, waiting as w says. A call from inside a receive_batch callback
  // on this channel (which holds rx until the callback returns) is refused at once with
  // errc::reentrant_call instead of waiting for ever; the check costs nothing when rx is free.
  [[nodiscard]] result<void> enter_receive(const wait_spec& w) {
    if (rx.try_lock()) return {};
    if (inside_callback()) return fail(errc::reentrant_call);
    if (!rx.acquire(w)) {
      return fail(w.kind == wait_kind::try_once ? errc::would_block : errc::timed_out);
    }
    return {};
  }
  detail::stream_decoder decoder;  // stream channels; guarded by rx
  detail::fd_batch arrived;        // guarded by rx
  // Whether the current receive call's last read came back short and clean (guarded by rx), and
  // what drained() reports: that, with nothing left buffered when the call ended.
  bool read_emptied = false;
  std::atomic<bool> drained{false};
  // Whether drained() has already asked the socket about an urgent mark since that call.
  std::atomic<bool> mark_asked{false};
  // Ends a receive call (under rx): publishes drained.
  void end_receive() noexcept {
    mark_asked.store(false, std::memory_order_relaxed);
    drained.store(read_emptied && decoder.starved(), std::memory_order_relaxed);
    read_emptied = false;
  }

  // Marks one call as inside the channel for its lifetime. ok() is false once the channel is
  // closed: the call must then not touch the socket.
  class call {
   public:
    explicit call(impl& i) : i_(i), ok_((i.state.fetch_add(one_call) & closed_bit) == 0) {}
    ~call() {
      // The last call out of a closed channel releases the fd (later ones find it released).
      if (i_.state.fetch_sub(one_call) == (one_call | closed_bit)) i_.release_fd();
    }
    call(const call&) = delete;
    call& operator=(const call&) = delete;
    [[nodiscard]] bool ok() const noexcept { return ok_; }

   private:
    impl& i_;
    bool ok_;
  };

  // Closes the fd, and drops what try_send left queued (with its fd duplicates). Called once no
  // call is inside a closed channel, and none that touches either can enter again.
  void release_fd() noexcept {
    if (released.exchange(true)) return;
    fd_copy.store(-1);
    sock.close();
    const std::lock_guard lock(tx);
    queue.clear();
    queued.store(0);
  }

  [[nodiscard]] result<void> usable(const call& c) const {
    if (!c.ok()) return fail(errc::closed);
    if (broken.load()) return fail(errc::broken);
    return {};
  }

  // What the peer broke, for error_detail(); guarded by detail_mutex.
  mutable std::mutex detail_mutex;
  std::string detail;

  void set_detail(std::string text) {
    const std::lock_guard g(detail_mutex);
    detail = std::move(text);
  }

  std::unexpected<std::error_code> break_with(errc code, std::string why) {
    set_detail(std::move(why));
    broken.store(true);
    return std::unexpected(make_error_code(code));
  }

  // Waits for readiness according to w after a would-block.
  [[nodiscard]] result<void> wait(const wait_spec& w, short events) const {
    if (w.kind == wait_kind::try_once) return fail(errc::would_block);
    auto r = detail::wait_for(sock.native_handle(), events, w.until.remaining());
    if (!r) return std::unexpected(r.error());
    return {};
  }

  // Outgoing bytes try_send could not write yet (guarded by tx). `queued` counts unsent bytes.
  struct outgoing {
    std::vector<std::byte> bytes;  // the rest of one frame
    std::size_t sent = 0;
    std::vector<unique_fd> fds;  // duplicates, until the frame's first byte is sent
  };
  std::deque<outgoing> queue;
  std::atomic<std::size_t> queued{0};

  // Shared memory: this end's pool (pool_mutex), whether the peer has been told of it (tx), the
  // peer's pool (rx), and a resolved message a caller's buffer was too small for (rx).
  std::mutex pool_mutex;
  std::shared_ptr<detail::pool_tx> pool_out;
  bool pool_announced = false;
  std::shared_ptr<detail::pool_rx> pool_in;
  std::optional<message> stash;
  // Set (under rx) when the peer's pool announce was skipped for a local reason (its fd cut
  // short at RLIMIT_NOFILE, no memory or address space to map it): the error each message in
  // that pool is then skipped with, while every other message still flows.
  std::error_code pool_lost;
  // After a frame with these flags was skipped with error e: a pool announce takes its pool
  // with it (pool_lost). Returns e.
  std::unexpected<std::error_code> lose_pool(std::uint8_t flags, std::error_code e) {
    if (flags == wire::flag_pool && !pool_in && !pool_lost) pool_lost = e;
    return std::unexpected(e);
  }

  struct frame;
  result<frame> make_frame(std::span<const const_buffer> parts, std::span<const int> fds,
                           std::uint8_t flags = 0) const;
  // Under tx: one frame out, blocking, or else written as far as the kernel takes and queued.
  result<void> put(std::span<const const_buffer> parts, std::span<const int> fds,
                   std::uint8_t flags, bool blocking);
  // Under tx: a plain native stream frame of at most small_payload bytes without fds, laid out
  // on the stack and sent with one send(); whatever that send leaves goes the way of any frame.
  result<void> put_small(std::span<const const_buffer> parts, std::size_t payload, bool blocking);
  static constexpr std::size_t small_payload = 240;
  // Under tx: put's second half. The frame (total bytes, of which `sent` are already out; the
  // rest in iov) is written, or else written as far as the kernel takes and queued.
  result<void> put_framed(detail::iovec_array& iov, std::span<const int> fds, std::uint64_t total,
                          bool blocking, std::size_t sent = 0);
  // Under tx: a message, through shared memory if it is large and that is enabled.
  result<void> send_payload(std::span<const const_buffer> parts, std::span<const int> fds,
                            bool blocking);
  result<void> put_shared(const detail::pool_tx::block& b, std::span<const int> fds, bool blocking);
  result<void> put_memfd(unique_fd memfd, std::uint64_t length, std::span<const int> fds,
                         bool blocking);
  // Bytes of messages sent in memfds of their own that the peer may not have taken out of the
  // socket yet (guarded by tx; see memfd_room).
  std::uint64_t memfd_in_flight = 0;
  // Under tx, before a message of `length` bytes is put in a memfd of its own: success once
  // shared_memory.max_in_flight has room for it; else errc::queue_full (not blocking), or a wait
  // until it has (blocking). Errors: errc::closed.
  result<void> memfd_room(std::uint64_t length, bool blocking);
  // This end's pool, created on first use (nullptr if it cannot be).
  std::shared_ptr<detail::pool_tx> pool();
  // Writes iov (the rest of a frame of which `sent` bytes are already out), blocking or as far as
  // the kernel takes it; returns the frame's bytes out in all (sent included). A local error
  // with none of the frame out is returned (nothing changed); one after the frame's first byte
  // is not: the count is, with the rest left in iov and the error in write_stopped (which the
  // caller clears first).
  result<std::size_t> write(detail::iovec_array& iov, std::span<const int> fds, bool blocking,
                            std::size_t sent = 0);

  // Seqpacket frames of staging_from to staging_size bytes whose copy into the packet would
  // crawl (detail::packet_copy_would_crawl) go out from here (page-aligned; guarded by tx).
  static constexpr std::size_t staging_from = 2048;
  static constexpr std::size_t staging_size = std::size_t{64} << 10;
  struct free_deleter {
    void operator()(std::byte* p) const noexcept { std::free(p); }
  };
  std::unique_ptr<std::byte, free_deleter> staging;
  result<bool> flush_queue(bool blocking);
  result<void> enqueue(detail::iovec_array& iov, std::span<const int> fds, bool started);
  // Queues the rest of a frame whose first byte (with its fds) is out; if it cannot be, the
  // channel is broken (the peer would misread whatever followed).
  result<void> enqueue_rest(detail::iovec_array& iov);
  // The local error that stopped write() after a frame's first byte (guarded by tx).
  std::error_code write_stopped;
  result<void> send(std::span<const const_buffer> parts, std::span<const int> fds);
  result<void> try_send(std::span<const const_buffer> parts, std::span<const int> fds);
  result<void> send_frames(std::span<const std::byte> wire, std::uint64_t largest,
                           std::span<const detail::batch_fd_frame> fd_frames,
                           std::span<const int> fds);
  result<bool> flush();
  result<std::size_t> receive_batch(const wait_spec& w, void (*call)(void*, message_view&),
                                    void* fn, std::size_t max);
  result<message_info> receive(const wait_spec& w, destination dest);
  // receive() into a new message.
  result<message> receive_message(const wait_spec& w);
  // A frame with descriptor flags, turned into the message it stands for (nullopt for a pool
  // announce, which only sets up the peer's pool).
  result<std::optional<message>> resolve(std::uint8_t flags, const_buffer descriptor,
                                         std::vector<unique_fd> fds);
  // Hands a whole message to its destination; if a caller's buffer is too small, the message is
  // kept (stash) for the next call, so nothing is lost.
  result<message_info> deliver(message m, destination dest);
  result<message_info> receive_stream(const wait_spec& w, destination dest);
  result<message_info> receive_packet(const wait_spec& w, destination dest);
  result<void> read_more(const wait_spec& w, spinner& spin);
  // After a receive that failed with e (made with these recv flags): success to try again (a
  // would-block spun or waited out as w allows, or the one-time ECONNRESET), else the error.
  result<void> retry_after(std::error_code e, const wait_spec& w, spinner& spin, int flags) const;

  // Seqpacket receives (guarded by rx): where a packet's payload goes past the first buffer, and
  // whether the last packet received into a message was larger than the spill area keeps
  // resident (the next is then peeked at and read straight into a message of its size).
  detail::spill_area spill;
  bool last_packet_large = false;
};

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

result<channel::impl::frame> channel::impl::make_frame(std::span<const const_buffer> parts,
                                                       std::span<const int> fds,
                                                       std::uint8_t flags) const {
  if (fds.size() > max_fds_per_message) return fail(errc::too_many_fds);
  if (options.format == framing::python && !fds.empty()) return fail(errc::not_supported);
  if (parts.size() + 1 > IOV_MAX) return fail_errno(EMSGSIZE);
  std::uint64_t payload = 0;
  for (const auto& p : parts)
    payload += p.size();
  if (payload > options.max_message_size) return fail(errc::message_too_large);
  static_assert(wire::native_header_size >= wire::python_max_header_size);
  frame f;
  if (options.format == framing::native) {
    f.head_storage = wire::encode_native({payload, static_cast<std::uint16_t>(fds.size()), flags});
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

result<void> channel::impl::put(std::span<const const_buffer> parts, std::span<const int> fds,
                                std::uint8_t flags, bool blocking) {
  auto f = make_frame(parts, fds, flags);
  if (!f) return std::unexpected(f.error());
  std::optional<detail::iovec_array> framed(std::in_place, parts, f->head());
  if (sock.kind() == socket_kind::seqpacket && f->total >= staging_from &&
      f->total <= staging_size && detail::packet_copy_would_crawl(framed->data(), framed->size())) {
    // Copied once here, at a distance the copy runs at full speed, so that the kernel's copy
    // into the packet does too: from a page-aligned buffer into a page-aligned packet.
    if (!staging) staging.reset(static_cast<std::byte*>(std::aligned_alloc(4096, staging_size)));
    if (staging) {
      detail::gather_in_steps(framed->data(), framed->size(), staging.get());
      const std::array<const_buffer, 1> whole{const_buffer(staging.get(), f->total)};
      framed.emplace(std::span<const const_buffer>(whole));
    }
  }
  return put_framed(*framed, fds, f->total, blocking);
}

result<void> channel::impl::put_small(std::span<const const_buffer> parts, std::size_t payload,
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

std::shared_ptr<detail::pool_tx> channel::impl::pool() {
  const std::lock_guard lock(pool_mutex);
  if (!pool_out) {
    auto p = detail::pool_tx::create(options.shared_memory.pool_size, options.shared_memory.slots);
    if (p) pool_out = std::move(*p);
  }
  return pool_out;
}

result<void> channel::impl::put_shared(const detail::pool_tx::block& b, std::span<const int> fds,
                                       bool blocking) {
  // The pool goes first, once: a small frame with the pool's memfd.
  if (!pool_announced) {
    const auto announce = wire::encode(pool_out->announce());
    const std::array<const_buffer, 1> parts{const_buffer(announce)};
    const std::array<int, 1> pool_fd{pool_out->fd()};
    if (auto r = put(parts, pool_fd, wire::flag_pool, blocking); !r) return r;
    pool_announced = true;
  }
  const auto ref = wire::encode(wire::shared_ref{b.slot, b.offset, b.length});
  const std::array<const_buffer, 1> parts{const_buffer(ref)};
  return put(parts, fds, wire::flag_shared, blocking);
}

result<void> channel::impl::memfd_room(std::uint64_t length, bool blocking) {
  const auto fits = [&] {
    return memfd_in_flight == 0 || memfd_in_flight + length <= options.shared_memory.max_in_flight;
  };
  if (fits()) return {};
  // The peer has taken every memfd this end sent once it has read everything this end wrote:
  // nothing left in the queue, and nothing in the socket (SIOCOUTQ: this end's bytes the peer
  // has not read). What it holds after that is its own memory, as any message it keeps. The
  // kernel tells no one when that moment comes, so a blocking send looks again after a pause
  // that doubles up to max_pause, or at once if the peer hangs up.
  constexpr auto max_pause = std::chrono::milliseconds(10);
  std::chrono::nanoseconds pause = std::chrono::microseconds(50);
  for (;;) {
    int unread = -1;
    if (queue.empty() && ::ioctl(sock.native_handle(), SIOCOUTQ, &unread) == 0 && unread == 0) {
      memfd_in_flight = 0;
      return {};
    }
    if (!blocking) return fail(errc::queue_full);
    if (is_closed()) return fail(errc::closed);
    auto woke = detail::wait_for(sock.native_handle(), 0, pause);
    // A hangup or error: the send that follows meets it and says what it is.
    if (woke) return {};
    if (woke.error() != errc::timed_out) return std::unexpected(woke.error());
    pause = std::min<std::chrono::nanoseconds>(pause * 2, max_pause);
  }
}

result<void> channel::impl::put_memfd(unique_fd memfd, std::uint64_t length,
                                      std::span<const int> fds, bool blocking) {
  // The memfd and the caller's fds, on the stack: callers pass fewer than max_fds_per_message.
  if (fds.size() >= max_fds_per_message) return fail(errc::too_many_fds);
  std::array<int, max_fds_per_message> all;  // NOLINT: only the first fds.size() + 1 are read
  all[0] = memfd.get();
  std::copy(fds.begin(), fds.end(), all.begin() + 1);
  const auto ref = wire::encode(wire::memfd_ref{length});
  const std::array<const_buffer, 1> parts{const_buffer(ref)};
  // Our copy of the memfd closes on return.
  auto r = put(parts, std::span<const int>(all.data(), fds.size() + 1), wire::flag_memfd, blocking);
  if (r) memfd_in_flight += length;
  return r;
}

result<void> channel::impl::send_payload(std::span<const const_buffer> parts,
                                         std::span<const int> fds, bool blocking) {
  std::uint64_t payload = 0;
  for (const auto& p : parts)
    payload += p.size();
  if (payload > options.max_message_size) return fail(errc::message_too_large);
  const auto& shm = options.shared_memory;
  const bool can_share = shm.enabled && options.format == framing::native;
  if (payload <= small_payload && fds.empty() && options.format == framing::native &&
      sock.kind() == socket_kind::stream && (!can_share || payload < shm.threshold)) {
    return put_small(parts, static_cast<std::size_t>(payload), blocking);
  }
  if (!can_share || payload < shm.threshold) {
    auto r = put(parts, fds, 0, blocking);
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
  return put(parts, fds, 0, blocking);  // no shared memory to be had: inline, as usual
}

result<void> channel::impl::send(std::span<const const_buffer> parts, std::span<const int> fds) {
  const call c(*this);
  if (auto u = usable(c); !u) return u;
  if (fds.size() > max_fds_per_message) return fail(errc::too_many_fds);
  const std::lock_guard lock(tx);
  if (auto u = usable(c); !u) return u;
  // What try_send queued goes first: messages leave in the order they were given.
  if (auto flushed = flush_queue(true); !flushed) return std::unexpected(flushed.error());
  return send_payload(parts, fds, true);
}

result<void> channel::impl::try_send(std::span<const const_buffer> parts,
                                     std::span<const int> fds) {
  const call c(*this);
  if (auto u = usable(c); !u) return u;
  if (fds.size() > max_fds_per_message) return fail(errc::too_many_fds);
  if (options.format == framing::python && !fds.empty()) return fail(errc::not_supported);
  const std::unique_lock lock(tx, std::try_to_lock);
  if (!lock.owns_lock()) return fail(errc::would_block);  // another thread is sending
  if (auto u = usable(c); !u) return u;
  if (!queue.empty()) {
    if (auto flushed = flush_queue(false); !flushed) return std::unexpected(flushed.error());
  }
  return send_payload(parts, fds, false);
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
                            static_cast<std::size_t>(detail::load_le64(wire.data() + at + 8));
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

result<std::optional<message>> channel::impl::resolve(std::uint8_t flags, const_buffer descriptor,
                                                      std::vector<unique_fd> fds) {
  const auto& shm = options.shared_memory;
  if (!shm.accept) return break_with(errc::protocol_error, "shared memory is not accepted here");
  switch (flags) {
    case wire::flag_pool: {
      if (pool_in || pool_lost) {
        return break_with(errc::protocol_error, "a second pool was announced");
      }
      auto a = wire::decode_pool_announce(descriptor);
      if (!a) return break_with(errc::protocol_error, "a malformed pool announce");
      std::string why;
      auto mapped = detail::pool_rx::map(std::move(fds.front()), *a, shm.max_peer_pool, why);
      if (!mapped) {
        if (mapped.error() == errc::protocol_error) return break_with(errc::protocol_error, why);
        return lose_pool(flags, mapped.error());  // no room to map it here: a local limit
      }
      pool_in = std::move(*mapped);
      return std::optional<message>{};
    }
    case wire::flag_shared: {
      auto r = wire::decode_shared_ref(descriptor);
      if (!r) return break_with(errc::protocol_error, "a malformed shared-memory reference");
      if (!pool_in) {
        // The pool was announced but could not be had here: each of its messages is skipped with
        // the local error that lost it, and the channel goes on.
        if (pool_lost) return std::unexpected(pool_lost);
        return break_with(errc::protocol_error, "a shared-memory message came before its pool");
      }
      const auto bytes = pool_in->locate(*r);
      if (!bytes) {
        return break_with(errc::protocol_error,
                          "a shared-memory reference is out of the pool's bounds");
      }
      if (r->length > options.max_message_size) {
        pool_in->release(r->slot);  // refused, and the sender gets its memory back
        return fail(errc::message_too_large);
      }
      if (shm.receive == shared_receive::view) {
        // Released when the last copy of the message's keeper goes.
        std::shared_ptr<const void> keeper(
            pool_in.get(), [pool = pool_in, slot = r->slot](const void*) { pool->release(slot); });
        return std::optional<message>{
            message::view(bytes->data(), bytes->size(), std::move(keeper), std::move(fds))};
      }
      message m;
      try {
        m = message::with_size(bytes->size());
      } catch (const std::bad_alloc&) {
        pool_in->release(r->slot);
        return fail_errno(ENOMEM);
      }
      if (!bytes->empty()) std::memcpy(m.bytes().data(), bytes->data(), bytes->size());
      pool_in->release(r->slot);
      m.fds() = std::move(fds);
      return std::optional<message>{std::move(m)};
    }
    case wire::flag_memfd: {
      auto r = wire::decode_memfd_ref(descriptor);
      if (!r) return break_with(errc::protocol_error, "a malformed memfd reference");
      if (r->length > options.max_message_size) return fail(errc::message_too_large);
      std::string why;
      auto mapped = detail::map_sealed(fds.front().get(), r->length, why);
      if (!mapped) {
        if (mapped.error() == errc::protocol_error) return break_with(errc::protocol_error, why);
        return std::unexpected(mapped.error());  // a local limit: this message is skipped
      }
      fds.erase(fds.begin());  // the mapping outlives the memfd's fd
      const std::byte* data = (*mapped)->data();
      // Sealed against writing: safe to show in place, whoever sent it.
      return std::optional<message>{message::view(data, static_cast<std::size_t>(r->length),
                                                  std::move(*mapped), std::move(fds))};
    }
    default: return break_with(errc::protocol_error, "unknown frame flags");
  }
}

result<void> channel::impl::read_more(const wait_spec& w, spinner& spin) {
  const int fd = sock.native_handle();
  for (;;) {
    const int flags = w.kind == wait_kind::block && !spin.active() ? 0 : MSG_DONTWAIT;
    mutable_buffer target;
    try {
      target = decoder.read_target();  // the receive buffer is allocated on the first read
      decoder.reserve_for_commit();    // so the fds of this read can be kept without allocating
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
          // Not after reserve_for_commit() above. Were it to happen, the read's bytes and fds
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
      case detail::stream_decoder::event::failed:
        if (decoder.fatal()) {
          set_detail(decoder.detail());
          broken.store(true);
          return std::unexpected(decoder.error());
        }
        // A frame skipped whole (pending_flags() are still its own): a pool announce among them
        // takes its pool with it.
        return lose_pool(decoder.pending_flags(), decoder.error());
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
    // A packet that breaks the protocol breaks the channel; its fds are closed.
    const auto broken_by = [this](std::string why) {
      arrived.clear();
      return break_with(errc::protocol_error, std::move(why));
    };
    if (size < head.size()) {
      return broken_by("a packet of " + std::to_string(size) +
                       " bytes is shorter than a frame header");
    }
    const std::span<const std::byte, wire::native_header_size> head_bytes(head);
    auto h = wire::decode_native(head_bytes);
    if (!h) return broken_by(wire::explain_native(head_bytes));
    if (h->length != size - head.size()) {
      return broken_by("a header says " + std::to_string(h->length) +
                       " bytes and its packet holds " + std::to_string(size - head.size()));
    }
    if (auto why = detail::check_descriptor_frame(h->flags, h->length, h->fd_count); !why.empty()) {
      return broken_by(std::move(why));
    }
    if (h->length > options.max_message_size) {
      arrived.clear();  // a packet is skipped whole: the channel carries on
      return fail(errc::message_too_large);
    }
    if (r->trunc) {
      // Only a sender with CAP_NET_ADMIN (SO_SNDBUFFORCE) makes a packet this large.
      arrived.clear();
      set_detail("a packet of " + std::to_string(size) + " bytes is larger than " +
                 std::to_string(head.size() + first.size() + spill.bytes().size()) +
                 ", the most this end reads (twice net.core.wmem_max)");
      return fail(errc::message_too_large);
    }
    if (r->ctrunc) {
      arrived.clear();
      return lose_pool(h->flags, make_error_code(errc::fds_truncated));
    }
    if (arrived.count != h->fd_count) {
      return broken_by("a frame announced " + std::to_string(h->fd_count) + " fds and " +
                       std::to_string(arrived.count) + " arrived");
    }
    // The memfd of a pool or memfd frame is duplex's, not the caller's.
    const std::size_t own_fds = h->flags == wire::flag_pool || h->flags == wire::flag_memfd ? 1 : 0;
    if (h->fd_count - own_fds > options.max_fds) {
      arrived.clear();
      return fail(errc::too_many_fds);
    }
    const auto length = static_cast<std::size_t>(h->length);
    const std::size_t in_first = std::min(length, first.size());
    const std::size_t spilled = length - in_first;
    auto got = arrived.taken();
    const message_info info{length, got.size()};
    // Straight into the caller's buffer and fds: no copy.
    if (h->flags == 0 && dest.owned == nullptr && spilled == 0 && got.size() <= dest.fds.size()) {
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
        return lose_pool(h->flags, std::error_code(ENOMEM, std::system_category()));
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
    if (h->flags != 0) {
      auto resolved = resolve(h->flags, std::as_const(m).bytes(), m.take_fds());
      if (!resolved) return std::unexpected(resolved.error());
      if (!*resolved) continue;  // a pool announce: nothing to deliver
      return deliver(std::move(**resolved), dest);
    }
    // Owned; or a caller's buffer or fd array too small for it: kept whole for the next call.
    return deliver(std::move(m), dest);
  }
}

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
      case detail::stream_decoder::event::header_ready:
        if (decoder.payload_buffered() && decoder.pending_flags() == 0) {
          // In place: the bytes stay in the receive buffer, nothing is allocated.
          message_view view{decoder.buffered_payload(), decoder.pending_fd_span()};
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
      case detail::stream_decoder::event::failed:
        if (decoder.fatal()) {
          set_detail(decoder.detail());
          broken.store(true);
        } else {
          static_cast<void>(lose_pool(decoder.pending_flags(), decoder.error()));
        }
        // close() from another thread shuts the socket down to wake this call: it reads as the
        // end of the stream, but what the caller must hear is closed.
        if (is_closed()) return fail(errc::closed);
        return std::unexpected(decoder.error());
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

channel::channel() noexcept = default;
channel::channel(channel&&) noexcept = default;
channel& channel::operator=(channel&&) noexcept = default;
channel::~channel() = default;

static_assert(max_shared_pool_slots == detail::max_pool_slots);

result<void> detail::check_channel(socket_kind kind, const channel_options& o) {
  if (kind == socket_kind::datagram) return fail(errc::wrong_kind);
  if (o.format != framing::native && o.format != framing::python) return fail_errno(EINVAL);
  if (o.format == framing::python && kind != socket_kind::stream) return fail(errc::wrong_kind);
  if (o.max_message_size == 0 || o.max_fds > max_fds_per_message) return fail_errno(EINVAL);
  if (o.receive_buffer_size > max_receive_buffer_size) return fail_errno(EINVAL);
  if (o.busy_poll < std::chrono::nanoseconds::zero() || o.busy_poll > max_busy_poll) {
    return fail_errno(EINVAL);
  }
  const auto& shm = o.shared_memory;
  if (shm.receive != shared_receive::copy && shm.receive != shared_receive::view) {
    return fail_errno(EINVAL);
  }
  if (shm.pool_size == 0 || shm.pool_size > max_shared_pool_size) return fail_errno(EINVAL);
  if (shm.slots == 0 || shm.slots > max_shared_pool_slots) return fail_errno(EINVAL);
  return {};
}

result<channel> channel::create(socket s, channel_options options) {
  if (auto ok = detail::check_channel(s.kind(), options); !ok) return std::unexpected(ok.error());
  channel c;
  try {
    c.impl_ = std::make_unique<impl>(std::move(s), options);
  } catch (const std::bad_alloc&) {
    return fail_errno(ENOMEM);  // s is closed on the way out
  }
  return c;
}

socket_kind channel::kind() const noexcept {
  return impl_ ? impl_->sock.kind() : socket_kind::stream;
}

const channel_options& channel::options() const noexcept {
  static const channel_options defaults;
  return impl_ ? impl_->options : defaults;
}

int channel::native_handle() const noexcept { return impl_ ? impl_->fd_copy.load() : -1; }

bool channel::is_broken() const noexcept { return impl_ && impl_->broken.load(); }

std::string channel::error_detail() const {
  if (!impl_) return {};
  const std::lock_guard g(impl_->detail_mutex);
  return impl_->detail;
}

result<void> channel::send(std::span<const const_buffer> parts, std::span<const int> fds) {
  if (!impl_) return fail(errc::closed);
  return impl_->send(parts, fds);
}

result<void> channel::send(const_buffer bytes) { return send(std::span(&bytes, 1), {}); }

result<void> channel::send(const_buffer bytes, std::span<const int> fds) {
  return send(std::span(&bytes, 1), fds);
}

result<void> channel::send(std::span<const const_buffer> parts) { return send(parts, {}); }

namespace {

// Calls send(parts, fds) with a message's bytes and its fds as raw numbers, on the stack, with no
// allocation. A message with more fds than one may carry passes only its first
// max_fds_per_message + 1: the send refuses that count (errc::too_many_fds) as it would the whole,
// after the checks that come before that one.
template <typename Send>
result<void> with_raw_fds(const message& m, Send send) {
  const const_buffer bytes = m.bytes();
  const auto parts = std::span(&bytes, 1);
  const auto& owned = m.fds();
  const std::size_t n = std::min(owned.size(), max_fds_per_message + 1);
  std::array<int, max_fds_per_message + 1> raw;  // NOLINT: only the first n are read
  for (std::size_t i = 0; i < n; ++i)
    raw[i] = owned[i].get();
  return send(parts, std::span<const int>(raw.data(), n));
}

}  // namespace

result<void> channel::send(const message& m) {
  return with_raw_fds(m, [this](std::span<const const_buffer> parts, std::span<const int> fds) {
    return send(parts, fds);
  });
}

result<void> channel::try_send(std::span<const const_buffer> parts, std::span<const int> fds) {
  if (!impl_) return fail(errc::closed);
  return impl_->try_send(parts, fds);
}

result<void> channel::try_send(const_buffer bytes, std::span<const int> fds) {
  return try_send(std::span(&bytes, 1), fds);
}

result<void> channel::try_send(const message& m) {
  return with_raw_fds(m, [this](std::span<const const_buffer> parts, std::span<const int> fds) {
    return try_send(parts, fds);
  });
}

struct shared_buffer::state {
  const void* owner = nullptr;  // the channel it came from (checked at send)
  std::shared_ptr<detail::pool_tx> pool;
  detail::pool_tx::block block{};
  std::unique_ptr<detail::standalone_buffer> standalone;
  bool sent = false;

  ~state() {
    if (pool && !sent) pool->discard(block);  // never sent: the pool takes it back
  }
};

shared_buffer::shared_buffer() noexcept = default;
shared_buffer::shared_buffer(shared_buffer&&) noexcept = default;
shared_buffer& shared_buffer::operator=(shared_buffer&&) noexcept = default;
shared_buffer::~shared_buffer() = default;

std::span<std::byte> shared_buffer::bytes() noexcept {
  if (!state_) return {};
  if (state_->standalone) return state_->standalone->bytes();
  return {state_->block.data, static_cast<std::size_t>(state_->block.length)};
}

std::size_t shared_buffer::size() const noexcept {
  if (!state_) return 0;
  if (state_->standalone) return state_->standalone->bytes().size();
  return static_cast<std::size_t>(state_->block.length);
}

bool shared_buffer::in_pool() const noexcept { return state_ && state_->pool != nullptr; }

result<shared_buffer> channel::allocate(std::size_t size) {
  if (!impl_) return fail(errc::closed);
  const impl::call c(*impl_);
  if (auto u = impl_->usable(c); !u) return std::unexpected(u.error());
  if (impl_->options.format != framing::native) return fail(errc::not_supported);
  if (size > impl_->options.max_message_size) return fail(errc::message_too_large);
  std::unique_ptr<shared_buffer::state> st(new (std::nothrow) shared_buffer::state);
  if (!st) return fail_errno(ENOMEM);
  st->owner = impl_.get();
  if (auto p = impl_->pool()) {
    if (auto b = p->allocate(size)) {
      st->pool = std::move(p);
      st->block = *b;
    }
  }
  if (!st->pool) {
    auto standalone = detail::standalone_buffer::create(size);
    if (!standalone) return std::unexpected(standalone.error());
    st->standalone = std::move(*standalone);
  }
  shared_buffer b;
  b.state_ = std::move(st);
  return b;
}

result<void> channel::send(shared_buffer&& buffer, std::span<const int> fds) {
  if (!impl_) return fail(errc::closed);
  const shared_buffer consumed = std::move(buffer);  // whatever happens, the caller's is spent
  auto* st = consumed.state_.get();
  if (st == nullptr || st->owner != impl_.get()) return fail_errno(EINVAL);
  const impl::call c(*impl_);
  if (auto u = impl_->usable(c); !u) return u;
  if (fds.size() > max_fds_per_message) return fail(errc::too_many_fds);
  const std::lock_guard lock(impl_->tx);
  if (auto flushed = impl_->flush_queue(true); !flushed) return std::unexpected(flushed.error());
  if (st->pool) {
    auto r = impl_->put_shared(st->block, fds, true);
    st->sent = r.has_value();
    return r;
  }
  if (fds.size() >= max_fds_per_message) return fail(errc::too_many_fds);  // one is the memfd's
  const std::size_t length = st->standalone->bytes().size();
  if (auto room = impl_->memfd_room(length, true); !room) return room;
  auto memfd = st->standalone->seal();
  if (!memfd) return std::unexpected(memfd.error());
  return impl_->put_memfd(std::move(*memfd), length, fds, true);
}

result<void> channel::send(const batch& b) {
  if (!impl_) return fail(errc::closed);
  if (b.format() != impl_->options.format) return fail_errno(EINVAL);
  return impl_->send_frames(std::span(b.wire_.data(), b.wire_.size()), b.largest_, b.fd_frames_,
                            b.fds_);
}

result<std::size_t> channel::receive_batch_impl(void (*call_fn)(void*, message_view&), void* fn,
                                                std::size_t max, std::chrono::nanoseconds timeout,
                                                bool try_only) {
  if (!impl_) return fail(errc::closed);
  if (max == 0) return std::size_t{0};
  return impl_->receive_batch(try_only ? wait_spec::now() : wait_spec::from(timeout), call_fn, fn,
                              max);
}

result<bool> channel::flush() {
  if (!impl_) return fail(errc::closed);
  return impl_->flush();
}

std::size_t channel::buffered_bytes() const noexcept {
  if (!impl_ || !impl_->rx.acquire(wait_spec::now())) return 0;
  std::size_t n = impl_->decoder.buffered();
  if (impl_->stash) n += impl_->stash->size() + 1;  // a whole message waits, even an empty one
  impl_->rx.release();
  return n;
}

bool channel::wants_write() const noexcept { return impl_ && impl_->queued.load() > 0; }

bool channel::drained() const noexcept {
  if (!impl_ || !impl_->drained.load(std::memory_order_relaxed)) return false;
  if (impl_->mark_asked.load(std::memory_order_relaxed)) return true;
  // A stream read also stops short at an urgent byte (MSG_OOB) with more behind it: at the mark,
  // the socket is not empty. Asked here, once per receive call, so only drained()'s callers pay.
  const impl::call c(*impl_);
  int at_mark = 0;
  if (!c.ok() ||
      (::ioctl(impl_->sock.native_handle(), SIOCATMARK, &at_mark) == 0 && at_mark != 0)) {
    impl_->drained.store(false, std::memory_order_relaxed);
    return false;
  }
  impl_->mark_asked.store(true, std::memory_order_relaxed);
  return true;
}

std::size_t channel::queued_bytes() const noexcept { return impl_ ? impl_->queued.load() : 0; }

result<message> channel::receive() { return receive(forever); }

result<message> channel::impl::receive_message(const wait_spec& w) {
  // Received straight into the result, the one object returned: no move of the message on the
  // way out.
  result<message> out(std::in_place);
  if (auto r = receive(w, destination{&*out, {}, {}}); !r) out = std::unexpected(r.error());
  return out;
}

result<message> channel::receive(std::chrono::nanoseconds timeout) {
  if (!impl_) return fail(errc::closed);
  return impl_->receive_message(wait_spec::from(timeout));
}

result<message> channel::try_receive() {
  if (!impl_) return fail(errc::closed);
  return impl_->receive_message(wait_spec::now());
}

result<message_info> channel::receive_into(mutable_buffer buf, std::span<unique_fd> fds) {
  return receive_into(buf, fds, forever);
}

result<message_info> channel::receive_into(mutable_buffer buf, std::span<unique_fd> fds,
                                           std::chrono::nanoseconds timeout) {
  if (!impl_) return fail(errc::closed);
  return impl_->receive(wait_spec::from(timeout), destination{nullptr, buf, fds});
}

result<void> channel::wait_readable(std::chrono::nanoseconds timeout) const {
  if (!impl_) return fail(errc::closed);
  const impl::call c(*impl_);
  if (auto u = impl_->usable(c); !u) return u;
  // Inside this channel's receive_batch callback no receive can make progress until it returns.
  if (impl_->inside_callback()) return fail(errc::reentrant_call);
  // Buffered bytes (read by an earlier call) count: the socket alone would not show them.
  if (impl_->rx.acquire(wait_spec::now())) {
    const bool buffered = impl_->decoder.buffered() > 0;
    impl_->rx.release();
    if (buffered) return {};
  }
  auto r = detail::wait_for(impl_->sock.native_handle(), POLLIN, timeout);
  // A close() from another thread ends the wait with a shutdown, which polls as readable.
  if (impl_->is_closed()) return fail(errc::closed);
  if (!r) return std::unexpected(r.error());
  return {};
}

result<void> channel::shutdown_send() {
  if (!impl_) return fail(errc::closed);
  const impl::call c(*impl_);
  if (!c.ok()) return fail(errc::closed);
  const std::lock_guard lock(impl_->tx);  // never in the middle of someone's frame
  // Whatever try_send queued goes out before the end-of-stream.
  if (auto flushed = impl_->flush_queue(true); !flushed) return std::unexpected(flushed.error());
  return impl_->sock.shutdown(shutdown_how::write);
}

void channel::close() noexcept {
  if (!impl_) return;
  // close() counts as a call itself, so the fd stays valid while it looks at it; whichever call
  // leaves last releases the fd.
  const impl::call c(*impl_);
  if (!c.ok()) return;  // closed already
  const std::uint64_t before = impl_->state.fetch_or(impl::closed_bit);
  if ((before & impl::closed_bit) != 0) return;  // another thread's close() came first
  if (before > impl::one_call) {
    // Other threads are inside and may be blocked in the kernel: only a shutdown wakes them.
    static_cast<void>(impl_->sock.shutdown(shutdown_how::both));
  }
}

result<credentials> channel::peer_credentials() const {
  if (!impl_) return fail(errc::closed);
  const impl::call c(*impl_);
  if (!c.ok()) return fail(errc::closed);
  return impl_->sock.peer_credentials();
}

result<unique_fd> channel::peer_pidfd() const {
  if (!impl_) return fail(errc::closed);
  const impl::call c(*impl_);
  if (!c.ok()) return fail(errc::closed);
  return impl_->sock.peer_pidfd();
}

result<connected_channels> channel_pair(socket_kind kind, channel_options options) {
  auto pair = socket_pair(kind);
  if (!pair) return std::unexpected(pair.error());
  auto first = channel::create(std::move(pair->first), options);
  if (!first) return std::unexpected(first.error());
  auto second = channel::create(std::move(pair->second), options);
  if (!second) return std::unexpected(second.error());
  return connected_channels{std::move(*first), std::move(*second)};
}

}  // namespace duplex
