"""Chunk files on a keeper's disk.

Layout: `<data>/chunks/<XX>/chunk_<16 hex id>_<8 hex version>.<ext>`, where XX is the id's low
byte, so no directory grows past 1/256 of the chunks. A version is stored in one of two ways:

- a full file, `.dfs`: a header and the data,

      magic "DFSCHNK1" | length u64 | block count u32 | block checksums u64 * n | pad | data

  with the data starting at the next 4 KiB boundary;
- a patch, `.dfo` (written for `PatchChunk`): only the blocks that changed from a base version
  this keeper holds,

      magic "DFSOVER1" | length u64 | base version u32 | block count u32 | slots u32
      | block checksums u64 * n | slot of each block u32 * n (NO_SLOT: as in the base)
      | xxh3_64 of all of the above | pad | slot data

  The blocks a patch does not carry are the base's, wherever the base keeps them; the store
  resolves that once, when the patch is written (or found at start), into a `Layout`: for each
  block, the file that holds it and where. So a read of a patched version is a few sendfile
  pieces, never a walk down a chain, and a small change costs its blocks and a 4 KiB header,
  not the chunk. Files are shared between versions: a file is deleted when no live version
  uses it any more (`refs`), so the tracker deleting an old version that a newer patch builds
  on leaves its file in place. Patches on top of patches are folded into a full file in the
  background (`compact`) once a version is COMPACT_DEPTH patches deep or its chunk has been
  idle for COMPACT_IDLE_S, so reads go back to one file and patches stay few.

Checksums live beside the data they cover, so every file is self-describing and the scrubber
needs nothing else.

Writes are atomic: a temporary file in the same directory, renamed into place, so a crash of
any process leaves either no file or the whole new one. Durability has two levels, as on a
local filesystem (DESIGN.md, guarantee 1): a write with `sync` fsyncs the file before the
rename and the directory after it (safe from a power cut when it returns); one without leaves
that to the write-back, which fsyncs every unsynced file within WRITEBACK_S, or to `sync`,
which a client's fsync asks for. A power cut before either may leave a file empty or torn: its
header (a patch's header has its own checksum) or its block checksums then fail, it is never
served, and the tracker copies the version again from another keeper. An old version is
deleted only after the write-back (so after the newer version is on the disk). Leftover
temporaries are removed at start.

Ids come from the wire as integers and are range-checked; no path is ever built from anything
else, so no request can reach outside the data directory. Blocking disk work runs in worker
threads; the maps below are changed under `_lock`.
"""

from __future__ import annotations

import logging
import os
import re
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import trio
import xxhash

from cluster import checksum, trace
from cluster.errors import ChecksumMismatch, InvalidArgument, NoSpace, NotFound
from cluster.protocol import FileRegion

log = logging.getLogger(__name__)

MAGIC = b"DFSCHNK1"
HEAD = struct.Struct("<8sQI")
PATCH_MAGIC = b"DFSOVER1"
PATCH_HEAD = struct.Struct("<8sQIII")
NO_SLOT = 0xFFFFFFFF
PAGE = 4096
MAX_CHUNK_ID = (1 << 63) - 1
MAX_VERSION = (1 << 32) - 1
MAX_CHUNK_BYTES = 64 << 20
# Unsynced chunk files are fsynced at most this long after they were written (ext4's commit
# interval is 5 s).
WRITEBACK_S = 2.0
# A patched version this many patches deep is rewritten as a full file at once; any patched
# version whose chunk saw no new patch for COMPACT_IDLE_S is too.
COMPACT_DEPTH = 128
COMPACT_IDLE_S = 5.0
FILE_RE = re.compile(r"^chunk_([0-9a-f]{16})_([0-9a-f]{8})\.(dfs|dfo)$")
EXTENSION = {"f": "dfs", "o": "dfo"}
KIND = {"dfs": "f", "dfo": "o"}

Key = tuple[int, int]  # (chunk id, version)
FileKey = tuple[int, int, str]  # (chunk id, version, "f" full or "o" patch)


def check_ids(chunk_id: int, version: int) -> None:
    """Reject anything that is not a well-formed chunk id and version."""
    if not isinstance(chunk_id, int) or not 0 < chunk_id <= MAX_CHUNK_ID:
        raise InvalidArgument(f"malformed chunk id {chunk_id!r}")
    if not isinstance(version, int) or not 0 < version <= MAX_VERSION:
        raise InvalidArgument(f"malformed chunk version {version!r}")


