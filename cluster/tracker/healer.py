"""Keeps every chunk at its goal: re-replicates what is missing, trims what is extra, and
collects chunk versions that were allocated but never committed.

The healer is a periodic scan of the chunk table against the keepers' reports (soft state in
`KeeperRegistry`), SCAN_SLICE chunks a tick in chunk id order: a small cluster is scanned
whole every tick, and a big one (millions of chunks) costs the tracker a bounded slice of
work a second instead of stalling it for a whole scan; `health` is published at the end of
each pass over the table. Commands travel in heartbeat replies: `to_replicate` on the keeper that
must fetch a copy (from a live holder, keeper to keeper), `to_delete` on the one that must drop
one. Chunks with the fewest live copies are repaired first; at most `per_keeper` copies are in
flight per target keeper, and a command that does not show up as a new copy within
`copy_timeout_s` is issued again, possibly elsewhere.

After the tracker starts, the healer waits `dead_after_s` before acting: until every live keeper
has re-registered, missing reports mean "not heard from yet", not "lost". A restart is not a
death.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import trio

from cluster.tracker import placement
from cluster.tracker.keepers import KeeperId, KeeperRegistry, KeeperState
from cluster.tracker.store import MetadataStore

log = logging.getLogger(__name__)

# Chunks checked per tick (interval_s): about 0.1 s of the tracker's time on this machine.
SCAN_SLICE = 50_000


@dataclass(slots=True)
class Health:
    chunks: int = 0
    degraded: int = 0  # fewer live copies than the goal
    lost: int = 0  # no live copy at all
    excess: int = 0  # more copies than the goal
    copies_in_flight: int = 0
    copies_done: int = 0
    bytes_copied: int = 0
    scanned_at: float = float("-inf")  # trio time of the scan that produced these figures
    # keeper id -> chunks whose only goal-meeting copies include that draining keeper
    drain_left: dict[KeeperId, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return {
            "chunks": self.chunks,
            "degraded": self.degraded,
            "lost": self.lost,
            "excess": self.excess,
            "copies_in_flight": self.copies_in_flight,
            "copies_done": self.copies_done,
            "bytes_copied": self.bytes_copied,
        }


class Healer:
    def __init__(
        self,
        store: MetadataStore,
        registry: KeeperRegistry,
        replication: int,
        *,
        interval_s: float = 1.0,
        startup_grace_s: float = 30.0,
        per_keeper: int = 4,
        copy_timeout_s: float = 60.0,
        gc_grace_s: float = 3600.0,
    ) -> None:
        self.store = store
        self.registry = registry
        self.replication = replication
        self.interval_s = interval_s
        self.startup_grace_s = startup_grace_s
        self.per_keeper = per_keeper
        self.copy_timeout_s = copy_timeout_s
        self.gc_grace_s = gc_grace_s
        self.health = Health()
        self._pass: Health | None = None  # the figures of the pass under way
        self._cursor = 0  # the last chunk id the pass under way has checked
        # (chunk id, target keeper) -> deadline of the copy command
        self.in_flight: dict[tuple[int, KeeperId], float] = {}

    async def run(self) -> None:
        await trio.sleep(self.startup_grace_s)
        while True:
            self.scan()
            await trio.sleep(self.interval_s)

    def copy_arrived(self, keeper_id: KeeperId, chunk_id: int, length: int) -> None:
        if self.in_flight.pop((chunk_id, keeper_id), None) is not None:
            self.health.copies_done += 1
            self.health.bytes_copied += length

    def scan(self) -> None:
        """Check the next slice of chunks (a new pass starts over at the lowest id)."""
        now = trio.current_time()
        self.in_flight = {key: t for key, t in self.in_flight.items() if t > now}
        if self._pass is None:
            self._collect_allocations()
            self._pass = Health(scanned_at=now)  # a pass that started now
        health = self._pass
        live = {k.keeper_id: k for k in self.registry.live()}
        pending_by_chunk: dict[int, int] = {}
        pending_by_keeper: dict[KeeperId, int] = {}
        for chunk_id, keeper_id in self.in_flight:
            pending_by_chunk[chunk_id] = pending_by_chunk.get(chunk_id, 0) + 1
            pending_by_keeper[keeper_id] = pending_by_keeper.get(keeper_id, 0) + 1
        needs: list[tuple[int, int, int, int, int, list[KeeperState]]] = []
        rows = self.store.chunk_goals_after(self._cursor, SCAN_SLICE)
        for chunk_id, version, length, wanted in rows:
            goal = wanted or self.replication
            health.chunks += 1
            holders = [
                live[h] for h in self.registry.chunks.holders_of(chunk_id, version) if h in live
            ]
            counted = [k for k in holders if not k.draining]
            if not holders:
                health.lost += 1
                continue
            if len(counted) < goal:
                health.degraded += 1
                for k in holders:
                    if k.draining:
                        health.drain_left[k.keeper_id] = health.drain_left.get(k.keeper_id, 0) + 1
                missing = goal - len(counted) - pending_by_chunk.get(chunk_id, 0)
                if missing > 0:
                    needs.append((len(counted), chunk_id, version, length, missing, holders))
            elif len(counted) > goal and chunk_id not in pending_by_chunk:
                health.excess += 1
                self._trim(chunk_id, version, counted, goal)
        needs.sort(key=lambda need: need[0])
        for _, chunk_id, version, length, missing, holders in needs:
            self._replicate(chunk_id, version, length, missing, holders, pending_by_keeper)
        if len(rows) == SCAN_SLICE:
            self._cursor = rows[-1][0]
            return
        health.copies_in_flight = len(self.in_flight)
        health.copies_done = self.health.copies_done
        health.bytes_copied = self.health.bytes_copied
        self.health = health
        self._pass, self._cursor = None, 0

    def _replicate(
        self,
        chunk_id: int,
        version: int,
        length: int,
        missing: int,
        holders: list[KeeperState],
        pending_by_keeper: dict[KeeperId, int],
    ) -> None:
        holding = self.registry.chunks.holding_any(chunk_id)
        candidates = [
            k
            for k in self.registry.writable()
            if k.keeper_id not in holding
            and pending_by_keeper.get(k.keeper_id, 0) < self.per_keeper
        ]
        # Zones already holding a copy count as used, so new copies go to other zones first.
        present = [k for k in holders if not k.draining]
        targets = placement.choose_more(present, candidates, missing, length)
        digest = self._digest(chunk_id, version)
        if digest is None:
            return
        deadline = trio.current_time() + self.copy_timeout_s
        for i, target in enumerate(targets):
            source = holders[i % len(holders)]
            target.to_replicate.append([chunk_id, version, source.addr, digest])
            self.in_flight[(chunk_id, target.keeper_id)] = deadline
            pending_by_keeper[target.keeper_id] = pending_by_keeper.get(target.keeper_id, 0) + 1
            log.info("copy chunk %d v%d from %s to %s", chunk_id, version, source.addr, target.addr)

    def _digest(self, chunk_id: int, version: int) -> int | None:
        row = self.store.chunk_by_id(chunk_id)
        return row.digest if row is not None and row.version == version else None

    def _trim(self, chunk_id: int, version: int, holders: list[KeeperState], goal: int) -> None:
        keep = {k.keeper_id for k in placement.choose(holders, goal, 0)}
        for keeper in holders:
            if keeper.keeper_id not in keep:
                log.info("trim chunk %d v%d on %s", chunk_id, version, keeper.addr)
                keeper.to_delete.add((chunk_id, version))
                self.registry.chunks.remove(keeper.keeper_id, chunk_id, version)

    def _collect_allocations(self) -> None:
        expired = self.store.expired_allocations(time.time_ns() - int(self.gc_grace_s * 1e9))
        if not expired:
            return
        with self.store.transaction():
            for chunk_id, version in expired:
                self.store.remove_allocation(chunk_id, version)
        for chunk_id, version in expired:
            self.registry.queue_delete(chunk_id, version)
        log.info("collected %d chunk versions that were never committed", len(expired))
