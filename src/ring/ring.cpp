// The ring_channel (duplex/ring.hpp): its rings' mappings, the handshake that sets them up, and
// the send and receive paths over shared memory with their wake sockets.
#include "duplex/ring.hpp"

#include <fcntl.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <bit>
#include <cerrno>
#include <cstring>
#include <mutex>
#include <new>

#include "base/memfd.hpp"
#include "base/spin.hpp"
#include "base/syscall.hpp"
#include "duplex/socket_pair.hpp"
#include "ring/ring_layout.hpp"
#include "socket/io.hpp"

namespace duplex {
namespace {

using namespace detail::ring_layout;

using detail::deadline;
using detail::relax;
// A turn of the ring's spin is a few loads from shared memory: the clock is read every 64 turns.
using spin_budget = detail::spinner<64>;

// A ring mapped into this process.
class ring_mapping {
 public:
  ring_mapping() = default;
  ring_mapping(std::byte* base, std::size_t capacity) noexcept : base_(base), capacity_(capacity) {}
  ring_mapping(ring_mapping&& o) noexcept
      : base_(std::exchange(o.base_, nullptr)), capacity_(std::exchange(o.capacity_, 0)) {}
  ring_mapping& operator=(ring_mapping&& o) noexcept {
    std::swap(base_, o.base_);
    std::swap(capacity_, o.capacity_);
    return *this;
  }
  ~ring_mapping() {
    if (base_ != nullptr) ::munmap(base_, header_size + capacity_);
  }

  [[nodiscard]] std::size_t capacity() const noexcept { return capacity_; }
  template <typename T>
  [[nodiscard]] std::atomic_ref<T> field(std::size_t offset) const noexcept {
    return std::atomic_ref<T>(*reinterpret_cast<T*>(base_ + offset));
  }
  [[nodiscard]] std::atomic_ref<std::uint64_t> head() const noexcept {
    return field<std::uint64_t>(off_head);
  }
  [[nodiscard]] std::atomic_ref<std::uint64_t> tail() const noexcept {
    return field<std::uint64_t>(off_tail);
  }
  [[nodiscard]] std::atomic_ref<std::uint32_t> closed() const noexcept {
    return field<std::uint32_t>(off_closed);
  }
  [[nodiscard]] std::atomic_ref<std::uint32_t> reader_sleeping() const noexcept {
    return field<std::uint32_t>(off_reader_sleeping);
  }
  [[nodiscard]] std::atomic_ref<std::uint32_t> writer_waiting() const noexcept {
    return field<std::uint32_t>(off_writer_waiting);
  }

  // Copies n bytes in at position pos of the data, wrapping at the end.
  void write(std::uint64_t pos, const std::byte* from, std::size_t n) const noexcept {
    std::byte* data = base_ + header_size;
    const std::size_t at = pos & (capacity_ - 1);
    const std::size_t first = std::min(n, capacity_ - at);
    std::memcpy(data + at, from, first);
    if (first < n) std::memcpy(data, from + first, n - first);
  }
  // Copies n bytes out from position pos of the data, wrapping at the end.
  void read(std::uint64_t pos, std::byte* to, std::size_t n) const noexcept {
    const std::byte* data = base_ + header_size;
    const std::size_t at = pos & (capacity_ - 1);
    const std::size_t first = std::min(n, capacity_ - at);
    std::memcpy(to, data + at, first);
    if (first < n) std::memcpy(to + first, data, n - first);
  }

