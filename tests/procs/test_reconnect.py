"""Servers that come back are used again: a pooled connection to a keeper that restarted is
not (the keeper is alive and must not look dead to a client or a forwarding keeper that
talked to it before), and a read right after a tracker restart waits for the keepers."""

from __future__ import annotations

import filecmp
import signal
import subprocess
import time
from pathlib import Path

import pytest

from cluster import messages as m
from cluster.auth import Credentials
from cluster.errors import NotFound
from cluster.rpc import ConnectionPool
from tests.cluster_procs import BIN, ProcCluster
from tests.conftest import random_file


async def test_a_restarted_keeper_is_reached_again(cluster: ProcCluster) -> None:
    keeper = cluster.keepers[0]
    credentials = Credentials.from_settings(
        {"secret_file": str(cluster.secret_file), "tls_ca": "", "tls_cert": "", "tls_key": ""}
    )
    pool = ConnectionPool("client", credentials)
    try:
        await pool.call(keeper.addr, m.Ping(), m.Pong)
        cluster.restart(keeper)  # the pooled connection's peer is gone, the keeper is back
        for _ in range(3):
            reply, _ = await pool.call(keeper.addr, m.Ping(), m.Pong)
            assert isinstance(reply, m.Pong)
    finally:
        await pool.aclose()


def test_get_right_after_a_tracker_restart_waits_for_the_keepers(
    cluster: ProcCluster, tmp_path: Path
) -> None:
    """The restarted tracker knows no copy until the keepers report: `dfs get` waits for them
    (bounded by io_timeout_s) instead of failing at once."""
    data = random_file(tmp_path / "data", 3 << 20)
    cluster.dfs("put", str(data), "/f")
    assert cluster.tracker is not None
    for keeper in cluster.keepers:
        keeper.signal(signal.SIGSTOP)  # they cannot report to the new tracker yet
    try:
        cluster.restart(cluster.tracker)
        get = subprocess.Popen(
            [
                str(BIN / "dfs"),
                "--tracker",
                cluster.tracker_addr,
                "get",
                "/f",
                str(tmp_path / "out"),
            ],
            env=cluster.env,
            stderr=subprocess.PIPE,
        )
        time.sleep(2)
        assert get.poll() is None, "dfs get gave up before the keepers could report"
    finally:
        for keeper in cluster.keepers:
            keeper.signal(signal.SIGCONT)
    assert get.wait(timeout=60) == 0, get.stderr.read() if get.stderr else ""
    assert filecmp.cmp(data, tmp_path / "out", shallow=False)


async def test_a_refused_request_keeps_its_connection(cluster: ProcCluster) -> None:
    """A request the peer answers with an error (no such name) leaves the connection good:
    closing it made every failed lookup of a `cp`, `tar` or `git` pay for a new connection
    and handshake."""
    credentials = Credentials.from_settings(
        {"secret_file": str(cluster.secret_file), "tls_ca": "", "tls_cert": "", "tls_key": ""}
    )
    pool = ConnectionPool("client", credentials)
    try:
        await pool.call(cluster.tracker_addr, m.Ping(), m.Pong)
        (first,) = pool._idle[cluster.tracker_addr]
        for _ in range(3):
            with pytest.raises(NotFound):
                await pool.call(
                    cluster.tracker_addr, m.Lookup(parent=1, name=b"missing"), m.AttrReply
                )
            assert pool._idle[cluster.tracker_addr] == [first]
            assert not first.broken
    finally:
        await pool.aclose()
