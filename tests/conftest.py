"""Fixtures shared by every test layer."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from cluster.tracker.pgstore import PostgresStore
from cluster.tracker.store import SqliteStore, SqlStore
from tests.cluster_procs import ProcCluster
from tests.pg import PgServer
from tests.stores import crash

# Fuzzing: a bounded run in CI; `make fuzz` selects the long profile.
settings.register_profile("ci", max_examples=150, deadline=None, derandomize=True)
settings.register_profile("fuzz", max_examples=20000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

MakeCluster = Callable[..., ProcCluster]
OpenStore = Callable[[], SqlStore]


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """One real PostgreSQL for the session (started on first use), stopped at its end."""
    try:
        server = PgServer()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_uri(pg_server: PgServer) -> Iterator[str]:
    """A fresh, empty database for this test: its postgresql:// URI."""
    name = pg_server.new_database()
    try:
        yield pg_server.uri(name)
    finally:
        pg_server.drop_database(name)


@pytest.fixture(params=["sqlite", "postgresql"])
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OpenStore]:
    """Opens the metadata store under test, each backend in turn: the same database at every
    call, so a second call is a restart. Connections left open are closed at the end."""
    opened: list[SqlStore] = []
    if request.param == "sqlite":

        def open_sqlite() -> SqlStore:
            opened.append(SqliteStore(tmp_path / "meta.db"))
            return opened[-1]

        yield open_sqlite
    else:
        uri = request.getfixturevalue("pg_uri")

        def open_postgres() -> SqlStore:
            opened.append(PostgresStore(uri))
            return opened[-1]

        yield open_postgres
    for store in opened:
        crash(store)  # a no-op for those closed already


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator[MakeCluster]:
    """A factory of real clusters: `make_cluster(keepers=3, replication=3, ...)`.

    Every process it starts is stopped by PID when the test ends, passed or failed.
    """
    made: list[ProcCluster] = []

    def make(
        keepers: int = 3,
        replication: int = 3,
        chunk_size: int = 8 << 20,
        capacity: int | None = None,
        heartbeat_s: float = 0.5,
        dead_after_s: float = 30.0,
        zones: list[str] | None = None,
        tracker_args: list[str] | None = None,
        keeper_args: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> ProcCluster:
        root = tmp_path / f"cluster{len(made)}"
        root.mkdir()
        cluster = ProcCluster(
            root,
            replication,
            chunk_size,
            heartbeat_s,
            dead_after_s,
            tracker_args=list(tracker_args or []),
            keeper_args=list(keeper_args or []),
            extra_env=dict(env or {}),
        )
        made.append(cluster)
        cluster.start_tracker()
        started = [
            cluster.launch_keeper(capacity=capacity, zone=zones[i] if zones else "")
            for i in range(keepers)
        ]
        for keeper in started:
            keeper.wait_ready()
        cluster.wait_alive(keepers)
        return cluster

    try:
        yield make
    finally:
        for cluster in made:
            cluster.stop()


@pytest.fixture
def cluster(make_cluster: MakeCluster) -> ProcCluster:
    """Three keepers, replication 3."""
    return make_cluster()


def random_file(path: Path, size: int) -> Path:
    """A file of `size` random bytes (written in pieces to bound memory)."""
    with open(path, "wb") as out:
        left = size
        while left:
            n = min(left, 16 << 20)
            out.write(os.urandom(n))
            left -= n
    return path
