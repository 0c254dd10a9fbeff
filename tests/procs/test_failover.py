"""Two trackers on one PostgreSQL database (cluster/tracker/leader.py), as real processes: one
active, one standing by, taking over when the active one dies or stops past its lease."""

from __future__ import annotations

import filecmp
import signal
import stat
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from cluster import auth
from cluster import messages as m
from cluster.client import Client
from cluster.errors import NotActive
from cluster.rpc import ConnectionPool
from tests.cluster_procs import (
    Daemon,
    ProcCluster,
    chunk_files,
    first_active_answer,
    free_port,
    kill_once_under_way,
    wait_until,
)
from tests.conftest import MakeCluster, random_file
from tests.pg import PgServer

MiB = 1 << 20
LEASE_S = 3.0


def _pair(make_cluster: MakeCluster, pg_uri: str, keepers: int = 3) -> ProcCluster:
    """A tracker on `pg_uri`, a second one standing by on it, and keepers that know both."""
    cluster = make_cluster(
        keepers=0,
        replication=2,
        chunk_size=4 * MiB,
        dead_after_s=5.0,
        tracker_args=["--store", pg_uri, "--lease-s", str(LEASE_S)],
    )
    cluster.add_tracker()
    for _ in range(keepers):
        cluster.add_keeper()
    cluster.wait_alive(keepers)
    return cluster


def _roles(cluster: ProcCluster) -> dict[str, str]:
    return {t["addr"]: t["role"] for t in cluster.status()["trackers"]}


@asynccontextmanager
async def _pool(cluster: ProcCluster) -> AsyncIterator[ConnectionPool]:
    """Connections straight to one tracker or another (the client library's own pool)."""
    credentials = auth.Credentials.from_settings({"secret_file": str(cluster.secret_file)})
    pool = ConnectionPool("client", credentials)
    try:
        yield pool
    finally:
        await pool.aclose()


def _first_answer(cluster: ProcCluster, daemon: Daemon, since: float, timeout: float) -> float:
    """Seconds from `since` (time.monotonic) to the first request `daemon` answers as the
    active tracker."""
    return first_active_answer(cluster.secret_file, daemon.addr, since, timeout)


def _get_same(cluster: ProcCluster, remote: str, local: Path, tmp: Path) -> None:
    out = tmp / "out"
    cluster.dfs("get", remote, str(out))
    assert filecmp.cmp(local, out, shallow=False), remote
    out.unlink()


def _wait_healthy(cluster: ProcCluster, timeout: float = 30) -> None:
    wait_until(cluster.healthy, timeout, "dfs fsck to find every chunk at its goal")


def test_standby_takes_over_from_a_killed_tracker_during_a_put(
    make_cluster: MakeCluster, pg_uri: str, tmp_path: Path
) -> None:
    cluster = _pair(make_cluster, pg_uri)
    active, standby = cluster.trackers
    assert _roles(cluster) == {active.addr: "active", standby.addr: "standby"}
    big = random_file(tmp_path / "big", 200 * MiB)
    put = cluster.dfs_background("put", str(big), "/big")
    try:
        killed_at = kill_once_under_way(
            put,
            lambda: sum(len(chunk_files(k.data_dir)) for k in cluster.keepers),
            active.kill,
            "put",
        )
        takeover_s = _first_answer(cluster, standby, killed_at, timeout=30)
        _, err = put.communicate(timeout=240)
    finally:
        if put.poll() is None:
            put.kill()
            put.wait()
    assert put.returncode == 0, err
    # The time from the SIGKILL to the standby's first answer as the active tracker.
    print(f"\ntakeover after SIGKILL: {takeover_s:.2f} s (lease {LEASE_S} s)")
    assert takeover_s < 4 * LEASE_S + 5  # catches a hang; the figure is printed above
    assert "took the lease" in standby.logs()
    _get_same(cluster, "/big", big, tmp_path)
    assert _roles(cluster)[standby.addr] == "active"
    _wait_healthy(cluster)
    # The old tracker comes back as the standby.
    cluster.restart(active)
    wait_until(lambda: _roles(cluster).get(active.addr) == "standby", 10, "the old one to stand by")
    _get_same(cluster, "/big", big, tmp_path)
    _wait_healthy(cluster)