 private:
  std::byte* base_ = nullptr;
  std::size_t capacity_ = 0;
};

result<ring_mapping> map_ring(int fd, std::size_t capacity) {
  void* p = ::mmap(nullptr, header_size + capacity, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) return fail_errno(errno);
  return ring_mapping(static_cast<std::byte*>(p), capacity);
}

// Wakes the peer sleeping on the other end of bell, one of the wake sockets it sent (a connected
// AF_UNIX seqpacket socket, checked in the handshake): one byte, never waiting, whatever the peer
// has done to the socket's file. A full socket (EAGAIN) already holds a wake; any other error
// means the peer has closed its end, which its stream socket reports.
void ring_bell(int bell) noexcept {
  const char wake = 1;
  static_cast<void>(
      detail::retry_eintr([&] { return ::send(bell, &wake, 1, MSG_DONTWAIT | MSG_NOSIGNAL); }));
}

// True if fd is a connected AF_UNIX seqpacket socket: a send with MSG_DONTWAIT on one takes no
// lock its peer can hold and cannot wait, and its connection cannot be moved elsewhere.
bool is_wake_socket(int fd) {
  int domain = 0;
  int type = 0;
  socklen_t len = sizeof domain;
  if (::getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &len) != 0 || domain != AF_UNIX) {
    return false;
  }
  len = sizeof type;
  if (::getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) != 0 || type != SOCK_SEQPACKET) {
    return false;
  }
  sockaddr_un peer{};
  len = sizeof peer;
  return ::getpeername(fd, reinterpret_cast<sockaddr*>(&peer), &len) == 0;
}

// Succeeds if every field of o is in the range ring.hpp gives it; EINVAL otherwise. The bounds
// on busy_poll keep steady_clock::now() + busy_poll (the spinner) in range.
result<void> check_options(const ring_options& o) {
  const bool ok =
      std::has_single_bit(o.capacity) && o.capacity >= min_capacity && o.capacity <= max_capacity &&
      o.max_message_size >= 1 && o.max_message_size <= o.capacity - record_header &&
      o.max_peer_capacity >= min_capacity && o.busy_poll >= std::chrono::nanoseconds::zero() &&
      o.busy_poll <= max_busy_poll && o.handshake_timeout >= std::chrono::nanoseconds::zero();
  if (!ok) return fail_errno(EINVAL);
  return {};
}

}  // namespace

struct ring_channel::impl {
  socket sock;
  ring_options options;
  ring_mapping in;   // this end's ring: the peer writes, this end reads
  ring_mapping out;  // the peer's ring: this end writes
  std::size_t out_max = 0;
  unique_fd in_memfd;  // sent in the handshake, then closed
  // Wake sockets (docs/design.md): this end sleeps on the receiving ends it made, and wakes the
  // peer by sending a byte on the ends the peer made and sent. No file this end writes to, reads
  // from or waits on is one whose flags or locks the peer shares.
  unique_fd data_bell, room_bell;            // this end sleeps on these
  unique_fd peer_data_bell, peer_room_bell;  // the peer sleeps on their other ends
  std::uint64_t head = 0;                    // this end's reading position in `in`
  std::uint64_t tail = 0;                    // this end's writing position in `out`
  std::mutex send_lock, receive_lock;
  std::atomic<bool> closed{false};
  std::atomic<bool> broken{false};

  ~impl() {
    // A peer that reads our closed flag or our EOF sees the end either way.
    if (in.capacity() != 0) in.closed().store(1, std::memory_order_seq_cst);
  }

  // Marks the rings unusable after the peer broke them.
  std::unexpected<std::error_code> break_rings() {
    broken.store(true, std::memory_order_relaxed);
    return fail(errc::protocol_error);
  }

  [[nodiscard]] result<void> usable() const {
    if (closed.load(std::memory_order_relaxed)) return fail(errc::closed);
    if (broken.load(std::memory_order_relaxed)) return fail(errc::broken);
    return {};
  }

  // Sleeps until bell rings, the peer goes, this end closes, or d passes. Returns ok to look
  // again; errc::peer_closed, errc::closed, errc::timed_out or errc::protocol_error otherwise.
  result<void> sleep(int bell, const deadline& d) {
    if (closed.load(std::memory_order_relaxed)) return fail(errc::closed);
    std::array<pollfd, 2> fds{{{bell, POLLIN, 0}, {sock.native_handle(), POLLIN, 0}}};
    const auto woke = detail::wait_for(fds, d);
    if (closed.load(std::memory_order_relaxed)) return fail(errc::closed);
    if (!woke) return woke;
    if (fds[0].revents != 0) return take_wake(bell);
    return peer_state();
  }

