// duplex info: the facts of this system that matter to the library, measured rather than assumed.
//
// A fact that could not be measured (this process ran out of fds or memory while probing) is
// printed as "not measured (why)" and null in the JSON, never as a number, and the command then
// exits 1 after printing everything it did measure. A feature the kernel lacks or refuses (an
// old kernel, io_uring disabled) is a fact, not a failure.
#include <fcntl.h>
#include <fmt/core.h>
#include <linux/io_uring.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/utsname.h>
#include <unistd.h>
#include <nlohmann/json.hpp>

#include <array>
#include <cerrno>
#include <charconv>
#include <cstring>
#include <expected>
#include <iterator>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "commands.hpp"
#include "duplex/duplex.hpp"
#include "report.hpp"

namespace duplex::cli {
namespace {

// A measured value, or why it could not be measured ("socketpair: Too many open files").
template <class T>
using measured = std::expected<T, std::string>;

std::unexpected<std::string> not_measured(std::string_view what, const std::error_code& ec) {
  return std::unexpected(fmt::format("{}: {}", what, ec.message()));
}

std::unexpected<std::string> not_measured(std::string_view what, int err) {
  return not_measured(what, std::error_code(err, std::system_category()));
}

// Errors that say this process lacked a resource for the probe, not what the kernel supports.
bool out_of_resources(int err) {
  return err == EMFILE || err == ENFILE || err == ENOMEM || err == ENOBUFS;
}

std::string errno_name(int err) {
  const char* name = strerrorname_np(err);
  return name != nullptr ? name : fmt::format("errno {}", err);
}

// Whether a feature works here: yes, no (and why: an errno name or a short reason), or not
// measured (and why).
struct feature {
  measured<bool> works = false;
  std::string why;  // when *works is false
};

feature works() { return {true, {}}; }
feature fails(std::string_view what, int err) {
  if (out_of_resources(err)) return {not_measured(what, err), {}};
  return {false, errno_name(err)};
}
feature fails(std::string_view what, const std::error_code& ec) {
  if (ec.category() == std::system_category()) return fails(what, ec.value());
  return {false, ec.message()};
}

struct packet_limit {
  measured<std::size_t> default_buffers;  // largest payload with the default socket buffers
  measured<std::size_t> raised_buffers;   // largest payload with SO_SNDBUF/SO_RCVBUF raised
  measured<std::size_t> raised_sndbuf;    // the SO_SNDBUF that "raised" means (as reported)
};

// The kernel's limit of fds in one SCM_RIGHTS message, as sendmsg(2) takes or refuses them.
struct fd_limit {
  std::size_t count = 0;
  bool more = false;  // the kernel took even max_fds_per_message + 1 (count): more may go
  // This process could not receive count fds at once (MSG_CTRUNC at its RLIMIT_NOFILE).
  bool receive_cut = false;
};

struct facts {
  std::string kernel_release, kernel_version, machine;
  unsigned cores = 0;
  measured<std::optional<std::int64_t>> wmem_default, wmem_max, rmem_default, rmem_max, optmem_max,
      max_dgram_qlen;
  measured<std::size_t> stream_sndbuf, stream_rcvbuf;
  packet_limit datagram, seqpacket;
  measured<fd_limit> fds_per_message;
  std::int64_t nofile_soft = 0, nofile_hard = 0;
  feature memfd_seals, pidfd, so_peerpidfd, io_uring;
};

// A sysctl's value; nullopt if this system does not show it (e.g. a sysctl that is not visible
// in a container's network namespace).
measured<std::optional<std::int64_t>> read_sysctl(const char* path) {
  const int fd = ::open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    if (out_of_resources(errno)) return not_measured(fmt::format("open {}", path), errno);
    return std::nullopt;
  }
  const unique_fd owned(fd);
  std::array<char, 64> buf{};
  ssize_t n = 0;
  do {
    n = ::read(fd, buf.data(), buf.size() - 1);
  } while (n < 0 && errno == EINTR);
  if (n < 0) return not_measured(fmt::format("read {}", path), errno);
  std::int64_t v = 0;
  const char* end = buf.data() + n;
  if (std::from_chars(buf.data(), end, v).ec != std::errc{}) return std::nullopt;
  return v;
}

// Raises both buffers of s as far as this process may: SO_*BUFFORCE when privileged, else up to
// net.core.[rw]mem_max. Best effort: what they became is read back and reported.
void raise_buffers(socket& s, int bytes) {
  const int fd = s.native_handle();
  if (::setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &bytes, sizeof(bytes)) != 0) {
    static_cast<void>(s.set_send_buffer_size(static_cast<std::size_t>(bytes)));
  }
  if (::setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &bytes, sizeof(bytes)) != 0) {
    static_cast<void>(s.set_receive_buffer_size(static_cast<std::size_t>(bytes)));
  }
}

