#!/usr/bin/env python3
r"""A Python worker for duplex, using nothing but CPython's multiprocessing.connection.

A duplex parent started this script holding one end of a stream socket pair, and named that
end's fd in the DUPLEX_FD environment variable. The script wraps it as
multiprocessing.connection.Connection(fd), whose framing (a 4-byte big-endian length, then the
payload) is what duplex calls framing::python. Each message is a line of UTF-8 text; the reply is
its word count and the text upper-cased ("a b" -> "2 words: A B"). When the parent closes its
sending side, recv_bytes raises EOFError and the worker exits with 0.

Run it from the C++ parent (examples/python_parent.cpp, built as python_parent):

    build/<dir>/examples/python_parent

or from the command line through duplex run, which sends each line of stdin as a message and
prints each reply as a line:

    printf 'a b\nc\n' | build/<dir>/tools/duplex/duplex run --framing python -- \
        python3 examples/python_worker.py

Started by hand, without DUPLEX_FD, it says so and exits with 2. Its stdout is left alone (under
duplex run it is the terminal the replies go to); problems are reported on stderr.
"""

import os
import sys
from multiprocessing.connection import Connection


def answer(text):
    words = len(text.split())
    return f"{words} word{'' if words == 1 else 's'}: {text.upper()}"


def main():
    try:
        fd = int(os.environ["DUPLEX_FD"])
    except (KeyError, ValueError):
        print("python_worker.py: no DUPLEX_FD: start me from a duplex parent or with "
              "'duplex run --framing python -- python3 python_worker.py'", file=sys.stderr)
        return 2

    with Connection(fd) as parent:  # closes the fd on the way out
        while True:
            try:
                request = parent.recv_bytes()
            except EOFError:  # the parent closed its sending side: no more requests
                return 0
            reply = answer(request.decode("utf-8", errors="replace"))
            try:
                parent.send_bytes(reply.encode("utf-8"))
            except (BrokenPipeError, ConnectionResetError):
                print("python_worker.py: the parent went away before the reply", file=sys.stderr)
                return 1


if __name__ == "__main__":
    sys.exit(main())
