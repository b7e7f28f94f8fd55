// Typed messages between two threads: send_value / receive_value with duplex::codec<T>.
//
// Two kinds of type travel here:
//   - order, a trivially copyable struct whose members accept every bit pattern (integers, a
//     double, chars): opted in with duplex::trivially_decodable, the built-in codec sends its
//     bytes as they are (both ends are on the same machine and built from the same definition).
//     Never do this with a type that holds pointers (std::string, std::vector and the like), a
//     bool or an enum: a peer's bytes could make an object that is not a valid value.
//   - team, which holds a std::string and a std::vector<int>: it gets its own codec<team>, which
//     writes each field with a length in front and, when decoding, checks every length against
//     the bytes that really arrived. A message comes from a peer; decode must not trust it.
// The main thread also sends one malformed team, to show the refusal the worker gets.
//
// No receive here needs a timeout: each thread owns its end, and an end that goes away (the
// worker returns, or main calls close()) ends the other's wait with errc::peer_closed.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <iomanip>
#include <iostream>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "duplex/duplex.hpp"

// Plain data: sent with the built-in codec (exactly sizeof(order) bytes).
struct order {
  std::uint32_t id;
  std::uint32_t quantity;
  double price;
  char symbol[8];  // NUL-padded
};

// Every bit pattern of every member is a valid value: the peer's bytes can be copied as they are.
template <>
inline constexpr bool duplex::trivially_decodable<order> = true;

// Not plain data: needs a codec of its own.
struct team {
  std::string name;
  std::vector<int> scores;
};

// team on the wire: u32 name length, the name's bytes, u32 score count, the scores (int32 each).
// Integers are in this machine's byte order, like the built-in codec: both ends share it.
template <>
struct duplex::codec<team> {
  static void encode(const team& t, std::vector<std::byte>& out) {
    put(out, static_cast<std::uint32_t>(t.name.size()));
    const auto name = duplex::as_bytes(t.name);
    out.insert(out.end(), name.begin(), name.end());
    put(out, static_cast<std::uint32_t>(t.scores.size()));
    for (const int s : t.scores) {
      put(out, static_cast<std::int32_t>(s));
    }
  }

  static duplex::result<team> decode(std::span<const std::byte> in) {
    team t;
    std::uint32_t name_size = 0;
    if (!take(in, name_size) || name_size > in.size()) {
      return duplex::fail(duplex::errc::protocol_error);
    }
    t.name.assign(duplex::as_string_view(in.first(name_size)));
    in = in.subspan(name_size);
    std::uint32_t count = 0;
    // Compared by division, so no count can overflow a multiplication and pass.
    if (!take(in, count) || count > in.size() / sizeof(std::int32_t)) {
      return duplex::fail(duplex::errc::protocol_error);
    }
    t.scores.resize(count);
    for (int& s : t.scores) {
      std::int32_t v = 0;
      static_cast<void>(take(in, v));  // cannot fail: the count was checked against the size
      s = v;
    }
    if (!in.empty()) return duplex::fail(duplex::errc::protocol_error);  // trailing bytes
    return t;
  }

 private:
  template <typename Int>
  static void put(std::vector<std::byte>& out, Int v) {
    const auto* p = reinterpret_cast<const std::byte*>(&v);
    out.insert(out.end(), p, p + sizeof v);
  }

  // Reads an integer from the front of in, if there are enough bytes, and drops them from in.
  template <typename Int>
  [[nodiscard]] static bool take(std::span<const std::byte>& in, Int& v) {
    if (in.size() < sizeof v) return false;
    std::memcpy(&v, in.data(), sizeof v);
    in = in.subspan(sizeof v);
    return true;
  }
};

namespace {

void print(const order& o) {
  std::cout << "Worker: Received order " << o.id << ": " << o.quantity << " x "
            << std::string(o.symbol, strnlen(o.symbol, sizeof o.symbol)) << " at " << std::fixed
            << std::setprecision(2) << o.price << std::endl;
}

void print(const team& t) {
  std::cout << "Worker: Received team " << t.name << " with " << t.scores.size() << " scores:";
  for (const int s : t.scores) {
    std::cout << ' ' << s;
  }
  std::cout << std::endl;
}

// The worker thread: receives an order, a team and a malformed team, then answers.
void worker(duplex::channel ch) {
  auto o = ch.receive_value<order>();
  if (!o) {
    std::cerr << "Worker: order: " << o.error().message() << '\n';
    return;
  }
  print(*o);

  auto t = ch.receive_value<team>();
  if (!t) {
    std::cerr << "Worker: team: " << t.error().message() << '\n';
    return;
  }
  print(*t);

  // A decode failure refuses that one message; the channel itself carries on.
  auto bad = ch.receive_value<team>();
  if (bad) {
    std::cerr << "Worker: a malformed team was accepted\n";
    return;
  }
  if (bad.error() == duplex::errc::protocol_error) {
    std::cout << "Worker: Refused a malformed team (protocol_error): " << bad.error().message()
              << std::endl;
  }

  // std::string has a built-in codec too.
  if (auto r = ch.send_value(std::string("2 values received, 1 refused")); !r) {
    std::cerr << "Worker: send: " << r.error().message() << '\n';
  }
}

}  // namespace

int run() {
  auto ends = duplex::channel_pair();
  if (!ends) {
    std::cerr << "channel_pair: " << ends.error().message() << '\n';
    return EXIT_FAILURE;
  }
  std::thread thread(worker, std::move(ends->second));
  duplex::channel& ch = ends->first;

  const order o{1001, 100, 12.5, "ACME"};
  const team t{"Core", {7, 9, 12}};
  // A team cut short inside its last score, as a buggy or hostile peer might send it.
  std::vector<std::byte> malformed;
  duplex::codec<team>::encode(t, malformed);
  malformed.erase(malformed.end() - 2, malformed.end());

  // Sends the three messages; stops at the first failure.
  auto send_all = [&]() -> duplex::result<void> {
    if (auto r = ch.send_value(o); !r) return r;
    if (auto r = ch.send_value(t); !r) return r;
    return ch.send(duplex::const_buffer(malformed));
  };

  int status = EXIT_FAILURE;
  std::cout << "Main: Sending an order, a team and a malformed team..." << std::endl;
  if (auto r = send_all(); !r) {
    std::cerr << "Main: send: " << r.error().message() << '\n';
  } else if (auto reply = ch.receive_value<std::string>(); !reply) {
    std::cerr << "Main: receive: " << reply.error().message() << '\n';
  } else {
    std::cout << "Main: Worker replied: " << *reply << std::endl;
    status = EXIT_SUCCESS;
  }
  // Shut down both ways: if anything failed, this wakes the worker (errc::peer_closed).
  ch.close();
  thread.join();
  return status;
}

// What the example printed is its result: output that could not be written (a full disk, a
// closed pipe) is a failure, not an exit status of 0.
int main() {
  const int status = run();
  if (!std::cout.flush()) {
    std::cerr << "typed_messages: output lost\n";
    return EXIT_FAILURE;
  }
  return status;
}
