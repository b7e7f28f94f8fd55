#include "duplex/codec.hpp"

#include <array>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <vector>

#include "duplex/channel.hpp"
#include "support.hpp"

namespace duplex {
namespace {

using namespace std::chrono_literals;
using test::HasError;
using test::Succeeded;

struct point {
  std::int32_t x;
  std::int32_t y;
  double weight;
};

// A struct that holds a bool: some of its bit patterns are not values.
struct flagged {
  std::int32_t id;
  bool on;
};

enum class color : std::uint8_t { red, green, blue };
enum class mode : std::int32_t { read = 1, write = 4 };
enum class unchecked : std::uint16_t { a, b };
enum class wide : std::uint32_t { first, second };

}  // namespace

// point's members accept every bit pattern: opted in to the byte-copying codec.
template <>
inline constexpr bool trivially_decodable<point> = true;

template <>
struct enum_values<color> {
  static constexpr color min = color::red;
  static constexpr color max = color::blue;
};

template <>
struct enum_values<mode> {
  static constexpr bool valid(std::int32_t v) { return v == 1 || v == 4; }
};

// wide is opted in as it is: every underlying value is taken.
template <>
inline constexpr bool trivially_decodable<wide> = true;

namespace {

static_assert(has_codec<point>);
static_assert(has_codec<bool>);
static_assert(has_codec<color>);
static_assert(has_codec<mode>);
static_assert(has_codec<wide>);
static_assert(has_codec<std::array<double, 3>>);
static_assert(has_codec<std::byte>);
static_assert(!has_codec<flagged>, "a struct with a bool is not decoded by copying bytes");
static_assert(!has_codec<unchecked>, "an enum needs enum_values to say what is valid");
static_assert(!has_codec<std::array<bool, 2>>);
static_assert(!has_codec<std::vector<bool>>);
static_assert(!has_codec<std::vector<flagged>>);
// What send_value / receive_value accept, as the compiler sees it.
template <typename T>
concept receivable = requires(channel& c) {
  c.receive_value<T>();
};
template <typename T>
concept sendable = requires(channel& c, const T& v) {
  c.send_value(v);
};
static_assert(!receivable<flagged> && !sendable<flagged>);
static_assert(!receivable<unchecked> && !sendable<unchecked>);
static_assert(receivable<bool> && sendable<bool> && receivable<color> && receivable<point>);
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

TEST_F(codec_test, BoolsAreOneByteZeroOrOne) {
  std::vector<std::byte> out;
  codec<bool>::encode(true, out);
  codec<bool>::encode(false, out);
  EXPECT_EQ(out, (std::vector<std::byte>{std::byte{1}, std::byte{0}}));
  EXPECT_THAT(codec<bool>::decode(std::span(out).first(1)), ::testing::Optional(true));
  EXPECT_THAT(codec<bool>::decode(std::span(out).last(1)), ::testing::Optional(false));
  for (const int hostile : {2, 5, 0x80, 0xff}) {
    const std::array<std::byte, 1> b{static_cast<std::byte>(hostile)};
    EXPECT_THAT(codec<bool>::decode(b), HasError(errc::protocol_error)) << hostile;
  }
  EXPECT_THAT(codec<bool>::decode({}), HasError(errc::protocol_error));
  EXPECT_THAT(codec<bool>::decode(out), HasError(errc::protocol_error));
}

// A peer's byte 5 must not become a bool that is neither true nor false (UBSan: "load of value
// 5, which is not a valid value for type bool"): it is refused as that one message, and the
// channel goes on with the next.
TEST_F(codec_test, AHostileBoolIsRefusedAndTheChannelGoesOn) {
  for (const socket_kind kind : {socket_kind::stream, socket_kind::seqpacket}) {
    auto [a, b] = test::must(channel_pair(kind));
    const std::array<std::byte, 1> five{std::byte{5}};
    ASSERT_THAT(a.send(five), Succeeded());
    ASSERT_THAT(a.send_value(true), Succeeded());
    auto v = b.receive_value<bool>(10s);
    EXPECT_THAT(v, HasError(errc::protocol_error)) << to_string(kind);
    EXPECT_FALSE(b.is_broken());
    EXPECT_THAT(b.receive_value<bool>(10s), ::testing::Optional(true)) << to_string(kind);
  }
}

TEST_F(codec_test, EnumsOutsideTheirValuesAreRefused) {
  auto [a, b] = test::must(channel_pair(socket_kind::seqpacket));
  const std::uint8_t three = 3;
  ASSERT_THAT(a.send(std::as_bytes(std::span(&three, 1))), Succeeded());
  ASSERT_THAT(a.send_value(color::blue), Succeeded());
  EXPECT_THAT(b.receive_value<color>(10s), HasError(errc::protocol_error));
  EXPECT_THAT(b.receive_value<color>(10s), ::testing::Optional(color::blue));

  for (const std::int32_t raw : {0, 2, 3, 5, -1}) {
    std::array<std::byte, sizeof raw> bytes{};
    std::memcpy(bytes.data(), &raw, sizeof raw);
    EXPECT_THAT(codec<mode>::decode(bytes), HasError(errc::protocol_error)) << raw;
  }
  std::vector<std::byte> out;
  codec<mode>::encode(mode::write, out);
  EXPECT_THAT(codec<mode>::decode(out), ::testing::Optional(mode::write));
  EXPECT_THAT(codec<color>::decode(out), HasError(errc::protocol_error));  // wrong size

  // An enum opted in as trivially decodable takes every underlying value.
  const std::uint32_t seven = 7;
  EXPECT_THAT(codec<wide>::decode(std::as_bytes(std::span(&seven, 1))),
              ::testing::Optional(static_cast<wide>(7)));
}

TEST_F(codec_test, ArraysOfPlainDataRoundTrip) {
  using triple = std::array<double, 3>;
  const triple v{1.5, -2.0, 1e300};
  std::vector<std::byte> out;
  codec<triple>::encode(v, out);
  EXPECT_THAT(codec<triple>::decode(out), ::testing::Optional(v));
  EXPECT_THAT(codec<triple>::decode(std::span(out).first(8)), HasError(errc::protocol_error));
}

}  // namespace
}  // namespace duplex
