// Internal: sendmsg/recvmsg with fds, EINTR retried, every received fd owned at once. Shared by
// socket and channel. Not installed.
#pragma once

#include <sys/socket.h>
#include <sys/uio.h>

#include <array>
#include <cstddef>
#include <cstring>
#include <span>
#include <vector>

#include "duplex/buffer.hpp"
#include "duplex/error.hpp"
#include "duplex/fd.hpp"
#include "duplex/socket.hpp"

namespace duplex::detail {

// The fds one recvmsg delivered, owned. `count` is how many SCM_RIGHTS fds arrived; any beyond
// the array (impossible with the kernel's limit of 253) were closed at once.
struct fd_batch {
  std::array<unique_fd, max_fds_per_message + 8> fds;
  std::size_t count = 0;

  [[nodiscard]] std::span<unique_fd> taken() noexcept {
    return std::span(fds).first(std::min(count, fds.size()));
  }
  void clear() noexcept {
    for (auto& fd : taken())
      fd.reset();
    count = 0;
  }
};

// What one recvmsg returned.
struct raw_received {
  std::size_t bytes = 0;  // as the kernel returned it (the real packet size with MSG_TRUNC)
  bool ctrunc = false;    // MSG_CTRUNC: control data (fds) was cut short
  bool trunc = false;     // MSG_TRUNC: the packet was larger than the buffers
  bool control = false;   // a control message came (fds, credentials): a stream read may have
                          // stopped at it with more bytes queued behind
};

// iovecs for a span of buffers, on the stack for the common few, with room for one extra
// leading entry (a header) if asked.
class iovec_array {
 public:
  template <typename Buffer>
  explicit iovec_array(std::span<const Buffer> buffers, const_buffer head = {}) {
    const std::size_t n = buffers.size() + (head.empty() ? 0 : 1);
    iovec* out = small_.data();
    if (n > small_.size()) {
      large_.resize(n);
      out = large_.data();
    }
    std::size_t i = 0;
    if (!head.empty()) add(out[i++], head);
    for (const auto& b : buffers)
      add(out[i++], b);
    data_ = out;
    size_ = n;
  }
  iovec_array(const iovec_array&) = delete;
  iovec_array& operator=(const iovec_array&) = delete;

  [[nodiscard]] iovec* data() noexcept { return data_; }
  [[nodiscard]] std::size_t size() const noexcept { return size_; }
  [[nodiscard]] std::size_t total() const noexcept { return total_; }

  // Drops the first n bytes (after a partial send): whole entries and part of the next one.
  void advance(std::size_t n) noexcept;

 private:
  template <typename Buffer>
  void add(iovec& v, const Buffer& b) noexcept {
    v.iov_base = const_cast<std::byte*>(b.data());
    v.iov_len = b.size();
    total_ += b.size();
  }

