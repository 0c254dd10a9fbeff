"""The tracker on PostgreSQL (tracker key `store`), as real processes: a real PostgreSQL, a
`dfs-tracker --store postgresql://...` and keepers."""

from __future__ import annotations

import filecmp
from pathlib import Path

from tests.cluster_procs import ProcCluster
from tests.conftest import MakeCluster, random_file
from tests.pg import PgServer

MiB = 1 << 20


def _get_same(cluster: ProcCluster, remote: str, local: Path, tmp: Path) -> None:
    out = tmp / "out"
    cluster.dfs("get", remote, str(out))
    assert filecmp.cmp(local, out, shallow=False), remote
    out.unlink()


def test_tracker_on_postgresql_survives_sigkill(
    make_cluster: MakeCluster, pg_server: PgServer, pg_uri: str, tmp_path: Path
) -> None:
    cluster = make_cluster(
        keepers=3, replication=2, chunk_size=1 * MiB, tracker_args=["--store", pg_uri]
    )
    assert cluster.tracker is not None
    files = {
        "/big": random_file(tmp_path / "big", 5 * MiB + 123),
        "/dir/small": random_file(tmp_path / "small", 1000),
    }
    cluster.dfs("mkdir", "/dir")
    for remote, local in files.items():
        cluster.dfs("put", str(local), remote)
    for remote, local in files.items():
        _get_same(cluster, remote, local, tmp_path)
    assert cluster.healthy()
    assert "metadata in PostgreSQL at" in cluster.tracker.logs()
    assert not (cluster.tracker.data_dir / "meta.db").exists()  # nothing went to SQLite

    # SIGKILL, and back on the same database, this time through its Unix socket.
    database = pg_uri.rsplit("/", 1)[1]
    argv = cluster.tracker.argv
    argv[argv.index("--store") + 1] = pg_server.socket_uri(database)
    cluster.restart(cluster.tracker)
    cluster.wait_alive(3)
    listing = cluster.dfs("ls", "/").stdout
    assert "big" in listing
    assert "small" in cluster.dfs("ls", "/dir").stdout
    for remote, local in files.items():
        _get_same(cluster, remote, local, tmp_path)
    # The unclean stop made the ids jump: a new file still works, and all is healthy.
    cluster.dfs("put", str(files["/dir/small"]), "/after")
    _get_same(cluster, "/after", files["/dir/small"], tmp_path)
    assert cluster.healthy()


def test_calls_wait_through_a_postgresql_restart(
    make_cluster: MakeCluster, pg_server: PgServer, pg_uri: str, tmp_path: Path
) -> None:
    """pg_ctl restart cuts the tracker's connection: the calls that meet it are answered
    "metadata database unreachable", which clients retry until the tracker has reconnected."""
    cluster = make_cluster(
        keepers=2, replication=2, chunk_size=1 * MiB, tracker_args=["--store", pg_uri]
    )
    assert cluster.tracker is not None
    before = random_file(tmp_path / "before", 3 * MiB)
    cluster.dfs("put", str(before), "/before")
    pg_server.restart()
    after = random_file(tmp_path / "after", 3 * MiB + 1)
    cluster.dfs("put", str(after), "/after")  # its first call finds the connection gone
    _get_same(cluster, "/before", before, tmp_path)
    _get_same(cluster, "/after", after, tmp_path)
    assert cluster.tracker.running
    assert "metadata database unreachable" in cluster.tracker.logs()
    assert "reconnected to the metadata database" in cluster.tracker.logs()
    assert cluster.healthy()