  // Takes one wake from this end's wake socket bell, which only this end reads, never waiting.
  // The peer may have sent any number of packets: one is read, and any left wake the next sleep
  // at once (the caller looks at the ring again either way). The end of the peer's side means
  // the peer is gone: nothing can wake this end any more.
  static result<void> take_wake(int bell) {
    char wake = 0;
    const ssize_t r = detail::retry_eintr([&] { return ::recv(bell, &wake, 1, MSG_DONTWAIT); });
    if (r == 0) return fail(errc::peer_closed);
    return {};
  }

  // After the socket polled readable: it carries nothing after the handshake, so the peer has
  // gone (end of stream), or broke the protocol by sending more.
  result<void> peer_state() {
    std::byte b{};
    const ssize_t r = ::recv(sock.native_handle(), &b, 1, MSG_PEEK | MSG_DONTWAIT);
    if (r == 0 || (r < 0 && detail::peer_gone(std::error_code(errno, std::system_category())))) {
      return fail(errc::peer_closed);
    }
    if (r > 0) return break_rings();
    return {};  // EAGAIN or EINTR: look again
  }

  result<void> send(std::span<const const_buffer> pieces, const deadline& d, bool try_only) {
    const std::lock_guard g(send_lock);
    if (auto ok = usable(); !ok) return ok;
    std::size_t n = 0;
    for (const auto& p : pieces)
      n += p.size();
    if (n > out_max) return fail(errc::message_too_large);
    const std::uint64_t need = record_size(n);
    spin_budget spin(options.busy_poll, d);
    for (;;) {
      if (out.closed().load(std::memory_order_acquire) != 0) return fail(errc::peer_closed);
      const std::uint64_t used = tail - out.head().load(std::memory_order_acquire);
      if (used > out.capacity() || used % 8 != 0) return break_rings();
      if (out.capacity() - used >= need) break;
      if (try_only) return fail(errc::would_block);
      if (d.passed()) return fail(errc::timed_out);
      if (spin.again()) continue;
      // Sleep, telling the peer first; look once more after telling it, since it may have made
      // room before it could see the flag.
      out.writer_waiting().store(1, std::memory_order_seq_cst);
      const std::uint64_t again = tail - out.head().load(std::memory_order_seq_cst);
      if (again <= out.capacity() && out.capacity() - again >= need) {
        out.writer_waiting().store(0, std::memory_order_relaxed);
        continue;
      }
      if (auto woke = sleep(room_bell.get(), d); !woke) {
        out.writer_waiting().store(0, std::memory_order_relaxed);
        return woke;
      }
    }
    const std::array<std::uint32_t, 2> header{static_cast<std::uint32_t>(n), 0};
    out.write(tail, reinterpret_cast<const std::byte*>(header.data()), record_header);
    std::uint64_t at = tail + record_header;
    for (const auto& p : pieces) {
      if (!p.empty()) out.write(at, p.data(), p.size());
      at += p.size();
    }
    tail += need;
    out.tail().store(tail, std::memory_order_seq_cst);
    if (out.reader_sleeping().load(std::memory_order_seq_cst) != 0 &&
        out.reader_sleeping().exchange(0, std::memory_order_seq_cst) != 0) {
      ring_bell(peer_data_bell.get());
    }
    return {};
  }

  // Waits for the next record and returns its payload's length, leaving it in the ring.
  result<std::size_t> next(const deadline& d, bool try_only) {
    if (auto ok = usable(); !ok) return std::unexpected(ok.error());
    spin_budget spin(options.busy_poll, d);
    for (;;) {
      const std::uint64_t avail = in.tail().load(std::memory_order_acquire) - head;
      if (avail != 0) return check_record(avail);
      // Empty. A peer that closed stored its last tail before its flag.
      if (out.closed().load(std::memory_order_acquire) != 0) {
        if (in.tail().load(std::memory_order_acquire) != head) continue;
        return fail(errc::peer_closed);
      }
      if (try_only) return fail(errc::would_block);
      if (d.passed()) return fail(errc::timed_out);
      if (spin.again()) continue;
      in.reader_sleeping().store(1, std::memory_order_seq_cst);
      if (in.tail().load(std::memory_order_seq_cst) != head) {
        in.reader_sleeping().store(0, std::memory_order_relaxed);
        continue;
      }
      auto woke = sleep(data_bell.get(), d);
      in.reader_sleeping().store(0, std::memory_order_relaxed);
      if (!woke) {
        // Everything the peer published before it went is delivered first.
        if (woke.error() == errc::peer_closed &&
            in.tail().load(std::memory_order_acquire) != head) {
          continue;
        }
        return std::unexpected(woke.error());
      }
    }
  }

