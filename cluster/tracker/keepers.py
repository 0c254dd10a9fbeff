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
    # Said goodbye (stopping for maintenance): gets no new chunks until it registers again.
    leaving: bool = False

    def alive(self, now: float, dead_after_s: float) -> bool:
        return now - self.last_seen <= dead_after_s

    @property
    def free_bytes(self) -> int:
        return max(0, self.capacity_bytes - self.used_bytes - self.reserved_bytes)


class ChunkMap:
    """chunk id -> {keeper id: version held}."""

    def __init__(self) -> None:
        self.holders: dict[int, dict[KeeperId, int]] = defaultdict(dict)
        self.by_keeper: dict[KeeperId, dict[int, int]] = defaultdict(dict)

    def add(self, keeper_id: KeeperId, chunk_id: int, version: int) -> None:
        self.holders[chunk_id][keeper_id] = version
        self.by_keeper[keeper_id][chunk_id] = version

    def remove(self, keeper_id: KeeperId, chunk_id: int, version: int | None = None) -> None:
        held = self.holders.get(chunk_id)
        if held is not None and (version is None or held.get(keeper_id) == version):
            held.pop(keeper_id, None)
            if not held:
                del self.holders[chunk_id]
            self.by_keeper[keeper_id].pop(chunk_id, None)

    def forget_keeper(self, keeper_id: KeeperId) -> None:
        for chunk_id in list(self.by_keeper.pop(keeper_id, {})):
            held = self.holders.get(chunk_id)
            if held is not None:
                held.pop(keeper_id, None)
                if not held:
                    del self.holders[chunk_id]

    def holders_of(self, chunk_id: int, version: int | None = None) -> list[KeeperId]:
        held = self.holders.get(chunk_id, {})
        return [k for k, v in held.items() if version is None or v == version]


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
        if old is not None:
            state.to_delete = old.to_delete
        self.keepers[keeper_id] = state
        self.chunks.forget_keeper(keeper_id)
        return state

    def queue_delete(self, chunk_id: int, version: int | None = None) -> None:
        """Tell every keeper holding `chunk_id` (at `version`, or any) to delete it."""
        for keeper_id, held in list(self.chunks.holders.get(chunk_id, {}).items()):
            if version is None or held == version:
                keeper = self.keepers.get(keeper_id)
                if keeper is not None:
                    keeper.to_delete.add((chunk_id, held))
                self.chunks.remove(keeper_id, chunk_id, held)