def data_offset(length: int) -> int:
    head = HEAD.size + checksum.CHECKSUM_SIZE * checksum.block_count(length)
    return (head + PAGE - 1) // PAGE * PAGE


@dataclass(frozen=True, slots=True)
class ChunkSpan:
    length: int  # the chunk's whole length
    first_block: int
    checksums: bytes  # of every block of the chunk


@dataclass(frozen=True, slots=True)
class ChunkRead:
    length: int  # the chunk's whole length
    first_block: int
    checksums: bytes  # of every block of the chunk
    data: bytes  # whole blocks from first_block


@dataclass(frozen=True, slots=True)
class Layout:
    """Where every block of one version lies: `blocks[i]` is (file, offset in it)."""

    length: int
    checksums: bytes
    blocks: tuple[tuple[FileKey, int], ...]
    depth: int  # patches since a full file (0: a full file)

    @property
    def files(self) -> set[FileKey]:
        return {where for where, _ in self.blocks}

    def pieces(self, first: int, stop: int) -> list[tuple[FileKey, int, int]]:
        """(file, offset, length) covering blocks [first, stop), neighbours merged."""
        out: list[tuple[FileKey, int, int]] = []
        for i in range(first, stop):
            where, offset = self.blocks[i]
            size = checksum.block_length(self.length, i)
            if out and out[-1][0] == where and out[-1][1] + out[-1][2] == offset:
                out[-1] = (where, out[-1][1], out[-1][2] + size)
            else:
                out.append((where, offset, size))
        return out


