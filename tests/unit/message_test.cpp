#include "duplex/message.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <cstring>
#include <memory>
#include <span>
#include <type_traits>
#include <utility>
#include <vector>

#include "support.hpp"

namespace duplex {
namespace {

class message_test : public test::fd_checked {};

static_assert(!std::is_copy_constructible_v<message>);
static_assert(std::is_nothrow_move_constructible_v<message>);
static_assert(std::is_nothrow_move_assignable_v<message>);

// The sizes on either side of the switch from bytes inside the object to a heap block.
constexpr std::size_t sizes[] = {
    0,   1, message::inline_capacity - 1, message::inline_capacity, message::inline_capacity + 1,
    4096};

std::vector<unique_fd> one_fd() {
  int p[2];
  if (::pipe2(p, O_CLOEXEC) != 0) return {};
  ::close(p[1]);
  std::vector<unique_fd> fds;
  fds.emplace_back(p[0]);
  return fds;
}

// Bytes and fds stay whole through move construction and through move assignment onto a message
// of every other size (inline onto heap, heap onto inline, and alike onto alike).
TEST_F(message_test, BytesAndFdsSurviveEveryMoveAroundTheInlineCapacity) {
  for (const std::size_t size : sizes) {
    for (const std::size_t other : sizes) {
      const auto bytes = test::pattern(size, static_cast<unsigned>(size));
      message m(bytes, one_fd());
      ASSERT_EQ(m.fds().size(), 1U);
      const int fd = m.fds()[0].get();
      message moved(std::move(m));
      message target(test::pattern(other, 99));
      target = std::move(moved);
      EXPECT_EQ(target.size(), size);
      EXPECT_TRUE(test::same(std::as_const(target).bytes(), bytes)) << size << " onto " << other;
      ASSERT_EQ(target.fds().size(), 1U);
      EXPECT_EQ(target.fds()[0].get(), fd);
    }
  }
}

// assign() makes a message a copy of other bytes, whatever it held before (inline or heap bytes,
// fds, a view), and a copy of a part of its own bytes too. The fds it held are closed.
TEST_F(message_test, AssignCopiesBytesOverWhateverTheMessageHeld) {
  for (const std::size_t size : sizes) {
    for (const std::size_t before : sizes) {
      const auto bytes = test::pattern(size, 11);
      message m(test::pattern(before, 12), one_fd());
      const int fd = m.fds()[0].get();
      m.assign(bytes);
      EXPECT_TRUE(test::same(std::as_const(m).bytes(), bytes)) << before << " to " << size;
      EXPECT_TRUE(m.fds().empty());
      EXPECT_EQ(::fcntl(fd, F_GETFD), -1) << "the fd it held is closed";
    }
    // Its own bytes, whole and in part (the tail moves to the front).
    message own(test::pattern(size, 13));
    own.assign(std::as_const(own).bytes());
    EXPECT_TRUE(test::same(std::as_const(own).bytes(), test::pattern(size, 13))) << size;
    if (size > 1) {
      const auto whole = test::pattern(size, 14);
      message tail(whole);
      tail.assign(std::as_const(tail).bytes().subspan(1));
      EXPECT_TRUE(test::same(std::as_const(tail).bytes(), std::span(whole).subspan(1))) << size;
    }
    // Over a view: the view's memory is let go, the copy is the message's own.
    auto shown = std::make_shared<std::vector<std::byte>>(test::pattern(64, 15));
    message v = message::view(shown->data(), shown->size(), shown);
    std::weak_ptr<std::vector<std::byte>> alive = shown;
    shown.reset();
    v.assign(test::pattern(size, 16));
    EXPECT_FALSE(v.is_view());
    EXPECT_TRUE(alive.expired());
    EXPECT_TRUE(test::same(std::as_const(v).bytes(), test::pattern(size, 16)));
  }
}

// with_size gives writable bytes of exactly that size, wherever they live, and a copy made from
// them is independent of them.
TEST_F(message_test, WithSizeGivesWritableBytesOfThatSize) {
  for (const std::size_t size : sizes) {
    message m = message::with_size(size);
    ASSERT_EQ(m.bytes().size(), size);
    const auto bytes = test::pattern(size, 7);
    if (size > 0) std::memcpy(m.bytes().data(), bytes.data(), size);
    message copy(std::as_const(m).bytes());
    if (size > 0) m.bytes()[0] = ~m.bytes()[0];
    EXPECT_TRUE(test::same(std::as_const(copy).bytes(), bytes)) << size;
  }
}

// A view made writable copies its bytes out (into the object itself when they fit) and lets go of
// the memory it viewed at once.
TEST_F(message_test, AViewMadeWritableCopiesOutAndReleasesWhatItViewed) {
  for (const std::size_t size : sizes) {
    auto shown = std::make_shared<std::vector<std::byte>>(test::pattern(size, 3));
    bool released = false;
    std::shared_ptr<const void> keeper(shown.get(), [&released, shown](const void*) mutable {
      released = true;
      shown.reset();
    });
    std::weak_ptr<std::vector<std::byte>> alive = shown;
    message m = message::view(shown->data(), size, std::move(keeper));
    shown.reset();
    ASSERT_TRUE(m.is_view());
    EXPECT_FALSE(released);
    const std::span<std::byte> writable = m.bytes();
    EXPECT_FALSE(m.is_view());
    EXPECT_TRUE(released) << size;
    EXPECT_TRUE(alive.expired());
    EXPECT_TRUE(test::same(writable, test::pattern(size, 3))) << size;
  }
}

}  // namespace
}  // namespace duplex
