// Internal: channel::impl, the state behind a channel, with its fields grouped by the side that
// owns them (lifetime, send, receive, shared memory) and the members that work on them, declared
// here and defined by concern: send.cpp (checks, framing, the outgoing queue), shared.cpp (shared
// memory out, and the descriptors that come in), receive.cpp (the stream and seqpacket receive
// loops), receive_batch.cpp, lifetime.cpp (close and the socket's own questions). The fields'
// comments say which lock guards each. Not installed.
#pragma once

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "channel/lock.hpp"
#include "duplex/channel.hpp"
#include "framing/stream_decoder.hpp"
#include "shm/shm.hpp"
#include "socket/io.hpp"

namespace duplex {

struct channel::impl {
  using wait_kind = detail::wait_kind;
  using wait_spec = detail::wait_spec;
  using spinner = detail::receive_spinner;

  // Where a received message goes: a new message, or a caller's buffer and fd array.
  struct destination {
    message* owned = nullptr;
    mutable_buffer buf;
    std::span<unique_fd> fds;
  };

  impl(socket s, channel_options o)
      : sock(std::move(s)),
        options(o),
        decoder(o.format, o.max_message_size, o.max_fds, o.receive_buffer_size) {}

  socket sock;
  channel_options options;

  // --- lifetime: open, closed, broken (any thread) ---------------------------------------------

  // Bit 0: closed. Above it, the calls inside the channel right now (one_call each). One word, so
  // that "closed, and no call inside" is made true by exactly one atomic step, which releases the
  // fd: no call that found the channel open can ever act on a closed (and perhaps reused) fd
  // number. (With a flag and a count apart, a call could enter between the last call's leaving
  // and its look at the flag, and have the fd closed under it.)
  static constexpr std::uint64_t closed_bit = 1;
  static constexpr std::uint64_t one_call = 2;
  std::atomic<std::uint64_t> state{0};
  std::atomic<bool> released{false};
  std::atomic<int> fd_copy{sock.native_handle()};  // for native_handle(); -1 once released
  std::atomic<bool> broken{false};
  // What the peer broke, for error_detail(); guarded by detail_mutex.
  mutable std::mutex detail_mutex;
  std::string detail;

  [[nodiscard]] bool is_closed() const noexcept { return (state.load() & closed_bit) != 0; }

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

  void set_detail(std::string text) {
    const std::lock_guard g(detail_mutex);
    detail = std::move(text);
  }

  std::unexpected<std::error_code> break_with(errc code, std::string why) {
    set_detail(std::move(why));
    broken.store(true);
    return std::unexpected(make_error_code(code));
  }

  // lifetime.cpp: close() and the socket's own questions.
  void close() noexcept;
  [[nodiscard]] std::string error_detail() const;
  result<credentials> peer_credentials();
  result<unique_fd> peer_pidfd();

  // --- send side (guarded by tx) ---------------------------------------------------------------

  detail::call_lock tx;
  // Outgoing bytes try_send could not write yet. `queued` counts unsent bytes (read by any thread).
  struct outgoing {
    std::vector<std::byte> bytes;  // the rest of one frame
    std::size_t sent = 0;
    std::vector<unique_fd> fds;  // duplicates, until the frame's first byte is sent
  };
  std::deque<outgoing> queue;
  std::atomic<std::size_t> queued{0};
  // The local error that stopped write() after a frame's first byte.
  std::error_code write_stopped;
  // Seqpacket frames of staging_from to staging_size bytes whose copy into the packet would
  // crawl (detail::packet_copy_would_crawl) go out from here (page-aligned).
  static constexpr std::size_t staging_from = 2048;
  static constexpr std::size_t staging_size = std::size_t{64} << 10;
  struct free_deleter {
    void operator()(std::byte* p) const noexcept { std::free(p); }
  };
  std::unique_ptr<std::byte, free_deleter> staging;

