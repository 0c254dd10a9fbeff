"""dfs across lossy hops: every server and the client on a host of its own, joined by the
userspace wire (tests/wire.py) with 1 ms round trips and 0.5% of frames lost, since this
kernel has no sch_netem. A file copied in through the mount and read back through a fresh
one comes back byte for byte, and the wire shows that it really delayed and dropped."""

from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path

import pytest

from tests.conftest import random_file
from tests.netcluster import NetCluster
from tests.netlab import LOSSY, tcp_rtt_s

pytestmark = pytest.mark.mount

MiB = 1 << 20
# The size. The wire (a Python forwarder) carries it at about 100 MB/s in and 300 MB/s
# out on this 2-core machine, so the test takes seconds; `make bench` (bench/hops.py) reports
# the same figures beside the loopback ones.
SIZE = 256 * MiB


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(MiB):
            digest.update(piece)
    return digest.hexdigest()


def test_cp_and_cat_across_lossy_hops(lossy_cluster: NetCluster, tmp_path: Path) -> None:
    cluster = lossy_cluster
    assert cluster.tracker_node is not None
    rtt = tcp_rtt_s(cluster.client, cluster.tracker_node.addr)
    print(f"\nround trip client -> tracker through the wire: {rtt * 1000:.2f} ms")
    assert rtt >= 2 * LOSSY.delay_s, "the wire did not delay"
    before = cluster.lab.wire_stats()

    src = random_file(tmp_path / "src", SIZE)
    expected = sha256(src)
    m = cluster.mount("mnt")
    started = time.monotonic()
    shutil.copyfile(src, m.path / "big")  # closes the file: every byte stored and committed
    cp_s = time.monotonic() - started
    m.stop()
    # A fresh mount, so that the bytes come from the keepers, not from the first one's cache.
    m = cluster.mount("mnt2")
    started = time.monotonic()
    got = sha256(m.path / "big")
    cat_s = time.monotonic() - started
    assert got == expected

    after = cluster.lab.wire_stats()
    frames = after["frames"] - before["frames"]
    dropped = after["dropped_loss"] - before["dropped_loss"]
    print(
        f"{SIZE // MiB} MiB across {LOSSY.delay_s * 2000:g} ms RTT, {LOSSY.loss:.1%} loss:"
        f" cp {SIZE / MiB / cp_s:.1f} MiB/s, cat {SIZE / MiB / cat_s:.1f} MiB/s;"
        f" wire: {frames} frames forwarded, {dropped} dropped ({dropped / frames:.2%})"
    )
    assert dropped > 0, "the wire dropped nothing"
