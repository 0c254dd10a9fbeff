"""DESIGN.md's two durability levels, seen on the keepers: `close` leaves the data in every
copy's file (on the disk within the keepers' write-back interval), `fsync`, O_DSYNC writes and
`sync_on_close` return only once every copy is fsynced. The power-cut tests (tests/powercut)
show what each level survives; these show which one each call gives."""

from __future__ import annotations

import os
import re
import time
import urllib.request

import pytest

from tests.cluster_procs import ProcCluster, free_port, wait_until
from tests.conftest import MakeCluster
from tests.mount.conftest import MountFactory

pytestmark = pytest.mark.mount

CHUNK = 1 << 20


def unsynced(ports: list[int]) -> int:
    """Chunk versions written and not yet fsynced, over every keeper."""
    total = 0
    for port in ports:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        match = re.search(rb"^dfs_keeper_unsynced_chunks (\S+)$", text, re.MULTILINE)
        assert match is not None, text[:500]
        total += int(float(match[1]))
    return total


def cluster_with_metrics(make_cluster: MakeCluster) -> tuple[ProcCluster, list[int]]:
    cluster = make_cluster(keepers=0, replication=2, chunk_size=CHUNK)
    ports = []
    for _ in range(3):
        ports.append(free_port())
        cluster.keeper_args = ["--metrics", f"127.0.0.1:{ports[-1]}"]
        cluster.add_keeper()
    cluster.wait_alive(3)
    return cluster, ports


def test_close_stores_fsync_syncs(make_cluster: MakeCluster, mount: MountFactory) -> None:
    cluster, ports = cluster_with_metrics(make_cluster)
    m = mount(cluster)
    (m.path / "closed").write_bytes(os.urandom(3 * CHUNK))
    # close returned: every copy is in its keeper's file, not yet on the disk...
    assert unsynced(ports) >= 3 * 2
    # ... and the write-back puts it there within seconds, with nobody asking.
    wait_until(lambda: unsynced(ports) == 0, 20, "the keepers' write-back")
    with open(m.path / "synced", "wb") as f:
        f.write(os.urandom(2 * CHUNK + 5))
        os.fsync(f.fileno())
        assert unsynced(ports) == 0  # fsync returned: on every copy's disk
    # fsync of a file reopened after its close: this mount remembers what it left unsynced.
    (m.path / "later").write_bytes(os.urandom(CHUNK))
    fd = os.open(m.path / "later", os.O_RDONLY)
    try:
        os.fsync(fd)
        assert unsynced(ports) == 0
    finally:
        os.close(fd)


def test_o_dsync_and_sync_on_close(make_cluster: MakeCluster, mount: MountFactory) -> None:
    cluster, ports = cluster_with_metrics(make_cluster)
    m = mount(cluster)
    fd = os.open(m.path / "log", os.O_WRONLY | os.O_CREAT | os.O_DSYNC, 0o644)
    try:
        for _ in range(3):
            os.write(fd, os.urandom(5000))
            assert unsynced(ports) == 0  # each O_DSYNC write returned synced
    finally:
        os.close(fd)
    strict = mount(cluster, "strict", "--sync-on-close", "true")
    for i in range(3):
        (strict.path / f"f{i}").write_bytes(os.urandom(CHUNK + i))
        assert unsynced(ports) == 0  # close at fsync's level


def test_fsync_after_truncating_unsynced_chunks(
    make_cluster: MakeCluster, mount: MountFactory
) -> None:
    """Chunks stored unsynced, then truncated away and deleted by their keepers: a later fsync
    has nothing of them to sync (it used to ask for them and fail with EIO)."""
    cluster, ports = cluster_with_metrics(make_cluster)
    m = mount(cluster)
    path = m.path / "f"
    path.write_bytes(os.urandom(4 * CHUNK))
    fd = os.open(path, os.O_RDWR)
    try:
        os.ftruncate(fd, CHUNK // 2)
        time.sleep(3)  # heartbeats carry the deletes; keepers write back, then delete
        os.fsync(fd)
        assert unsynced(ports) == 0
    finally:
        os.close(fd)
    assert path.stat().st_size == CHUNK // 2
