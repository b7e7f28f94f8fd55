#include "duplex/fd.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <string>
#include <type_traits>

#include "support.hpp"

namespace duplex {
namespace {

using test::fd_is_cloexec;
using test::fd_is_open;
using test::HasError;
using test::Succeeded;

class unique_fd_test : public test::fd_checked {};

int make_pipe_end() {
  int p[2];
  if (::pipe2(p, O_CLOEXEC) != 0) return -1;
  ::close(p[1]);
  return p[0];
}

static_assert(!std::is_copy_constructible_v<unique_fd>);
static_assert(!std::is_copy_assignable_v<unique_fd>);
static_assert(std::is_nothrow_move_constructible_v<unique_fd>);
static_assert(std::is_nothrow_move_assignable_v<unique_fd>);
static_assert(std::is_nothrow_destructible_v<unique_fd>);
static_assert(!std::is_convertible_v<int, unique_fd>, "owning an fd is never implicit");
static_assert(!std::is_convertible_v<unique_fd, int>, "no implicit conversion to int");
static_assert(!std::is_convertible_v<unique_fd, bool>, "no implicit conversion to bool");

TEST_F(unique_fd_test, DefaultIsEmpty) {
  unique_fd fd;
  EXPECT_FALSE(fd.valid());
  EXPECT_EQ(fd.get(), -1);
}

TEST_F(unique_fd_test, NegativeValuesAreEmpty) {
  unique_fd fd(-7);
  EXPECT_FALSE(fd.valid());
  EXPECT_EQ(fd.get(), -1);
}

TEST_F(unique_fd_test, DestructorCloses) {
  const int raw = make_pipe_end();
  ASSERT_GE(raw, 0);
  {
    unique_fd fd(raw);
    EXPECT_TRUE(fd_is_open(raw));
  }
  EXPECT_FALSE(fd_is_open(raw));
}

TEST_F(unique_fd_test, MovedFromOwnerDoesNotClose) {
  const int raw = make_pipe_end();
  unique_fd b;
  {
    unique_fd a(raw);
    b = std::move(a);
    EXPECT_FALSE(a.valid());  // NOLINT(bugprone-use-after-move): moved-from state is specified
  }
  EXPECT_TRUE(fd_is_open(raw));
  EXPECT_EQ(b.get(), raw);
  b.reset();
  EXPECT_FALSE(fd_is_open(raw));
}

TEST_F(unique_fd_test, MoveAssignmentClosesThePreviousFd) {
  const int first = make_pipe_end();
  const int second = make_pipe_end();
  unique_fd a(first);
  unique_fd b(second);
  a = std::move(b);
  EXPECT_FALSE(fd_is_open(first));
  EXPECT_TRUE(fd_is_open(second));
  EXPECT_EQ(a.get(), second);
}

TEST_F(unique_fd_test, SelfMoveKeepsTheFd) {
  const int raw = make_pipe_end();
  unique_fd a(raw);
  unique_fd& alias = a;
  a = std::move(alias);
  EXPECT_EQ(a.get(), raw);
  EXPECT_TRUE(fd_is_open(raw));
}

TEST_F(unique_fd_test, ReleaseHandsOwnershipBack) {
  const int raw = make_pipe_end();
  int released = -1;
  {
    unique_fd fd(raw);
    released = fd.release();
    EXPECT_FALSE(fd.valid());
  }
  EXPECT_EQ(released, raw);
  EXPECT_TRUE(fd_is_open(raw));
  ::close(raw);
}

TEST_F(unique_fd_test, ResetClosesAndAdopts) {
  const int first = make_pipe_end();
  const int second = make_pipe_end();
  unique_fd fd(first);
  fd.reset(second);
  EXPECT_FALSE(fd_is_open(first));
  EXPECT_EQ(fd.get(), second);
  fd.reset(second);  // resetting to the fd already held keeps it open
  EXPECT_TRUE(fd_is_open(second));
  fd.reset();
  EXPECT_FALSE(fd_is_open(second));
}

TEST_F(unique_fd_test, SwapExchanges) {
  const int first = make_pipe_end();
  const int second = make_pipe_end();
  unique_fd a(first);
  unique_fd b(second);
  swap(a, b);
  EXPECT_EQ(a.get(), second);
  EXPECT_EQ(b.get(), first);
}

TEST_F(unique_fd_test, DuplicateIsCloseOnExec) {
  const int raw = make_pipe_end();
  unique_fd fd(raw);
  auto copy = duplicate(fd.get());
  ASSERT_THAT(copy, Succeeded());
  EXPECT_NE(copy->get(), raw);
  EXPECT_TRUE(fd_is_cloexec(copy->get()));
}

// The fd accounting every fixture relies on must itself catch each kind of change, including a
// leak that a closed fd offsets (same count, different files).
TEST_F(unique_fd_test, FdAccountingNamesLeakedClosedAndReplacedFds) {
  auto [r, w] = test::make_pipe();
  const auto before = test::open_files();
  EXPECT_EQ(test::fd_changes(before, test::open_files()), "");

  const int leaked = make_pipe_end();
  const std::string leak = test::fd_changes(before, test::open_files());
  EXPECT_THAT(leak, testing::HasSubstr("fd " + std::to_string(leaked) + " was left open"));

  // Closing the write end offsets the leak in a count of fds; the identities still differ.
  const int write_end = w.get();
  w.reset();
  const std::string offset = test::fd_changes(before, test::open_files());
  EXPECT_THAT(offset, testing::HasSubstr("fd " + std::to_string(write_end) + " was closed"));
  EXPECT_THAT(offset, testing::HasSubstr("fd " + std::to_string(leaked) + " was left open"));

  // The same number, now another file.
  ::close(leaked);
  const int other = make_pipe_end();
  ASSERT_EQ(::dup2(other, r.get()), r.get());
  ::close(other);
  EXPECT_THAT(test::fd_changes(before, test::open_files()),
              testing::HasSubstr("fd " + std::to_string(r.get()) + " now refers to another file"));
}

TEST_F(unique_fd_test, DuplicateOfAClosedFdIsEbadf) {
  EXPECT_THAT(duplicate(-1), HasError(test::sys(EBADF)));
}

}  // namespace
}  // namespace duplex
