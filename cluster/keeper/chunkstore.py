"""Chunk files on a keeper's disk.

Layout: `<data>/chunks/<XX>/chunk_<16 hex id>_<8 hex version>.dfs`, where XX is the id's low
byte, so no directory grows past 1/256 of the chunks. A file is a header and the data:

    magic "DFSCHNK1" | length u64 | block count u32 | block checksums u64 * n | pad | data

with the data starting at the next 4 KiB boundary. Checksums live beside the data they cover,
so a chunk file is self-describing and the scrubber needs nothing else.

Writes are atomic: a temporary file in the same directory, renamed into place, so a crash of
any process leaves either no chunk file or the whole new one. Durability has two levels, as on
a local filesystem (DESIGN.md, guarantee 1): a write with `sync` fsyncs the file before the
rename and the directory after it (safe from a power cut when it returns); one without leaves
that to the write-back, which fsyncs every unsynced chunk file within WRITEBACK_S, or to
`sync`, which a client's fsync asks for. A power cut before either may leave a chunk file
empty or torn: its header or checksums then fail, it is never served, and the tracker copies
it again from another keeper. An old version is deleted only after the write-back (so after
the newer version is on the disk). Leftover temporaries are removed at start.

Ids come from the wire as integers and are range-checked; no path is ever built from anything
else, so no request can reach outside the data directory. Blocking disk work runs in worker
threads.
"""

from __future__ import annotations

import logging
import os
import re
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import trio

from cluster import checksum
from cluster.errors import ChecksumMismatch, InvalidArgument, NoSpace, NotFound
from cluster.protocol import FileRegion

log = logging.getLogger(__name__)

MAGIC = b"DFSCHNK1"
HEAD = struct.Struct("<8sQI")
PAGE = 4096
MAX_CHUNK_ID = (1 << 63) - 1
MAX_VERSION = (1 << 32) - 1
MAX_CHUNK_BYTES = 64 << 20
# Unsynced chunk files are fsynced at most this long after they were written (ext4's commit
# interval is 5 s).
WRITEBACK_S = 2.0
FILE_RE = re.compile(r"^chunk_([0-9a-f]{16})_([0-9a-f]{8})\.dfs$")


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
    file_offset: int  # where the whole blocks from first_block start in the file
    file_length: int


@dataclass(frozen=True, slots=True)
class ChunkRead:
    length: int  # the chunk's whole length
    first_block: int
    checksums: bytes  # of every block of the chunk
    data: bytes  # whole blocks from first_block


