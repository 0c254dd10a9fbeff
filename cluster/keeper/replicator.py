"""Copies chunks from other keepers when the tracker asks (re-replication, draining).

The copy is fetched whole from the source keeper and checked twice before it is stored: the
checksum list must match the digest the tracker holds for that version, and every block must
match its checksum. A failed copy is only logged: the tracker re-issues commands that do not
turn into a reported chunk in time. Concurrency and bandwidth are bounded so that repair never
starves client traffic.
"""

from __future__ import annotations

import logging

import trio

from cluster import checksum
from cluster import messages as m
from cluster.errors import ChecksumMismatch, DfsError
from cluster.keeper.server import KeeperServer
from cluster.protocol import PAYLOADS

log = logging.getLogger(__name__)

COPY_TIMEOUT_S = 60.0


class Replicator:
    def __init__(self, server: KeeperServer, rate_mb_s: float, concurrency: int = 2) -> None:
        self.server = server
        self.rate_bytes_s = max(1.0, rate_mb_s) * 1e6
        self.slots = trio.Semaphore(concurrency)
        self.queued: set[tuple[int, int]] = set()
        self._send, self._receive = trio.open_memory_channel[list[object]](10000)

    def submit(self, command: list[object]) -> None:
        chunk_id, version = command[0], command[1]
        key = (int(chunk_id), int(version))  # type: ignore[call-overload]
        if key in self.queued or key in self.server.store.chunks:
            return
        try:
            self._send.send_nowait(command)
            self.queued.add(key)
        except trio.WouldBlock:
            log.warning("replication queue full; dropping a copy command")

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            async for command in self._receive:
                await self.slots.acquire()
                nursery.start_soon(self._copy_one, command)

    async def _copy_one(self, command: list[object]) -> None:
        chunk_id, version, source, digest = command
        assert isinstance(chunk_id, int)
        assert isinstance(version, int)
        try:
            started = trio.current_time()
            with trio.fail_after(COPY_TIMEOUT_S):
                reply, data = await self.server.peers.call(
                    str(source), m.ReadChunk(chunk_id=chunk_id, version=version), m.ReadChunkReply
                )
                if checksum.digest(reply.checksums) != digest:
                    raise ChecksumMismatch("checksums do not match the tracker's digest")
                if len(data) != reply.length_bytes:
                    raise ChecksumMismatch("short copy")
                await self.server.store.write(chunk_id, version, data, reply.checksums)
            self.server.added.append([chunk_id, version])
            PAYLOADS.give(data)
            log.info("copied chunk %d v%d from %s", chunk_id, version, source)
            # Bandwidth bound: a copy of n bytes takes at least n / rate seconds.
            await trio.sleep_until(started + len(data) / self.rate_bytes_s)
        except (DfsError, trio.TooSlowError, OSError) as exc:
            log.warning(
                "copy of chunk %d v%d from %s failed: %s",
                chunk_id,
                version,
                source,
                exc or "timeout",
            )
        except Exception:
            # A bug must not take the keeper down: the tracker will order the copy again.
            log.exception("copy of chunk %d v%d from %s failed", chunk_id, version, source)
        finally:
            self.queued.discard((chunk_id, version))
            self.slots.release()
