#!/usr/bin/env python3
"""The Python end of duplex's endpoint interop tests: CPython's own Listener and Client.

endpoint_interop_test.cpp runs this script under a CPython of each handshake generation (3.12
and later: the "{sha256}" challenge; 3.11 and earlier: HMAC-MD5) and talks to it through a
duplex listener or connect with framing::python. The authkey is read from a file, never
taken from the command line. Modes:

  listen ADDRESS KEYFILE   Listener(ADDRESS, authkey=...): print "ready ADDRESS" (the port
                           chosen when it was 0), accept one connection, answer each message
                           with its bytes reversed until end-of-stream
  client ADDRESS KEYFILE   Client(ADDRESS, authkey=...): send b"hello from python", expect
                           b"hello from duplex" back, close

ADDRESS is duplex's text form: unix:PATH, unix:@NAME, tcp:HOST:PORT. KEYFILE "-" means no
authkey. Exit status: 0 when everything passed, 3 on AuthenticationError (printed as
"authentication-failed" on stdout), anything else on another failure (reported on stderr).
"""

import sys
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Listener


def parse(text):
    if text.startswith("unix:@"):
        return "\0" + text[len("unix:@"):], "AF_UNIX"
    if text.startswith("unix:"):
        return text[len("unix:"):], "AF_UNIX"
    host, _, port = text[len("tcp:"):].rpartition(":")
    return (host.strip("[]"), int(port)), "AF_INET6" if ":" in host else "AF_INET"


def show(address, family):
    if family == "AF_UNIX":
        if isinstance(address, bytes):  # an abstract name comes back as bytes
            address = address.decode()
        return "unix:@" + address[1:] if address.startswith("\0") else "unix:" + address
    host, port = address[0], address[1]
    return "tcp:[%s]:%d" % (host, port) if family == "AF_INET6" else "tcp:%s:%d" % (host, port)


def main():
    mode, text, keyfile = sys.argv[1:4]
    key = None
    if keyfile != "-":
        with open(keyfile, "rb") as f:
            key = f.read()
    address, family = parse(text)
    try:
        if mode == "listen":
            with Listener(address, family, authkey=key) as listener:
                print("ready", show(listener.address, family), flush=True)
                with listener.accept() as conn:
                    while True:
                        try:
                            message = conn.recv_bytes()
                        except EOFError:
                            return 0
                        conn.send_bytes(message[::-1])
        if mode == "client":
            with Client(address, family, authkey=key) as conn:
                conn.send_bytes(b"hello from python")
                reply = conn.recv_bytes()
                if reply != b"hello from duplex":
                    print("unexpected reply %r" % reply, file=sys.stderr)
                    return 1
            return 0
    except AuthenticationError as e:
        print("authentication-failed", flush=True)
        print("AuthenticationError: %s" % e, file=sys.stderr)
        return 3
    print("unknown mode %r" % mode, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