  result<std::size_t> check_record(std::uint64_t avail) {
    if (avail > in.capacity() || avail % 8 != 0) return break_rings();
    std::array<std::uint32_t, 2> header{};
    in.read(head, reinterpret_cast<std::byte*>(header.data()), record_header);
    const std::uint64_t n = header[0];
    if (header[1] != 0 || n > options.max_message_size || record_size(n) > avail) {
      return break_rings();
    }
    return static_cast<std::size_t>(n);
  }

  void copy_out(std::size_t n, std::byte* to) const noexcept {
    if (n > 0) in.read(head + record_header, to, n);
  }

  void consume(std::size_t n) {
    head += record_size(n);
    in.head().store(head, std::memory_order_seq_cst);
    if (in.writer_waiting().load(std::memory_order_seq_cst) != 0 &&
        in.writer_waiting().exchange(0, std::memory_order_seq_cst) != 0) {
      ring_bell(peer_room_bell.get());
    }
  }

  result<message> receive(const deadline& d, bool try_only) {
    const std::lock_guard g(receive_lock);
    auto n = next(d, try_only);
    if (!n) return std::unexpected(n.error());
    message m;
    try {
      m = message::with_size(*n);
    } catch (const std::bad_alloc&) {
      return fail_errno(ENOMEM);
    }
    copy_out(*n, m.bytes().data());
    consume(*n);
    return m;
  }

  result<message_info> receive_into(mutable_buffer buf, const deadline& d) {
    const std::lock_guard g(receive_lock);
    auto n = next(d, false);
    if (!n) return std::unexpected(n.error());
    if (*n > buf.size()) return fail(errc::buffer_too_small);
    copy_out(*n, buf.data());
    consume(*n);
    return message_info{.size = *n, .fds = 0};
  }

  // --- setting up ---------------------------------------------------------------------------

  // Makes this end's ring and bells, and sends them.
  result<void> offer(const deadline& d) {
    auto made = detail::new_memfd("duplex-ring", header_size + options.capacity);
    if (!made) return std::unexpected(made.error());
    in_memfd = std::move(*made);
    const int memfd = in_memfd.get();
    if (::fcntl(memfd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) != 0) {
      return fail_errno(errno);
    }
    auto m = map_ring(memfd, options.capacity);
    if (!m) return std::unexpected(m.error());
    in = std::move(*m);
    in.field<std::uint64_t>(off_magic).store(ring_magic, std::memory_order_relaxed);
    in.field<std::uint64_t>(off_capacity).store(options.capacity, std::memory_order_relaxed);
    // Each wake socket pair: this end keeps one end to sleep on, the peer gets the other.
    std::array<unique_fd, 2> theirs;
    for (std::size_t i = 0; i < 2; ++i) {
      auto wake = socket_pair(AF_UNIX, SOCK_SEQPACKET, 0);
      if (!wake) return std::unexpected(wake.error());
      (i == 0 ? data_bell : room_bell) = wake->first.release();
      theirs[i] = wake->second.release();
    }
    hello h;
    h.capacity = options.capacity;
    h.max_message_size = options.max_message_size;
    iovec iov{&h, sizeof h};
    const std::array<int, hello_fds> fds{memfd, theirs[0].get(), theirs[1].get()};
    for (;;) {
      auto sent = detail::send_with_fds(sock.native_handle(), &iov, 1, fds, MSG_DONTWAIT);
      if (sent) {
        // 40 bytes into an unused socket go whole; a short send means someone else wrote to it.
        if (*sent != sizeof h) return fail(errc::protocol_error);
        in_memfd.reset();  // the mapping and the peer's copy keep the ring
        // theirs: the peer's copies keep its ends (closed on return).
        return {};
      }
      if (sent.error() != errc::would_block) {
        if (detail::peer_gone(sent.error())) return fail(errc::peer_closed);
        return std::unexpected(sent.error());
      }
      if (auto ready = detail::wait_for(sock.native_handle(), POLLOUT, d); !ready) {
        return std::unexpected(ready.error());
      }
    }
  }

