"""A mount rides out the death of its tracker: two trackers on PostgreSQL, the active one
SIGKILLed while `cp` writes 200 MiB through the mount; the standby takes over and the copy
completes with every byte."""

from __future__ import annotations

import filecmp
import subprocess
from pathlib import Path

import pytest

from tests.cluster_procs import chunk_files, kill_once_under_way, wait_until
from tests.conftest import MakeCluster, random_file
from tests.mount.conftest import MountFactory
from tests.procs.test_failover import LEASE_S, _first_answer, _pair, _roles

pytestmark = pytest.mark.mount

MiB = 1 << 20


def test_cp_through_the_mount_survives_a_tracker_takeover(
    make_cluster: MakeCluster, mount: MountFactory, pg_uri: str, tmp_path: Path
) -> None:
    cluster = _pair(make_cluster, pg_uri)
    active, standby = cluster.trackers
    m = mount(cluster)  # given both trackers
    big = random_file(tmp_path / "big", 200 * MiB)
    copy = subprocess.Popen(["cp", str(big), str(m.path / "big")])
    try:
        killed_at = kill_once_under_way(
            copy,
            lambda: sum(len(chunk_files(k.data_dir)) for k in cluster.keepers),
            active.kill,
            "cp",
        )
        takeover_s = _first_answer(cluster, standby, killed_at, timeout=60)
        assert copy.wait(timeout=300) == 0
    finally:
        if copy.poll() is None:
            copy.kill()
            copy.wait()
    print(f"\ntakeover after SIGKILL during cp: {takeover_s:.2f} s (lease {LEASE_S} s)")
    assert filecmp.cmp(big, m.path / "big", shallow=False)
    assert _roles(cluster)[standby.addr] == "active"
    out = tmp_path / "out"
    cluster.dfs("get", "/big", str(out))
    assert filecmp.cmp(big, out, shallow=False)
    wait_until(cluster.healthy, 60, "dfs fsck healthy after the takeover")
    m.unmount()