  // send.cpp: the public sends, framing, writing and the outgoing queue.
  result<void> send(std::span<const const_buffer> parts, std::span<const int> fds);
  result<void> try_send(std::span<const const_buffer> parts, std::span<const int> fds);
  // A batch's frames (errors: EINVAL for a batch of the other framing, and send_frames's).
  result<void> send(const batch& b);
  result<void> send_frames(std::span<const std::byte> wire, std::uint64_t largest,
                           std::span<const detail::batch_fd_frame> fd_frames,
                           std::span<const int> fds);
  result<bool> flush();
  // Flushes the queue, then ends this end's sending side (shutdown(SHUT_WR)).
  result<void> shutdown_send();
  // The public sends' checks of a message, made once, before anything else (every later step
  // trusts them); returns its payload size. Errors: errc::too_many_fds (over 253 fds),
  // errc::not_supported (fds with framing::python), errc::message_too_large (over
  // max_message_size).
  result<std::uint64_t> check_message(std::span<const const_buffer> parts,
                                      std::span<const int> fds) const {
    if (fds.size() > max_fds_per_message) return fail(errc::too_many_fds);
    if (options.format == framing::python && !fds.empty()) return fail(errc::not_supported);
    std::uint64_t payload = 0;
    for (const auto& p : parts)
      payload += p.size();
    if (payload > options.max_message_size) return fail(errc::message_too_large);
    return payload;
  }
  struct frame;
  // The header of a frame of this payload size, fd count and flags, in this channel's framing.
  frame make_frame(std::uint64_t payload, std::size_t fd_count, std::uint8_t flags) const noexcept;
  // A checked message (payload bytes in parts), through shared memory if it is large and that is
  // enabled.
  result<void> send_payload(std::span<const const_buffer> parts, std::uint64_t payload,
                            std::span<const int> fds, bool blocking);
  // One frame out (a checked message, or a descriptor frame with these flags), blocking, or else
  // written as far as the kernel takes and queued. Errors: EMSGSIZE for more parts than one
  // sendmsg takes (IOV_MAX, the header included), and those of the write.
  result<void> put(std::span<const const_buffer> parts, std::uint64_t payload,
                   std::span<const int> fds, std::uint8_t flags, bool blocking);
  // A plain native stream frame of at most small_payload bytes without fds, laid out on the
  // stack and sent with one send(), past the general path's bookkeeping (the most common frame:
  // that path costs it about a tenth more user-space instructions per message); whatever that
  // send leaves goes the way of any frame (put_framed).
  result<void> put_small(std::span<const const_buffer> parts, std::uint64_t payload, bool blocking);
  static constexpr std::size_t small_payload = 240;
  // put's second half. The frame (total bytes, of which `sent` are already out; the rest in iov)
  // is written, or else written as far as the kernel takes and queued.
  result<void> put_framed(detail::iovec_array& iov, std::span<const int> fds, std::uint64_t total,
                          bool blocking, std::size_t sent = 0);
  // Writes iov (the rest of a frame of which `sent` bytes are already out), blocking or as far as
  // the kernel takes it; returns the frame's bytes out in all (sent included). A local error
  // with none of the frame out is returned (nothing changed); one after the frame's first byte
  // is not: the count is, with the rest left in iov and the error in write_stopped (which the
  // caller clears first).
  result<std::size_t> write(detail::iovec_array& iov, std::span<const int> fds, bool blocking,
                            std::size_t sent = 0);
  result<bool> flush_queue(bool blocking);
  result<void> enqueue(detail::iovec_array& iov, std::span<const int> fds, bool started);
  // Queues the rest of a frame whose first byte (with its fds) is out; if it cannot be, the
  // channel is broken (the peer would misread whatever followed).
  result<void> enqueue_rest(detail::iovec_array& iov);

  // --- receive side (guarded by rx) ------------------------------------------------------------

  detail::call_lock rx;
  // The thread running a receive_batch callback of this channel right now (under rx), or none.
  // Only that thread ever finds its own id here, so a relaxed load tells it whether it is inside
  // the callback.
  std::atomic<std::thread::id> delivering{};
  detail::stream_decoder decoder;  // stream channels
  detail::fd_batch arrived;        // the fds of the last read
  // Whether the current receive call's last read came back short and clean, and what drained()
  // reports (any thread): that, with nothing left buffered when the call ended.
  bool read_emptied = false;
  std::atomic<bool> drained{false};
  // Whether drained() has already asked the socket about an urgent mark since that call.
  std::atomic<bool> mark_asked{false};
  // Seqpacket receives: where a packet's payload goes past the first buffer, and whether the
  // last packet received into a message was larger than the spill area keeps resident (the next
  // is then peeked at and read straight into a message of its size).
  detail::spill_area spill;
  bool last_packet_large = false;
  // A resolved message a caller's buffer was too small for, kept whole for the next call.
  std::optional<message> stash;

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
  // Ends a receive call (under rx): publishes drained.
  void end_receive() noexcept {
    mark_asked.store(false, std::memory_order_relaxed);
    drained.store(read_emptied && decoder.starved(), std::memory_order_relaxed);
    read_emptied = false;
  }

