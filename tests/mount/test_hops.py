"""The hops a small write takes, read from the processes' own traces (cluster/trace.py).

- A small chunk goes to every copy at once, each keeper told to forward nothing; a big one
  goes down the pipeline, sent once by the writer.
- A synced write after a synced write of the same chunk needs no AllocateChunk: the commit
  came back with a spare next version, and the spares left at close are given back.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections import Counter
from pathlib import Path

from tests.cluster_procs import ProcCluster
from tests.conftest import MakeCluster, random_file
from tests.mount.conftest import MountFactory

SMALL = 200 << 10
BIG = 3 << 20  # past FANOUT_MAX_BYTES


def spans(directory: Path) -> list[tuple[str, str]]:
    """(process role, span name) of every span written so far."""
    found = []
    for path in sorted(directory.glob("*.jsonl")):
        role = path.name.rsplit("-", 1)[0]
        for line in path.read_text().splitlines():
            found.append((role, json.loads(line)[0]))
    return found


def clear(directory: Path) -> None:
    for path in directory.glob("*.jsonl"):
        with open(path, "r+") as f:
            f.truncate(0)


def calls(found: list[tuple[str, str]], role: str, request: str) -> list[str]:
    """The addresses `role` sent `request` to."""
    return [
        name.split(" ")[2]
        for who, name in found
        if who == role and name.startswith(f"call {request} ")
    ]


def served(found: list[tuple[str, str]], role: str, request: str) -> int:
    return sum(1 for who, name in found if who == role and name == f"serve {request}")


def allocations(cluster: ProcCluster) -> int:
    db = sqlite3.connect(f"file:{cluster.root / 'tracker' / 'meta.db'}?mode=ro", uri=True)
    try:
        return int(db.execute("SELECT count(*) FROM allocations").fetchone()[0])
    finally:
        db.close()


def test_small_chunks_go_to_every_copy_at_once_big_ones_down_the_pipeline(
    make_cluster: MakeCluster, tmp_path: Path
) -> None:
    trace = tmp_path / "trace"
    cluster = make_cluster(keepers=3, replication=2, env={"DFS_TRACE": str(trace)})
    small = random_file(tmp_path / "small", SMALL)
    big = random_file(tmp_path / "big", BIG)

    clear(trace)
    cluster.dfs("put", str(small), "/small")
    found = spans(trace)
    sent = calls(found, "dfs", "PutChunk")
    assert len(sent) == 2, found
    assert len(set(sent)) == 2, found
    assert not calls(found, "dfs-keeper", "PutChunk"), "a keeper forwarded a small chunk"
    assert served(found, "dfs-keeper", "PutChunk") == 2

    clear(trace)
    cluster.dfs("put", str(big), "/big")
    found = spans(trace)
    assert len(calls(found, "dfs", "PutChunk")) == 1, found
    assert len(calls(found, "dfs-keeper", "PutChunk")) == 1, "the first keeper did not forward"
    assert served(found, "dfs-keeper", "PutChunk") == 2

    for name, source in (("small", small), ("big", big)):
        out = tmp_path / f"{name}.out"
        cluster.dfs("get", f"/{name}", str(out))
        assert out.read_bytes() == source.read_bytes()
    assert cluster.healthy()


def test_synced_writes_take_a_spare_version_instead_of_allocating(
    make_cluster: MakeCluster, mount: MountFactory, tmp_path: Path
) -> None:
    trace = tmp_path / "trace"
    cluster = make_cluster(keepers=3, replication=2, env={"DFS_TRACE": str(trace)})
    m = mount(cluster)
    block = os.urandom(4096)
    path = m.path / "log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_DSYNC, 0o644)
    try:
        for _ in range(40):  # 160 KiB: past two 64 KiB blocks, so each append is a patch
            os.write(fd, block)
        clear(trace)
        for _ in range(10):
            os.write(fd, block)
        found = spans(trace)
        assert served(found, "dfs-tracker", "CommitChunks") == 10, Counter(found)
        assert served(found, "dfs-tracker", "AllocateChunk") == 0, Counter(found)
        assert len(calls(found, "dfs-mount", "PatchChunk")) == 20  # two copies each
        assert allocations(cluster) == 1  # the spare for the next append
    finally:
        os.close(fd)
    deadline = time.monotonic() + 10
    while allocations(cluster) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert allocations(cluster) == 0, "the spare was not given back at close"
    assert path.read_bytes() == block * 50
    m.unmount()
    m.restart()
    assert path.read_bytes() == block * 50


def test_names_in_a_directory_just_made_here_are_looked_up_locally(
    make_cluster: MakeCluster, mount: MountFactory, tmp_path: Path
) -> None:
    """`tar x` and `cp -r` look up each name before creating it; in a directory this mount
    just made, the answer (no such name, or the file made since) needs no tracker request."""
    trace = tmp_path / "trace"
    cluster = make_cluster(keepers=2, replication=2, env={"DFS_TRACE": str(trace)})
    m = mount(cluster)
    (m.path / "d").mkdir()
    clear(trace)
    for i in range(5):
        assert not (m.path / "d" / f"f{i}").exists()
        (m.path / "d" / f"f{i}").write_bytes(b"x")
        assert (m.path / "d" / f"f{i}").stat().st_size == 1
    found = spans(trace)
    assert served(found, "dfs-tracker", "Lookup") == 0, Counter(found)
    assert served(found, "dfs-tracker", "MakeNode") == 5
    assert sorted(os.listdir(m.path / "d")) == [f"f{i}" for i in range(5)]
