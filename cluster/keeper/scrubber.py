"""Background scrub: re-read every chunk at a bounded rate and drop copies that fail their
checksums.

A bad copy is deleted and reported as removed in the next heartbeat; the tracker then sees the
chunk below its goal and copies a good one back. The rate (`scrub_rate_mb_s`) is the scrubber's
own budget, apart from repair and client traffic; a rate of 0 turns scrubbing off.
"""

from __future__ import annotations

import logging

import trio

from cluster.keeper.server import KeeperServer

log = logging.getLogger(__name__)

IDLE_S = 5.0  # pause between passes, and the wait when there is nothing to scrub


class Scrubber:
    def __init__(self, server: KeeperServer, rate_mb_s: float) -> None:
        self.server = server
        self.rate_bytes_s = rate_mb_s * 1e6
        self.checked = 0
        self.bad = 0

    async def run(self) -> None:
        if self.rate_bytes_s <= 0:
            log.info("scrubbing is off (scrub_rate_mb_s = 0)")
            return
        while True:
            for (chunk_id, version), size in sorted(self.server.store.chunks.items()):
                if (chunk_id, version) not in self.server.store.chunks:
                    continue  # deleted since the pass started
                started = trio.current_time()
                try:
                    ok = await trio.to_thread.run_sync(self.server.store.verify, chunk_id, version)
                except Exception:
                    # The scrubber must never take the keeper down with it.
                    log.exception("scrub: checking chunk %d v%d failed", chunk_id, version)
                    continue
                self.checked += 1
                if not ok and (chunk_id, version) in self.server.store.chunks:
                    self.bad += 1
                    log.warning(
                        "scrub: chunk %d v%d is corrupt; dropping this copy", chunk_id, version
                    )
                    await self.server.delete(chunk_id, version)
                await trio.sleep_until(started + size / self.rate_bytes_s)
            await trio.sleep(IDLE_S)