def test_a_tracker_stopped_past_its_lease_commits_nothing(
    make_cluster: MakeCluster, pg_uri: str, tmp_path: Path
) -> None:
    cluster = _pair(make_cluster, pg_uri, keepers=2)
    old, new = cluster.trackers
    cluster.dfs("mkdir", "/before")
    old.signal(signal.SIGSTOP)
    try:
        stopped_at = time.monotonic()
        takeover_s = _first_answer(cluster, new, stopped_at, timeout=30)
        print(f"\ntakeover after SIGSTOP: {takeover_s:.2f} s (lease {LEASE_S} s)")
        cluster.dfs("mkdir", "/during")  # through the new active tracker
    finally:
        old.signal(signal.SIGCONT)
    listing = cluster.dfs("ls", "/").stdout

    async def change_through_the_old_one() -> NotActive:
        async with _pool(cluster) as pool:
            with pytest.raises(NotActive) as caught:
                await pool.call(
                    old.addr,
                    m.MakeNode(parent=1, name=b"fenced", mode=stat.S_IFDIR | 0o755, uid=0, gid=0),
                    m.AttrReply,
                )
            return caught.value

    refused = trio.run(change_through_the_old_one)
    assert refused.hint == new.addr, refused
    assert cluster.dfs("ls", "/").stdout == listing
    assert "fenced" not in listing
    assert "during" in listing
    assert "before" in listing
    wait_until(lambda: _roles(cluster) == {old.addr: "standby", new.addr: "active"}, 10, "roles")
    assert "standing by" in old.logs()
    _wait_healthy(cluster)


def test_two_trackers_ride_out_a_postgresql_restart(
    make_cluster: MakeCluster, pg_server: PgServer, pg_uri: str, tmp_path: Path
) -> None:
    cluster = _pair(make_cluster, pg_uri, keepers=2)
    before = random_file(tmp_path / "before", 9 * MiB)
    cluster.dfs("put", str(before), "/before")
    _wait_healthy(cluster)
    pg_server.restart()
    after = random_file(tmp_path / "after", 9 * MiB + 1)
    cluster.dfs("put", str(after), "/after")  # waits for the database and the lease
    _get_same(cluster, "/before", before, tmp_path)
    _get_same(cluster, "/after", after, tmp_path)
    assert all(t.running for t in cluster.trackers)
    assert sorted(_roles(cluster).values()) == ["active", "standby"]
    _wait_healthy(cluster)
    pg_server.restart()
    cluster.dfs("mkdir", "/again")
    assert "again" in cluster.dfs("ls", "/").stdout
    assert sorted(_roles(cluster).values()) == ["active", "standby"]
    _wait_healthy(cluster)


def test_parallel_calls_failing_on_a_dead_tracker_all_reach_the_live_one(
    make_cluster: MakeCluster,
) -> None:
    """A put's parallel transfers fail on a dead tracker at the same moment and retry in
    lockstep: they must all move on to the live one, not step each other back to the dead one
    (which once made a put give up during a takeover)."""
    cluster = make_cluster(keepers=0)
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    live = cluster.tracker_addr
    credentials = auth.Credentials.from_settings({"secret_file": str(cluster.secret_file)})

    async def main() -> list[int]:
        async with Client.connect(f"{dead},{live}", credentials, retry_window_s=5.0) as client:
            results: list[int] = []

            async def one() -> None:
                results.append((await client.statfs()).files)

            with trio.fail_after(30):  # catches a hang
                async with trio.open_nursery() as nursery:
                    for _ in range(8):
                        nursery.start_soon(one)
            assert client.trackers.current == live
            return results

    assert len(trio.run(main)) == 8