  // Receives the peer's hello and its three fds, checks them, and maps the peer's ring.
  result<void> accept(const deadline& d) {
    hello h;
    auto* to = reinterpret_cast<std::byte*>(&h);
    std::size_t got = 0;
    detail::fd_batch fds;
    bool first = true;
    while (got < sizeof h) {
      if (auto ready = detail::wait_for(sock.native_handle(), POLLIN, d); !ready) {
        return std::unexpected(ready.error());
      }
      iovec iov{to + got, sizeof h - got};
      detail::fd_batch more;
      auto rr =
          detail::recv_with_fds(sock.native_handle(), &iov, 1, MSG_DONTWAIT, first ? fds : more);
      if (!rr) {
        if (rr.error() == errc::would_block) continue;
        if (detail::peer_gone(rr.error())) return fail(errc::peer_closed);
        return std::unexpected(rr.error());
      }
      if (rr->bytes == 0) return fail(errc::peer_closed);
      // MSG_CTRUNC: the kernel could not give this process every fd the peer sent, which is
      // this end's limit (RLIMIT_NOFILE), not the peer's fault. The fds that did arrive are
      // closed on return with fds and more.
      if (rr->ctrunc) return fail(errc::fds_truncated);
      if (rr->trunc || (!first && more.count != 0)) return fail(errc::protocol_error);
      if (sock.kind() == socket_kind::seqpacket && rr->bytes != sizeof h) {
        return fail(errc::protocol_error);
      }
      got += rr->bytes;
      first = false;
    }
    if (h.magic != ring_magic || h.version != ring_version || h.flags != 0 || h.reserved != 0 ||
        fds.count != hello_fds) {
      return fail(errc::protocol_error);
    }
    if (!std::has_single_bit(h.capacity) || h.capacity < min_capacity ||
        h.capacity > options.max_peer_capacity || h.capacity > max_capacity) {
      return fail(errc::protocol_error);
    }
    auto taken = fds.taken();
    const int memfd = taken[0].get();
    const int seals = ::fcntl(memfd, F_GET_SEALS);
    struct stat st {};
    if (seals < 0 || (seals & F_SEAL_SHRINK) == 0 || ::fstat(memfd, &st) != 0 ||
        static_cast<std::uint64_t>(st.st_size) != header_size + h.capacity) {
      return fail(errc::protocol_error);
    }
    for (std::size_t i = 1; i < hello_fds; ++i) {
      if (!is_wake_socket(taken[i].get())) return fail(errc::protocol_error);
    }
    auto m = map_ring(memfd, static_cast<std::size_t>(h.capacity));
    if (!m) return std::unexpected(m.error());
    out = std::move(*m);
    out_max = static_cast<std::size_t>(
        std::min<std::uint64_t>(h.max_message_size, h.capacity - record_header));
    peer_data_bell = std::move(taken[1]);
    peer_room_bell = std::move(taken[2]);
    return {};
  }

  static result<std::unique_ptr<impl>> begin(socket s, const ring_options& o, const deadline& d) {
    if (!s.is_open() || (s.kind() != socket_kind::stream && s.kind() != socket_kind::seqpacket)) {
      return fail(errc::wrong_kind);
    }
    if (auto ok = check_options(o); !ok) return std::unexpected(ok.error());
    std::unique_ptr<impl> p(new (std::nothrow) impl);
    if (!p) return fail_errno(ENOMEM);
    p->sock = std::move(s);
    p->options = o;
    if (auto ok = p->offer(d); !ok) return std::unexpected(ok.error());
    return p;
  }
};

