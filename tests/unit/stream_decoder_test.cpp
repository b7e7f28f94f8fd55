// The stream decoder alone, fed the way the kernel would feed it: bytes in arbitrary slices, and
// each sendmsg's fds with the read that touches its first byte, that read ending at the end of
// that sendmsg's data.
#include "framing/stream_decoder.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <deque>
#include <optional>
#include <string>
#include <vector>

#include "support.hpp"

namespace duplex::detail {
namespace {

using test::HasError;
using test::inode_of;
using test::python_frame;

// What one sendmsg put on the wire.
struct chunk {
  std::vector<std::byte> data;
  std::vector<unique_fd> fds;
  bool ctrunc = false;
};

std::vector<std::byte> payload(std::size_t n, unsigned seed) {
  std::vector<std::byte> v(n);
  for (std::size_t i = 0; i < n; ++i)
    v[i] = static_cast<std::byte>((i * 31 + seed * 7) & 0xff);
  return v;
}

std::vector<std::byte> native_frame(const std::vector<std::byte>& body, std::uint16_t fds,
                                    std::optional<std::uint64_t> length = std::nullopt) {
  const auto h = wire::encode_native({length.value_or(body.size()), fds, 0});
  // The header byte by byte: GCC 12 misjudges a bulk copy of it into the vector as out of
  // bounds (-Warray-bounds) or as a possible null (-Wnull-dereference) in optimised builds.
  std::vector<std::byte> out;
  out.reserve(h.size() + body.size());
  for (const std::byte b : h)
    out.push_back(b);
  out.insert(out.end(), body.begin(), body.end());
  return out;
}

// A pipe's read end and the inode that identifies it.
struct marker {
  unique_fd read_end;
  unique_fd write_end;
  ino_t inode = 0;
};

marker make_marker() {
  int p[2];
  if (::pipe2(p, O_CLOEXEC) != 0) throw std::runtime_error("pipe");
  marker m{unique_fd(p[0]), unique_fd(p[1]), 0};
  struct stat st {};
  ::fstat(p[0], &st);
  m.inode = st.st_ino;
  return m;
}

std::vector<unique_fd> dups(const marker& m, std::size_t n) {
  std::vector<unique_fd> out;
  for (std::size_t i = 0; i < n; ++i)
    out.push_back(duplicate(m.read_end.get()).value());
  return out;
}

// What the decoder produced, in order.
struct outcome {
  std::vector<message> messages;
  std::vector<std::error_code> errors;  // in order, interleaved positions in `order`
  std::string order;                    // 'm' for a message, 'e' for an error
};

// Feeds chunks to the decoder in reads of at most `slice` bytes, faithfully to the kernel, and
// collects what comes out until the decoder fails fatally or reports end-of-stream.
outcome run(stream_decoder& d, std::deque<chunk> chunks, std::size_t slice,
            std::size_t max_events = 100000) {
  outcome out;
  std::size_t offset_in_front = 0;
  bool eof_sent = false;
  for (std::size_t events = 0; events < max_events; ++events) {
    // starved() may only say so when poll() could only say need_more (the channel then reads
    // without asking poll()): checked at every step of every test that runs through here.
    const bool starved = d.starved();
    const stream_decoder::event e = d.poll();
    if (starved) {
      EXPECT_EQ(e, stream_decoder::event::need_more) << "after " << out.order;
    }
    switch (e) {
      case stream_decoder::event::complete:
        out.messages.push_back(d.take_message());
        out.order += 'm';
        continue;
      case stream_decoder::event::header_ready: d.accept_owned(); continue;
      case stream_decoder::event::failed:
        out.errors.push_back(d.error());
        out.order += 'e';
        if (d.fatal() || d.ended()) return out;
        continue;
      case stream_decoder::event::need_more: break;
    }
    if (chunks.empty()) {
      if (eof_sent) return out;
      d.end_of_stream();
      eof_sent = true;
      continue;
    }
    // One read: up to `slice` bytes (and what the target has room for), gluing chunks without
    // fds, and stopping at the end of a chunk whose fds it picked up.
    const mutable_buffer target = d.read_target();
    const std::size_t room = std::min(slice, target.size());
    std::size_t n = 0;
    std::vector<unique_fd> fds;
    bool ctrunc = false;
    while (n < room && !chunks.empty()) {
      chunk& c = chunks.front();
      const bool first_touch = offset_in_front == 0;
      const std::size_t take = std::min(room - n, c.data.size() - offset_in_front);
      std::memcpy(target.data() + n, c.data.data() + offset_in_front, take);
      n += take;
      offset_in_front += take;
      bool stop = false;
      if (first_touch && (!c.fds.empty() || c.ctrunc)) {
        for (auto& fd : c.fds)
          fds.push_back(std::move(fd));
        c.fds.clear();
        ctrunc = c.ctrunc;
        stop = true;  // the kernel ends a read after the skb that carried fds
      }
      if (offset_in_front == c.data.size()) {
        chunks.pop_front();
        offset_in_front = 0;
      }
      if (stop) break;
    }
    d.commit(n, fds, ctrunc);
  }
  ADD_FAILURE() << "the decoder did not finish";
  return out;
}

class stream_decoder_test : public test::fd_checked,
                            public ::testing::WithParamInterface<std::size_t> {};

std::string slice_name(const ::testing::TestParamInfo<std::size_t>& p) {
  return "slice" + std::to_string(p.param);
}

INSTANTIATE_TEST_SUITE_P(slices, stream_decoder_test,
                         ::testing::Values(1, 7, 137, 143, 4096, 1 << 20), slice_name);

TEST_P(stream_decoder_test, EverySizeComesOutByteExact) {
  stream_decoder d(framing::native, 1 << 20, 253, 1024);
  std::deque<chunk> chunks;
  std::vector<std::vector<std::byte>> sent;
  for (std::size_t size :
       {0, 1, 2, 15, 16, 17, 255, 511, 512, 513, 1023, 1024, 1025, 5000, 70000}) {
    sent.push_back(payload(size, static_cast<unsigned>(size)));
    chunks.push_back({native_frame(sent.back(), 0), {}, false});
  }
  auto out = run(d, std::move(chunks), GetParam());
  ASSERT_EQ(out.messages.size(), sent.size());
  for (std::size_t i = 0; i < sent.size(); ++i) {
    EXPECT_TRUE(std::ranges::equal(out.messages[i].bytes(), sent[i])) << "message " << i;
  }
  ASSERT_EQ(out.errors.size(), 1U);
  EXPECT_EQ(out.errors[0], errc::peer_closed);
}

TEST_P(stream_decoder_test, FdsStayWithTheirFrame) {
  stream_decoder d(framing::native, 1 << 20, 253, 512);
  std::vector<marker> markers;
  std::deque<chunk> chunks;
  const std::size_t counts[] = {1, 0, 3, 0, 0, 253, 2, 0, 1};
  for (std::size_t i = 0; i < std::size(counts); ++i) {
    markers.push_back(make_marker());
    chunks.push_back({native_frame(payload(100 + i * 300, static_cast<unsigned>(i)),
                                   static_cast<std::uint16_t>(counts[i])),
                      dups(markers.back(), counts[i]), false});
  }
  auto out = run(d, std::move(chunks), GetParam());
  ASSERT_EQ(out.messages.size(), std::size(counts))
      << (out.errors.empty() ? "" : out.errors[0].message());
  for (std::size_t i = 0; i < std::size(counts); ++i) {
    ASSERT_EQ(out.messages[i].fds().size(), counts[i]) << "message " << i;
    for (const auto& fd : out.messages[i].fds())
      EXPECT_EQ(inode_of(fd.get()), markers[i].inode);
  }
  EXPECT_EQ(out.order, std::string(std::size(counts), 'm') + "e");
}

TEST_P(stream_decoder_test, FdsAnnouncedButNeverSentAreAProtocolError) {
  stream_decoder d(framing::native, 1 << 20, 253, 512);
  std::deque<chunk> chunks;
  chunks.push_back({native_frame(payload(10, 1), 0), {}, false});
  chunks.push_back({native_frame(payload(10, 2), 2), {}, false});
  auto out = run(d, std::move(chunks), GetParam());
  EXPECT_EQ(out.order, "me");
  EXPECT_EQ(out.errors.back(), errc::protocol_error);
  EXPECT_TRUE(d.fatal());
}

TEST_P(stream_decoder_test, FdsNoFrameAnnouncedAreClosedAndAProtocolError) {
  stream_decoder d(framing::native, 1 << 20, 253, 512);
  marker m = make_marker();
  std::deque<chunk> chunks;
  chunks.push_back({native_frame(payload(10, 1), 0), dups(m, 2), false});
  chunks.push_back({native_frame(payload(10, 2), 0), {}, false});
  const std::size_t before = test::open_fd_count() - 2;  // the two dups are closed by the end
  auto out = run(d, std::move(chunks), GetParam());
  EXPECT_EQ(out.order, "me");  // the first message is intact; then the stray fds are reported
  EXPECT_EQ(out.errors.back(), errc::protocol_error);
  EXPECT_EQ(test::open_fd_count(), before);
}

TEST_P(stream_decoder_test, ACountThatDisagreesIsAProtocolError) {
  stream_decoder d(framing::native, 1 << 20, 253, 512);
  marker m = make_marker();
  std::deque<chunk> chunks;
  chunks.push_back({native_frame(payload(10, 1), 3), dups(m, 2), false});
  auto out = run(d, std::move(chunks), GetParam());
  EXPECT_EQ(out.order, "e");
  EXPECT_EQ(out.errors.back(), errc::protocol_error);
}

TEST_P(stream_decoder_test, CutShortFdsRefuseOneMessageOnly) {
  stream_decoder d(framing::native, 1 << 20, 253, 512);
  marker m = make_marker();
  std::deque<chunk> chunks;
  chunks.push_back({native_frame(payload(3000, 1), 3), dups(m, 1), true});  // MSG_CTRUNC
  chunks.push_back({native_frame(payload(20, 2), 1), dups(m, 1), false});
  auto out = run(d, std::move(chunks), GetParam());
  EXPECT_EQ(out.order, "eme");
  EXPECT_EQ(out.errors[0], errc::fds_truncated);
  ASSERT_EQ(out.messages.size(), 1U);
  EXPECT_EQ(out.messages[0].size(), 20U);
  EXPECT_EQ(out.messages[0].fds().size(), 1U);
  EXPECT_EQ(out.errors[1], errc::peer_closed);
}

TEST_P(stream_decoder_test, MoreFdsThanAcceptedRefuseOneMessageOnly) {
  stream_decoder d(framing::native, 1 << 20, 2, 512);
  marker m = make_marker();
  std::deque<chunk> chunks;
  chunks.push_back({native_frame(payload(2000, 1), 3), dups(m, 3), false});
  chunks.push_back({native_frame(payload(20, 2), 2), dups(m, 2), false});
  auto out = run(d, std::move(chunks), GetParam());
  EXPECT_EQ(out.order, "eme");
  EXPECT_EQ(out.errors[0], errc::too_many_fds);
  EXPECT_EQ(out.messages[0].fds().size(), 2U);
}

TEST_P(stream_decoder_test, FdsInsideALargePayloadAreAProtocolError) {
  stream_decoder d(framing::native, 1 << 20, 253, 256);
  marker m = make_marker();
  auto frame = native_frame(payload(100000, 1), 0);
  std::deque<chunk> chunks;
  // The sender splits its frame and attaches fds to a later part: no header starts there.
  chunks.push_back({std::vector<std::byte>(frame.begin(), frame.begin() + 50000), {}, false});
  chunks.push_back({std::vector<std::byte>(frame.begin() + 50000, frame.end()), dups(m, 1), false});
  auto out = run(d, std::move(chunks), GetParam());
  ASSERT_FALSE(out.errors.empty());
  EXPECT_EQ(out.errors.back(), errc::protocol_error);
  EXPECT_TRUE(out.messages.empty());
}

TEST_P(stream_decoder_test, EndInsideAHeaderOrPayloadIsTruncatedThenPeerClosed) {
  for (std::size_t cut : {1, 15, 16, 17, 60}) {
    stream_decoder d(framing::native, 1 << 20, 253, 512);
    auto frame = native_frame(payload(50, 1), 0);
    std::deque<chunk> chunks;
    chunks.push_back({native_frame(payload(5, 0), 0), {}, false});
    chunks.push_back(
        {std::vector<std::byte>(frame.begin(), frame.begin() + static_cast<std::ptrdiff_t>(cut)),
         {},
         false});
    auto out = run(d, std::move(chunks), GetParam());
    EXPECT_EQ(out.order, "me") << "cut at " << cut;
    EXPECT_EQ(out.errors.back(), errc::truncated_message) << "cut at " << cut;
    ASSERT_EQ(d.poll(), stream_decoder::event::failed);
    EXPECT_EQ(d.error(), errc::peer_closed);
  }
}

TEST_P(stream_decoder_test, LengthsOverTheMaximumAreRefusedBeforeAllocation) {
  for (std::uint64_t length :
       {std::uint64_t{1001}, std::uint64_t{0xffffffff}, ~std::uint64_t{0} - 1, ~std::uint64_t{0}}) {
    stream_decoder d(framing::native, 1000, 253, 512);
    std::deque<chunk> chunks;
    chunks.push_back({native_frame({}, 0, length), {}, false});
    auto out = run(d, std::move(chunks), GetParam());
    EXPECT_EQ(out.order, "e");
    EXPECT_EQ(out.errors[0], errc::message_too_large) << length;
    EXPECT_TRUE(d.fatal());
  }
  stream_decoder d(framing::native, 1000, 253, 512);
  std::deque<chunk> chunks;
  chunks.push_back({native_frame(payload(1000, 3), 0), {}, false});  // exactly the maximum
  auto out = run(d, std::move(chunks), GetParam());
  EXPECT_EQ(out.order, "me");
}

TEST_P(stream_decoder_test, PythonFramesInBothHeaderForms) {
  stream_decoder d(framing::python, 1 << 20, 0, 512);
  std::deque<chunk> chunks;
  chunks.push_back({python_frame(payload(0, 1)), {}, false});
  chunks.push_back({python_frame(payload(16385, 2)), {}, false});
  chunks.push_back({python_frame(payload(7, 3), true), {}, false});
  auto out = run(d, std::move(chunks), GetParam());
  ASSERT_EQ(out.order, "mmme");
  EXPECT_EQ(out.messages[0].size(), 0U);
  EXPECT_TRUE(std::ranges::equal(out.messages[1].bytes(), payload(16385, 2)));
  EXPECT_TRUE(std::ranges::equal(out.messages[2].bytes(), payload(7, 3)));
}

TEST_P(stream_decoder_test, PythonNegativeLengthsAndFdsAreProtocolErrors) {
  {
    stream_decoder d(framing::python, 1 << 20, 0, 512);
    std::deque<chunk> chunks;
    chunks.push_back({python_frame(payload(3, 1)), {}, false});
    chunks.push_back(
        {{std::byte{0xff}, std::byte{0xff}, std::byte{0xff}, std::byte{0xfe}}, {}, false});
    auto out = run(d, std::move(chunks), GetParam());
    EXPECT_EQ(out.order, "me");
    EXPECT_EQ(out.errors.back(), errc::protocol_error);
  }
  {
    stream_decoder d(framing::python, 1 << 20, 0, 512);
    marker m = make_marker();
    std::deque<chunk> chunks;
    chunks.push_back({python_frame(payload(3, 1)), dups(m, 1), false});
    auto out = run(d, std::move(chunks), GetParam());
    EXPECT_EQ(out.errors.back(), errc::protocol_error);
  }
}

TEST_F(stream_decoder_test, ACallersBufferIsLeftBeforeTheCallReturns) {
  stream_decoder d(framing::native, 1 << 20, 253, 256);
  const auto body = payload(10000, 9);
  const auto frame = native_frame(body, 0);
  std::size_t fed = 0;
  auto feed = [&](std::size_t n) {
    const mutable_buffer t = d.read_target();
    n = std::min({n, t.size(), frame.size() - fed});
    std::memcpy(t.data(), frame.data() + fed, n);
    fed += n;
    d.commit(n, {}, false);
  };
  EXPECT_TRUE(d.starved());
  EXPECT_EQ(d.poll(), stream_decoder::event::need_more);
  feed(16 + 3000);
  EXPECT_FALSE(d.starved());
  ASSERT_EQ(d.poll(), stream_decoder::event::header_ready);
  std::vector<std::byte> callers(20000);
  d.accept_into(callers);
  EXPECT_EQ(d.poll(), stream_decoder::event::need_more);
  EXPECT_TRUE(d.external_destination());
  d.detach();  // the caller's call times out here
  EXPECT_FALSE(d.external_destination());
  std::fill(callers.begin(), callers.end(), std::byte{0});  // the caller reuses its buffer
  while (fed < frame.size()) {
    ASSERT_EQ(d.poll(), stream_decoder::event::need_more);
    feed(frame.size());
  }
  ASSERT_EQ(d.poll(), stream_decoder::event::complete);
  EXPECT_FALSE(d.starved());
  std::vector<std::byte> second(10000);
  EXPECT_EQ(d.take_into(second, {}), 10000U);
  EXPECT_EQ(second, body);
  EXPECT_TRUE(d.starved());  // the frame taken whole, nothing behind it
  d.end_of_stream();
  EXPECT_FALSE(d.starved());  // the end is there to report
}

}  // namespace
}  // namespace duplex::detail