  // Only the first size_ entries from data_ are ever read, each written first: not zeroed, since
  // a frame's every send builds one of these.
  std::array<iovec, 16> small_;  // NOLINT(cppcoreguidelines-pro-type-member-init)
  std::vector<iovec> large_;
  iovec* data_ = nullptr;
  std::size_t size_ = 0;
  std::size_t total_ = 0;
};

// Copies parts one after the other to `to`, which has room for them all; returns how many bytes.
inline std::size_t copy_parts(std::span<const const_buffer> parts, std::byte* to) noexcept {
  std::size_t at = 0;
  for (const auto& p : parts) {
    if (!p.empty()) std::memcpy(to + at, p.data(), p.size());
    at += p.size();
  }
  return at;
}

// One send(MSG_NOSIGNAL | flags) of size bytes, EINTR retried. Errors: errc::would_block, the
// errno otherwise.
[[nodiscard]] result<std::size_t> send_bytes(int fd, const void* data, std::size_t size,
                                             int flags) noexcept;

// One recv(flags) of at most size bytes, EINTR retried, without a control buffer (so with
// MSG_PEEK no fd is ever taken from the socket). Returns what recv returned: with MSG_TRUNC on a
// packet socket, the whole packet's size. Errors: errc::would_block, the errno otherwise.
[[nodiscard]] result<std::size_t> recv_bytes(int fd, void* data, std::size_t size,
                                             int flags) noexcept;

// One send (no fds, and a single piece or pieces of at most 1 KiB in all, gathered on the
// stack: the one place a small frame's header and payload are joined) or one sendmsg with the fds
// attached, with MSG_NOSIGNAL | flags; EINTR retried. At most max_fds_per_message fds: the
// caller checked that (socket::send_msg, channel::impl::check_message) and this trusts it.
// Errors: errc::would_block, the errno otherwise.
[[nodiscard]] result<std::size_t> send_with_fds(int fd, iovec* iov, std::size_t iovlen,
                                                std::span<const int> fds, int flags) noexcept;

// One recvmsg(MSG_CMSG_CLOEXEC | flags) with room for 253 fds, EINTR retried. Every fd that
// arrived is in `out` (owned) whatever the flags say; the caller decides what to do with them.
// Errors: errc::would_block, the errno otherwise (no fds are held then).
[[nodiscard]] result<raw_received> recv_with_fds(int fd, iovec* iov, std::size_t iovlen, int flags,
                                                 fd_batch& out) noexcept;

// True if the kernel's copy of these pieces into a packet would crawl: a piece of 256 bytes or
// more that lands 1 to 63 bytes past where it comes from, modulo 4 KiB, taking the packet to
// start on a page boundary (as the kernel allocates packets of 2 KiB and more). x86's rep movsb,
// which the kernel copies with, runs at a fraction of its speed at such a distance.
[[nodiscard]] bool packet_copy_would_crawl(const iovec* iov, std::size_t iovlen) noexcept;

// Copies the pieces one after another to out, in steps of at most 1 KiB: below the size from
// which the C library's memcpy uses rep movsb itself.
void gather_in_steps(const iovec* iov, std::size_t iovlen, std::byte* out) noexcept;

// The largest packet a sender without CAP_NET_ADMIN can put on an AF_UNIX seqpacket socket:
// SO_SNDBUF - 32 bytes, where SO_SNDBUF is at most twice net.core.wmem_max. Learned once per
// process from a socket of its own with SO_SNDBUF raised as far as it goes. Errors: the errno of
// socket(2) (EMFILE, ...) while that socket cannot be had; a later call tries again.
[[nodiscard]] result<std::size_t> largest_packet() noexcept;

// Anonymous private memory that takes the part of a packet a receive's first buffer cannot hold.
// Mapped with MAP_NORESERVE: pages no packet reached cost address space only, and trim() gives
// back what a large packet touched beyond the first `kept` bytes.
class spill_area {
 public:
  static constexpr std::size_t kept = std::size_t{64} << 10;

  spill_area() = default;
  ~spill_area();
  spill_area(const spill_area&) = delete;
  spill_area& operator=(const spill_area&) = delete;

  // Maps size bytes (replacing any earlier mapping). Errors: the errno of mmap.
  [[nodiscard]] result<void> map(std::size_t size) noexcept;
  [[nodiscard]] bool mapped() const noexcept { return data_ != nullptr; }
  [[nodiscard]] mutable_buffer bytes() const noexcept { return {data_, size_}; }
  // After a packet wrote `used` bytes here: the pages past the first `kept` bytes go back.
  void trim(std::size_t used) noexcept;

 private:
  std::byte* data_ = nullptr;
  std::size_t size_ = 0;
};

// After a seqpacket recv returned 0: true if it was end-of-stream (the peer shut down its
// sending side and no packet with data is queued), false if it was an empty packet.
[[nodiscard]] bool seqpacket_at_end(int fd) noexcept;

}  // namespace duplex::detail