struct packet_probe {
  std::size_t largest = 0;
  std::size_t sndbuf = 0;
};

// Binary search for the largest packet of `kind` that goes through a fresh pair whole.
measured<packet_probe> largest_packet(socket_kind kind, bool raised) {
  auto pair = socket_pair(kind);
  if (!pair) return not_measured("socketpair", pair.error());
  auto& [a, b] = *pair;
  if (raised) {
    raise_buffers(a, 32 << 20);
    raise_buffers(b, 32 << 20);
  }
  auto sndbuf = a.send_buffer_size();
  if (!sndbuf) return not_measured("SO_SNDBUF", sndbuf.error());
  const std::size_t ceiling = raised ? (64U << 20) : (2U << 20);
  std::vector<std::byte> out(ceiling, std::byte{0x5a});
  std::vector<std::byte> in(ceiling + 1);
  // Whether a packet of n bytes goes through; an error that is not the kernel's "too large" or
  // "no room" ends the probe.
  auto goes_through = [&](std::size_t n) -> measured<bool> {
    auto sent = a.send(std::span(out).first(n), io_flags::dont_wait);
    if (!sent) {
      const std::error_code ec = sent.error();
      if (ec == errc::would_block || ec == std::errc::message_size ||
          ec == std::errc::no_buffer_space) {
        return false;
      }
      return not_measured("send", ec);
    }
    auto got = b.receive(in, io_flags::dont_wait);
    if (!got) return not_measured("receive", got.error());
    if (*got != n) return std::unexpected(fmt::format("{} B sent came back as {} B", n, *got));
    return true;
  };
  auto whole = goes_through(ceiling);
  if (!whole) return std::unexpected(whole.error());
  if (*whole) return packet_probe{ceiling, *sndbuf};
  std::size_t lo = 0;            // known to go through
  std::size_t hi = ceiling + 1;  // known not to
  while (hi - lo > 1) {
    const std::size_t mid = lo + (hi - lo) / 2;
    auto ok = goes_through(mid);
    if (!ok) return std::unexpected(ok.error());
    (*ok ? lo : hi) = mid;
  }
  return packet_probe{lo, *sndbuf};
}

packet_limit probe_packets(socket_kind kind) {
  packet_limit p;
  auto plain = largest_packet(kind, false);
  auto raised = largest_packet(kind, true);
  if (plain) {
    p.default_buffers = plain->largest;
  } else {
    p.default_buffers = std::unexpected(plain.error());
  }
  if (raised) {
    p.raised_buffers = raised->largest;
    p.raised_sndbuf = raised->sndbuf;
  } else {
    p.raised_buffers = p.raised_sndbuf = std::unexpected(raised.error());
  }
  return p;
}

// RLIMIT_NOFILE's soft limit raised to the hard one while the probes run, then put back: the
// probes measure the kernel, as far as this process may, not the limit it was started with.
class nofile_raised {
 public:
  nofile_raised() {
    if (::getrlimit(RLIMIT_NOFILE, &saved_) != 0) return;
    rlimit raised = saved_;
    raised.rlim_cur = raised.rlim_max;
    changed_ = raised.rlim_cur != saved_.rlim_cur && ::setrlimit(RLIMIT_NOFILE, &raised) == 0;
  }
  ~nofile_raised() {
    if (changed_) static_cast<void>(::setrlimit(RLIMIT_NOFILE, &saved_));
  }
  nofile_raised(const nofile_raised&) = delete;
  nofile_raised& operator=(const nofile_raised&) = delete;

  [[nodiscard]] std::int64_t soft() const { return static_cast<std::int64_t>(saved_.rlim_cur); }
  [[nodiscard]] std::int64_t hard() const { return static_cast<std::int64_t>(saved_.rlim_max); }

 private:
  rlimit saved_{};
  bool changed_ = false;
};

