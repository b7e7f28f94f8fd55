"""End-to-end tests of the duplex command line: exit statuses, help, demo and info output.

Usage: python3 cli_test.py PATH_TO_DUPLEX
"""
import json
import os
import resource
import subprocess
import sys
import unittest

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
        for command in ("demo", "info", "run"):
            self.assertIn(command, r.stdout)

    def test_each_command_has_help(self):
        for command in ("demo", "info", "run"):
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


if __name__ == "__main__":
    DUPLEX = sys.argv.pop(1)
    unittest.main(verbosity=2)