class ChunkStore:
    def __init__(self, data_dir: Path, capacity_bytes: int = 0) -> None:
        self.root = data_dir / "chunks"
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.configured_capacity = capacity_bytes
        self.used_bytes = 0
        self.chunks: dict[tuple[int, int], int] = {}  # (id, version) -> file size
        # Chunk versions written without fsync, not yet on the disk (write-back, `sync`).
        self.unsynced: set[tuple[int, int]] = set()
        self._lock = threading.Lock()
        self._sync_lock = trio.Lock()
        self.syncs = 0  # chunk files fsynced after their write (write-back and `sync`)

    # --- paths ----------------------------------------------------------------------------

    def path(self, chunk_id: int, version: int) -> Path:
        check_ids(chunk_id, version)
        return self.root / f"{chunk_id & 0xFF:02x}" / f"chunk_{chunk_id:016x}_{version:08x}.dfs"

    # --- inventory ------------------------------------------------------------------------

    def scan(self) -> None:
        """Build the inventory from file names (no data is read: start-up stays fast)."""
        found: dict[tuple[int, int], int] = {}
        for sub in self.root.iterdir():
            if not sub.is_dir():
                continue
            for entry in os.scandir(sub):
                if entry.name.startswith(".tmp-"):
                    os.unlink(entry.path)
                    continue
                match = FILE_RE.match(entry.name)
                if match:
                    found[(int(match[1], 16), int(match[2], 16))] = entry.stat().st_size
        with self._lock:
            self.chunks = found
            self.used_bytes = sum(found.values())

    @property
    def capacity_bytes(self) -> int:
        if self.configured_capacity:
            return self.configured_capacity
        st = os.statvfs(self.root)
        return self.used_bytes + st.f_bavail * st.f_frsize

    def held(self) -> list[list[int]]:
        with self._lock:
            return [[c, v] for c, v in self.chunks]

    # --- write ----------------------------------------------------------------------------

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
        size = data_offset(len(data)) + len(data)
        if self.configured_capacity and self.used_bytes + size > self.configured_capacity:
            raise NoSpace("keeper capacity reached")
        await trio.to_thread.run_sync(self._write_sync, chunk_id, version, data, checksums, sync)

    def _write_sync(
        self, chunk_id: int, version: int, data: bytearray | bytes, checksums: bytes, sync: bool
    ) -> None:
        bad = checksum.verify_blocks(data, checksums)
        if bad is not None:
            raise ChecksumMismatch(f"chunk {chunk_id:x}: block {bad} arrived corrupt")
        final = self.path(chunk_id, version)
        final.parent.mkdir(exist_ok=True, mode=0o700)
        tmp = final.parent / f".tmp-{final.name}-{os.getpid()}-{threading.get_ident()}"
        offset = data_offset(len(data))
        header = HEAD.pack(MAGIC, len(data), checksum.block_count(len(data))) + checksums
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.pwrite(fd, header + bytes(offset - len(header)), 0)
            view = memoryview(data)
            written = 0
            while written < len(view):
                written += os.pwrite(fd, view[written:], offset + written)
            if sync:
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
            _fsync_path(final.parent)
        size = offset + len(data)
        with self._lock:
            old = self.chunks.get((chunk_id, version))
            self.chunks[(chunk_id, version)] = size
            self.used_bytes += size - (old or 0)
            if sync:
                self.unsynced.discard((chunk_id, version))
            else:
                self.unsynced.add((chunk_id, version))

    # --- durability -----------------------------------------------------------------------

    async def sync(self, chunks: list[tuple[int, int]] | None = None) -> None:
        """fsync the given unsynced chunk versions (None: every one), then their directories.
        A version named that this keeper does not hold raises NotFound."""
        async with self._sync_lock:
            with self._lock:
                if chunks is None:
                    todo = sorted(self.unsynced)
                else:
                    for chunk_id, version in chunks:
                        check_ids(chunk_id, version)
                        if (chunk_id, version) not in self.chunks:
                            raise NotFound(f"chunk {chunk_id:x} v{version} is not here")
                    todo = sorted(set(chunks) & self.unsynced)
            if todo:
                await trio.to_thread.run_sync(self._sync_files, todo, abandon_on_cancel=False)

    def _sync_files(self, todo: list[tuple[int, int]]) -> None:
        dirs = set()
        for chunk_id, version in todo:
            path = self.path(chunk_id, version)
            try:
                _fsync_path(path)
            except FileNotFoundError:
                pass  # deleted meanwhile: nothing left to sync
            dirs.add(path.parent)
        for directory in dirs:
            _fsync_path(directory)
        with self._lock:
            self.unsynced.difference_update(todo)
            self.syncs += len(todo)

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

    # --- read -----------------------------------------------------------------------------

    async def read(self, chunk_id: int, version: int, offset: int, length: int) -> ChunkRead:
        self._check_held(chunk_id, version)
        return await trio.to_thread.run_sync(self._read_sync, chunk_id, version, offset, length)

    async def open_read(
        self, chunk_id: int, version: int, offset: int, length: int
    ) -> tuple[ChunkSpan, FileRegion]:
        """Like `read`, but the blocks stay in the file: the region is sent with sendfile."""
        self._check_held(chunk_id, version)
        return await trio.to_thread.run_sync(
            self._open_read_sync, chunk_id, version, offset, length
        )

    def _check_held(self, chunk_id: int, version: int) -> None:
        check_ids(chunk_id, version)
        if (chunk_id, version) not in self.chunks:
            raise NotFound(f"chunk {chunk_id:x} v{version} is not here")

    def _open(self, chunk_id: int, version: int) -> int:
        try:
            return os.open(self.path(chunk_id, version), os.O_RDONLY)
        except FileNotFoundError:
            raise NotFound(f"chunk {chunk_id:x} v{version} is gone") from None

    def _read_sync(self, chunk_id: int, version: int, offset: int, length: int) -> ChunkRead:
        fd = self._open(chunk_id, version)
        try:
            span = self._span(fd, chunk_id, version, offset, length)
            data = os.pread(fd, span.file_length, span.file_offset)
        finally:
            os.close(fd)
        return ChunkRead(span.length, span.first_block, span.checksums, data)

    def _open_read_sync(
        self, chunk_id: int, version: int, offset: int, length: int
    ) -> tuple[ChunkSpan, FileRegion]:
        fd = self._open(chunk_id, version)
        try:
            span = self._span(fd, chunk_id, version, offset, length)
            if os.fstat(fd).st_size < span.file_offset + span.file_length:
                raise ChecksumMismatch(f"chunk {chunk_id:x} v{version}: file is truncated")
        except BaseException:
            os.close(fd)
            raise
        return span, FileRegion(fd, span.file_offset, span.file_length)

    @staticmethod
    def _span(fd: int, chunk_id: int, version: int, offset: int, length: int) -> ChunkSpan:
        """Where the whole blocks covering [offset, offset+length) lie in the open chunk file
        (length 0: to the end), with the checksums from its header."""
        head = os.pread(fd, HEAD.size, 0)
        if len(head) < HEAD.size:  # a power cut before the write-back can leave it empty
            raise ChecksumMismatch(f"chunk {chunk_id:x} v{version}: file is truncated")
        magic, total, blocks = HEAD.unpack(head)
        if magic != MAGIC or blocks != checksum.block_count(total):
            raise ChecksumMismatch(f"chunk {chunk_id:x} v{version}: bad header")
        sums = os.pread(fd, blocks * checksum.CHECKSUM_SIZE, HEAD.size)
        if offset < 0 or length < 0 or offset > total:
            raise InvalidArgument("range outside the chunk")
        end = total if length == 0 else min(total, offset + length)
        first = offset // checksum.BLOCK_SIZE
        start = first * checksum.BLOCK_SIZE
        stop = min(
            total, (end + checksum.BLOCK_SIZE - 1) // checksum.BLOCK_SIZE * checksum.BLOCK_SIZE
        )
        return ChunkSpan(total, first, sums, data_offset(total) + start, stop - start)

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
        try:
            os.unlink(self.path(chunk_id, version))
        except FileNotFoundError:
            pass
        with self._lock:
            size = self.chunks.pop((chunk_id, version), None)
            self.unsynced.discard((chunk_id, version))
            if size is not None:
                self.used_bytes -= size
        return size is not None


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
