"""File data on the mount: chunk-aligned write buffers, background uploads, commits and reads.

One `FileState` per inode that is open on this mount, shared by all its handles (created at
the first open, dropped after the last release). It holds:

- `size`, `mtime_ns`: this mount's view, which runs ahead of the tracker while writes are
  unflushed (getattr reports it then);
- `remote`: the committed chunk map (index -> ChunkInfo) as last fetched, None until needed;
- `dirty`: index -> ChunkBuffer accepting writes;
- `uploading`: index -> _Upload, a buffer being stored as a new chunk version;
- `pending`: index -> ChunkInfo stored on the keepers but not yet committed;
- `unsynced`: index -> ChunkInfo stored without fsync (by a background upload or a close) and
  not yet synced; `sync_known` says whether that list is complete (a file created here, or
  one whose earlier state left its list behind) or whether a sync must ask the keepers about
  every chunk of the file.

Durability follows DESIGN.md's two levels: `flush(sync=False)` (close) returns once every
chunk is written into its keepers' files and the tracker has committed the list;
`flush(sync=True)` (fsync, O_SYNC/O_DSYNC writes, close with `sync_on_close`) also has the
keepers fsync every chunk of the file not yet synced and the tracker fsync its WAL.

The newest version of chunk i is `pending[i]`, else `remote[i]`; a dirty or uploading buffer of
chunk i lies over it.

Concurrency protocol (trio tasks interleave only at `await`s):

- A chunk index is in at most one of `dirty` / `uploading`. Moving a buffer from `dirty` to
  `uploading` (`start_upload`) is synchronous. A write to an index that is uploading waits for
  that upload to finish, so a new buffer for it is always based on the newest version and the
  bytes being uploaded are never mutated.
- An upload merges the base version into its buffer (when its writes do not cover the chunk),
  stores it with `write_chunk`, then, without awaiting, records it in `pending`, removes it
  from `uploading`, gives its bytes back to the `DirtyBudget` and sets its `done` event.
- `flush` (and `fsync`, `release`, and a truncate or utimens of an open file) holds
  `FileState.lock`: it starts an upload of every dirty buffer, waits for the uploads that
  exist at that moment, then commits `pending` and the size in one tracker transaction.
  Writes are not locked out: what they add meanwhile is left for the next flush.
- A failed upload sets `error`, which is sticky until the state is dropped: later writes and
  every flush/fsync/close fail with its errno (EIO, or ENOSPC when no keeper has room), and
  nothing more is committed. What has not been stored is never acknowledged.
- Reads take the newest bytes: from a buffer when its writes cover the range, else the base
  version from the `ChunkCache` with the buffer's writes laid over it. Zeros in holes and past
  a chunk's length, nothing past `size`.
- Writers charge the bytes they add to the mount-wide `DirtyBudget`; when it is exhausted they
  wait, after asking `DataCache.relieve_pressure` to upload the oldest dirty buffers if the
  uploads already running would not free enough.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import trio

from cluster.client import Attr, ChunkInfo, Client, FileChunks, Placement
from cluster.errors import DfsError, LockFenced, LockGrace, Unavailable
from cluster.locks import OpenMark
from dfsmount import patches
from dfsmount.buffers import ChunkBuffer, DirtyBudget
from dfsmount.chunkcache import ChunkCache

log = logging.getLogger(__name__)
T = TypeVar("T")

Readable = bytes | bytearray | memoryview

# How far ahead of a sequential reader chunks are fetched (capped by a quarter of the cache).
READAHEAD_BYTES = 32 << 20
# How long the placement that came with a create is used for the file's chunk 0; an older one
# is given back at release (a file written long after its create asks for a new one), far
# inside any sensible gc_grace_s of the tracker, after which it could be collected.
PLACEMENT_FRESH_S = 10.0
# A truncate or utimens of a file being written flushes first; writes racing with that flush
# (only possible through mmap write-back) get this many more flushes before we go ahead.
FLUSH_ROUNDS = 3
# How long a commit waits before asking again a tracker that waits for our lock reclaims.
GRACE_RETRY_S = 0.2
# How often a chunk map is asked for again when a commit made here overtook it.
MAP_LOAD_TRIES = 3
# How often a read of a chunk whose copies the tracker does not know yet asks again.
NO_COPY_RETRY_S = 0.5
# Closed inodes whose unsynced chunks are remembered for a later fsync; past this, an fsync of
# a reopened file asks its keepers to sync all its chunks.
UNSYNCED_MEMORY = 4096
# Zeros written by fallocate's punch hole and zero range at the partial chunks of a range.
_ZEROS = memoryview(bytes(1 << 20))


def _copy(error: DfsError) -> DfsError:
    """A fresh exception of the same type: one stored error is raised in many tasks."""
    return type(error)(str(error))


class _Upload:
    __slots__ = ("buffer", "done", "sync")

    def __init__(self, buffer: ChunkBuffer, sync: bool) -> None:
        self.buffer = buffer
        self.sync = sync  # fsynced on the keepers (started by an fsync's flush)
        self.done = trio.Event()


class FileState:
    """The data of one open inode; see the module docstring for the protocol."""

    def __init__(self, cache: DataCache, attr: Attr) -> None:
        self.cache = cache
        self.ino = attr.ino
        self.size = attr.size
        self.mtime_ns = attr.mtime_ns
        self.chunk_size = 0
        self.remote: dict[int, ChunkInfo] | None = None
        self.dirty: dict[int, ChunkBuffer] = {}
        self.uploading: dict[int, _Upload] = {}
        self.pending: dict[int, ChunkInfo] = {}
        self.unsynced: dict[int, ChunkInfo] = {}
        self.sync_known = False
        self.recent: dict[int, patches.Recent] = {}  # what the last patch of a chunk sent
        self.writes = 0  # writes accepted so far
        self.committed_writes = 0  # writes covered by the last commit
        # Where chunk 0 of a file this mount just created goes (allocated with the create),
        # and when it came: the tracker collects allocations left unused for gc_grace_s.
        self.first_chunk: Placement | None = None
        self.first_chunk_at = 0.0
        # After a synced commit, a next version of each chunk committed, allocated on its
        # holders (see `_flush_locked`): index -> (the version it follows, the spare, when).
        self.spares: dict[int, tuple[tuple[int, int], Placement, float]] = {}
        self.unused_spares: list[Placement] = []  # to give back at release
        self.error: DfsError | None = None
        self.error_reported = False  # `error` was raised to some caller (flush, write)
        # Set when this mount's locks on the file were lost (`fence`): writes fail with it
        # until the opens this state serves have closed.
        self.fenced: LockFenced | None = None
        # The mark of the open that made this state, carried by its writes (the tracker
        # refuses them once this mount's locks on the file were lost after that open).
        self.opened: OpenMark | None = None
        self._loss_unreported = False  # writes were dropped by the fence; nobody told yet
        self._map_stale = False  # `remote` and `size` must come from the tracker again
        self._map_changes = 0  # commits, truncates and punches made here (see `_load_map`)
        self.lock = trio.Lock()
        self._map_lock = trio.Lock()

    # --- state ----------------------------------------------------------------------------

    @property
    def has_local_changes(self) -> bool:
        return (
            self.writes != self.committed_writes
            or bool(self.dirty)
            or bool(self.uploading)
            or bool(self.pending)
        )

    def local_attrs(self) -> tuple[int, int] | None:
        """(size, mtime_ns) to report instead of the tracker's while writes are unflushed."""
        return (self.size, self.mtime_ns) if self.has_local_changes else None

    def adopt(self, attr: Attr) -> bool:
        """Take the tracker's fresh `attr` (at open) unless writes are unflushed here.

        Returns True if the file changed since this state last saw it; its chunk map is then
        fetched again before the next read.
        """
        if self.has_local_changes or (attr.size, attr.mtime_ns) == (self.size, self.mtime_ns):
            return False
        self.size, self.mtime_ns = attr.size, attr.mtime_ns
        self.remote = None
        return True

    def latest(self, index: int) -> ChunkInfo | None:
        """The newest stored version of chunk `index` (None: a hole)."""
        info = self.pending.get(index)
        if info is None and self.remote is not None:
            info = self.remote.get(index)
        return info

    def offer_map(self, chunks: FileChunks) -> None:
        """Take the chunk list that came with an open (as fresh as its attributes) unless a
        map is loaded already or writes here are unflushed: then the first read needs no
        GetChunks."""
        if self.remote is None and not self.has_local_changes and chunks.chunk_size > 0:
            self.chunk_size = chunks.chunk_size
            self.remote = dict(chunks.chunks)
            self.size = chunks.size

    async def ensure_map(self) -> None:
        """Load the committed chunk map (and the file's chunk size) if not loaded, or again
        if writes made here were dropped (a fence: the size and map must be the tracker's)."""
        if self.remote is not None and not self._map_stale:
            return
        async with self._map_lock:
            if self.remote is None or self._map_stale:
                await self._load_map()
                self._map_stale = False

    async def _load_map(self) -> None:
        """(map lock held) The tracker's chunk map. A commit, truncate or punch made here while
        it was on its way makes it older than what we know: ask again (a few times; then the
        tracker's is taken, as before this check)."""
        for _ in range(MAP_LOAD_TRIES):
            changes = self._map_changes
            chunks = await self.cache.client.get_chunks(self.ino)
            if changes == self._map_changes:
                break
        if chunks.chunk_size <= 0:
            raise Unavailable(
                f"tracker reported chunk size {chunks.chunk_size} for inode {self.ino}"
            )
        self.chunk_size = chunks.chunk_size
        self.remote = dict(chunks.chunks)
        if not self.has_local_changes or self.fenced is not None:
            self.size = chunks.size  # (fenced: what is left here is never to land)

    # --- writes ---------------------------------------------------------------------------

    def _raise_error(self) -> None:
        if self.error is not None:
            self.error_reported = True
            raise _copy(self.error)

    async def write(self, offset: int, data: bytes | memoryview) -> None:
        self._raise_error()
        self._check_fence()
        if not data:
            return
        await self.ensure_map()
        chunk_size = self.chunk_size
        view = memoryview(data)
        pos = 0
        while pos < len(view):
            index, start = divmod(offset + pos, chunk_size)
            take = min(len(view) - pos, chunk_size - start)
            await self._write_piece(index, start, view[pos : pos + take])
            pos += take
        self.size = max(self.size, offset + len(view))
        self.mtime_ns = time.time_ns()
        self.writes += 1

    async def _write_piece(self, index: int, start: int, data: memoryview) -> None:
        budget = self.cache.budget
        while True:
            upload = self.uploading.get(index)
            if upload is not None:
                await upload.done.wait()
                continue
            self._raise_error()
            buf = self.dirty.get(index)
            growth = buf.growth(start, len(data)) if buf is not None else start + len(data)
            if growth and not budget.try_acquire(growth):
                self.cache.relieve_pressure(growth)
                await budget.wait()
                continue
            # No await from here on: the buffer cannot move to `uploading` under us.
            if buf is None:
                buf = ChunkBuffer(index)
                self.dirty[index] = buf
                self.cache.register(self, buf)
            buf.accounted += growth
            buf.write(start, data)
            if buf.is_full(self.chunk_size):
                self.start_upload(buf)
            return

    def start_upload(self, buf: ChunkBuffer, *, sync: bool = False) -> None:
        """Move `buf` from dirty to uploading and store it in the background."""
        del self.dirty[buf.index]
        self.cache.unregister(self, buf)
        upload = _Upload(buf, sync)
        self.uploading[buf.index] = upload
        self.cache.uploading_bytes += buf.accounted
        self.cache.nursery.start_soon(self._upload, upload, name=f"upload {self.ino}:{buf.index}")

    async def _upload(self, upload: _Upload) -> None:
        buf = upload.buffer
        accounted = buf.accounted
        extra = 0
        try:
            base = self.latest(buf.index)
            info = await self._try_patch(buf, base, upload.sync) if base is not None else None
            if info is not None:
                self._stored(info, upload.sync)
                return
            if base is not None and not buf.covers(0, min(base.length, self.chunk_size)):
                try:
                    stored = await self.cache.chunks.get(base)
                except Unavailable:
                    # As for a read: the tracker may know other copies, or (just restarted)
                    # none yet. The base may also be a newer version by then, or a hole.
                    if not await self._relocated(buf.index, base):
                        raise
                    base = self.latest(buf.index)
                    stored = await self.cache.chunks.get(base) if base is not None else b""
                before = len(buf.data)
                buf.merge_base(memoryview(stored)[: len(stored) if base is None else base.length])
                extra = len(buf.data) - before
                self.cache.budget.charge(extra)
            placement = None
            if (
                buf.index == 0
                and self.first_chunk is not None
                and trio.current_time() - self.first_chunk_at < PLACEMENT_FRESH_S
            ):
                placement, self.first_chunk = self.first_chunk, None
            elif base is not None:
                placement = self._take_spare(base)  # its holders take a whole version too
            info = await self.cache.client.write_chunk(
                self.ino, buf.index, buf.data, placement, sync=upload.sync
            )
            self._stored(info, upload.sync)
            self.recent.pop(buf.index, None)
            self.cache.chunks.put(info, buf.data)
        except DfsError as exc:
            self._fail(buf.index, exc)
        except Exception as exc:
            log.exception("inode %d: uploading chunk %d failed", self.ino, buf.index)
            self._fail(buf.index, Unavailable(f"upload failed: {exc!r}"))
        finally:
            del self.uploading[buf.index]
            self.cache.uploading_bytes -= accounted
            self.cache.budget.release(accounted + extra)
            upload.done.set()

    def _stored(self, info: ChunkInfo, synced: bool) -> None:
        if self.fenced is not None:
            # Uploading when the locks were lost: never to be committed (see `fence`).
            self.cache.nursery.start_soon(self.cache.abandon, [info])
            return
        self.pending[info.index] = info
        if synced:
            self.unsynced.pop(info.index, None)  # a newer version, on the disk
        else:
            self.unsynced[info.index] = info

    async def _try_patch(self, buf: ChunkBuffer, base: ChunkInfo, sync: bool) -> ChunkInfo | None:
        """Store `buf` as a patch over the committed `base` if that is worth it (patches.py);
        None if it is not, or if it failed (the caller then writes the whole chunk)."""
        if self.remote is None or self.remote.get(buf.index) is not base:
            return None  # only over a committed version, which the keepers know as such
        todo = patches.plan(buf, base)
        if todo is None:
            return None
        spare = self._take_spare(base)
        try:
            sums, payload, sent = await patches.build(
                buf, base, todo, self.recent.get(buf.index), self.cache.chunks, self.cache.client
            )
            info = await self.cache.client.write_patch(
                self.ino, base, todo.length, sums, todo.blocks, payload, sync=sync, placement=spare
            )
        except DfsError as exc:
            log.info(
                "inode %d chunk %d: patch not taken (%s); writing it whole",
                self.ino,
                buf.index,
                exc,
            )
            self.recent.pop(buf.index, None)
            return None
        self.recent[buf.index] = patches.Recent(info.version, sums, sent)
        return info

    def _take_spare(self, base: ChunkInfo) -> Placement | None:
        """The spare version allocated after `base` was committed here, if it is still fresh
        (one that is not is given back at release)."""
        entry = self.spares.pop(base.index, None)
        if entry is None:
            return None
        follows, spare, when = entry
        if follows == (base.chunk_id, base.version) and (
            trio.current_time() - when < PLACEMENT_FRESH_S
        ):
            return spare
        self.unused_spares.append(spare)
        return None

    def unused_placements(self) -> list[Placement]:
        """What this state was allocated and never wrote with, for the tracker to forget."""
        unused = list(self.unused_spares)
        unused += (spare for _, spare, _ in self.spares.values())
        if self.first_chunk is not None:
            unused.append(self.first_chunk)
        self.unused_spares.clear()
        self.spares.clear()
        self.first_chunk = None
        return unused

    def fence(self, error: LockFenced, *, locked: bool = False) -> None:
        """The locks this mount held on the file were lost: another host may have changed it
        since. Writes fail with `error` until the opens this state serves have all closed
        (an open made since gets a state of its own), and what was written and not committed
        is dropped, never to land. The first write, fsync or
        close after that fails with `error` too, as Linux reports a lost write-back once;
        later flushes (a reader's close) succeed."""
        if self.fenced is None:
            log.error("inode %d: writes refused until the file is closed: %s", self.ino, error)
            self.fenced = error
        if locked or not self.lock.locked():
            self._discard_local_changes()
        # Else a flush, truncate or punch is under way: a commit it has sent may still land
        # (the tracker decides), and it drops what is left when it sees the fence.

    def _discard_local_changes(self) -> None:
        """Forget what was written here and not committed (a chunk still uploading lands in
        `pending` later, and goes at the next flush); the next read takes the chunk map and
        size from the tracker again."""
        if self.has_local_changes:
            self._loss_unreported = True
            self.cache.discard(self)
            self.committed_writes = self.writes
            self._map_stale = True  # a read in progress goes on with the old map

    async def _flush_fenced(self) -> bool:
        """A flush of a fenced file: nothing lands; raises if writes were dropped unreported."""
        assert self.fenced is not None
        for upload in list(self.uploading.values()):
            await upload.done.wait()
        self._discard_local_changes()
        if self._loss_unreported:
            self._refuse(self.fenced)
        return False

    def _check_fence(self) -> None:
        if self.fenced is not None:
            self._refuse(self.fenced)

    async def _fenced_change(
        self, call: Callable[..., Awaitable[Attr]], *args: Any, **kwargs: Any
    ) -> Attr:
        """(lock held) A truncate or punch on the tracker, unless the file is fenced: checked
        after the flush before it too."""
        self._check_fence()
        return await self._under_locks(call, *args, **kwargs)

    async def _under_locks(self, call: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """(lock held) A commit, truncate or punch, carrying the lock table of this mount's
        locks on the file (MountLocks.confirm). A tracker that took over since they were
        granted answers LockGrace until the mount has reclaimed them (it is asked to at
        once), and LockFenced if they were lost: the file is fenced for good."""
        while True:
            table = await self.cache.before_change(self.ino)
            if self.fenced is not None:
                self._discard_local_changes()  # reported by this refusal
                self._refuse(self.fenced)
            try:
                return await call(*args, locks_table=table, **kwargs)
            except LockFenced as exc:
                self.fence(exc, locked=True)  # the tracker knew before us
                self._refuse(exc)
            except LockGrace:
                self.cache.on_grace()
                await trio.sleep(GRACE_RETRY_S)

    def _refuse(self, fenced: LockFenced) -> NoReturn:
        """Fail a write (or the flush that tells of dropped writes) of a fenced file."""
        self._loss_unreported = False
        raise _copy(fenced)

    def _fail(self, index: int, exc: DfsError) -> None:
        log.warning("inode %d: chunk %d could not be stored: %s", self.ino, index, exc)
        if self.error is None:
            self.error = exc

    # --- flush and commit -----------------------------------------------------------------

    async def flush(self, *, sync: bool = False) -> bool:
        """Store and commit every write made before this call; raise the upload error if any.
        With `sync`, every chunk of the file is on its keepers' disks and the commit on the
        tracker's when this returns. Returns whether anything was committed."""
        async with self.lock:
            committed = await self._flush_locked(sync=sync)
            if sync:
                await self._sync_stored()
            return committed

    async def _sync_stored(self) -> None:
        """Have the keepers fsync what was stored here without sync; if this state does not
        know what that was (the file was written before it existed), every chunk of the file."""
        if not self.sync_known:
            chunks = await self.cache.client.get_chunks(self.ino)
            await self.cache.client.sync_chunks(list(chunks.chunks.values()))
            self.sync_known = True
            self.unsynced.clear()
            return
        await self.ensure_map()
        for index, info in list(self.unsynced.items()):
            latest = self.latest(index)
            if latest is None or (latest.chunk_id, latest.version) != (info.chunk_id, info.version):
                # Replaced by a newer version or truncated away: the keepers may have deleted
                # it already, and the file no longer depends on it.
                del self.unsynced[index]
        infos = list(self.unsynced.values())
        if infos:
            await self.cache.client.sync_chunks(infos)
            for info in infos:
                if self.unsynced.get(info.index) is info:
                    del self.unsynced[info.index]

    async def _flush_locked(self, *, sync: bool = False) -> bool:
        self._raise_error()
        if self.fenced is not None:
            return await self._flush_fenced()
        if not self.has_local_changes:
            return False
        size, writes = self.size, self.writes
        for buf in list(self.dirty.values()):
            self.start_upload(buf, sync=sync)
        for upload in list(self.uploading.values()):
            await upload.done.wait()
        self._raise_error()
        if self.fenced is not None:  # the locks were lost while the chunks were uploading
            return await self._flush_fenced()
        chunks = sorted(self.pending.values(), key=lambda c: c.index)
        # A chunk uploaded meanwhile for a racing write may reach past the snapshot's size.
        for info in chunks:
            size = max(size, min(self.size, info.index * self.chunk_size + info.length))
        # A synced flush (fsync, O_DSYNC) is often one of many small ones: take a spare next
        # version of each chunk, so that the next one patches it with no allocation trip.
        attr, spares = await self._under_locks(
            self.cache.client.commit_with_spares,
            self.ino, size, chunks, self.mtime_ns, sync=sync, spares=sync, opened=self.opened,
        )  # fmt: skip
        now = trio.current_time()
        for info in chunks:
            spare = spares.get(info.index)
            if spare is not None:
                old = self.spares.get(info.index)
                if old is not None:
                    self.unused_spares.append(old[1])
                self.spares[info.index] = ((info.chunk_id, info.version), spare, now)
        self.cache.on_commit(attr)
        for info in chunks:
            if self.pending.get(info.index) is info:
                del self.pending[info.index]
            self._map_changes += 1
            if self.remote is not None:
                self.remote[info.index] = info
        self.committed_writes = max(self.committed_writes, writes)
        if not self.has_local_changes:
            self.size, self.mtime_ns = attr.size, attr.mtime_ns
        return True

    async def _flush_before_change(self) -> None:
        """Flush (lock held) so that no later commit of earlier writes undoes a change made
        on the tracker next (truncate, times, punched chunks)."""
        for _ in range(FLUSH_ROUNDS):
            if not self.has_local_changes:
                return
            await self._flush_locked()
        if self.has_local_changes:
            log.warning("inode %d: writes kept racing with a change of the file", self.ino)

    async def zero_range(self, start: int, end: int) -> Attr | None:
        """Bytes [start, end) read as zeros from now on (fallocate's punch hole and zero
        range). Chunks wholly inside become holes on the tracker, their copies deleted; the
        partial chunks at the edges are written with zeros like any write. Returns the
        tracker's new attributes if chunks were punched."""
        if end <= start:
            return None
        self._check_fence()
        await self.ensure_map()
        chunk_size = self.chunk_size
        first_whole, end_whole = -(-start // chunk_size), end // chunk_size
        if first_whole >= end_whole:  # no whole chunk inside
            await self._write_zeros(start, end)
            return None
        await self._write_zeros(start, first_whole * chunk_size)
        await self._write_zeros(end_whole * chunk_size, end)
        async with self.lock:
            await self._flush_before_change()
            attr = await self._fenced_change(
                self.cache.client.punch_chunks, self.ino, first_whole, end_whole, self.opened
            )
            self._map_changes += 1
            if self.remote is not None:
                for index in range(first_whole, end_whole):
                    self.remote.pop(index, None)
            if not self.has_local_changes:
                self.mtime_ns = attr.mtime_ns
            return attr

    async def _write_zeros(self, start: int, end: int) -> None:
        while start < end:
            piece = min(end - start, len(_ZEROS))
            await self.write(start, _ZEROS[:piece])
            start += piece

    async def setattr(self, **fields: int | None) -> Attr:
        """A tracker setattr that must not be overtaken by a later commit (size, times):
        flush first, then apply it, then adjust the local view."""
        async with self.lock:
            size = fields.get("size_bytes")
            if size is not None:
                self._check_fence()
            await self._flush_before_change()
            change = functools.partial(self.cache.client.setattr, self.ino, opened=self.opened)
            changes: dict[str, Any] = dict(fields)
            if size is None:
                attr = await change(**changes)  # times: no write to fence
            else:
                attr = await self._fenced_change(change, **changes)
            if size is not None:
                self._truncated(size)
            if not self.has_local_changes:
                self.size, self.mtime_ns = attr.size, attr.mtime_ns
            return attr

    def _truncated(self, size: int) -> None:
        """Mirror the tracker's truncate in the chunk map: chunks past `size` are gone, the
        one across it is shorter (reads as zeros past its new length)."""
        self.size = size
        self._map_changes += 1
        self.recent.clear()  # the tracker shortened chunks: their keepers' copies did not
        if self.remote is None or not self.chunk_size:
            return
        for index, info in list(self.remote.items()):
            start = index * self.chunk_size
            if start >= size:
                del self.remote[index]
            elif start + info.length > size:
                self.remote[index] = dataclasses.replace(info, length=size - start)

    # --- reads ----------------------------------------------------------------------------

    async def read(self, offset: int, length: int, *, sequential: bool) -> Readable:
        await self.ensure_map()
        end = min(offset + length, self.size)
        if offset >= end:
            return b""
        chunk_size = self.chunk_size
        if sequential:
            self._readahead(end)
        parts: list[Readable] = []
        pos = offset
        while pos < end:
            index = pos // chunk_size
            chunk_start = index * chunk_size
            stop = min(end, chunk_start + chunk_size)
            parts.append(await self._read_piece(index, pos - chunk_start, stop - chunk_start))
            pos = stop
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _readahead(self, end: int) -> None:
        chunk_size = self.chunk_size
        count = max(1, min(READAHEAD_BYTES, self.cache.chunks.limit // 4) // chunk_size)
        first = end // chunk_size
        last_index = (self.size - 1) // chunk_size
        for index in range(first, min(first + count, last_index) + 1):
            if index in self.dirty or index in self.uploading:
                continue
            info = self.latest(index)
            if info is not None:
                self.cache.chunks.prefetch(info)

    async def _read_piece(self, index: int, start: int, end: int) -> Readable:
        try:
            return await self._read_piece_once(index, start, end)
        except Unavailable:
            if not await self._relocated(index, self.latest(index)):
                raise
            return await self._read_piece_once(index, start, end)

    async def _relocated(self, index: int, before: ChunkInfo | None) -> bool:
        """After no copy of chunk `index` (version `before`) could be read: whether the
        tracker now names other copies (or another version, or a hole) to read instead. The
        map may name keepers that died since, and the tracker may know better ones. If it
        names none, the tracker has just restarted (or taken over) and its keepers have not
        reported yet: they do within seconds, so this waits for them, bounded by
        io_timeout_s."""
        deadline = trio.current_time() + self.cache.client.io_timeout_s
        while True:
            async with self._map_lock:
                await self._load_map()
            info = self.latest(index)
            if info != before and (info is None or info.keepers):
                log.info("inode %d: chunk %d moved, reading it again", self.ino, index)
                return True
            if (info is not None and info.keepers) or trio.current_time() >= deadline:
                return False
            await trio.sleep(NO_COPY_RETRY_S)

    async def _read_piece_once(self, index: int, start: int, end: int) -> Readable:
        buf = self.dirty.get(index)
        if buf is None and index in self.uploading:
            buf = self.uploading[index].buffer
        info = self.latest(index)
        if buf is not None:
            if info is None or buf.covers(start, end):
                return buf.read(start, end)
            out = bytearray(end - start)
            self._copy_stored(out, await self.cache.chunks.get(info), info, start)
            buf.overlay(out, start)
            return out
        if info is None:
            return bytes(end - start)
        stored = await self.cache.chunks.get(info)
        if end <= min(len(stored), info.length):
            return memoryview(stored)[start:end]
        out = bytearray(end - start)
        self._copy_stored(out, stored, info, start)
        return out

    @staticmethod
    def _copy_stored(
        out: bytearray, stored: bytes | bytearray, info: ChunkInfo, start: int
    ) -> None:
        """Copy the stored bytes of `info` at [start, start+len(out)) into out; zeros past
        the version's committed length."""
        stop = min(start + len(out), len(stored), info.length)
        if stop > start:
            out[: stop - start] = memoryview(stored)[start:stop]


async def _no_locks_held(ino: int) -> str:
    return ""


class DataCache:
    """Mount-wide data state: the FileStates, the dirty budget, the read cache."""

    def __init__(
        self, client: Client, nursery: trio.Nursery, *, dirty_bytes: int, cache_bytes: int
    ) -> None:
        self.client = client
        self.nursery = nursery
        self.budget = DirtyBudget(dirty_bytes)
        self.chunks = ChunkCache(client, nursery, cache_bytes)
        self.files: dict[int, FileState] = {}
        # Per closed inode, the chunks stored here without sync (see `drop`).
        self.unsynced_after_close: dict[int, dict[int, ChunkInfo]] = {}
        self.uploading_bytes = 0
        # Told the tracker's attributes after each commit (the mount's attribute cache).
        self.on_commit: Callable[[Attr], object] = lambda attr: None
        # Told the inode whose uncommitted writes were dropped (the kernel's pages hold them).
        self.on_discard: Callable[[int], object] = lambda ino: None
        # Awaited before a commit, truncate or punch of an inode: the mount's locks make sure
        # they are still held there if the lease could have run out, and name the lock table
        # they were granted in, for the change to carry (MountLocks.confirm).
        self.before_change: Callable[[int], Awaitable[str]] = _no_locks_held
        # Called when the tracker waits for this mount to reclaim its locks (LockGrace).
        self.on_grace: Callable[[], object] = lambda: None
        # Dirty buffers, oldest first: what `relieve_pressure` uploads.
        self._order: dict[tuple[int, int], tuple[FileState, ChunkBuffer]] = {}

    def open_state(self, attr: Attr, opened: OpenMark | None = None) -> FileState:
        """The state of `attr`'s inode, made on its first open (`opened`: that open's mark:
        a state lives until the last close, so its writes go through the oldest open)."""
        state = self.files.get(attr.ino)
        if state is None or state.fenced is not None:
            # A fenced state serves the opens made before the fence until they close; an
            # open made since writes knowing, through a state of its own.
            state = self.files[attr.ino] = FileState(self, attr)
            state.opened = opened
            left = self.unsynced_after_close.pop(attr.ino, None)
            if left is not None:
                state.unsynced, state.sync_known = left, True
        return state

    def fence(self, inos: set[int], why: str) -> None:
        """Refuse writes to the open files of `inos` (MountLocks.on_lost)."""
        for ino in inos:
            state = self.files.get(ino)
            if state is not None:
                state.fence(LockFenced(f"inode {ino}: this mount's locks on it were lost ({why})"))

    def local_attrs(self, ino: int) -> tuple[int, int] | None:
        state = self.files.get(ino)
        return state.local_attrs() if state is not None else None

    def drop(self, ino: int) -> list[Placement]:
        """Forget an inode's state after its last release (anything unflushed is lost: the
        release already tried to flush and logged why it could not). Returns the placements
        it was allocated and never wrote with (from its create, spares), for the tracker to
        forget."""
        state = self.files.pop(ino, None)
        if state is None:
            return []
        if state.sync_known:
            # What a later fsync of the file must have synced (the keepers' write-back does it
            # within seconds anyway); bounded, oldest forgotten first.
            self.unsynced_after_close[ino] = state.unsynced
            while len(self.unsynced_after_close) > UNSYNCED_MEMORY:
                del self.unsynced_after_close[next(iter(self.unsynced_after_close))]
        self._forget_changes(state)
        return state.unused_placements()

    def discard(self, state: FileState) -> None:
        """Drop `state`'s uncommitted writes (a fence) and the kernel's pages of them."""
        self._forget_changes(state)
        self.on_discard(state.ino)

    def _forget_changes(self, state: FileState) -> None:
        for buf in list(state.dirty.values()):
            self.unregister(state, buf)
            self.budget.release(buf.accounted)
        state.dirty.clear()
        if state.pending:
            # Stored but never to be committed: free the keepers' space now, not after the
            # tracker's garbage grace period.
            self.nursery.start_soon(self.abandon, list(state.pending.values()))
            state.pending.clear()

    async def abandon(self, chunks: list[ChunkInfo]) -> None:
        """Give back stored versions that will never be committed (best effort)."""
        try:
            await self.client.abandon(chunks)
        except DfsError as exc:
            log.info("could not give back %d unused chunks: %s", len(chunks), exc)

    def register(self, state: FileState, buf: ChunkBuffer) -> None:
        self._order[(state.ino, buf.index)] = (state, buf)

    def unregister(self, state: FileState, buf: ChunkBuffer) -> None:
        self._order.pop((state.ino, buf.index), None)

    def relieve_pressure(self, needed: int) -> None:
        """A writer needs `needed` bytes the budget does not have: unless running uploads will
        free that much, upload the oldest dirty buffers (partial ones too)."""
        deficit = needed - self.uploading_bytes
        for state, buf in list(self._order.values()):
            if deficit <= 0:
                break
            if state.dirty.get(buf.index) is buf:
                deficit -= buf.accounted
                state.start_upload(buf)

    async def flush_all(self) -> None:
        """Flush every open file (shutdown); failures are logged, not raised."""
        for state in list(self.files.values()):
            try:
                await state.flush()
            except DfsError as exc:
                log.warning("inode %d: unflushed data lost at shutdown: %s", state.ino, exc)
