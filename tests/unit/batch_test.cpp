// Batches: many messages per syscall out, many per read in, with no allocation for messages
// already buffered.
#include "duplex/batch.hpp"

#include <thread>
#include <vector>

#include "duplex/channel.hpp"
#include "duplex/socket_pair.hpp"
#include "support.hpp"

namespace duplex {
namespace {

using namespace std::chrono_literals;
using test::HasError;
using test::pattern;
using test::same;
using test::Succeeded;
using test::sys;

class batch_test : public test::kind_test {};

INSTANTIATE_TEST_SUITE_P(kinds, batch_test,
                         ::testing::Values(socket_kind::stream, socket_kind::seqpacket),
                         test::kind_name);

TEST_P(batch_test, ABatchArrivesWholeAndInOrder) {
  auto [a, b] = test::must(channel_pair(GetParam()));
  batch out;
  constexpr int count = 1000;
  for (int i = 0; i < count; ++i) {
    ASSERT_THAT(out.add(pattern(static_cast<std::size_t>(i % 301), static_cast<unsigned>(i))),
                Succeeded());
  }
  EXPECT_EQ(out.size(), static_cast<std::size_t>(count));
  std::thread sender([&a, &out] { EXPECT_THAT(a.send(out), Succeeded()); });
  int seen = 0;
  while (seen < count) {
    auto n = b.receive_batch(
        [&seen](message_view& m) {
          EXPECT_TRUE(same(
              m.bytes, pattern(static_cast<std::size_t>(seen % 301), static_cast<unsigned>(seen))))
              << seen;
          ++seen;
        },
        SIZE_MAX, 30s);
    ASSERT_THAT(n, Succeeded());
    EXPECT_GT(*n, 0U);
  }
  sender.join();
  EXPECT_EQ(seen, count);
  EXPECT_THAT(b.try_receive_batch([](message_view&) {}), HasError(errc::would_block));
}

TEST_P(batch_test, FdsTravelWithTheirMessagesInsideABatch) {
  auto [a, b] = test::must(channel_pair(GetParam()));
  auto [read_end, write_end] = test::make_pipe();
  const ino_t inode = test::inode_of(read_end.get());
  batch out;
  const std::array<int, 2> two{read_end.get(), write_end.get()};
  const std::array<int, 1> one{read_end.get()};
  ASSERT_THAT(out.add(as_bytes("none")), Succeeded());
  ASSERT_THAT(out.add(as_bytes("two fds"), two), Succeeded());
  ASSERT_THAT(out.add(as_bytes("none again")), Succeeded());
  ASSERT_THAT(out.add(as_bytes("one fd"), one), Succeeded());
  ASSERT_THAT(out.add(as_bytes("last")), Succeeded());
  ASSERT_THAT(a.send(out), Succeeded());
  std::vector<std::pair<std::string, std::size_t>> got;
  std::vector<unique_fd> kept;
  while (got.size() < 5) {
    auto n = b.receive_batch(
        [&](message_view& m) {
          got.emplace_back(std::string(m.text()), m.fds.size());
          for (auto& fd : m.fds) {
            EXPECT_EQ(test::inode_of(fd.get()), inode);
            kept.push_back(std::move(fd));  // taken: stays open
          }
        },
        SIZE_MAX, 10s);
    ASSERT_THAT(n, Succeeded());
  }
  const std::vector<std::pair<std::string, std::size_t>> expected = {
      {"none", 0}, {"two fds", 2}, {"none again", 0}, {"one fd", 1}, {"last", 0}};
  EXPECT_EQ(got, expected);
  EXPECT_EQ(kept.size(), 3U);
  for (const auto& fd : kept)
    EXPECT_TRUE(test::fd_is_cloexec(fd.get()));
}

TEST_P(batch_test, FdsNotTakenInTheCallbackAreClosed) {
  auto [a, b] = test::must(channel_pair(GetParam()));
  auto [read_end, write_end] = test::make_pipe();
  const std::array<int, 2> two{read_end.get(), write_end.get()};
  ASSERT_THAT(a.send(as_bytes("with fds"), two), Succeeded());
  const std::size_t before = test::open_fd_count();
  auto n = b.receive_batch([](message_view& m) { EXPECT_EQ(m.fds.size(), 2U); }, SIZE_MAX, 10s);
  ASSERT_THAT(n, ::testing::Optional(1U));
  EXPECT_EQ(test::open_fd_count(), before);
}

TEST_P(batch_test, MaxLimitsHowManyAreDeliveredAndTheRestWait) {
  auto [a, b] = test::must(channel_pair(GetParam()));
  batch out;
  for (int i = 0; i < 10; ++i)
    ASSERT_THAT(out.add(as_bytes(std::to_string(i))), Succeeded());
  ASSERT_THAT(a.send(out), Succeeded());
  std::string seen;
  auto first = b.receive_batch([&seen](message_view& m) { seen += m.text(); }, 3, 10s);
  EXPECT_THAT(first, ::testing::Optional(3U));
  EXPECT_EQ(seen, "012");
  EXPECT_EQ(b.receive()->text(), "3");  // the ordinary calls see the same stream
  while (seen.size() < 9) {
    ASSERT_THAT(b.receive_batch([&seen](message_view& m) { seen += m.text(); }, SIZE_MAX, 10s),
                Succeeded());
  }
  EXPECT_EQ(seen, "012456789");
}

TEST_P(batch_test, LargeMessagesAmongSmallOnes) {
  auto [a, b] = test::must(channel_pair(GetParam()));
  const std::size_t big = GetParam() == socket_kind::stream ? (4U << 20) : 100000;
  batch out;
  ASSERT_THAT(out.add(as_bytes("small")), Succeeded());
  ASSERT_THAT(out.add(pattern(big, 9)), Succeeded());
  ASSERT_THAT(out.add(as_bytes("small again")), Succeeded());
  std::thread sender([&a, &out] { EXPECT_THAT(a.send(out), Succeeded()); });
  std::vector<std::size_t> sizes;
  while (sizes.size() < 3) {
    ASSERT_THAT(b.receive_batch(
                    [&](message_view& m) {
                      if (m.bytes.size() == big) {
                        EXPECT_TRUE(same(m.bytes, pattern(big, 9)));
                      }
                      sizes.push_back(m.bytes.size());
                    },
                    SIZE_MAX, 30s),
                Succeeded());
  }
  sender.join();
  EXPECT_EQ(sizes, (std::vector<std::size_t>{5, big, 11}));
}

TEST_F(batch_test, ABatchIsForOneFramingAndChecksLimits) {
  auto [a, b] = test::must(channel_pair(socket_kind::stream, {.max_message_size = 100}));
  batch python(framing::python);
  ASSERT_THAT(python.add(as_bytes("x")), Succeeded());
  EXPECT_THAT(a.send(python), HasError(sys(EINVAL)));
  auto [read_end, write_end] = test::make_pipe();
  const std::array<int, 1> fd{read_end.get()};
  EXPECT_THAT(python.add(as_bytes("x"), fd), HasError(errc::not_supported));
  std::vector<int> too_many(max_fds_per_message + 1, read_end.get());
  batch native;
  EXPECT_THAT(native.add(as_bytes("x"), too_many), HasError(errc::too_many_fds));
  ASSERT_THAT(native.add(pattern(101, 1)), Succeeded());
  EXPECT_THAT(a.send(native), HasError(errc::message_too_large));
  EXPECT_THAT(b.try_receive(), HasError(errc::would_block));  // nothing was sent
  native.clear();
  EXPECT_TRUE(native.empty());
  EXPECT_THAT(a.send(native), Succeeded());  // an empty batch sends nothing
}

TEST_F(batch_test, PythonFramedBatches) {
  auto [a, b] = test::must(channel_pair(socket_kind::stream, {.format = framing::python}));
  batch out(framing::python);
  for (const char* text : {"alpha", "", "gamma"})
    ASSERT_THAT(out.add(as_bytes(text)), Succeeded());
  ASSERT_THAT(a.send(out), Succeeded());
  std::vector<std::string> got;
  while (got.size() < 3) {
    ASSERT_THAT(
        b.receive_batch([&](message_view& m) { got.emplace_back(m.text()); }, SIZE_MAX, 10s),
        Succeeded());
  }
  EXPECT_EQ(got, (std::vector<std::string>{"alpha", "", "gamma"}));
}

TEST_F(batch_test, AProtocolErrorComesAfterTheMessagesBeforeIt) {
  auto pair = test::must(socket_pair(socket_kind::stream));
  auto ch = test::must(channel::create(std::move(pair.first)));
  batch good;
  ASSERT_THAT(good.add(as_bytes("one")), Succeeded());
  ASSERT_THAT(good.add(as_bytes("two")), Succeeded());
  auto raw = test::must(channel::create(std::move(pair.second)));
  ASSERT_THAT(raw.send(good), Succeeded());
  // Then garbage, written under the channel's feet.
  ASSERT_EQ(::write(raw.native_handle(), "garbage garbage!", 16), 16);
  std::vector<std::string> got;
  auto n = ch.receive_batch([&](message_view& m) { got.emplace_back(m.text()); }, SIZE_MAX, 10s);
  if (n) {  // the two good ones may come in a call of their own
    n = ch.receive_batch([&](message_view& m) { got.emplace_back(m.text()); }, SIZE_MAX, 10s);
  }
  EXPECT_THAT(n, HasError(errc::protocol_error));
  EXPECT_EQ(got, (std::vector<std::string>{"one", "two"}));
  EXPECT_THAT(ch.receive_batch([](message_view&) {}), HasError(errc::broken));
}

}  // namespace
}  // namespace duplex
