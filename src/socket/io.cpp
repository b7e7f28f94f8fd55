#include "socket/io.hpp"

#include <limits.h>
#include <poll.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cassert>
#include <cerrno>
#include <cstdint>
#include <cstring>

#include "base/syscall.hpp"

#ifndef SCM_PIDFD
#define SCM_PIDFD 0x04
#endif

namespace duplex::detail {
namespace {

// Room for the most fds one message can carry plus any credentials or pidfd message the kernel
// may add (SO_PASSCRED, SO_PASSPIDFD), so that MSG_CTRUNC only ever means the kernel could not
// deliver what was sent.
constexpr std::size_t control_space = CMSG_SPACE(sizeof(int) * max_fds_per_message) +
                                      CMSG_SPACE(sizeof(struct ucred)) + CMSG_SPACE(sizeof(int)) +
                                      CMSG_SPACE(64);

// Pieces that add up to at most this many bytes are gathered into one buffer and sent with
// send(2) (see send_with_fds).
constexpr std::size_t coalesce_limit = 1024;

union control_buffer {
  cmsghdr align;
  char bytes[control_space];
};

}  // namespace

void iovec_array::advance(std::size_t n) noexcept {
  total_ -= n;
  while (n > 0 && size_ > 0) {
    if (n < data_->iov_len) {
      data_->iov_base = static_cast<char*>(data_->iov_base) + n;
      data_->iov_len -= n;
      return;
    }
    n -= data_->iov_len;
    ++data_;
    --size_;
  }
  // Skip empty entries so that size() == 0 exactly when nothing is left.
  while (size_ > 0 && data_->iov_len == 0) {
    ++data_;
    --size_;
  }
}

result<std::size_t> send_bytes(int fd, const void* data, std::size_t size, int flags) noexcept {
  const ssize_t n = retry_eintr([&] { return ::send(fd, data, size, flags | MSG_NOSIGNAL); });
  if (n < 0) return from_errno(errno);
  return static_cast<std::size_t>(n);
}

result<std::size_t> recv_bytes(int fd, void* data, std::size_t size, int flags) noexcept {
  const ssize_t n = retry_eintr([&] { return ::recv(fd, data, size, flags); });
  if (n < 0) return from_errno(errno);
  return static_cast<std::size_t>(n);
}

result<std::size_t> send_with_fds(int fd, iovec* iov, std::size_t iovlen, std::span<const int> fds,
                                  int flags) noexcept {
  // Every caller refused more fds with its own first check (see io.hpp): trusted here, so the
  // control buffer below always has room.
  assert(fds.size() <= max_fds_per_message);
  if (fds.size() > max_fds_per_message) __builtin_unreachable();
  if (fds.empty()) {
    // send() rather than sendmsg(): the kernel then needs no msghdr and no iovec array copied in,
    // which is measurable on a small message's round trip (see docs/performance.md). A few small
    // pieces (a frame header and its payload) are gathered on the stack first; that copy costs
    // less than the sendmsg it saves.
    if (iovlen == 1) return send_bytes(fd, iov[0].iov_base, iov[0].iov_len, flags);
    std::size_t total = 0;
    for (std::size_t i = 0; i < iovlen; ++i)
      total += iov[i].iov_len;
    if (iovlen > 1 && total <= coalesce_limit) {
      std::array<std::byte, coalesce_limit> gathered;  // NOLINT: written before it is read
      gather_in_steps(iov, iovlen, gathered.data());
      return send_bytes(fd, gathered.data(), total, flags);
    }
  }
  msghdr msg{};
  msg.msg_iov = iov;
  msg.msg_iovlen = iovlen;
  control_buffer control;
  if (!fds.empty()) {
    const std::size_t payload = sizeof(int) * fds.size();
    std::memset(control.bytes, 0, CMSG_SPACE(payload));
    msg.msg_control = control.bytes;
    msg.msg_controllen = CMSG_SPACE(payload);
    cmsghdr* cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(payload);
    std::memcpy(CMSG_DATA(cmsg), fds.data(), payload);
  }
  const ssize_t n = retry_eintr([&] { return ::sendmsg(fd, &msg, flags | MSG_NOSIGNAL); });
  if (n < 0) return from_errno(errno);
  return static_cast<std::size_t>(n);
}

result<raw_received> recv_with_fds(int fd, iovec* iov, std::size_t iovlen, int flags,
                                   fd_batch& out) noexcept {
  out.clear();
  control_buffer control;
  msghdr msg{};
  msg.msg_iov = iov;
  msg.msg_iovlen = iovlen;
  msg.msg_control = control.bytes;
  msg.msg_controllen = sizeof(control.bytes);
  const ssize_t n = retry_eintr([&] { return ::recvmsg(fd, &msg, flags | MSG_CMSG_CLOEXEC); });
  if (n < 0) return from_errno(errno);
  // Own every fd before anything else is decided, so each is handed on or closed.
  for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level != SOL_SOCKET) continue;
    if (c->cmsg_type != SCM_RIGHTS && c->cmsg_type != SCM_PIDFD) continue;
    const std::size_t in_msg = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    const auto* data = CMSG_DATA(c);
    for (std::size_t i = 0; i < in_msg; ++i) {
      int received = -1;
      std::memcpy(&received, data + i * sizeof(int), sizeof(int));
      unique_fd owned(received);
      // An SCM_PIDFD fd (the receiver enabled SO_PASSPIDFD) is not the peer's to send: closed.
      if (c->cmsg_type != SCM_RIGHTS) continue;
      if (out.count < out.fds.size()) out.fds[out.count] = std::move(owned);
      ++out.count;
    }
  }
  return raw_received{static_cast<std::size_t>(n), (msg.msg_flags & MSG_CTRUNC) != 0,
                      (msg.msg_flags & MSG_TRUNC) != 0, msg.msg_controllen != 0};
}

