"""Opens given back to the tracker in the background, in batches.

Every open on the mount holds an open on the tracker (so that an unlinked file keeps its data
while it is open), and every `release` gives it back. Nobody waits for that answer: close(2)
has returned by the time the kernel sends the release, and a late one only keeps an unlinked
file a moment longer. So a release is queued here and one task sends whatever has gathered
in a single `ReleaseFiles`: a `cp -r` of small files costs one tracker trip per file (the
create) instead of two. Order against later opens does not matter, because the tracker only
counts them. A file created here also gives back, with its release, the placement of chunk 0
that came with the create when nothing was written there (an empty file).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import trio

from cluster.client import Client, Placement
from cluster.errors import DfsError

log = logging.getLogger(__name__)

# Inodes per ReleaseFiles message: bounds the frame and the tracker's time on one request.
BATCH = 1000
# How long releases gather before they are sent: a program closing files one after another
# then costs the tracker one request per this interval rather than one per file.
GATHER_S = 0.05


class ReleaseQueue:
    def __init__(self, client: Client) -> None:
        self.client = client
        self._inos: list[int] = []
        self._unused: list[Placement] = []
        self._queued = trio.Event()
        self._sending = trio.Lock()  # a flush waits for the batch already on its way

    def put(self, ino: int, unused: Sequence[Placement] = ()) -> None:
        """Give back one open of `ino` soon, and the placements it was allocated and never
        wrote with (from its create, spares); never blocks."""
        self._inos.append(ino)
        self._unused.extend(unused)
        self._queued.set()

    async def run(self) -> None:
        """Send releases as they come, until cancelled."""
        while True:
            await self._queued.wait()
            await trio.sleep(GATHER_S)
            self._queued = trio.Event()
            await self.flush()

    async def flush(self) -> None:
        """Send everything queued now. A failure (the tracker unreachable for longer than the
        client's retry window) is logged: the opens are soft state the tracker drops when it
        restarts, which is what a tracker that long gone is doing."""
        async with self._sending:
            await self._send_queued()

    async def _send_queued(self) -> None:
        while self._inos or self._unused:
            batch, self._inos = self._inos[:BATCH], self._inos[BATCH:]
            unused, self._unused = self._unused[:BATCH], self._unused[BATCH:]
            try:
                await self.client.release_files(batch, unused)
            except DfsError as exc:
                # Unused placements left behind are collected by the tracker after gc_grace_s.
                log.warning("could not give back %d opens to the tracker: %s", len(batch), exc)
