// duplex/codec.hpp - typed messages: how a value becomes the bytes of one message and back.
//
// codec<T> is a customization point. Specialize it for your type with two static functions:
//
//   template <> struct duplex::codec<point> {
//     static void encode(const point& p, std::vector<std::byte>& out);      // append bytes
//     static duplex::result<point> decode(std::span<const std::byte> in);   // all of in
//   };
//
// decode receives exactly the bytes of one message, which came from a peer: it must check
// everything (sizes, counts, ranges) and fail with errc::protocol_error rather than trust them.
// A failed decode concerns that one message: channel::receive_value returns the error, the message
// is consumed, and the channel goes on (the frame itself was sound).
//
// Built in (all in this machine's byte order: both ends are on the same machine):
//   - Types every bit pattern of which is a valid value (trivially_decodable<T>): integers,
//     character types, floating point, std::byte, std::array of those, and the types you opt in.
//     Their sizeof(T) bytes, copied as they are.
//   - bool: one byte, 0 or 1; any other byte is errc::protocol_error (copied as it is, a byte 5
//     would be a bool that is neither true nor false).
//   - Enums for which you say which values are valid (enum_values<E>): the underlying integer,
//     checked; a value outside them is errc::protocol_error. An enum without enum_values has no
//     built-in codec.
//   - std::string, and std::vector<T> of trivially decodable T.
// A struct has no built-in codec unless you opt it in with trivially_decodable (only when every
// member accepts every bit pattern: no bool, enum, pointer or reference-like member) or write a
// codec<T> that decodes field by field (codec<bool> and the enum codec check their fields).
// channel::send_value / receive_value use these.
#pragma once

#include <array>
#include <concepts>
#include <cstddef>
#include <cstring>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "duplex/error.hpp"

