// duplex bench: the list of rows, with their names, groups, baselines and methods in words, and
// the session each one opens (sessions.hpp).
#include <fmt/core.h>

#include <chrono>
#include <cstddef>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "bench.hpp"
#include "duplex/duplex.hpp"
#include "sessions.hpp"

namespace duplex::cli::bench {

const char* to_string(pattern p) noexcept { return p == pattern::rtt ? "rtt" : "throughput"; }
const char* to_string(peers p) noexcept { return p == peers::threads ? "threads" : "processes"; }

std::string size_label(std::size_t bytes) {
  if (bytes >= (std::size_t{1} << 20) && bytes % (std::size_t{1} << 20) == 0) {
    return fmt::format("{}MiB", bytes >> 20);
  }
  if (bytes >= 1024 && bytes % 1024 == 0) return fmt::format("{}KiB", bytes >> 10);
  return fmt::format("{}B", bytes);
}

std::string size_words(std::size_t bytes) {
  const std::string s = size_label(bytes);
  const std::size_t digits = s.find_first_not_of("0123456789");
  return s.substr(0, digits) + " " + s.substr(digits);
}

namespace {

std::string rtt_method(const std::string& transport) {
  const std::string common =
      "; one round trip = one message each way; the peer (a thread or a forked child) echoes";
  if (transport == "raw-stream") {
    return "raw socketpair(AF_UNIX, SOCK_STREAM): send(), then recv() until the whole message is "
           "back; blocking" +
           common;
  }
  if (transport == "raw-seqpacket") {
    return "raw socketpair(AF_UNIX, SOCK_SEQPACKET): one send() and one recv() per message; "
           "blocking" +
           common;
  }
  if (transport == "pipe") return "two pipes, write() and read() each way; blocking" + common;
  if (transport == "raw-stream-busypoll") {
    return "as raw-stream, but both ends wait by spinning on recv(MSG_DONTWAIT)" + common;
  }
  if (transport == "duplex-stream") {
    return "duplex::channel on a stream pair (native framing): send(), then receive_into() a "
           "reused buffer; blocking" +
           common;
  }
  if (transport == "duplex-seqpacket") {
    return "duplex::channel on a seqpacket pair: send(), then receive_into() a reused buffer; "
           "blocking" +
           common;
  }
  if (transport == "duplex-python") {
    return "duplex::channel on a stream pair with framing::python (multiprocessing.connection's "
           "length prefix): send(), then receive_into(); blocking" +
           common;
  }
  if (transport == "duplex-ring") {
    return "duplex::ring_channel (shared-memory rings, set up over a stream pair): send(), then "
           "receive_into() a reused buffer; busy_poll 0, so a waiting end sleeps at once on a "
           "wake socket of its own" +
           common;
  }
  if (transport == "duplex-ring-busypoll") {
    return "as duplex-ring, with ring_options::busy_poll = 1 s on both ends (they spin on the "
           "ring in shared memory, no system call while they wait)" +
           common;
  }
  if (transport == "raw-unix" || transport == "raw-tcp") {
    return fmt::format(
               "raw {}: a client socket connect()ed to a listening one and the connection "
               "accept4() gave; send(), then recv() until the whole message is back; blocking",
               transport == "raw-unix" ? "AF_UNIX stream socket on a filesystem path"
                                       : "TCP on 127.0.0.1 with TCP_NODELAY on both ends") +
           common;
  }
  if (transport == "duplex-unix" || transport == "duplex-tcp") {
    return fmt::format(
               "duplex::connect to a duplex::listener ({}; no authkey) and the channel its accept "
               "gave (native framing): send(), then receive_into() a reused buffer; blocking",
               transport == "duplex-unix" ? "unix:PATH" : "tcp:127.0.0.1, TCP_NODELAY") +
           common;
  }
  if (transport.ends_with("-connect")) {
    const bool tcp = transport.find("-tcp-") != std::string::npos;
    const char* where =
        tcp ? "TCP on 127.0.0.1 (TCP_NODELAY)" : "an AF_UNIX stream socket on a path";
    if (transport.starts_with("raw-")) {
      return fmt::format(
          "one op = one connection to {}: socket() and connect(), one round trip (send(), "
          "recv()) echoed by a thread that took the connection with accept4(); then both close",
          where);
    }
    return fmt::format(
        "one op = one connection to {}: duplex::connect with a 32-byte authkey, which returns "
        "once CPython's mutual handshake is done, then one round trip (send(), receive_into()) "
        "echoed by a thread in duplex::listener::accept; then both close",
        where);
  }
  return "as duplex-stream, with channel_options::busy_poll = 1 s on both ends (they spin, never "
         "block)" +
         common;
}

std::string throughput_method(const std::string& transport) {
  const std::string common =
      "; the consumer (another thread) reads and checks the first byte of every message and one "
      "byte per 4 KiB page of it";
  if (transport == "raw-stream" || transport == "pipe") {
    const char* how = transport == "pipe" ? "a pipe: write()" : "a raw stream socketpair: send()";
    return fmt::format(
               "{} of each message whole (one call per message, more only for partial writes), "
               "after memset() fills it in the producer's own buffer; the consumer receives in "
               "bulk into a 256 KiB buffer",
               how) +
           common;
  }
  if (transport == "raw-seqpacket") {
    return "a raw seqpacket socketpair: one send() per message after memset() fills it; the "
           "consumer recv()s each packet into a 256 KiB buffer" +
           common;
  }
  if (transport == "memcpy") {
    return "one thread: memset() fills the message in a source buffer and memcpy() copies it to a "
           "destination buffer, which is then read by the same rule as the consumers' (the "
           "ceiling of a transport that copies once)";
  }
  if (transport == "raw-unix" || transport == "raw-tcp") {
    return fmt::format(
               "raw {}, connected and accepted: one send() of each message whole after memset() "
               "fills it; the consumer recv()s in bulk into a 256 KiB buffer",
               transport == "raw-unix" ? "AF_UNIX stream socket on a filesystem path"
                                       : "TCP on 127.0.0.1 with TCP_NODELAY") +
           common;
  }
  if (transport == "duplex-unix" || transport == "duplex-tcp") {
    return fmt::format(
               "duplex::channel over a connection ({}): the connect()ed end sends, memset() "
               "filling each message in the producer's own buffer, one send() per message; the "
               "accepted end receive_into()s a reused buffer",
               transport == "duplex-unix" ? "unix:PATH" : "tcp:127.0.0.1") +
           common;
  }
  if (transport == "duplex-stream" || transport == "duplex-seqpacket") {
    return fmt::format(
               "duplex::channel on a {} pair: memset() fills each message in the producer's own "
               "buffer, one send() per message; the consumer receive_into()s a reused buffer",
               transport == "duplex-stream" ? "stream" : "seqpacket") +
           common;
  }
  if (transport == "duplex-stream-batch") {
    return "duplex::channel on a stream pair: memset() fills each message in the producer's own "
           "buffer, batch::add() copies it into a duplex::batch, channel::send(batch) every 64 "
           "messages; the consumer receive_batch()es them, seen in place" +
           common;
  }
  if (transport == "duplex-ring") {
    return "duplex::ring_channel (1 MiB shared-memory rings): memset() fills each message in the "
           "producer's own buffer, one send() per message; the consumer receive_into()s a reused "
           "buffer; both spin up to 1 ms before they sleep" +
           common;
  }
  const bool view = transport == "duplex-shm";
  return fmt::format(
             "duplex::channel with shared_memory enabled (64 MiB pool), receive mode {}: the "
             "producer allocate()s each message in the pool, memset() fills it in place, "
             "send(std::move(buffer)); the consumer receive()s it {}",
             view ? "view" : "copy",
             view ? "as a read-only view of the pool (no copy)"
                  : "copied out of the pool into a new message") +
         common;
}

std::string baseline_of(const std::string& transport) {
  if (transport == "duplex-seqpacket") return "raw-seqpacket";
  // The endpoint rows: over the raw socket of the same kind.
  if (transport == "duplex-unix") return "raw-unix";
  if (transport == "duplex-tcp") return "raw-tcp";
  if (transport == "duplex-unix-connect") return "raw-unix-connect";
  if (transport == "duplex-tcp-connect") return "raw-tcp-connect";
  if (transport.starts_with("duplex-") && transport.ends_with("-busypoll")) {
    return "raw-stream-busypoll";
  }
  if (transport.starts_with("duplex-")) return "raw-stream";
  return {};
}

}  // namespace

std::vector<row_spec> all_rows(bool quick) {
  std::vector<row_spec> rows;
  const auto add = [&rows](pattern pat, peers who, const std::string& transport, std::size_t size,
                           bool solo, auto open) {
    row_spec r;
    r.pat = pat;
    r.who = who;
    r.transport = transport;
    r.size = size;
    r.name =
        fmt::format("{}/{}/{}/{}", to_string(pat), to_string(who), transport, size_label(size));
    r.group =
        solo ? r.name : fmt::format("{}/{}/{}", to_string(pat), to_string(who), size_label(size));
    r.baseline = baseline_of(transport);
    if (transport.ends_with("-busypoll")) r.blocking_baseline = "raw-stream";
    r.method = pat == pattern::rtt ? rtt_method(transport) : throughput_method(transport);
    r.open = std::move(open);
    rows.push_back(std::move(r));
  };

  const std::vector<std::size_t> rtt_sizes =
      quick ? std::vector<std::size_t>{8} : std::vector<std::size_t>{8, 256, 4096};
  channel_options python;
  python.format = framing::python;
  channel_options spin;
  spin.busy_poll = std::chrono::seconds(1);
  for (const peers who : {peers::threads, peers::processes}) {
    for (const std::size_t size : rtt_sizes) {
      const auto raw = [who, size](raw_kind kind, bool busy) {
        return [=](const placement& p) -> std::unique_ptr<session> {
          return open_raw_rtt(kind, who, size, busy, p);
        };
      };
      const auto dup = [who, size](socket_kind kind, channel_options o) {
        return [=](const placement& p) -> std::unique_ptr<session> {
          return open_channel_rtt(kind, o, who, size, p);
        };
      };
      add(pattern::rtt, who, "raw-stream", size, false, raw(raw_kind::stream, false));
      add(pattern::rtt, who, "raw-seqpacket", size, false, raw(raw_kind::seqpacket, false));
      add(pattern::rtt, who, "pipe", size, false, raw(raw_kind::pipe, false));
      add(pattern::rtt, who, "duplex-stream", size, false, dup(socket_kind::stream, {}));
      add(pattern::rtt, who, "duplex-seqpacket", size, false, dup(socket_kind::seqpacket, {}));
      add(pattern::rtt, who, "duplex-python", size, false, dup(socket_kind::stream, python));
      // Spinning peers are measured alone: an idle spinner would take a CPU from the others.
      add(pattern::rtt, who, "raw-stream-busypoll", size, true, raw(raw_kind::stream, true));
      add(pattern::rtt, who, "duplex-stream-busypoll", size, true, dup(socket_kind::stream, spin));
      add(pattern::rtt, who, "duplex-ring", size, false,
          [=](const placement& p) -> std::unique_ptr<session> {
            return open_ring_rtt(ring_options{}, who, size, p);
          });
      add(pattern::rtt, who, "duplex-ring-busypoll", size, true,
          [=](const placement& p) -> std::unique_ptr<session> {
            ring_options o;
            o.busy_poll = std::chrono::seconds(1);
            return open_ring_rtt(o, who, size, p);
          });
    }
  }

  // Endpoints: over a unix path and tcp loopback, beside raw sockets of the same kind, with
  // threads; and the time to connect (with the handshake) and make one round trip of 8 B.
  for (const std::size_t size : rtt_sizes) {
    for (const auto kind : {endpoint_kind::unix_path, endpoint_kind::tcp}) {
      const std::string name = kind == endpoint_kind::tcp ? "tcp" : "unix";
      add(pattern::rtt, peers::threads, "raw-" + name, size, false,
          [=](const placement& p) -> std::unique_ptr<session> {
            return open_raw_rtt(kind == endpoint_kind::tcp ? raw_kind::tcp : raw_kind::unix_path,
                                peers::threads, size, false, p);
          });
      add(pattern::rtt, peers::threads, "duplex-" + name, size, false,
          [=](const placement& p) -> std::unique_ptr<session> {
            return open_endpoint_rtt(kind, peers::threads, size, p);
          });
    }
  }
  for (const auto kind : {endpoint_kind::unix_path, endpoint_kind::tcp}) {
    const std::string name = kind == endpoint_kind::tcp ? "tcp" : "unix";
    for (const bool with_duplex : {false, true}) {
      add(pattern::rtt, peers::threads, (with_duplex ? "duplex-" : "raw-") + name + "-connect", 8,
          false, [=](const placement& p) -> std::unique_ptr<session> {
            return open_connect(kind, with_duplex, p);
          });
    }
  }

  const std::vector<std::size_t> throughput_sizes =
      quick
          ? std::vector<std::size_t>{64, std::size_t{16} << 20}
          : std::vector<std::size_t>{64, 4096, 65536, std::size_t{1} << 20, std::size_t{16} << 20};
  const peers who = peers::threads;
  for (const std::size_t size : throughput_sizes) {
    const auto raw = [size](raw_kind kind) {
      return [=](const placement& p) -> std::unique_ptr<session> {
        return open_raw_throughput(kind, size, p);
      };
    };
    const auto dup = [size](socket_kind kind) {
      return [=](const placement& p) -> std::unique_ptr<session> {
        return open_channel_throughput(kind, size, p);
      };
    };
    const auto shm = [size](shared_receive mode) {
      return [=](const placement& p) -> std::unique_ptr<session> {
        return open_shm_throughput(mode, size, p);
      };
    };
    const bool fits_packet = size <= 65536;  // with the default socket buffers
    add(pattern::throughput, who, "raw-stream", size, false, raw(raw_kind::stream));
    if (fits_packet) {
      add(pattern::throughput, who, "raw-seqpacket", size, false, raw(raw_kind::seqpacket));
    }
    add(pattern::throughput, who, "pipe", size, false, raw(raw_kind::pipe));
    add(pattern::throughput, who, "memcpy", size, false,
        [size](const placement&) -> std::unique_ptr<session> {
          return open_memcpy_throughput(size);
        });
    add(pattern::throughput, who, "duplex-stream", size, false, dup(socket_kind::stream));
    if (fits_packet) {
      add(pattern::throughput, who, "duplex-seqpacket", size, false, dup(socket_kind::seqpacket));
    }
    if (size <= 4096) {
      add(pattern::throughput, who, "duplex-stream-batch", size, false,
          [size](const placement& p) -> std::unique_ptr<session> {
            return open_batch_throughput(size, p);
          });
    }
    if (size <= 65536) {
      add(pattern::throughput, who, "duplex-ring", size, false,
          [size](const placement& p) -> std::unique_ptr<session> {
            ring_options o;
            o.busy_poll = std::chrono::milliseconds(1);  // both ends spin before they sleep
            return open_ring_throughput(o, size, p);
          });
    }
    if (size >= (std::size_t{1} << 20)) {
      add(pattern::throughput, who, "duplex-shm", size, false, shm(shared_receive::view));
      add(pattern::throughput, who, "duplex-shm-copy", size, false, shm(shared_receive::copy));
    }
  }
  for (const std::size_t size : {std::size_t{64}, std::size_t{1} << 20}) {
    for (const auto kind : {endpoint_kind::unix_path, endpoint_kind::tcp}) {
      const std::string name = kind == endpoint_kind::tcp ? "tcp" : "unix";
      add(pattern::throughput, who, "raw-" + name, size, false,
          [=](const placement& p) -> std::unique_ptr<session> {
            return open_raw_throughput(
                kind == endpoint_kind::tcp ? raw_kind::tcp : raw_kind::unix_path, size, p);
          });
      add(pattern::throughput, who, "duplex-" + name, size, false,
          [=](const placement& p) -> std::unique_ptr<session> {
            return open_endpoint_throughput(kind, size, p);
          });
    }
  }
  return rows;
}

}  // namespace duplex::cli::bench
