"""Defects a POSIX conformance run found, each checked against ext4 in the same test:
O_TRUNC without a write, fallocate in every supported mode, st_blocks of sparse files; and
statfs (the cluster's capacity) and device nodes."""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import MakeCluster
from tests.mount.conftest import MountFactory

pytestmark = pytest.mark.mount

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_COLLAPSE_RANGE = 0x08
FALLOC_FL_ZERO_RANGE = 0x10
CHUNK = 1 << 20  # the test cluster's chunk size
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def test_o_trunc_without_a_write_empties_the_file(
    make_cluster: MakeCluster, mount: MountFactory, tmp_path: Path
) -> None:
    m = mount(make_cluster(keepers=2, replication=2))
    local = tmp_path / "ext4"
    local.mkdir()
    for root in (m.path, local):
        f = root / "log"
        subprocess.run(["bash", "-c", f"echo test > {f}; : > {f}"], check=True)
        assert f.stat().st_size == 0, root
        (root / "g").write_bytes(b"0123456789")
        before = (root / "g").stat()
        time.sleep(0.02)
        os.close(os.open(root / "g", os.O_WRONLY | os.O_TRUNC))
        after = (root / "g").stat()
        assert after.st_size == 0, root
        assert after.st_mtime_ns > before.st_mtime_ns, root
        assert after.st_ctime_ns > before.st_ctime_ns, root
        # An empty file too gets new times from O_TRUNC, as on ext4.
        time.sleep(0.02)
        os.close(os.open(root / "g", os.O_WRONLY | os.O_TRUNC))
        assert (root / "g").stat().st_mtime_ns > after.st_mtime_ns, root
    # And another mount (a fresh view) sees the emptied files.
    other = mount(m.cluster, "other")
    assert (other.path / "log").read_bytes() == b""
    assert (other.path / "g").stat().st_size == 0


def _pattern(size: int) -> bytes:
    return bytes((i * 7 + 3) % 251 for i in range(size))


def test_fallocate_modes_match_ext4(
    make_cluster: MakeCluster, mount: MountFactory, tmp_path: Path
) -> None:
    cluster = make_cluster(keepers=2, replication=2, chunk_size=CHUNK)
    m = mount(cluster)
    local = tmp_path / "ext4"
    local.mkdir()
    size = 5 * CHUNK + 12345
    data = _pattern(size)
    results: dict[Path, list[object]] = {}
    for root in (m.path, local):
        out: list[object] = []
        path = root / "f"
        path.write_bytes(data)
        fd = os.open(path, os.O_RDWR)
        try:
            # mode 0 past the end extends the size; within it, nothing changes.
            fallocate(fd, 0, 100, 1000)
            out.append(os.fstat(fd).st_size)
            fallocate(fd, 0, size, 4096)
            out.append(os.fstat(fd).st_size)
            # KEEP_SIZE past the end: the size stays.
            fallocate(fd, FALLOC_FL_KEEP_SIZE, size + 4096, 1 << 20)
            out.append(os.fstat(fd).st_size)
            # Punch a hole over chunk edges and two whole chunks: zeros, size kept.
            fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, CHUNK - 500, 2 * CHUNK + 1000)
            # Zero a range inside one chunk, and one past the end without KEEP_SIZE.
            fallocate(fd, FALLOC_FL_ZERO_RANGE, 4 * CHUNK + 10, 300)
            fallocate(fd, FALLOC_FL_ZERO_RANGE, size, 10000)
            out.append(os.fstat(fd).st_size)
            if root == m.path:  # ext4 has more modes; dfs refuses every other one
                for mode in (FALLOC_FL_COLLAPSE_RANGE, 0x20, 0x40, FALLOC_FL_PUNCH_HOLE):
                    with pytest.raises(OSError, match="not supported") as refused:
                        fallocate(fd, mode, 0, CHUNK)
                    assert refused.value.errno == errno.EOPNOTSUPP, mode
        finally:
            os.close(fd)
        out.append(path.read_bytes())
        results[root] = out
    mine, ext4 = results[m.path], results[local]
    assert mine[:-1] == ext4[:-1]
    if mine[-1] != ext4[-1]:
        a, b = mine[-1], ext4[-1]
        assert isinstance(a, bytes)
        assert isinstance(b, bytes)
        diff = [i for i in range(min(len(a), len(b))) if a[i] != b[i]]
        raise AssertionError(
            f"contents differ: lengths {len(a)} {len(b)}, at {diff[:3]}..{diff[-3:]}"
        )
    expected = bytearray(data + bytes(10000))
    expected[CHUNK - 500 : 3 * CHUNK + 500] = bytes(2 * CHUNK + 1000)
    expected[4 * CHUNK + 10 : 4 * CHUNK + 310] = bytes(300)
    assert mine[-1] == bytes(expected)
    # The two whole chunks inside the hole are freed on the tracker (holes in the chunk list).
    chunks = {c["index"] for c in cluster.stat("/f")["chunks"]}
    assert not chunks & {1, 2}, chunks
    assert {0, 3, 4, 5} <= chunks, chunks
    # ... and another mount reads the same bytes.
    other = mount(cluster, "other")
    assert (other.path / "f").read_bytes() == bytes(expected)


