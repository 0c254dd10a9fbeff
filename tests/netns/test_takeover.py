"""A standby takeover across hops: PostgreSQL, two trackers, three keepers and the client
each on a host of its own. The active tracker is SIGKILLed in the middle of a `dfs put`; the
standby takes over on the other host and every byte comes back. As
tests/procs/test_failover.py's takeover test, where everything shares 127.0.0.1: here the
keepers and the client must find the standby at an address of its own, and the trackers
reach their store across the bridge."""

from __future__ import annotations

import filecmp
from pathlib import Path

from tests.cluster_procs import chunk_files, first_active_answer, kill_once_under_way, wait_until
from tests.conftest import random_file
from tests.netcluster import NetCluster
from tests.netns.conftest import LEASE_S

MiB = 1 << 20


def roles(cluster: NetCluster) -> dict[str, str]:
    return {t["addr"]: t["role"] for t in cluster.status()["trackers"]}


def get_same(cluster: NetCluster, remote: str, local: Path, tmp: Path) -> None:
    out = tmp / "out"
    cluster.dfs("get", remote, str(out))
    assert filecmp.cmp(local, out, shallow=False), remote
    out.unlink()


def test_standby_takes_over_across_hosts_from_a_killed_tracker_during_a_put(
    standby_pair: NetCluster, tmp_path: Path
) -> None:
    cluster = standby_pair
    active, standby = cluster.trackers
    assert roles(cluster) == {active.addr: "active", standby.addr: "standby"}
    big = random_file(tmp_path / "big", 200 * MiB)
    put = cluster.dfs_background("put", str(big), "/big")
    try:
        killed_at = kill_once_under_way(
            put,
            lambda: sum(len(chunk_files(k.data_dir)) for k, _ in cluster.keepers),
            active.kill,
            "put",
        )
        # Asked from the client's host, as the client would.
        takeover_s = cluster.client.call(
            lambda: first_active_answer(cluster.secret, standby.addr, killed_at, timeout=30)
        )
        _, err = put.communicate(timeout=240)
    finally:
        if put.poll() is None:
            put.kill()
            put.wait()
    assert put.returncode == 0, err
    print(f"\ntakeover across hosts after SIGKILL: {takeover_s:.2f} s (lease {LEASE_S} s)")
    assert takeover_s < 4 * LEASE_S + 5  # catches a hang; the figure is printed above
    assert "took the lease" in standby.logs()
    get_same(cluster, "/big", big, tmp_path)
    assert roles(cluster)[standby.addr] == "active"
    wait_until(cluster.healthy, 30, "dfs fsck to find every chunk at its goal")
    # The old tracker comes back, on its host and port, as the standby.
    cluster.restart(active)
    wait_until(lambda: roles(cluster).get(active.addr) == "standby", 10, "the old one to stand by")
    get_same(cluster, "/big", big, tmp_path)
    wait_until(cluster.healthy, 30, "dfs fsck healthy with both trackers back")
