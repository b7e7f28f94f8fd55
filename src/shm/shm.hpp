// Internal: shared memory for large payloads.
//
// A pool is one memfd laid out as [header page][slot table][data region]. Its sender writes a
// payload into a block of the data region and sends a small frame naming the block's slot,
// offset and length; the receiver maps the pool (the data read-only, the slot table read-write),
// copies the payload out or shows it in place, and marks the slot released when done. The sender
// reuses a block once its slot says released. Each end's pool is its own outgoing pool: nothing
// a receiver writes can make the sender read or write out of bounds (the sender trusts only its
// own bookkeeping), and a receiver maps only a sealed-against-shrinking memfd of the announced
// size, after checking every offset against it, so a sender cannot make it fault.
//
// A payload that does not fit the pool travels in a memfd of its own, sealed against writing,
// growing and shrinking: the receiver can show it in place safely, whoever sent it.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>

#include "duplex/buffer.hpp"
#include "duplex/error.hpp"
#include "duplex/fd.hpp"
#include "duplex/framing.hpp"

namespace duplex::detail {

// Where the parts of a pool are.
struct pool_layout {
  std::size_t slots_offset = 0;
  std::size_t data_offset = 0;
  std::size_t total = 0;
  [[nodiscard]] static pool_layout of(std::uint64_t data_size, std::uint32_t slots) noexcept;
};

// Slot states, in the slot table.
inline constexpr std::uint32_t slot_free = 0;
inline constexpr std::uint32_t slot_in_use = 1;
inline constexpr std::uint32_t slot_released = 2;

// The largest slot table and pool a receiver accepts, whatever its own limit says.
inline constexpr std::uint32_t max_pool_slots = 65536;

// The sender's pool. Thread-safe (its own lock).
class pool_tx {
 public:
  struct block {
    std::uint32_t slot = 0;
    std::uint64_t offset = 0;
    std::uint64_t length = 0;
    std::byte* data = nullptr;
  };

  // Creates the memfd (close-on-exec, sealed against shrinking and growing) and maps it.
  [[nodiscard]] static result<std::shared_ptr<pool_tx>> create(std::size_t data_size,
                                                               std::uint32_t slots);
  ~pool_tx();
  pool_tx(const pool_tx&) = delete;
  pool_tx& operator=(const pool_tx&) = delete;

  [[nodiscard]] int fd() const noexcept { return fd_.get(); }
  [[nodiscard]] wire::pool_announce announce() const noexcept { return {data_size_, slots_}; }

  // A block of n bytes whose slot is marked in use, or nullopt if the pool has no room (after
  // taking back every block the receiver released) or no memory can be had to record the block
  // (the pool is then unchanged). Never throws bad_alloc.
  [[nodiscard]] std::optional<block> allocate(std::size_t n);

  // Gives back a block that will never be sent.
  void discard(const block& b) noexcept;

 private:
  pool_tx() = default;
  void reclaim();
  [[nodiscard]] std::atomic<std::uint32_t>& state(std::uint32_t slot) const noexcept;

  std::mutex mutex_;
  unique_fd fd_;
  std::byte* base_ = nullptr;
  pool_layout layout_{};
  std::uint64_t data_size_ = 0;
  std::uint32_t slots_ = 0;
  // The ring: blocks in allocation order; free space is after the newest and before the oldest.
  struct live {
    std::uint32_t slot;
    std::uint64_t offset;
    std::uint64_t length;
  };
  std::deque<live> live_;
  std::uint64_t head_ = 0;  // end of the newest block
  std::uint32_t next_slot_ = 0;
};

// The receiver's mapping of the peer's pool. Thread-safe.
class pool_rx {
 public:
  // Checks and maps the peer's pool memfd: a memfd sealed against shrinking, exactly as large as
  // the announce says, within max_bytes. Errors: errc::protocol_error (with why said) for what
  // the peer sent; ENOMEM, EAGAIN or ENFILE when this process lacks the memory, address space or
  // mappings (vm.max_map_count) to map it: a local limit, not the peer's fault.
  [[nodiscard]] static result<std::shared_ptr<pool_rx>> map(unique_fd fd,
                                                            const wire::pool_announce& a,
                                                            std::size_t max_bytes,
                                                            std::string& why);
  ~pool_rx();
  pool_rx(const pool_rx&) = delete;
  pool_rx& operator=(const pool_rx&) = delete;

  // The bytes a reference names, checked against the pool's bounds; nullopt if out of bounds.
  [[nodiscard]] std::optional<const_buffer> locate(const wire::shared_ref& r) const noexcept;

  // Tells the sender the slot's block may be reused.
  void release(std::uint32_t slot) noexcept;

 private:
  pool_rx() = default;
  unique_fd fd_;
  const std::byte* data_ = nullptr;  // read-only mapping of the whole pool
  std::byte* table_ = nullptr;       // read-write mapping of the slot table's pages
  std::size_t table_map_size_ = 0;
  std::size_t table_skew_ = 0;  // slot table offset within its first mapped page
  pool_layout layout_{};
  std::uint64_t data_size_ = 0;
  std::uint32_t slots_ = 0;
};

// A read-only mapping that unmaps itself.
class mapping {
 public:
  mapping(const std::byte* data, std::size_t size) noexcept : data_(data), size_(size) {}
  ~mapping();
  mapping(const mapping&) = delete;
  mapping& operator=(const mapping&) = delete;
  [[nodiscard]] const std::byte* data() const noexcept { return data_; }

 private:
  const std::byte* data_;
  std::size_t size_;
};

// A writable memfd of its own for one message (allocate() when the pool has no room).
class standalone_buffer {
 public:
  [[nodiscard]] static result<std::unique_ptr<standalone_buffer>> create(std::size_t size);
  ~standalone_buffer();
  standalone_buffer(const standalone_buffer&) = delete;
  standalone_buffer& operator=(const standalone_buffer&) = delete;
  [[nodiscard]] std::span<std::byte> bytes() noexcept { return {data_, size_}; }
  // Unmaps it and seals the memfd against writing, growing and shrinking; returns the memfd.
  [[nodiscard]] result<unique_fd> seal();

 private:
  standalone_buffer() = default;
  unique_fd fd_;
  std::byte* data_ = nullptr;
  std::size_t size_ = 0;
};

// A sealed memfd holding the concatenation of parts.
[[nodiscard]] result<unique_fd> sealed_memfd(std::span<const const_buffer> parts,
                                             std::size_t total);

// Maps a received memfd of one message read-only, after checking that it is sealed against
// writing and shrinking and holds at least length bytes. Errors: errc::protocol_error (with why
// said) for what the peer sent; ENOMEM, EAGAIN or ENFILE for a local limit (address space,
// vm.max_map_count), as pool_rx::map.
[[nodiscard]] result<std::shared_ptr<mapping>> map_sealed(int fd, std::uint64_t length,
                                                          std::string& why);

}  // namespace duplex::detail
