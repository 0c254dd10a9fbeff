"""The mount's directory and attribute caches: many lookups in one directory cost a few
listings instead of one tracker trip each, never contradict this mount's own changes, and
expire within the kernel's entry timeout so other mounts' changes show up."""

from __future__ import annotations

import os
import re
import time
import urllib.request

import pytest

from tests.cluster_procs import free_port
from tests.conftest import MakeCluster
from tests.mount.conftest import MountFactory

pytestmark = pytest.mark.mount


def tracker_lookups(port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    match = re.search(
        r'^dfs_request_seconds_count\{role="tracker",type="Lookup"\} (\S+)$', text, re.M
    )
    return float(match[1]) if match else 0.0


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
