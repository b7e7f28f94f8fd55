// duplex info: the facts of this system that matter to the library, measured rather than assumed.
#include <fcntl.h>
#include <fmt/core.h>
#include <linux/io_uring.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <iterator>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "commands.hpp"
#include "duplex/duplex.hpp"
#include "json.hpp"

namespace duplex::cli {
namespace {

// Whether a feature works here, and if not, why (an errno name or a short reason).
struct feature {
  bool works = false;
  std::string why;
};

struct packet_limit {
  std::size_t default_buffers = 0;  // largest payload with the default socket buffers
  std::size_t raised_buffers = 0;   // largest payload with SO_SNDBUF/SO_RCVBUF raised
  std::size_t raised_sndbuf = 0;    // the SO_SNDBUF that "raised" means (as the kernel reports it)
};

struct facts {
  std::string kernel_release, kernel_version, machine;
  unsigned cores = 0;
  std::optional<std::int64_t> wmem_default, wmem_max, rmem_default, rmem_max, optmem_max;
  std::optional<std::int64_t> max_dgram_qlen;
  std::size_t stream_sndbuf = 0, stream_rcvbuf = 0;
  packet_limit datagram, seqpacket;
  std::size_t fds_per_message = 0;
  std::int64_t nofile_soft = 0, nofile_hard = 0;
  feature memfd_seals, pidfd, so_peerpidfd, io_uring;
};

std::optional<std::int64_t> read_sysctl(const char* path) {
  std::ifstream in(path);
  std::int64_t v = 0;
  if (in >> v) return v;
  return std::nullopt;
}

std::string errno_name(int err) {
  const char* name = strerrorname_np(err);
  return name != nullptr ? name : fmt::format("errno {}", err);
}

feature works() { return {true, {}}; }
feature fails(int err) { return {false, errno_name(err)}; }
feature fails(const std::error_code& ec) {
  if (ec.category() == std::system_category()) return fails(ec.value());
  return {false, ec.message()};
}

// Raises both buffers of s as far as this process may: SO_*BUFFORCE when privileged, else up to
// net.core.[rw]mem_max.
void raise_buffers(socket& s, int bytes) {
  const int fd = s.native_handle();
  if (::setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &bytes, sizeof(bytes)) != 0) {
    static_cast<void>(s.set_send_buffer_size(static_cast<std::size_t>(bytes)));
  }
  if (::setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &bytes, sizeof(bytes)) != 0) {
    static_cast<void>(s.set_receive_buffer_size(static_cast<std::size_t>(bytes)));
  }
}

// Binary search for the largest packet of `kind` that goes through a fresh pair whole.
std::size_t largest_packet(socket_kind kind, bool raised, std::size_t* sndbuf_out) {
  auto pair = socket_pair(kind);
  if (!pair) return 0;
  auto& [a, b] = *pair;
  if (raised) {
    raise_buffers(a, 32 << 20);
    raise_buffers(b, 32 << 20);
  }
  if (sndbuf_out != nullptr) *sndbuf_out = a.send_buffer_size().value_or(0);
  const std::size_t ceiling = raised ? (64U << 20) : (2U << 20);
  std::vector<std::byte> out(ceiling, std::byte{0x5a});
  std::vector<std::byte> in(ceiling + 1);
  auto goes_through = [&](std::size_t n) {
    if (!a.send(std::span(out).first(n), io_flags::dont_wait)) return false;
    auto got = b.receive(in, io_flags::dont_wait);
    return got && *got == n;
  };
  std::size_t lo = 0;            // known to go through
  std::size_t hi = ceiling + 1;  // known not to
  if (goes_through(ceiling)) return ceiling;
  while (hi - lo > 1) {
    const std::size_t mid = lo + (hi - lo) / 2;
    (goes_through(mid) ? lo : hi) = mid;
  }
  return lo;
}

// Does the kernel accept `count` fds in one SCM_RIGHTS message? (Raw sendmsg: this measures the
// kernel, not duplex's own check.)
bool kernel_accepts_fds(std::size_t count) {
  auto pair = socket_pair(socket_kind::seqpacket);
  if (!pair) return false;
  std::vector<int> fds(count, pair->first.native_handle());
  std::vector<char> control(CMSG_SPACE(sizeof(int) * count), 0);
  char byte = 'x';
  iovec iov{&byte, 1};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control.data();
  msg.msg_controllen = control.size();
  cmsghdr* c = CMSG_FIRSTHDR(&msg);
  c->cmsg_level = SOL_SOCKET;
  c->cmsg_type = SCM_RIGHTS;
  c->cmsg_len = CMSG_LEN(sizeof(int) * count);
  std::memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * count);
  if (::sendmsg(pair->first.native_handle(), &msg, MSG_NOSIGNAL | MSG_DONTWAIT) != 1) return false;
  // Take them with the library: every fd is owned and closed again.
  std::vector<unique_fd> got(count);
  std::array<std::byte, 1> buf{};
  const std::array<mutable_buffer, 1> bufs{buf};
  auto r = pair->second.receive_msg(bufs, got);
  return r && r->fds == count;
}

