// Shared memory for large payloads: the sender's pool, the receiver's checked mapping of it, and
// the sealed memfds of single messages (see shm.hpp).
#include "shm/shm.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <new>

#include "base/memfd.hpp"
#include "socket/io.hpp"

namespace duplex::detail {
namespace {

constexpr std::size_t page = 4096;

std::size_t round_up(std::size_t n, std::size_t to) noexcept { return (n + to - 1) / to * to; }

// Whether mmap failed for want of something of this process's own (address space, the
// vm.max_map_count limit on mappings, locked memory, file table) rather than for what the peer
// sent (a size or file the mapping refuses: EINVAL, EACCES, ENODEV, EOVERFLOW, ...).
bool local_map_error(int e) noexcept { return e == ENOMEM || e == EAGAIN || e == ENFILE; }

// A failed mapping of a peer's memfd: the local errno, or a protocol error with why said.
std::unexpected<std::error_code> map_failed(int e, const char* what, std::string& why) {
  if (local_map_error(e)) return fail_errno(e);
  why = std::string(what) + std::strerror(e);
  return fail(errc::protocol_error);
}

}  // namespace

pool_layout pool_layout::of(std::uint64_t data_size, std::uint32_t slots) noexcept {
  pool_layout l;
  l.slots_offset = page;  // the first page holds nothing yet: room for a header later
  l.data_offset = round_up(l.slots_offset + sizeof(std::uint32_t) * slots, page);
  l.total = l.data_offset + static_cast<std::size_t>(data_size);
  return l;
}

// --- the sender's pool ---------------------------------------------------------------------

result<std::shared_ptr<pool_tx>> pool_tx::create(std::size_t data_size, std::uint32_t slots) {
  if (data_size == 0 || slots == 0 || slots > max_pool_slots) return fail_errno(EINVAL);
  data_size = round_up(data_size, page);
  const pool_layout layout = pool_layout::of(data_size, slots);
  auto fd = new_memfd("duplex-pool", layout.total);
  if (!fd) return std::unexpected(fd.error());
  // The size never changes: the receiver relies on it (no SIGBUS), and checks the seals.
  if (::fcntl(fd->get(), F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) != 0) {
    return fail_errno(errno);
  }
  void* base = ::mmap(nullptr, layout.total, PROT_READ | PROT_WRITE, MAP_SHARED, fd->get(), 0);
  if (base == MAP_FAILED) return fail_errno(errno);
  // The object and shared_ptr's control block: either failing is ENOMEM (the shared_ptr deletes
  // its object if its control block cannot be had), with the mapping undone.
  std::shared_ptr<pool_tx> p;
  try {
    p.reset(new pool_tx);
  } catch (const std::bad_alloc&) {
    ::munmap(base, layout.total);
    return fail_errno(ENOMEM);
  }
  p->fd_ = std::move(*fd);
  p->base_ = static_cast<std::byte*>(base);
  p->layout_ = layout;
  p->data_size_ = data_size;
  p->slots_ = slots;
  return p;
}

pool_tx::~pool_tx() {
  if (base_ != nullptr) ::munmap(base_, layout_.total);
}

std::atomic<std::uint32_t>& pool_tx::state(std::uint32_t slot) const noexcept {
  return *reinterpret_cast<std::atomic<std::uint32_t>*>(base_ + layout_.slots_offset +
                                                        sizeof(std::uint32_t) * slot);
}

void pool_tx::reclaim() {
  // Oldest first: a block is reused only when it and every older one have been released.
  while (!live_.empty() &&
         state(live_.front().slot).load(std::memory_order_acquire) == slot_released) {
    state(live_.front().slot).store(slot_free, std::memory_order_relaxed);
    live_.pop_front();
  }
  if (live_.empty()) head_ = 0;
}

std::optional<pool_tx::block> pool_tx::allocate(std::size_t n) {
  const std::lock_guard lock(mutex_);
  const std::uint64_t size = round_up(n == 0 ? 1 : n, 64);
  if (size > data_size_) return std::nullopt;
  for (int attempt = 0; attempt < 2; ++attempt) {
    if (attempt == 1) reclaim();
    // A free slot (the receiver's state, read atomically; only this side moves released -> free).
    std::optional<std::uint32_t> slot;
    for (std::uint32_t i = 0; i < slots_; ++i) {
      const std::uint32_t s = (next_slot_ + i) % slots_;
      if (state(s).load(std::memory_order_acquire) == slot_free) {
        slot = s;
        break;
      }
    }
    if (!slot) continue;
    // Room in the ring: after the newest block, or from the start if the oldest is far enough in.
    std::optional<std::uint64_t> offset;
    if (live_.empty()) {
      offset = 0;
    } else {
      const std::uint64_t tail = live_.front().offset;
      if (head_ > tail) {  // blocks fill [tail, head): free space at the end and at the start
        if (data_size_ - head_ >= size) {
          offset = head_;
        } else if (tail >= size) {
          offset = 0;
        }
      } else if (tail - head_ >= size) {  // wrapped: free space is [head, tail)
        offset = head_;
      }
    }
    if (!offset) continue;
    // The record first: a push_back that throws leaves everything as it was (no room then).
    try {
      live_.push_back({*slot, *offset, size});
    } catch (const std::bad_alloc&) {
      return std::nullopt;
    }
    state(*slot).store(slot_in_use, std::memory_order_relaxed);
    next_slot_ = (*slot + 1) % slots_;
    head_ = *offset + size;
    return block{*slot, *offset, n, base_ + layout_.data_offset + *offset};
  }
  return std::nullopt;
}

void pool_tx::discard(const block& b) noexcept {
  state(b.slot).store(slot_released, std::memory_order_release);
}

// --- the receiver's mapping ----------------------------------------------------------------

result<std::shared_ptr<pool_rx>> pool_rx::map(unique_fd fd, const wire::pool_announce& a,
                                              std::size_t max_bytes, std::string& why) {
  if (a.slots == 0 || a.slots > max_pool_slots || a.data_size == 0 || a.data_size > max_bytes) {
    why = "a pool of " + std::to_string(a.data_size) + " bytes and " + std::to_string(a.slots) +
          " slots is out of bounds";
    return fail(errc::protocol_error);
  }
  const int seals = ::fcntl(fd.get(), F_GET_SEALS);
  if (seals < 0) {
    why = "the pool's fd is not a memfd";
    return fail(errc::protocol_error);
  }
  if ((seals & F_SEAL_SHRINK) == 0) {
    why = "the pool's memfd is not sealed against shrinking";
    return fail(errc::protocol_error);
  }
  const pool_layout layout = pool_layout::of(a.data_size, a.slots);
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0 || static_cast<std::uint64_t>(st.st_size) != layout.total) {
    why = "the pool's memfd is not the announced size";
    return fail(errc::protocol_error);
  }
  std::shared_ptr<pool_rx> p;
  try {
    p.reset(new pool_rx);  // the object and shared_ptr's control block
  } catch (const std::bad_alloc&) {
    return fail_errno(ENOMEM);
  }
  void* data = ::mmap(nullptr, layout.total, PROT_READ, MAP_SHARED, fd.get(), 0);
  if (data == MAP_FAILED) return map_failed(errno, "cannot map the pool: ", why);
  p->data_ = static_cast<const std::byte*>(data);
  p->layout_ = layout;
  p->data_size_ = a.data_size;
  p->slots_ = a.slots;
  const std::size_t first = layout.slots_offset / page * page;
  p->table_skew_ = layout.slots_offset - first;
  p->table_map_size_ = layout.data_offset - first;
  void* table = ::mmap(nullptr, p->table_map_size_, PROT_READ | PROT_WRITE, MAP_SHARED, fd.get(),
                       static_cast<off_t>(first));
  if (table == MAP_FAILED) return map_failed(errno, "cannot map the pool's slot table: ", why);
  p->table_ = static_cast<std::byte*>(table);
  p->fd_ = std::move(fd);
  return p;
}

