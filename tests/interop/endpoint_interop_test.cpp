// Endpoints against real CPython: a CPython Listener(authkey=...) with a duplex client, and a
// duplex listener with a CPython Client, over a unix path, an abstract name and tcp, with a CPython
// of each handshake generation (DUPLEX_PYTHON_MODERN: 3.12 and later, "{sha256}"; and
// DUPLEX_PYTHON_LEGACY: 3.11 and earlier, HMAC-MD5), right keys and wrong ones. endpoint_peer.py
// runs multiprocessing.connection itself: nothing of Python's side is imitated here. A test whose
// interpreter the build did not find skips, saying which.
#include <fcntl.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <ostream>
#include <string>
#include <thread>
#include <vector>

#include "duplex/endpoint.hpp"
#include "support.hpp"

extern char** environ;

namespace duplex {
namespace {

using namespace std::chrono_literals;
using test::HasError;
using test::Succeeded;

enum class generation { modern, legacy };

std::string python_of(generation g) {
  return g == generation::modern ? DUPLEX_PYTHON_MODERN : DUPLEX_PYTHON_LEGACY;
}

std::string name_of(generation g) {
  return g == generation::modern ? "CPython 3.12 or later (DUPLEX_PYTHON_MODERN)"
                                 : "CPython 3.11 or earlier (DUPLEX_PYTHON_LEGACY)";
}

// A Python process running endpoint_peer.py, its stdout read line by line.
class python_peer {
 public:
  python_peer(const std::string& python, const std::vector<std::string>& args) {
    int out[2];
    if (::pipe2(out, O_CLOEXEC) != 0) return;
    posix_spawn_file_actions_t actions;
    ::posix_spawn_file_actions_init(&actions);
    ::posix_spawn_file_actions_adddup2(&actions, out[1], 1);
    std::vector<std::string> all{python, DUPLEX_ENDPOINT_PEER};
    all.insert(all.end(), args.begin(), args.end());
    std::vector<char*> argv;
    for (auto& a : all)
      argv.push_back(a.data());
    argv.push_back(nullptr);
    if (::posix_spawn(&pid_, python.c_str(), &actions, nullptr, argv.data(), environ) != 0) {
      pid_ = -1;
    }
    ::posix_spawn_file_actions_destroy(&actions);
    ::close(out[1]);
    out_ = ::fdopen(out[0], "r");
  }
  python_peer(const python_peer&) = delete;
  python_peer& operator=(const python_peer&) = delete;
  ~python_peer() {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      (void)wait();
    }
    if (out_ != nullptr) ::fclose(out_);
  }

  // The next line it printed, without its newline ("" at its end).
  std::string line() {
    char buf[512];
    if (out_ == nullptr || std::fgets(buf, sizeof buf, out_) == nullptr) return "";
    std::string s(buf);
    if (!s.empty() && s.back() == '\n') s.pop_back();
    return s;
  }

  // Its exit status (-1 if it was killed or never ran).
  int wait() {
    if (pid_ <= 0) return -1;
    const int status = test::reap(pid_);
    pid_ = -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  }

 private:
  pid_t pid_ = -1;
  std::FILE* out_ = nullptr;
};

class temp_files {
 public:
  temp_files() {
    std::string t = "/tmp/duplex-interop-XXXXXX";
    dir_ = ::mkdtemp(t.data());
  }
  ~temp_files() { std::system(("rm -rf '" + dir_ + "'").c_str()); }
  std::string key(const std::string& name, const std::string& contents) const {
    const auto path = dir_ + "/" + name;
    std::ofstream(path, std::ios::binary) << contents;
    return path;
  }
  std::string path(const std::string& name) const { return dir_ + "/" + name; }

 private:
  std::string dir_;
};

std::vector<std::byte> bytes_of(const std::string& s) {
  const auto b = as_bytes(s);
  return {b.begin(), b.end()};
}

std::string unique_abstract() {
  static std::atomic<int> n{0};
  return "unix:@duplex-interop-" + std::to_string(::getpid()) + "-" + std::to_string(n++);
}

endpoint_options python_framed(const std::string& key) {
  endpoint_options o;
  o.channel.format = framing::python;
  if (!key.empty()) o.authkey = bytes_of(key);
  return o;
}

struct interop_case {
  generation gen;
  std::string where;  // "path", "abstract", "tcp"
};

void PrintTo(const interop_case& c, std::ostream* os) {
  *os << (c.gen == generation::modern ? "modern " : "legacy ") << c.where;
}

std::string case_name(const ::testing::TestParamInfo<interop_case>& info) {
  return std::string(info.param.gen == generation::modern ? "modern_" : "legacy_") +
         info.param.where;
}

class endpoint_interop : public ::testing::TestWithParam<interop_case> {
 protected:
  void SetUp() override {
    python_ = python_of(GetParam().gen);
    if (python_.empty()) {
      GTEST_SKIP() << "SKIPPED: the build found no " << name_of(GetParam().gen)
                   << "; set it with -D"
                   << (GetParam().gen == generation::modern ? "DUPLEX_PYTHON_MODERN"
                                                            : "DUPLEX_PYTHON_LEGACY")
                   << "=PATH";
    }
  }

  // An address for this case's kind (tcp: port 0 for a listener to choose).
  std::string address_text() const {
    if (GetParam().where == "path") return "unix:" + files_.path("s");
    if (GetParam().where == "abstract") return unique_abstract();
    return "tcp:127.0.0.1:0";
  }

