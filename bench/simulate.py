"""A big cluster in simulation: what a real tracker costs with many keepers and chunks.

    python -m bench.simulate [--keepers 100] [--chunks 10000000] [--json PATH]

Builds a tracker database holding `--chunks` committed chunks (files of 1,000 chunks each,
written straight through the store, which is the only shortcut), starts a real `dfs-tracker`
on it, and runs `--keepers` light keepers in this process: each registers with a realistic
inventory (every chunk on 2 of them) and then heartbeats every 2 s with no changes, as an
idle keeper does. It reports:

- the time for every keeper to register, and the tracker's RSS once they have;
- the tracker's CPU per second while the keepers just heartbeat (the healer's scans and the
  heartbeats together), and the longest time the tracker took to answer a heartbeat;
- after the tracker is killed (SIGKILL) and started again: the time until every keeper has
  registered again (soft state rebuilt).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import trio

from cluster import messages as m
from cluster.auth import Credentials
from cluster.errors import DfsError
from cluster.keeper.heartbeat import REGISTER_PART, REGISTER_TIMEOUT_S
from cluster.rpc import ConnectionPool
from cluster.tracker.store import ROOT_INO, SqliteStore
from tests.cluster_procs import ProcCluster

CHUNKS_PER_FILE = 1000
CHUNK_BYTES = 8 << 20
COPIES = 2
HEARTBEAT_S = 2.0
# The healer starts scanning this long after the tracker starts: the steady state is measured
# after it, so that its scans count.
DEAD_AFTER_S = 5.0


def build_store(path: Path, chunks: int) -> None:
    """`chunks` committed chunks in files under /sim, straight into the tables."""
    store = SqliteStore(path)
    now = time.time_ns()
    files = (chunks + CHUNKS_PER_FILE - 1) // CHUNKS_PER_FILE
    db = store.db
    db.execute("BEGIN")
    first_ino = 1_000
    db.executemany(
        "INSERT INTO inodes (ino, mode, nlink, uid, gid, rdev, size, atime_ns, mtime_ns,"
        " ctime_ns, chunk_size, replication, target) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
        (
            (first_ino + f, 0o100644, 1, 0, 0, 0, CHUNKS_PER_FILE * CHUNK_BYTES, now, now, now,
             CHUNK_BYTES, 0, None)
            for f in range(files)
        ),
    )  # fmt: skip
    db.executemany(
        "INSERT INTO dentries (parent, name, ino) VALUES (?,?,?)",
        ((ROOT_INO, f"f{f}".encode(), first_ino + f) for f in range(files)),
    )
    db.executemany(
        "INSERT INTO chunks (ino, idx, chunk_id, version, length, digest) VALUES (?,?,?,?,?,?)",
        ((first_ino + c // CHUNKS_PER_FILE, c % CHUNKS_PER_FILE, c + 1, 1, CHUNK_BYTES, 0)
         for c in range(chunks)),
    )  # fmt: skip
    db.execute("COMMIT")
    store.close()


def holders(chunk: int, keepers: int) -> list[int]:
    return [(chunk + i) % keepers for i in range(COPIES)]


class SimKeeper:
    def __init__(self, n: int, chunks: list[list[int]], pool: ConnectionPool) -> None:
        self.keeper_id = uuid.UUID(int=n + 1).hex
        self.addr = f"127.0.0.1:{20000 + n}"  # never dialled: the tracker only lists it
        self.chunks = chunks
        self.pool = pool
        self.beat_seconds: list[float] = []
        self.retries = 0

    async def register(self, tracker: str, part: int = REGISTER_PART) -> None:
        """Register as a keeper does (in parts of `part` chunks), asking again while the
        tracker is too busy to answer."""
        delay = 0.1
        while True:
            try:
                for start in range(0, max(1, len(self.chunks)), part):
                    request = m.RegisterKeeper(
                        keeper_id=self.keeper_id,
                        addr=self.addr,
                        zone="",
                        capacity_bytes=1 << 50,
                        used_bytes=len(self.chunks) * CHUNK_BYTES,
                        chunks=self.chunks[start : start + part],
                        continued=start > 0,
                    )
                    with trio.fail_after(REGISTER_TIMEOUT_S):
                        await self.pool.call(tracker, request, m.RegisterReply)
                return
            except (DfsError, trio.TooSlowError):
                self.pool.drop(tracker)
                self.retries += 1
                await trio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def beat(self, tracker: str) -> bool:
        """One heartbeat; False if the tracker asks for the inventory again."""
        started = time.perf_counter()
        reply, _ = await self.pool.call(
            tracker,
            m.Heartbeat(
                keeper_id=self.keeper_id,
                capacity_bytes=1 << 50,
                used_bytes=len(self.chunks) * CHUNK_BYTES,
            ),
            m.HeartbeatReply,
        )
        self.beat_seconds.append(time.perf_counter() - started)
        return not reply.reregister


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def register_all(sims: list[SimKeeper], tracker: str) -> float:
    started = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for sim in sims:
            nursery.start_soon(sim.register, tracker)
    return time.perf_counter() - started


async def heartbeat_for(sims: list[SimKeeper], tracker: str, seconds: float) -> None:
    async def loop(sim: SimKeeper) -> None:
        await trio.sleep(HEARTBEAT_S * sims.index(sim) / len(sims))  # spread over the period
        while True:
            await sim.beat(tracker)
            await trio.sleep(HEARTBEAT_S)

    with trio.move_on_after(seconds):
        async with trio.open_nursery() as nursery:
            for sim in sims:
                nursery.start_soon(loop, sim)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keepers", type=int, default=100)
    parser.add_argument("--chunks", type=int, default=10_000_000)
    parser.add_argument("--steady-s", type=float, default=20.0, help="heartbeats measured")
    parser.add_argument("--json", help="write the figures here too")
    parser.add_argument("--scratch-dir", default="/var/tmp")
    args = parser.parse_args(argv)
    result: dict[str, Any] = {"keepers": args.keepers, "chunks": args.chunks}

    with tempfile.TemporaryDirectory(prefix="dfs-sim-", dir=args.scratch_dir) as scratch:
        root = Path(scratch)
        cluster = ProcCluster(root, COPIES, CHUNK_BYTES, HEARTBEAT_S, DEAD_AFTER_S)
        (root / "tracker").mkdir()
        started = time.perf_counter()
        build_store(root / "tracker" / "meta.db", args.chunks)
        result["build_store_s"] = time.perf_counter() - started
        print(f"simulate: {args.chunks} chunks stored in {result['build_store_s']:.0f} s")
        inventories: list[list[list[int]]] = [[] for _ in range(args.keepers)]
        for c in range(args.chunks):
            for k in holders(c, args.keepers):
                inventories[k].append([c + 1, 1])
        try:
            cluster.start_tracker()
            up = time.monotonic()
            assert cluster.tracker is not None
            pid = cluster.tracker.pid
            credentials = Credentials.from_settings({"secret_file": str(cluster.secret_file)})

            async def run() -> None:
                pool = ConnectionPool("keeper", credentials)
                sims = [SimKeeper(n, inventories[n], pool) for n in range(args.keepers)]
                try:
                    rss_before = rss_mib(pid)
                    result["register_all_s"] = await register_all(sims, cluster.tracker_addr)
                    result["register_retries"] = sum(sim.retries for sim in sims)
                    result["tracker_rss_mib"] = rss_mib(pid)
                    result["tracker_rss_before_registrations_mib"] = rss_before
                    print(
                        f"simulate: {args.keepers} keepers registered in"
                        f" {result['register_all_s']:.1f} s; tracker RSS"
                        f" {result['tracker_rss_mib']:.0f} MiB"
                    )
                    await trio.sleep(max(0.0, DEAD_AFTER_S + 1 - (time.monotonic() - up)))
                    cpu = cpu_seconds(pid)
                    t0 = time.perf_counter()
                    await heartbeat_for(sims, cluster.tracker_addr, args.steady_s)
                    result["steady_tracker_cpu_per_s"] = (cpu_seconds(pid) - cpu) / (
                        time.perf_counter() - t0
                    )
                    beats = [s for sim in sims for s in sim.beat_seconds]
                    result["heartbeats"] = len(beats)
                    result["heartbeat_median_ms"] = statistics.median(beats) * 1e3
                    result["heartbeat_max_ms"] = max(beats) * 1e3
                    print(
                        f"simulate: steady state: tracker CPU"
                        f" {result['steady_tracker_cpu_per_s']:.2f} s/s, heartbeat median"
                        f" {result['heartbeat_median_ms']:.1f} ms, max"
                        f" {result['heartbeat_max_ms']:.0f} ms"
                    )
                    # A takeover (here: the same tracker, killed and restarted) rebuilds the
                    # soft state from every keeper's registration.
                    assert cluster.tracker is not None
                    os.kill(cluster.tracker.pid, signal.SIGKILL)
                    cluster.tracker.proc.wait()  # type: ignore[union-attr]
                    pool.drop(cluster.tracker_addr)
                    t0 = time.perf_counter()
                    cluster.restart(cluster.tracker)
                    result["tracker_restart_s"] = time.perf_counter() - t0
                    result["reregister_all_s"] = await register_all(sims, cluster.tracker_addr)
                    result["rebuild_soft_state_s"] = time.perf_counter() - t0
                    print(
                        f"simulate: after SIGKILL, tracker up in"
                        f" {result['tracker_restart_s']:.1f} s, soft state rebuilt"
                        f" {result['rebuild_soft_state_s']:.1f} s after the restart began"
                    )
                finally:
                    await pool.aclose()

            trio.run(run)
        finally:
            cluster.stop()
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
