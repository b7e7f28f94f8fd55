// The socket layer's own cost beside the raw syscalls, measured in one run: one thread sends a
// message and receives it back on the other end of the same pair, so no context switch or
// wake-up is measured, only the syscalls and duplex's wrapping of them.
//
// Compare duplex/* with raw/* of the same kind and size: the ratio is duplex's overhead.
#include <benchmark/benchmark.h>
#include <fcntl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <array>
#include <cstring>
#include <vector>

#include "duplex/duplex.hpp"

namespace {

duplex::connected_pair make(duplex::socket_kind kind) {
  auto pair = duplex::socket_pair(kind);
  if (!pair) std::abort();
  return std::move(*pair);
}

void raw_send_receive(benchmark::State& state, duplex::socket_kind kind) {
  auto pair = make(kind);
  const int a = pair.first.native_handle();
  const int b = pair.second.native_handle();
  const auto size = static_cast<std::size_t>(state.range(0));
  std::vector<char> out(size, 'x');
  std::vector<char> in(size);
  for (auto _ : state) {
    if (::send(a, out.data(), size, MSG_NOSIGNAL) != static_cast<ssize_t>(size)) std::abort();
    std::size_t got = 0;
    while (got < size) {
      const ssize_t n = ::recv(b, in.data() + got, size - got, 0);
      if (n <= 0) std::abort();
      got += static_cast<std::size_t>(n);
    }
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * size));
}

void duplex_send_receive(benchmark::State& state, duplex::socket_kind kind) {
  auto pair = make(kind);
  const auto size = static_cast<std::size_t>(state.range(0));
  std::vector<std::byte> out(size, std::byte{'x'});
  std::vector<std::byte> in(size);
  for (auto _ : state) {
    if (!pair.first.send_all(out)) std::abort();
    if (kind == duplex::socket_kind::stream) {
      if (!pair.second.receive_exact(in)) std::abort();
    } else if (pair.second.receive(in).value_or(0) != size) {
      std::abort();
    }
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(state.iterations() * size));
}

void raw_fd_pass(benchmark::State& state) {
  auto pair = make(duplex::socket_kind::seqpacket);
  const int a = pair.first.native_handle();
  const int b = pair.second.native_handle();
  const int passed = STDIN_FILENO;
  for (auto _ : state) {
    char byte = 'x';
    iovec iov{&byte, 1};
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))]{};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof(control);
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    std::memcpy(CMSG_DATA(c), &passed, sizeof(int));
    if (::sendmsg(a, &msg, MSG_NOSIGNAL) != 1) std::abort();
    msghdr in{};
    in.msg_iov = &iov;
    in.msg_iovlen = 1;
    in.msg_control = control;
    in.msg_controllen = sizeof(control);
    if (::recvmsg(b, &in, MSG_CMSG_CLOEXEC) != 1) std::abort();
    int got = -1;
    std::memcpy(&got, CMSG_DATA(CMSG_FIRSTHDR(&in)), sizeof(int));
    ::close(got);
  }
}

void duplex_fd_pass(benchmark::State& state) {
  auto pair = make(duplex::socket_kind::seqpacket);
  const std::array<int, 1> fds{STDIN_FILENO};
  std::array<std::byte, 1> byte{std::byte{'x'}};
  const std::array<duplex::const_buffer, 1> out{byte};
  const std::array<duplex::mutable_buffer, 1> in{byte};
  for (auto _ : state) {
    std::array<duplex::unique_fd, 1> got;
    if (!pair.first.send_msg(out, fds)) std::abort();
    if (pair.second.receive_msg(in, got).value_or(duplex::received{}).fds != 1) std::abort();
  }
}

void sizes(benchmark::internal::Benchmark* b) {
  for (int size : {8, 256, 4096, 65536})
    b->Arg(size);
}

}  // namespace

BENCHMARK_CAPTURE(raw_send_receive, stream, duplex::socket_kind::stream)->Apply(sizes);
BENCHMARK_CAPTURE(duplex_send_receive, stream, duplex::socket_kind::stream)->Apply(sizes);
BENCHMARK_CAPTURE(raw_send_receive, seqpacket, duplex::socket_kind::seqpacket)->Apply(sizes);
BENCHMARK_CAPTURE(duplex_send_receive, seqpacket, duplex::socket_kind::seqpacket)->Apply(sizes);
BENCHMARK(raw_fd_pass);
BENCHMARK(duplex_fd_pass);

BENCHMARK_MAIN();
