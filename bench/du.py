"""How long `dfs du` takes on a big tree, against what counting it from scratch costs.

    python -m bench.du --files 1000000 [--per-dir 1000] [--repeat 5] [--keep DIR]

Builds a tracker data directory with `--files` files of one chunk each, `per_dir` to a
directory, under /bench/gNN/dNNNN (three levels), directly through the tracker's store (the
same methods the tracker's requests use, so the per-directory counters are kept as they are
in service, but in large transactions and without the network: a million creates through the
tracker would take minutes). Then it starts a real `dfs-tracker` on that directory and times
the real `dfs du /bench` command (process start-up included) and the DiskUsage request alone
through the client library, checks the answer against the files built, and times what a
database made before the counters existed costs: the migration that counts every directory's
totals from the tables (a walk of the whole namespace, which is what `dfs du` does not do).

Prints one JSON object on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import stat
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from cluster import auth
from cluster import messages as m
from cluster.auth import Credentials
from cluster.client import Client
from cluster.tracker.store import ROOT_INO, ChunkRow, Inode, SqliteStore

BIN = Path(sys.executable).parent
DIR_MODE = stat.S_IFDIR | 0o755
FILE_MODE = stat.S_IFREG | 0o644
FILE_BYTES = 4096
GROUP = 32  # leaf directories per group directory
BATCH = 20_000  # files per transaction while building


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _mkdir(store: SqliteStore, parent: int, name: bytes) -> int:
    now = time.time_ns()
    inode = Inode(0, DIR_MODE, 2, 0, 0, 0, 0, now, now, now, 0, 0, None)
    ino = store.insert_inode(inode)
    store.add_dentry(parent, name, ino)
    return ino


def build(data: Path, files: int, per_dir: int) -> float:
    """Make the tree; returns the seconds it took."""
    data.mkdir(parents=True, exist_ok=True, mode=0o700)
    store = SqliteStore(data / "meta.db")
    started = time.perf_counter()
    now = time.time_ns()
    with store.transaction():
        top = _mkdir(store, ROOT_INO, b"bench")
    made = leaves = 0
    group = leaf = top
    chunk_id = 1 << 40
    while made < files:
        with store.transaction():
            end = min(files, made + BATCH)
            while made < end:
                if made % per_dir == 0:
                    if leaves % GROUP == 0:
                        group = _mkdir(store, top, b"g%02d" % (leaves // GROUP))
                    leaf = _mkdir(store, group, b"d%04d" % leaves)
                    leaves += 1
                inode = Inode(0, FILE_MODE, 1, 0, 0, 0, FILE_BYTES, now, now, now, 1 << 20, 0, None)
                ino = store.insert_inode(inode)
                store.add_dentry(leaf, b"f%07d" % made, ino)
                chunk_id += 1
                store.put_chunk(ChunkRow(ino, 0, chunk_id, 1, FILE_BYTES, 0))
                made += 1
        if made % 100_000 == 0 or made == files:
            log(f"built {made:,} of {files:,} files ({time.perf_counter() - started:.0f} s)")
    store.close()
    return time.perf_counter() - started


def start_tracker(root: Path, data: Path) -> tuple[subprocess.Popen[bytes], str, Path]:
    secret = root / "secret"
    auth.new_secret(secret)
    log_path = root / "tracker.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            [str(BIN / "dfs-tracker"), "--listen", "127.0.0.1:0", "--data", str(data),
             "--secret-file", str(secret)],
            stdout=out, stderr=out,
        )  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for line in log_path.read_text(errors="replace").splitlines():
            if line.startswith("dfs-tracker: listening on"):
                return proc, line.rsplit(" ", 1)[1], secret
        if proc.poll() is not None:
            raise RuntimeError(f"dfs-tracker exited:\n{log_path.read_text()}")
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("dfs-tracker did not start")


def time_cli(addr: str, secret: Path, path: str, repeat: int) -> tuple[list[float], dict[str, Any]]:
    """Wall seconds of each `dfs du --json PATH` (a whole process), and its answer."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DFS_")}
    env |= {"DFS_TRACKER": addr, "DFS_SECRET_FILE": str(secret)}
    times = []
    answer: dict[str, Any] = {}
    for _ in range(repeat):
        started = time.perf_counter()
        result = subprocess.run(
            [str(BIN / "dfs"), "du", "--json", path],
            capture_output=True, text=True, env=env, timeout=120, check=True,
        )  # fmt: skip
        times.append(time.perf_counter() - started)
        answer = json.loads(result.stdout)
    return times, answer


def time_request(addr: str, secret: Path, path: str, repeat: int) -> float:
    """Mean seconds of one DiskUsage request through the client library."""

    async def go() -> float:
        credentials = Credentials.from_settings({"secret_file": str(secret)})
        async with Client.connect(addr, credentials) as client:
            request = m.DiskUsage(path=os.fsencode(path))
            await client._tracker(request, m.DiskUsageReply)  # a connection, warm
            started = time.perf_counter()
            for _ in range(repeat):
                await client._tracker(request, m.DiskUsageReply)
            return (time.perf_counter() - started) / repeat

    return trio.run(go)


def time_migration(data: Path) -> float:
    """Seconds to open the store after its totals were dropped (an older tracker's database):
    the migration counts every directory's totals from the tables."""
    db = sqlite3.connect(data / "meta.db")
    db.execute("DROP TABLE dirstats")
    db.commit()
    db.close()
    started = time.perf_counter()
    SqliteStore(data / "meta.db").close()
    return time.perf_counter() - started


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.du", description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=1_000_000)
    parser.add_argument("--per-dir", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--keep", type=Path, help="build in (or reuse) this directory")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="dfs-bench-du-") as scratch:
        root = args.keep or Path(scratch)
        data = root / "tracker"
        built_s = None
        if not (data / "meta.db").exists():
            built_s = build(data, args.files, args.per_dir)
        proc, addr, secret = start_tracker(root, data)
        try:
            cli, answer = time_cli(addr, secret, "/bench", args.repeat)
            leaf_cli, _ = time_cli(addr, secret, "/bench/g00/d0000", args.repeat)
            request_s = time_request(addr, secret, "/bench", 200)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        if answer["files"] != args.files or answer["chunks"] != args.files:
            raise SystemExit(f"dfs du counted {answer}, expected {args.files} files")
        if answer["bytes"] != args.files * FILE_BYTES:
            raise SystemExit(f"dfs du counted {answer['bytes']} bytes")
        migration_s = time_migration(data)
    report = {
        "files": args.files,
        "dirs": answer["dirs"],
        "build_s": None if built_s is None else round(built_s, 1),
        "dfs_du_cli_s": round(statistics.median(cli), 3),
        "dfs_du_cli_min_s": round(min(cli), 3),
        "dfs_du_leaf_cli_s": round(statistics.median(leaf_cli), 3),
        "du_request_ms": round(request_s * 1000, 3),
        "count_from_scratch_s": round(migration_s, 2),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
