"""A child for `duplex run` tests: holds its end as multiprocessing.connection.Connection, found
through DUPLEX_FD (or writes raw bytes to it), and behaves as its first argument says:

  upper          answer each message with its upper-cased copy; at end-of-stream exit with
                 the code given as second argument (default 0)
  flood N        send N messages "flood <i>" without reading; then count what arrives until
                 end-of-stream and send "received <count>"
  negative       send "good one", then write a raw negative length (-7), then wait
  huge           send "good one", then a header announcing 2^31 - 1 bytes, then wait
  garbage        (native framing) write 32 bytes that are not a frame, then wait
  die SIGNAL     send "about to die", then kill itself with the signal
  fd             send the value of DUPLEX_FD
  fds            send the numbers of every fd it holds
  first CODE     answer the first message with its upper-cased copy, then exit with CODE
                 without reading any further
  hold           sleep, neither reading nor sending (any framing)
  stubborn       ignore SIGTERM, SIGINT, SIGHUP and SIGQUIT, then hold
  spew           send "spew <i>" for ever, never reading
  upper-hold     answer each message with its upper-cased copy; at end-of-stream, hold
  count-int      count SIGINTs: once one came, wait a second for more, write the count to
                 RUN_PEER_PIDFILE + ".ints" and exit 0

With RUN_PEER_PIDFILE set, it first writes its pid to that file.
"""
import os
import signal
import struct
import sys
import time
from multiprocessing.connection import Connection


def main():
    fd = int(os.environ["DUPLEX_FD"])
    mode = sys.argv[1]
    signal.alarm(60)  # never outlive a broken test
    if "RUN_PEER_PIDFILE" in os.environ:
        with open(os.environ["RUN_PEER_PIDFILE"] + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.rename(os.environ["RUN_PEER_PIDFILE"] + ".tmp", os.environ["RUN_PEER_PIDFILE"])
    if mode == "garbage":
        os.write(fd, b"this is not a duplex frame at all")
        time.sleep(30)
        return 0
    if mode == "count-int":
        count = [0]
        signal.signal(signal.SIGINT, lambda *_: count.__setitem__(0, count[0] + 1))
        while count[0] == 0:
            signal.pause()
        time.sleep(1)  # a second SIGINT, if any, comes now
        with open(os.environ["RUN_PEER_PIDFILE"] + ".ints", "w") as f:
            f.write(str(count[0]))
        return 0
    if mode in ("hold", "stubborn"):
        if mode == "stubborn":
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
                signal.signal(sig, signal.SIG_IGN)
        time.sleep(60)
        return 0
    conn = Connection(fd)
    if mode == "upper":
        while True:
            try:
                data = conn.recv_bytes()
            except EOFError:
                return int(sys.argv[2]) if len(sys.argv) > 2 else 0
            conn.send_bytes(data.upper())
    if mode == "flood":
        for i in range(int(sys.argv[2])):
            conn.send_bytes(b"flood %d" % i)
        count = 0
        while True:
            try:
                conn.recv_bytes()
            except EOFError:
                break
            count += 1
        conn.send_bytes(b"received %d" % count)
        return 0
    if mode in ("negative", "huge"):
        conn.send_bytes(b"good one")
        os.write(fd, struct.pack("!i", -7 if mode == "negative" else 0x7FFFFFFF))
        time.sleep(30)
        return 0
    if mode == "die":
        conn.send_bytes(b"about to die")
        os.kill(os.getpid(), getattr(signal, sys.argv[2]))
        time.sleep(30)
        return 0
    if mode == "fd":
        conn.send_bytes(str(fd).encode())
        return 0
    if mode == "fds":
        # Every fd this process holds (the listing's own is closed by the time it is checked).
        held = sorted(int(n) for n in os.listdir("/proc/self/fd")
                      if os.path.lexists(f"/proc/self/fd/{n}"))
        conn.send_bytes(" ".join(map(str, held)).encode())
        return 0
    if mode == "first":
        conn.send_bytes(conn.recv_bytes().upper())
        return int(sys.argv[2])
    if mode == "upper-hold":
        while True:
            try:
                data = conn.recv_bytes()
            except EOFError:
                time.sleep(60)
                return 0
            conn.send_bytes(data.upper())
    if mode == "spew":
        i = 0
        while True:
            conn.send_bytes(b"spew %d" % i)
            i += 1
    print(f"run_peer: unknown mode {mode}", file=sys.stderr)
    return 99


if __name__ == "__main__":
    sys.exit(main())
