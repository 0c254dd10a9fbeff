"""`dfs du` against walks of the tree: after creates, writes (commits), hard links across
directories, renames of files and directories across directories, truncates down and up,
unlinks (also of a file still open and written), symlinks, FIFOs and rmdir through a real
mount, and again after SIGKILL and restart of the tracker. Two oracles: the namespace walked
through the client library (names, sizes, chunk lists), and `os.walk` of the mount."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.cluster_procs import ProcCluster
from tests.conftest import MakeCluster
from tests.mount.conftest import MountFactory

pytestmark = pytest.mark.mount

MiB = 1 << 20


def du(cluster: ProcCluster, path: str) -> dict[str, Any]:
    totals: dict[str, Any] = json.loads(cluster.dfs("du", "--json", path).stdout)
    return totals


def walk_namespace(cluster: ProcCluster, path: str) -> dict[str, Any]:
    """The totals of `path` counted name by name through the client library."""

    async def walk() -> dict[str, Any]:
        totals: dict[str, Any] = {
            "path": path,
            "files": 0,
            "dirs": 0,
            "bytes": 0,
            "chunks": 0,
            "stored_bytes": 0,
        }
        async with cluster.client() as client:
            todo = [path]
            while todo:
                here = todo.pop()
                totals["dirs"] += 1
                for entry in await client.list_dir(here):
                    child = here.rstrip("/") + "/" + os.fsdecode(entry.name)
                    if entry.attr.is_dir:
                        todo.append(child)
                        continue
                    totals["files"] += 1
                    if entry.attr.is_file:
                        totals["bytes"] += entry.attr.size
                        chunks = (await client.get_chunks(entry.attr.ino)).chunks.values()
                        totals["chunks"] += len(chunks)
                        totals["stored_bytes"] += sum(c.length for c in chunks)
        return totals

    return trio.run(walk)


def walk_mount(root: Path) -> tuple[int, int, int]:
    """(files, directories, bytes) as `find` and `du -l --apparent-size` count them."""
    files, dirs, size = 0, 1, 0
    for _, dirnames, filenames in os.walk(root):
        dirs += len(dirnames)
        files += len(filenames)
    for here, _, filenames in os.walk(root):
        for name in filenames:
            st = os.lstat(os.path.join(here, name))
            if stat.S_ISREG(st.st_mode):
                size += st.st_size
    return files, dirs, size


def check(cluster: ProcCluster, mnt: Path, paths: list[str]) -> None:
    for path in paths:
        totals = du(cluster, path)
        assert totals == walk_namespace(cluster, path), path
        files, dirs, size = walk_mount(mnt / path.lstrip("/"))
        assert (totals["files"], totals["dirs"], totals["bytes"]) == (files, dirs, size), path


def write(path: Path, size: int) -> None:
    with open(path, "wb") as out:
        out.write(os.urandom(size))


def test_du_equals_a_walk_after_a_mix_of_operations(
    make_cluster: MakeCluster, mount: MountFactory
) -> None:
    cluster = make_cluster(keepers=2, replication=2, chunk_size=MiB)
    mnt = mount(cluster).path
    (mnt / "a" / "b").mkdir(parents=True)
    (mnt / "c").mkdir()
    write(mnt / "a" / "f1", 2 * MiB + 500)  # three chunks
    write(mnt / "a" / "b" / "f2", 100_000)
    write(mnt / "c" / "f3", 3 * MiB)
    (mnt / "a" / "b" / "empty").touch()
    write(mnt / "a" / "gone", MiB)
    paths = ["/", "/a", "/a/b", "/c"]
    check(cluster, mnt, paths)

    os.link(mnt / "a" / "f1", mnt / "c" / "f1-link")  # one file, two directories
    os.symlink("f1", mnt / "a" / "sym")
    os.mkfifo(mnt / "c" / "fifo")
    os.rename(mnt / "a" / "b" / "f2", mnt / "c" / "f2")  # a file across directories
    os.rename(mnt / "c" / "f3", mnt / "a" / "b" / "f3")
    os.truncate(mnt / "a" / "b" / "f3", MiB + 5)  # down: chunks dropped, one shortened
    os.truncate(mnt / "a" / "b" / "empty", 3 * MiB)  # up: a hole, no chunk
    with open(mnt / "c" / "f1-link", "r+b") as f:  # a commit through the other name
        f.seek(4 * MiB)
        f.write(b"x" * 1000)
    os.unlink(mnt / "a" / "gone")
    (mnt / "c" / "tmp").mkdir()
    (mnt / "c" / "tmp").rmdir()
    os.rename(mnt / "a" / "b", mnt / "c" / "b")  # a whole directory across directories
    write(mnt / "c" / "b" / "new", 10)
    os.replace(mnt / "c" / "f2", mnt / "c" / "b" / "new")  # replacing a file
    paths = ["/", "/a", "/c", "/c/b"]
    check(cluster, mnt, paths)
    root = du(cluster, "/")
    # a/f1, a/sym, c/f1-link (f1 again: once per name), c/fifo, c/b/f3, c/b/empty, c/b/new
    assert root["files"] == 7
    assert du(cluster, "/c")["bytes"] >= 4 * MiB + 1000  # f1 through its second name

    # A file unlinked while open, then written: it has no name, and counts nowhere.
    with open(mnt / "c" / "held", "wb") as held:
        held.write(os.urandom(MiB))
        held.flush()
        os.fsync(held.fileno())
        before = du(cluster, "/")
        os.unlink(mnt / "c" / "held")
        held.write(os.urandom(2 * MiB))
        held.flush()
        os.fsync(held.fileno())
        after = du(cluster, "/")
        assert after["files"] == before["files"] - 1
        assert after["bytes"] == before["bytes"] - MiB
    check(cluster, mnt, paths)

    # The totals are in the tracker's store: a SIGKILL and a restart keep them.
    assert cluster.tracker is not None
    cluster.restart(cluster.tracker)
    check(cluster, mnt, paths)
    write(mnt / "a" / "after-restart", 2 * MiB)
    check(cluster, mnt, paths)