bool packet_copy_would_crawl(const iovec* iov, std::size_t iovlen) noexcept {
  constexpr std::uintptr_t page = 4096;
  std::uintptr_t at = 0;  // where the piece lands in the packet
  for (std::size_t i = 0; i < iovlen; ++i) {
    if (iov[i].iov_len >= 256) {
      const auto from = reinterpret_cast<std::uintptr_t>(iov[i].iov_base);
      const std::uintptr_t distance = (at - from) % page;
      if (distance >= 1 && distance < 64) return true;
    }
    at += iov[i].iov_len;
  }
  return false;
}

void gather_in_steps(const iovec* iov, std::size_t iovlen, std::byte* out) noexcept {
  constexpr std::size_t step = 1024;
  for (std::size_t i = 0; i < iovlen; ++i) {
    const auto* from = static_cast<const std::byte*>(iov[i].iov_base);
    for (std::size_t done = 0; done < iov[i].iov_len; done += step) {
      std::memcpy(out, from + done, std::min(step, iov[i].iov_len - done));
      out += std::min(step, iov[i].iov_len - done);
    }
  }
}

result<std::size_t> largest_packet() noexcept {
  static std::atomic<std::size_t> known{0};
  if (const std::size_t n = known.load(std::memory_order_relaxed); n != 0) return n;
  const unique_fd probe(::socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0));
  if (!probe.valid()) return from_errno(errno);
  // The kernel caps the value at net.core.wmem_max and doubles it.
  int sndbuf = INT_MAX;
  socklen_t len = sizeof sndbuf;
  if (::setsockopt(probe.get(), SOL_SOCKET, SO_SNDBUF, &sndbuf, len) != 0 ||
      ::getsockopt(probe.get(), SOL_SOCKET, SO_SNDBUF, &sndbuf, &len) != 0) {
    return from_errno(errno);
  }
  const auto n = static_cast<std::size_t>(std::max(sndbuf, 64)) - 32;
  known.store(n, std::memory_order_relaxed);
  return n;
}

spill_area::~spill_area() {
  if (data_ != nullptr) ::munmap(data_, size_);
}

result<void> spill_area::map(std::size_t size) noexcept {
  void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) return from_errno(errno);
  if (data_ != nullptr) ::munmap(data_, size_);
  data_ = static_cast<std::byte*>(p);
  size_ = size;
  return {};
}

void spill_area::trim(std::size_t used) noexcept {
  used = std::min(used, size_);
  if (used <= kept) return;  // every packet comes here: the common case does nothing else
  const auto page = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
  const std::size_t end = (used + page - 1) / page * page;
  // kept is a multiple of any page size up to 64 KiB; a failure only leaves the pages resident.
  (void)::madvise(data_ + kept, std::min(end, size_) - kept, MADV_DONTNEED);
}

bool seqpacket_at_end(int fd) noexcept {
  pollfd p{fd, POLLRDHUP, 0};
  // A zero timeout: nothing to count down, so a plain retry.
  const int r = retry_eintr([&] { return ::poll(&p, 1, 0); });
  if (r <= 0 || (p.revents & (POLLRDHUP | POLLHUP)) == 0) return false;
  char probe = 0;
  const ssize_t n =
      retry_eintr([&] { return ::recv(fd, &probe, 1, MSG_PEEK | MSG_DONTWAIT | MSG_TRUNC); });
  return n <= 0;
}

}  // namespace duplex::detail
