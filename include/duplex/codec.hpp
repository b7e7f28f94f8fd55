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
//
// Built in: trivially copyable types (their object representation, in this machine's byte order:
// both ends are on the same machine; never a type holding pointers), std::string, and
// std::vector<T> of trivially copyable T. channel::send_value / receive_value use these.
#pragma once

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

// A trivially copyable type that is plainly data (not a pointer or member pointer).
template <typename T>
concept plain_data =
    std::is_trivially_copyable_v<T> && !std::is_pointer_v<T> && !std::is_member_pointer_v<T>;

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