// Whether the kernel takes `count` fds in one SCM_RIGHTS message: a raw sendmsg, so that this
// measures the kernel (SCM_MAX_FD refuses more with EINVAL), not duplex's own check. Whatever was
// sent is received again with the library, which closes every fd that arrived; a receive cut
// short by this process's own fd limit is noted in *cut, and says nothing about the kernel's.
measured<bool> kernel_takes_fds(connected_pair& pair, std::size_t count, bool* cut) {
  std::vector<int> fds(count, pair.first.native_handle());
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
  ssize_t sent = 0;
  do {
    sent = ::sendmsg(pair.first.native_handle(), &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
  } while (sent < 0 && errno == EINTR);
  if (sent < 0) {
    if (errno == EINVAL) return false;
    return not_measured(fmt::format("sendmsg of {} fds", count), errno);
  }
  std::vector<unique_fd> got(count);
  std::array<std::byte, 1> buf{};
  const std::array<mutable_buffer, 1> bufs{buf};
  auto r = pair.second.receive_msg(bufs, got);
  if (!r) {
    if (r.error() != errc::fds_truncated) return not_measured("receive_msg", r.error());
    *cut = true;
  }
  return true;
}

// The kernel's SCM_MAX_FD: the largest count sendmsg takes, checked one above the known 253 and
// searched below it if that is refused.
measured<fd_limit> probe_fds_per_message() {
  auto pair = socket_pair(socket_kind::seqpacket);
  if (!pair) return not_measured("socketpair", pair.error());
  fd_limit limit;
  bool cut = false;
  auto above = kernel_takes_fds(*pair, max_fds_per_message + 1, &cut);
  if (!above) return std::unexpected(above.error());
  if (*above) {
    limit.count = max_fds_per_message + 1;
    limit.more = true;
    limit.receive_cut = cut;
    return limit;
  }
  std::size_t lo = 0;                        // known to be taken
  std::size_t hi = max_fds_per_message + 1;  // known to be refused
  bool cut_at_lo = false;
  while (hi - lo > 1) {
    const std::size_t mid = lo + (hi - lo) / 2;
    bool cut_here = false;
    auto ok = kernel_takes_fds(*pair, mid, &cut_here);
    if (!ok) return std::unexpected(ok.error());
    if (*ok) {
      lo = mid;
      cut_at_lo = cut_here;
    } else {
      hi = mid;
    }
  }
  if (lo == 0) return std::unexpected(std::string("the kernel refused even 1 fd (EINVAL)"));
  limit.count = lo;
  limit.receive_cut = cut_at_lo;
  return limit;
}

feature probe_memfd_seals() {
  const int fd = static_cast<int>(
      ::syscall(SYS_memfd_create, "duplex-probe", MFD_CLOEXEC | MFD_ALLOW_SEALING));
  if (fd < 0) return fails("memfd_create", errno);
  unique_fd owned(fd);
  if (::ftruncate(fd, 4096) != 0) return fails("ftruncate", errno);
  if (::fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE | F_SEAL_SEAL) != 0) {
    return fails("F_ADD_SEALS", errno);
  }
  return works();
}

feature probe_pidfd() {
  const int fd = static_cast<int>(::syscall(SYS_pidfd_open, ::getpid(), 0));
  if (fd < 0) return fails("pidfd_open", errno);
  unique_fd owned(fd);
  return works();
}

feature probe_so_peerpidfd() {
  auto pair = socket_pair(socket_kind::stream);
  if (!pair) return {not_measured("socketpair", pair.error()), {}};
  auto pidfd = pair->first.peer_pidfd();
  if (!pidfd) return fails("SO_PEERPIDFD", pidfd.error());
  return works();
}

feature probe_io_uring() {
  io_uring_params params{};
  const int fd = static_cast<int>(::syscall(SYS_io_uring_setup, 1, &params));
  if (fd < 0) return fails("io_uring_setup", errno);
  unique_fd owned(fd);
  return works();
}

facts gather() {
  facts f;
  const nofile_raised nofile;
  f.nofile_soft = nofile.soft();
  f.nofile_hard = nofile.hard();
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
    const auto size = [](std::string_view what,
                         const result<std::size_t>& r) -> measured<std::size_t> {
      if (!r) return not_measured(what, r.error());
      return *r;
    };
    f.stream_sndbuf = size("SO_SNDBUF", pair->first.send_buffer_size());
    f.stream_rcvbuf = size("SO_RCVBUF", pair->first.receive_buffer_size());
  } else {
    f.stream_sndbuf = f.stream_rcvbuf = not_measured("socketpair", pair.error());
  }
  f.datagram = probe_packets(socket_kind::datagram);
  f.seqpacket = probe_packets(socket_kind::seqpacket);
  f.fds_per_message = probe_fds_per_message();
  f.memfd_seals = probe_memfd_seals();
  f.pidfd = probe_pidfd();
  f.so_peerpidfd = probe_so_peerpidfd();
  f.io_uring = probe_io_uring();
  return f;
}

