"""The mount's directory and attribute caches: many lookups in one directory cost a few
listings instead of one tracker trip each, never contradict this mount's own changes, and
expire within the kernel's entry timeout so other mounts' changes show up."""

from __future__ import annotations

import os
import re
import sqlite3
import time
import urllib.request

import pytest

from dfsmount.cache import PLACEMENT_FRESH_S
from tests.cluster_procs import free_port, wait_until
from tests.conftest import MakeCluster
from tests.mount.conftest import MountFactory

pytestmark = pytest.mark.mount


def tracker_requests(port: int) -> dict[str, float]:
    """Requests the tracker answered so far, by message type."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    found = re.findall(
        r'^dfs_request_seconds_count\{role="tracker",type="(\w+)"\} (\S+)$', text, re.M
    )
    return {name: float(count) for name, count in found}


def tracker_lookups(port: int) -> float:
    return tracker_requests(port).get("Lookup", 0.0)


def test_lookups_in_one_directory_are_served_from_its_listing(
    make_cluster: MakeCluster, mount: MountFactory
) -> None:
    port = free_port()
    cluster = make_cluster(tracker_args=["--metrics", f"127.0.0.1:{port}"])
    writer = mount(cluster, "writer")
    (writer.path / "d").mkdir()
    for i in range(200):
        (writer.path / "d" / f"f{i}").write_bytes(b"x" * i)
    reader = mount(cluster, "reader")  # a cold kernel cache: every name is a FUSE lookup
    before = tracker_lookups(port)
    sizes = [os.stat(reader.path / "d" / f"f{i}").st_size for i in range(200)]
    with pytest.raises(FileNotFoundError):
        os.stat(reader.path / "d" / "absent")
    lookups = tracker_lookups(port) - before
    assert sizes == list(range(200))
    assert lookups < 40, f"{lookups} tracker lookups for 201 names"

    # The reader's own changes are never contradicted by its cached listing.
    (reader.path / "d" / "f5").unlink()
    (reader.path / "d" / "f6").rename(reader.path / "d" / "g6")
    (reader.path / "d" / "new").write_bytes(b"12345")
    assert not (reader.path / "d" / "f5").exists()
    assert not (reader.path / "d" / "f6").exists()
    assert os.stat(reader.path / "d" / "g6").st_size == 6
    assert os.stat(reader.path / "d" / "new").st_size == 5

    # Another mount's changes show up once the entry timeout has passed.
    (writer.path / "d" / "late").write_bytes(b"late")
    deadline = time.monotonic() + 5
    while not (reader.path / "d" / "late").exists():
        assert time.monotonic() < deadline, "a name made on another mount never appeared"
        time.sleep(0.1)
    assert (reader.path / "d" / "late").read_bytes() == b"late"


def test_a_create_or_an_unlink_is_one_tracker_request(
    make_cluster: MakeCluster, mount: MountFactory
) -> None:
    """The reply to a create or unlink carries the directory's new attributes, which the
    kernel asks for next, and closes are given back to the tracker in batches."""
    port = free_port()
    cluster = make_cluster(tracker_args=["--metrics", f"127.0.0.1:{port}"])
    fs = mount(cluster, "fs")
    d = fs.path / "d"
    d.mkdir()
    mtime = os.stat(d).st_mtime_ns

    def requests() -> float:
        counts = tracker_requests(port)
        return sum(n for name, n in counts.items() if name not in ("Heartbeat", "RegisterKeeper"))

    before = requests()
    for i in range(100):
        os.close(os.open(d / f"f{i}", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    time.sleep(0.5)  # let the batched releases go out
    created = requests() - before
    # One create each, plus a few lookups and listings and the batched releases; asking for
    # the directory's attributes and releasing one by one would make it 300.
    assert created <= 130, f"{created} tracker requests for 100 creates"
    st = os.stat(d)
    assert st.st_mtime_ns > mtime
    for i in range(3):
        (d / f"sub{i}").mkdir()
    assert os.stat(d).st_nlink == 2 + 3  # the parent's cached attributes follow each change

    before = requests()
    for i in range(100):
        os.unlink(d / f"f{i}")
    unlinked = requests() - before
    assert unlinked <= 130, f"{unlinked} tracker requests for 100 unlinks"
    (d / "sub0").rmdir()
    assert os.stat(d).st_nlink == 2 + 2
    assert sorted(os.listdir(d)) == ["sub1", "sub2"]


def test_a_small_file_needs_no_allocation_or_chunk_list_request(
    make_cluster: MakeCluster, mount: MountFactory
) -> None:
    """A create places the file's chunk 0 in the same trip; an empty file gives that
    placement back with its release, so no allocation is left for the garbage collector.
    An open of a small file brings its chunk list along."""
    port = free_port()
    cluster = make_cluster(tracker_args=["--metrics", f"127.0.0.1:{port}"])
    fs = mount(cluster, "fs")
    files = {fs.path / f"small{i}": os.urandom(100 + 997 * i) for i in range(20)}
    before = tracker_requests(port)
    for path, data in files.items():
        path.write_bytes(data)
    after = tracker_requests(port)
    assert after.get("MakeNode", 0) - before.get("MakeNode", 0) == 20
    assert after.get("CommitChunks", 0) - before.get("CommitChunks", 0) == 20
    assert after.get("AllocateChunk", 0) == before.get("AllocateChunk", 0)
    for i in range(20):
        os.close(os.open(fs.path / f"empty{i}", os.O_CREAT | os.O_WRONLY, 0o644))

    def allocations_left() -> int:
        uri = f"file:{cluster.root / 'tracker' / 'meta.db'}?mode=ro"
        db = sqlite3.connect(uri, uri=True)
        try:
            return int(db.execute("SELECT count(*) FROM allocations").fetchone()[0])
        finally:
            db.close()

    wait_until(lambda: allocations_left() == 0, 10, "unused placements to be given back")

    # A file written long after its create asks for a fresh placement (the tracker may have
    # collected the old one) and gives the old one back.
    late = fs.path / "late"
    with open(late, "wb") as out:
        time.sleep(PLACEMENT_FRESH_S + 0.5)
        out.write(b"late bytes")
    allocations = tracker_requests(port).get("AllocateChunk", 0) - after.get("AllocateChunk", 0)
    assert allocations == 1
    wait_until(lambda: allocations_left() == 0, 10, "the stale placement to be given back")
    files[late] = b"late bytes"
    # Reading a small file: its chunk list comes with the open.
    reader = mount(cluster, "reader")
    before = tracker_requests(port)
    for path, data in files.items():
        assert (reader.path / path.name).read_bytes() == data
    assert all((reader.path / f"empty{i}").stat().st_size == 0 for i in range(20))
    after = tracker_requests(port)
    assert after.get("OpenFile", 0) - before.get("OpenFile", 0) >= len(files)
    assert after.get("GetChunks", 0) == before.get("GetChunks", 0)
