"""A pooled connection to a keeper that restarted is not used again: the restarted keeper is
alive, and must not look dead to a client or a forwarding keeper that talked to it before."""

from __future__ import annotations

from cluster import messages as m
from cluster.auth import Credentials
from cluster.rpc import ConnectionPool
from tests.cluster_procs import ProcCluster


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
