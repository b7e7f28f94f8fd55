// A C++ service that unrelated clients reach by name: one C++ client and one CPython Client.
//
// The service listens on an address (a unix abstract name by default) with an authkey, accepts
// two connections, and answers each message with its text upper-cased. Its clients are a C++
// connect() (a thread of this process) and CPython's own multiprocessing.connection.Client (a
// python3 process): both run the same authenticated handshake, and both frame with
// framing::python, so the service cannot tell them apart. The key goes to Python in a file,
// never on its command line. docs/endpoints.md has the handshake and the limits.
//
// Usage: endpoint_service [PYTHON [ADDRESS]]   (PYTHON defaults to python3, searched in PATH;
// ADDRESS to an abstract name of this process's own)
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <string>
#include <system_error>
#include <thread>

#include "duplex/duplex.hpp"

namespace {

using namespace std::chrono_literals;

int fail(const char* what, std::error_code ec, const std::string& detail = "") {
  std::cerr << what << ": " << (detail.empty() ? ec.message() : detail) << '\n';
  return EXIT_FAILURE;
}

// The service: each message comes back upper-cased, until the client closes.
void serve(duplex::channel& ch) {
  for (;;) {
    auto m = ch.receive();
    if (!m) return;  // peer_closed: the client is done
    std::string text(m->text());
    for (char& c : text)
      if (c >= 'a' && c <= 'z') c = static_cast<char>(c - 'a' + 'A');
    if (!ch.send(duplex::as_bytes(text))) return;
  }
}

// CPython's side, as a user would write it: the address and the key's file as arguments.
constexpr const char* python_client = R"(import sys
from multiprocessing.connection import Client
address = sys.argv[1]
if address.startswith("unix:@"):
    address, family = "\0" + address[6:], "AF_UNIX"
elif address.startswith("unix:"):
    address, family = address[5:], "AF_UNIX"
else:
    host, _, port = address[4:].rpartition(":")
    address, family = (host.strip("[]"), int(port)), "AF_INET"
with Client(address, family, authkey=open(sys.argv[2], "rb").read()) as c:
    c.send_bytes(b"hello from python")
    print("Python client got:", c.recv_bytes().decode(), flush=True)
)";

}  // namespace

int main(int argc, char** argv) {
  const std::string python = argc > 1 ? argv[1] : "python3";
  const std::string text =
      argc > 2 ? argv[2] : "unix:@duplex-endpoint-example-" + std::to_string(::getpid());
  auto at = duplex::address::parse(text);
  if (!at) return fail("address", at.error(), duplex::describe_address_error(text));

  // The shared key, in a file only this user can read (a real service reads its own, with
  // duplex::read_authkey_file).
  char key_path[] = "/tmp/duplex-example-key-XXXXXX";
  const int key_fd = ::mkstemp(key_path);
  if (key_fd < 0) return fail("mkstemp", std::error_code(errno, std::system_category()));
  const std::string secret = "a shared secret";
  const bool written =
      ::write(key_fd, secret.data(), secret.size()) == static_cast<ssize_t>(secret.size());
  ::close(key_fd);
  auto key = duplex::read_authkey_file(key_path);
  if (!written || !key) {
    ::unlink(key_path);
    return fail("key", key ? std::make_error_code(std::errc::io_error) : key.error());
  }

  duplex::listener_options options;
  options.endpoint.channel.format = duplex::framing::python;
  options.endpoint.authkey = *key;
  auto l = duplex::listener::listen(*at, options);
  if (!l) {
    ::unlink(key_path);
    return fail("listen", l.error());
  }
  const std::string where = l->local_address().to_string();
  std::cout << "Service: listening on " << where << std::endl;

  // The C++ client, in a thread: connect, one request, one reply.
  std::thread cpp_client([&] {
    std::string why;
    auto c = duplex::connect(l->local_address(), options.endpoint, 10s, why);
    if (!c) {
      std::cerr << "C++ client: " << why << '\n';
      return;
    }
    if (!c->send(duplex::as_bytes("hello from c++"))) return;
    if (auto reply = c->receive(10s)) std::cout << "C++ client got: " << reply->text() << std::endl;
  });
  // The Python client, a process of its own.
  auto py = duplex::spawn({python, "-c", python_client, where, key_path});

  int served = 0;
  for (; served < (py ? 2 : 1); ++served) {
    auto conn = l->accept(30s);
    if (!conn) break;
    serve(conn->chan);
  }
  cpp_client.join();
  int status = EXIT_SUCCESS;
  if (!py) {
    status = fail("python client", py.error());
  } else if (auto exit = py->wait(); !exit || !exit->success()) {
    std::cerr << "python client failed\n";
    status = EXIT_FAILURE;
  }
  ::unlink(key_path);
  std::cout << "Service: served " << served << " clients, " << l->failures() << " failed"
            << std::endl;
  return served == 2 ? status : EXIT_FAILURE;
}