// Every fact that could not be measured: its JSON name and why.
std::vector<std::pair<std::string, std::string>> unmeasured(const facts& f) {
  std::vector<std::pair<std::string, std::string>> out;
  const auto check = [&out](std::string name, const auto& m) {
    if (!m) out.emplace_back(std::move(name), m.error());
  };
  check("socket_buffers.wmem_default", f.wmem_default);
  check("socket_buffers.wmem_max", f.wmem_max);
  check("socket_buffers.rmem_default", f.rmem_default);
  check("socket_buffers.rmem_max", f.rmem_max);
  check("socket_buffers.stream_sndbuf", f.stream_sndbuf);
  check("socket_buffers.stream_rcvbuf", f.stream_rcvbuf);
  for (const auto& [kind, p] :
       {std::pair{"datagram", &f.datagram}, std::pair{"seqpacket", &f.seqpacket}}) {
    check(fmt::format("max_payload.{}.default_buffers", kind), p->default_buffers);
    check(fmt::format("max_payload.{}.raised_buffers", kind), p->raised_buffers);
    check(fmt::format("max_payload.{}.raised_sndbuf", kind), p->raised_sndbuf);
  }
  check("fds_per_message", f.fds_per_message);
  check("optmem_max", f.optmem_max);
  check("max_dgram_qlen", f.max_dgram_qlen);
  check("features.memfd_seals", f.memfd_seals.works);
  check("features.pidfd", f.pidfd.works);
  check("features.so_peerpidfd", f.so_peerpidfd.works);
  check("features.io_uring", f.io_uring.works);
  return out;
}

std::string not_measured_text(const std::string& why) {
  return fmt::format("not measured ({})", why);
}

// A sysctl's value in text: the number, "unknown" if not shown here, or why not measured.
std::string text(const measured<std::optional<std::int64_t>>& v) {
  if (!v) return not_measured_text(v.error());
  return *v ? fmt::format("{} B", **v) : "unknown";
}

// A size in bytes in text, or why it was not measured.
std::string bytes(const measured<std::size_t>& v) {
  return v ? fmt::format("{} B", *v) : not_measured_text(v.error());
}

std::string yes_no(const feature& f) {
  if (!f.works) return not_measured_text(f.works.error());
  return *f.works ? "yes" : fmt::format("no ({})", f.why);
}

std::string fds_text(const facts& f) {
  if (!f.fds_per_message) return not_measured_text(f.fds_per_message.error());
  const fd_limit& l = *f.fds_per_message;
  std::string s = fmt::format("{}{} (SCM_RIGHTS)", l.more ? "at least " : "", l.count);
  if (l.receive_cut) {
    s += fmt::format(
        "; this process, at RLIMIT_NOFILE {}, cannot receive that many at once (MSG_CTRUNC)",
        f.nofile_hard);
  }
  return s;
}

std::string text_of(const facts& f) {
  std::string out;
  auto line = std::back_inserter(out);
  fmt::format_to(line, "duplex {} on Linux {} ({}, {} cores)\n", library_version(),
                 f.kernel_release, f.machine, f.cores);
  fmt::format_to(line, "{:<22}{}\n", "kernel build", f.kernel_version);
  fmt::format_to(line, "{:<22}default {}, max {} (net.core.wmem_default, wmem_max)\n",
                 "send buffer", text(f.wmem_default), text(f.wmem_max));
  fmt::format_to(line, "{:<22}default {}, max {} (net.core.rmem_default, rmem_max)\n",
                 "receive buffer", text(f.rmem_default), text(f.rmem_max));
  // A line whose facts all failed for one reason says it once.
  if (!f.stream_sndbuf && !f.stream_rcvbuf && f.stream_sndbuf.error() == f.stream_rcvbuf.error()) {
    fmt::format_to(line, "{:<22}{}\n", "stream pair", not_measured_text(f.stream_sndbuf.error()));
  } else {
    fmt::format_to(line, "{:<22}SO_SNDBUF {}, SO_RCVBUF {} on a new pair\n", "stream pair",
                   bytes(f.stream_sndbuf), bytes(f.stream_rcvbuf));
  }
  for (const auto& [label, p] :
       {std::pair{"largest datagram", &f.datagram}, std::pair{"largest seqpacket", &f.seqpacket}}) {
    if (!p->default_buffers && !p->raised_buffers &&
        p->default_buffers.error() == p->raised_buffers.error()) {
      fmt::format_to(line, "{:<22}{}\n", label, not_measured_text(p->default_buffers.error()));
    } else if (!p->raised_buffers) {
      fmt::format_to(line, "{:<22}{} with default buffers, {} with SO_SNDBUF raised\n", label,
                     bytes(p->default_buffers), bytes(p->raised_buffers));
    } else {
      fmt::format_to(line, "{:<22}{} with default buffers, {} with SO_SNDBUF raised to {}\n", label,
                     bytes(p->default_buffers), bytes(p->raised_buffers), bytes(p->raised_sndbuf));
    }
  }
  fmt::format_to(line, "{:<22}{}\n", "fds per message", fds_text(f));
  fmt::format_to(line, "{:<22}{} (net.core.optmem_max: bounds control data per socket)\n",
                 "option memory", text(f.optmem_max));
  const std::string qlen =
      f.max_dgram_qlen ? (*f.max_dgram_qlen ? fmt::format("{}", **f.max_dgram_qlen) : "unknown")
                       : not_measured_text(f.max_dgram_qlen.error());
  fmt::format_to(line, "{:<22}{} (net.unix.max_dgram_qlen)\n", "datagram queue", qlen);
  fmt::format_to(line, "{:<22}soft {}, hard {}\n", "RLIMIT_NOFILE", f.nofile_soft, f.nofile_hard);
  fmt::format_to(line, "{:<22}memfd with seals: {}; pidfd: {}; SO_PEERPIDFD: {}; io_uring: {}\n",
                 "features", yes_no(f.memfd_seals), yes_no(f.pidfd), yes_no(f.so_peerpidfd),
                 yes_no(f.io_uring));
  return out;
}

