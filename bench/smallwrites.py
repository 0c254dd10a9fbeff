"""Small synced writes for the benchmark, timed inside their own process.

    python -m bench.smallwrites append|random|sqlite DIR COUNT

- `append`: COUNT appends of 4 KiB to one file opened with O_DSYNC (a log).
- `random`: a 64 MiB file is written and fsynced first (untimed), then COUNT writes of 4 KiB
  at random 4 KiB-aligned offsets, each followed by fsync (a database's pages).
- `sqlite`: a SQLite database in WAL mode (synchronous=FULL, so each commit syncs the WAL),
  COUNT transactions of 50 inserted rows each.

Prints `{"op", "count", "seconds"}` as JSON. Why these: logs, databases, editors and package
managers write a few KiB and sync; what such a write costs is what they feel. The loop runs in
its own process for the reasons `bench.fileops` gives.
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
import sys
import time
from collections.abc import Sequence

OPS = ("append", "random", "sqlite")
BLOCK = 4096
RANDOM_FILE_BYTES = 64 << 20
ROWS_PER_TRANSACTION = 50


def appends(directory: str, count: int) -> float:
    path = os.path.join(directory, "log")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_DSYNC, 0o644)
    data = os.urandom(BLOCK)
    try:
        start = time.perf_counter()
        for _ in range(count):
            os.write(fd, data)
        return time.perf_counter() - start
    finally:
        os.close(fd)
        os.unlink(path)


def random_writes(directory: str, count: int) -> float:
    path = os.path.join(directory, "db")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    rng = random.Random(42)
    try:
        piece = os.urandom(1 << 20)
        for offset in range(0, RANDOM_FILE_BYTES, len(piece)):
            os.pwrite(fd, piece, offset)
        os.fsync(fd)
        data = os.urandom(BLOCK)
        offsets = [rng.randrange(RANDOM_FILE_BYTES // BLOCK) * BLOCK for _ in range(count)]
        start = time.perf_counter()
        for offset in offsets:
            os.pwrite(fd, data, offset)
            os.fsync(fd)
        return time.perf_counter() - start
    finally:
        os.close(fd)
        os.unlink(path)


def sqlite_transactions(directory: str, count: int) -> float:
    path = os.path.join(directory, "bench.sqlite")
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT, value BLOB)")
        payload = os.urandom(100)
        start = time.perf_counter()
        for txn in range(count):
            db.execute("BEGIN")
            db.executemany(
                "INSERT INTO t (name, value) VALUES (?, ?)",
                [(f"row {txn}.{i}", payload) for i in range(ROWS_PER_TRANSACTION)],
            )
            db.execute("COMMIT")
        seconds = time.perf_counter() - start
        (rows,) = db.execute("SELECT count(*) FROM t").fetchone()
        if rows != count * ROWS_PER_TRANSACTION:
            raise RuntimeError(f"{rows} rows after {count} transactions")
        return seconds
    finally:
        db.close()
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(path + suffix):
                os.unlink(path + suffix)


RUNNERS = {"append": appends, "random": random_writes, "sqlite": sqlite_transactions}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 3 or args[0] not in OPS:
        print(f"usage: python -m bench.smallwrites {'|'.join(OPS)} DIR COUNT", file=sys.stderr)
        return 2
    op, directory, count = args[0], args[1], int(args[2])
    seconds = RUNNERS[op](directory, count)
    print(json.dumps({"op": op, "count": count, "seconds": seconds}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
