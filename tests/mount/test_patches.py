"""Small writes cost what they change: a flush of a few changed blocks sends and stores only
those blocks (a patch over the committed version), and everything that reads, copies, scrubs
or trims chunks still sees whole, correct versions."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest

from cluster import checksum
from tests.cluster_procs import ProcCluster, wait_until
from tests.conftest import MakeCluster, random_file
from tests.mount.conftest import MountFactory

pytestmark = pytest.mark.mount

CHUNK = 4 << 20
BLOCK = checksum.BLOCK_SIZE


def patch_files(cluster: ProcCluster) -> list[Path]:
    return sorted(p for k in cluster.keepers for p in (k.data_dir / "chunks").glob("*/*.dfo"))


def test_synced_small_writes_store_only_their_blocks(
    make_cluster: MakeCluster, mount: MountFactory, tmp_path: Path
) -> None:
    cluster = make_cluster(keepers=3, replication=2, chunk_size=CHUNK)
    m = mount(cluster)
    shadow = bytearray(random_file(tmp_path / "src", 3 * CHUNK).read_bytes())
    path = m.path / "db"
    path.write_bytes(shadow)
    rng = random.Random(7)
    with open(path, "r+b") as f:
        for _ in range(40):
            offset = rng.randrange(len(shadow) - 4096)
            data = os.urandom(4096)
            f.seek(offset)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            shadow[offset : offset + 4096] = data
        # An append that grows the last chunk, synced as a log would be.
        tail = os.urandom(10_000)
        f.seek(len(shadow))
        f.write(tail)
        f.flush()
        os.fsync(f.fileno())
        shadow += tail
    patches = patch_files(cluster)
    assert patches, "the synced writes were stored as whole chunks"
    # Each patch is a header page and the block or two its write touched: never a chunk.
    for p in patches:
        assert p.stat().st_size <= 4096 + 2 * BLOCK, (p, p.stat().st_size)
    assert path.read_bytes() == shadow
    other = mount(cluster, "other")
    assert (other.path / "db").read_bytes() == shadow
    assert cluster.healthy()


def test_patched_chunks_are_repaired_and_scrubbed_whole(
    make_cluster: MakeCluster, mount: MountFactory, tmp_path: Path
) -> None:
    cluster = make_cluster(
        keepers=3,
        replication=2,
        chunk_size=CHUNK,
        dead_after_s=3,
        keeper_args=["--scrub-rate-mb-s", "200"],
    )
    m = mount(cluster)
    shadow = bytearray(random_file(tmp_path / "src", CHUNK + 1000).read_bytes())
    (m.path / "f").write_bytes(shadow)
    with open(m.path / "f", "r+b") as f:
        for offset in (10, 3 * BLOCK + 7, CHUNK + 5):
            f.seek(offset)
            f.write(b"patched!")
            f.flush()
            os.fsync(f.fileno())
            shadow[offset : offset + 8] = b"patched!"
    assert patch_files(cluster)
    # Kill a keeper that holds a patched version: its copies are rebuilt, whole, elsewhere.
    holder = next(k for k in cluster.keepers if list((k.data_dir / "chunks").glob("*/*.dfo")))
    holder.kill()
    wait_until(lambda: cluster.fsck()[0] == 1, 30, "the tracker to see the copies missing")
    wait_until(cluster.healthy, 60, "re-replication of the patched chunks")
    assert (m.path / "f").read_bytes() == shadow
    other = mount(cluster, "other")
    assert (other.path / "f").read_bytes() == shadow


def test_a_reader_on_another_mount_sees_only_committed_versions(
    make_cluster: MakeCluster, mount: MountFactory, tmp_path: Path
) -> None:
    """While one mount rewrites blocks and syncs, another opens and reads the file again and
    again: each read is one of the states the writer committed, never a mix."""
    cluster = make_cluster(keepers=3, replication=2, chunk_size=CHUNK)
    writer, reader = mount(cluster), mount(cluster, "reader")
    states = [bytes([i]) * (2 * BLOCK) for i in range(30)]
    (writer.path / "f").write_bytes(states[0])
    seen = set()
    with open(writer.path / "f", "r+b") as f:
        for i, state in enumerate(states[1:], 1):
            f.seek(0)
            f.write(state[: BLOCK + 100])  # two blocks change per state
            f.flush()
            os.fsync(f.fileno())
            f.seek(BLOCK + 100)
            f.write(state[BLOCK + 100 :])
            f.flush()
            os.fsync(f.fileno())
            time.sleep(0.05)  # past the reader's attribute cache now and then
            got = (reader.path / "f").read_bytes()
            first = got[0]
            half = bytes([first]) * (BLOCK + 100)
            assert got[: BLOCK + 100] == half, f"state {i}: torn first part"
            seen.add(first)
    assert len(seen) > 3  # the reader did see the file move on
    assert (reader.path / "f").read_bytes() == states[-1]
