"""Cluster failures under the mount (issue 4, tests 9 and 11; issue 5, test 3): a keeper
killed while `cp` writes, a keeper frozen while `cat` reads, and the whole round trip over TLS."""

from __future__ import annotations

import filecmp
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.cluster_procs import wait_until
from tests.conftest import MakeCluster, random_file
from tests.mount.conftest import MountFactory
from tests.procs.test_security import make_tls_files

pytestmark = pytest.mark.mount

MiB = 1 << 20


def _wait_for_bytes(path: Path, size: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while (not path.exists() or path.stat().st_size < size) and proc.poll() is None:
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.01)


def test_cp_into_the_mount_survives_a_killed_keeper(
    make_cluster: MakeCluster, mount: MountFactory, tmp_path: Path
) -> None:
    cluster = make_cluster(keepers=4, replication=2, dead_after_s=3.0)
    mnt = mount(cluster, "mnt", "--dirty-mb", "64")
    local = random_file(tmp_path / "big", 240 * MiB + 5)
    cp = subprocess.Popen(["cp", str(local), str(mnt.path / "big")])
    try:
        # Halfway through, by what has reached the keepers' disks.
        def halfway() -> bool:
            stored = sum(
                f.stat().st_size
                for k in cluster.keepers
                for f in (k.data_dir / "chunks").glob("*/*.dfs")
            )
            return stored >= 2 * 120 * MiB or cp.poll() is not None

        wait_until(halfway, 120, "half the file on the keepers")
        cluster.keepers[0].kill()
        assert cp.wait(timeout=300) == 0
    finally:
        if cp.poll() is None:
            cp.kill()
    assert filecmp.cmp(local, mnt.path / "big", shallow=False)
    mnt.unmount()
    again = mount(cluster, "again")
    assert filecmp.cmp(local, again.path / "big", shallow=False)
    wait_until(cluster.healthy, 120, "the cluster to heal")


def test_frozen_keeper_does_not_stall_cat(
    make_cluster: MakeCluster, mount: MountFactory, tmp_path: Path
) -> None:
    cluster = make_cluster(keepers=3, replication=2)
    writer = mount(cluster, "writer")
    local = random_file(tmp_path / "big", 96 * MiB)
    subprocess.run(["cp", str(local), str(writer.path / "big")], check=True, timeout=300)
    reader = mount(cluster, "reader", "--cache-mb", "32", "--io-timeout-s", "2")
    out = tmp_path / "out"
    frozen = cluster.keepers[0]
    with open(out, "wb") as sink:
        cat = subprocess.Popen(["cat", str(reader.path / "big")], stdout=sink)
        try:
            _wait_for_bytes(out, 8 * MiB, cat)
            frozen.signal(signal.SIGSTOP)
            started = time.monotonic()
            assert cat.wait(timeout=120) == 0
            elapsed = time.monotonic() - started
        finally:
            frozen.signal(signal.SIGCONT)
            if cat.poll() is None:
                cat.kill()
    assert filecmp.cmp(local, out, shallow=False)
    # Failing over costs one io_timeout per chunk copy on the frozen keeper at most, once:
    # after that the client tries it last.
    assert elapsed < 60, f"cat took {elapsed:.1f}s after the freeze"
    wait_until(
        lambda: all(k["state"] == "alive" for k in cluster.status()["keepers"]), 30, "rejoin"
    )


def test_tls_round_trip_through_the_mount(
    make_cluster: MakeCluster, mount: MountFactory, tmp_path: Path
) -> None:
    tls_dir = tmp_path / "tls"
    tls_dir.mkdir()
    cluster = make_cluster(keepers=2, replication=2, env=make_tls_files(tls_dir))
    local = random_file(tmp_path / "data", 20 * MiB + 3)
    cluster.dfs("put", str(local), "/put")
    cluster.dfs("get", "/put", str(tmp_path / "got"))
    assert filecmp.cmp(local, tmp_path / "got", shallow=False)
    mnt = mount(cluster)
    subprocess.run(["cp", str(local), str(mnt.path / "copied")], check=True, timeout=120)
    out = tmp_path / "out"
    with open(out, "wb") as sink:
        subprocess.run(["cat", str(mnt.path / "copied")], stdout=sink, check=True, timeout=120)
    assert filecmp.cmp(local, out, shallow=False)
    assert filecmp.cmp(local, mnt.path / "put", shallow=False)
