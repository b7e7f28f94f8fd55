// CPython multiprocessing.connection's authentication handshake (handshake.hpp): the steps of
// each side, the parsing of a peer's challenge and answer, HMAC through libcrypto.
#include "endpoint/handshake.hpp"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <sys/random.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <string_view>

namespace duplex::detail {
namespace {

constexpr std::string_view challenge_tag = "#CHALLENGE#";
constexpr std::string_view welcome = "#WELCOME#";
constexpr std::string_view failure = "#FAILURE#";
constexpr std::string_view our_digest = "sha256";

// CPython's legacy lengths: a 3.11 listener's challenge (20 random bytes), and a 3.11 client's
// answer (a raw 16-byte HMAC-MD5). No modern message has either length.
constexpr std::size_t legacy_challenge_size = 20;
constexpr std::size_t md5_size = 16;
// The longest digest name CPython allows ("sha3_256"), for the search of the closing '}'.
constexpr std::size_t max_digest_name = 8;

std::span<const std::byte> bytes_of(std::string_view s) noexcept {
  return std::as_bytes(std::span(s.data(), s.size()));
}

std::string_view text_of(std::span<const std::byte> b) noexcept {
  return {reinterpret_cast<const char*>(b.data()), b.size()};
}

const EVP_MD* digest_by_name(std::string_view name) noexcept {
  if (name == "md5") return EVP_md5();
  if (name == "sha256") return EVP_sha256();
  if (name == "sha384") return EVP_sha384();
  if (name == "sha3_256") return EVP_sha3_256();
  if (name == "sha3_384") return EVP_sha3_384();
  return nullptr;
}

// A modern message: "{name}" and a payload. False if it has no such prefix.
bool split_digest(std::span<const std::byte> m, std::string_view& name,
                  std::span<const std::byte>& payload) noexcept {
  const std::string_view t = text_of(m);
  if (t.empty() || t[0] != '{') return false;
  const auto close = t.find('}', 1);
  if (close == std::string_view::npos || close > max_digest_name + 1) return false;
  name = t.substr(1, close - 1);
  payload = m.subspan(close + 1);
  return true;
}

// Printable, short: what a peer sent, for a detail message.
std::string shown(std::span<const std::byte> m) {
  std::string out;
  for (const auto b : m.first(std::min<std::size_t>(m.size(), 24))) {
    const auto c = static_cast<unsigned char>(b);
    if (c >= 0x20 && c < 0x7f) {
      out.push_back(static_cast<char>(c));
    } else {
      static constexpr char hex[] = "0123456789abcdef";
      out += "\\x";
      out.push_back(hex[c >> 4]);
      out.push_back(hex[c & 15]);
    }
  }
  if (m.size() > 24) out += "...";
  return "'" + out + "'";
}

}  // namespace

std::size_t hmac(std::string_view digest, std::span<const std::byte> key,
                 std::span<const std::byte> data, std::span<std::byte> out) noexcept {
  const EVP_MD* md = digest_by_name(digest);
  if (md == nullptr || out.size() < EVP_MAX_MD_SIZE) return 0;
  unsigned int size = 0;
  if (::HMAC(md, key.data(), static_cast<int>(key.size()),
             reinterpret_cast<const unsigned char*>(data.data()), data.size(),
             reinterpret_cast<unsigned char*>(out.data()), &size) == nullptr) {
    return 0;
  }
  return size;
}

handshake::handshake(handshake_role role, std::span<const std::byte> key, bool allow_md5) noexcept
    : role_(role), key_(key), allow_md5_(allow_md5) {}

handshake::step handshake::current() const noexcept {
  // The listener challenges first and then answers; the client does the same the other way.
  static constexpr step listener_steps[steps_] = {step::send_challenge, step::read_answer,
                                                  step::send_verdict,   step::read_challenge,
                                                  step::send_answer,    step::read_verdict};
  static constexpr step client_steps[steps_] = {step::read_challenge, step::send_answer,
                                                step::read_verdict,   step::send_challenge,
                                                step::read_answer,    step::send_verdict};
  return role_ == handshake_role::listener ? listener_steps[step_] : client_steps[step_];
}

bool handshake::reading() const noexcept {
  if (step_ >= steps_ || failed() || out_at_ < out_size_) return false;
  const step s = current();
  return s == step::read_answer || s == step::read_challenge || s == step::read_verdict;
}

void handshake::put(std::span<const std::byte> a, std::span<const std::byte> b) noexcept {
  const auto size = static_cast<std::uint32_t>(a.size() + b.size());
  out_[0] = std::byte(size >> 24);
  out_[1] = std::byte(size >> 16);
  out_[2] = std::byte(size >> 8);
  out_[3] = std::byte(size);
  std::memcpy(out_.data() + 4, a.data(), a.size());
  if (!b.empty()) std::memcpy(out_.data() + 4 + a.size(), b.data(), b.size());
  out_size_ = 4 + size;
  out_at_ = 0;
}

void handshake::advance() noexcept {
  ++step_;
  if (step_ < steps_ && current() == step::send_challenge) {
    put(bytes_of(challenge_tag), challenge_);
  }
}

result<void> handshake::start() {
  // The challenge: "{sha256}" and 40 random bytes, made now whichever side sends it.
  const std::string prefix = "{" + std::string(our_digest) + "}";
  static_assert(challenge_size + 8 == std::tuple_size_v<decltype(challenge_)>);
  std::memcpy(challenge_.data(), prefix.data(), prefix.size());
  std::size_t got = 0;
  while (got < challenge_size) {
    const ssize_t n = ::getrandom(challenge_.data() + prefix.size() + got, challenge_size - got, 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      return fail_errno(errno);
    }
    got += static_cast<std::size_t>(n);
  }
  // Enter the first step: advance() puts the challenge out if the listener is to send it.
  step_ = static_cast<std::size_t>(-1);
  advance();
  return {};
}

void handshake::wrote(std::size_t n) noexcept {
  out_at_ = std::min(out_size_, out_at_ + n);
  if (out_at_ == out_size_ && !failed() && step_ < steps_) {
    const step s = current();
    if (s == step::send_challenge || s == step::send_answer || s == step::send_verdict) advance();
  }
}

std::size_t handshake::input_wanted() const noexcept {
  if (!reading()) return 0;
  if (in_size_ < 4) return 4 - in_size_;
  return 4 + body_size_ - in_size_;
}

result<void> handshake::fail(errc e, std::string why) {
  error_ = make_error_code(e);
  detail_ = std::move(why);
  return duplex::fail(e);
}

result<void> handshake::feed(std::span<const std::byte> bytes) {
  if (failed()) return std::unexpected(error_);
  if (bytes.size() > input_wanted()) return fail(errc::protocol_error, "more bytes than asked");
  std::memcpy(in_.data() + in_size_, bytes.data(), bytes.size());
  in_size_ += bytes.size();
  if (in_size_ == 4 && !bytes.empty() && body_size_ == 0) {
    // The length is checked before a byte of the body is taken: CPython refuses over 256 too
    // (and its 8-byte form, announced by 0xffffffff, is over 256 here).
    const std::uint32_t size = (std::to_integer<std::uint32_t>(in_[0]) << 24) |
                               (std::to_integer<std::uint32_t>(in_[1]) << 16) |
                               (std::to_integer<std::uint32_t>(in_[2]) << 8) |
                               std::to_integer<std::uint32_t>(in_[3]);
    if (size > max_handshake_message) {
      return fail(errc::protocol_error, "handshake message of " + std::to_string(size) +
                                            " bytes is over " +
                                            std::to_string(max_handshake_message));
    }
    body_size_ = size;
  }
  if (in_size_ < 4 || in_size_ < 4 + body_size_) return {};
  const auto body = std::span(in_).subspan(4, body_size_);
  in_size_ = 0;
  body_size_ = 0;
  return on_message(body);
}

result<void> handshake::feed_packet(std::span<const std::byte> packet) {
  if (failed()) return std::unexpected(error_);
  if (!reading()) return fail(errc::protocol_error, "a packet came when none was expected");
  if (packet.size() < 4) {
    return fail(errc::protocol_error,
                "a packet of " + std::to_string(packet.size()) + " bytes is shorter than a length");
  }
  if (auto r = feed(packet.first(4)); !r) return r;
  if (packet.size() - 4 != input_wanted()) {
    return fail(errc::protocol_error, "a packet does not hold exactly one message");
  }
  return feed(packet.subspan(4));
}

result<void> handshake::on_message(std::span<const std::byte> body) {
  switch (current()) {
    case step::read_challenge: return answer(body);
    case step::read_answer: return verify(body);
    case step::read_verdict:
      if (text_of(body) != welcome) {
        return fail(errc::authentication_failed,
                    "the peer refused our answer (" + shown(body) + "): not the same key");
      }
      advance();
      return {};
    default: return fail(errc::protocol_error, "a message came when none was expected");
  }
}

result<void> handshake::answer(std::span<const std::byte> m) {
  if (text_of(m).substr(0, challenge_tag.size()) != challenge_tag) {
    return fail(errc::protocol_error, "expected a challenge, got " + shown(m));
  }
  const auto challenge = m.subspan(challenge_tag.size());
  if (challenge.size() < legacy_challenge_size) {
    return fail(errc::protocol_error,
                "challenge of " + std::to_string(challenge.size()) + " bytes is too short");
  }
  std::array<std::byte, EVP_MAX_MD_SIZE> mac{};
  if (challenge.size() == legacy_challenge_size || challenge.size() == md5_size) {
    // A legacy listener (CPython 3.11 and earlier): a raw HMAC-MD5 of the 20 bytes.
    if (!allow_md5_) {
      return fail(errc::authentication_failed,
                  "the peer speaks the legacy handshake (HMAC-MD5), which is refused");
    }
    peer_legacy_ = true;
    const std::size_t n = hmac("md5", key_, challenge, mac);
    if (n == 0) return fail(errc::authentication_failed, "HMAC-MD5 is not available here");
    put(std::span(mac).first(n));
    advance();
    return {};
  }
  std::string_view name;
  std::span<const std::byte> payload;
  if (!split_digest(challenge, name, payload) || digest_by_name(name) == nullptr || name == "md5") {
    return fail(errc::protocol_error,
                "challenge without a supported {digest} prefix: " + shown(challenge));
  }
  // The MAC covers the whole challenge, its prefix included: no downgrade is possible.
  const std::size_t n = hmac(name, key_, challenge, mac);
  if (n == 0) return fail(errc::authentication_failed, "HMAC-" + std::string(name) + " failed");
  const std::string prefix = "{" + std::string(name) + "}";
  put(bytes_of(prefix), std::span(mac).first(n));
  advance();
  return {};
}

result<void> handshake::verify(std::span<const std::byte> r) {
  std::string_view name;
  std::span<const std::byte> got;
  std::string refusal;
  if (r.size() == md5_size || r.size() == legacy_challenge_size) {
    // A legacy answer: a raw HMAC-MD5. The listener takes it from a client that answers so (a
    // 3.11 client); a client takes it only from a listener whose own challenge was legacy.
    name = "md5";
    got = r;
    if (!allow_md5_) {
      refusal = "the peer answered in the legacy form (HMAC-MD5), which is refused";
    } else if (role_ == handshake_role::client && !peer_legacy_) {
      refusal = "a modern peer answered with a legacy HMAC-MD5";
    }
  } else if (!split_digest(r, name, got) || digest_by_name(name) == nullptr || name == "md5") {
    refusal = "answer without a supported {digest} prefix: " + shown(r);
  }
  std::array<std::byte, EVP_MAX_MD_SIZE> want{};
  std::size_t n = 0;
  if (refusal.empty()) {
    n = hmac(name, key_, challenge_, want);
    if (n == 0) refusal = "HMAC-" + std::string(name) + " is not available here";
  }
  if (refusal.empty() && n != got.size()) {
    refusal = "answer of " + std::to_string(got.size()) + " bytes, where HMAC-" +
              std::string(name) + " has " + std::to_string(n);
  }
  if (refusal.empty() && CRYPTO_memcmp(want.data(), got.data(), n) != 0) {
    refusal = "the peer's answer is wrong: not the same key";
  }
  if (!refusal.empty()) {
    put(bytes_of(failure));  // as CPython does, so a CPython peer raises AuthenticationError
    return fail(errc::authentication_failed, std::move(refusal));
  }
  put(bytes_of(welcome));
  advance();
  return {};
}

}  // namespace duplex::detail
