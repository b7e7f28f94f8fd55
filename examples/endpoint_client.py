#!/usr/bin/env python3
"""A Python client of examples/endpoint_service.cpp, using nothing but CPython's
multiprocessing.connection.Client.

The service listens on a unix socket path with an authkey; this script reads the same key from a
file (every byte of it, never from the command line), connects, and runs CPython's mutual
HMAC handshake with the C++ listener. It then sends each further argument as one message and
prints the service's reply. A wrong key is multiprocessing.AuthenticationError: printed, exit 3.

Usage: endpoint_client.py SOCKET_PATH KEYFILE REQUEST...
"""

import sys
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client


def main():
    if len(sys.argv) < 4:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    path, keyfile, requests = sys.argv[1], sys.argv[2], sys.argv[3:]
    with open(keyfile, "rb") as f:
        key = f.read()
    try:
        with Client(path, "AF_UNIX", authkey=key) as conn:
            for request in requests:
                conn.send_bytes(request.encode())
                reply = conn.recv_bytes().decode()
                print(f"Python client: {request!r} -> {reply!r}", flush=True)
    except AuthenticationError as e:
        print(f"Python client: authentication failed: {e}", flush=True)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
