"""Fixtures for the tests across hosts: dfs clusters spread over network namespaces
(tests/netcluster.py), joined by veth and a bridge, or by the lossy userspace wire
(tests/netlab.py, tests/wire.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.netcluster import NetCluster, net_cluster
from tests.netlab import LOSSY, NetLab
from tests.pg import PgServer


@pytest.fixture(name="net_cluster")
def net_cluster_fixture(tmp_path: Path) -> Iterator[NetCluster]:
    """A tracker and three keepers (replication 2), each on a host of its own, and a client
    host, joined by veth and a bridge; `net_cluster.lab` partitions and heals them."""
    with net_cluster(tmp_path) as cluster:
        yield cluster


@pytest.fixture
def lossy_cluster(tmp_path: Path) -> Iterator[NetCluster]:
    """The same, joined by the userspace wire with the issue's delay and loss."""
    with net_cluster(tmp_path, wire=LOSSY) as cluster:
        yield cluster


# The standby's lease, as in tests/procs/test_failover.py.
LEASE_S = 3.0


@pytest.fixture
def standby_pair(tmp_path: Path) -> Iterator[NetCluster]:
    """PostgreSQL on a host of its own, two trackers on it (the first active, the second
    standing by), three keepers and a client host, each on a host of its own, joined by
    veth and a bridge; as tests/procs/test_failover.py's pair, but across hops."""
    lab = NetLab()
    try:
        db = lab.node("pg")
        server = PgServer(host=db.addr, netns=db.ns, allow=lab.subnet)
        try:
            server.start()
            uri = server.uri(server.new_database())
            with net_cluster(
                tmp_path,
                lab=lab,
                trackers=2,
                tracker_args=["--store", uri, "--lease-s", str(LEASE_S), "--chunk-size",
                              str(4 << 20)],
                dead_after_s=5.0,
            ) as cluster:  # fmt: skip
                yield cluster
        finally:
            server.stop()
    finally:
        lab.close()