  // receive.cpp: the public receives and the stream and seqpacket receive loops.
  result<message_info> receive(const wait_spec& w, destination dest);
  // receive() into a new message, received straight into the result, the one object returned:
  // no move of the message on the way out. Inline, so the public receives build it in place.
  result<message> receive_message(const wait_spec& w) {
    result<message> out(std::in_place);
    if (auto r = receive(w, destination{&*out, {}, {}}); !r) out = std::unexpected(r.error());
    return out;
  }
  result<void> wait_readable(std::chrono::nanoseconds timeout);
  [[nodiscard]] std::size_t buffered_bytes() noexcept;
  [[nodiscard]] bool is_drained() noexcept;
  // Hands a whole message to its destination; if a caller's buffer is too small, the message is
  // kept (stash) for the next call, so nothing is lost.
  result<message_info> deliver(message m, destination dest);
  // Inlined into receive(), its one caller: the common receive stays one call deep.
  [[gnu::always_inline]] inline result<message_info> receive_stream(const wait_spec& w,
                                                                    destination dest);
  result<message_info> receive_packet(const wait_spec& w, destination dest);
  result<void> read_more(const wait_spec& w, spinner& spin);
  // After the stream decoder said failed: a fatal failure breaks the channel (in the decoder's
  // words); a frame skipped whole takes a pool announce's pool with it. Returns the error.
  std::unexpected<std::error_code> decoder_failed();
  // After a receive that failed with e (made with these recv flags): success to try again (a
  // would-block spun or waited out as w allows, or the one-time ECONNRESET), else the error.
  result<void> retry_after(std::error_code e, const wait_spec& w, spinner& spin, int flags) const;
  // Waits for readiness according to w after a would-block.
  [[nodiscard]] result<void> wait(const wait_spec& w, short events) const;

  // receive_batch.cpp.
  result<std::size_t> receive_batch(const wait_spec& w, void (*call)(void*, message_view&),
                                    void* fn, std::size_t max);

  // --- shared memory ---------------------------------------------------------------------------

  // This end's pool (pool_mutex; allocate() may make it outside tx), and whether the peer has
  // been told of it (tx).
  std::mutex pool_mutex;
  std::shared_ptr<detail::pool_tx> pool_out;
  bool pool_announced = false;
  // Bytes of messages sent in memfds of their own that the peer may not have taken out of the
  // socket yet (tx; see memfd_room).
  std::uint64_t memfd_in_flight = 0;
  // The peer's pool (rx).
  std::shared_ptr<detail::pool_rx> pool_in;
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

  // shared.cpp: sending through shared memory.
  result<shared_buffer> allocate(std::size_t size);
  result<void> send(shared_buffer&& buffer, std::span<const int> fds);
  // This end's pool, created on first use (nullptr if it cannot be).
  std::shared_ptr<detail::pool_tx> pool();
  // Under tx: frames naming a block of the pool, or a memfd of its own.
  result<void> put_shared(const detail::pool_tx::block& b, std::span<const int> fds, bool blocking);
  result<void> put_memfd(unique_fd memfd, std::uint64_t length, std::span<const int> fds,
                         bool blocking);
  // Under tx, before a message of `length` bytes is put in a memfd of its own: success once
  // shared_memory.max_in_flight has room for it; else errc::queue_full (not blocking), or a wait
  // until it has (blocking). Errors: errc::closed.
  result<void> memfd_room(std::uint64_t length, bool blocking);
  // shared.cpp: receiving. A frame with descriptor flags, turned into the message it stands for
  // (nullopt for a pool announce, which only sets up the peer's pool).
  result<std::optional<message>> resolve(std::uint8_t flags, const_buffer payload,
                                         std::vector<unique_fd> fds);
};

}  // namespace duplex