namespace duplex {

// The primary template is undefined: a type without a codec cannot be sent as a value.
template <typename T>
struct codec;

// Satisfied by types with a usable codec<T>.
template <typename T>
concept has_codec = requires(const T& value, std::vector<std::byte>& out,
                             std::span<const std::byte> in) {
  {codec<T>::encode(value, out)};
  { codec<T>::decode(in) } -> std::same_as<result<T>>;
};

// True for types every bit pattern of which is a valid value, so that a peer's bytes copied into
// one can never make an invalid object: arithmetic types other than bool, std::byte, and
// std::array of such types. Opt a trivially copyable struct of such members in by specializing
// it (its padding may hold any bytes; that is harmless):
//
//   template <> inline constexpr bool duplex::trivially_decodable<order> = true;
//
// Never for a type with a bool, enum, pointer or reference-like member: a peer could send bytes
// that are not a value of it (undefined behaviour to read). Those need a codec of their own.
template <typename T>
inline constexpr bool trivially_decodable =
    (std::is_arithmetic_v<T> && !std::is_same_v<T, bool>) || std::is_same_v<T, std::byte>;

template <typename T, std::size_t N>
inline constexpr bool trivially_decodable<std::array<T, N>> = trivially_decodable<T>;

// A type the built-in byte-copying codec may decode: trivially decodable, and trivially copyable
// (which the copy needs), and not a pointer (whatever a specialization says).
template <typename T>
concept plain_data =
    trivially_decodable<T> && std::is_trivially_copyable_v<T> && !std::is_pointer_v<T> &&
    !std::is_member_pointer_v<T>;

// Which values of the enum E a peer may send, for E's built-in codec. Specialize it with either
// the inclusive bounds of a contiguous enum,
//
//   template <> struct duplex::enum_values<color> {
//     static constexpr color min = color::red, max = color::blue;
//   };
//
// or a check of the underlying value (for enums with gaps, or flags):
//
//   template <> struct duplex::enum_values<mode> {
//     static constexpr bool valid(std::underlying_type_t<mode> v) { return v == 1 || v == 4; }
//   };
template <typename E>
struct enum_values;

// Satisfied by enums with an enum_values<E> that says which of their values are valid (and not
// opted in as trivially decodable, which takes every value as it is).
template <typename E>
concept checked_enum =
    std::is_enum_v<E> && !plain_data<E> && (
                                               requires(std::underlying_type_t<E> v) {
                                                 {
                                                   enum_values<E>::valid(v)
                                                   } -> std::convertible_to<bool>;
                                               } ||
                                               requires {
                                                 { enum_values<E>::min } -> std::convertible_to<E>;
                                                 { enum_values<E>::max } -> std::convertible_to<E>;
                                               });

// Plain data: its sizeof(T) bytes. decode fails with errc::protocol_error unless the message is
// exactly sizeof(T) bytes.
template <plain_data T>
struct codec<T> {
  static void encode(const T& value, std::vector<std::byte>& out) {
    const auto* p = reinterpret_cast<const std::byte*>(&value);
    out.insert(out.end(), p, p + sizeof(T));
  }
  static result<T> decode(std::span<const std::byte> in) {
    if (in.size() != sizeof(T)) return fail(errc::protocol_error);
    T value;
    std::memcpy(&value, in.data(), sizeof(T));
    return value;
  }
};

// A bool: one byte, 0 (false) or 1 (true). decode fails with errc::protocol_error for any other
// message: a wrong size or any other byte.
template <>
struct codec<bool> {
  static void encode(bool value, std::vector<std::byte>& out) {
    out.push_back(value ? std::byte{1} : std::byte{0});
  }
  static result<bool> decode(std::span<const std::byte> in) {
    if (in.size() != 1 || (in[0] != std::byte{0} && in[0] != std::byte{1})) {
      return fail(errc::protocol_error);
    }
    return in[0] == std::byte{1};
  }
};

// An enum with enum_values<E>: its underlying integer (sizeof(E) bytes). decode fails with
// errc::protocol_error for a wrong size or a value enum_values<E> does not accept. The value is
// checked as an integer before it becomes an E.
template <checked_enum E>
struct codec<E> {
  using underlying = std::underlying_type_t<E>;
  static void encode(E value, std::vector<std::byte>& out) {
    codec<underlying>::encode(static_cast<underlying>(value), out);
  }
  static result<E> decode(std::span<const std::byte> in) {
    auto raw = codec<underlying>::decode(in);  // bool-based enums are checked there too
    if (!raw) return std::unexpected(raw.error());
    if (!valid(*raw)) return fail(errc::protocol_error);
    return static_cast<E>(*raw);
  }

 private:
  static constexpr bool valid(underlying v) {
    if constexpr (requires { enum_values<E>::valid(v); }) {
      return static_cast<bool>(enum_values<E>::valid(v));
    } else {
      return static_cast<underlying>(enum_values<E>::min) <= v &&
             v <= static_cast<underlying>(enum_values<E>::max);
    }
  }
};

// A string: its characters, no terminator.
template <>
struct codec<std::string> {
  static void encode(const std::string& value, std::vector<std::byte>& out) {
    const auto* p = reinterpret_cast<const std::byte*>(value.data());
    out.insert(out.end(), p, p + value.size());
  }
  static result<std::string> decode(std::span<const std::byte> in) {
    return std::string(reinterpret_cast<const char*>(in.data()), in.size());
  }
};

// A vector of plain data: its elements' bytes back to back. decode fails with
// errc::protocol_error unless the size is a whole number of elements.
template <plain_data T>
struct codec<std::vector<T>> {
  static void encode(const std::vector<T>& value, std::vector<std::byte>& out) {
    const auto* p = reinterpret_cast<const std::byte*>(value.data());
    out.insert(out.end(), p, p + value.size() * sizeof(T));
  }
  static result<std::vector<T>> decode(std::span<const std::byte> in) {
    if (in.size() % sizeof(T) != 0) return fail(errc::protocol_error);
    std::vector<T> value(in.size() / sizeof(T));
    if (!in.empty()) std::memcpy(value.data(), in.data(), in.size());
    return value;
  }
};

}  // namespace duplex