feature probe_memfd_seals() {
  const int fd = static_cast<int>(
      ::syscall(SYS_memfd_create, "duplex-probe", MFD_CLOEXEC | MFD_ALLOW_SEALING));
  if (fd < 0) return fails(errno);
  unique_fd owned(fd);
  if (::ftruncate(fd, 4096) != 0) return fails(errno);
  if (::fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE | F_SEAL_SEAL) != 0) {
    return fails(errno);
  }
  return works();
}

feature probe_pidfd() {
  const int fd = static_cast<int>(::syscall(SYS_pidfd_open, ::getpid(), 0));
  if (fd < 0) return fails(errno);
  unique_fd owned(fd);
  return works();
}

feature probe_so_peerpidfd() {
  auto pair = socket_pair(socket_kind::stream);
  if (!pair) return fails(pair.error());
  auto pidfd = pair->first.peer_pidfd();
  if (!pidfd) return fails(pidfd.error());
  return works();
}

feature probe_io_uring() {
  io_uring_params params{};
  const int fd = static_cast<int>(::syscall(SYS_io_uring_setup, 1, &params));
  if (fd < 0) return fails(errno);
  unique_fd owned(fd);
  return works();
}

facts gather() {
  facts f;
  utsname u{};
  if (::uname(&u) == 0) {
    f.kernel_release = u.release;
    f.kernel_version = u.version;
    f.machine = u.machine;
  }
  f.cores = std::thread::hardware_concurrency();
  f.wmem_default = read_sysctl("/proc/sys/net/core/wmem_default");
  f.wmem_max = read_sysctl("/proc/sys/net/core/wmem_max");
  f.rmem_default = read_sysctl("/proc/sys/net/core/rmem_default");
  f.rmem_max = read_sysctl("/proc/sys/net/core/rmem_max");
  f.optmem_max = read_sysctl("/proc/sys/net/core/optmem_max");
  f.max_dgram_qlen = read_sysctl("/proc/sys/net/unix/max_dgram_qlen");
  if (auto pair = socket_pair(socket_kind::stream)) {
    f.stream_sndbuf = pair->first.send_buffer_size().value_or(0);
    f.stream_rcvbuf = pair->first.receive_buffer_size().value_or(0);
  }
  f.datagram.default_buffers = largest_packet(socket_kind::datagram, false, nullptr);
  f.datagram.raised_buffers =
      largest_packet(socket_kind::datagram, true, &f.datagram.raised_sndbuf);
  f.seqpacket.default_buffers = largest_packet(socket_kind::seqpacket, false, nullptr);
  f.seqpacket.raised_buffers =
      largest_packet(socket_kind::seqpacket, true, &f.seqpacket.raised_sndbuf);
  rlimit lim{};
  if (::getrlimit(RLIMIT_NOFILE, &lim) == 0) {
    f.nofile_soft = static_cast<std::int64_t>(lim.rlim_cur);
    f.nofile_hard = static_cast<std::int64_t>(lim.rlim_max);
  }
  // The kernel's SCM_MAX_FD: the largest count that goes, checked one above.
  for (std::size_t n :
       {max_fds_per_message + 1, max_fds_per_message, std::size_t{64}, std::size_t{1}}) {
    if (kernel_accepts_fds(n)) {
      f.fds_per_message = n;
      break;
    }
  }
  f.memfd_seals = probe_memfd_seals();
  f.pidfd = probe_pidfd();
  f.so_peerpidfd = probe_so_peerpidfd();
  f.io_uring = probe_io_uring();
  return f;
}

std::string opt(const std::optional<std::int64_t>& v) {
  return v ? fmt::format("{}", *v) : "unknown";
}

std::string yes_no(const feature& f) { return f.works ? "yes" : fmt::format("no ({})", f.why); }

