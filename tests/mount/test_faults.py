"""Failures seen through the mount: a keeper killed under a reader, every copy gone, full
keepers, and the mount process itself killed after fsync."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import MakeCluster, random_file
from tests.mount.conftest import (
    MountFactory,
    PipeReader,
    first_copy_holder,
    oserror,
    read_failovers,
)

pytestmark = pytest.mark.mount

MiB = 1 << 20
# "Never block forever": a read with no copy left fails within this.
EIO_BOUND_S = 30.0


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def test_keeper_killed_during_cat(
    make_cluster: MakeCluster, mount: MountFactory, tmp_path: Path
) -> None:
    cluster = make_cluster(keepers=3, replication=2)
    writer = mount(cluster, "writer")
    local = random_file(tmp_path / "big", 200 * MiB + 7)
    subprocess.run(["cp", str(local), str(writer.path / "big")], check=True, timeout=300)
    chunk = cluster.stat("/big")["chunk_size"]
    kill_at = 16 * MiB
    # The victim holds the first copy of chunks that neither cat nor any read-ahead (a chunk,
    # with this cache) has reached at the kill: reading them must fail over.
    victim = first_copy_holder(cluster, "/big", kill_at // chunk + 2)
    # A fresh mount with a small cache: nothing is cached, read-ahead stays short.
    reader = mount(cluster, "reader", "--cache-mb", "32")
    cat = subprocess.Popen(["cat", str(reader.path / "big")], stdout=subprocess.PIPE)
    try:
        pipe = PipeReader(cat)
        pipe.take(kill_at)
        assert cat.poll() is None, "cat ended before the kill"  # blocked on the full pipe
        victim.kill()
        pipe.take()
        assert cat.wait(timeout=120) == 0
    finally:
        if cat.poll() is None:
            cat.kill()
            cat.wait()
    assert pipe.taken == local.stat().st_size
    assert pipe.digest.hexdigest() == sha256(local)
    assert read_failovers(reader, victim.addr), "no read failed over from the killed keeper"


def test_no_copy_left_gives_eio_then_recovers(
    make_cluster: MakeCluster, mount: MountFactory, tmp_path: Path
) -> None:
    cluster = make_cluster(keepers=2, replication=2, chunk_size=1 * MiB)
    writer = mount(cluster, "writer")
    data = os.urandom(5 * MiB + 3)
    (writer.path / "doomed").write_bytes(data)
    reader = mount(cluster, "reader")
    for keeper in cluster.keepers:
        keeper.kill()
    started = time.monotonic()
    result = subprocess.run(
        ["cat", str(reader.path / "doomed")], capture_output=True, timeout=EIO_BOUND_S * 2
    )
    assert result.returncode != 0
    assert b"Input/output error" in result.stderr, result.stderr
    assert time.monotonic() - started < EIO_BOUND_S
    assert oserror((reader.path / "doomed").read_bytes) == "EIO"

    # The copies come back: the same mount reads the file again, by itself.
    for keeper in cluster.keepers:
        cluster.restart(keeper)
    cluster.wait_alive(2)
    assert (reader.path / "doomed").read_bytes() == data


def test_full_keepers_give_enospc_and_keep_older_files(
    make_cluster: MakeCluster, mount: MountFactory, tmp_path: Path
) -> None:
    cluster = make_cluster(keepers=3, replication=3, chunk_size=1 * MiB, capacity=12 * MiB)
    m = mount(cluster)
    before = os.urandom(4 * MiB + 5)
    (m.path / "before").write_bytes(before)

    def fill() -> None:
        with open(m.path / "too-big", "wb") as f:
            for _ in range(40):
                f.write(os.urandom(MiB))
            f.flush()
            os.fsync(f.fileno())

    assert oserror(fill) == "ENOSPC"

    other = mount(cluster, "other")
    assert (other.path / "before").read_bytes() == before
    # The mount keeps working for everything that needs no new chunk. (The space the failed
    # file's uploads took comes back only after the tracker's gc_grace_s: they were never
    # committed, and nothing tells the tracker they are abandoned.)
    (m.path / "too-big").unlink()
    (m.path / "dir").mkdir()
    (m.path / "empty").touch()
    assert sorted(os.listdir(other.path)) == ["before", "dir", "empty"]


def test_fsynced_files_survive_sigkill_of_the_mount(
    make_cluster: MakeCluster, mount: MountFactory, tmp_path: Path
) -> None:
    cluster = make_cluster(chunk_size=1 * MiB)
    m = mount(cluster)
    sizes = {"empty": 0, "byte": 1, "small": 4000, "chunky": 3 * MiB + 1, "big": 20 * MiB}
    digests: dict[str, str] = {}
    open_fds = []
    for name, size in sizes.items():
        local = random_file(tmp_path / name, size)
        digests[name] = sha256(local)
        fd = os.open(m.path / name, os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, local.read_bytes())
        os.fsync(fd)
        if name in ("small", "big"):
            open_fds.append(fd)  # still open (and fsynced) when the mount dies
        else:
            os.close(fd)
    # An overwrite inside an existing file, fsynced.
    fd = os.open(m.path / "chunky", os.O_WRONLY)
    os.pwrite(fd, b"patched", MiB - 3)
    os.fsync(fd)
    os.close(fd)
    patched = bytearray((tmp_path / "chunky").read_bytes())
    patched[MiB - 3 : MiB + 4] = b"patched"
    (tmp_path / "chunky").write_bytes(patched)
    digests["chunky"] = sha256(tmp_path / "chunky")
    # Written but never fsynced: may or may not survive, must not break anything.
    fd = os.open(m.path / "unsynced", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, b"x" * 1000)
    open_fds.append(fd)

    m.kill()
    for fd in open_fds:
        try:
            os.close(fd)
        except OSError:
            pass  # the file system is gone
    m.restart()
    for name, digest in digests.items():
        assert sha256(m.path / name) == digest, name


def test_failed_upload_is_never_acknowledged(
    make_cluster: MakeCluster, mount: MountFactory, tmp_path: Path
) -> None:
    """With every keeper down, a write must fail at write, fsync or close: never succeed.

    (Not `echo > file` in a shell: shells ignore close() errors of redirections.)
    """
    cluster = make_cluster(keepers=2, replication=2, chunk_size=1 * MiB)
    # The client retries a tracker that says "no live keepers" for retry_window_s.
    m = mount(cluster, "mnt", "--retry-window-s", "2")
    (m.path / "old").write_bytes(b"old contents")
    local = random_file(tmp_path / "local", 3 * MiB)
    for keeper in cluster.keepers:
        keeper.kill()
    started = time.monotonic()
    result = subprocess.run(
        ["cp", str(local), str(m.path / "new")], capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0, "a copy with no keeper alive was acknowledged"
    assert "Input/output error" in result.stderr or "No space left" in result.stderr, result.stderr
    assert time.monotonic() - started < EIO_BOUND_S
    for sync in (False, True):

        def overwrite(sync: bool = sync) -> None:
            with open(m.path / "old", "r+b") as f:
                f.write(b"new")
                if sync:
                    f.flush()
                    os.fsync(f.fileno())

        assert oserror(overwrite) in ("EIO", "ENOSPC")
    for keeper in cluster.keepers:
        cluster.restart(keeper)
    cluster.wait_alive(2)
    assert (m.path / "old").read_bytes() == b"old contents"
    (m.path / "old").write_bytes(b"written again")
    assert (m.path / "old").read_bytes() == b"written again"
