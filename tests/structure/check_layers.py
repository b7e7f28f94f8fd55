#!/usr/bin/env python3
"""Checks that no source file of duplex includes a header of a layer above its own.

The layers are the table under "## Architecture" in docs/design.md, read from there so that the
document and this check cannot disagree. Each row names a layer, its rank, and the paths it holds
(public headers under include/duplex/, folders under src/ and tools/). A file may include headers
of its own layer and of layers of a lower rank; two layers of the same rank are siblings and may
not include each other. Every file under include/, src/ and tools/ must belong to a layer, so a new
file is placed in the table before it can build on anything.

Usage: check_layers.py [SOURCE_DIR]   (exit 0: every include allowed; 1: violations printed)
"""

import pathlib
import re
import sys

ROOT = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else pathlib.Path(__file__).parents[2])
CHECKED = ("include", "src", "tools")
SUFFIXES = {".hpp", ".cpp", ".h", ".in"}
INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.MULTILINE)


def read_layers():
    """[(name, rank, [path prefixes])] from the architecture table of docs/design.md."""
    text = (ROOT / "docs" / "design.md").read_text()
    start = text.find("## Architecture")
    if start < 0:
        sys.exit("check_layers: docs/design.md has no '## Architecture' section")
    layers = []
    for line in text[start:].splitlines()[1:]:
        if line.startswith("## "):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].isdigit():
            continue
        paths = re.findall(r"`([^`]+)`", cells[2])
        layers.append((cells[1].strip("*"), int(cells[0]), paths))
    if not layers:
        sys.exit("check_layers: no layer rows found under '## Architecture' in docs/design.md")
    return layers


def layer_of(path, layers):
    """The layer whose longest path prefix matches path (relative to ROOT), or None."""
    best = None
    for name, rank, prefixes in layers:
        for p in prefixes:
            if path == p or (p.endswith("/") and path.startswith(p)):
                if best is None or len(p) > best[2]:
                    best = (name, rank, len(p))
    return best


def resolve(included, source, layers):
    """The path (relative to ROOT) an include line names, if it is one of duplex's own files."""
    candidates = [
        f"include/{included}",  # "duplex/x.hpp"
        f"src/{included}",  # "socket/io.hpp"
        str((source.parent / included).relative_to(ROOT)) if not included.startswith("..") else "",
    ]
    for c in candidates:
        if c and (ROOT / c).is_file():
            return c
    if included == "duplex/version.hpp":  # generated from cmake/version.hpp.in
        return "include/duplex/version.hpp"
    return None


def main():
    layers = read_layers()
    problems = []
    files = 0
    for top in CHECKED:
        for f in sorted((ROOT / top).rglob("*")):
            if not f.is_file() or f.suffix not in SUFFIXES:
                continue
            files += 1
            rel = str(f.relative_to(ROOT))
            own = layer_of(rel, layers)
            if own is None:
                problems.append(f"{rel}: in no layer of docs/design.md's architecture table")
                continue
            for inc in INCLUDE.findall(f.read_text(errors="replace")):
                target = resolve(inc, f, layers)
                if target is None:
                    continue  # a system or third-party header
                other = layer_of(target, layers)
                if other is None:
                    problems.append(f"{rel}: includes {inc}, which is in no layer")
                elif other[1] > own[1]:
                    problems.append(
                        f"{rel} ({own[0]}, rank {own[1]}) includes {inc} "
                        f"({other[0]}, rank {other[1]}): a layer above its own"
                    )
                elif other[1] == own[1] and other[0] != own[0]:
                    problems.append(
                        f"{rel} ({own[0]}) includes {inc} ({other[0]}): siblings of rank "
                        f"{own[1]} may not include each other"
                    )
    for p in problems:
        print(p)
    if problems:
        print(f"check_layers: {len(problems)} problem(s) in {files} files")
        return 1
    print(f"check_layers: {files} files, every include within its layer or below")
    return 0


if __name__ == "__main__":
    sys.exit(main())
