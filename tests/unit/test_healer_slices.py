"""The healer checks a big chunk table a slice a tick (bounded work for the tracker), and
still sees every chunk once a pass: its figures are published when a pass is complete."""

from __future__ import annotations

from pathlib import Path

import trio

from bench.simulate import build_store
from cluster.tracker import healer as healer_module
from cluster.tracker.healer import Healer
from cluster.tracker.keepers import KeeperRegistry
from cluster.tracker.store import SqliteStore

CHUNKS = 2 * healer_module.SCAN_SLICE + 123


def test_a_pass_over_a_big_table_takes_slices_and_misses_nothing(tmp_path: Path) -> None:
    build_store(tmp_path / "meta.db", CHUNKS)
    store = SqliteStore(tmp_path / "meta.db")

    async def run() -> None:
        registry = KeeperRegistry(dead_after_s=60)
        a = registry.register("a" * 32, "127.0.0.1:1", "", 1 << 50, 0)
        b = registry.register("b" * 32, "127.0.0.1:2", "", 1 << 50, 0)
        lonely = CHUNKS - 7  # in the last slice: one copy of two
        for chunk_id in range(1, CHUNKS + 1):
            registry.chunks.add(a.keeper_id, chunk_id, 1)
            if chunk_id != lonely:
                registry.chunks.add(b.keeper_id, chunk_id, 1)
        registry.register("c" * 32, "127.0.0.1:3", "", 1 << 50, 0)  # where a copy can go
        healer = Healer(store, registry, replication=2)
        healer.scan()
        healer.scan()
        # Two slices checked, the pass not over: nothing published yet, nothing copied yet.
        assert healer.health.chunks == 0
        assert not healer.in_flight
        healer.scan()
        assert healer.health.chunks == CHUNKS
        assert healer.health.degraded == 1
        assert healer.health.lost == 0
        assert [chunk for chunk, _ in healer.in_flight] == [lonely]
        # The next pass starts over at the lowest id.
        healer.scan()
        assert healer.health.chunks == CHUNKS

    try:
        trio.run(run)
    finally:
        store.close()