class ChunkStore:
    def __init__(self, data_dir: Path, capacity_bytes: int = 0) -> None:
        self.root = data_dir / "chunks"
        if not self.root.exists():
            # A directory made now is on the disk only once its parent is fsynced: without
            # it a power cut takes every chunk file under it along.
            self.root.mkdir(parents=True, mode=0o700)
            _fsync_path(data_dir)
        self.configured_capacity = capacity_bytes
        self.used_bytes = 0
        # Live versions (what the tracker is told this keeper holds) -> size of their own file.
        self.chunks: dict[Key, int] = {}
        # Live patched versions -> where their blocks lie (full versions need no entry).
        self.layouts: dict[Key, Layout] = {}
        self.files: dict[FileKey, int] = {}  # every chunk file on the disk -> its size
        self.refs: Counter[FileKey] = Counter()  # live versions that use each file
        # Versions written without fsync whose own file is not on the disk yet.
        self.unsynced: set[Key] = set()
        self.last_patch: dict[int, float] = {}  # chunk id -> when it was last patched
        self._lock = threading.Lock()
        self._sync_lock = trio.Lock()
        self.syncs = 0  # chunk files fsynced after their write (write-back and `sync`)
        self.compactions = 0

    # --- paths ----------------------------------------------------------------------------

    def path(self, chunk_id: int, version: int, kind: str = "f") -> Path:
        check_ids(chunk_id, version)
        name = f"chunk_{chunk_id:016x}_{version:08x}.{EXTENSION[kind]}"
        return self.root / f"{chunk_id & 0xFF:02x}" / name

    def _file_path(self, where: FileKey) -> Path:
        return self.path(where[0], where[1], where[2])

    # --- inventory ------------------------------------------------------------------------

    def scan(self) -> None:
        """Build the inventory: full files from their names (no data is read: start-up stays
        fast), patches from their headers (they are few: compaction folds them)."""
        found: dict[FileKey, int] = {}
        for sub in self.root.iterdir():
            if not sub.is_dir():
                continue
            for entry in os.scandir(sub):
                if entry.name.startswith(".tmp-"):
                    os.unlink(entry.path)
                    continue
                match = FILE_RE.match(entry.name)
                if match:
                    key = (int(match[1], 16), int(match[2], 16), KIND[match[3]])
                    found[key] = entry.stat().st_size
        with self._lock:
            self.files, self.chunks, self.layouts = dict(found), {}, {}
            self.refs, self.unsynced = Counter(), set()
            for chunk_id, version, kind in sorted(found):
                if kind == "f":
                    self._make_live((chunk_id, version), None)
            self.used_bytes = sum(found.values())
        for chunk_id, version, kind in sorted(found):
            if kind == "o" and (chunk_id, version) not in self.chunks:
                try:
                    layout = self._read_patch_layout(chunk_id, version)
                except (ChecksumMismatch, NotFound, OSError, struct.error) as exc:
                    log.warning("chunk %d v%d: dropping its patch file: %s", chunk_id, version, exc)
                    continue
                with self._lock:
                    self._make_live((chunk_id, version), layout)
        with self._lock:
            orphans = [where for where in self.files if not self.refs[where]]
        self._unlink(orphans)

    @property
    def capacity_bytes(self) -> int:
        if self.configured_capacity:
            return self.configured_capacity
        st = os.statvfs(self.root)
        return self.used_bytes + st.f_bavail * st.f_frsize

    def held(self) -> list[list[int]]:
        with self._lock:
            return [[c, v] for c, v in self.chunks]

    def _own(self, key: Key) -> FileKey:
        return (*key, "o" if key in self.layouts else "f")

    def _make_live(self, key: Key, layout: Layout | None) -> list[FileKey]:
        """(lock held) `key` is now stored as `layout` (None: its full file). Returns files
        that no live version uses any more, for the caller to unlink."""
        dropped = self._drop_live(key)
        own: FileKey = (*key, "f" if layout is None else "o")
        users = {own} if layout is None else layout.files | {own}
        for where in users:
            self.refs[where] += 1
        if layout is not None:
            self.layouts[key] = layout
        self.chunks[key] = self.files.get(own, 0)
        return [where for where in dropped if not self.refs[where]]

    def _drop_live(self, key: Key) -> list[FileKey]:
        """(lock held) `key` is no longer live; returns the files it used."""
        if key not in self.chunks:
            return []
        layout = self.layouts.pop(key, None)
        own = (*key, "f" if layout is None else "o")
        users = {own} if layout is None else layout.files | {own}
        del self.chunks[key]
        self.unsynced.discard(key)
        for where in users:
            self.refs[where] -= 1
            if not self.refs[where]:
                del self.refs[where]
        return list(users)

    def _unlink(self, files: list[FileKey]) -> None:
        for where in files:
            with self._lock:
                if self.refs[where] or where not in self.files:
                    continue
                size = self.files.pop(where)
                self.used_bytes -= size
            try:
                os.unlink(self._file_path(where))
            except FileNotFoundError:
                pass

    # --- write ----------------------------------------------------------------------------

    def _check_room(self, size: int) -> None:
        if self.configured_capacity and self.used_bytes + size > self.configured_capacity:
            raise NoSpace("keeper capacity reached")

    async def write(
        self,
        chunk_id: int,
        version: int,
        data: bytearray | bytes,
        checksums: bytes,
        *,
        sync: bool = True,
    ) -> None:
        check_ids(chunk_id, version)
        if len(data) > MAX_CHUNK_BYTES:
            raise InvalidArgument("chunk too large")
        if len(checksums) != checksum.CHECKSUM_SIZE * checksum.block_count(len(data)):
            raise ChecksumMismatch("checksum list does not fit the data")
        self._check_room(data_offset(len(data)) + len(data))
        await trio.to_thread.run_sync(self._write_sync, chunk_id, version, data, checksums, sync)

    def _write_sync(
        self,
        chunk_id: int,
        version: int,
        data: bytearray | bytes | memoryview,
        checksums: bytes,
        sync: bool,
        only_if: Layout | None = None,
    ) -> None:
        bad = checksum.verify_blocks(data, checksums)
        if bad is not None:
            raise ChecksumMismatch(f"chunk {chunk_id:x}: block {bad} arrived corrupt")
        offset = data_offset(len(data))
        header = HEAD.pack(MAGIC, len(data), checksum.block_count(len(data))) + checksums
        final = self._put_file(self.path(chunk_id, version), header, offset, data, sync)
        size = offset + len(data)
        key = (chunk_id, version)
        orphans: list[FileKey] = []
        with self._lock:
            stale = only_if is not None and self.layouts.get(key) is not only_if
            if not stale:  # else compaction raced with a delete or another write: keep theirs
                self._add_file((chunk_id, version, "f"), size)
                orphans = self._make_live(key, None)
                if sync:
                    self.unsynced.discard(key)
                else:
                    self.unsynced.add(key)
        if stale:
            os.unlink(final)
            return
        self._unlink(orphans)

    def _add_file(self, where: FileKey, size: int) -> None:
        """(lock held) A file was written (or rewritten) at `where`."""
        self.used_bytes += size - self.files.get(where, 0)
        self.files[where] = size

    def _put_file(
        self,
        final: Path,
        header: bytes,
        offset: int,
        data: bytes | bytearray | memoryview,
        sync: bool,
    ) -> Path:
        """Write `header`, then `data` at `offset`, to a temporary file renamed to `final`."""
        if not final.parent.exists():
            final.parent.mkdir(exist_ok=True, mode=0o700)
            _fsync_path(self.root)
        tmp = final.parent / f".tmp-{final.name}-{os.getpid()}-{threading.get_ident()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.pwrite(fd, header + bytes(offset - len(header)), 0)
            view = memoryview(data)
            written = 0
            while written < len(view):
                written += os.pwrite(fd, view[written:], offset + written)
            if sync:
                with trace.span("fsync file"):
                    os.fsync(fd)
        except OSError as exc:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            if exc.errno == 28:
                raise NoSpace("keeper disk full") from None
            raise
        os.close(fd)
        os.rename(tmp, final)
        if sync:
            with trace.span("fsync dir"):
                _fsync_path(final.parent)
        return final

    async def patch(
        self,
        chunk_id: int,
        base_version: int,
        version: int,
        length: int,
        checksums: bytes,
        blocks: list[int],
        data: bytearray | bytes,
        *,
        sync: bool = True,
    ) -> None:
        """Store `version` as the `blocks` in `data` over `base_version` (see the module
        docstring); raises NotFound if the base is not held here (the writer then writes the
        whole chunk instead)."""
        check_ids(chunk_id, version)
        check_ids(chunk_id, base_version)
        if not 0 <= length <= MAX_CHUNK_BYTES:
            raise InvalidArgument("chunk too large")
        count = checksum.block_count(length)
        if len(checksums) != checksum.CHECKSUM_SIZE * count:
            raise ChecksumMismatch("checksum list does not fit the length")
        if any(not 0 <= b < count for b in blocks) or blocks != sorted(set(blocks)):
            raise InvalidArgument("patch blocks must be ascending block numbers of the chunk")
        if len(data) != sum(checksum.block_length(length, b) for b in blocks):
            raise InvalidArgument("patch payload does not match its blocks")
        self._check_room(PAGE + len(data))
        with trace.span("patch (with the thread hop)"):
            await trio.to_thread.run_sync(
                self._patch_sync,
                chunk_id,
                base_version,
                version,
                length,
                checksums,
                blocks,
                data,
                sync,
            )

    def _patch_sync(
        self,
        chunk_id: int,
        base_version: int,
        version: int,
        length: int,
        checksums: bytes,
        blocks: list[int],
        data: bytearray | bytes,
        sync: bool,
    ) -> None:
        base = self.layout(chunk_id, base_version)
        view = memoryview(data)
        sums = memoryview(checksums)
        size = checksum.CHECKSUM_SIZE
        pos = 0
        for b in blocks:
            piece = view[pos : pos + checksum.block_length(length, b)]
            if checksum.verify_blocks(piece, sums[b * size : (b + 1) * size]) is not None:
                raise ChecksumMismatch(f"chunk {chunk_id:x}: patched block {b} arrived corrupt")
            pos += len(piece)
        sent = set(blocks)
        for b in range(checksum.block_count(length)):
            if b in sent:
                continue
            if (
                checksum.block_length(length, b) != checksum.block_length(base.length, b)
                or sums[b * size : (b + 1) * size] != base.checksums[b * size : (b + 1) * size]
            ):
                raise InvalidArgument(f"block {b} changed from the base but is not in the patch")
        slots = [NO_SLOT] * checksum.block_count(length)
        for slot, b in enumerate(blocks):
            slots[b] = slot
        head = (
            PATCH_HEAD.pack(PATCH_MAGIC, length, base_version, len(slots), len(blocks))
            + checksums
            + struct.pack(f"<{len(slots)}I", *slots)
        )
        head += struct.pack("<Q", xxhash.xxh3_64_intdigest(head))
        start = (len(head) + PAGE - 1) // PAGE * PAGE
        self._put_file(self.path(chunk_id, version, "o"), head, start, view, sync)
        own: FileKey = (chunk_id, version, "o")
        key, base_key = (chunk_id, version), (chunk_id, base_version)
        with self._lock:
            self._add_file(own, start + len(view))
            if base_key not in self.chunks:
                orphans = [own]  # the base was deleted meanwhile: this patch is of no use
            else:
                # Where the base's blocks are now: compaction may have moved them since.
                now = self.layouts.get(base_key) or _full_layout(
                    chunk_id, base_version, base.length, base.checksums
                )
                layout = Layout(
                    length,
                    bytes(checksums),
                    tuple(
                        (own, start + slots[b] * checksum.BLOCK_SIZE)
                        if b in sent
                        else now.blocks[b]
                        for b in range(len(slots))
                    ),
                    now.depth + 1,
                )
                orphans = self._make_live(key, layout)
                if sync:
                    self.unsynced.discard(key)
                else:
                    self.unsynced.add(key)
                self.last_patch[chunk_id] = time.monotonic()
        self._unlink(orphans)
        if key not in self.chunks:
            raise NotFound(f"chunk {chunk_id:x} v{base_version} changed during the patch")

    # --- layouts --------------------------------------------------------------------------

    def layout(self, chunk_id: int, version: int) -> Layout:
        """Where the blocks of a live version lie (a full file's from its header)."""
        key = (chunk_id, version)
        with self._lock:
            if key not in self.chunks:
                raise NotFound(f"chunk {chunk_id:x} v{version} is not here")
            layout = self.layouts.get(key)
        if layout is not None:
            return layout
        fd = self._open((chunk_id, version, "f"))
        try:
            head = os.pread(fd, HEAD.size, 0)
            if len(head) < HEAD.size:  # a power cut before the write-back can leave it empty
                raise ChecksumMismatch(f"chunk {chunk_id:x} v{version}: file is truncated")
            magic, total, blocks = HEAD.unpack(head)
            if magic != MAGIC or blocks != checksum.block_count(total):
                raise ChecksumMismatch(f"chunk {chunk_id:x} v{version}: bad header")
            sums = os.pread(fd, blocks * checksum.CHECKSUM_SIZE, HEAD.size)
            if len(sums) != blocks * checksum.CHECKSUM_SIZE:
                raise ChecksumMismatch(f"chunk {chunk_id:x} v{version}: file is truncated")
        finally:
            os.close(fd)
        return _full_layout(chunk_id, version, total, sums)

    def _read_patch_layout(self, chunk_id: int, version: int) -> Layout:
        """The layout of a patch file found at start (its base must be live already)."""
        fd = self._open((chunk_id, version, "o"))
        try:
            first = os.pread(fd, PAGE, 0)
            magic, length, base_version, count, nslots = PATCH_HEAD.unpack_from(first)
            if magic != PATCH_MAGIC or count != checksum.block_count(length):
                raise ChecksumMismatch("bad patch header")
            size = PATCH_HEAD.size + count * (checksum.CHECKSUM_SIZE + 4)
            head = os.pread(fd, size + 8, 0)
            if len(head) != size + 8:
                raise ChecksumMismatch("patch header is truncated")
            (stored,) = struct.unpack_from("<Q", head, size)
            if xxhash.xxh3_64_intdigest(head[:size]) != stored:
                raise ChecksumMismatch("patch header fails its checksum")
        finally:
            os.close(fd)
        sums = head[PATCH_HEAD.size : PATCH_HEAD.size + count * checksum.CHECKSUM_SIZE]
        slots = struct.unpack_from(f"<{count}I", head, PATCH_HEAD.size + len(sums))
        base = self.layout(chunk_id, base_version)
        start = (size + 8 + PAGE - 1) // PAGE * PAGE
        own: FileKey = (chunk_id, version, "o")
        blocks = []
        for b, slot in enumerate(slots):
            if slot == NO_SLOT:
                if b >= len(base.blocks) or checksum.block_length(
                    length, b
                ) != checksum.block_length(base.length, b):
                    raise ChecksumMismatch(f"block {b} is neither in the patch nor the base")
                blocks.append(base.blocks[b])
            elif slot >= nslots:
                raise ChecksumMismatch("patch slot out of range")
            else:
                blocks.append((own, start + slot * checksum.BLOCK_SIZE))
        return Layout(length, bytes(sums), tuple(blocks), base.depth + 1)

    # --- durability -----------------------------------------------------------------------

    async def sync(self, chunks: list[Key] | None = None) -> None:
        """fsync the given unsynced chunk versions (None: every one), with the unsynced
        versions their patches build on, then their directories. A version named that this
        keeper does not hold raises NotFound."""
        async with self._sync_lock:
            with self._lock:
                if chunks is None:
                    todo = set(self.unsynced)
                else:
                    for chunk_id, version in chunks:
                        check_ids(chunk_id, version)
                        if (chunk_id, version) not in self.chunks:
                            raise NotFound(f"chunk {chunk_id:x} v{version} is not here")
                    todo = set(chunks) & self.unsynced
                    for key in list(todo):
                        layout = self.layouts.get(key)
                        for chunk_id, version, _ in layout.files if layout else ():
                            if (chunk_id, version) in self.unsynced:
                                todo.add((chunk_id, version))
                files = [self._own(key) for key in sorted(todo)]
            if files:
                await trio.to_thread.run_sync(self._sync_files, files, abandon_on_cancel=False)

    def _sync_files(self, files: list[FileKey]) -> None:
        dirs = set()
        for where in files:
            path = self._file_path(where)
            try:
                _fsync_path(path)
            except FileNotFoundError:
                pass  # deleted meanwhile: nothing left to sync
            dirs.add(path.parent)
        for directory in dirs:
            _fsync_path(directory)
        with self._lock:
            self.unsynced.difference_update((c, v) for c, v, _ in files)
            self.syncs += len(files)

    async def write_back(self) -> None:
        """Put every unsynced chunk file on the disk at most WRITEBACK_S after its write."""
        # A keeper that crashed may have left chunk files in the page cache only: one sync of
        # everything at start covers them without reading the inventory.
        await trio.to_thread.run_sync(os.sync)
        while True:
            await trio.sleep(WRITEBACK_S)
            if self.unsynced:
                try:
                    await self.sync()
                except OSError:
                    log.exception("write-back of unsynced chunks failed")

    # --- compaction -----------------------------------------------------------------------

    def compaction_due(self) -> list[Key]:
        """Patched versions to fold into full files now: the newest of each chunk, once it is
        deep or the chunk has been idle for COMPACT_IDLE_S (older ones are on their way out:
        the tracker deletes them once a newer one is committed)."""
        now = time.monotonic()
        with self._lock:
            newest: dict[int, int] = {}
            for chunk_id, version in self.chunks:
                newest[chunk_id] = max(newest.get(chunk_id, 0), version)
            return [
                key
                for key, layout in self.layouts.items()
                if newest[key[0]] == key[1]
                and (
                    layout.depth >= COMPACT_DEPTH
                    or now - self.last_patch.get(key[0], 0) >= COMPACT_IDLE_S
                )
            ]

    def compact(self, chunk_id: int, version: int) -> bool:
        """Rewrite a patched version as a full file (fsynced), then drop the patch files no
        version uses any more. Returns False if the version changed or went meanwhile."""
        key = (chunk_id, version)
        with self._lock:
            layout = self.layouts.get(key)
        if layout is None:
            return False
        data = self._read_layout(chunk_id, version, layout, 0, len(layout.blocks))
        if checksum.verify_blocks(data, layout.checksums) is not None:
            log.warning("chunk %d v%d: not compacted, a block fails its checksum", *key)
            return False
        self._write_sync(chunk_id, version, data, layout.checksums, True, only_if=layout)
        with self._lock:
            done = key in self.chunks and key not in self.layouts
            self.compactions += done
        return done

    async def compact_loop(self) -> None:
        while True:
            await trio.sleep(1.0)
            for chunk_id, version in self.compaction_due():
                try:
                    await trio.to_thread.run_sync(self.compact, chunk_id, version)
                except (OSError, NotFound, ChecksumMismatch, NoSpace) as exc:
                    log.warning("compacting chunk %d v%d failed: %s", chunk_id, version, exc)

    # --- read -----------------------------------------------------------------------------

    async def read(self, chunk_id: int, version: int, offset: int, length: int) -> ChunkRead:
        self._check_held(chunk_id, version)
        return await trio.to_thread.run_sync(self._read_sync, chunk_id, version, offset, length)

    async def open_read(
        self, chunk_id: int, version: int, offset: int, length: int
    ) -> tuple[ChunkSpan, FileRegion]:
        """Like `read`, but the blocks stay in their files: the region is sent with sendfile."""
        self._check_held(chunk_id, version)
        return await trio.to_thread.run_sync(
            self._open_read_sync, chunk_id, version, offset, length
        )

    def _check_held(self, chunk_id: int, version: int) -> None:
        check_ids(chunk_id, version)
        if (chunk_id, version) not in self.chunks:
            raise NotFound(f"chunk {chunk_id:x} v{version} is not here")

    def _open(self, where: FileKey) -> int:
        try:
            return os.open(self._file_path(where), os.O_RDONLY)
        except FileNotFoundError:
            raise NotFound(f"chunk {where[0]:x} v{where[1]} is gone") from None

    @staticmethod
    def _blocks(layout: Layout, offset: int, length: int) -> tuple[int, int]:
        """The blocks [first, stop) covering [offset, offset+length) (length 0: to the end)."""
        total = layout.length
        if offset < 0 or length < 0 or offset > total:
            raise InvalidArgument("range outside the chunk")
        end = total if length == 0 else min(total, offset + length)
        first = offset // checksum.BLOCK_SIZE
        stop = max(first, checksum.block_count(end))
        return first, stop

    def _read_layout(
        self, chunk_id: int, version: int, layout: Layout, first: int, stop: int
    ) -> bytes:
        parts = []
        fds: dict[FileKey, int] = {}
        try:
            for where, offset, size in layout.pieces(first, stop):
                if where not in fds:
                    fds[where] = self._open(where)
                piece = os.pread(fds[where], size, offset)
                if len(piece) != size:
                    raise ChecksumMismatch(f"chunk {chunk_id:x} v{version}: file is truncated")
                parts.append(piece)
        finally:
            for fd in fds.values():
                os.close(fd)
        return b"".join(parts)

    def _read_sync(self, chunk_id: int, version: int, offset: int, length: int) -> ChunkRead:
        layout = self.layout(chunk_id, version)
        first, stop = self._blocks(layout, offset, length)
        data = self._read_layout(chunk_id, version, layout, first, stop)
        return ChunkRead(layout.length, first, layout.checksums, data)

    def _open_read_sync(
        self, chunk_id: int, version: int, offset: int, length: int
    ) -> tuple[ChunkSpan, FileRegion]:
        layout = self.layout(chunk_id, version)
        first, stop = self._blocks(layout, offset, length)
        fds: dict[FileKey, int] = {}
        try:
            pieces = []
            for where, file_offset, size in layout.pieces(first, stop):
                if where not in fds:
                    fds[where] = self._open(where)
                fd = fds[where]
                if os.fstat(fd).st_size < file_offset + size:
                    raise ChecksumMismatch(f"chunk {chunk_id:x} v{version}: file is truncated")
                pieces.append((fd, file_offset, size))
        except BaseException:
            for fd in fds.values():
                os.close(fd)
            raise
        if not pieces:  # an empty range of an empty chunk: a region of nothing
            fd = self._open(self._own((chunk_id, version)))
            pieces = [(fd, 0, 0)]
        head, *more = pieces
        region = FileRegion(head[0], head[1], head[2], tuple(more))
        return ChunkSpan(layout.length, first, layout.checksums), region

    def verify(self, chunk_id: int, version: int) -> bool:
        """Re-read a whole chunk and check it (the scrubber's unit of work)."""
        try:
            chunk = self._read_sync(chunk_id, version, 0, 0)
        except NotFound:
            return True  # deleted meanwhile: nothing left to be wrong
        except (ChecksumMismatch, OSError, struct.error):
            return False
        return (
            checksum.verify_blocks(chunk.data, chunk.checksums) is None
            and len(chunk.data) == chunk.length
        )

    # --- delete ---------------------------------------------------------------------------

    async def delete(self, chunk_id: int, version: int) -> bool:
        # The tracker deletes an old version once a newer one is committed; if that newer one
        # is not on the disk yet, a power cut would leave neither: write back first.
        if self.unsynced:
            await self.sync()
        return await trio.to_thread.run_sync(self._delete_sync, chunk_id, version)

    def _delete_sync(self, chunk_id: int, version: int) -> bool:
        check_ids(chunk_id, version)
        with self._lock:
            held = (chunk_id, version) in self.chunks
            orphans = [
                where for where in self._drop_live((chunk_id, version)) if not self.refs[where]
            ]
        self._unlink(orphans)
        return held


def _full_layout(chunk_id: int, version: int, length: int, checksums: bytes) -> Layout:
    """The layout of a version kept in its full file."""
    where: FileKey = (chunk_id, version, "f")
    start = data_offset(length)
    count = checksum.block_count(length)
    blocks = tuple((where, start + i * checksum.BLOCK_SIZE) for i in range(count))
    return Layout(length, checksums, blocks, 0)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
