"""The mount's read cache: whole chunk versions in a bounded LRU, fetched once however many
readers want them.

Entries are keyed by (chunk_id, version). A chunk version is immutable once written, so an
entry never goes stale; the only thing that changes for a version is its committed `length`
(a truncate shortens it), which is why readers clip what they get to `ChunkInfo.length`
themselves. Freshly uploaded versions are put here too, so that a mount reads back its own
writes without a round trip before (and after) they are committed.

Fetches run in the mount's nursery, not in the task of the reader that asked first: a reader
interrupted by a signal must not cancel the fetch others are waiting for, and read-ahead is
simply a fetch nobody waits for yet.
"""

from __future__ import annotations

import logging
import sys
from collections import OrderedDict
from typing import TypeAlias

import trio

from cluster.client import ChunkInfo, Client
from cluster.errors import DfsError, Unavailable
from cluster.protocol import PAYLOADS

log = logging.getLogger(__name__)

Key: TypeAlias = tuple[int, int]
Data: TypeAlias = bytes | bytearray


class _Fetch:
    __slots__ = ("data", "done", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.data: Data | None = None
        self.error: DfsError | None = None


class ChunkCache:
    def __init__(self, client: Client, nursery: trio.Nursery, limit_bytes: int) -> None:
        self.client = client
        self.nursery = nursery
        self.limit = max(0, limit_bytes)
        self.used = 0
        self._lru: OrderedDict[Key, Data] = OrderedDict()
        self._inflight: dict[Key, _Fetch] = {}

    @staticmethod
    def key(info: ChunkInfo) -> Key:
        return (info.chunk_id, info.version)

    def peek(self, info: ChunkInfo) -> Data | None:
        data = self._lru.get(self.key(info))
        if data is not None:
            self._lru.move_to_end(self.key(info))
        return data

    def put(self, info: ChunkInfo, data: Data) -> None:
        """Remember `data` as the bytes of `info`'s version (the caller stops mutating it).

        The newest entry is always kept, even if it alone is over the limit: with a cache
        smaller than a chunk, every 128 KiB read would otherwise fetch the whole chunk again.
        Memory stays bounded by max(limit, one chunk).
        """
        key = self.key(info)
        old = self._lru.pop(key, None)
        if old is not None:
            self.used -= len(old)
        self._lru[key] = data
        self.used += len(data)
        while self.used > self.limit and len(self._lru) > 1:
            _, evicted = self._lru.popitem(last=False)
            self.used -= len(evicted)
            # Reuse the buffer for the next fetch when nothing else refers to it (no reader
            # holds it or a view of it: the count is this name and getrefcount's argument).
            # A fresh 8 MiB buffer costs a zero-fill, a sixth of the mount's time on a read.
            if isinstance(evicted, bytearray) and sys.getrefcount(evicted) == 2:
                PAYLOADS.give(evicted)

    def cached_or_loading(self, info: ChunkInfo) -> bool:
        key = self.key(info)
        return key in self._lru or key in self._inflight

    async def get(self, info: ChunkInfo) -> Data:
        """The stored bytes of `info` (up to its length when fetched); raises Unavailable if no
        copy can be read (after the client tried every one)."""
        data = self.peek(info)
        if data is not None:
            return data
        fetch = self._start(info)
        await fetch.done.wait()
        if fetch.error is not None:
            raise type(fetch.error)(str(fetch.error))
        assert fetch.data is not None
        return fetch.data

    def prefetch(self, info: ChunkInfo) -> None:
        if not self.cached_or_loading(info):
            self._start(info)

    def _start(self, info: ChunkInfo) -> _Fetch:
        key = self.key(info)
        fetch = self._inflight.get(key)
        if fetch is None:
            fetch = self._inflight[key] = _Fetch()
            self.nursery.start_soon(self._fetch, info, fetch, name=f"fetch {key[0]}v{key[1]}")
        return fetch

    async def _fetch(self, info: ChunkInfo, fetch: _Fetch) -> None:
        key = self.key(info)
        try:
            data = await self.client.read_chunk(info, 0, info.length)
        except DfsError as exc:
            fetch.error = exc
        except Exception as exc:
            # A bug or an unexpected failure in the client: the reader gets EIO, the mount lives.
            log.exception("fetching chunk %d v%d failed", info.chunk_id, info.version)
            fetch.error = Unavailable(f"chunk {info.chunk_id}: {exc!r}")
        else:
            fetch.data = data
            self.put(info, data)
        finally:
            del self._inflight[key]
            fetch.done.set()
