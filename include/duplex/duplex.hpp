// duplex/duplex.hpp - the whole public interface of duplex in one include.
#pragma once

#include "duplex/batch.hpp"
#include "duplex/buffer.hpp"
#include "duplex/channel.hpp"
#include "duplex/codec.hpp"
#include "duplex/endpoint.hpp"
#include "duplex/error.hpp"
#include "duplex/fd.hpp"
#include "duplex/framing.hpp"
#include "duplex/message.hpp"
#include "duplex/process.hpp"
#include "duplex/ring.hpp"
#include "duplex/socket.hpp"
#include "duplex/socket_pair.hpp"
#include "duplex/version.hpp"
#include "duplex/waiter.hpp"
