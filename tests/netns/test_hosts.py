"""dfs across real hops: every server and the client on a host (network namespace) of its
own. A partitioned host is cut off, not killed: its processes run on and come back."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.cluster_procs import wait_until
from tests.conftest import random_file
from tests.netcluster import NetCluster

pytestmark = pytest.mark.mount

MiB = 1 << 20


def test_a_cluster_across_hosts_stores_and_serves(net_cluster: NetCluster, tmp_path: Path) -> None:
    src = random_file(tmp_path / "src", 24 * MiB)
    net_cluster.dfs("put", str(src), "/f")
    out = tmp_path / "out"
    net_cluster.dfs("get", "/f", str(out))
    assert out.read_bytes() == src.read_bytes()
    m = net_cluster.mount("mnt")
    assert (m.path / "f").read_bytes() == src.read_bytes()


def chunk_versions(data_dir: Path, chunk_id: int) -> set[int]:
    """The versions of `chunk_id` a keeper has files for (full or patch)."""
    found = set()
    for path in (data_dir / "chunks").glob(f"*/chunk_{chunk_id:016x}_*.df*"):
        found.add(int(path.name.split("_")[2].split(".")[0], 16))
    return found


def test_a_partitioned_keeper_is_failed_over_healed_around_and_trimmed(
    net_cluster: NetCluster, tmp_path: Path
) -> None:
    """A keeper cut off in the middle of a `cp` and another in the middle of a `cat`: both
    finish with every byte right, the cluster heals around the lost keepers, and once the
    partitions heal their stale copies are trimmed, never served."""
    lab = net_cluster.lab
    net_cluster.add_keeper()  # three copies of /small fit with one keeper cut off
    wait_until(lambda: net_cluster.alive() == 4, 30, "a fourth keeper")
    (k0, n0), (_, n1), _, _ = net_cluster.keepers
    m = net_cluster.mount("mnt", "--io-timeout-s", "3", "--cache-mb", "16")
    # A file on every keeper, overwritten while k0 is cut off: k0's copy goes stale.
    small = m.path / "small"
    small.write_bytes(b"old" * 100_000)
    net_cluster.dfs("setrep", "3", "/small")
    wait_until(net_cluster.healthy, 60, "three copies of /small")

    src = random_file(tmp_path / "src", 128 * MiB)
    started = time.monotonic()
    copy = subprocess.Popen(["cp", str(src), str(m.path / "big")])
    try:
        wait_until(lambda: (m.path / "big").exists(), 30, "cp to start")
        lab.partition(n0)  # in the middle of the copy
        small.write_bytes(b"new" * 100_000)
        assert copy.wait(timeout=240) == 0
        print(f"cp of 128 MiB with a keeper cut off: {time.monotonic() - started:.1f} s")
    finally:
        if copy.poll() is None:
            copy.kill()
    assert (m.path / "big").read_bytes() == src.read_bytes()
    stat = json.loads(net_cluster.dfs("stat", "--json", "/small"))
    (chunk,) = stat["chunks"]
    assert k0.addr not in chunk["keepers"]
    assert chunk["version"] not in chunk_versions(k0.data_dir, chunk["id"])

    # The tracker declares k0 dead after dead_after_s and copies around it.
    wait_until(net_cluster.healthy, 120, "healed around the partitioned keeper")
    print(f"healed around it {time.monotonic() - started:.1f} s after the cp started")

    # A read with another keeper cut off in the middle.
    lab.heal(n0)
    wait_until(lambda: net_cluster.alive() == 4, 60, "k0 back")
    # A fresh mount, so the bytes come from the keepers, not from a cache.
    m.stop()
    m = net_cluster.mount("mnt2", "--io-timeout-s", "3", "--cache-mb", "16")
    started = time.monotonic()
    with open(m.path / "big", "rb") as f, open(src, "rb") as expected:
        offset = 0
        while piece := f.read(MiB):
            assert piece == expected.read(len(piece)), f"wrong bytes at {offset}"
            offset += len(piece)
            if offset == 24 * MiB:
                lab.partition(n1)  # in the middle of the read
            time.sleep(0.005)
    assert offset == src.stat().st_size
    print(f"read of 128 MiB with a keeper cut off: {time.monotonic() - started:.1f} s")
    lab.heal(n1)
    wait_until(lambda: net_cluster.alive() == 4, 60, "k1 back")

    # k0's stale copy of /small is trimmed; every read gets the new bytes.
    old_version = min(chunk_versions(k0.data_dir, chunk["id"]) | {chunk["version"]})
    wait_until(
        lambda: not (chunk_versions(k0.data_dir, chunk["id"]) - {chunk["version"]}),
        60,
        f"k0's stale copy v{old_version} to be trimmed",
    )
    for _ in range(5):
        assert net_cluster.dfs("get", "/small", "-") == "new" * 100_000
    wait_until(net_cluster.healthy, 60, "healthy after the partitions healed")


def test_a_short_tracker_partition_makes_calls_wait_then_succeed(
    net_cluster: NetCluster, tmp_path: Path
) -> None:
    """The client host cut off from the tracker for less than retry_window_s: the mount's
    calls made meanwhile wait, then succeed once the partition heals."""
    m = net_cluster.mount("mnt")
    (m.path / "before").write_bytes(b"x" * 1000)
    assert net_cluster.tracker_node is not None
    results: dict[str, object] = {}

    def work() -> None:
        try:
            (m.path / "during").write_bytes(b"y" * 5000)  # create, store, commit
            results["listing"] = sorted(os.listdir(m.path))
        except OSError as exc:
            results["error"] = exc

    net_cluster.lab.partition(net_cluster.tracker_node)
    worker = threading.Thread(target=work)
    try:
        worker.start()
        time.sleep(4)
        assert worker.is_alive(), f"the calls did not wait: {results}"
    finally:
        net_cluster.lab.heal(net_cluster.tracker_node)
    worker.join(timeout=60)
    assert not worker.is_alive(), "the calls hung after the partition healed"
    assert "error" not in results, results
    assert results["listing"] == ["before", "during"]
    assert (m.path / "during").read_bytes() == b"y" * 5000
    assert net_cluster.dfs("get", "/during", "-") == "y" * 5000