using json = nlohmann::ordered_json;  // members in the order they are set

json json_of(const measured<std::optional<std::int64_t>>& v) {
  return v && *v ? json(**v) : json(nullptr);
}

json json_of(const measured<std::size_t>& v) { return v ? json(*v) : json(nullptr); }

json json_of(const feature& f) {
  json o;
  if (f.works) {
    o["works"] = *f.works;
    if (!*f.works) o["reason"] = f.why;
  } else {
    o["works"] = nullptr;
    o["reason"] = not_measured_text(f.works.error());
  }
  return o;
}

json json_of(const packet_limit& p) {
  return {{"default_buffers", json_of(p.default_buffers)},
          {"raised_buffers", json_of(p.raised_buffers)},
          {"raised_sndbuf", json_of(p.raised_sndbuf)}};
}

std::string json_of(const facts& f) {
  json missing = json::object();
  for (const auto& [name, why] : unmeasured(f))
    missing[name] = why;
  const json j = {
      {"duplex_version", library_version()},
      {"kernel",
       {{"release", f.kernel_release},
        {"version", f.kernel_version},
        {"machine", f.machine},
        {"cores", f.cores}}},
      {"socket_buffers",
       {{"wmem_default", json_of(f.wmem_default)},
        {"wmem_max", json_of(f.wmem_max)},
        {"rmem_default", json_of(f.rmem_default)},
        {"rmem_max", json_of(f.rmem_max)},
        {"stream_sndbuf", json_of(f.stream_sndbuf)},
        {"stream_rcvbuf", json_of(f.stream_rcvbuf)}}},
      {"max_payload", {{"datagram", json_of(f.datagram)}, {"seqpacket", json_of(f.seqpacket)}}},
      {"fds_per_message", f.fds_per_message ? json(f.fds_per_message->count) : json(nullptr)},
      {"fds_receive_limited_by_rlimit",
       f.fds_per_message.has_value() && f.fds_per_message->receive_cut},
      {"optmem_max", json_of(f.optmem_max)},
      {"max_dgram_qlen", json_of(f.max_dgram_qlen)},
      {"rlimit_nofile", {{"soft", f.nofile_soft}, {"hard", f.nofile_hard}}},
      {"features",
       {{"memfd_seals", json_of(f.memfd_seals)},
        {"pidfd", json_of(f.pidfd)},
        {"so_peerpidfd", json_of(f.so_peerpidfd)},
        {"io_uring", json_of(f.io_uring)}}},
      {"not_measured", std::move(missing)},
  };
  // Bytes that are not UTF-8 (a kernel or machine string) become U+FFFD, never invalid JSON.
  return j.dump(-1, ' ', false, json::error_handler_t::replace) + "\n";
}

}  // namespace

int run_info(bool json) {
  const facts f = gather();
  static_cast<void>(write_stdout(json ? json_of(f) : text_of(f)));  // finish_output reports a loss
  const auto missing = unmeasured(f);
  if (missing.empty()) return 0;
  return report_failure(fmt::format("info: {} {} not measured (first: {}: {})", missing.size(),
                                    missing.size() == 1 ? "fact" : "facts", missing[0].first,
                                    missing[0].second));
}

}  // namespace duplex::cli
