"""Soft state about keepers: who is alive, what each holds, what each must delete.

Nothing here is persisted. After a tracker restart keepers re-register with their full
inventory and the map is whole again; until then reads of a chunk simply list fewer copies.
`ChunkMap` is the reverse index (chunk id -> keeper -> version) that placement, reads and
deletion use.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field

import trio

log = logging.getLogger(__name__)

KeeperId = str


@dataclass(slots=True)
class KeeperState:
    keeper_id: KeeperId
    addr: str
    zone: str
    capacity_bytes: int
    used_bytes: int
    last_seen: float
    # Bytes placed on this keeper since its last heartbeat: placement counts them as used so a
    # burst of allocations does not all land on the keeper that looked emptiest.
    reserved_bytes: int = 0
    # Chunk versions this keeper must delete, sent with the next heartbeat reply.
    to_delete: set[tuple[int, int]] = field(default_factory=set)
    # Copies this keeper must fetch: [chunk id, version, source addr, digest].
    to_replicate: list[list[object]] = field(default_factory=list)
    # Being decommissioned: gets no new chunks; its copies do not count toward the goal.
    draining: bool = False
    draining_since: float = 0.0  # trio time the drain started (or the tracker saw it again)
    # Said goodbye (stopping for maintenance): gets no new chunks until it registers again.
    leaving: bool = False
    # Chunk bytes the keeper has sent and received since it started (its heartbeats say):
    # the history takes its read and write rates from them.
    read_bytes: int = 0
    written_bytes: int = 0

    def alive(self, now: float, dead_after_s: float) -> bool:
        return now - self.last_seen <= dead_after_s

    @property
    def free_bytes(self) -> int:
        return max(0, self.capacity_bytes - self.used_bytes - self.reserved_bytes)


ChunkKey = tuple[int, int]  # (chunk id, version)


class ChunkMap:
    """Which keeper holds which chunk version. A keeper may hold several versions of one
    chunk id at once (a new version arrives before the old one is deleted), so every entry is
    an exact (chunk id, version)."""

    def __init__(self) -> None:
        self.holders: dict[ChunkKey, set[KeeperId]] = defaultdict(set)
        self.by_keeper: dict[KeeperId, set[ChunkKey]] = defaultdict(set)
        self.versions: dict[int, set[int]] = defaultdict(set)  # chunk id -> versions held

    def add(self, keeper_id: KeeperId, chunk_id: int, version: int) -> None:
        self.holders[(chunk_id, version)].add(keeper_id)
        self.by_keeper[keeper_id].add((chunk_id, version))
        self.versions[chunk_id].add(version)

    def remove(self, keeper_id: KeeperId, chunk_id: int, version: int) -> None:
        key = (chunk_id, version)
        held = self.holders.get(key)
        if held is None:
            return
        held.discard(keeper_id)
        self.by_keeper[keeper_id].discard(key)
        if not held:
            del self.holders[key]
            versions = self.versions[chunk_id]
            versions.discard(version)
            if not versions:
                del self.versions[chunk_id]

    def forget_keeper(self, keeper_id: KeeperId) -> None:
        for chunk_id, version in list(self.by_keeper.get(keeper_id, ())):
            self.remove(keeper_id, chunk_id, version)
        self.by_keeper.pop(keeper_id, None)

    def holders_of(self, chunk_id: int, version: int) -> list[KeeperId]:
        return list(self.holders.get((chunk_id, version), ()))

    def holding_any(self, chunk_id: int) -> set[KeeperId]:
        """Keepers holding some version of `chunk_id`."""
        found: set[KeeperId] = set()
        for version in self.versions.get(chunk_id, ()):
            found |= self.holders.get((chunk_id, version), set())
        return found

    def holds(self, keeper_id: KeeperId, chunk_id: int, version: int) -> bool:
        return keeper_id in self.holders.get((chunk_id, version), ())


class KeeperRegistry:
    def __init__(self, dead_after_s: float, draining: set[KeeperId] | None = None) -> None:
        self.dead_after_s = dead_after_s
        self.keepers: dict[KeeperId, KeeperState] = {}
        self.chunks = ChunkMap()
        self.draining: set[KeeperId] = set(draining or ())

    def by_addr(self, addr: str) -> KeeperState | None:
        for keeper in self.keepers.values():
            if keeper.addr == addr:
                return keeper
        return None

    def live(self) -> list[KeeperState]:
        now = trio.current_time()
        return [k for k in self.keepers.values() if k.alive(now, self.dead_after_s)]

    def writable(self) -> list[KeeperState]:
        """Live keepers that may take new chunks."""
        return [k for k in self.live() if not (k.draining or k.leaving)]

    def find(self, name: str) -> KeeperState | None:
        """A keeper by address or by (a prefix of) its id."""
        found = self.by_addr(name)
        if found is None:
            matches = [k for k in self.keepers.values() if k.keeper_id.startswith(name)]
            found = matches[0] if len(matches) == 1 else None
        return found

    def is_alive(self, keeper_id: KeeperId) -> bool:
        keeper = self.keepers.get(keeper_id)
        return keeper is not None and keeper.alive(trio.current_time(), self.dead_after_s)

    def register(
        self, keeper_id: KeeperId, addr: str, zone: str, capacity: int, used: int
    ) -> KeeperState:
        old = self.keepers.get(keeper_id)
        # Another keeper id at the same address is a keeper whose data dir was replaced.
        for other in [
            k for k in self.keepers.values() if k.addr == addr and k.keeper_id != keeper_id
        ]:
            log.info("keeper %s replaces %s at %s", keeper_id, other.keeper_id, addr)
            self.chunks.forget_keeper(other.keeper_id)
            del self.keepers[other.keeper_id]
        state = KeeperState(keeper_id, addr, zone, capacity, used, trio.current_time())
        state.draining = keeper_id in self.draining
        state.draining_since = state.last_seen
        if old is not None:
            state.to_delete = old.to_delete
        self.keepers[keeper_id] = state
        self.chunks.forget_keeper(keeper_id)
        return state

    def queue_delete(self, chunk_id: int, version: int) -> None:
        """Tell every keeper holding exactly this chunk version to delete it. Never a whole
        chunk id: a newer version of it may be on its way to the same keepers."""
        for keeper_id in self.chunks.holders_of(chunk_id, version):
            keeper = self.keepers.get(keeper_id)
            if keeper is not None:
                keeper.to_delete.add((chunk_id, version))
            self.chunks.remove(keeper_id, chunk_id, version)
