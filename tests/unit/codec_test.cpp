#include "duplex/codec.hpp"

#include <cstdint>
#include <string>
#include <vector>

#include "duplex/channel.hpp"
#include "support.hpp"

namespace duplex {
namespace {

using test::HasError;
using test::Succeeded;

struct point {
  std::int32_t x;
  std::int32_t y;
  double weight;
};

static_assert(has_codec<point>);
static_assert(has_codec<std::string>);
static_assert(has_codec<std::vector<std::uint64_t>>);
static_assert(!has_codec<int*>, "pointers never cross a process boundary as values");
static_assert(!has_codec<std::vector<std::string>>, "no built-in codec for this");

class codec_test : public test::fd_checked {};

TEST_F(codec_test, ValuesRoundTripThroughAChannel) {
  auto ends = channel_pair(socket_kind::seqpacket);
  ASSERT_THAT(ends, Succeeded());
  auto& [a, b] = *ends;
  ASSERT_THAT(a.send_value(point{3, -4, 0.5}), Succeeded());
  ASSERT_THAT(a.send_value(std::string("text")), Succeeded());
  ASSERT_THAT(a.send_value(std::vector<std::uint64_t>{1, 2, 3}), Succeeded());
  ASSERT_THAT(a.send_value(std::vector<std::uint64_t>{}), Succeeded());
  auto p = b.receive_value<point>();
  ASSERT_THAT(p, Succeeded());
  EXPECT_EQ(p->x, 3);
  EXPECT_EQ(p->y, -4);
  EXPECT_EQ(p->weight, 0.5);
  EXPECT_EQ(b.receive_value<std::string>().value(), "text");
  EXPECT_EQ(b.receive_value<std::vector<std::uint64_t>>().value(),
            (std::vector<std::uint64_t>{1, 2, 3}));
  EXPECT_TRUE(b.receive_value<std::vector<std::uint64_t>>().value().empty());
}

TEST_F(codec_test, WrongSizesAreProtocolErrors) {
  const std::vector<std::byte> seven(7);
  EXPECT_THAT(codec<point>::decode(seven), HasError(errc::protocol_error));
  EXPECT_THAT(codec<std::vector<std::uint32_t>>::decode(seven), HasError(errc::protocol_error));
  EXPECT_THAT(codec<std::uint64_t>::decode({}), HasError(errc::protocol_error));
}

TEST_F(codec_test, AValueMessageWithFdsIsRefusedAndTheFdsClosed) {
  auto ends = channel_pair(socket_kind::stream);
  auto& [a, b] = *ends;
  std::uint32_t v = 7;
  const std::array<int, 1> fds{a.native_handle()};
  ASSERT_THAT(a.send(std::as_bytes(std::span(&v, 1)), fds), Succeeded());
  const std::size_t before = test::open_fd_count();
  EXPECT_THAT(b.receive_value<std::uint32_t>(), HasError(errc::protocol_error));
  EXPECT_EQ(test::open_fd_count(), before);
}

}  // namespace
}  // namespace duplex
