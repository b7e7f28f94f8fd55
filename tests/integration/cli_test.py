"""End-to-end tests of the duplex command line: exit statuses, help, demo, info, run, connect,
serve and bench.

Usage: python3 cli_test.py PATH_TO_DUPLEX
"""
import glob
import json
import os
import pty
import re
import resource
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import unittest
import xml.etree.ElementTree as ET

DUPLEX = None
PEER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "run_peer.py")


def run(*args, limit_fds=None, input=None, timeout=60):
    def lower_fd_limit():
        if limit_fds is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit_fds, limit_fds))

    return subprocess.run([DUPLEX, *args], capture_output=True, text=True, timeout=timeout,
                          preexec_fn=lower_fd_limit, input=input)


class Usage(unittest.TestCase):
    def test_help_lists_every_command(self):
        r = run("--help")
        self.assertEqual(r.returncode, 0, r.stderr)
        for command in ("demo", "info", "run", "connect", "serve", "bench"):
            self.assertIn(command, r.stdout)

    def test_each_command_has_help(self):
        for command in ("demo", "info", "run", "connect", "serve", "bench"):
            r = run(command, "--help")
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertIn("Usage:", r.stdout)

    def test_version(self):
        r = run("--version")
        self.assertEqual(r.returncode, 0)
        self.assertRegex(r.stdout, r"^duplex \d+\.\d+\.\d+\n$")

    def assert_bad_usage(self, r):
        self.assertEqual(r.returncode, 2)
        self.assertEqual(r.stdout, "")
        self.assertEqual(len(r.stderr.strip().splitlines()), 1, r.stderr)
        self.assertTrue(r.stderr.startswith("duplex: "), r.stderr)

    def test_no_command_is_bad_usage(self):
        self.assert_bad_usage(run())

    def test_unknown_command_is_bad_usage(self):
        self.assert_bad_usage(run("frobnicate"))

    def test_unknown_scenario_is_bad_usage(self):
        self.assert_bad_usage(run("demo", "pipes"))

    def test_unknown_option_is_bad_usage(self):
        self.assert_bad_usage(run("info", "--yaml"))


class Demo(unittest.TestCase):
    def check(self, scenario, lines):
        r = run("demo", scenario)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(r.stderr, "")
        for line in lines:
            self.assertIn(line, r.stdout)
        return r.stdout

    FORK = ["Parent: received from child: Hello from child process!",
            "Child: received from parent: Hello from parent process!",
            "Parent: child exited with status 0."]
    DGRAM = ["Received message 1 (13 bytes): First message",
             "Received message 2 (44 bytes): Second message is longer than the first one.",
             "into an 8-byte buffer: message larger than the receive buffer"]
    THREADS = ["Main: received from thread: Message from thread",
               "Thread: received reply: Reply from main"]

    def test_fork(self):
        self.check("fork", self.FORK)

    def test_dgram(self):
        self.check("dgram", self.DGRAM)

    def test_threads(self):
        self.check("threads", self.THREADS)

    def test_all(self):
        self.check("all", self.FORK + self.DGRAM + self.THREADS)

    @unittest.skipIf("UBSAN_OPTIONS" in os.environ,
                     "UBSan's vptr check itself needs free fds, so it cannot run out of them")
    def test_a_failure_is_one_line_and_status_1(self):
        # One fd free beyond stdio (enough for the dynamic loader, not for a pair).
        r = run("demo", "fork", limit_fds=4)
        self.assertEqual(r.returncode, 1)
        self.assertTrue(r.stderr.endswith("duplex: demo fork: socketpair: Too many open files\n"),
                        r.stderr)
        self.assertEqual(len(r.stderr.splitlines()), 1, r.stderr)


class Run(unittest.TestCase):
    """duplex run with real python3 children speaking multiprocessing.connection's framing."""

    def py(self, *args, input="", framing="python", extra=()):
        return run("run", "--framing", framing, *extra, "--", sys.executable, PEER, *args,
                   input=input, timeout=120)

    def test_lines_in_messages_out_and_the_childs_status(self):
        r = self.py("upper", "4", input="hello\nworld\n\nlast line without newline")
        self.assertEqual(r.stdout, "HELLO\nWORLD\n\nLAST LINE WITHOUT NEWLINE\n")
        self.assertEqual(r.returncode, 4, r.stderr)
        self.assertEqual(r.stderr, "")

    def test_a_child_killed_by_a_signal_gives_128_plus_it(self):
        r = self.py("die", "SIGKILL")
        self.assertEqual(r.stdout, "about to die\n")
        self.assertEqual(r.returncode, 128 + 9, r.stderr)

    def test_a_flooding_child_that_never_reads_does_not_deadlock(self):
        # 200,000 messages from the child while 100,000 lines go to it, both at once.
        lines = "".join(f"line {i}\n" for i in range(100000))
        r = self.py("flood", "200000", input=lines)
        self.assertEqual(r.returncode, 0, r.stderr)
        out = r.stdout.splitlines()
        self.assertEqual(len(out), 200001)
        self.assertEqual(out[0], "flood 0")
        self.assertEqual(out[199999], "flood 199999")
        self.assertEqual(out[-1], "received 100000")

    def assert_protocol_break(self, r, what):
        self.assertEqual(r.returncode, 1)
        self.assertEqual(r.stdout, "good one\n")  # everything intact before the break
        self.assertEqual(len(r.stderr.splitlines()), 1, r.stderr)
        self.assertIn("broke the protocol: " + what, r.stderr)

    def test_a_negative_length_is_named(self):
        self.assert_protocol_break(self.py("negative"), "negative message length -7")

    def test_a_length_over_the_maximum_is_named(self):
        self.assert_protocol_break(
            self.py("huge"), "message length 2147483647 is over the maximum 67108864")

    def test_garbage_on_a_native_channel_is_named(self):
        r = self.py("garbage", framing="native")
        self.assertEqual(r.returncode, 1)
        self.assertEqual(r.stdout, "")
        self.assertRegex(r.stderr, r"^duplex: run: .* broke the protocol: bad magic 0x74 0x68")

    def test_the_end_goes_where_fd_says(self):
        r = self.py("fd", extra=("--fd", "9"))
        self.assertEqual((r.returncode, r.stdout), (0, "9\n"), r.stderr)

    def test_the_child_holds_only_stdio_and_its_end(self):
        # duplex run's own fds (its pidfd, its end, whatever the runner passed it) stay out.
        extra_fd = os.open(os.devnull, os.O_RDONLY)  # inheritable, as a careless caller's would be
        try:
            r = subprocess.run([DUPLEX, "run", "--framing", "python", "--", sys.executable, PEER,
                                "fds"], capture_output=True, text=True, timeout=60, input="",
                               pass_fds=(extra_fd,))
        finally:
            os.close(extra_fd)
        self.assertEqual((r.returncode, r.stdout), (0, "0 1 2 3\n"), r.stderr)

    def test_a_command_that_cannot_start_is_a_one_line_failure(self):
        r = run("run", "--", "duplex-no-such-command")
        self.assertEqual(r.returncode, 1)
        self.assertEqual(r.stderr,
                         "duplex: run: cannot start 'duplex-no-such-command': No such file or directory\n")

    def test_bad_usage(self):
        for args in (["run"], ["run", "--kind", "seqpacket", "--framing", "python", "--", "true"],
                     ["run", "--fd", "2", "--", "true"], ["run", "--kind", "datagram", "--", "true"]):
            r = run(*args)
            self.assertEqual(r.returncode, 2, args)
            self.assertEqual(len(r.stderr.strip().splitlines()), 1, r.stderr)