pool_rx::~pool_rx() {
  if (data_ != nullptr) ::munmap(const_cast<std::byte*>(data_), layout_.total);
  if (table_ != nullptr) ::munmap(table_, table_map_size_);
}

std::optional<const_buffer> pool_rx::locate(const wire::shared_ref& r) const noexcept {
  if (r.slot >= slots_ || r.offset > data_size_ || r.length > data_size_ - r.offset) {
    return std::nullopt;
  }
  return const_buffer(data_ + layout_.data_offset + r.offset, static_cast<std::size_t>(r.length));
}

void pool_rx::release(std::uint32_t slot) noexcept {
  if (slot >= slots_) return;
  auto* s = reinterpret_cast<std::atomic<std::uint32_t>*>(table_ + table_skew_ +
                                                          sizeof(std::uint32_t) * slot);
  s->store(slot_released, std::memory_order_release);
}

// --- memfds of one message -------------------------------------------------------------------

mapping::~mapping() {
  if (data_ != nullptr && size_ > 0) ::munmap(const_cast<std::byte*>(data_), size_);
}

result<std::unique_ptr<standalone_buffer>> standalone_buffer::create(std::size_t size) {
  auto fd = new_memfd("duplex-message", size);
  if (!fd) return std::unexpected(fd.error());
  std::unique_ptr<standalone_buffer> b(new (std::nothrow) standalone_buffer);
  if (!b) return fail_errno(ENOMEM);
  if (size > 0) {
    void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd->get(), 0);
    if (p == MAP_FAILED) return fail_errno(errno);
    // Not inherited by a fork in another thread: a child holding this writable mapping would make
    // F_SEAL_WRITE fail (EBUSY) until it exits or execs, and the send fall back to inline bytes.
    ::madvise(p, size, MADV_DONTFORK);
    b->data_ = static_cast<std::byte*>(p);
  }
  b->fd_ = std::move(*fd);
  b->size_ = size;
  return b;
}

