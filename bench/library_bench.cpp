// The library's own costs, without any syscall in the measured loop where possible: frame
// headers, the stream decoder splitting a buffer into messages, typed-message codecs, batches,
// and the waiter's bookkeeping. These are the numbers a regression in duplex's user-space code
// moves; the syscalls themselves are measured by duplex_socket_bench and `duplex bench`.
#include <benchmark/benchmark.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "duplex/duplex.hpp"
#include "framing/stream_decoder.hpp"

namespace {

template <typename T>
T must(duplex::result<T> r) {
  if (!r) std::abort();
  return std::move(*r);
}

void must(const duplex::result<void>& r) {
  if (!r) std::abort();
}

void native_header_encode(benchmark::State& state) {
  duplex::wire::native_header h{123456, 2, 0};
  for (auto _ : state) {
    benchmark::DoNotOptimize(h);
    auto bytes = duplex::wire::encode_native(h);
    benchmark::DoNotOptimize(bytes);
  }
}
BENCHMARK(native_header_encode);

void native_header_decode(benchmark::State& state) {
  const auto bytes = duplex::wire::encode_native({123456, 2, 0});
  for (auto _ : state) {
    benchmark::DoNotOptimize(bytes);
    auto h = duplex::wire::decode_native(bytes);
    benchmark::DoNotOptimize(h);
  }
}
BENCHMARK(native_header_decode);

void python_header_encode(benchmark::State& state) {
  std::array<std::byte, duplex::wire::python_max_header_size> out{};
  auto length = static_cast<std::uint64_t>(state.range(0));
  for (auto _ : state) {
    benchmark::DoNotOptimize(length);
    benchmark::DoNotOptimize(duplex::wire::encode_python(length, out));
  }
}
BENCHMARK(python_header_encode)->Arg(1000)->Arg(std::int64_t{1} << 32);

void python_header_decode(benchmark::State& state) {
  std::array<std::byte, duplex::wire::python_max_header_size> in{};
  const std::size_t n = duplex::wire::encode_python(static_cast<std::uint64_t>(state.range(0)), in);
  const std::span<const std::byte> bytes(in.data(), n);
  for (auto _ : state) {
    benchmark::DoNotOptimize(bytes);
    auto h = duplex::wire::decode_python(bytes);
    benchmark::DoNotOptimize(h);
  }
}
BENCHMARK(python_header_decode)->Arg(1000)->Arg(std::int64_t{1} << 32);

// The bytes of `count` frames of `size` payload bytes each, as a channel's peer would write them.
std::vector<std::byte> frames(duplex::framing format, std::size_t size, std::size_t count) {
  std::vector<std::byte> wire;
  for (std::size_t i = 0; i < count; ++i) {
    if (format == duplex::framing::native) {
      const auto head = duplex::wire::encode_native({size, 0, 0});
      wire.insert(wire.end(), head.begin(), head.end());
    } else {
      std::array<std::byte, duplex::wire::python_max_header_size> head{};
      const std::size_t n = duplex::wire::encode_python(size, head);
      wire.insert(wire.end(), head.begin(), head.begin() + static_cast<std::ptrdiff_t>(n));
    }
    wire.insert(wire.end(), size, std::byte{0x5a});
  }
  return wire;
}

// The stream decoder splitting a full receive buffer into messages, each taken as an owned
// message (what channel::receive() does after one recvmsg). Items: messages.
void stream_decoder_split(benchmark::State& state, duplex::framing format) {
  const auto size = static_cast<std::size_t>(state.range(0));
  constexpr std::size_t buffer_size = std::size_t{64} << 10;
  const std::size_t count = std::max<std::size_t>(1, buffer_size / (size + 16));
  const std::vector<std::byte> wire = frames(format, size, count);
  std::size_t messages = 0;
  for (auto _ : state) {
    duplex::detail::stream_decoder d(format, duplex::default_max_message_size,
                                     duplex::max_fds_per_message, buffer_size);
    std::size_t at = 0;
    for (;;) {
      const auto e = d.poll();
      if (e == duplex::detail::stream_decoder::event::need_more) {
        if (at == wire.size()) break;
        const auto target = d.read_target();
        const std::size_t n = std::min(target.size(), wire.size() - at);
        std::memcpy(target.data(), wire.data() + at, n);
        at += n;
        d.commit(n, {}, false);
      } else if (e == duplex::detail::stream_decoder::event::header_ready) {
        d.accept_owned();
      } else if (e == duplex::detail::stream_decoder::event::complete) {
        duplex::message m = d.take_message();
        benchmark::DoNotOptimize(m);
        ++messages;
      } else {
        std::abort();
      }
    }
  }
  state.SetItemsProcessed(static_cast<std::int64_t>(messages));
  state.SetBytesProcessed(static_cast<std::int64_t>(messages * size));
}
BENCHMARK_CAPTURE(stream_decoder_split, native, duplex::framing::native)
    ->Arg(8)
    ->Arg(256)
    ->Arg(4096);
BENCHMARK_CAPTURE(stream_decoder_split, python, duplex::framing::python)->Arg(8)->Arg(256);

// Adding messages to a batch (a header encoded and the payload copied). Items: messages.
void batch_add(benchmark::State& state) {
  const std::vector<std::byte> payload(static_cast<std::size_t>(state.range(0)), std::byte{1});
  duplex::batch b;
  for (auto _ : state) {
    b.clear();
    for (int i = 0; i < 64; ++i)
      must(b.add(payload));
    benchmark::DoNotOptimize(b.wire_size());
  }
  state.SetItemsProcessed(state.iterations() * 64);
}
BENCHMARK(batch_add)->Arg(64)->Arg(1024);

struct sample {
  std::uint64_t id;
  double value;
  std::array<char, 16> tag;
};

}  // namespace

