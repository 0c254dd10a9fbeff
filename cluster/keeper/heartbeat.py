"""The keeper's link to the tracker: register with the whole inventory, then heartbeat.

Each heartbeat carries free space and the chunks added or removed since the last one, and its
reply carries commands (chunk versions to delete). Whenever the tracker is unreachable or asks
for it (`reregister`, after a tracker restart), the keeper registers again with its full
inventory, so the tracker's soft state is always rebuilt from the truth on disk.

With several trackers (`tracker` lists them), a standby answers NotActive: the keeper goes to
the tracker it names (or, without a name or when a tracker cannot be reached, to the next of
the list) and registers there, so a tracker that takes over hears from every keeper within a
heartbeat or two.
"""

from __future__ import annotations

import logging

import trio

from cluster import messages as m
from cluster import metrics
from cluster.errors import ConnectionLost, DfsError, NotActive
from cluster.keeper.replicator import Replicator
from cluster.keeper.server import KeeperServer
from cluster.rpc import ConnectionPool
from cluster.trackers import Trackers

log = logging.getLogger(__name__)

RETRY_MAX_S = 2.0


# Chunks per RegisterKeeper request: about 1.5 MB of header, inside protocol.MAX_HEADER.
REGISTER_PART = 100_000
# How long one part may wait for the tracker. A tracker that has just taken over checks every
# keeper's inventory at once (minutes of work with millions of chunks); a keeper that gave up
# sooner would start its registration over, and with 30 s they all did, again and again
# (bench/simulate.py, 100 keepers, 10 million chunks). A dead tracker shows as a broken
# connection long before this.
REGISTER_TIMEOUT_S = 600.0


class Heartbeat:
    def __init__(
        self,
        server: KeeperServer,
        replicator: Replicator,
        tracker: str,
        keeper_id: str,
        zone: str,
        heartbeat_s: float,
    ) -> None:
        self.server = server
        self.replicator = replicator
        self.trackers = Trackers(tracker)
        self.keeper_id = keeper_id
        self.zone = zone
        self.heartbeat_s = heartbeat_s
        self.pool = ConnectionPool("keeper", server.credentials)

    @property
    def tracker(self) -> str:
        """The tracker this keeper reports to (the active one, as far as it knows)."""
        return self.trackers.current

    async def run(self) -> None:
        delay = 0.1
        while True:
            try:
                await self._register()
                delay = 0.1
                await self._beat_until_lost()
            except NotActive as exc:
                log.info("tracker %s: %s", self.tracker, exc)
                self.trackers.follow(self.tracker, exc)
                if exc.hint:
                    delay = 0.05  # register with the active tracker at once
            except (DfsError, trio.TooSlowError) as exc:
                log.info("tracker %s unreachable (%s); retrying", self.tracker, exc or "timeout")
                self.pool.drop(self.tracker)
                if isinstance(exc, (ConnectionLost, trio.TooSlowError)):
                    self.trackers.next(self.tracker)
            except Exception:
                # Never let the link to the tracker die of a bug: log it, register again.
                log.exception("heartbeat failed")
                self.pool.drop(self.tracker)
            await trio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_S)

    async def goodbye(self) -> None:
        """Tell the tracker this keeper is stopping on purpose (best effort)."""
        try:
            await self.pool.call(self.tracker, m.Goodbye(keeper_id=self.keeper_id), m.OkReply)
        except DfsError as exc:
            log.info("could not say goodbye to the tracker: %s", exc)

    async def _register(self) -> None:
        store = self.server.store
        # Deltas collected before this point are covered by the full inventory.
        self.server.added.clear()
        self.server.removed.clear()
        held = store.held()
        # In parts: a request's header is bounded (protocol.MAX_HEADER), a disk of chunks not.
        for start in range(0, max(1, len(held)), REGISTER_PART):
            request = m.RegisterKeeper(
                keeper_id=self.keeper_id,
                addr=self.server.addr,
                zone=self.zone,
                capacity_bytes=store.capacity_bytes,
                used_bytes=store.used_bytes,
                chunks=held[start : start + REGISTER_PART],
                continued=start > 0,
            )
            with trio.fail_after(REGISTER_TIMEOUT_S):
                reply, _ = await self.pool.call(self.tracker, request, m.RegisterReply)
        self.heartbeat_s = reply.heartbeat_s or self.heartbeat_s
        log.info("registered with tracker %s (%d chunks)", self.tracker, len(held))

    async def _beat_until_lost(self) -> None:
        while True:
            await trio.sleep(self.heartbeat_s)
            added, self.server.added = self.server.added, []
            removed, self.server.removed = self.server.removed, []
            store = self.server.store
            sent, received = metrics.payload_bytes("keeper")
            request = m.Heartbeat(
                keeper_id=self.keeper_id,
                capacity_bytes=store.capacity_bytes,
                used_bytes=store.used_bytes,
                added=added,
                removed=removed,
                read_bytes=sent,
                written_bytes=received,
            )
            # If this fails the deltas are lost with it: the registration that follows sends
            # the whole inventory.
            with trio.fail_after(max(10.0, self.heartbeat_s * 3)):
                reply, _ = await self.pool.call(self.tracker, request, m.HeartbeatReply)
            if reply.reregister:
                log.info("tracker asked for a new registration")
                return
            for chunk_id, version in reply.delete:
                await self.server.delete(chunk_id, version)
            for command in reply.replicate:
                if len(command) == 4:
                    self.replicator.submit(command)