standalone_buffer::~standalone_buffer() {
  if (data_ != nullptr) ::munmap(data_, size_);
}

result<unique_fd> standalone_buffer::seal() {
  if (data_ != nullptr) {
    ::munmap(data_, size_);  // F_SEAL_WRITE needs no writable mapping left
    data_ = nullptr;
  }
  if (::fcntl(fd_.get(), F_ADD_SEALS, F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) !=
      0) {
    return fail_errno(errno);
  }
  return std::move(fd_);
}

result<unique_fd> sealed_memfd(std::span<const const_buffer> parts, std::size_t total) {
  auto b = standalone_buffer::create(total);
  if (!b) return std::unexpected(b.error());
  copy_parts(parts, (*b)->bytes().data());
  return (*b)->seal();
}

result<std::shared_ptr<mapping>> map_sealed(int fd, std::uint64_t length, std::string& why) {
  const int seals = ::fcntl(fd, F_GET_SEALS);
  if (seals < 0) {
    why = "a memfd frame's fd is not a memfd";
    return fail(errc::protocol_error);
  }
  if ((seals & (F_SEAL_WRITE | F_SEAL_SHRINK)) != (F_SEAL_WRITE | F_SEAL_SHRINK)) {
    why = "a memfd frame's memfd is not sealed against writing and shrinking";
    return fail(errc::protocol_error);
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0 || static_cast<std::uint64_t>(st.st_size) < length) {
    why = "a memfd frame's memfd is smaller than its message";
    return fail(errc::protocol_error);
  }
  if (length == 0) return std::make_shared<mapping>(nullptr, std::size_t{0});
  void* p = ::mmap(nullptr, static_cast<std::size_t>(length), PROT_READ, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) return map_failed(errno, "cannot map a memfd frame: ", why);
  try {
    return std::make_shared<mapping>(static_cast<const std::byte*>(p),
                                     static_cast<std::size_t>(length));
  } catch (const std::bad_alloc&) {
    ::munmap(p, static_cast<std::size_t>(length));
    return fail_errno(ENOMEM);
  }
}

}  // namespace duplex::detail
