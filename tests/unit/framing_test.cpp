// Golden byte vectors for both wire formats: if one of these changes, the wire format changed,
// and docs/protocol.md and the version must change with it.
#include "duplex/framing.hpp"

#include <vector>

#include "duplex/socket.hpp"

#include "support.hpp"

namespace duplex {
namespace {

using test::HasError;

std::vector<std::byte> bytes(std::initializer_list<int> values) {
  std::vector<std::byte> out;
  for (int v : values)
    out.push_back(static_cast<std::byte>(v));
  return out;
}

template <std::size_t N>
std::vector<std::byte> vec(const std::array<std::byte, N>& a) {
  return {a.begin(), a.end()};
}

result<wire::native_header> decode(const std::vector<std::byte>& b) {
  return wire::decode_native(std::span<const std::byte, wire::native_header_size>(b.data(), 16));
}

TEST(native_framing, GoldenHeaderForTwoBytesWithoutFds) {
  EXPECT_EQ(vec(wire::encode_native({2, 0, 0})),
            bytes({0x44, 0x58, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00,     // "DX", v1, flags, fds, rsvd
                   0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00}));  // length 2, little-endian
}

TEST(native_framing, GoldenHeaderWithFdsAndALargeLength) {
  EXPECT_EQ(vec(wire::encode_native({0x0102030405060708ULL, 253, 0})),
            bytes({0x44, 0x58, 0x01, 0x00, 0xfd, 0x00, 0x00, 0x00,  //
                   0x08, 0x07, 0x06, 0x05, 0x04, 0x03, 0x02, 0x01}));
}

TEST(native_framing, DecodesWhatItEncodes) {
  for (const wire::native_header h : {wire::native_header{0, 0, 0}, wire::native_header{1, 1, 0},
                                      wire::native_header{~0ULL, 253, 0}}) {
    const auto encoded = vec(wire::encode_native(h));
    auto decoded = decode(encoded);
    ASSERT_TRUE(decoded);
    EXPECT_EQ(*decoded, h);
  }
}

TEST(native_framing, RejectsEveryMalformedField) {
  const auto good = vec(wire::encode_native({5, 1, 0}));
  ASSERT_TRUE(decode(good));
  auto with = [&](std::size_t at, int value) {
    auto b = good;
    b[at] = static_cast<std::byte>(value);
    return decode(b);
  };
  EXPECT_THAT(with(0, 'd'), HasError(errc::protocol_error));  // magic
  EXPECT_THAT(with(1, 'x'), HasError(errc::protocol_error));  // magic
  EXPECT_THAT(with(2, 0), HasError(errc::protocol_error));    // version 0
  EXPECT_THAT(with(2, 2), HasError(errc::protocol_error));    // a future version
  for (int bit = 3; bit < 8; ++bit) {
    EXPECT_THAT(with(3, 1 << bit), HasError(errc::protocol_error)) << "flag bit " << bit;
  }
  EXPECT_THAT(with(3, wire::flag_pool | wire::flag_shared), HasError(errc::protocol_error));
  EXPECT_THAT(with(3, wire::flag_shared | wire::flag_memfd), HasError(errc::protocol_error));
  for (const std::uint8_t flag : {wire::flag_pool, wire::flag_shared, wire::flag_memfd}) {
    auto h = with(3, flag);
    ASSERT_TRUE(h) << int{flag};
    EXPECT_EQ(h->flags, flag);
  }
  EXPECT_THAT(with(4, 254), HasError(errc::protocol_error));   // 254 fds
  EXPECT_THAT(with(5, 1), HasError(errc::protocol_error));     // 257 fds
  EXPECT_THAT(with(6, 1), HasError(errc::protocol_error));     // reserved
  EXPECT_THAT(with(7, 0x80), HasError(errc::protocol_error));  // reserved
}

// decode_native takes a frame with no flags and no fds by one comparison of its first eight
// bytes; every other header goes through the field-by-field checks. Each single-bit change to
// the first eight bytes of such a header must be judged as those checks would judge it.
TEST(native_framing, EveryBitOfAPlainHeadersFirstWordIsChecked) {
  const auto plain = vec(wire::encode_native({5, 0, 0}));
  ASSERT_TRUE(decode(plain));
  for (std::size_t at = 0; at < 8; ++at) {
    for (int bit = 0; bit < 8; ++bit) {
      auto b = plain;
      b[at] ^= static_cast<std::byte>(1 << bit);
      const auto v = [&b](std::size_t i) { return std::to_integer<unsigned>(b[i]); };
      const unsigned flags = v(3);
      const bool one_known_flag = flags == wire::flag_pool || flags == wire::flag_shared ||
                                  flags == wire::flag_memfd || flags == 0;
      const bool valid = v(0) == 0x44 && v(1) == 0x58 && v(2) == wire::native_version &&
                         one_known_flag && (v(4) | v(5) << 8) <= max_fds_per_message && v(6) == 0 &&
                         v(7) == 0;
      const auto h = decode(b);
      EXPECT_EQ(h.has_value(), valid) << "byte " << at << " bit " << bit;
      if (h) {
        EXPECT_EQ(h->length, 5U);
      }
    }
  }
}

// encode_native is constexpr: a header can be a compile-time constant.
static_assert(wire::encode_native({2, 3, wire::flag_memfd})[3] == std::byte{wire::flag_memfd});
static_assert(wire::encode_native({0x0102, 3, 0})[9] == std::byte{0x01});

TEST(shared_memory_descriptors, GoldenBytesAndChecks) {
  EXPECT_EQ(vec(wire::encode(wire::pool_announce{64 << 20, 256})),
            bytes({0x00, 0x00, 0x00, 0x04, 0x00, 0x00, 0x00, 0x00,     // data size 64 MiB
                   0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00}));  // 256 slots, reserved
  EXPECT_EQ(vec(wire::encode(wire::shared_ref{3, 0x1000, 0x20000})),
            bytes({0x03, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,     // slot 3, reserved
                   0x00, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,     // offset
                   0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00}));  // length
  EXPECT_EQ(vec(wire::encode(wire::memfd_ref{16 << 20})),
            bytes({0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00}));
  const auto announce = vec(wire::encode(wire::pool_announce{1, 2}));
  EXPECT_EQ(wire::decode_pool_announce(announce).value(), (wire::pool_announce{1, 2}));
  auto bad = announce;
  bad[15] = std::byte{1};
  EXPECT_THAT(wire::decode_pool_announce(bad), HasError(errc::protocol_error));
  EXPECT_THAT(wire::decode_pool_announce(std::span(announce).first(15)),
              HasError(errc::protocol_error));
  auto ref = vec(wire::encode(wire::shared_ref{1, 2, 3}));
  EXPECT_EQ(wire::decode_shared_ref(ref).value(), (wire::shared_ref{1, 2, 3}));
  ref[5] = std::byte{9};
  EXPECT_THAT(wire::decode_shared_ref(ref), HasError(errc::protocol_error));
  EXPECT_THAT(wire::decode_memfd_ref(bytes({1, 2, 3})), HasError(errc::protocol_error));
}

TEST(python_framing, GoldenShortHeader) {
  std::array<std::byte, wire::python_max_header_size> out{};
  ASSERT_EQ(wire::encode_python(16385, out), 4U);
  EXPECT_EQ(std::vector<std::byte>(out.begin(), out.begin() + 4), bytes({0x00, 0x00, 0x40, 0x01}));
  ASSERT_EQ(wire::encode_python(0x7fffffff, out), 4U);
  EXPECT_EQ(std::vector<std::byte>(out.begin(), out.begin() + 4), bytes({0x7f, 0xff, 0xff, 0xff}));
}

TEST(python_framing, GoldenLongHeaderAbove2GiB) {
  std::array<std::byte, wire::python_max_header_size> out{};
  ASSERT_EQ(wire::encode_python(0x80000000ULL, out), 12U);
  EXPECT_EQ(std::vector<std::byte>(out.begin(), out.end()),
            bytes({0xff, 0xff, 0xff, 0xff,  // -1: an 8-byte length follows
                   0x00, 0x00, 0x00, 0x00, 0x80, 0x00, 0x00, 0x00}));
}

TEST(python_framing, DecodeWaitsForWholeHeaders) {
  const auto short_header = bytes({0x00, 0x00, 0x01});
  auto r = wire::decode_python(short_header);
  ASSERT_TRUE(r);
  EXPECT_FALSE(r->has_value());
  const auto marker_only = bytes({0xff, 0xff, 0xff, 0xff, 0x00, 0x00});
  r = wire::decode_python(marker_only);
  ASSERT_TRUE(r);
  EXPECT_FALSE(r->has_value());
  const auto long_header = bytes({0xff, 0xff, 0xff, 0xff, 0, 0, 0, 1, 0, 0, 0, 0});
  r = wire::decode_python(long_header);
  ASSERT_TRUE(r && r->has_value());
  EXPECT_EQ((*r)->header_size, 12U);
  EXPECT_EQ((*r)->length, 1ULL << 32);
  const auto zero = bytes({0, 0, 0, 0});
  r = wire::decode_python(zero);
  ASSERT_TRUE(r && r->has_value());
  EXPECT_EQ((*r)->length, 0U);
}

TEST(python_framing, NegativeLengthsOtherThanMinusOneAreProtocolErrors) {
  // CPython would read these as an empty message; duplex refuses them.
  EXPECT_THAT(wire::decode_python(bytes({0xff, 0xff, 0xff, 0xfe})), HasError(errc::protocol_error));
  EXPECT_THAT(wire::decode_python(bytes({0x80, 0x00, 0x00, 0x00})), HasError(errc::protocol_error));
}

}  // namespace
}  // namespace duplex