// Every bit pattern of every member is a value: opted in to the byte-copying codec.
template <>
inline constexpr bool duplex::trivially_decodable<sample> = true;

namespace {

void codec_plain(benchmark::State& state) {
  const sample s{42, 3.5, {}};
  std::vector<std::byte> out;
  for (auto _ : state) {
    out.clear();
    duplex::codec<sample>::encode(s, out);
    auto back = duplex::codec<sample>::decode(out);
    benchmark::DoNotOptimize(back);
  }
}
BENCHMARK(codec_plain);

void codec_string(benchmark::State& state) {
  const std::string s(static_cast<std::size_t>(state.range(0)), 'q');
  std::vector<std::byte> out;
  for (auto _ : state) {
    out.clear();
    duplex::codec<std::string>::encode(s, out);
    auto back = duplex::codec<std::string>::decode(out);
    benchmark::DoNotOptimize(back);
  }
  state.SetBytesProcessed(state.iterations() * state.range(0));
}
BENCHMARK(codec_string)->Arg(16)->Arg(4096);

void codec_vector(benchmark::State& state) {
  const std::vector<std::uint32_t> v(static_cast<std::size_t>(state.range(0)), 7);
  std::vector<std::byte> out;
  for (auto _ : state) {
    out.clear();
    duplex::codec<std::vector<std::uint32_t>>::encode(v, out);
    auto back = duplex::codec<std::vector<std::uint32_t>>::decode(out);
    benchmark::DoNotOptimize(back);
  }
  state.SetBytesProcessed(state.iterations() * state.range(0) * 4);
}
BENCHMARK(codec_vector)->Arg(16)->Arg(4096);

// waiter::wait and next with N channels registered and one of them readable: the cost of one
// turn of an event loop, which must not grow with N.
void waiter_one_ready(benchmark::State& state) {
  const auto n = static_cast<std::size_t>(state.range(0));
  std::vector<duplex::connected_channels> pairs;
  pairs.reserve(n);
  auto w = must(duplex::waiter::create());
  for (std::size_t i = 0; i < n; ++i) {
    pairs.push_back(must(duplex::channel_pair()));
    must(w.add(pairs.back().first, i));
  }
  must(pairs[n / 2].second.send(duplex::as_bytes("x")));  // stays unread: level-triggered
  for (auto _ : state) {
    auto ready = w.wait(std::chrono::nanoseconds{0});
    benchmark::DoNotOptimize(ready);
    while (auto e = w.next())
      benchmark::DoNotOptimize(e);
  }
}
BENCHMARK(waiter_one_ready)->Arg(1)->Arg(64)->Arg(1000);

// Adding and removing a registration (one epoll_ctl each, plus the waiter's map).
void waiter_add_remove(benchmark::State& state) {
  auto pair = must(duplex::channel_pair());
  auto w = must(duplex::waiter::create());
  for (auto _ : state) {
    must(w.add(pair.first, 1));
    must(w.remove(pair.first.native_handle()));
  }
}
BENCHMARK(waiter_add_remove);

// The receive lock, uncontended: buffered_bytes() takes it, reads the decoder's count and
// releases it, with no syscall. Every receive pays this once.
void channel_receive_lock(benchmark::State& state) {
  auto pair = must(duplex::channel_pair());
  for (auto _ : state)
    benchmark::DoNotOptimize(pair.first.buffered_bytes());
}
BENCHMARK(channel_receive_lock);

// A batch of 64 small messages out and back in on one thread: batch::add, one send, and
// receive_batch seeing them in place (one recvmsg). Two syscalls per 64 messages, so what is
// left per message is mostly duplex's own. Items: messages.
void batch_send_receive(benchmark::State& state) {
  auto pair = must(duplex::channel_pair());
  const std::vector<std::byte> payload(static_cast<std::size_t>(state.range(0)), std::byte{1});
  duplex::batch b;
  std::size_t seen = 0;
  for (auto _ : state) {
    b.clear();
    for (int i = 0; i < 64; ++i)
      must(b.add(payload));
    must(pair.first.send(b));
    std::size_t got = 0;
    while (got < 64) {
      got += must(pair.second.receive_batch(
          [&seen](duplex::message_view& m) { seen += m.bytes.size(); }, 64 - got));
    }
  }
  benchmark::DoNotOptimize(seen);
  state.SetItemsProcessed(state.iterations() * 64);
}
BENCHMARK(batch_send_receive)->Arg(64);

}  // namespace

BENCHMARK_MAIN();
