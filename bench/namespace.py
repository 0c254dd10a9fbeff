"""Tracker create and stat rates with a large namespace, through the client library.

    DFS_TRACKER=HOST:PORT DFS_SECRET_FILE=PATH \
        python -m bench.namespace --files N [--concurrency 16] [--per-dir 1000] [--probe 2000]

The tracker keeps the namespace in SQLite with one synchronous transaction per change, so the
create rate is bounded by commits per second and may fall as the tables and indexes grow; a
lookup should not slow down with size at all. This fills a fresh directory with N empty files
(`per_dir` to a subdirectory, `concurrency` calls in flight, as several clients or a parallel
`cp -r` would), then, at that size, measures creates and lookups with `concurrency` in flight
and with one in flight (the latency a single program such as `tar x` sees). The FUSE mount is
not involved: this is the tracker's ceiling for metadata operations.

Prints one JSON object on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import stat
import sys
import time
from collections.abc import Awaitable, Callable, Sequence

import trio

from cluster.auth import Credentials, load_secret
from cluster.client import ROOT_INO, Client

FILE_MODE = stat.S_IFREG | 0o644


async def in_parallel(count: int, concurrency: int, fn: Callable[[int], Awaitable[object]]) -> None:
    """`fn(0)` ... `fn(count - 1)`, `concurrency` at a time."""
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < count:
            i = next_index
            next_index += 1
            await fn(i)

    async with trio.open_nursery() as nursery:
        for _ in range(min(concurrency, count)):
            nursery.start_soon(worker)


async def timed_rate(count: int, concurrency: int, fn: Callable[[int], Awaitable[object]]) -> float:
    start = time.perf_counter()
    await in_parallel(count, concurrency, fn)
    return count / (time.perf_counter() - start)


async def measure(
    client: Client, files: int, concurrency: int, per_dir: int, probe: int
) -> dict[str, float]:
    top = await client.mkdir(ROOT_INO, f"namespace-{os.getpid()}".encode())
    ndirs = max(1, -(-files // per_dir))
    dirs: list[int] = [0] * ndirs

    async def make_dir(d: int) -> None:
        dirs[d] = (await client.mkdir(top.ino, f"d{d:06d}".encode())).ino

    await in_parallel(ndirs, concurrency, make_dir)

    def name(i: int) -> bytes:
        return f"f{i:09d}".encode()

    done = 0
    tail_from = files - max(1, files // 10)
    tail_start = time.perf_counter()
    report_every = max(1, files // 10)

    async def create(i: int) -> None:
        nonlocal done, tail_start
        await client.mknod(dirs[i // per_dir], name(i), FILE_MODE)
        done += 1
        if done == tail_from:
            tail_start = time.perf_counter()
        if done % report_every == 0:
            print(f"namespace: {done}/{files} files", file=sys.stderr, flush=True)

    start = time.perf_counter()
    await in_parallel(files, concurrency, create)
    end = time.perf_counter()
    fill_rate = files / (end - start)
    tail_rate = (files - tail_from) / max(end - tail_start, 1e-9)

    # At full size: more creates (in a directory of their own) and lookups of random files.
    probe_dir = (await client.mkdir(top.ino, b"probe")).ino
    rng = random.Random(7)
    picks = [rng.randrange(files) for _ in range(probe)]

    async def probe_create(i: int) -> None:
        await client.mknod(probe_dir, name(i), FILE_MODE)

    async def probe_create_serial(i: int) -> None:
        await client.mknod(probe_dir, name(probe + i), FILE_MODE)

    async def lookup(i: int) -> None:
        f = picks[i]
        await client.lookup(dirs[f // per_dir], name(f))

    return {
        "files": files,
        "concurrency": concurrency,
        "fill_creates_per_s": fill_rate,
        "tail_creates_per_s": tail_rate,
        "creates_per_s": await timed_rate(probe, concurrency, probe_create),
        "serial_creates_per_s": await timed_rate(probe, 1, probe_create_serial),
        "lookups_per_s": await timed_rate(probe, concurrency, lookup),
        "serial_lookups_per_s": await timed_rate(probe, 1, lookup),
    }


async def amain(args: argparse.Namespace) -> dict[str, float]:
    tracker = os.environ["DFS_TRACKER"]
    credentials = Credentials(secret=load_secret(os.environ["DFS_SECRET_FILE"]))
    async with Client.connect(tracker, credentials) as client:
        return await measure(client, args.files, args.concurrency, args.per_dir, args.probe)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, required=True)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--per-dir", type=int, default=1000)
    parser.add_argument("--probe", type=int, default=2000)
    args = parser.parse_args(argv)
    if args.files < 1 or args.probe < 1:
        parser.error("--files and --probe must be positive")
    print(json.dumps(trio.run(amain, args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
