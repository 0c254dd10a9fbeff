"""Where the time of one small operation goes, per hop and per process.

    python -m bench.trace [cp|append|random|untar] [--repeat N] [--json PATH]

Starts a cluster like `make bench`'s (a tracker, three keepers, replication 2) and a mount,
every process with DFS_TRACE set (cluster/trace.py), warms up, then runs the operation N times
(default 20) with nothing else in flight and merges the processes' spans into one timeline:

- `cp`: `cp` of one 4 KiB file into the mount (create, write, flush/release: a small file);
- `append`: one 4 KiB append with O_DSYNC to a file that already holds a few (a log);
- `random`: one 4 KiB write + fsync at a random offset of a 64 MiB file (a database page);
- `untar`: `tar x` of an archive of one 4 KiB file into a new directory (what `tar x` of a
  source tree does per file: create, write, close, then restore its mode, owner and times).

For each operation it prints the median of every span kind (FUSE requests in the mount, calls
the mount makes, requests served by the tracker and keepers, their disk work) in the order
they start, with the time between a call leaving one process and being served in the next
shown as the gap, so a reader sees which hops an operation takes and what each costs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench.procs import FuseMount
from cluster.trace import ENV
from tests.cluster_procs import ProcCluster

BIN = Path(sys.executable).parent
KEEPERS = 3
REPLICATION = 2
CHUNK_SIZE = 8 << 20
BLOCK = 4096
RANDOM_FILE_BYTES = 64 << 20

Span = tuple[str, str, int, int]  # process, name, start_ns, end_ns


def read_spans(directory: Path) -> list[Span]:
    spans: list[Span] = []
    for path in sorted(directory.glob("*.jsonl")):
        role = path.name.rsplit("-", 1)[0]
        for line in path.read_text().splitlines():
            try:
                name, start, end, _thread = json.loads(line)
            except ValueError:
                continue  # a line cut by a process being stopped
            spans.append((role, str(name), int(start), int(end)))
    return spans


def clear(directory: Path) -> None:
    for path in directory.glob("*.jsonl"):
        with open(path, "r+") as f:
            f.truncate(0)


def label(process: str, name: str, tracker_addr: str) -> str:
    """A span's kind, without what differs between runs (keeper ports)."""
    words = name.split(" ")
    if words[0] == "call" and len(words) == 3:
        to = "tracker" if words[2] == tracker_addr else "keeper"
        return f"{process}: call {words[1]} -> {to}"
    return f"{process}: {name}"


