#!/usr/bin/env python3
"""Runs a test program under valgrind (memcheck, --track-fds=yes) and fails on any memory error
or any fd the program itself left open at exit (fds inherited from the caller are not its own).

usage: run_valgrind.py [--stdin FILE] VALGRIND PROGRAM [ARG...]
(--stdin: the program reads FILE as its standard input, else nothing)
"""
import os
import re
import subprocess
import sys
import tempfile


def main():
    argv = sys.argv[1:]
    stdin_path = os.devnull
    if argv[:1] == ["--stdin"]:
        stdin_path, argv = argv[1], argv[2:]
    valgrind, program, args = argv[0], argv[1], argv[2:]
    with tempfile.TemporaryDirectory() as tmp:
        log = os.path.join(tmp, "valgrind.%p.log")
        cmd = [valgrind, "--tool=memcheck", "--track-fds=yes", "--error-exitcode=99",
               "--trace-children=no", "--child-silent-after-fork=yes", "--log-file=" + log,
               program, *args]
        with open(stdin_path, "rb") as stdin:
            status = subprocess.run(cmd, stdin=stdin).returncode
        failed = status != 0
        for name in sorted(os.listdir(tmp)):
            with open(os.path.join(tmp, name), encoding="utf-8", errors="replace") as f:
                text = f.read()
            errors = re.search(r"ERROR SUMMARY: (\d+) errors", text)
            if errors is None or int(errors.group(1)) != 0:
                failed = True
            # Each open fd is "Open <kind> descriptor N: ..." and, on the next line, where it was
            # opened, or "<inherited from parent>" for the caller's own.
            lines = text.splitlines()
            leaked = [line for i, line in enumerate(lines)
                      if re.search(r"Open .*descriptor \d+", line)
                      and (i + 1 >= len(lines) or "<inherited from parent>" not in lines[i + 1])]
            if leaked:
                failed = True
                print("fds left open at exit:", *leaked, sep="\n  ")
            if failed:
                print(text[-20000:])
    if status != 0:
        print(f"{program} under valgrind exited with status {status}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
