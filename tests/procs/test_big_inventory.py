"""A keeper with more chunks than one request can carry registers in parts, and a tracker
checking a big inventory keeps answering everyone else meanwhile."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import trio

from bench.simulate import SimKeeper, build_store
from cluster import messages as m
from cluster.auth import Credentials
from cluster.errors import DfsError
from cluster.protocol import MAX_HEADER, pack_header
from cluster.rpc import ConnectionPool
from tests.cluster_procs import ProcCluster

CHUNKS = 700_000  # about 4.9 MB of inventory: past MAX_HEADER in one request


def test_a_big_inventory_registers_in_parts(tmp_path: Path) -> None:
    # dead_after_s far away: the healer does not start, so what is timed is the registration.
    cluster = ProcCluster(tmp_path, 1, 8 << 20, 0.5, 3600.0)
    (tmp_path / "tracker").mkdir()
    build_store(tmp_path / "tracker" / "meta.db", CHUNKS)
    inventory = [[c + 1, 1] for c in range(CHUNKS)]
    try:
        cluster.start_tracker()
        credentials = Credentials.from_settings({"secret_file": str(cluster.secret_file)})

        async def run() -> tuple[float, list[float]]:
            pool = ConnectionPool("keeper", credentials)
            big = SimKeeper(0, inventory, pool)
            try:
                whole = m.RegisterKeeper(
                    keeper_id=big.keeper_id,
                    addr=big.addr,
                    zone="",
                    capacity_bytes=1 << 50,
                    used_bytes=0,
                    chunks=inventory,
                )
                assert len(pack_header(whole.to_wire(1))) > MAX_HEADER
                with pytest.raises((DfsError, trio.TooSlowError)):  # one request: refused
                    with trio.fail_after(30):
                        await pool.call(cluster.tracker_addr, whole, m.RegisterReply)
                pool.drop(cluster.tracker_addr)
                # In parts, while another client's pings are answered all along.
                pings: list[float] = []

                async def ping_meanwhile(done: trio.Event) -> None:
                    other = ConnectionPool("client", credentials)
                    try:
                        while not done.is_set():
                            started = time.perf_counter()
                            await other.call(cluster.tracker_addr, m.GetAttr(ino=1), m.AttrReply)
                            pings.append(time.perf_counter() - started)
                            await trio.sleep(0.05)
                    finally:
                        await other.aclose()

                done = trio.Event()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(ping_meanwhile, done)
                    started = time.perf_counter()
                    await big.register(cluster.tracker_addr)
                    took = time.perf_counter() - started
                    done.set()
                return took, pings
            finally:
                await pool.aclose()

        took, pings = trio.run(run)
        assert big_retries_free(took)
        assert pings, "no request was answered while the inventory was checked"
        assert max(pings) < 2.0, f"the tracker stalled for {max(pings):.1f} s"
        # The tracker holds every chunk of the inventory as this keeper's.
        (keeper,) = cluster.status()["keepers"]
        assert keeper["chunks"] == CHUNKS, keeper
    finally:
        cluster.stop()


def big_retries_free(took: float) -> bool:
    """A bound that only catches a hang (speed is measured by bench/simulate.py)."""
    return took < 120