def one_op(kind: str, mnt: Path, src: Path, i: int, state: dict[str, Any]) -> None:
    if kind == "cp":
        subprocess.run(["cp", str(src), str(mnt / f"f{i}")], check=True)
    elif kind == "untar":
        target = mnt / f"t{i}"
        target.mkdir()
        subprocess.run(["tar", "-C", str(target), "-xf", str(state["archive"])], check=True)
    elif kind == "append":
        os.write(state["fd"], state["data"])
    else:
        offset = state["rng"].randrange(RANDOM_FILE_BYTES // BLOCK) * BLOCK
        os.pwrite(state["fd"], state["data"], offset)
        os.fsync(state["fd"])


def prepare(kind: str, mnt: Path, src: Path, state: dict[str, Any]) -> None:
    state["data"] = os.urandom(BLOCK)
    if kind == "untar":
        state["archive"] = src.with_suffix(".tar")
        subprocess.run(["tar", "-C", str(src.parent), "-cf", str(state["archive"]), src.name])
    if kind == "append":
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_DSYNC
        state["fd"] = os.open(mnt / "log", flags, 0o644)
    elif kind == "random":
        fd = os.open(mnt / "db", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        piece = os.urandom(1 << 20)
        for offset in range(0, RANDOM_FILE_BYTES, len(piece)):
            os.pwrite(fd, piece, offset)
        os.fsync(fd)
        state["fd"], state["rng"] = fd, random.Random(7)


def summarize(ops: list[list[Span]], tracker_addr: str) -> list[dict[str, Any]]:
    """Per span kind, in the order of its median start: how many per operation (on
    average: a connection opened now and then shows as a fraction), median start offset and
    median duration where it occurs (microseconds)."""
    starts: dict[str, list[float]] = defaultdict(list)
    durations: dict[str, list[float]] = defaultdict(list)
    counts: dict[str, list[int]] = defaultdict(list)
    totals: list[float] = []
    for spans in ops:
        t0 = min(s[2] for s in spans)
        totals.append((max(s[3] for s in spans) - t0) / 1e3)
        per: dict[str, int] = defaultdict(int)
        for process, name, start, end in spans:
            key = label(process, name, tracker_addr)
            if per[key] == 0:
                starts[key].append((start - t0) / 1e3)
            per[key] += 1
            durations[key].append((end - start) / 1e3)
        for key, n in per.items():
            counts[key].append(n)
    rows: list[dict[str, Any]] = [
        {
            "span": key,
            "per_op": sum(counts[key]) / len(ops),  # spans of this kind per operation
            "start_us": statistics.median(starts[key]),
            "median_us": statistics.median(durations[key]),
        }
        for key in starts
    ]
    rows.sort(key=lambda r: r["start_us"])
    rows.append(
        {
            "span": "whole operation",
            "per_op": 1,
            "start_us": 0.0,
            "median_us": statistics.median(totals),
        }
    )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("op", choices=("cp", "append", "random", "untar"), nargs="?", default="cp")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--json", help="write the rows here too")
    parser.add_argument("--scratch-dir", default="/var/tmp")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args(argv)

    scratch = Path(tempfile.mkdtemp(prefix="dfs-trace-", dir=args.scratch_dir))
    spans_dir = scratch / "spans"
    cluster = ProcCluster(scratch / "cluster", REPLICATION, CHUNK_SIZE, 2.0, 30.0)
    cluster.root.mkdir()
    cluster.extra_env[ENV] = str(spans_dir)
    mount: FuseMount | None = None
    try:
        cluster.start_tracker()
        for _ in range(KEEPERS):
            cluster.add_keeper()
        cluster.wait_alive(KEEPERS)
        mnt = scratch / "mnt"
        argv_mount = [str(BIN / "dfs-mount"), str(mnt), "--foreground"]
        argv_mount += ["--tracker", cluster.tracker_addr]
        mount = FuseMount("dfs-mount", mnt, argv_mount, scratch / "mount.log", cluster.env)
        mount.start()
        src = scratch / "src"
        src.write_bytes(os.urandom(BLOCK))
        state: dict[str, Any] = {}
        prepare(args.op, mnt, src, state)
        for i in range(10):  # warm: connections open, caches loaded
            one_op(args.op, mnt, src, 10_000 + i, state)
        time.sleep(0.5)
        ops: list[list[Span]] = []
        for i in range(args.repeat):
            clear(spans_dir)
            one_op(args.op, mnt, src, i, state)
            time.sleep(0.15)  # a cp's release reaches the tracker GATHER_S later
            ops.append(read_spans(spans_dir))
        if "fd" in state:
            os.close(state["fd"])
        rows = summarize([o for o in ops if o], cluster.tracker_addr)
    finally:
        if mount is not None:
            mount.stop()
        cluster.stop()
    print(f"{args.op}: medians of {args.repeat} operations, microseconds from the first span")
    print(f"{'span':70} {'per op':>6} {'starts':>8} {'takes':>8}")
    for row in rows:
        print(
            f"{row['span'][:70]:70} {row['per_op']:>6.2f} "
            f"{row['start_us']:>8.0f} {row['median_us']:>8.0f}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"op": args.op, "rows": rows}, indent=1))
    if args.keep:
        print(f"kept {scratch}")
    else:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