ring_channel::ring_channel() noexcept = default;
ring_channel::~ring_channel() = default;
ring_channel::ring_channel(ring_channel&&) noexcept = default;
ring_channel& ring_channel::operator=(ring_channel&&) noexcept = default;
ring_channel::ring_channel(std::unique_ptr<impl> p) noexcept : impl_(std::move(p)) {}

result<ring_channel> ring_channel::create(socket s, ring_options options) {
  const deadline d(options.handshake_timeout);
  auto p = impl::begin(std::move(s), options, d);
  if (!p) return std::unexpected(p.error());
  if (auto ok = (*p)->accept(d); !ok) return std::unexpected(ok.error());
  return ring_channel(std::move(*p));
}

result<connected_rings> ring_channel_pair(ring_options options) {
  if (auto ok = check_options(options); !ok) return std::unexpected(ok.error());
  auto sockets = socket_pair(socket_kind::stream);
  if (!sockets) return std::unexpected(sockets.error());
  const deadline d(options.handshake_timeout);
  // Both ends offer before either accepts: one thread cannot wait on itself.
  auto a = ring_channel::impl::begin(std::move(sockets->first), options, d);
  if (!a) return std::unexpected(a.error());
  auto b = ring_channel::impl::begin(std::move(sockets->second), options, d);
  if (!b) return std::unexpected(b.error());
  if (auto ok = (*a)->accept(d); !ok) return std::unexpected(ok.error());
  if (auto ok = (*b)->accept(d); !ok) return std::unexpected(ok.error());
  return connected_rings{ring_channel(std::move(*a)), ring_channel(std::move(*b))};
}

result<void> ring_channel::send(const_buffer payload, std::chrono::nanoseconds timeout) {
  return send(std::span<const const_buffer>(&payload, 1), timeout);
}

result<void> ring_channel::send(std::span<const const_buffer> pieces,
                                std::chrono::nanoseconds timeout) {
  if (!impl_) return fail(errc::closed);
  return impl_->send(pieces, deadline(timeout), false);
}

result<void> ring_channel::try_send(const_buffer payload) {
  if (!impl_) return fail(errc::closed);
  return impl_->send(std::span<const const_buffer>(&payload, 1),
                     deadline(std::chrono::nanoseconds::zero()), true);
}

result<message> ring_channel::receive(std::chrono::nanoseconds timeout) {
  if (!impl_) return fail(errc::closed);
  return impl_->receive(deadline(timeout), false);
}

result<message> ring_channel::try_receive() {
  if (!impl_) return fail(errc::closed);
  return impl_->receive(deadline(std::chrono::nanoseconds::zero()), true);
}

result<message_info> ring_channel::receive_into(mutable_buffer buf,
                                                std::chrono::nanoseconds timeout) {
  if (!impl_) return fail(errc::closed);
  return impl_->receive_into(buf, deadline(timeout));
}

std::size_t ring_channel::max_send_size() const noexcept {
  return impl_ && !impl_->closed.load(std::memory_order_relaxed) ? impl_->out_max : 0;
}

bool ring_channel::is_open() const noexcept {
  return impl_ && !impl_->closed.load(std::memory_order_relaxed);
}

bool ring_channel::is_broken() const noexcept {
  return impl_ && impl_->broken.load(std::memory_order_relaxed);
}

int ring_channel::native_handle() const noexcept {
  return impl_ ? impl_->sock.native_handle() : -1;
}

void ring_channel::close() noexcept {
  if (!impl_ || impl_->closed.exchange(true)) return;
  impl_->in.closed().store(1, std::memory_order_seq_cst);
  // The peer sees the end of the stream; this end's own sleepers see their socket readable and
  // then the closed flag. Nothing here can wait: shutdown() of a socket never does.
  ::shutdown(impl_->sock.native_handle(), SHUT_RDWR);
}

}  // namespace duplex