def process_gone(pid, within=10):
    """True once pid is neither running nor a zombie (it was reaped), waiting up to `within` s."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not os.path.exists(f"/proc/{pid}"):
            return True
        time.sleep(0.05)
    return False


def default_signals():
    """For a duplex under test: the signals it handles at their defaults (a shell without job
    control starts background commands with SIGINT and SIGQUIT ignored, which duplex keeps), and
    no core file from a death by SIGQUIT."""
    for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_DFL)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


class RunEnds(unittest.TestCase):
    """How duplex run ends on faults of its own (input, output, limits, signals): one line and
    status 1 (or death by the signal), and its child ended and reaped, never orphaned."""

    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.pidfile = os.path.join(self.tmp.name, "child.pid")
        self.env = dict(os.environ, RUN_PEER_PIDFILE=self.pidfile)
        self.duplex = None

    def tearDown(self):
        if self.duplex is not None and self.duplex.poll() is None:
            self.duplex.kill()
            self.duplex.wait()
        for pid in self.holders_of_our_environment():  # never leave a failed test's child
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.tmp.cleanup()

    # A child that is not Python, for a stdin Python refuses to start with (a directory).
    SH_HOLD = ("sh", "-c", 'echo $$ > "$RUN_PEER_PIDFILE.tmp" && mv "$RUN_PEER_PIDFILE.tmp" '
               '"$RUN_PEER_PIDFILE" && exec sleep 60')

    def start(self, *peer, framing="python", extra=(), preexec=None, command=None, **popen):
        def prepare():
            default_signals()
            if preexec is not None:
                preexec()

        popen.setdefault("stderr", subprocess.PIPE)
        self.duplex = subprocess.Popen(
            [DUPLEX, "run", "--framing", framing, *extra, "--",
             *(command or (sys.executable, PEER, *peer))],
            env=self.env, preexec_fn=prepare, **popen)
        return self.duplex

    def finish(self, input=None, timeout=30):
        out, err = self.duplex.communicate(input=input, timeout=timeout)
        return self.duplex.returncode, out, err

    def child_pid(self, within=30):
        deadline = time.monotonic() + within
        while not os.path.exists(self.pidfile):
            self.assertLess(time.monotonic(), deadline, "the child never started")
            time.sleep(0.02)
        with open(self.pidfile) as f:
            return int(f.read())

    def holders_of_our_environment(self):
        """Live processes started for this test (whose environment names its pid file)."""
        mark = ("RUN_PEER_PIDFILE=" + self.pidfile).encode() + b"\0"
        found = []
        for entry in os.listdir("/proc"):
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if mark in f.read():
                        found.append(int(entry))
            except (OSError, ValueError):
                pass
        return found

    def assert_child_gone(self):
        """duplex has exited; its child must be gone too: reaped, not orphaned. A child killed
        before it could write its pid file is looked for by its environment."""
        if os.path.exists(self.pidfile):
            self.assertTrue(process_gone(self.child_pid()), "the child of duplex run is there")
        deadline = time.monotonic() + 10
        while self.holders_of_our_environment():
            self.assertLess(time.monotonic(), deadline, "the child of duplex run is still there")
            time.sleep(0.05)

    def assert_one_line_failure(self, err, line):
        self.assertEqual(err.decode(), "duplex: run: " + line + "\n")

    # An input line it cannot send.

    def test_a_line_over_the_maximum_message_size_ends_the_run(self):
        self.start("upper", stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        code, _, err = self.finish(b"first line\n" + b"a" * 70_000_000 + b"\nafter\n")
        self.assertEqual(code, 1, err)
        self.assert_one_line_failure(
            err, "line 2 is longer than the maximum message size (67108864 bytes)")
        self.assert_child_gone()

    def test_a_line_over_the_packet_limit_ends_the_run(self):
        self.start("hold", framing="native", extra=("--kind", "seqpacket"),
                   stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        code, _, err = self.finish(b"ok\n" + b"a" * 20_000_000 + b"\n")
        self.assertEqual(code, 1, err)
        self.assertRegex(err.decode(), r"^duplex: run: line 2 \(20000000 bytes\) is longer than "
                                        r"a seqpacket message can be \(the socket's send buffer "
                                        r"is \d+ bytes\)\n$")
        self.assert_child_gone()

    def test_a_child_that_stops_reading_decides_the_status(self):
        # The child answers one line and exits 3 while 200,000 more are on their way to it.
        self.start("first", "3", stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        code, out, err = self.finish(b"".join(b"line %d\n" % i for i in range(200000)))
        self.assertEqual((code, out, err), (3, b"LINE 0\n", b""))

    # Input and output errors.

    def test_a_full_stdout_is_a_write_error(self):
        with open("/dev/full", "wb") as full:
            self.start("spew", stdin=subprocess.DEVNULL, stdout=full)
            code, _, err = self.finish()
        self.assertEqual(code, 1, err)
        self.assert_one_line_failure(err, "write error: No space left on device")
        self.assert_child_gone()

    def test_a_stdin_that_cannot_be_read_is_a_read_error(self):
        directory = os.open("/", os.O_RDONLY)
        try:
            self.start(command=self.SH_HOLD, stdin=directory, stdout=subprocess.PIPE)
        finally:
            os.close(directory)
        code, out, err = self.finish()
        self.assertEqual((code, out), (1, b""), err)
        self.assert_one_line_failure(err, "reading stdin: Is a directory")
        self.assert_child_gone()

    # Closed stdio: no fd of duplex takes its number; reading or writing it fails as on the
    # closed fd (EBADF), as coreutils' `cat <&-` and `echo >&-` do.

    def test_a_closed_stdin_is_a_read_error(self):
        self.start(command=self.SH_HOLD, preexec=lambda: os.close(0), stdout=subprocess.PIPE)
        code, out, err = self.finish()
        self.assertEqual((code, out), (1, b""), err)
        self.assert_one_line_failure(err, "reading stdin: Bad file descriptor")
        self.assert_child_gone()

    def test_a_closed_stdout_is_a_write_error(self):
        self.start("spew", preexec=lambda: os.close(1), stdin=subprocess.DEVNULL)
        code, _, err = self.finish()
        self.assertEqual(code, 1, err)
        self.assert_one_line_failure(err, "write error: Bad file descriptor")
        self.assert_child_gone()

    def test_demo_with_a_closed_stdout_is_a_write_error(self):
        r = subprocess.run([DUPLEX, "demo", "fork"], stdin=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True, timeout=60,
                           preexec_fn=lambda: os.close(1))
        self.assertEqual(r.returncode, 1, r.stderr)
        self.assertIn("Bad file descriptor", r.stderr)
        self.assertEqual(len(r.stderr.splitlines()), 1, r.stderr)

    # --fd against the open-file limit.

    def test_an_fd_at_the_open_file_limit_is_bad_usage(self):
        r = run("run", "--fd", "64", "--", "true", limit_fds=64)
        self.assertEqual(r.returncode, 2, r.stderr)
        self.assertEqual(r.stderr, "duplex: run: --fd 64 is not below the limit on open files "
                                   "(RLIMIT_NOFILE: 64)\n")

    def test_the_last_fd_below_the_open_file_limit_works(self):
        r = run("run", "--framing", "python", "--fd", "63", "--", sys.executable, PEER, "fd",
                limit_fds=64, input="")
        self.assertEqual((r.returncode, r.stdout), (0, "63\n"), r.stderr)

    # Signals: passed on to the child, which is reaped; then duplex dies of the same signal.

    def check_signal_ends_the_run(self, sig, peer="hold"):
        self.start(peer, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        pid = self.child_pid()
        os.kill(self.duplex.pid, sig)
        code, _, err = self.finish(timeout=30)
        self.assertEqual(code, -sig, err)
        self.assertTrue(process_gone(pid), "the child of duplex run is still there")

    def test_sigterm_is_passed_on_and_duplex_dies_of_it(self):
        self.check_signal_ends_the_run(signal.SIGTERM)

    def test_sigint_is_passed_on_and_duplex_dies_of_it(self):
        self.check_signal_ends_the_run(signal.SIGINT)

    def test_sighup_is_passed_on_and_duplex_dies_of_it(self):
        self.check_signal_ends_the_run(signal.SIGHUP)

    def test_sigquit_is_passed_on_and_duplex_dies_of_it(self):
        self.check_signal_ends_the_run(signal.SIGQUIT)

    def interrupts_seen_by_the_child(self):
        with open(self.pidfile + ".ints") as f:
            return int(f.read())

    def test_a_sigint_from_kill_reaches_the_child_once(self):
        self.start("count-int", stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.child_pid()
        os.kill(self.duplex.pid, signal.SIGINT)
        code, _, err = self.finish()
        self.assertEqual(code, -signal.SIGINT, err)
        self.assertEqual(self.interrupts_seen_by_the_child(), 1)

    def test_a_ctrl_c_on_the_terminal_reaches_the_child_once(self):
        # The terminal signals its whole foreground process group, the child with duplex: duplex
        # must not send it a second SIGINT.
        pid, terminal = pty.fork()
        if pid == 0:  # duplex, leading a session on a new terminal
            try:
                default_signals()
                os.execve(DUPLEX, [DUPLEX, "run", "--framing", "python", "--", sys.executable,
                                   PEER, "count-int"], self.env)
            finally:
                os._exit(127)
        try:
            self.child_pid()
            os.write(terminal, b"\x03")  # ^C: VINTR, with ISIG on as a new terminal has it
            deadline = time.monotonic() + 30
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                if time.monotonic() > deadline:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    self.fail("duplex run did not end")
                ready, _, _ = select.select([terminal], [], [], 0.05)
                if ready:
                    try:
                        os.read(terminal, 4096)  # keep the terminal drained
                    except OSError:
                        pass
        finally:
            os.close(terminal)
        self.assertTrue(os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGINT, status)
        self.assertEqual(self.interrupts_seen_by_the_child(), 1)
        self.assert_child_gone()

    def test_a_child_that_ignores_the_signal_is_killed_after_the_grace_period(self):
        started = time.monotonic()
        self.check_signal_ends_the_run(signal.SIGTERM, peer="stubborn")
        self.assertGreaterEqual(time.monotonic() - started, 5)

    def test_a_closed_stdout_pipe_ends_the_child_and_duplex_dies_of_sigpipe(self):
        # duplex run ... | head -1: the reader leaves after the first line.
        self.start("upper-hold", stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.duplex.stdin.write(b"one\n")
        self.duplex.stdin.flush()
        self.assertEqual(self.duplex.stdout.readline(), b"ONE\n")
        self.duplex.stdout.close()
        self.duplex.stdin.write(b"two\n")
        self.duplex.stdin.flush()
        self.duplex.stdin.close()
        self.duplex.wait(timeout=30)
        self.assert_child_gone()  # first: an orphaned child would hold stderr open
        err = self.duplex.stderr.read()
        self.assertEqual((self.duplex.returncode, err), (-signal.SIGPIPE, b""))

    def test_a_child_outlives_no_sigkill_of_duplex(self):
        self.start("hold", stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        pid = self.child_pid()
        os.kill(self.duplex.pid, signal.SIGKILL)
        self.duplex.wait(timeout=30)
        # Killed by the kernel (PR_SET_PDEATHSIG); reaped by whoever inherited it, or a zombie.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                        break
            except FileNotFoundError:
                break
            time.sleep(0.05)
        else:
            self.fail("the child of a killed duplex run is still running")


def find_python(modern):
    """A CPython of one handshake generation: 3.12 or later (modern: the "{sha256}" challenge) or
    3.11 and earlier (legacy: HMAC-MD5), searched as the interop tests search (the environment's
    DUPLEX_PYTHON_MODERN or DUPLEX_PYTHON_LEGACY, this interpreter, python3.N in PATH, pyenv's
    versions); None if the machine has none."""
    names = ["python3.14", "python3.13", "python3.12"] if modern else \
        ["python3.11", "python3.10", "python3.9"]
    candidates = [os.environ.get("DUPLEX_PYTHON_MODERN" if modern else "DUPLEX_PYTHON_LEGACY"),
                  sys.executable, "/usr/bin/python3"]
    candidates += [shutil.which(n) for n in names]
    root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    candidates += sorted(glob.glob(os.path.join(root, "versions", "3.*", "bin", "python3")),
                         reverse=True)
    test = ("import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)" if modern else
            "import sys; sys.exit(0 if (3, 6) <= sys.version_info < (3, 12) else 1)")
    for c in candidates:
        if not c or not os.path.exists(c):
            continue
        try:
            if subprocess.run([c, "-c", test], timeout=20, capture_output=True).returncode == 0:
                return c
        except (OSError, subprocess.TimeoutExpired):
            pass
    return None


PYTHONS = {}


def python_of(generation):
    if generation not in PYTHONS:
        PYTHONS[generation] = find_python(generation == "modern")
    return PYTHONS[generation]


# CPython's side of an endpoint test, run under a chosen interpreter: its own Client or Listener,
# the authkey read from a file (or none with "-").
PY_CLIENT = """
import sys
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client
family, where, keyfile = sys.argv[1], sys.argv[2], sys.argv[3]
address = where if family == "AF_UNIX" else (where.rpartition(":")[0], int(where.rpartition(":")[2]))
key = None if keyfile == "-" else open(keyfile, "rb").read()
try:
    with Client(address, family, authkey=key) as c:
        for text in sys.argv[4:]:
            c.send_bytes(text.encode())
            print(c.recv_bytes().decode(), flush=True)