def test_st_blocks_counts_what_is_stored(
    make_cluster: MakeCluster, mount: MountFactory, tmp_path: Path
) -> None:
    cluster = make_cluster(keepers=2, replication=2, chunk_size=CHUNK)
    m = mount(cluster)
    sparse = m.path / "sparse"
    subprocess.run(["truncate", "-s", "1G", str(sparse)], check=True)
    assert sparse.stat().st_size == 1 << 30
    assert sparse.stat().st_blocks == 0
    with open(sparse, "r+b") as f:
        f.seek(5 * CHUNK)
        f.write(b"x" * 4096)
    blocks = sparse.stat().st_blocks
    # One chunk holds the 4 KiB (and whatever it stores before them), never the 1 GiB.
    assert 8 <= blocks <= 2 * CHUNK // 512, blocks
    du = subprocess.run(["du", "-k", str(sparse)], capture_output=True, text=True, check=True)
    assert int(du.stdout.split()[0]) <= 2 * CHUNK // 1024, du.stdout
    full = m.path / "full"
    full.write_bytes(b"y" * (3 * CHUNK))
    assert full.stat().st_blocks == 3 * CHUNK // 512
    fd = os.open(full, os.O_RDWR)
    try:
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, CHUNK, CHUNK)
    finally:
        os.close(fd)
    assert full.stat().st_blocks == 2 * CHUNK // 512
    # The figure survives a remount: it comes from the tracker, not from this mount's memory.
    m.unmount()
    m.start()
    assert (m.path / "full").stat().st_blocks == 2 * CHUNK // 512
    assert (m.path / "sparse").stat().st_blocks == blocks


def test_statfs_is_the_clusters_capacity_and_free_space(
    make_cluster: MakeCluster, mount: MountFactory
) -> None:
    """`df` on the mount shows what `dfs status` shows: the live keepers' capacity, and that
    less what they use, within a chunk's rounding; and it follows what is written."""
    capacity = 200 * CHUNK + 12345  # not a whole number of blocks: the rounding shows
    cluster = make_cluster(keepers=3, replication=2, chunk_size=CHUNK, capacity=capacity)
    m = mount(cluster)

    def figures() -> dict[str, tuple[int, int]]:
        """(dfs status, the mount) for each figure."""
        status = cluster.status()
        live = [k for k in status["keepers"] if k["state"] == "alive"]
        total = sum(k["capacity_bytes"] for k in live)
        used = sum(k["used_bytes"] for k in live)
        st = os.statvfs(m.path)
        df = subprocess.run(
            ["df", "-B1", "--output=size,avail", str(m.path)],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.split()
        return {
            "total": (total, st.f_blocks * st.f_frsize),
            "free": (total - used, st.f_bfree * st.f_frsize),
            "avail": (total - used, st.f_bavail * st.f_frsize),
            "df size": (total, int(df[-2])),
            "df avail": (total - used, int(df[-1])),
        }

    def agreed() -> dict[str, tuple[int, int]]:
        # The keepers report their use in heartbeats, and the mount caches statfs for a
        # second: the figures agree once both have caught up.
        deadline = time.monotonic() + 20
        while True:
            seen = figures()
            off = {k: v for k, v in seen.items() if abs(v[0] - v[1]) >= CHUNK}
            if not off:
                return seen
            assert time.monotonic() < deadline, f"(dfs status, mount) differ: {off}"
            time.sleep(0.5)

    before = agreed()
    assert before["total"][0] == 3 * capacity
    written = 3 * (5 * CHUNK + 17)
    for i in range(3):
        (m.path / f"f{i}").write_bytes(os.urandom(5 * CHUNK + 17))
    # Two copies of what was written are stored now: the mount's free space shrank by that.
    deadline = time.monotonic() + 20
    while before["free"][0] - figures()["free"][0] < 2 * written:
        assert time.monotonic() < deadline, "dfs status does not show the files' space used"
        time.sleep(0.5)
    after = agreed()
    assert before["free"][1] - after["free"][1] >= 2 * written - CHUNK
    assert after["total"] == before["total"]


def test_device_nodes_keep_type_and_numbers(
    make_cluster: MakeCluster, mount: MountFactory, tmp_path: Path
) -> None:
    """mknod of character and block devices (as root), compared with ext4; the type and the
    device numbers survive a remount and are seen from another mount."""
    assert os.geteuid() == 0, "device nodes need root"
    cluster = make_cluster(keepers=1, replication=1)
    m = mount(cluster)
    nodes = {
        "null": (stat.S_IFCHR | 0o666, os.makedev(1, 3)),
        "loop": (stat.S_IFBLK | 0o640, os.makedev(7, 5)),
        # Beyond 8 bits of major and minor: the numbers' full encoding goes through.
        "nvme": (stat.S_IFBLK | 0o600, os.makedev(259, 70000)),
        "tty": (stat.S_IFCHR | 0o620, os.makedev(136, 4095)),
    }
    local = tmp_path / "ext4"
    local.mkdir()

    def seen(root: Path) -> dict[str, tuple[int, int, int]]:
        out = {}
        for name in nodes:
            st = os.lstat(root / name)
            out[name] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_rdev)
        return out

    for root in (m.path, local):
        for name, (mode, rdev) in nodes.items():
            os.mknod(root / name, mode, rdev)
    expected = seen(local)
    assert expected["null"][2] == os.makedev(1, 3)
    assert seen(m.path) == expected
    other = mount(cluster, "other")
    assert seen(other.path) == expected
    m.unmount()
    m.start()
    assert seen(m.path) == expected
    assert sorted(os.listdir(m.path)) == sorted(nodes)
