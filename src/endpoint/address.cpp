// duplex::address: the canonical text form of an endpoint, parsed and printed.
#include <arpa/inet.h>

#include <cerrno>
#include <charconv>
#include <string>

#include "duplex/endpoint.hpp"

namespace duplex {
namespace {

// Checks a path or an abstract name; the reason it is not one, or empty.
std::string bad_unix_name(std::string_view name, std::string_view what) {
  if (name.empty()) return "the " + std::string(what) + " is empty";
  if (name.size() > max_unix_path_size) {
    return "the " + std::string(what) + " is " + std::to_string(name.size()) +
           " bytes long, over the " + std::to_string(max_unix_path_size) + " a unix socket holds";
  }
  if (name.find('\0') != std::string_view::npos) {
    return "the " + std::string(what) + " holds a NUL byte";
  }
  return {};
}

std::string bad_host(std::string_view host) {
  if (host.empty()) return "the host is empty";
  if (host.size() > max_host_size) {
    return "the host is " + std::to_string(host.size()) + " bytes long, over " +
           std::to_string(max_host_size);
  }
  for (const char c : host) {
    const auto b = static_cast<unsigned char>(c);
    if (b <= 0x20 || b == 0x7f) return "the host holds a space or a control byte";
    if (c == '[' || c == ']' || c == '/') {
      return "the host holds '" + std::string(1, c) + "'";
    }
  }
  if (host.find(':') != std::string_view::npos) {
    in6_addr v6{};
    if (::inet_pton(AF_INET6, std::string(host).c_str(), &v6) != 1) {
      return "host '" + std::string(host) + "' holds ':' but is not an IPv6 address";
    }
  }
  return {};
}

// The reason text is not an address, or empty; the address in *out if it is one.
std::string parse_impl(std::string_view text, address* out) {
  constexpr std::string_view unix_scheme = "unix:";
  constexpr std::string_view tcp_scheme = "tcp:";
  if (text.empty()) return "the address is empty (expected unix:PATH, unix:@NAME or tcp:HOST:PORT)";
  if (text.starts_with(unix_scheme)) {
    std::string_view rest = text.substr(unix_scheme.size());
    if (rest.starts_with('@')) {
      rest.remove_prefix(1);
      if (auto why = bad_unix_name(rest, "abstract name"); !why.empty()) return why;
      if (out != nullptr) *out = *address::unix_abstract(rest);
      return {};
    }
    if (auto why = bad_unix_name(rest, "path"); !why.empty()) return why;
    if (out != nullptr) *out = *address::unix_path(rest);
    return {};
  }
  if (!text.starts_with(tcp_scheme)) {
    const auto colon = text.find(':');
    if (colon == std::string_view::npos) {
      return "no scheme: expected unix:PATH, unix:@NAME or tcp:HOST:PORT";
    }
    return "unknown scheme '" + std::string(text.substr(0, colon)) + "' (expected unix: or tcp:)";
  }
  std::string_view rest = text.substr(tcp_scheme.size());
  std::string_view host;
  std::string_view port_text;
  if (rest.starts_with('[')) {
    const auto close = rest.find(']');
    if (close == std::string_view::npos) return "'[' without a closing ']'";
    host = rest.substr(1, close - 1);
    rest.remove_prefix(close + 1);
    if (!rest.starts_with(':')) return "no ':PORT' after the bracketed host";
    port_text = rest.substr(1);
    in6_addr v6{};
    if (::inet_pton(AF_INET6, std::string(host).c_str(), &v6) != 1) {
      return "'[" + std::string(host) + "]' is not an IPv6 address";
    }
  } else {
    const auto colon = rest.rfind(':');
    if (colon == std::string_view::npos) return "no port: expected tcp:HOST:PORT";
    host = rest.substr(0, colon);
    port_text = rest.substr(colon + 1);
    if (host.find(':') != std::string_view::npos) {
      return "an IPv6 host must be in brackets: tcp:[" + std::string(host) + "]:PORT";
    }
  }
  if (auto why = bad_host(host); !why.empty()) return why;
  if (port_text.empty()) return "the port is empty";
  unsigned long port = 0;
  const auto [end, ec] =
      std::from_chars(port_text.data(), port_text.data() + port_text.size(), port);
  if (ec == std::errc::result_out_of_range ||
      (ec == std::errc{} && end == port_text.data() + port_text.size() && port > 65535)) {
    return "port '" + std::string(port_text) + "' is over 65535";
  }
  if (ec != std::errc{} || end != port_text.data() + port_text.size()) {
    return "port '" + std::string(port_text) + "' is not a number";
  }
  if (out != nullptr) *out = *address::tcp(host, static_cast<std::uint16_t>(port));
  return {};
}

}  // namespace

result<address> address::parse(std::string_view text) {
  address a;
  if (!parse_impl(text, &a).empty()) return fail_errno(EINVAL);
  return a;
}

std::string describe_address_error(std::string_view text) { return parse_impl(text, nullptr); }

result<address> address::unix_path(std::string_view path) {
  if (!bad_unix_name(path, "path").empty()) return fail_errno(EINVAL);
  address a;
  a.kind_ = address_kind::unix_path;
  a.name_ = path;
  return a;
}

result<address> address::unix_abstract(std::string_view name) {
  if (!bad_unix_name(name, "abstract name").empty()) return fail_errno(EINVAL);
  address a;
  a.kind_ = address_kind::unix_abstract;
  a.name_ = name;
  return a;
}

result<address> address::tcp(std::string_view host, std::uint16_t port) {
  if (!bad_host(host).empty()) return fail_errno(EINVAL);
  address a;
  a.kind_ = address_kind::tcp;
  a.name_ = host;
  a.port_ = port;
  return a;
}

std::string address::to_string() const {
  switch (kind_) {
    case address_kind::unix_path: return "unix:" + name_;
    case address_kind::unix_abstract: return "unix:@" + name_;
    case address_kind::tcp:
      if (name_.find(':') != std::string::npos) {
        return "tcp:[" + name_ + "]:" + std::to_string(port_);
      }
      return "tcp:" + name_ + ":" + std::to_string(port_);
  }
  return {};
}

}  // namespace duplex
