// What a peer's lengths make this end allocate (RELIABILITY class 6: "rejected before any
// allocation, memory flat"). This program replaces the global operator new and delete to record,
// on the thread that asks, the largest single request and the total requested while a test
// watches; the channel's own buffers, messages and decoders are all allocated through them. The
// other tests check the error codes; these check that a hostile length costs no memory on the
// way to its error, and that an honest one costs no more than its own size.
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <new>
#include <string>
#include <thread>
#include <vector>

#include "duplex/batch.hpp"
#include "duplex/channel.hpp"
#include "duplex/socket_pair.hpp"
#include "support.hpp"

namespace {

struct allocation_record {
  bool watching = false;
  std::size_t largest = 0;
  std::size_t total = 0;
};
thread_local allocation_record record;

// While not zero, every request of exactly this many bytes on this thread fails.
thread_local std::size_t refused_size = 0;

void* allocate(std::size_t n, std::size_t alignment = 0) noexcept {
  if (refused_size != 0 && n == refused_size) return nullptr;
  if (record.watching) {
    record.largest = std::max(record.largest, n);
    record.total += n;
  }
  if (n == 0) n = 1;
  if (alignment <= alignof(std::max_align_t)) return std::malloc(n);
  return std::aligned_alloc(alignment, (n + alignment - 1) / alignment * alignment);
}

void* allocate_or_throw(std::size_t n, std::size_t alignment = 0) {
  void* p = allocate(n, alignment);
  if (p == nullptr) throw std::bad_alloc();
  return p;
}

}  // namespace

