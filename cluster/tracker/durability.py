"""When the tracker's commits reach the disk: group commit on demand, and at least once a second.

A commit is safe from SIGKILL at once (store.py); `GroupSync.sync` makes everything committed
before the call safe from power loss too, with one fsync of the WAL in a worker thread. While
one fsync runs, other requests go on committing, and every caller that arrives meanwhile is
served by the next single fsync: with many writers, one fsync covers many commits, as in the
group commit of HDFS's edit log.

Who waits for it: a chunk commit (the mount's close and fsync, `dfs put`), an explicit `Sync`
(fsync of a file with nothing to commit, fsyncdir), a chunk version that replaces a stored one,
and a heartbeat reply that tells a keeper to delete chunks: a keeper must never drop data that
a power loss could bring a name back for.

A store whose commits are durable when COMMIT returns (PostgreSQL, `durable_at_commit`) is never
behind: `sync` returns at once and counts no fsync.
"""

from __future__ import annotations

import logging

import trio

from cluster import trace
from cluster.tracker.store import MetadataStore

log = logging.getLogger(__name__)

# Commits are made durable at least this often even when nobody asks.
BACKGROUND_SYNC_S = 1.0


class GroupSync:
    def __init__(self, store: MetadataStore) -> None:
        self.store = store
        self._synced = store.changes()  # the store syncs what it did at start-up itself
        self._lock = trio.Lock()
        self.syncs = 0  # fsyncs done, for tests and metrics

    @property
    def behind(self) -> bool:
        """Are there commits not yet on the disk?"""
        return not self.store.durable_at_commit and self.store.changes() != self._synced

    async def sync(self) -> None:
        """Return once every commit made before this call is on the disk."""
        if self.store.durable_at_commit:
            return  # on the disk since COMMIT returned
        wanted = self.store.changes()
        async with self._lock:
            # Marks are compared for equality only: SQLite's change count is 32 bits and wraps.
            # A mark that moved past `wanted` costs one fsync more, never one fewer.
            if self._synced == wanted:
                return  # an fsync that started after our commits already covered them
            mark = self.store.changes()
            # Cancellation must not leave a half-known state: the fsync either ran or not,
            # and the mark only moves once it returned.
            with trace.span("wal fsync (with the thread hop)"):
                await trio.to_thread.run_sync(self.store.sync_to_disk, abandon_on_cancel=False)
            self._synced = mark
            self.syncs += 1

    async def run(self) -> None:
        """Keep the disk at most BACKGROUND_SYNC_S behind the commits."""
        while True:
            await trio.sleep(BACKGROUND_SYNC_S)
            if self.behind:
                try:
                    await self.sync()
                except OSError:
                    log.exception("could not sync the metadata to disk")
