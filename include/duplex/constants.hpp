// duplex/constants.hpp - the constants every layer of duplex shares.
//
// The bottom of the header graph next to error.hpp: the socket, framing, channel and ring layers
// all name these, so they live below all of them and no layer includes one above it to reach them.
// duplex/socket.hpp includes this header; code that includes socket.hpp sees them as before.
#pragma once

#include <chrono>
#include <cstddef>

namespace duplex {

// The largest number of fds one message can carry (the kernel's SCM_MAX_FD).
inline constexpr std::size_t max_fds_per_message = 253;

// Waiting forever: the default timeout of wait and receive calls.
inline constexpr std::chrono::nanoseconds forever = std::chrono::nanoseconds::max();

// The longest busy_poll of a channel or a ring_channel: one hour (a spin that long is a busy
// thread, not a latency trade; the bound keeps every deadline computed from it in range).
inline constexpr std::chrono::nanoseconds max_busy_poll = std::chrono::hours(1);

}  // namespace duplex
