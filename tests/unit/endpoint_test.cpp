// Tests of duplex/endpoint.hpp and of what a tcp socket refuses: real sockets throughout (unix
// paths, abstract names, tcp over IPv4 and IPv6 loopback), including hostile clients.
#include "duplex/endpoint.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <cstring>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "duplex/channel.hpp"
#include "duplex/process.hpp"
#include "duplex/socket.hpp"
#include "duplex/waiter.hpp"
#include "endpoint/handshake.hpp"
#include "support.hpp"

namespace duplex {
namespace {

using namespace std::chrono_literals;
using test::HasError;
using test::Succeeded;

class endpoint_test : public test::fd_checked {};

// A connected TCP pair over IPv4 loopback, made with plain syscalls.
std::pair<unique_fd, unique_fd> raw_tcp_pair() {
  unique_fd l(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(a);
  EXPECT_EQ(::bind(l.get(), reinterpret_cast<sockaddr*>(&a), len), 0);
  EXPECT_EQ(::listen(l.get(), 1), 0);
  EXPECT_EQ(::getsockname(l.get(), reinterpret_cast<sockaddr*>(&a), &len), 0);
  unique_fd c(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  EXPECT_EQ(::connect(c.get(), reinterpret_cast<sockaddr*>(&a), len), 0);
  unique_fd s(::accept4(l.get(), nullptr, nullptr, SOCK_CLOEXEC));
  return {std::move(c), std::move(s)};
}

// --- what a tcp socket carries and refuses ----------------------------------------------------

TEST_F(endpoint_test, FromFdAdoptsAConnectedTcpStreamOnly) {
  auto [c, s] = raw_tcp_pair();
  auto adopted = socket::from_fd(std::move(c));
  ASSERT_THAT(adopted, Succeeded());
  EXPECT_EQ(adopted->kind(), socket_kind::stream);
  EXPECT_EQ(adopted->domain(), socket_domain::tcp);
  unique_fd udp(::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0));
  EXPECT_THAT(socket::from_fd(std::move(udp)), HasError(errc::wrong_kind));
  unique_fd unconnected(::socket(AF_INET6, SOCK_STREAM | SOCK_CLOEXEC, 0));
  EXPECT_THAT(socket::from_fd(std::move(unconnected)), HasError(errc::wrong_kind));
}

TEST_F(endpoint_test, TcpSocketRefusesFdsAndCredentialsSendingNothing) {
  auto [c, s] = raw_tcp_pair();
  auto a = test::must(socket::from_fd(std::move(c)));
  auto b = test::must(socket::from_fd(std::move(s)));
  const std::array<const_buffer, 1> bytes{as_bytes("x")};
  const std::array<int, 1> fds{0};
  EXPECT_THAT(a.send_msg(bytes, fds), HasError(errc::not_supported));
  EXPECT_THAT(a.peer_credentials(), HasError(errc::not_supported));
  EXPECT_THAT(a.peer_pidfd(), HasError(errc::not_supported));
  std::array<std::byte, 4> buf{};
  EXPECT_THAT(b.receive(buf, 50ms), HasError(errc::timed_out));  // nothing was sent
}

TEST_F(endpoint_test, TcpChannelRefusesFdsAndSharedMemorySendingNothing) {
  auto [c, s] = raw_tcp_pair();
  auto a = test::must(channel::create(test::must(socket::from_fd(std::move(c)))));
  auto b = test::must(channel::create(test::must(socket::from_fd(std::move(s)))));
  const std::array<int, 1> fds{0};
  EXPECT_THAT(a.send(as_bytes("x"), fds), HasError(errc::not_supported));
  EXPECT_THAT(a.try_send(as_bytes("x"), fds), HasError(errc::not_supported));
  auto buffer = a.allocate(16);
  ASSERT_THAT(buffer, Succeeded());
  EXPECT_THAT(a.send(std::move(*buffer)), HasError(errc::not_supported));  // the pool's memfd
  EXPECT_THAT(a.peer_credentials(), HasError(errc::not_supported));
  EXPECT_THAT(b.receive(50ms), HasError(errc::timed_out));  // nothing was sent
  ASSERT_THAT(a.send(as_bytes("after")), Succeeded());      // and the channel goes on
  auto m = b.receive(1s);
  ASSERT_THAT(m, Succeeded());
  EXPECT_EQ(m->text(), "after");
}

TEST_F(endpoint_test, InheritedChannelTakesAConnectedTcpStream) {
  // What a server does for a worker: the connection at an fd named by DUPLEX_FD.
  auto [c, s] = raw_tcp_pair();
  const int status = test::run_in_child([&, fd = s.get()] {
    if (::setenv("DUPLEX_FD", std::to_string(fd).c_str(), 1) != 0) return 1;
    auto ch = inherited_channel();
    if (!ch) return 2;
    if (ch->kind() != socket_kind::stream) return 3;
    const std::array<int, 1> fds{0};
    if (ch->send(as_bytes("x"), fds).error() != errc::not_supported) return 4;
    return ch->send(as_bytes("from the worker")) ? 0 : 5;
  });
  EXPECT_EQ(status, 0);
  s.reset();
  auto a = test::must(channel::create(test::must(socket::from_fd(std::move(c)))));
  auto m = a.receive(5s);
  ASSERT_THAT(m, Succeeded());
  EXPECT_EQ(m->text(), "from the worker");
}

// --- addresses --------------------------------------------------------------------------------

TEST(address, CanonicalFormsRoundTrip) {
  for (const char* text :
       {"unix:/run/app.sock", "unix:relative/path", "unix:@app", "tcp:127.0.0.1:7000",
        "tcp:[::1]:7000", "tcp:example.org:0", "tcp:[fe80::1]:65535"}) {
    auto a = address::parse(text);
    ASSERT_THAT(a, Succeeded()) << text << ": " << describe_address_error(text);
    EXPECT_EQ(a->to_string(), text);
    EXPECT_EQ(describe_address_error(text), "");
  }
  auto a = test::must(address::parse("tcp:[::1]:80"));
  EXPECT_EQ(a.kind(), address_kind::tcp);
  EXPECT_EQ(a.name(), "::1");
  EXPECT_EQ(a.port(), 80);
  EXPECT_EQ(test::must(address::parse("unix:@x")).kind(), address_kind::unix_abstract);
  EXPECT_EQ(test::must(address::parse("unix:@x")).name(), "x");
  EXPECT_EQ(test::must(address::tcp("::1", 5)).to_string(), "tcp:[::1]:5");
}

TEST(address, EachMalformedKindIsEinvalWithAReason) {
  const std::string long_path(max_unix_path_size + 1, 'p');
  const std::pair<std::string, std::string> cases[] = {
      {"", "empty"},
      {"/run/app.sock", "no scheme"},
      {"udp:1.2.3.4:5", "unknown scheme 'udp'"},
      {"unix:", "path is empty"},
      {"unix:@", "abstract name is empty"},
      {"unix:" + long_path, "over the 107"},
      {"unix:@" + long_path, "over the 107"},
      {std::string("unix:a\0b", 8), "NUL"},
      {"tcp:", "no port"},
      {"tcp:host", "no port"},
      {"tcp::80", "host is empty"},
      {"tcp:host:", "port is empty"},
      {"tcp:host:http", "not a number"},
      {"tcp:host:-1", "not a number"},
      {"tcp:host:70000", "over 65535"},
      {"tcp:host:99999999999999999999", "over 65535"},
      {"tcp:::1:80", "must be in brackets"},
      {"tcp:[::1:80", "closing ']'"},
      {"tcp:[::1]80", "no ':PORT'"},
      {"tcp:[1.2.3.4]:80", "not an IPv6 address"},
      {"tcp:ho st:80", "space or a control byte"},
      {"tcp:" + std::string(300, 'h') + ":80", "over 253"},
  };
  for (const auto& [text, reason] : cases) {
    EXPECT_THAT(address::parse(text), HasError(test::sys(EINVAL))) << text;
    EXPECT_THAT(describe_address_error(text), ::testing::HasSubstr(reason)) << text;
  }
  EXPECT_THAT(address::unix_path(""), HasError(test::sys(EINVAL)));
  EXPECT_THAT(address::tcp("a b", 1), HasError(test::sys(EINVAL)));
}

// --- listening and connecting -----------------------------------------------------------------

// A fresh path in a directory of its own, removed at the end.
class temp_dir {
 public:
  temp_dir() {
    std::string t = "/tmp/duplex-endpoint-XXXXXX";
    path_ = ::mkdtemp(t.data());
  }
  ~temp_dir() { std::system(("rm -rf '" + path_ + "'").c_str()); }
  [[nodiscard]] std::string file(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

std::string unique_name(const char* what) {
  static std::atomic<int> n{0};
  return std::string("duplex-test-") + what + "-" + std::to_string(::getpid()) + "-" +
         std::to_string(n++);
}

std::vector<std::byte> key_of(std::string_view s) {
  const auto b = as_bytes(s);
  return {b.begin(), b.end()};
}

// Connects from another thread while this one accepts; both ends exchange one message each way.
void round_trip(listener& l, const endpoint_options& client = {}) {
  result<channel> c = fail(errc::closed);
  std::thread t([&] { c = connect(l.local_address(), client, 5s); });
  auto conn = l.accept(5s);
  t.join();
  ASSERT_THAT(c, Succeeded());
  ASSERT_THAT(conn, Succeeded()) << (l.last_failure() ? l.last_failure()->detail : "");
  ASSERT_THAT(c->send(as_bytes("ping")), Succeeded());
  auto m = conn->chan.receive(5s);
  ASSERT_THAT(m, Succeeded());
  EXPECT_EQ(m->text(), "ping");
  ASSERT_THAT(conn->chan.send(as_bytes("pong")), Succeeded());
  auto r = c->receive(5s);
  ASSERT_THAT(r, Succeeded());
  EXPECT_EQ(r->text(), "pong");
}

TEST_F(endpoint_test, UnixPathStreamAndSeqpacketRoundTrip) {
  temp_dir dir;
  for (const auto kind : {socket_kind::stream, socket_kind::seqpacket}) {
    const auto at = test::must(address::unix_path(dir.file(std::string(to_string(kind)))));
    listener_options o;
    o.endpoint.kind = kind;
    auto l = test::must(listener::listen(at, o));
    EXPECT_GE(l.native_handle(), 0);
    round_trip(l, o.endpoint);
    l.close();
    o.endpoint.authkey = key_of("secret");
    l = test::must(listener::listen(at, o));
    round_trip(l, o.endpoint);
  }
}

TEST_F(endpoint_test, AbstractNameRoundTripWithAndWithoutKey) {
  const auto at = test::must(address::unix_abstract(unique_name("abstract")));
  auto l = test::must(listener::listen(at));
  round_trip(l);
  listener_options o;
  o.endpoint.authkey = key_of("k");
  auto keyed =
      test::must(listener::listen(test::must(address::unix_abstract(unique_name("k"))), o));
  round_trip(keyed, o.endpoint);
}

TEST_F(endpoint_test, TcpV4AndV6RoundTripWithPortZero) {
  listener_options o;
  o.endpoint.authkey = key_of("tcp key");
  auto l = test::must(listener::listen(test::must(address::parse("tcp:127.0.0.1:0")), o));
  EXPECT_NE(l.local_address().port(), 0);
  round_trip(l, o.endpoint);
  auto v6 = listener::listen(test::must(address::parse("tcp:[::1]:0")), o);
  if (!v6) GTEST_SKIP() << "no IPv6 loopback here: " << v6.error().message();
  EXPECT_EQ(v6->local_address().name(), "::1");
  round_trip(*v6, o.endpoint);
}

TEST_F(endpoint_test, AcceptedTcpConnectionNamesThePeerAndRefusesWhatCannotCrossAHost) {
  auto l = test::must(listener::listen(test::must(address::parse("tcp:127.0.0.1:0"))));
  listener_options shm;
  shm.endpoint.channel.shared_memory.enabled = true;
  EXPECT_THAT(listener::listen(test::must(address::parse("tcp:127.0.0.1:0")), shm),
              HasError(errc::not_supported));
  EXPECT_THAT(connect(l.local_address(), shm.endpoint, 1s), HasError(errc::not_supported));
  auto c = test::must(connect(l.local_address(), {}, 5s));
  auto conn = test::must(l.accept(5s));
  EXPECT_EQ(conn.peer.kind(), address_kind::tcp);
  EXPECT_EQ(conn.peer.name(), "127.0.0.1");
  EXPECT_FALSE(conn.peer_credentials);
  EXPECT_FALSE(conn.peer_pidfd.valid());
  const std::array<int, 1> fds{0};
  EXPECT_THAT(c.send(as_bytes("x"), fds), HasError(errc::not_supported));
  EXPECT_THAT(conn.chan.peer_credentials(), HasError(errc::not_supported));
  EXPECT_THAT(conn.chan.receive(50ms), HasError(errc::timed_out));
}

int int_option(int fd, int level, int name) {
  int v = -1;
  socklen_t len = sizeof v;
  EXPECT_EQ(::getsockopt(fd, level, name, &v, &len), 0);
  return v;
}

TEST_F(endpoint_test, TcpNodelayByDefaultAndKeepaliveAsAsked) {
  listener_options o;
  o.endpoint.keepalive = {.enabled = true, .idle = 30s, .interval = 5s, .count = 3};
  auto l = test::must(listener::listen(test::must(address::parse("tcp:127.0.0.1:0")), o));
  auto c = test::must(connect(l.local_address(), {}, 5s));
  auto conn = test::must(l.accept(5s));
  EXPECT_EQ(int_option(c.native_handle(), IPPROTO_TCP, TCP_NODELAY), 1);
  EXPECT_EQ(int_option(c.native_handle(), SOL_SOCKET, SO_KEEPALIVE), 0);
  const int s = conn.chan.native_handle();
  EXPECT_EQ(int_option(s, IPPROTO_TCP, TCP_NODELAY), 1);
  EXPECT_EQ(int_option(s, SOL_SOCKET, SO_KEEPALIVE), 1);
  EXPECT_EQ(int_option(s, IPPROTO_TCP, TCP_KEEPIDLE), 30);
  EXPECT_EQ(int_option(s, IPPROTO_TCP, TCP_KEEPINTVL), 5);
  EXPECT_EQ(int_option(s, IPPROTO_TCP, TCP_KEEPCNT), 3);
  endpoint_options off;
  off.tcp_nodelay = false;
  auto c2 = test::must(connect(l.local_address(), off, 5s));
  EXPECT_EQ(int_option(c2.native_handle(), IPPROTO_TCP, TCP_NODELAY), 0);
  (void)l.accept(1s);
  o.endpoint.keepalive.count = 0;
  EXPECT_THAT(listener::listen(test::must(address::parse("tcp:127.0.0.1:0")), o),
              HasError(test::sys(EINVAL)));
}

TEST_F(endpoint_test, KeyedClientOfAKeylessListenerTimesOut) {
  auto l = test::must(listener::listen(test::must(address::unix_abstract(unique_name("nokey")))));
  endpoint_options keyed;
  keyed.authkey = key_of("k");
  const auto start = std::chrono::steady_clock::now();
  result<channel> c = fail(errc::closed);
  std::thread t([&] { c = connect(l.local_address(), keyed, 300ms); });
  auto conn = l.accept(5s);  // no key: the connection is handed out at once, and says nothing
  t.join();
  EXPECT_THAT(conn, Succeeded());
  EXPECT_THAT(c, HasError(errc::timed_out));
  EXPECT_LT(std::chrono::steady_clock::now() - start, 3s);
}

TEST_F(endpoint_test, ListenerFdWorksInAWaiter) {
  auto l = test::must(listener::listen(test::must(address::unix_abstract(unique_name("w")))));
  auto w = test::must(waiter::create());
  ASSERT_THAT(w.add(l.native_handle(), 7), Succeeded());
  EXPECT_THAT(w.wait(20ms), HasError(errc::timed_out));  // nothing waiting yet
  auto c = test::must(connect(l.local_address(), {}, 5s));
  ASSERT_THAT(w.wait(5s), Succeeded());
  auto e = w.next();
  ASSERT_TRUE(e);
  EXPECT_EQ(e->key, 7U);
  EXPECT_THAT(l.accept(0ns), Succeeded());
  ASSERT_THAT(w.remove(l.native_handle()), Succeeded());
}

TEST_F(endpoint_test, UnixConnectionCarriesTheConnectingProcessCredentialsAndPidfd) {
  auto l = test::must(listener::listen(test::must(address::unix_abstract(unique_name("cred")))));
  auto c = test::must(connect(l.local_address(), {}, 5s));
  auto conn = test::must(l.accept(5s));
  ASSERT_TRUE(conn.peer_credentials);
  EXPECT_EQ(conn.peer_credentials->pid, ::getpid());
  EXPECT_EQ(conn.peer_credentials->uid, ::geteuid());
  EXPECT_TRUE(conn.peer_pidfd.valid());
  // fds cross a unix endpoint as they cross a pair.
  auto [r, w] = test::make_pipe();
  const std::array<int, 1> fds{r.get()};
  ASSERT_THAT(c.send(as_bytes("fd"), fds), Succeeded());
  auto m = test::must(conn.chan.receive(5s));
  EXPECT_EQ(m.fds().size(), 1U);
}

TEST_F(endpoint_test, StaleSocketFileIsReplacedALiveOneOrAnyOtherFileIsNot) {
  temp_dir dir;
  const auto path = dir.file("s");
  const auto at = test::must(address::unix_path(path));
  {
    // A socket file nothing listens on: what a process that died leaves.
    unique_fd s(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    sockaddr_un un{};
    un.sun_family = AF_UNIX;
    std::strcpy(un.sun_path, path.c_str());
    ASSERT_EQ(::bind(s.get(), reinterpret_cast<sockaddr*>(&un), sizeof un), 0);
  }
  auto l = test::must(listener::listen(at));
  EXPECT_THAT(listener::listen(at), HasError(test::sys(EADDRINUSE)));  // live: left alone
  // The probe was a connection like any other, closed at once.
  auto probe = test::must(l.accept(1s));
  EXPECT_THAT(probe.chan.receive(1s), HasError(errc::peer_closed));
  round_trip(l);
  l.close();
  struct stat st {};
  EXPECT_NE(::lstat(path.c_str(), &st), 0);  // removed on close
  std::ofstream(path) << "not a socket";
  EXPECT_THAT(listener::listen(at), HasError(test::sys(EADDRINUSE)));
  EXPECT_EQ(::lstat(path.c_str(), &st), 0);  // and kept
}

TEST_F(endpoint_test, PathIsRemovedWhenTheListenerIsDestroyed) {
  temp_dir dir;
  const auto path = dir.file("gone");
  { auto l = test::must(listener::listen(test::must(address::unix_path(path)))); }
  struct stat st {};
  EXPECT_NE(::lstat(path.c_str(), &st), 0);
}

TEST_F(endpoint_test, ListenAndConnectRefuseWhatTheyCannotDo) {
  const auto tcp = test::must(address::parse("tcp:127.0.0.1:0"));
  listener_options o;
  o.endpoint.kind = socket_kind::seqpacket;
  EXPECT_THAT(listener::listen(tcp, o), HasError(test::sys(EINVAL)));
  o.endpoint.kind = socket_kind::datagram;
  EXPECT_THAT(listener::listen(test::must(address::unix_abstract("x")), o),
              HasError(test::sys(EINVAL)));
  EXPECT_THAT(listener::listen(address{}), HasError(test::sys(EINVAL)));
  EXPECT_THAT(connect(tcp, {}, 1s), HasError(test::sys(EINVAL)));  // port 0
  std::string why;
  EXPECT_THAT(connect(test::must(address::unix_abstract(unique_name("nobody"))), {}, 1s, why),
              HasError(test::sys(ECONNREFUSED)));
  EXPECT_THAT(why, ::testing::HasSubstr("cannot connect"));
  EXPECT_THAT(connect(test::must(address::parse("tcp:no-such-host.invalid:80")), {}, 5s, why),
              HasError(test::sys(EHOSTUNREACH)));
  EXPECT_THAT(why, ::testing::HasSubstr("no-such-host.invalid"));
}

TEST_F(endpoint_test, UidFilterRefusesBeforeAnyByteAndServesTheNext) {
  listener_options o;
  o.allowed_uids = {::geteuid() + 1};
  o.endpoint.authkey = key_of("k");
  std::vector<accept_failure> seen;
  o.on_failure = [&](const accept_failure& f) { seen.push_back(f); };
  auto l = test::must(listener::listen(test::must(address::unix_abstract(unique_name("uid"))), o));
  result<channel> c = fail(errc::closed);
  std::thread t([&] { c = connect(l.local_address(), o.endpoint, 5s); });
  EXPECT_THAT(l.accept(300ms), HasError(errc::timed_out));
  t.join();
  EXPECT_THAT(c, HasError(errc::peer_closed));  // closed without a byte
  ASSERT_EQ(seen.size(), 1U);
  EXPECT_EQ(seen[0].error, std::error_code(EACCES, std::system_category()));
  EXPECT_EQ(l.failures(), 1U);
  ASSERT_TRUE(l.last_failure());
  EXPECT_THAT(l.last_failure()->peer, ::testing::HasSubstr("pid " + std::to_string(::getpid())));
  o.allowed_uids.push_back(::geteuid());
  auto allowed =
      test::must(listener::listen(test::must(address::unix_abstract(unique_name("uid2"))), o));
  round_trip(allowed, o.endpoint);
}

// --- authentication -----------------------------------------------------------------------------

TEST_F(endpoint_test, WrongKeyFailsOnBothSidesAndTheNextClientIsServed) {
  listener_options o;
  o.endpoint.authkey = key_of("right");
  auto l = test::must(listener::listen(test::must(address::unix_abstract(unique_name("key"))), o));
  endpoint_options wrong;
  wrong.authkey = key_of("wrong");
  result<channel> c = fail(errc::closed);
  std::string why;
  std::thread t([&] { c = connect(l.local_address(), wrong, 5s, why); });
  EXPECT_THAT(l.accept(300ms), HasError(errc::timed_out));
  t.join();
  EXPECT_THAT(c, HasError(errc::authentication_failed));
  EXPECT_THAT(why, ::testing::HasSubstr("refused our answer"));
  ASSERT_TRUE(l.last_failure());
  EXPECT_EQ(l.last_failure()->error, errc::authentication_failed);
  round_trip(l, o.endpoint);
}

TEST_F(endpoint_test, ClientRefusesAListenerThatDoesNotKnowTheKey) {
  // The listener answers our challenge wrongly: a key that matched our answer by chance is no
  // proof, the client checks the listener too (mutual authentication).
  auto l = test::must(listener::listen(test::must(address::unix_abstract(unique_name("mut")))));
  std::thread t([&] {
    auto raw = l.accept(5s);
    if (!raw) return;
    // The listener's part, by a handshake machine that checks the client's answer with the
    // client's key and then answers the client's challenge with another.
    auto key = key_of("mine");
    detail::handshake hs(detail::handshake_role::listener, key, true);
    (void)hs.start();
    const int fd = raw->chan.native_handle();
    while (!hs.done() && !hs.failed()) {
      auto out = hs.output();
      if (as_string_view(out).ends_with("#WELCOME#")) key[0] = std::byte{'X'};
      if (!out.empty()) {
        const ssize_t n = ::send(fd, out.data(), out.size(), MSG_NOSIGNAL);
        if (n <= 0) return;
        hs.wrote(static_cast<std::size_t>(n));
        continue;
      }
      std::array<std::byte, 300> buf;
      const ssize_t n = ::recv(fd, buf.data(), hs.input_wanted(), 0);
      if (n <= 0) return;
      (void)hs.feed(std::span(buf).first(static_cast<std::size_t>(n)));
    }
  });
  endpoint_options keyed;
  keyed.authkey = key_of("mine");
  EXPECT_THAT(connect(l.local_address(), keyed, 5s), HasError(errc::authentication_failed));
  t.join();
}

TEST(handshake, BothRolesAgreeAndRefuseLegacyWhenTold) {
  const auto key = key_of("key");
  const auto run = [](detail::handshake& a, detail::handshake& b) {
    for (int i = 0; i < 20 && !(a.done() && b.done()) && !a.failed() && !b.failed(); ++i) {
      const std::array<std::pair<detail::handshake*, detail::handshake*>, 2> turns{
          {{&a, &b}, {&b, &a}}};
      for (const auto& [from, to] : turns) {
        auto out = from->output();
        std::vector<std::byte> copy(out.begin(), out.end());
        from->wrote(copy.size());
        std::size_t at = 0;
        while (at < copy.size() && to->input_wanted() > 0) {
          const auto n = std::min(to->input_wanted(), copy.size() - at);
          (void)to->feed(std::span(copy).subspan(at, n));
          at += n;
        }
      }
    }
  };
  detail::handshake l(detail::handshake_role::listener, key, true);
  detail::handshake c(detail::handshake_role::client, key, true);
  ASSERT_THAT(l.start(), Succeeded());
  ASSERT_THAT(c.start(), Succeeded());
  run(l, c);
  EXPECT_TRUE(l.done());
  EXPECT_TRUE(c.done());

  // A legacy (CPython 3.11) listener's 20-byte challenge: answered with a raw HMAC-MD5, or
  // refused when MD5 is.
  std::vector<std::byte> legacy = key_of("#CHALLENGE#");
  legacy.resize(legacy.size() + 20, std::byte{7});
  std::vector<std::byte> frame = test::python_frame(legacy);
  detail::handshake ok(detail::handshake_role::client, key, true);
  ASSERT_THAT(ok.start(), Succeeded());
  ASSERT_THAT(ok.feed(std::span(frame).first(4)), Succeeded());
  ASSERT_THAT(ok.feed(std::span(frame).subspan(4)), Succeeded());
  EXPECT_EQ(ok.output().size(), 4U + 16U);  // a raw 16-byte MD5
  detail::handshake no(detail::handshake_role::client, key, false);
  ASSERT_THAT(no.start(), Succeeded());
  ASSERT_THAT(no.feed(std::span(frame).first(4)), Succeeded());
  EXPECT_THAT(no.feed(std::span(frame).subspan(4)), HasError(errc::authentication_failed));
}

TEST(handshake, OversizedGarbageAndShortMessagesAreRefusedFromTheirLength) {
  const auto key = key_of("key");
  detail::handshake big(detail::handshake_role::client, key, true);
  ASSERT_THAT(big.start(), Succeeded());
  const std::array<std::byte, 4> huge{std::byte{0xff}, std::byte{0xff}, std::byte{0xff},
                                      std::byte{0xff}};
  EXPECT_THAT(big.feed(huge), HasError(errc::protocol_error));  // before any body byte
  EXPECT_THAT(big.detail(), ::testing::HasSubstr("over 256"));
  EXPECT_EQ(big.input_wanted(), 0U);

  detail::handshake garbage(detail::handshake_role::client, key, true);
  ASSERT_THAT(garbage.start(), Succeeded());
  auto g = test::python_frame(key_of("GET / HTTP/1.1\r\n"));
  ASSERT_THAT(garbage.feed(std::span(g).first(4)), Succeeded());
  EXPECT_THAT(garbage.feed(std::span(g).subspan(4)), HasError(errc::protocol_error));

  detail::handshake shortc(detail::handshake_role::client, key, true);
  ASSERT_THAT(shortc.start(), Succeeded());
  auto s = test::python_frame(key_of("#CHALLENGE#short"));
  ASSERT_THAT(shortc.feed(std::span(s).first(4)), Succeeded());
  EXPECT_THAT(shortc.feed(std::span(s).subspan(4)), HasError(errc::protocol_error));

  // A listener given a garbage answer says #FAILURE#, as CPython does.
  detail::handshake l(detail::handshake_role::listener, key, true);
  ASSERT_THAT(l.start(), Succeeded());
  l.wrote(l.output().size());
  auto a = test::python_frame(key_of("{sha256}not a mac"));
  ASSERT_THAT(l.feed(std::span(a).first(4)), Succeeded());
  EXPECT_THAT(l.feed(std::span(a).subspan(4)), HasError(errc::authentication_failed));
  EXPECT_EQ(as_string_view(l.output().subspan(4)), "#FAILURE#");
}

// --- hostile clients ----------------------------------------------------------------------------

// A raw client socket connected to a listener (no handshake of its own).
unique_fd raw_client(const address& at) {
  sockaddr_storage s{};
  socklen_t size = 0;
  int family = AF_UNIX;
  if (at.kind() == address_kind::tcp) {
    auto& in = reinterpret_cast<sockaddr_in&>(s);
    in.sin_family = AF_INET;
    in.sin_port = htons(at.port());
    ::inet_pton(AF_INET, at.name().c_str(), &in.sin_addr);
    size = sizeof in;
    family = AF_INET;
  } else {
    auto& un = reinterpret_cast<sockaddr_un&>(s);
    un.sun_family = AF_UNIX;
    std::memcpy(un.sun_path + 1, at.name().data(), at.name().size());
    size = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + at.name().size());
  }
  unique_fd fd(::socket(family, SOCK_STREAM | SOCK_CLOEXEC, 0));
  EXPECT_EQ(::connect(fd.get(), reinterpret_cast<sockaddr*>(&s), size), 0) << std::strerror(errno);
  return fd;
}

listener keyed_listener(std::chrono::nanoseconds handshake_timeout, std::size_t max = 64,
                        std::vector<accept_failure>* seen = nullptr) {
  listener_options o;
  o.endpoint.authkey = key_of("key");
  o.handshake_timeout = handshake_timeout;
  o.max_handshakes = max;
  if (seen != nullptr) o.on_failure = [seen](const accept_failure& f) { seen->push_back(f); };
  return test::must(listener::listen(test::must(address::unix_abstract(unique_name("h"))), o));
}

endpoint_options keyed() {
  endpoint_options e;
  e.authkey = key_of("key");
  return e;
}

TEST_F(endpoint_test, SilentClientIsDroppedAtTheDeadlineWhileAGoodOneIsServed) {
  std::vector<accept_failure> seen;
  auto l = keyed_listener(400ms, 64, &seen);
  auto silent = raw_client(l.local_address());
  round_trip(l, keyed());  // served at once, the silent one still waiting
  EXPECT_TRUE(seen.empty());
  const auto start = std::chrono::steady_clock::now();
  EXPECT_THAT(l.accept(2s), HasError(errc::timed_out));
  ASSERT_EQ(seen.size(), 1U);
  EXPECT_EQ(seen[0].error, errc::timed_out);
  EXPECT_LT(std::chrono::steady_clock::now() - start, 2s + 100ms);
  // Its connection was closed: the silent client reads the challenge, then end-of-stream.
  std::array<char, 256> buf;
  ssize_t n = 0;
  while ((n = ::recv(silent.get(), buf.data(), buf.size(), 0)) > 0) {
  }
  EXPECT_EQ(n, 0);
}

TEST_F(endpoint_test, SlowDripClientIsDroppedAtTheDeadline) {
  std::vector<accept_failure> seen;
  auto l = keyed_listener(500ms, 64, &seen);
  auto drip = raw_client(l.local_address());
  std::atomic<bool> stop{false};
  std::thread t([&] {
    // A plausible answer's length, then one byte every 100 ms: never a whole message in time.
    const std::array<unsigned char, 4> head{0, 0, 0, 40};
    ::send(drip.get(), head.data(), head.size(), MSG_NOSIGNAL);
    for (int i = 0; i < 30 && !stop; ++i) {
      if (::send(drip.get(), "x", 1, MSG_NOSIGNAL) != 1) break;
      std::this_thread::sleep_for(100ms);
    }
  });
  const auto start = std::chrono::steady_clock::now();
  EXPECT_THAT(l.accept(1500ms), HasError(errc::timed_out));
  stop = true;
  t.join();
  ASSERT_EQ(seen.size(), 1U);
  EXPECT_EQ(seen[0].error, errc::timed_out);
  EXPECT_GE(std::chrono::steady_clock::now() - start, 500ms);
}

// Waits for native_handle() to be readable, without limit (POLLIN or an error), and says whether
// it was.
bool readable(const listener& l, int timeout_ms = -1) {
  pollfd p{l.native_handle(), POLLIN, 0};
  return ::poll(&p, 1, timeout_ms) == 1;
}

TEST_F(endpoint_test, PollOnTheListenerFdAloneServesAnAuthenticatedClient) {
  // An event loop's way: wait (without limit) for native_handle(), then accept(0). The client's
  // handshake bytes arrive on a connection already taken from the backlog: they must wake the
  // loop as a new connection does.
  auto l = keyed_listener(10s);
  const auto at = l.local_address();
  std::atomic<bool> gave_up{false};
  std::atomic<bool> done{false};
  std::thread watchdog([&] {
    const auto until = std::chrono::steady_clock::now() + 20s;
    while (!done && std::chrono::steady_clock::now() < until)
      std::this_thread::sleep_for(10ms);
    if (done) return;
    gave_up = true;
    // Ends the stalled poll: a connection in the backlog makes any listener fd readable.
    (void)raw_client(at);
  });
  result<channel> c = fail(errc::closed);
  std::thread client([&] { c = connect(at, keyed(), 30s); });
  std::optional<connection> got;
  int rounds = 0;
  while (!gave_up) {
    if (!readable(l)) break;
    ++rounds;
    auto r = l.accept(0ns);
    if (r) {
      got = std::move(*r);
      break;
    }
    EXPECT_THAT(r, HasError(errc::timed_out));
    if (r.error() != errc::timed_out) break;
  }
  done = true;
  watchdog.join();
  client.join();
  EXPECT_FALSE(gave_up) << "the listener fd stayed silent while a handshake could go on";
  ASSERT_TRUE(got);
  ASSERT_THAT(c, Succeeded());
  // Readable only when accept(0) may make progress: a handful of rounds, not a busy loop.
  EXPECT_LT(rounds, 20);
  ASSERT_THAT(c->send(as_bytes("hi")), Succeeded());
  EXPECT_EQ(test::must(got->chan.receive(5s)).text(), "hi");
}

TEST_F(endpoint_test, ListenerFdIsReadableWhenAHandshakeDeadlinePassesAndNotWhenFull) {
  std::vector<accept_failure> seen;
  auto l = keyed_listener(300ms, 1, &seen);
  auto silent = raw_client(l.local_address());
  auto waiting = raw_client(l.local_address());  // beyond max_handshakes: stays in the backlog
  ASSERT_TRUE(readable(l, 5000));
  EXPECT_THAT(l.accept(0ns), HasError(errc::timed_out));  // the first taken, its challenge sent
  // Nothing accept(0) could do now: the silent one says nothing, the other one has no room.
  EXPECT_FALSE(readable(l, 0));
  const auto start = std::chrono::steady_clock::now();
  ASSERT_TRUE(readable(l, 5000));  // the deadline passed
  EXPECT_GE(std::chrono::steady_clock::now() - start, 200ms);
  EXPECT_THAT(l.accept(0ns), HasError(errc::timed_out));
  ASSERT_GE(seen.size(), 1U);
  EXPECT_EQ(seen[0].error, errc::timed_out);
}

TEST_F(endpoint_test, OversizedGarbageAndTruncatedAnswersAreRefusedAndTheListenerGoesOn) {
  std::vector<accept_failure> seen;
  auto l = keyed_listener(5s, 64, &seen);
  const auto send_raw = [&](std::vector<unsigned char> bytes) {
    auto c = raw_client(l.local_address());
    ::send(c.get(), bytes.data(), bytes.size(), MSG_NOSIGNAL);
    return c;
  };
  auto big = send_raw({0x7f, 0xff, 0xff, 0xff});         // 2 GiB announced
  auto garbage = send_raw({0, 0, 0, 3, 'a', 'b', 'c'});  // not an answer
  auto truncated = send_raw({0, 0, 0, 40, 'x', 'y'});    // then the client leaves
  truncated.reset();
  EXPECT_THAT(l.accept(300ms), HasError(errc::timed_out));
  ASSERT_EQ(seen.size(), 3U);
  std::vector<std::error_code> errors;
  for (const auto& f : seen)
    errors.push_back(f.error);
  EXPECT_THAT(errors, ::testing::UnorderedElementsAre(make_error_code(errc::protocol_error),
                                                      make_error_code(errc::authentication_failed),
                                                      make_error_code(errc::peer_closed)));
  round_trip(l, keyed());
}

TEST_F(endpoint_test, HandshakesBeyondTheBoundWaitInTheBacklog) {
  std::vector<accept_failure> seen;
  auto l = keyed_listener(500ms, 2, &seen);
  auto s1 = raw_client(l.local_address());
  auto s2 = raw_client(l.local_address());
  EXPECT_THAT(l.accept(100ms), HasError(errc::timed_out));  // both taken into the handshake
  const auto start = std::chrono::steady_clock::now();
  round_trip(l, keyed());  // waits in the backlog until the two silent ones are dropped
  EXPECT_GE(std::chrono::steady_clock::now() - start, 300ms);
  EXPECT_EQ(seen.size(), 2U);
}

TEST_F(endpoint_test, ConnectDisconnectFloodLeaksNothing) {
  auto l = keyed_listener(5s, 16);
  const auto baseline = test::open_fd_count();
  for (int i = 0; i < 300; ++i) {
    auto c = raw_client(l.local_address());
    if (i % 2 == 0) ::send(c.get(), "\0\0\0\4abcd", 8, MSG_NOSIGNAL);
    c.reset();
    if (i % 20 == 0) (void)l.accept(1ms);
  }
  EXPECT_THAT(l.accept(300ms), HasError(errc::timed_out));
  EXPECT_EQ(test::open_fd_count(), baseline);  // every connection of the flood is closed
  EXPECT_EQ(l.failures(), 300U);
  round_trip(l, keyed());
}

TEST_F(endpoint_test, AcceptSurvivesEmfileWithoutABusyLoop) {
  const int status = test::run_in_child([] {
    ::alarm(20);  // an accept that spins for ever fails the test rather than hanging it
    auto l = listener::listen(test::must(address::unix_abstract(unique_name("emfile"))));
    if (!l) return 1;
    std::vector<unique_fd> clients;
    for (int i = 0; i < 3; ++i)
      clients.push_back(raw_client(l->local_address()));
    rlimit old{};
    ::getrlimit(RLIMIT_NOFILE, &old);
    if (!test::set_nofile(test::open_fd_count())) return 2;
    std::vector<unique_fd> filler;  // fills any gap below the limit: not one fd to spare
    for (unique_fd f; (f = unique_fd(::open("/dev/null", O_RDONLY | O_CLOEXEC))).valid();)
      filler.push_back(std::move(f));
    rusage before{};
    ::getrusage(RUSAGE_SELF, &before);
    auto r = l->accept(500ms);
    rusage after{};
    ::getrusage(RUSAGE_SELF, &after);
    ::setrlimit(RLIMIT_NOFILE, &old);
    const auto filled = filler.size();
    filler.clear();
    if (r || r.error() != errc::timed_out) {
      std::fprintf(stderr, "accept: %s failures %d fillers %zu\n",
                   r ? "a connection" : r.error().message().c_str(), int(l->failures()), filled);
      return 3;
    }
    if (l->failures() != 3) return 4;  // each was taken and closed
    const auto cpu_us = [](const rusage& u) {
      return (u.ru_utime.tv_sec + u.ru_stime.tv_sec) * 1'000'000L + u.ru_utime.tv_usec +
             u.ru_stime.tv_usec;
    };
    if (cpu_us(after) - cpu_us(before) > 150'000) return 5;  // it waited, it did not spin
    auto c = connect(l->local_address(), {}, 1s);
    if (!c) return 6;
    if (!l->accept(1s)) return 7;  // and accepts again once fds are there
    return 0;
  });
  EXPECT_EQ(status, 0);
}

TEST_F(endpoint_test, CloseFromAnotherThreadEndsAnAccept) {
  auto l = test::must(listener::listen(test::must(address::unix_abstract(unique_name("close")))));
  std::thread t([&] {
    std::this_thread::sleep_for(50ms);
    l.close();
  });
  EXPECT_THAT(l.accept(5s), HasError(errc::closed));
  t.join();
  EXPECT_EQ(l.native_handle(), -1);
}

TEST_F(endpoint_test, AuthkeyIsReadFromAFileOrAnFdExactly) {
  temp_dir dir;
  const auto path = dir.file("key");
  std::ofstream(path) << "secret\n";
  auto k = read_authkey_file(path);
  ASSERT_THAT(k, Succeeded());
  EXPECT_EQ(as_string_view(*k), "secret\n");
  auto [r, w] = test::make_pipe();
  ASSERT_EQ(::write(w.get(), "abc", 3), 3);
  w.reset();
  EXPECT_EQ(as_string_view(test::must(read_authkey_fd(r.get()))), "abc");
  std::ofstream(dir.file("empty")).flush();
  EXPECT_THAT(read_authkey_file(dir.file("empty")), HasError(test::sys(EINVAL)));
  EXPECT_THAT(read_authkey_file(dir.file("none")), HasError(test::sys(ENOENT)));
}

}  // namespace
}  // namespace duplex
