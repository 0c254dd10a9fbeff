"""Metadata loops for the benchmark, timed inside their own process.

    python -m bench.fileops create|stat|unlink DIR COUNT

Creates (`os.open(O_CREAT|O_EXCL|O_WRONLY)` + `os.close`), stats or unlinks `f000000` ...
in DIR, one after another as a program would, and prints `{"op", "count", "seconds"}` as JSON
on stdout. Each is one syscall per file on the target, so the figure is the latency of one
round trip through the kernel to the filesystem (and, for dfs, to the tracker).

Why a separate process: the loop is timed from inside so that interpreter start-up does not
count (ext4 does 5,000 creates in tens of milliseconds), and the harness can kill it if a
filesystem hangs, which it could not do to a thread stuck in a syscall.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence

OPS = ("create", "stat", "unlink")


def names(count: int) -> list[str]:
    return [f"f{i:06d}" for i in range(count)]


def run(op: str, directory: str, count: int) -> float:
    """Seconds for `count` of `op` in `directory`."""
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    files = names(count)
    try:
        start = time.perf_counter()
        if op == "create":
            flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY
            for name in files:
                os.close(os.open(name, flags, 0o644, dir_fd=dir_fd))
        elif op == "stat":
            for name in files:
                os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        elif op == "unlink":
            for name in files:
                os.unlink(name, dir_fd=dir_fd)
        else:
            raise ValueError(f"unknown op {op!r}")
        return time.perf_counter() - start
    finally:
        os.close(dir_fd)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 3 or args[0] not in OPS:
        print(f"usage: python -m bench.fileops {'|'.join(OPS)} DIR COUNT", file=sys.stderr)
        return 2
    op, directory, count = args[0], args[1], int(args[2])
    seconds = run(op, directory, count)
    print(json.dumps({"op": op, "count": count, "seconds": seconds}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