// The replacements: every form of new ends in allocate(), every form of delete in free().
void* operator new(std::size_t n) { return allocate_or_throw(n); }
void* operator new[](std::size_t n) { return allocate_or_throw(n); }
void* operator new(std::size_t n, const std::nothrow_t&) noexcept { return allocate(n); }
void* operator new[](std::size_t n, const std::nothrow_t&) noexcept { return allocate(n); }
void* operator new(std::size_t n, std::align_val_t a) {
  return allocate_or_throw(n, static_cast<std::size_t>(a));
}
void* operator new[](std::size_t n, std::align_val_t a) {
  return allocate_or_throw(n, static_cast<std::size_t>(a));
}
void* operator new(std::size_t n, std::align_val_t a, const std::nothrow_t&) noexcept {
  return allocate(n, static_cast<std::size_t>(a));
}
void* operator new[](std::size_t n, std::align_val_t a, const std::nothrow_t&) noexcept {
  return allocate(n, static_cast<std::size_t>(a));
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, const std::nothrow_t&) noexcept { std::free(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { std::free(p); }

namespace duplex {
namespace {

using test::HasError;
using test::make_raw;
using test::Succeeded;

// Records this thread's allocations from construction to stop().
class watch {
 public:
  watch() { record = {true, 0, 0}; }
  ~watch() { record.watching = false; }
  watch(const watch&) = delete;
  watch& operator=(const watch&) = delete;
  const allocation_record& stop() {
    record.watching = false;
    return record;
  }
};

// Everything a receive may allocate whatever the peer says: the channel's receive buffer and a
// few small objects. Far below any length the tests below announce.
constexpr std::size_t receive_budget = (std::size_t{64} << 10) + (std::size_t{16} << 10);

std::vector<std::byte> native_header(std::uint64_t length) {
  const auto h = wire::encode_native({length, 0, 0});
  return {h.begin(), h.end()};
}

std::vector<std::byte> python_header(std::initializer_list<int> bytes) {
  std::vector<std::byte> out;
  for (int b : bytes)
    out.push_back(static_cast<std::byte>(b));
  return out;
}

class allocation_test : public test::fd_checked {};

// Lengths over the maximum, in every framing and kind: refused with nothing allocated for them.
TEST_F(allocation_test, LengthsOverTheMaximumAllocateNothingForThemselves) {
  struct hostile {
    std::string name;
    socket_kind kind;
    framing format;
    std::vector<std::byte> bytes;
  };
  const std::uint64_t max = default_max_message_size;
  const std::vector<hostile> cases = {
      {"native stream, maximum + 1", socket_kind::stream, framing::native, native_header(max + 1)},
      {"native stream, 2^32 - 1", socket_kind::stream, framing::native,
       native_header(0xffffffffULL)},
      {"native stream, 2^64 - 1", socket_kind::stream, framing::native, native_header(~0ULL)},
      {"seqpacket, 2^32 - 1", socket_kind::seqpacket, framing::native,
       native_header(0xffffffffULL)},
      {"seqpacket, 2^64 - 1", socket_kind::seqpacket, framing::native, native_header(~0ULL)},
      {"python, 2^31 - 1", socket_kind::stream, framing::python,
       python_header({0x7f, 0xff, 0xff, 0xff})},
      {"python, -1 then 2^64 - 1", socket_kind::stream, framing::python,
       python_header({0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff})},
      {"python, -2", socket_kind::stream, framing::python, python_header({0xff, 0xff, 0xff, 0xfe})},
      {"python, INT32_MIN", socket_kind::stream, framing::python,
       python_header({0x80, 0x00, 0x00, 0x00})},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    auto [ch, raw] = make_raw(c.kind, {.format = c.format});
    if (c.kind == socket_kind::stream) {
      ASSERT_THAT(raw.send_all(c.bytes), Succeeded());
    } else {
      ASSERT_THAT(raw.send(c.bytes), Succeeded());  // one packet
    }
    watch w;
    auto m = ch.receive();
    const auto seen = w.stop();
    EXPECT_FALSE(m.has_value());
    EXPECT_LE(seen.largest, receive_budget);
    EXPECT_LE(seen.total, receive_budget);
  }
}

// This process's resident set, in bytes (from /proc/self/statm).
std::size_t resident_bytes() {
  std::FILE* f = std::fopen("/proc/self/statm", "r");
  if (f == nullptr) return 0;
  unsigned long total = 0;
  unsigned long resident = 0;
  const int got = std::fscanf(f, "%lu %lu", &total, &resident);
  std::fclose(f);
  return got == 2 ? resident * static_cast<std::size_t>(::sysconf(_SC_PAGESIZE)) : 0;
}

// A length within the maximum whose bytes never come. The channel allocates the message when its
// header arrives (bounded by max_message_size, which the receiver chose), but without filling it:
// the pages are committed only as the peer's bytes land in them, so a 16-byte header announcing
// 64 MiB costs address space, not memory. Then the peer leaves: truncated_message.
TEST_F(allocation_test, AnHonestLengthWhoseBytesNeverComeCommitsNoMemory) {
  const std::size_t max = default_max_message_size;
  auto [ch, raw] = make_raw(socket_kind::stream);
  auto header = native_header(max);
  header.resize(header.size() + 16, std::byte{7});  // and a few bytes of the payload
  ASSERT_THAT(raw.send_all(header), Succeeded());
  const std::size_t before = resident_bytes();
  watch w;
  EXPECT_THAT(ch.try_receive(), HasError(errc::would_block));  // holds the message now
  const auto seen = w.stop();
  const std::size_t after = resident_bytes();
  EXPECT_LE(seen.largest, max + receive_budget);
  // Filling the buffer would commit all 64 MiB; a sanitizer's shadow of it is an eighth.
  EXPECT_LT(after - std::min(after, before), max / 4)
      << "resident set grew from " << before << " to " << after << " bytes";
  raw.close();
  EXPECT_THAT(ch.receive(), HasError(errc::truncated_message));
}

// The control: a real message is allocated once, at its size, so the record sees what it must.
TEST_F(allocation_test, AMessageCostsItsOwnSizeOnce) {
  for (const auto kind : {socket_kind::stream, socket_kind::seqpacket}) {
    const std::size_t size = kind == socket_kind::stream ? std::size_t{8} << 20 : 100000;
    auto pair = test::must(channel_pair(kind));
    const auto payload = test::pattern(size, 3);
    std::thread sender([&] { ASSERT_THAT(pair.first.send(payload), Succeeded()); });
    watch w;
    auto m = pair.second.receive();
    const auto seen = w.stop();
    sender.join();
    ASSERT_THAT(m, Succeeded());
    EXPECT_EQ(m->size(), size);
    EXPECT_GE(seen.largest, size);
    EXPECT_LE(seen.total, size + receive_budget);
  }
}

// A small message that cannot be allocated on receive (stream: the short path for buffered
// plain frames, then the long one; seqpacket: the packet's message). The receive says ENOMEM,
// that message is dropped, and the stream stays in step: the next one arrives whole.
TEST_F(allocation_test, AMessageThatCannotBeAllocatedIsReportedAndTheNextArrives) {
  for (const auto kind : {socket_kind::stream, socket_kind::seqpacket}) {
    auto pair = test::must(channel_pair(kind));
    constexpr std::size_t odd_size = 1237;  // no other allocation here asks for exactly this
    ASSERT_THAT(pair.first.send(test::pattern(odd_size, 1)), Succeeded());
    ASSERT_THAT(pair.first.send(test::pattern(9, 2)), Succeeded());
    refused_size = odd_size;
    auto first = pair.second.receive();
    refused_size = 0;
    EXPECT_THAT(first, HasError(test::sys(ENOMEM)));
    auto second = pair.second.receive();
    ASSERT_THAT(second, Succeeded());
    EXPECT_TRUE(test::same(second->bytes(), test::pattern(9, 2)));
  }
}

// A stream channel's receive buffer is allocated on its first read. If that allocation fails,
// every kind of receive says ENOMEM (never an exception out of a result-returning call), nothing
// is read, and once memory is there again every message arrives, in order.
TEST_F(allocation_test, AReceiveBufferThatCannotBeAllocatedIsENOMEMAndNothingIsLost) {
  constexpr std::size_t odd_size = 70001;  // no other allocation here asks for exactly this
  auto [a, b] = test::must(channel_pair(socket_kind::stream, {.receive_buffer_size = odd_size}));
  ASSERT_THAT(a.send(as_bytes("first")), Succeeded());
  ASSERT_THAT(a.send(as_bytes("second")), Succeeded());
  std::array<std::byte, 64> buf{};
  refused_size = odd_size;
  auto received = b.receive(std::chrono::seconds(10));
  auto tried = b.try_receive();
  auto into = b.receive_into(buf);
  std::size_t delivered = 0;
  auto batch =
      b.receive_batch([&](message_view&) { ++delivered; }, SIZE_MAX, std::chrono::seconds(10));
  auto value = b.receive_value<std::uint32_t>(std::chrono::seconds(10));
  refused_size = 0;
  const auto nomem = test::sys(ENOMEM);
  EXPECT_THAT(received, HasError(nomem));
  EXPECT_THAT(tried, HasError(nomem));
  EXPECT_THAT(into, HasError(nomem));
  EXPECT_THAT(batch, HasError(nomem));
  EXPECT_THAT(value, HasError(nomem));
  EXPECT_EQ(delivered, 0U);
  EXPECT_FALSE(b.is_broken());
  auto first = b.receive(std::chrono::seconds(10));
  ASSERT_THAT(first, Succeeded());
  EXPECT_EQ(first->text(), "first");
  auto second = b.receive(std::chrono::seconds(10));
  ASSERT_THAT(second, Succeeded());
  EXPECT_EQ(second->text(), "second");
}

// A batch that cannot grow says ENOMEM and is left as it was; it takes the message once memory
// is there again.
TEST_F(allocation_test, ABatchThatCannotGrowIsENOMEMAndUnchanged) {
  const auto body = test::pattern(5000, 3);
  batch out;
  refused_size = wire::native_header_size + body.size();  // an empty batch's first growth
  auto refused = out.add(body);
  refused_size = 0;
  EXPECT_THAT(refused, HasError(test::sys(ENOMEM)));
  EXPECT_TRUE(out.empty());
  EXPECT_EQ(out.wire_size(), 0U);
  ASSERT_THAT(out.add(body), Succeeded());
  auto [a, b] = test::must(channel_pair(socket_kind::stream));
  ASSERT_THAT(a.send(out), Succeeded());
  auto m = b.receive(std::chrono::seconds(10));
  ASSERT_THAT(m, Succeeded());
  EXPECT_TRUE(test::same(m->bytes(), body));
}

// Messages of up to message::inline_capacity bytes keep them inside the object: once the
// channel's receive buffer exists, sending and receiving them allocates nothing at all, on
// either kind of socket. One byte more, and each costs exactly one allocation of its size.
TEST_F(allocation_test, SmallMessagesAllocateNothingOnTheWayThrough) {
  for (const auto kind : {socket_kind::stream, socket_kind::seqpacket}) {
    auto pair = test::must(channel_pair(kind));
    const auto small = test::pattern(message::inline_capacity, 4);
    const auto large = test::pattern(message::inline_capacity + 1, 5);
    // The first message makes the receive buffer (stream) or spill area (seqpacket).
    ASSERT_THAT(pair.first.send(small), Succeeded());
    ASSERT_THAT(pair.second.receive(), Succeeded());
    {
      // Checked without matchers in the loop: gMock's allocate.
      watch w;
      for (int i = 0; i < 100; ++i) {
        ASSERT_TRUE(pair.first.try_send(small).has_value());
        auto m = pair.second.try_receive();
        ASSERT_TRUE(m.has_value());
        ASSERT_TRUE(test::same(m->bytes(), small));
      }
      const auto seen = w.stop();
      EXPECT_EQ(seen.total, 0U) << (kind == socket_kind::stream ? "stream" : "seqpacket");
    }
    watch w;
    ASSERT_TRUE(pair.first.try_send(large).has_value());
    auto m = pair.second.try_receive();
    const auto seen = w.stop();
    ASSERT_THAT(m, Succeeded());
    EXPECT_TRUE(test::same(m->bytes(), large));
    EXPECT_EQ(seen.largest, large.size());
  }
}

// A seqpacket receive sizes its message by the packet really there, never by the one before:
// after a large packet, a tiny one costs its own size, and a moment when the large size cannot
// be had (every request of exactly that size refused, as under a memory squeeze) delays no
// small message: each arrives at the first call.
TEST_F(allocation_test, APacketAfterALargeOneCostsItsOwnSize) {
  auto pair = test::must(channel_pair(socket_kind::seqpacket));
  constexpr std::size_t large_size = 150001;  // larger than a packet keeps resident, and odd
  const auto large = test::pattern(large_size, 6);
  for (int round = 0; round < 2; ++round) {
    ASSERT_THAT(pair.first.send(large), Succeeded());
    auto m = pair.second.receive();
    ASSERT_THAT(m, Succeeded());
    ASSERT_TRUE(test::same(m->bytes(), large));
  }
  const auto tiny = test::pattern(3, 7);
  const auto small = test::pattern(message::inline_capacity + 5, 8);
  ASSERT_THAT(pair.first.send(tiny), Succeeded());
  ASSERT_THAT(pair.first.send(small), Succeeded());
  refused_size = large_size;
  watch w;
  auto first = pair.second.try_receive();
  const auto seen_first = w.stop();
  auto second = pair.second.try_receive();
  refused_size = 0;
  ASSERT_THAT(first, Succeeded());
  EXPECT_TRUE(test::same(first->bytes(), tiny));
  EXPECT_EQ(seen_first.largest, 0U);  // a tiny message lives inside the object
  ASSERT_THAT(second, Succeeded());
  EXPECT_TRUE(test::same(second->bytes(), small));
  // A large packet that cannot be had is skipped (ENOMEM), and the next still arrives.
  ASSERT_THAT(pair.first.send(large), Succeeded());
  ASSERT_THAT(pair.second.receive(), Succeeded());  // the next receive looks for a large one
  ASSERT_THAT(pair.first.send(large), Succeeded());
  ASSERT_THAT(pair.first.send(tiny), Succeeded());
  refused_size = large_size;
  auto refused = pair.second.try_receive();
  auto after = pair.second.try_receive();
  refused_size = 0;
  EXPECT_THAT(refused, HasError(test::sys(ENOMEM)));
  ASSERT_THAT(after, Succeeded());
  EXPECT_TRUE(test::same(after->bytes(), tiny));
  EXPECT_FALSE(pair.second.is_broken());
}

// A message try_send must queue (the socket is full) whose queue entry cannot be allocated:
// ENOMEM, nothing of it queued, the channel not broken. Sent again once memory is there, it
// arrives once, after everything queued before it.
TEST_F(allocation_test, AMessageTheQueueCannotTakeIsENOMEMAndNotHalfQueued) {
  auto [a, b] = test::must(channel_pair(socket_kind::stream));
  const auto filler = test::pattern(std::size_t{64} << 10, 1);
  std::size_t fillers = 0;
  while (!a.wants_write()) {
    ASSERT_THAT(a.try_send(filler), Succeeded());
    ASSERT_LT(++fillers, 10000U);
  }
  const std::size_t queued = a.queued_bytes();
  constexpr std::size_t odd_size = 3001;  // no other allocation here asks for its frame's size
  const auto body = test::pattern(odd_size, 2);
  auto [pipe_read, pipe_write] = test::make_pipe();
  const std::array<int, 1> fd{pipe_read.get()};
  const std::size_t open_before = test::open_fd_count();
  refused_size = wire::native_header_size + odd_size;
  auto refused = a.try_send(body, fd);
  refused_size = 0;
  EXPECT_THAT(refused, HasError(test::sys(ENOMEM)));
  EXPECT_EQ(a.queued_bytes(), queued);
  EXPECT_EQ(test::open_fd_count(), open_before);  // the fd's queued duplicate is gone too
  EXPECT_FALSE(a.is_broken());
  ASSERT_THAT(a.try_send(body, fd), Succeeded());
  std::vector<message> got;
  std::thread reader([&b, &got] {
    for (;;) {
      auto m = b.receive(std::chrono::seconds(10));
      if (!m) return;
      const bool last = m->text() == "end";
      got.push_back(std::move(*m));
      if (last) return;
    }
  });
  const auto ended = a.send(as_bytes("end"));  // the queue goes first
  reader.join();
  ASSERT_THAT(ended, Succeeded());
  ASSERT_EQ(got.size(), fillers + 2);
  for (std::size_t i = 0; i < fillers; ++i)
    EXPECT_TRUE(test::same(got[i].bytes(), filler)) << i;
  EXPECT_TRUE(test::same(got[fillers].bytes(), body));
  EXPECT_EQ(got[fillers].fds().size(), 1U);
  EXPECT_EQ(got[fillers + 1].text(), "end");
}

// A message with more fds than a frame may carry is refused (too_many_fds) without an
// allocation for its fds' numbers: one that could not be had changes nothing.
TEST_F(allocation_test, TooManyFdsAreRefusedWithoutAnAllocation) {
  auto [a, b] = test::must(channel_pair(socket_kind::stream));
  auto [pipe_read, pipe_write] = test::make_pipe();
  std::vector<unique_fd> fds;
  for (std::size_t i = 0; i <= max_fds_per_message; ++i)
    fds.push_back(test::must(duplicate(pipe_read.get())));
  const message m(as_bytes("x"), std::move(fds));
  refused_size = (max_fds_per_message + 1) * sizeof(int);
  auto sent = a.send(m);
  auto tried = a.try_send(m);
  refused_size = 0;
  EXPECT_THAT(sent, HasError(errc::too_many_fds));
  EXPECT_THAT(tried, HasError(errc::too_many_fds));
  ASSERT_THAT(a.send(as_bytes("next")), Succeeded());
  auto next = b.receive(std::chrono::seconds(10));
  ASSERT_THAT(next, Succeeded());
  EXPECT_EQ(next->text(), "next");
}

// A message too large for the pool goes in a memfd of its own, with the caller's fds beside it:
// that needs no allocation of theirs. And when the pool's shared_ptr cannot be had, the send
// goes another way and allocate() says ENOMEM or gives a memfd of its own: never an exception.
TEST_F(allocation_test, SharedMemorySendsNeedNoAllocationThatCanEscape) {
  channel_options o;
  o.shared_memory.enabled = true;
  o.shared_memory.threshold = 1024;
  o.shared_memory.pool_size = 4096;
  auto [a, b] = test::must(channel_pair(socket_kind::stream, o));
  auto [pipe_read, pipe_write] = test::make_pipe();
  const auto big = test::pattern(100000, 3);
#if defined(__GLIBCXX__)
  // The control block of a shared_ptr made from a raw pointer (its size does not depend on the
  // type): the pool's, made on the first shared-memory send or allocate().
  refused_size = sizeof(std::_Sp_counted_ptr<int*, __gnu_cxx::_S_atomic>);
  auto allocated = a.allocate(100);
  auto first = a.send(big);
  refused_size = 0;
  if (!allocated) {
    EXPECT_THAT(allocated, HasError(test::sys(ENOMEM)));
  }
  ASSERT_THAT(first, Succeeded());
  auto got = b.receive(std::chrono::seconds(10));
  ASSERT_THAT(got, Succeeded());
  EXPECT_TRUE(test::same(got->bytes(), big));
#endif
  constexpr std::size_t many = 37;  // 38 fds with the memfd: an odd size for their numbers
  std::vector<int> fds(many, pipe_read.get());
  ASSERT_THAT(a.send(as_bytes("pool")), Succeeded());  // the pool exists, whatever came before
  ASSERT_THAT(b.receive(std::chrono::seconds(10)), Succeeded());
  refused_size = (many + 1) * sizeof(int);
  auto sent = a.send(big, fds);
  refused_size = 0;
  ASSERT_THAT(sent, Succeeded());
  auto m = b.receive(std::chrono::seconds(10));
  ASSERT_THAT(m, Succeeded());
  EXPECT_TRUE(test::same(m->bytes(), big));
  EXPECT_EQ(m->fds().size(), many);
}

// The fds that arrive with a stream read are kept with room set aside before the read: a
// moment when memory of their size cannot be had loses nothing and breaks nothing, and the
// message arrives whole at the first receive.
TEST_F(allocation_test, FdsArrivingOnAStreamNeedNoAllocationOnceRead) {
  auto [a, b] = test::must(channel_pair(socket_kind::stream));
  auto [pipe_read, pipe_write] = test::make_pipe();
  constexpr std::size_t many = 37;  // an odd size for their record
  std::vector<int> fds(many, pipe_read.get());
  ASSERT_THAT(a.send(as_bytes("with fds"), fds), Succeeded());
  ASSERT_THAT(a.send(as_bytes("after")), Succeeded());
  refused_size = many * sizeof(unique_fd);
  auto m = b.receive(std::chrono::seconds(10));
  refused_size = 0;
  ASSERT_THAT(m, Succeeded());
  EXPECT_EQ(m->text(), "with fds");
  EXPECT_EQ(m->fds().size(), many);
  EXPECT_FALSE(b.is_broken());
  auto after = b.receive(std::chrono::seconds(10));
  ASSERT_THAT(after, Succeeded());
  EXPECT_EQ(after->text(), "after");
}

}  // namespace
}  // namespace duplex
