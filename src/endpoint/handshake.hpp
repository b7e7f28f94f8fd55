// Internal: CPython multiprocessing.connection's authentication handshake as a state machine
// that does no I/O: the listener's and the client's side, both generations (3.12+: a
// "{digest}"-prefixed challenge and answer; 3.11 and earlier: a 20-byte challenge answered with
// a raw HMAC-MD5). The caller moves bytes: it writes output() and reads exactly input_wanted()
// bytes at a time, so nothing past the handshake's last message is ever read from the socket.
// Every message is bounded (max_handshake_message) before a byte of it is stored, in buffers of
// fixed size: nothing is allocated from a length the peer sent. docs/endpoints.md has the bytes.
// Not installed.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string>

#include "duplex/error.hpp"

namespace duplex::detail {

// The longest handshake message either side accepts: CPython's recv_bytes(256).
inline constexpr std::size_t max_handshake_message = 256;

// The random bytes of a challenge (CPython 3.12's MESSAGE_LENGTH).
inline constexpr std::size_t challenge_size = 40;

enum class handshake_role {
  listener,  // challenges first (deliver_challenge), then answers (answer_challenge)
  client,    // answers first, then challenges
};

class handshake {
 public:
  // key is not copied: it must outlive the handshake. allow_md5: accept and answer the legacy
  // form (raw HMAC-MD5) of a peer that speaks it.
  handshake(handshake_role role, std::span<const std::byte> key, bool allow_md5) noexcept;

  // Begins: the listener's first message (its challenge, random from getrandom) is put in
  // output(). Errors: those of getrandom.
  [[nodiscard]] result<void> start();

  // Bytes to write now, if any: always part of one whole message.
  [[nodiscard]] std::span<const std::byte> output() const noexcept {
    return std::span(out_).subspan(out_at_, out_size_ - out_at_);
  }

  // n bytes of output() were written.
  void wrote(std::size_t n) noexcept;

  // How many bytes to read next (0 while output is pending, once done, or once failed).
  [[nodiscard]] std::size_t input_wanted() const noexcept;

  // Takes bytes read from a stream, at most input_wanted() of them. On error the handshake has
  // failed (failed() is true, error() and detail() say why) and output() may hold a
  // "#FAILURE#" to write before closing, as CPython does.
  [[nodiscard]] result<void> feed(std::span<const std::byte> bytes);

  // Takes one whole packet of a seqpacket socket: exactly one message with its length header.
  // Errors as feed, and errc::protocol_error if the packet is not exactly one message.
  [[nodiscard]] result<void> feed_packet(std::span<const std::byte> packet);

  // True once both directions are authenticated and every message is written.
  [[nodiscard]] bool done() const noexcept { return step_ == steps_ && out_at_ == out_size_; }

  [[nodiscard]] bool failed() const noexcept { return static_cast<bool>(error_); }
  [[nodiscard]] std::error_code error() const noexcept { return error_; }

  // Why it failed, in words; empty before.
  [[nodiscard]] const std::string& detail() const noexcept { return detail_; }

 private:
  enum class step : std::uint8_t {
    send_challenge,
    read_answer,
    send_verdict,
    read_challenge,
    send_answer,
    read_verdict,
  };
  static constexpr std::size_t steps_ = 6;

  [[nodiscard]] step current() const noexcept;
  [[nodiscard]] bool reading() const noexcept;
  void advance() noexcept;
  void put(std::span<const std::byte> a, std::span<const std::byte> b = {}) noexcept;
  [[nodiscard]] result<void> fail(errc e, std::string why);
  [[nodiscard]] result<void> on_message(std::span<const std::byte> body);
  [[nodiscard]] result<void> answer(std::span<const std::byte> challenge);
  [[nodiscard]] result<void> verify(std::span<const std::byte> answer);

  handshake_role role_;
  std::span<const std::byte> key_;
  bool allow_md5_;
  bool peer_legacy_ = false;  // the peer's challenge was the legacy 20-byte form
  std::size_t step_ = 0;

  // Our challenge's payload: "{sha256}" and the random bytes (what the peer's HMAC covers).
  std::array<std::byte, 8 + challenge_size> challenge_{};

  // The message being read: its 4-byte length, then its body.
  std::array<std::byte, 4 + max_handshake_message> in_{};
  std::size_t in_size_ = 0;
  std::size_t body_size_ = 0;  // known once the length is in

  // The message being written, with its length.
  std::array<std::byte, 4 + 128> out_{};
  std::size_t out_size_ = 0;
  std::size_t out_at_ = 0;

  std::error_code error_;
  std::string detail_;
};

// HMAC of data under key with the named digest ("md5", "sha256", "sha384", "sha3_256",
// "sha3_384"), into out (at least 64 bytes). Returns the MAC's size, or 0 for an unknown digest
// (or one this libcrypto refuses, as MD5 in FIPS mode).
[[nodiscard]] std::size_t hmac(std::string_view digest, std::span<const std::byte> key,
                               std::span<const std::byte> data, std::span<std::byte> out) noexcept;

}  // namespace duplex::detail