  std::string python_;
  temp_files files_;
};

INSTANTIATE_TEST_SUITE_P(generations, endpoint_interop,
                         ::testing::Values(interop_case{generation::modern, "path"},
                                           interop_case{generation::modern, "abstract"},
                                           interop_case{generation::modern, "tcp"},
                                           interop_case{generation::legacy, "path"},
                                           interop_case{generation::legacy, "abstract"},
                                           interop_case{generation::legacy, "tcp"}),
                         case_name);

TEST_P(endpoint_interop, PythonListenerAndDuplexClient) {
  python_peer py(python_, {"listen", address_text(), files_.key("k", "shared key")});
  const std::string ready = py.line();
  ASSERT_TRUE(ready.starts_with("ready ")) << "python said: " << ready;
  const auto at = test::must(address::parse(ready.substr(6)));
  std::string why;
  auto c = connect(at, python_framed("shared key"), 30s, why);
  ASSERT_THAT(c, Succeeded()) << why;
  ASSERT_THAT(c->send(as_bytes("ping")), Succeeded());
  auto m = c->receive(30s);
  ASSERT_THAT(m, Succeeded());
  EXPECT_EQ(m->text(), "gnip");
  c->close();
  EXPECT_EQ(py.wait(), 0);
}

TEST_P(endpoint_interop, PythonListenerRefusesAWrongKeyAndDuplexSaysSo) {
  python_peer py(python_, {"listen", address_text(), files_.key("k", "python's key")});
  const std::string ready = py.line();
  ASSERT_TRUE(ready.starts_with("ready ")) << "python said: " << ready;
  const auto at = test::must(address::parse(ready.substr(6)));
  EXPECT_THAT(connect(at, python_framed("another key"), 30s),
              HasError(errc::authentication_failed));
  EXPECT_EQ(py.line(), "authentication-failed");
  EXPECT_EQ(py.wait(), 3);
}

TEST_P(endpoint_interop, DuplexListenerAndPythonClient) {
  listener_options o;
  o.endpoint = python_framed("shared key");
  auto l = test::must(listener::listen(test::must(address::parse(address_text())), o));
  python_peer py(python_, {"client", l.local_address().to_string(), files_.key("k", "shared key")});
  auto conn = l.accept(30s);
  ASSERT_THAT(conn, Succeeded()) << (l.last_failure() ? l.last_failure()->detail : "");
  auto m = conn->chan.receive(30s);
  ASSERT_THAT(m, Succeeded());
  EXPECT_EQ(m->text(), "hello from python");
  ASSERT_THAT(conn->chan.send(as_bytes("hello from duplex")), Succeeded());
  EXPECT_EQ(py.wait(), 0);
}

TEST_P(endpoint_interop, DuplexListenerRefusesAPythonClientWithAWrongKey) {
  listener_options o;
  o.endpoint = python_framed("duplex's key");
  auto l = test::must(listener::listen(test::must(address::parse(address_text())), o));
  python_peer py(python_, {"client", l.local_address().to_string(), files_.key("k", "wrong")});
  std::thread t([&] { EXPECT_THAT(l.accept(3s), HasError(errc::timed_out)); });
  EXPECT_EQ(py.line(), "authentication-failed");
  EXPECT_EQ(py.wait(), 3);
  t.join();
  ASSERT_TRUE(l.last_failure());
  EXPECT_EQ(l.last_failure()->error, errc::authentication_failed);
}

TEST_P(endpoint_interop, RefusingMd5RefusesExactlyTheLegacyGeneration) {
  const bool legacy = GetParam().gen == generation::legacy;
  auto client = python_framed("shared key");
  client.allow_legacy_md5 = false;
  {
    python_peer py(python_, {"listen", address_text(), files_.key("k", "shared key")});
    const std::string ready = py.line();
    ASSERT_TRUE(ready.starts_with("ready ")) << "python said: " << ready;
    auto c = connect(test::must(address::parse(ready.substr(6))), client, 30s);
    if (legacy) {
      EXPECT_THAT(c, HasError(errc::authentication_failed));
    } else {
      ASSERT_THAT(c, Succeeded());
      c->close();
      EXPECT_EQ(py.wait(), 0);
    }
  }
  listener_options o;
  o.endpoint = client;
  auto l = test::must(listener::listen(test::must(address::parse(address_text())), o));
  python_peer py(python_,
                 {"client", l.local_address().to_string(), files_.key("k2", "shared key")});
  auto conn = l.accept(legacy ? 3s : 30s);
  if (legacy) {
    EXPECT_THAT(conn, HasError(errc::timed_out));
    EXPECT_EQ(py.wait(), 3);
    ASSERT_TRUE(l.last_failure());
    EXPECT_EQ(l.last_failure()->error, errc::authentication_failed);
    EXPECT_THAT(l.last_failure()->detail, ::testing::HasSubstr("legacy"));
  } else {
    ASSERT_THAT(conn, Succeeded());
    ASSERT_THAT(conn->chan.receive(30s), Succeeded());
    ASSERT_THAT(conn->chan.send(as_bytes("hello from duplex")), Succeeded());
    EXPECT_EQ(py.wait(), 0);
  }
}

}  // namespace
}  // namespace duplex