except AuthenticationError as e:
    print("AuthenticationError:", e, file=sys.stderr)
    sys.exit(3)
"""

PY_LISTENER = """
import sys
from multiprocessing import AuthenticationError
from multiprocessing.connection import Listener
keyfile = sys.argv[1]
key = None if keyfile == "-" else open(keyfile, "rb").read()
with Listener(("127.0.0.1", 0), "AF_INET", authkey=key) as l:
    print(l.address[1], flush=True)
    try:
        c = l.accept()
    except AuthenticationError:
        print("AuthenticationError", flush=True)
        sys.exit(3)
    with c:
        while True:
            try:
                m = c.recv_bytes()
            except EOFError:
                sys.exit(0)
            c.send_bytes(m[::-1])
"""


def free_tcp_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Endpoints(unittest.TestCase):
    """duplex serve and duplex connect: with each other and with CPython's own Client and
    Listener (both handshake generations), keys from files, and every way they end."""

    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.key = self.keyfile("key", b"the shared secret\n")
        self.wrong = self.keyfile("wrong", b"not the secret")
        self.pidfile = os.path.join(self.tmp.name, "child.pid")
        self.env = dict(os.environ, RUN_PEER_PIDFILE=self.pidfile)
        self.procs = []

    def tearDown(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            for f in (p.stdin, p.stdout, p.stderr):
                if f is not None:
                    try:
                        f.close()
                    except OSError:
                        pass
        self.tmp.cleanup()

    def keyfile(self, name, data):
        path = os.path.join(self.tmp.name, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def path(self, name="s.sock"):
        return os.path.join(self.tmp.name, name)

    def serve(self, address, *peer, extra=(), command=None):
        p = subprocess.Popen(
            [DUPLEX, "serve", "--framing", "python", *extra, address, "--",
             *(command or (sys.executable, PEER, *peer))],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=self.env, preexec_fn=default_signals)
        self.procs.append(p)
        return p

    def wait_listening(self, address, within=30):
        """Until something listens at address, as the kernel's tables say (a probing connect
        would be a client of its own)."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if address.startswith("tcp:"):
                port = "%04X" % int(address.rpartition(":")[2])
                with open("/proc/net/tcp") as f:
                    # local_address is HEXIP:PORT; state 0A is LISTEN
                    if any(line.split()[1].endswith(":" + port) and line.split()[3] == "0A"
                           for line in f.readlines()[1:]):
                        return
            else:
                name = address[len("unix:"):]
                with open("/proc/net/unix") as f:
                    # Flags 00010000: a listening socket; the last column is its name
                    if any(line.split()[-1] == name and line.split()[3] == "00010000"
                           for line in f.readlines()[1:] if len(line.split()) == 8):
                        return
            time.sleep(0.05)
        self.fail("nothing listens at " + address)

    def connect(self, address, input, *extra, timeout=60):
        return subprocess.run([DUPLEX, "connect", "--framing", "python", *extra, address],
                              input=input, capture_output=True, timeout=timeout,
                              preexec_fn=default_signals)

    def python_client(self, generation, family, where, keyfile, *texts):
        python = python_of(generation)
        if python is None:
            self.skipTest(f"no {generation} CPython on this machine")
        return subprocess.run([python, "-c", PY_CLIENT, family, where, keyfile, *texts],
                              capture_output=True, text=True, timeout=60)

    def finish(self, p, timeout=30):
        out, err = p.communicate(timeout=timeout)
        return p.returncode, (out or b"").decode(), (err or b"").decode()

    def assert_one_line(self, err, prefix):
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertTrue(err.startswith(prefix), err)

    # Together.

    def test_serve_once_and_connect_over_a_unix_path(self):
        address = "unix:" + self.path()
        server = self.serve(address, "upper", "5", extra=("--once", "--authkey-file", self.key))
        self.wait_listening(address)
        r = self.connect(address, b"one\ntwo\n", "--authkey-file", self.key)
        self.assertEqual((r.returncode, r.stdout, r.stderr), (0, b"ONE\nTWO\n", b""))
        self.assertEqual(self.finish(server), (5, "", ""))  # CMD's status
        self.assertFalse(os.path.exists(self.path()))  # the listener's file is gone

    def test_serve_and_connect_over_tcp_and_an_abstract_name(self):
        for address in (f"tcp:127.0.0.1:{free_tcp_port()}", f"unix:@duplex-cli-{os.getpid()}"):
            with self.subTest(address=address):
                server = self.serve(address, "upper", extra=("--once",))
                self.wait_listening(address)
                r = self.connect(address, b"over\n", "--timeout", "30")
                self.assertEqual((r.returncode, r.stdout, r.stderr), (0, b"OVER\n", b""))
                self.assertEqual(self.finish(server), (0, "", ""))

    def test_the_child_holds_only_stdio_and_the_connection(self):
        address = "unix:" + self.path()
        server = self.serve(address, "fds", extra=("--once",))
        self.wait_listening(address)
        r = self.connect(address, b"")
        self.assertEqual((r.returncode, r.stdout), (0, b"0 1 2 3\n"), r.stderr)
        self.assertEqual(self.finish(server)[0], 0)

    # CPython's Client against duplex serve, and duplex connect against CPython's Listener.

    def test_python_clients_of_both_generations_against_serve(self):
        port = free_tcp_port()
        server = self.serve(f"tcp:127.0.0.1:{port}", "upper",
                            extra=("--authkey-file", self.key))
        self.wait_listening(f"tcp:127.0.0.1:{port}")
        ran = 0
        for generation in ("legacy", "modern"):
            if python_of(generation) is None:
                print(f"\nskipped: no {generation} CPython", file=sys.stderr)
                continue
            ran += 1
            with self.subTest(generation=generation):
                r = self.python_client(generation, "AF_INET", f"127.0.0.1:{port}", self.key,
                                       "hello", "again")
                self.assertEqual((r.returncode, r.stdout), (0, "HELLO\nAGAIN\n"), r.stderr)
                # A wrong key: refused on both sides, and the next client is served.
                r = self.python_client(generation, "AF_INET", f"127.0.0.1:{port}", self.wrong,
                                       "x")
                self.assertEqual(r.returncode, 3, r.stderr)
                self.assertIn("AuthenticationError", r.stderr)
        self.assertGreater(ran, 0, "no CPython of either generation")
        os.kill(server.pid, signal.SIGTERM)
        code, out, err = self.finish(server)
        self.assertEqual((code, out), (0, ""), err)
        lines = err.splitlines()
        self.assertEqual(len(lines), ran, err)  # one line per refused client
        for line in lines:
            self.assertRegex(line, r"^duplex: serve: tcp:127\.0\.0\.1:\d+: .*key")

    def test_a_python_client_over_a_unix_path(self):
        address = "unix:" + self.path()
        server = self.serve(address, "upper", extra=("--once", "--authkey-file", self.key))
        self.wait_listening(address)
        r = self.python_client("legacy", "AF_UNIX", self.path(), self.key, "unix")
        self.assertEqual((r.returncode, r.stdout), (0, "UNIX\n"), r.stderr)
        self.assertEqual(self.finish(server), (0, "", ""))

    def python_listener(self, generation, keyfile):
        python = python_of(generation)
        if python is None:
            self.skipTest(f"no {generation} CPython on this machine")
        p = subprocess.Popen([python, "-c", PY_LISTENER, keyfile], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        self.procs.append(p)
        return p, int(p.stdout.readline())

    def test_connect_against_python_listeners_of_both_generations(self):
        for generation in ("legacy", "modern"):
            with self.subTest(generation=generation):
                listener, port = self.python_listener(generation, self.key)
                r = self.connect(f"tcp:127.0.0.1:{port}", b"abc\nxyz\n",
                                 "--authkey-file", self.key, "--timeout", "30")
                self.assertEqual((r.returncode, r.stdout, r.stderr), (0, b"cba\nzyx\n", b""))
                self.assertEqual(listener.wait(timeout=30), 0)

    def test_a_wrong_key_is_one_line_and_status_1(self):
        for generation in ("legacy", "modern"):
            with self.subTest(generation=generation):
                listener, port = self.python_listener(generation, self.key)
                r = self.connect(f"tcp:127.0.0.1:{port}", b"abc\n",
                                 "--authkey-file", self.wrong, "--timeout", "30")
                self.assertEqual((r.returncode, r.stdout), (1, b""), r.stderr)
                self.assert_one_line(r.stderr.decode(), f"duplex: connect: handshake with "
                                     f"tcp:127.0.0.1:{port} failed: ")
                self.assertIn("key", r.stderr.decode())
                self.assertEqual(listener.wait(timeout=30), 3)

    # How connect fails.

    def test_a_refused_connection_is_one_line_and_status_1(self):
        port = free_tcp_port()
        r = self.connect(f"tcp:127.0.0.1:{port}", b"x\n")
        self.assertEqual((r.returncode, r.stdout), (1, b""))
        self.assertEqual(r.stderr.decode(), f"duplex: connect: cannot connect to "
                         f"tcp:127.0.0.1:{port}: Connection refused\n")
        r = self.connect("unix:" + self.path("none.sock"), b"x\n")
        self.assertEqual(r.returncode, 1)
        self.assert_one_line(r.stderr.decode(), "duplex: connect: cannot connect to unix:")
        self.assertIn("No such file or directory", r.stderr.decode())

    def test_a_silent_listener_is_a_timeout(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            s.listen()
            port = s.getsockname()[1]
            started = time.monotonic()
            r = self.connect(f"tcp:127.0.0.1:{port}", b"x\n", "--authkey-file", self.key,
                             "--timeout", "0.5")
            self.assertLess(time.monotonic() - started, 20)
        self.assertEqual((r.returncode, r.stdout), (1, b""), r.stderr)
        self.assert_one_line(r.stderr.decode(), "duplex: connect: handshake with ")
        self.assertIn("timed out", r.stderr.decode())

    def test_a_protocol_break_is_one_line_and_status_1(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            s.listen()
            port = s.getsockname()[1]
            p = subprocess.Popen([DUPLEX, "connect", "--framing", "python",
                                  f"tcp:127.0.0.1:{port}"], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 preexec_fn=default_signals)
            self.procs.append(p)
            conn, _ = s.accept()
            with conn:
                conn.sendall(struct.pack("!i", 4) + b"good" + struct.pack("!i", -7))
                code, out, err = self.finish(p)
        self.assertEqual((code, out), (1, "good\n"), err)
        self.assert_one_line(err, f"duplex: connect: tcp:127.0.0.1:{port} broke the protocol: ")

    def test_bad_usage(self):
        for args in (["connect"], ["connect", "tcp:nowhere"], ["connect", "udp:x:1"],
                     ["connect", "--kind", "seqpacket", "tcp:127.0.0.1:1"],
                     ["connect", "--framing", "python", "--kind", "seqpacket", "unix:/x"],
                     ["connect", "--timeout", "-1", "unix:/x"],
                     ["serve", "unix:/x"], ["serve", "tcp:[::1]", "--", "true"],
                     ["serve", "--max-clients", "0", "unix:/x", "--", "true"]):
            with self.subTest(args=args):
                r = run(*args)
                self.assertEqual((r.returncode, r.stdout), (2, ""), r.stderr)
                self.assert_one_line(r.stderr, "duplex: ")

    def test_an_unreadable_key_file_is_one_line_and_status_1(self):
        missing = self.path("no-key")
        r = self.connect("unix:" + self.path(), b"", "--authkey-file", missing)
        self.assertEqual(r.stderr.decode(), f"duplex: connect: cannot read the authkey file "
                         f"'{missing}': No such file or directory\n")
        self.assertEqual(r.returncode, 1)
        r = run("serve", "--authkey-file", missing, "unix:" + self.path(), "--", "true")
        self.assertEqual(r.stderr, f"duplex: serve: cannot read the authkey file "
                         f"'{missing}': No such file or directory\n")
        self.assertEqual(r.returncode, 1)

    # How serve ends.

    def test_a_command_that_cannot_start_is_one_line_and_status_1(self):
        address = "unix:" + self.path()
        server = self.serve(address, command=["/nonexistent/worker"])
        self.wait_listening(address)
        r = self.connect(address, b"x\n")
        self.assertEqual((r.returncode, r.stdout), (0, b""), r.stderr)  # closed at once
        code, out, err = self.finish(server)
        self.assertEqual((code, out), (1, ""))
        self.assertEqual(err, "duplex: serve: cannot start '/nonexistent/worker': "
                         "No such file or directory\n")

    def test_max_clients_bounds_the_children_and_the_rest_wait(self):
        address = "unix:" + self.path()
        server = self.serve(address, "upper", extra=("--max-clients", "1"))
        self.wait_listening(address)
        first = subprocess.Popen([DUPLEX, "connect", "--framing", "python", address],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, preexec_fn=default_signals)
        second = subprocess.Popen([DUPLEX, "connect", "--framing", "python", address],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, preexec_fn=default_signals)
        self.procs += [first, second]
        first.stdin.write(b"first\n")
        first.stdin.flush()
        self.assertEqual(first.stdout.readline(), b"FIRST\n")
        second.stdin.write(b"second\n")
        second.stdin.flush()
        ready, _, _ = select.select([second.stdout], [], [], 1.5)
        self.assertEqual(ready, [], "a second child ran beside the first")
        first.stdin.close()  # the first child ends: the second client is served
        self.assertEqual(first.wait(timeout=30), 0)
        self.assertEqual(second.stdout.readline(), b"SECOND\n")
        second.stdin.close()
        self.assertEqual(second.wait(timeout=30), 0)
        os.kill(server.pid, signal.SIGTERM)
        self.assertEqual(self.finish(server), (0, "", ""))

    def children_of(self, pid):
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                return [int(c) for c in f.read().split()]
        except FileNotFoundError:
            return []

    def test_sigterm_stops_accepting_lets_the_child_finish_and_exits_0(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            with self.subTest(signal=sig):
                address = "unix:" + self.path()
                server = self.serve(address, "upper")
                self.wait_listening(address)
                client = subprocess.Popen([DUPLEX, "connect", "--framing", "python", address],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, preexec_fn=default_signals)
                self.procs.append(client)
                client.stdin.write(b"before\n")
                client.stdin.flush()
                self.assertEqual(client.stdout.readline(), b"BEFORE\n")
                os.kill(server.pid, sig)
                deadline = time.monotonic() + 10
                while os.path.exists(self.path()):  # no new connection
                    self.assertLess(time.monotonic(), deadline, "still listening")
                    time.sleep(0.02)
                time.sleep(0.2)
                self.assertIsNone(server.poll(), "serve did not wait for its child")
                client.stdin.write(b"after\n")  # the running child still answers
                client.stdin.flush()
                self.assertEqual(client.stdout.readline(), b"AFTER\n")
                client.stdin.close()
                self.assertEqual(client.wait(timeout=30), 0)
                self.assertEqual(self.finish(server), (0, "", ""))

    def test_children_are_reaped_as_they_end(self):
        address = "unix:" + self.path()
        server = self.serve(address, "upper")
        self.wait_listening(address)
        for i in range(3):
            r = self.connect(address, b"x\n")
            self.assertEqual((r.returncode, r.stdout), (0, b"X\n"), r.stderr)
        deadline = time.monotonic() + 10
        while self.children_of(server.pid):  # no zombie left behind
            self.assertLess(time.monotonic(), deadline, "a child was not reaped")
            time.sleep(0.05)
        os.kill(server.pid, signal.SIGTERM)
        self.assertEqual(self.finish(server), (0, "", ""))

    # The relay's endings, as duplex run's.

    def started_connect(self, peer, **popen):
        address = "unix:" + self.path()
        self.serve(address, peer, extra=("--once",))
        self.wait_listening(address)
        popen.setdefault("stdin", subprocess.PIPE)
        popen.setdefault("stdout", subprocess.PIPE)
        p = subprocess.Popen([DUPLEX, "connect", "--framing", "python", address],
                             stderr=subprocess.PIPE, preexec_fn=popen.pop("preexec", default_signals),
                             **popen)
        self.procs.append(p)
        return p

    def test_a_full_stdout_is_a_write_error(self):
        with open("/dev/full", "wb") as full:
            p = self.started_connect("spew", stdin=subprocess.DEVNULL, stdout=full)
            code, _, err = self.finish(p)
        self.assertEqual((code, err), (1, "duplex: connect: write error: No space left on device\n"))

    def test_a_closed_stdout_pipe_dies_of_sigpipe_silently(self):
        # duplex connect ... | head -1
        p = self.started_connect("spew", stdin=subprocess.DEVNULL)
        self.assertTrue(p.stdout.readline().startswith(b"spew "))
        p.stdout.close()
        p.wait(timeout=30)
        self.assertEqual((p.returncode, p.stderr.read()), (-signal.SIGPIPE, b""))

    def test_closed_stdio(self):
        def closed_stdin():
            default_signals()
            os.close(0)

        p = self.started_connect("upper", stdin=None, preexec=closed_stdin)
        code, out, err = self.finish(p)
        self.assertEqual((code, out, err), (1, "", "duplex: connect: reading stdin: "
                                                   "Bad file descriptor\n"))

        def closed_stdout():
            default_signals()
            os.close(1)

        p = self.started_connect("spew", stdin=subprocess.DEVNULL, stdout=None,
                                 preexec=closed_stdout)
        code, _, err = self.finish(p)
        self.assertEqual((code, err), (1, "duplex: connect: write error: Bad file descriptor\n"))

    def test_a_signal_ends_connect_by_the_signal(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            with self.subTest(signal=sig):
                p = self.started_connect("upper-hold")
                p.stdin.write(b"x\n")
                p.stdin.flush()
                self.assertEqual(p.stdout.readline(), b"X\n")
                os.kill(p.pid, sig)
                code, _, err = self.finish(p)
                self.assertEqual((code, err), (-sig, ""))


class Info(unittest.TestCase):
    def test_text(self):
        r = run("info")
        self.assertEqual(r.returncode, 0, r.stderr)
        for label in ("largest datagram", "largest seqpacket", "fds per message", "features",
                      "send buffer"):
            self.assertIn(label, r.stdout)
        self.assertRegex(r.stdout, r"fds per message\s+253 ")

    def test_json(self):
        r = run("info", "--json")
        self.assertEqual(r.returncode, 0, r.stderr)
        facts = json.loads(r.stdout)
        self.assertEqual(facts["fds_per_message"], 253)
        self.assertTrue(facts["kernel"]["release"])
        for kind in ("datagram", "seqpacket"):
            limit = facts["max_payload"][kind]
            self.assertGreater(limit["default_buffers"], 64 * 1024)
            self.assertGreaterEqual(limit["raised_buffers"], limit["default_buffers"])
        # The largest packet with default buffers is just under the default send buffer.
        sndbuf = facts["socket_buffers"]["stream_sndbuf"]
        self.assertLess(facts["max_payload"]["datagram"]["default_buffers"], sndbuf)
        for feature in ("memfd_seals", "pidfd", "so_peerpidfd", "io_uring"):
            self.assertIn("works", facts["features"][feature])
            if not facts["features"][feature]["works"]:
                self.assertTrue(facts["features"][feature]["reason"])


class Bench(unittest.TestCase):
    """duplex bench --quick on a few rows (never the full benchmark): table, JSON, SVG, usage."""

    TRANSPORTS = {"raw-stream", "raw-seqpacket", "raw-stream-busypoll", "pipe", "memcpy",
                  "duplex-stream", "duplex-seqpacket", "duplex-stream-busypoll",
                  "duplex-stream-batch", "duplex-shm", "duplex-shm-copy", "duplex-python",
                  "duplex-ring", "duplex-ring-busypoll", "raw-unix", "duplex-unix", "raw-tcp",
                  "duplex-tcp", "raw-unix-connect", "duplex-unix-connect", "raw-tcp-connect",
                  "duplex-tcp-connect"}
    # Every transport, and every row the goals need, in as few rows as that takes; the raw rows
    # their ratios need come along by themselves.
    FILTER = ("^rtt/threads/(pipe|duplex-seqpacket|duplex-python)/8B$"
              "|^rtt/processes/duplex-(stream|ring)(-busypoll)?/8B$"
              "|^throughput/threads/(memcpy|duplex-stream-batch)/64B$"
              "|^throughput/threads/duplex-shm(-copy)?/16MiB$"
              "|^rtt/threads/duplex-(unix|tcp)/8B$|^rtt/threads/duplex-(unix|tcp)-connect/8B$"
              "|^throughput/threads/duplex-(unix|tcp)/1MiB$")
    ROWS = ["rtt/threads/raw-stream/8B", "rtt/threads/raw-seqpacket/8B", "rtt/threads/pipe/8B",
            "rtt/threads/duplex-seqpacket/8B", "rtt/threads/duplex-python/8B",
            "rtt/processes/raw-stream/8B", "rtt/processes/duplex-stream/8B",
            "rtt/processes/raw-stream-busypoll/8B", "rtt/processes/duplex-stream-busypoll/8B",
            "rtt/processes/duplex-ring/8B", "rtt/processes/duplex-ring-busypoll/8B",
            "throughput/threads/raw-stream/64B", "throughput/threads/memcpy/64B",
            "throughput/threads/duplex-stream-batch/64B", "throughput/threads/raw-stream/16MiB",
            "throughput/threads/duplex-shm/16MiB", "throughput/threads/duplex-shm-copy/16MiB",
            "rtt/threads/raw-unix/8B", "rtt/threads/duplex-unix/8B", "rtt/threads/raw-tcp/8B",
            "rtt/threads/duplex-tcp/8B", "rtt/threads/raw-unix-connect/8B",
            "rtt/threads/duplex-unix-connect/8B", "rtt/threads/raw-tcp-connect/8B",
            "rtt/threads/duplex-tcp-connect/8B", "throughput/threads/raw-unix/1MiB",
            "throughput/threads/duplex-unix/1MiB", "throughput/threads/raw-tcp/1MiB",
            "throughput/threads/duplex-tcp/1MiB"]

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.json_path = os.path.join(cls.tmp.name, "bench.json")
        cls.svg_path = os.path.join(cls.tmp.name, "bench.svg")
        cls.r = run("bench", "--quick", "--filter", cls.FILTER, "--json", cls.json_path,
                    "--svg", cls.svg_path, timeout=120)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def results(self):
        self.assertEqual(self.r.returncode, 0, self.r.stderr)
        with open(self.json_path) as f:
            return json.load(f)

    def test_runs_quietly_and_prints_the_table(self):
        self.assertEqual(self.r.returncode, 0, self.r.stderr)
        self.assertEqual(self.r.stderr, "")  # no progress line: stderr is not a terminal
        out = self.r.stdout
        self.assertIn("Round trips", out)
        self.assertIn("Throughput", out)
        for name in self.ROWS:
            self.assertRegex(out, r"\n  " + re.escape(name) + r" +\d", name)
        self.assertRegex(out, r"rtt/processes/duplex-stream/8B +[\d.]+ (ns|us|ms) +\d+%  "
                             r"[\d.]+x raw-stream\n")
        goals = re.findall(r"^  (PASS|FAIL)  \((\d)\) ", out, re.M)
        self.assertEqual([g[1] for g in goals], ["1", "2", "3", "4", "5", "6", "7", "8"], out)

    def test_json_has_every_field(self):
        data = self.results()
        for key in ("kernel", "cpu", "cores", "date"):
            self.assertIn(key, data["machine"])
        self.assertTrue(data["machine"]["kernel"].startswith("Linux "))
        self.assertGreater(data["machine"]["cores"], 0)
        self.assertRegex(data["machine"]["date"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
        self.assertTrue(data["quick"])
        rows = {r["name"]: r for r in data["results"]}
        self.assertEqual(sorted(rows), sorted(self.ROWS))
        self.assertEqual({r["transport"] for r in data["results"]}, self.TRANSPORTS)
        for r in data["results"]:
            with self.subTest(row=r["name"]):
                self.assertIn(r["pattern"], ("rtt", "throughput"))
                self.assertIn(r["peers"], ("threads", "processes"))
                self.assertEqual(r["name"].split("/")[:3], [r["pattern"], r["peers"], r["transport"]])
                self.assertIsInstance(r["size"], int)
                self.assertGreater(r["size"], 0)
                self.assertTrue(r["method"])
                self.assertGreater(len(r["samples"]), 1)
                if r["pattern"] == "rtt":
                    self.assertGreater(r["ns_per_op"], 0)
                    self.assertNotIn("bytes_per_s", r)
                else:
                    self.assertGreater(r["bytes_per_s"], 0)
                    self.assertAlmostEqual(r["msgs_per_s"] * r["size"] / r["bytes_per_s"], 1, 6)

    def test_duplex_rows_have_a_ratio_to_their_raw_baseline(self):
        data = self.results()
        rows = {r["name"]: r for r in data["results"]}
        expected = {"duplex-stream": "raw-stream", "duplex-python": "raw-stream",
                    "duplex-stream-batch": "raw-stream", "duplex-shm": "raw-stream",
                    "duplex-shm-copy": "raw-stream", "duplex-seqpacket": "raw-seqpacket",
                    "duplex-stream-busypoll": "raw-stream-busypoll", "duplex-ring": "raw-stream",
                    "duplex-ring-busypoll": "raw-stream-busypoll", "duplex-unix": "raw-unix",
                    "duplex-tcp": "raw-tcp", "duplex-unix-connect": "raw-unix-connect",
                    "duplex-tcp-connect": "raw-tcp-connect"}
        for r in data["results"]:
            if not r["transport"].startswith("duplex-"):
                self.assertNotIn("ratio", r, r["name"])
                continue
            with self.subTest(row=r["name"]):
                self.assertEqual(r["baseline"], expected[r["transport"]])
                base = rows["/".join([r["pattern"], r["peers"], r["baseline"], r["name"].split("/")[3]])]
                metric = "ns_per_op" if r["pattern"] == "rtt" else "bytes_per_s"
                self.assertAlmostEqual(r["ratio"], r[metric] / base[metric], 6)
        for name in ("duplex-stream-busypoll", "duplex-ring-busypoll"):
            busy = rows["rtt/processes/" + name + "/8B"]
            self.assertAlmostEqual(
                busy["ratio_to_blocking"],
                busy["ns_per_op"] / rows["rtt/processes/raw-stream/8B"]["ns_per_op"], 6)

    def test_goals(self):
        goals = self.results()["goals"]
        self.assertEqual(len(goals), 8)
        self.assertEqual([g["target"] for g in goals], [1.05, 0.10, 20, 2.5, 1.05, 1.05, 1, 1])
        for g in goals:
            with self.subTest(goal=g["name"]):
                self.assertTrue(g["name"])
                self.assertGreater(g["value"], 0)  # every goal's rows were measured
                self.assertEqual(g["pass"], g["value"] <= g["target"] if g["comparison"] == "<="
                                 else g["value"] >= g["target"])

    def test_svg_is_well_formed_and_labelled(self):
        self.assertEqual(self.r.returncode, 0, self.r.stderr)
        root = ET.parse(self.svg_path).getroot()
        self.assertEqual(root.tag, "{http://www.w3.org/2000/svg}svg")
        text = " ".join("".join(t.itertext()) for t in root.iter("{http://www.w3.org/2000/svg}text"))
        for word in ("duplex bench", "Round trip", "Throughput", "GB/s", "Goals", "duplex-shm",
                     "raw-stream"):
            self.assertIn(word, text)
        bars = [r for r in root.iter("{http://www.w3.org/2000/svg}rect") if r.find(
            "{http://www.w3.org/2000/svg}title") is not None]
        self.assertEqual(len(bars), len(self.ROWS))

    def test_json_to_stdout(self):
        r = run("bench", "--quick", "--filter", "^throughput/threads/memcpy/64B$", "--json", "-")
        self.assertEqual(r.returncode, 0, r.stderr)
        data = json.loads(r.stdout)  # nothing else on stdout
        self.assertEqual([x["name"] for x in data["results"]], ["throughput/threads/memcpy/64B"])
        self.assertIsNone(data["goals"][0]["value"])
        self.assertIsNone(data["goals"][0]["pass"])

    def test_progress_line_on_a_terminal(self):
        controller, terminal = pty.openpty()
        p = subprocess.Popen([DUPLEX, "bench", "--quick", "--filter", "memcpy/64B$"],
                             stdout=subprocess.PIPE, stderr=terminal)
        os.close(terminal)
        seen = b""
        try:
            while True:
                try:
                    chunk = os.read(controller, 65536)
                except OSError:  # EIO: every end of the terminal is closed, and it is drained
                    break
                if not chunk:
                    break
                seen += chunk
        finally:
            os.close(controller)
            out, _ = p.communicate(timeout=60)
        self.assertEqual(p.returncode, 0)
        self.assertIn(b"throughput/threads/memcpy/64B", out)  # the table still goes to stdout
        self.assertIn(b"\r\033[Kduplex bench: throughput/threads/memcpy/64B (", seen)
        self.assertIn(b"1 of 1 rows left", seen)
        self.assertTrue(seen.endswith(b"\r\033[K"), seen[-40:])  # erased at the end

    def assert_bad_usage(self, *args):
        r = run("bench", *args)
        self.assertEqual(r.returncode, 2, r.stderr)
        self.assertEqual(r.stdout, "")
        self.assertEqual(len(r.stderr.strip().splitlines()), 1, r.stderr)
        self.assertTrue(r.stderr.startswith("duplex: "), r.stderr)
        return r.stderr

    def test_a_bad_regex_is_bad_usage(self):
        self.assertIn("(rtt", self.assert_bad_usage("--quick", "--filter", "(rtt"))

    def test_a_filter_that_matches_nothing_is_bad_usage(self):
        self.assertIn("no row matches", self.assert_bad_usage("--quick", "--filter", "^nothing$"))

    def test_an_unknown_option_is_bad_usage(self):
        self.assert_bad_usage("--quick", "--frobnicate")

    def test_an_unwritable_file_is_a_one_line_failure(self):
        r = run("bench", "--quick", "--json", "/nonexistent-dir/bench.json")
        self.assertEqual(r.returncode, 1)
        self.assertEqual(r.stderr,
                         "duplex: bench: cannot write '/nonexistent-dir/bench.json': "
                         "No such file or directory\n")

    def test_help(self):
        r = run("bench", "--help")
        self.assertEqual(r.returncode, 0, r.stderr)
        for word in ("--quick", "--json", "--svg", "--filter", "median", "4 KiB page",
                     "duplex-stream-busypoll", "duplex-ring-busypoll"):
            self.assertIn(word, r.stdout)


@unittest.skipUnless(os.path.exists("/dev/full"), "needs /dev/full")
class OutputErrors(unittest.TestCase):
    """Output that cannot be written (a full disk: /dev/full) is a failure, as in coreutils."""

    ENOSPC = "duplex: write error: No space left on device\n"
    MEMCPY = ("--quick", "--filter", "^throughput/threads/memcpy/64B$")

    def to_full(self, *args):
        with open("/dev/full", "w") as full:
            return subprocess.run([DUPLEX, *args], stdout=full, stderr=subprocess.PIPE, text=True,
                                  timeout=120)

    def assert_write_error(self, *args, message=ENOSPC):
        r = self.to_full(*args)
        self.assertEqual((r.returncode, r.stderr), (1, message), args)

    def test_info(self):
        self.assert_write_error("info")
        self.assert_write_error("info", "--json")

    def test_demo(self):
        for scenario in ("fork", "dgram", "threads", "all"):
            with self.subTest(scenario=scenario):
                self.assert_write_error("demo", scenario)

    def test_help_and_version(self):
        for args in (["--version"], ["--help"], ["info", "--help"], ["bench", "--help"],
                     ["connect", "--help"], ["serve", "--help"]):
            with self.subTest(args=args):
                self.assert_write_error(*args)

    def test_bench_table(self):
        self.assert_write_error("bench", *self.MEMCPY)

    def test_bench_json_to_stdout(self):
        self.assert_write_error("bench", *self.MEMCPY, "--json", "-",
                                message="duplex: bench: cannot write '-': No space left on device\n")

    def test_bench_files(self):
        for option in ("--json", "--svg"):
            with self.subTest(option=option):
                r = run("bench", *self.MEMCPY, option, "/dev/full")
                self.assertEqual(r.returncode, 1)
                self.assertEqual(r.stderr, "duplex: bench: cannot write '/dev/full': "
                                 "No space left on device\n")
                self.assertIn("throughput/threads/memcpy/64B", r.stdout)  # the table still went
        r = run("bench", *self.MEMCPY, "--svg", "/nonexistent-dir/bench.svg")
        self.assertEqual((r.returncode, r.stdout), (1, ""))
        self.assertEqual(r.stderr, "duplex: bench: cannot write '/nonexistent-dir/bench.svg': "
                         "No such file or directory\n")

    def test_an_unwritable_stderr_changes_no_status(self):
        # The error line is lost, but the command neither crashes nor changes its status.
        for args, status in ((["--bogus"], 2), (["frobnicate"], 2), (["demo", "pipes"], 2),
                             (["bench", "--filter", "(rtt"], 2), (["bench", "--filter", "^no$"], 2),
                             (["bench", "--json", "/nonexistent-dir/x.json"], 1)):
            with self.subTest(args=args), open("/dev/full", "w") as full:
                r = subprocess.run([DUPLEX, *args], stdout=subprocess.PIPE, stderr=full,
                                   timeout=60)
                self.assertEqual(r.returncode, status)

    def test_a_closed_pipe_is_a_write_error_too(self):
        # The reader is gone before duplex writes: EPIPE (SIGPIPE ignored, as a shell may leave it).
        import signal
        read_end, write_end = os.pipe()
        os.close(read_end)
        try:
            r = subprocess.run([DUPLEX, "info"], stdout=write_end, stderr=subprocess.PIPE,
                               text=True, timeout=60,
                               preexec_fn=lambda: signal.signal(signal.SIGPIPE, signal.SIG_IGN))
        finally:
            os.close(write_end)
        self.assertEqual((r.returncode, r.stderr), (1, "duplex: write error: Broken pipe\n"))


class BenchFilter(unittest.TestCase):
    """duplex bench --filter: a regular expression matched in bounded time; --list measures nothing."""

    def listed(self, *args):
        r = run("bench", "--list", *args, timeout=30)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertEqual(r.stderr, "")
        return r.stdout.splitlines()

    def assert_bad_filter(self, pattern, why):
        r = run("bench", "--quick", "--filter", pattern, timeout=30)
        self.assertEqual((r.returncode, r.stdout), (2, ""), r.stderr)
        self.assertEqual(len(r.stderr.splitlines()), 1, r.stderr)
        self.assertTrue(r.stderr.startswith("duplex: bench: "), r.stderr)
        self.assertIn(why, r.stderr)
        self.assertLess(len(r.stderr), 300)  # a huge pattern is not echoed whole

    def test_deep_nesting_is_refused(self):
        self.assert_bad_filter("(" * 30000 + ")" * 30000, "longer than 1024 characters")
        self.assert_bad_filter("(" * 100 + "rtt" + ")" * 100, "groups nested deeper than 32")

    def test_a_pattern_that_backtracks_exponentially_is_bounded(self):
        self.assert_bad_filter("(.*)*Z", "no row matches")
        self.assert_bad_filter("(a*)*" * 200 + "Z", "no row matches")
        every = self.listed()
        self.assertEqual(self.listed("--filter", "(.*)*B$"), every)
        self.assertEqual(self.listed("--filter", "(.*)*(.*)*(.*)*8B$"),
                         [name for name in every if name.endswith("/8B")])

    def test_syntax_errors_are_bad_usage(self):
        for pattern, why in (("(rtt", "missing ')'"), ("rtt)", "unmatched ')'"),
                             ("*rtt", "nothing to repeat"), ("[z-a]", "bad range"),
                             ("[rtt", "missing ']'"), ("rtt{2}", "{m,n}"), ("\\d", "\\d"),
                             ("rtt\\", "at the end")):
            with self.subTest(pattern=pattern):
                self.assert_bad_filter(pattern, why)

    def test_the_filters_in_use_select_their_rows(self):
        # The test suite's own filter, with the raw rows the ratios need.
        self.assertEqual(sorted(self.listed("--quick", "--filter", Bench.FILTER)),
                         sorted(Bench.ROWS))
        self.assertEqual(self.listed("--quick", "--filter", "memcpy/64B$"),
                         ["throughput/threads/memcpy/64B"])
        # docs/performance.md's `--filter seqpacket`: every seqpacket row and its raw baseline.
        seqpacket = self.listed("--filter", "seqpacket")
        self.assertEqual(len(seqpacket), 18)
        self.assertTrue(all("seqpacket" in name for name in seqpacket))
        self.assertEqual(self.listed("--quick", "--filter", "^throughput/threads/duplex-shm-c.py/16[M]iB$"),
                         ["throughput/threads/raw-stream/16MiB",
                          "throughput/threads/duplex-shm-copy/16MiB"])
        self.assertEqual(self.listed("--quick", "--filter", "rtt/[^/]*/duplex-stream-busypoll/8B"),
                         ["rtt/threads/raw-stream/8B", "rtt/threads/raw-stream-busypoll/8B",
                          "rtt/threads/duplex-stream-busypoll/8B", "rtt/processes/raw-stream/8B",
                          "rtt/processes/raw-stream-busypoll/8B",
                          "rtt/processes/duplex-stream-busypoll/8B"])


@unittest.skipIf("UBSAN_OPTIONS" in os.environ,
                 "UBSan's vptr check itself needs free fds, so it cannot run out of them")
class InfoAtTheFdLimit(unittest.TestCase):
    """duplex info under a low RLIMIT_NOFILE: what it could not measure it says, never a number."""

    def info(self, *args, soft, hard):
        def limit():
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

        return subprocess.run([DUPLEX, "info", *args], capture_output=True, text=True, timeout=60,
                              preexec_fn=limit)

    def test_text_at_4_fds(self):
        # One fd free beyond stdio: no socket pair can be made, a memfd or a pidfd can.
        r = self.info(soft=4, hard=4)
        self.assertEqual(r.returncode, 1, r.stderr)
        self.assertEqual(len(r.stderr.splitlines()), 1, r.stderr)
        self.assertRegex(r.stderr, r"^duplex: info: \d+ facts not measured \(first: .*"
                                   r"socketpair: Too many open files\)\n$")
        for label in ("stream pair", "largest datagram", "largest seqpacket", "fds per message"):
            self.assertRegex(r.stdout, label + r" +not measured \(socketpair: Too many open files\)\n")
        self.assertNotRegex(r.stdout, r"\b0 B\b")
        self.assertIn("SO_PEERPIDFD: not measured (socketpair: Too many open files)", r.stdout)
        self.assertIn("memfd with seals: yes", r.stdout)  # a probe that fits is still made
        self.assertIn("soft 4, hard 4", r.stdout)

    def test_json_at_4_fds(self):
        r = self.info("--json", soft=4, hard=4)
        self.assertEqual(r.returncode, 1, r.stderr)
        facts = json.loads(r.stdout)
        self.assertIsNone(facts["fds_per_message"])
        self.assertIsNone(facts["socket_buffers"]["stream_sndbuf"])
        for kind in ("datagram", "seqpacket"):
            self.assertEqual(set(facts["max_payload"][kind].values()), {None})
        self.assertIsNone(facts["features"]["so_peerpidfd"]["works"])
        self.assertIn("Too many open files", facts["features"]["so_peerpidfd"]["reason"])
        self.assertTrue(facts["features"]["memfd_seals"]["works"])
        missing = facts["not_measured"]
        for name in ("fds_per_message", "socket_buffers.stream_sndbuf",
                     "max_payload.datagram.default_buffers", "features.so_peerpidfd"):
            self.assertEqual(missing[name], "socketpair: Too many open files")
        self.assertNotIn("features.memfd_seals", missing)

    def test_at_100_fds_the_kernels_limit_is_told_apart_from_this_process(self):
        r = self.info(soft=100, hard=100)
        self.assertEqual(r.returncode, 0, r.stderr)
        self.assertRegex(r.stdout, r"fds per message +253 \(SCM_RIGHTS\); this process, at "
                                   r"RLIMIT_NOFILE 100, cannot receive that many at once")
        facts = json.loads(self.info("--json", soft=100, hard=100).stdout)
        self.assertEqual(facts["fds_per_message"], 253)
        self.assertTrue(facts["fds_receive_limited_by_rlimit"])
        self.assertEqual(facts["not_measured"], {})

    def test_a_low_soft_limit_is_raised_for_the_probes(self):
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        if hard != resource.RLIM_INFINITY and hard < 300:
            self.skipTest("the hard limit is too low to receive 253 fds")
        r = self.info("--json", soft=4, hard=hard)
        self.assertEqual(r.returncode, 0, r.stderr)
        facts = json.loads(r.stdout)
        self.assertEqual(facts["fds_per_message"], 253)
        self.assertFalse(facts["fds_receive_limited_by_rlimit"])
        self.assertGreater(facts["max_payload"]["datagram"]["default_buffers"], 64 * 1024)
        self.assertEqual(facts["rlimit_nofile"]["soft"], 4)  # as this process was started
        self.assertEqual(facts["not_measured"], {})


if __name__ == "__main__":
    DUPLEX = sys.argv.pop(1)
    unittest.main(verbosity=2)
