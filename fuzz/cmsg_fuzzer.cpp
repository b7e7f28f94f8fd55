// Fuzz target 3: control messages built from the input and sent with real sendmsg calls beside
// frame bytes: SCM_RIGHTS with any number of fds (0 to 300), SCM_CREDENTIALS, unknown types and
// levels, lengths that lie. The kernel refuses what it must; whatever it delivers, the channel
// must hand over only fds a frame announced, close the rest, and never leak or crash.
//
// Input: byte 0: bit 0 seqpacket, bit 1 SO_PASSCRED on the receiver, bits 2-3 max_fds (0-3),
// bit 4 close the sender afterwards. Then messages: a data-length byte and data (frame bytes,
// written as they are), a cmsg count byte (0-3), and for each cmsg: a kind byte (level/type
// choice), an fd-count byte (scaled up to 300 for SCM_RIGHTS), a length adjustment byte.
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>
#include <vector>

#include "duplex/channel.hpp"
#include "duplex/socket_pair.hpp"
#include "fuzz_support.hpp"

namespace {

struct cmsg_spec {
  int level;
  int type;
  std::vector<std::byte> payload;
  int length_adjust;  // added to the honest cmsg_len: the kernel must refuse a lie
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const int baseline = duplex::fuzz::open_fds();
  duplex::fuzz::input in(data, size);
  {
    const std::uint8_t setup = in.byte();
    const auto kind =
        (setup & 1) != 0 ? duplex::socket_kind::seqpacket : duplex::socket_kind::stream;
    auto pair = duplex::socket_pair(kind, {.non_blocking = true});
    if (!pair) return 0;
    if ((setup & 2) != 0) {
      const int on = 1;
      ::setsockopt(pair->first.native_handle(), SOL_SOCKET, SO_PASSCRED, &on, sizeof on);
    }
    duplex::channel_options o;
    o.max_fds = (setup >> 2) & 3;
    o.receive_buffer_size = 256;
    auto ch = duplex::channel::create(std::move(pair->first), o);
    if (!ch) return 0;
    const int sender = pair->second.native_handle();
    std::vector<duplex::unique_fd> pool;  // fds to pass (closed when the iteration ends)
    for (int i = 0; i < 4; ++i)
      pool.emplace_back(duplex::fuzz::some_fd());

    for (int m = 0; m < 16 && !in.empty(); ++m) {
      const auto bytes = in.bytes(in.byte());
      const int ncmsg = in.byte() % 4;
      std::vector<cmsg_spec> specs;
      for (int c = 0; c < ncmsg; ++c) {
        cmsg_spec spec;
        const std::uint8_t k = in.byte();
        const int count = in.byte() * 300 / 255;
        spec.length_adjust = static_cast<std::int8_t>(in.byte()) % 9;
        switch (k % 4) {
          case 0:
          case 1: {
            spec.level = SOL_SOCKET;
            spec.type = SCM_RIGHTS;
            for (int i = 0; i < count; ++i) {
              const int fd = pool[static_cast<std::size_t>(i) % pool.size()].get();
              const auto* p = reinterpret_cast<const std::byte*>(&fd);
              spec.payload.insert(spec.payload.end(), p, p + sizeof fd);
            }
            break;
          }
          case 2: {
            spec.level = SOL_SOCKET;
            spec.type = SCM_CREDENTIALS;
            ucred cred{::getpid(), ::geteuid(), ::getegid()};
            const auto* p = reinterpret_cast<const std::byte*>(&cred);
            spec.payload.assign(p, p + sizeof cred);
            break;
          }
          default:
            spec.level = (k & 4) != 0 ? SOL_SOCKET : 99;
            spec.type = k >> 3;
            spec.payload.resize(static_cast<std::size_t>(count % 64));
            break;
        }
        specs.push_back(std::move(spec));
      }
      std::size_t space = 0;
      for (const auto& s : specs)
        space += CMSG_SPACE(s.payload.size());
      std::vector<std::byte> control(space + 64);
      msghdr msg{};
      iovec iov{const_cast<std::byte*>(bytes.data()), bytes.size()};
      msg.msg_iov = &iov;
      msg.msg_iovlen = 1;
      if (!specs.empty()) {
        msg.msg_control = control.data();
        msg.msg_controllen = space;
        cmsghdr* c = CMSG_FIRSTHDR(&msg);
        for (const auto& s : specs) {
          if (c == nullptr) break;
          c->cmsg_level = s.level;
          c->cmsg_type = s.type;
          c->cmsg_len = CMSG_LEN(s.payload.size()) + static_cast<std::size_t>(s.length_adjust);
          if (!s.payload.empty()) std::memcpy(CMSG_DATA(c), s.payload.data(), s.payload.size());
          c = CMSG_NXTHDR(&msg, c);
        }
      }
      (void)::sendmsg(sender, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);  // refused or not: both fine
    }
    if ((setup & 16) != 0) pair->second.close();
    for (int guard = 0; guard < 1000; ++guard) {
      auto r = ch->try_receive();
      if (!r && (r.error() == duplex::errc::would_block || r.error() == duplex::errc::peer_closed ||
                 ch->is_broken())) {
        break;
      }
    }
  }
  duplex::fuzz::check_no_fd_leaked(baseline);
  return 0;
}
