// A service on a unix socket path that unrelated clients reach by name, authenticated with a key
// read from a file: a C++ client (duplex::connect) and a Python one (CPython's own
// multiprocessing.connection.Client, examples/endpoint_client.py) are both answered, and a client
// with the wrong key is refused while the service goes on.
//
// The service speaks framing::python, so that CPython's Client is a valid peer; both sides run
// CPython's mutual HMAC handshake (docs/endpoints.md). Each request is a line of numbers; the
// reply is "sum N". One thread accepts and serves the clients one after the other; the main
// thread plays the clients.
//
// Usage: endpoint_service [PYTHON]   (PYTHON defaults to python3, searched in PATH)
#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "duplex/duplex.hpp"

#ifndef DUPLEX_PYTHON_CLIENT
#error \
    "DUPLEX_PYTHON_CLIENT must name examples/endpoint_client.py (examples/CMakeLists.txt sets it)"
#endif

namespace {

using namespace std::chrono_literals;

// "sum N" of the numbers in a request ("3 4 5" -> "sum 12"), or "not a list of numbers".
std::string answer(std::string_view request) {
  std::istringstream in{std::string(request)};
  long long sum = 0;
  long long n = 0;
  while (in >> n)
    sum += n;
  if (!in.eof()) return "not a list of numbers";
  return "sum " + std::to_string(sum);
}

// Serves one connection: each request answered, until the client closes.
void serve(duplex::channel& ch) {
  for (;;) {
    auto request = ch.receive(30s);
    if (!request) return;  // peer_closed: the client is done (or it failed; it is gone)
    if (!ch.send(duplex::as_bytes(answer(request->text())))) return;
  }
}

// The key file: 32 random bytes, readable by this user alone.
bool write_key(const std::string& path) {
  std::vector<std::byte> key(32);
  if (::getentropy(key.data(), key.size()) != 0) return false;
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0) return false;
  const bool ok = ::write(fd, key.data(), key.size()) == static_cast<ssize_t>(key.size());
  return ::close(fd) == 0 && ok;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string python = argc > 1 ? argv[1] : "python3";
  std::string dir_template = (std::filesystem::temp_directory_path() / "duplex-service-XXXXXX");
  if (::mkdtemp(dir_template.data()) == nullptr) {
    std::perror("mkdtemp");
    return 1;
  }
  const std::filesystem::path dir = dir_template;
  const std::string key_file = dir / "key";
  const std::string wrong_key_file = dir / "wrong-key";
  struct cleanup {
    std::filesystem::path dir;
    ~cleanup() {
      std::error_code ignored;
      std::filesystem::remove_all(dir, ignored);
    }
  } const remove_dir{dir};
  if (!write_key(key_file) || !write_key(wrong_key_file)) {
    std::perror("writing the key files");
    return 1;
  }

  // The service: the key from its file (never from a command line), CPython's framing.
  auto key = duplex::read_authkey_file(key_file);
  if (!key) {
    std::printf("Service: cannot read the key: %s\n", key.error().message().c_str());
    return 1;
  }
  duplex::listener_options options;
  options.endpoint.authkey = *key;
  options.endpoint.channel.format = duplex::framing::python;
  std::atomic<int> refused{0};
  options.on_failure = [&refused](const duplex::accept_failure& f) {
    std::printf("Service: refused a client: %s\n", f.error.message().c_str());
    ++refused;
  };
  auto at = duplex::address::unix_path((dir / "service.sock").string());
  if (!at) {
    std::printf("Service: %s\n", duplex::describe_address_error(dir.string()).c_str());
    return 1;
  }
  auto l = duplex::listener::listen(*at, options);
  if (!l) {
    std::printf("Service: cannot listen: %s\n", l.error().message().c_str());
    return 1;
  }
  std::printf("Service: listening, authkey from a file\n");
  std::fflush(stdout);
  std::atomic<int> served{0};
  std::thread service([&] {
    for (;;) {
      auto c = l->accept();
      if (!c) return;  // closed: the service stops
      serve(c->chan);
      ++served;
    }
  });

  int status = 0;
  // A C++ client with the right key.
  duplex::endpoint_options client;
  client.authkey = *duplex::read_authkey_file(key_file);
  client.channel.format = duplex::framing::python;
  std::string detail;
  if (auto ch = duplex::connect(l->local_address(), client, 10s, detail)) {
    for (const char* request : {"3 4 5", "100 -1"}) {
      auto sent = ch->send(duplex::as_bytes(request));
      auto reply = sent ? ch->receive(10s) : std::unexpected(sent.error());
      if (!reply) {
        std::printf("C++ client: %s\n", reply.error().message().c_str());
        status = 1;
        break;
      }
      std::printf("C++ client: '%s' -> '%s'\n", request, std::string(reply->text()).c_str());
    }
  } else {
    std::printf("C++ client: %s\n", detail.c_str());
    status = 1;
  }

  // A C++ client with the wrong key: refused on both sides.
  duplex::endpoint_options wrong = client;
  wrong.authkey = *duplex::read_authkey_file(wrong_key_file);
  auto refused_ch = duplex::connect(l->local_address(), wrong, 10s, detail);
  std::printf("C++ client with the wrong key: %s\n",
              refused_ch ? "accepted (unexpected)" : refused_ch.error().message().c_str());
  if (refused_ch) status = 1;
  std::fflush(stdout);

  // CPython's own Client, in a process of its own, with the key from the same file.
  duplex::spawn_options py;
  py.stdin_mode = duplex::stdio_mode::null;
  auto python_client = duplex::spawn(
      {python, DUPLEX_PYTHON_CLIENT, l->local_address().name(), key_file, "1 2 3", "40 2"}, py);
  if (!python_client) {
    std::printf("Cannot start %s: %s\n", python.c_str(), python_client.error().message().c_str());
    status = 1;
  } else if (auto s = python_client->wait(); !s || !s->success()) {
    std::printf("Python client: %s\n", s ? s->describe().c_str() : s.error().message().c_str());
    status = 1;
  }

  l->close();  // wakes the accept: the service thread returns
  service.join();
  std::printf("Service: served %d clients, refused %d\n", served.load(), refused.load());
  return status;
}
