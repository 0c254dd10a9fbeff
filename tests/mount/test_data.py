"""File data through the mount: big copies, random I/O against a shadow file, mmap, and
close-to-open between two mounts."""

from __future__ import annotations

import mmap
import os
import random
import subprocess
import time
from pathlib import Path

import pytest

from tests.cluster_procs import chunk_files
from tests.conftest import MakeCluster, random_file
from tests.mount.conftest import MountFactory

pytestmark = pytest.mark.mount

MiB = 1 << 20


def drop_page_cache(path: Path) -> None:
    """Make the next reads of `path` go to the file system, not the kernel's page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def cmp(a: Path, b: Path) -> None:
    result = subprocess.run(["cmp", str(a), str(b)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_cp_and_cat_300_mib(make_cluster: MakeCluster, mount: MountFactory, tmp_path: Path) -> None:
    cluster = make_cluster()
    # A small dirty bound, so that cp runs into backpressure and keeps going.
    m = mount(cluster, "mnt", "--dirty-mb", "64")
    local = random_file(tmp_path / "big", 300 * MiB + 12345)
    subprocess.run(["cp", str(local), str(m.path / "big")], check=True, timeout=300)
    out = tmp_path / "out"
    drop_page_cache(m.path / "big")
    with open(out, "wb") as sink:
        subprocess.run(["cat", str(m.path / "big")], stdout=sink, check=True, timeout=300)
    cmp(local, out)
    assert (m.path / "big").stat().st_size == local.stat().st_size

    m.unmount()
    m.restart()
    cmp(local, m.path / "big")


def test_random_io_against_a_shadow_file(
    make_cluster: MakeCluster, mount: MountFactory, tmp_path: Path
) -> None:
    """2,000 random writes, reads and truncates on a file in the mount and on a local file,
    with 1 MiB chunks so that the operations cross chunk boundaries all the time."""
    cluster = make_cluster(chunk_size=1 * MiB)
    m = mount(cluster)
    rng = random.Random(20261125)
    path = m.path / "shadowed"
    shadow_path = tmp_path / "shadow"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    sd = os.open(shadow_path, os.O_RDWR | os.O_CREAT, 0o644)
    limit = 6 * MiB

    def check(step: int) -> None:
        assert os.fstat(fd).st_size == os.fstat(sd).st_size, step
        size = os.fstat(sd).st_size
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert os.pread(fd, size + 10, 0) == os.pread(sd, size + 10, 0), (
            f"contents differ after {step} ops"
        )

    try:
        for step in range(1, 2001):
            op = rng.random()
            if op < 0.55:
                offset = rng.randrange(limit)
                data = rng.randbytes(rng.choice((1, 100, 4096, 65536, rng.randrange(1, 3 * MiB))))
                assert os.pwrite(fd, data, offset) == len(data)
                os.pwrite(sd, data, offset)
            elif op < 0.85:
                if rng.random() < 0.3:  # make the next read miss the page cache
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                offset = rng.randrange(limit)
                length = rng.randrange(1, 2 * MiB)
                assert os.pread(fd, length, offset) == os.pread(sd, length, offset), step
            elif op < 0.97:
                size = rng.randrange(limit)
                os.ftruncate(fd, size)
                os.ftruncate(sd, size)
            else:
                os.fsync(fd)
            if step % 100 == 0:
                check(step)
        os.fsync(fd)
    finally:
        os.close(fd)
        os.close(sd)
    # And as another mount sees it once closed.
    other = mount(cluster, "other")
    cmp(shadow_path, other.path / "shadowed")


def test_mmap_read_and_write(
    make_cluster: MakeCluster, mount: MountFactory, tmp_path: Path
) -> None:
    cluster = make_cluster(chunk_size=1 * MiB)
    m = mount(cluster)
    rng = random.Random(8)
    expected = bytearray(rng.randbytes(3 * MiB + 77))
    path = m.path / "mapped"
    path.write_bytes(expected)

    # mmap read of data written with write().
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as view:
        assert view[:] == expected

    # mmap write: patches across a chunk boundary and at both ends.
    with open(path, "r+b") as g, mmap.mmap(g.fileno(), 0) as view:
        for offset in (0, MiB - 10, 2 * MiB + 5, len(expected) - 100):
            patch = rng.randbytes(100)
            view[offset : offset + 100] = patch
            expected[offset : offset + 100] = patch
        view.flush()
    drop_page_cache(path)
    assert path.read_bytes() == expected

    # A file grown with ftruncate and filled through the mapping only.
    grown = m.path / "grown"
    with open(grown, "w+b") as h:
        h.truncate(2 * MiB)
        with mmap.mmap(h.fileno(), 2 * MiB) as view:
            view[MiB - 3 : MiB + 3] = b"abcdef"
    other = mount(cluster, "other")
    assert (other.path / "mapped").read_bytes() == expected
    data = (other.path / "grown").read_bytes()
    assert len(data) == 2 * MiB
    assert data[MiB - 3 : MiB + 3] == b"abcdef"
    assert data.count(0) == 2 * MiB - 6


def test_two_mounts_close_to_open(
    make_cluster: MakeCluster, mount: MountFactory, tmp_path: Path
) -> None:
    cluster = make_cluster(chunk_size=1 * MiB)
    first = mount(cluster, "first")
    second = mount(cluster, "second")
    rng = random.Random(5)

    versions = [
        rng.randbytes(5 * MiB + 3),  # new file
        rng.randbytes(5 * MiB + 3),  # same size, other bytes
        rng.randbytes(2 * MiB),  # shorter
        rng.randbytes(7 * MiB + 1),  # longer
    ]
    for i, content in enumerate(versions):
        (first.path / "shared").write_bytes(content)
        # The second mount read the previous version (into its page cache) just before.
        assert (second.path / "shared").read_bytes() == content, f"version {i}"
        with open(second.path / "shared", "rb") as f:
            assert f.read() == content, f"version {i}, second read"

    # Appends on the second mount are seen whole on the first.
    with open(second.path / "shared", "ab") as f:
        f.write(b"tail")
    assert (first.path / "shared").read_bytes() == versions[-1] + b"tail"


def test_unlinked_open_file_stays_readable(make_cluster: MakeCluster, mount: MountFactory) -> None:
    cluster = make_cluster(chunk_size=1 * MiB)
    m = mount(cluster)
    other = mount(cluster, "other")
    data = os.urandom(3 * MiB + 11)
    (m.path / "doomed").write_bytes(data)
    fd = os.open(other.path / "doomed", os.O_RDWR)
    try:
        # Unlinked on the first mount: the tracker keeps the inode for the second one's handle.
        (m.path / "doomed").unlink()
        assert not (m.path / "doomed").exists()
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert os.pread(fd, len(data) + 1, 0) == data
        os.pwrite(fd, b"more", len(data))
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        assert os.pread(fd, len(data) + 10, 0) == data + b"more"
        assert os.fstat(fd).st_nlink == 0
    finally:
        os.close(fd)
    deadline = time.monotonic() + 60
    while any(chunk_files(k.data_dir) for k in cluster.keepers):
        assert time.monotonic() < deadline, "the unlinked file's chunks were never deleted"
        time.sleep(0.2)


def test_sparse_file(make_cluster: MakeCluster, mount: MountFactory) -> None:
    cluster = make_cluster()
    m = mount(cluster)
    far = 5 << 30
    with open(m.path / "sparse", "wb") as f:
        f.write(b"head")
        f.seek(far - 4)
        f.write(b"tail")
    other = mount(cluster, "other")
    with open(other.path / "sparse", "rb") as f:
        assert os.fstat(f.fileno()).st_size == far
        assert f.read(8) == b"head" + bytes(4)
        f.seek(far // 2)
        assert f.read(3 * MiB) == bytes(3 * MiB)
        f.seek(far - 8)
        assert f.read() == bytes(4) + b"tail"
    # Only the two chunks that hold bytes exist.
    assert len(cluster.stat("/sparse")["chunks"]) == 2