std::string text_of(const facts& f) {
  std::string out;
  auto line = std::back_inserter(out);
  fmt::format_to(line, "duplex {} on Linux {} ({}, {} cores)\n", library_version(),
                 f.kernel_release, f.machine, f.cores);
  fmt::format_to(line, "{:<22}{}\n", "kernel build", f.kernel_version);
  fmt::format_to(line, "{:<22}default {} B, max {} B (net.core.wmem_default, wmem_max)\n",
                 "send buffer", opt(f.wmem_default), opt(f.wmem_max));
  fmt::format_to(line, "{:<22}default {} B, max {} B (net.core.rmem_default, rmem_max)\n",
                 "receive buffer", opt(f.rmem_default), opt(f.rmem_max));
  fmt::format_to(line, "{:<22}SO_SNDBUF {} B, SO_RCVBUF {} B on a new pair\n", "stream pair",
                 f.stream_sndbuf, f.stream_rcvbuf);
  fmt::format_to(line, "{:<22}{} B with default buffers, {} B with SO_SNDBUF raised to {} B\n",
                 "largest datagram", f.datagram.default_buffers, f.datagram.raised_buffers,
                 f.datagram.raised_sndbuf);
  fmt::format_to(line, "{:<22}{} B with default buffers, {} B with SO_SNDBUF raised to {} B\n",
                 "largest seqpacket", f.seqpacket.default_buffers, f.seqpacket.raised_buffers,
                 f.seqpacket.raised_sndbuf);
  fmt::format_to(line, "{:<22}{} (SCM_RIGHTS)\n", "fds per message", f.fds_per_message);
  fmt::format_to(line, "{:<22}{} B (net.core.optmem_max: bounds control data per socket)\n",
                 "option memory", opt(f.optmem_max));
  fmt::format_to(line, "{:<22}{} (net.unix.max_dgram_qlen)\n", "datagram queue",
                 opt(f.max_dgram_qlen));
  fmt::format_to(line, "{:<22}soft {}, hard {}\n", "RLIMIT_NOFILE", f.nofile_soft, f.nofile_hard);
  fmt::format_to(line, "{:<22}memfd with seals: {}; pidfd: {}; SO_PEERPIDFD: {}; io_uring: {}\n",
                 "features", yes_no(f.memfd_seals), yes_no(f.pidfd), yes_no(f.so_peerpidfd),
                 yes_no(f.io_uring));
  return out;
}

void put(json_writer& j, std::string_view key, const std::optional<std::int64_t>& v) {
  j.key(key);
  if (v) {
    j.value(*v);
  } else {
    j.null();
  }
}

void put(json_writer& j, std::string_view key, const feature& f) {
  j.key(key).begin_object().key("works").value(f.works);
  if (!f.works) j.key("reason").value(f.why);
  j.end_object();
}

void put(json_writer& j, std::string_view key, const packet_limit& p) {
  j.key(key).begin_object();
  j.key("default_buffers").value(static_cast<std::uint64_t>(p.default_buffers));
  j.key("raised_buffers").value(static_cast<std::uint64_t>(p.raised_buffers));
  j.key("raised_sndbuf").value(static_cast<std::uint64_t>(p.raised_sndbuf));
  j.end_object();
}

std::string json_of(const facts& f) {
  json_writer j;
  j.begin_object();
  j.key("duplex_version").value(library_version());
  j.key("kernel").begin_object();
  j.key("release").value(f.kernel_release).key("version").value(f.kernel_version);
  j.key("machine").value(f.machine).key("cores").value(static_cast<std::uint64_t>(f.cores));
  j.end_object();
  j.key("socket_buffers").begin_object();
  put(j, "wmem_default", f.wmem_default);
  put(j, "wmem_max", f.wmem_max);
  put(j, "rmem_default", f.rmem_default);
  put(j, "rmem_max", f.rmem_max);
  j.key("stream_sndbuf").value(static_cast<std::uint64_t>(f.stream_sndbuf));
  j.key("stream_rcvbuf").value(static_cast<std::uint64_t>(f.stream_rcvbuf));
  j.end_object();
  j.key("max_payload").begin_object();
  put(j, "datagram", f.datagram);
  put(j, "seqpacket", f.seqpacket);
  j.end_object();
  j.key("fds_per_message").value(static_cast<std::uint64_t>(f.fds_per_message));
  put(j, "optmem_max", f.optmem_max);
  put(j, "max_dgram_qlen", f.max_dgram_qlen);
  j.key("rlimit_nofile")
      .begin_object()
      .key("soft")
      .value(f.nofile_soft)
      .key("hard")
      .value(f.nofile_hard)
      .end_object();
  j.key("features").begin_object();
  put(j, "memfd_seals", f.memfd_seals);
  put(j, "pidfd", f.pidfd);
  put(j, "so_peerpidfd", f.so_peerpidfd);
  put(j, "io_uring", f.io_uring);
  j.end_object();
  j.end_object();
  return j.str() + "\n";
}

}  // namespace

int run_info(bool json) {
  const facts f = gather();
  static_cast<void>(write_stdout(json ? json_of(f) : text_of(f)));  // finish_output reports a loss
  return 0;
}

}  // namespace duplex::cli
