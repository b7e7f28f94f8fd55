#!/usr/bin/env python3
"""The Python end of duplex's interop tests: CPython's own multiprocessing.connection.

python_interop_test.cpp starts this script with its end of a stream socket pair at fd 3 and
talks to it through a duplex::channel with framing::python. The script holds fd 3 as
multiprocessing.connection.Connection(3), so every frame it reads or writes is framed by
CPython itself, and runs the mode named by its first argument:

  echo             receive messages until end-of-stream; send each one back reversed
  send SIZES       send pattern messages of the given sizes (comma-separated; message i has
                   seed i + 1), then close the Connection
  recv SIZES       receive that many messages, check each byte for byte against the pattern,
                   and answer each with "ok <index> <size>"; then expect end-of-stream
  close-after N    send N short text messages "message <i>", then close the Connection
  oversize LIMIT   send a message of LIMIT bytes, then one of LIMIT + 1
  bad-length N     write a raw 4-byte length of N (negative, not -1) and nothing else
  long-header      write "hello" with the -1 marker and an 8-byte length (the form CPython
                   uses above 2 GiB - 1), then "after" with send_bytes

Exit status 0 means every check passed; anything else is reported on stderr (inherited from
the test, so it shows in the test's output) with a non-zero status.
"""

import os
import signal
import struct
import sys
from multiprocessing.connection import Connection

FD = 3

# The pattern, as python_interop_test.cpp defines it: byte i of a message with seed s is
#   (i % 251 + 7 * (i // 251) + 13 * k + 29 * (k // 256) + s) % 256,  k = i // 64256
# (64256 = 251 * 256). Its period is about 4 GiB, so a byte lost, doubled or moved shows.
_BLOCK = 251 * 256
_BASE = bytes((i % 251 + 7 * (i // 251)) % 256 for i in range(_BLOCK))
_ADD = [bytes((x + k) % 256 for x in range(256)) for k in range(256)]


def pattern(size, seed):
    blocks = []
    for k in range(size // _BLOCK + 1):
        blocks.append(_BASE.translate(_ADD[(13 * k + 29 * (k // 256) + seed) % 256]))
    return b"".join(blocks)[:size]


def fail(message):
    print(f"python_peer: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def sizes_of(arg):
    return [int(s) for s in arg.split(",")] if arg else []


def check_only_fd_3_was_inherited():
    extra = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd <= FD:
            continue
        try:
            os.fstat(fd)  # the directory listing's own fd is closed by now
        except OSError:
            continue
        extra.append(f"{fd} -> {os.readlink(f'/proc/self/fd/{fd}')}")
    if extra:
        fail(f"inherited fds besides 0-3: {', '.join(extra)}")


def expect_end(conn, reset_is_end=False):
    # reset_is_end: the test closes its end with bytes of ours unread, which a reader sees as
    # ECONNRESET rather than end-of-stream.
    try:
        data = conn.recv_bytes()
    except EOFError:
        return
    except ConnectionResetError:
        if reset_is_end:
            return
        raise
    fail(f"expected end-of-stream, got a message of {len(data)} bytes")


def echo(conn):
    while True:
        try:
            data = conn.recv_bytes()
        except EOFError:
            return
        conn.send_bytes(data[::-1])


def send(conn, sizes):
    for index, size in enumerate(sizes):
        conn.send_bytes(pattern(size, index + 1))
    conn.close()


def recv(conn, sizes):
    for index, size in enumerate(sizes):
        data = conn.recv_bytes()
        if len(data) != size:
            fail(f"message {index}: {len(data)} bytes, expected {size}")
        expected = pattern(size, index + 1)
        if data != expected:
            at = next(i for i in range(size) if data[i] != expected[i])
            fail(f"message {index} ({size} bytes): byte {at} is {data[at]}, expected {expected[at]}")
        conn.send_bytes(f"ok {index} {size}".encode())
    expect_end(conn)


def close_after(conn, count):
    for i in range(count):
        conn.send_bytes(f"message {i}".encode())
    conn.close()


def oversize(conn, limit):
    conn.send_bytes(pattern(limit, 1))
    conn.send_bytes(pattern(limit + 1, 2))
    expect_end(conn, reset_is_end=True)


def bad_length(conn, length):
    os.write(FD, struct.pack("!i", length))
    expect_end(conn)


def long_header(conn):
    os.write(FD, struct.pack("!i", -1))
    os.write(FD, struct.pack("!Q", 5))
    os.write(FD, b"hello")
    conn.send_bytes(b"after")
    expect_end(conn)


def main(argv):
    # A peer that stops answering must not hang the suite: die, and the test sees peer_closed.
    signal.alarm(120)
    check_only_fd_3_was_inherited()
    conn = Connection(FD)
    mode, args = argv[1], argv[2:]
    if mode == "echo":
        echo(conn)
    elif mode == "send":
        send(conn, sizes_of(args[0]))
    elif mode == "recv":
        recv(conn, sizes_of(args[0]))
    elif mode == "close-after":
        close_after(conn, int(args[0]))
    elif mode == "oversize":
        oversize(conn, int(args[0]))
    elif mode == "bad-length":
        bad_length(conn, int(args[0]))
    elif mode == "long-header":
        long_header(conn)
    else:
        fail(f"unknown mode {mode!r}")
    if not conn.closed:
        conn.close()


if __name__ == "__main__":
    main(sys.argv)
