"""The one client core: the `dfs` command, the Python API and the mount all go through here.

`Client` talks to the tracker for names and chunk lists and to keepers for chunk bytes.

Tracker calls retry `Unavailable` (connection refused, reset, timeout) inside one
`retry_window_s`, so a tracker restart is a pause, not an error (guarantee 5); so does
`StoreUnavailable`, the tracker's answer while its PostgreSQL database is out of reach.
Keeper calls fail over: a read tries each copy in turn (nearest/healthiest first), checking
every block's xxh3 against checksums whose digest the tracker vouches for, and reports bad
copies; a write that fails asks the tracker for a placement without the failed keepers and
tries again.
Parallelism is bounded by one `CapacityLimiter` of `transfers` per client.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import stat as stat_mod
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import trio

from cluster import checksum
from cluster import messages as m
from cluster.auth import Credentials
from cluster.errors import (
    ChecksumMismatch,
    ConnectionLost,
    DfsError,
    IsADir,
    NoSpace,
    NotActive,
    NotADir,
    NotFound,
    StoreUnavailable,
    Unavailable,
    collapse,
)
from cluster.locks import LockRange, OpenMark
from cluster.protocol import PAYLOADS, SLOWEST_TRANSFER_BYTES_PER_S
from cluster.rpc import ConnectionPool
from cluster.trackers import Trackers, roles

log = logging.getLogger(__name__)

R = TypeVar("R", bound=m.Message)
T = TypeVar("T")

ROOT_INO = 1
READDIR_PAGE = 1000
# How often a write retries with a fresh placement before giving up.
WRITE_ATTEMPTS = 4
# Writes up to this size go to every copy at once rather than down a pipeline (`_send_chunk`).
FANOUT_MAX_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class Attr:
    """An inode's attributes as the tracker last reported them."""

    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    generation: int
    stored: int = 0  # bytes in committed chunks, holes not counted (st_blocks)
    xattrs: int = 0  # how many extended attributes the inode has

    @classmethod
    def from_wire(cls, values: list[int]) -> Attr:
        if len(values) != 13:
            raise Unavailable("malformed attributes from the tracker")
        return cls(*values)

    @property
    def is_dir(self) -> bool:
        return stat_mod.S_ISDIR(self.mode)

    @property
    def is_file(self) -> bool:
        return stat_mod.S_ISREG(self.mode)


@dataclass(frozen=True, slots=True)
class DirEntry:
    name: bytes
    attr: Attr
    next_offset: int  # the readdir cookie that continues after this entry


@dataclass(frozen=True, slots=True)
class Placement:
    """A chunk version allocated by the tracker and not written yet, and where it goes."""

    chunk_id: int
    version: int
    keepers: tuple[str, ...]

    @classmethod
    def from_wire(cls, raw: list[Any]) -> Placement:
        chunk_id, version, keepers = raw
        return cls(int(chunk_id), int(version), tuple(str(k) for k in keepers))

    def as_allocation(self) -> m.AllocateReply:
        return m.AllocateReply(
            chunk_id=self.chunk_id,
            version=self.version,
            keepers=list(self.keepers),
            chunk_size_bytes=0,
        )


@dataclass(frozen=True, slots=True)
class ChunkInfo:
    """One committed (or just written) chunk version and where its copies are."""

    index: int
    chunk_id: int
    version: int
    length: int
    digest: int
    keepers: tuple[str, ...]

    def to_wire(self) -> list[object]:
        return [
            self.index,
            self.chunk_id,
            self.version,
            self.length,
            self.digest,
            list(self.keepers),
        ]

    @classmethod
    def from_wire(cls, values: list[Any]) -> ChunkInfo:
        index, chunk_id, version, length, digest, keepers = values
        return cls(index, chunk_id, version, length, digest, tuple(str(k) for k in keepers))


@dataclass(slots=True)
class FileChunks:
    """A file's committed chunk list: `chunks` by index; a missing index is a hole."""

    size: int
    chunk_size: int
    chunks: dict[int, ChunkInfo] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class FsStats:
    capacity_bytes: int
    used_bytes: int
    free_bytes: int
    files: int


class Client:
    """Connect with `async with Client.connect(tracker, credentials) as client:`."""

    def __init__(
        self,
        tracker: str,
        credentials: Credentials,
        *,
        transfers: int = 8,
        retry_window_s: float = 30.0,
        io_timeout_s: float = 10.0,
        role: str = "client",
    ) -> None:
        self.tracker = tracker
        self.trackers = Trackers(tracker)  # which of them is active, as last seen
        self.retry_window_s = retry_window_s
        self.io_timeout_s = io_timeout_s
        self.session = uuid.uuid4().hex
        self.pool = ConnectionPool(role, credentials)
        self.transfers = trio.CapacityLimiter(max(1, transfers))
        # Called with a directory's attributes whenever a reply carries them fresh (the parent
        # of a create, mkdir, symlink, link, unlink or rmdir), for a cache to keep.
        self.dir_changed: Callable[[Attr], object] = lambda attr: None
        # Keepers that recently failed us: tried last until they answer again.
        self._suspect: dict[str, float] = {}

    @classmethod
    @asynccontextmanager
    async def connect(
        cls, tracker: str, credentials: Credentials, **options: Any
    ) -> AsyncIterator[Client]:
        client = cls(tracker, credentials, **options)
        try:
            yield client
        finally:
            with trio.CancelScope(shield=True):
                await client.pool.aclose()

    # --- tracker calls --------------------------------------------------------------------

    async def _tracker(self, request: m.Message, response: type[R]) -> R:
        """Call the active tracker, retrying while it is unreachable or while the trackers
        hand over (cluster/trackers.py), for at most retry_window_s."""
        delay = 0.05
        hops = 0  # NotActive answers followed in a row
        deadline = trio.current_time() + self.retry_window_s
        while True:
            addr = self.trackers.current
            try:
                with trio.fail_after(max(self.io_timeout_s, 30.0)):
                    reply, _ = await self.pool.call(addr, request, response)
                return reply
            except StoreUnavailable as exc:
                # The tracker is up, its database is not (restarting, failing over).
                if trio.current_time() + delay > deadline:
                    raise
                log.info("tracker's database unreachable (%s), retrying in %.2fs", exc, delay)
            except NotActive as exc:
                # A standby: go where it points, or to the next tracker.
                if trio.current_time() + delay > deadline:
                    raise Unavailable(f"no active tracker among {self.trackers}: {exc}") from None
                self.trackers.follow(addr, exc)
                hops += 1
                if exc.hint and hops <= len(self.trackers.addrs):
                    continue  # straight to the named tracker
                log.info("no active tracker yet (%s), retrying in %.2fs", exc, delay)
            except (ConnectionLost, trio.TooSlowError) as exc:
                if trio.current_time() + delay > deadline:
                    raise Unavailable(f"tracker {addr} unreachable: {exc}") from None
                log.info("tracker %s unreachable (%s), retrying in %.2fs", addr, exc, delay)
                self.pool.drop(addr)
                self.trackers.next(addr)
            hops = 0
            await trio.sleep(delay)
            delay = min(delay * 2, 1.0)

    def _note_parent(self, parent_attr: list[int] | None) -> None:
        if parent_attr is not None:
            self.dir_changed(Attr.from_wire(parent_attr))

    async def _attr(self, request: m.Message) -> Attr:
        reply = await self._tracker(request, m.AttrReply)
        self._note_parent(reply.parent_attr)
        return Attr.from_wire(reply.attr)

    async def lookup(self, parent: int, name: bytes) -> Attr:
        return await self._attr(m.Lookup(parent=parent, name=name))

    async def getattr(self, ino: int) -> Attr:
        return await self._attr(m.GetAttr(ino=ino))

    async def setattr(
        self,
        ino: int,
        *,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        size_bytes: int | None = None,
        atime_ns: int | None = None,
        mtime_ns: int | None = None,
        ctime_ns: int | None = None,
        opened: OpenMark | None = None,
        locks_table: str = "",
    ) -> Attr:
        """Change what is not None; `opened`: the open a size change is made through,
        `locks_table`: the lock table of the locks held on the file while it is made."""
        return await self._attr(
            m.SetAttr(
                ino=ino,
                mode=mode,
                uid=uid,
                gid=gid,
                size_bytes=size_bytes,
                atime_ns=atime_ns,
                mtime_ns=mtime_ns,
                ctime_ns=ctime_ns,
                session=self.session,
                opened=_wire_mark(opened),
                locks_table=locks_table,
            )
        )

    async def punch_chunks(
        self,
        ino: int,
        first_index: int,
        end_index: int,
        opened: OpenMark | None = None,
        locks_table: str = "",
    ) -> Attr:
        """Chunks `first_index` to `end_index - 1` become holes (messages.PunchChunks)."""
        return await self._attr(
            m.PunchChunks(
                ino=ino,
                first_index=first_index,
                end_index=end_index,
                session=self.session,
                opened=_wire_mark(opened),
                locks_table=locks_table,
            )
        )

    async def setxattr(self, ino: int, name: bytes, value: bytes, flags: int = 0) -> Attr:
        """Set extended attribute `name` (with its namespace, b"user.x"); `flags` takes
        XATTR_CREATE and XATTR_REPLACE (os.XATTR_*). Returns the new attributes (ctime)."""
        return await self._attr(m.SetXattr(ino=ino, name=name, value=value, flags=flags))

    async def getxattr(self, ino: int, name: bytes) -> bytes:
        """The value of extended attribute `name`; NoData (ENODATA) if there is none."""
        return (await self._tracker(m.GetXattr(ino=ino, name=name), m.GetXattrReply)).value

    async def listxattr(self, ino: int) -> list[bytes]:
        """The names of every extended attribute of `ino`, every namespace."""
        return (await self._tracker(m.ListXattr(ino=ino), m.ListXattrReply)).names

    async def removexattr(self, ino: int, name: bytes) -> Attr:
        """Remove extended attribute `name` (NoData if there is none); the new attributes."""
        return await self._attr(m.RemoveXattr(ino=ino, name=name))

    async def readdir(self, ino: int, offset: int = 0, limit: int = READDIR_PAGE) -> list[DirEntry]:
        reply = await self._tracker(m.ReadDir(ino=ino, offset=offset, limit=limit), m.ReadDirReply)
        return [DirEntry(bytes(n), Attr.from_wire(a), int(c)) for n, a, c in reply.entries]

    async def mknod(
        self, parent: int, name: bytes, mode: int, uid: int = 0, gid: int = 0, rdev: int = 0
    ) -> Attr:
        """Create a node; `mode` carries the type (S_IFREG, S_IFDIR, S_IFIFO, ...)."""
        return await self._attr(
            m.MakeNode(parent=parent, name=name, mode=mode, uid=uid, gid=gid, rdev=rdev)
        )

    async def mkdir(
        self, parent: int, name: bytes, mode: int = 0o755, uid: int = 0, gid: int = 0
    ) -> Attr:
        return await self.mknod(parent, name, stat_mod.S_IFDIR | (mode & 0o7777), uid, gid)

    async def create(
        self, parent: int, name: bytes, mode: int, uid: int = 0, gid: int = 0
    ) -> tuple[Attr, int, Placement | None, OpenMark | None]:
        """Create a regular file and open it for this session in one trip (as `mknod` and
        `open_file`); returns its attributes, its chunk size, a placement for its chunk 0
        (for `write_chunk`; None if no keeper could take it) and the open's mark (for the
        writes through it: `commit`). Release it with `release_files`, naming the placement as
        unused if nothing was written with it."""
        reply = await self._tracker(
            m.MakeNode(
                parent=parent,
                name=name,
                mode=stat_mod.S_IFREG | (mode & 0o7777),
                uid=uid,
                gid=gid,
                session=self.session,
            ),
            m.AttrReply,
        )
        self._note_parent(reply.parent_attr)
        first = Placement.from_wire(reply.first_chunk) if reply.first_chunk else None
        return Attr.from_wire(reply.attr), reply.chunk_size_bytes, first, _open_mark(reply)

    async def symlink(
        self, parent: int, name: bytes, target: bytes, uid: int = 0, gid: int = 0
    ) -> Attr:
        return await self._attr(
            m.Symlink(parent=parent, name=name, target=target, uid=uid, gid=gid)
        )

    async def readlink(self, ino: int) -> bytes:
        return (await self._tracker(m.ReadLink(ino=ino), m.ReadLinkReply)).target

    async def link(self, ino: int, new_parent: int, new_name: bytes) -> Attr:
        return await self._attr(m.Link(ino=ino, new_parent=new_parent, new_name=new_name))

    async def unlink(self, parent: int, name: bytes) -> tuple[int, int]:
        """Remove a name; returns (inode, its remaining link count)."""
        reply = await self._tracker(m.Unlink(parent=parent, name=name), m.UnlinkReply)
        self._note_parent(reply.parent_attr)
        return reply.ino, reply.nlink

    async def rmdir(self, parent: int, name: bytes) -> None:
        reply = await self._tracker(m.RemoveDir(parent=parent, name=name), m.UnlinkReply)
        self._note_parent(reply.parent_attr)

    async def rename(
        self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes, flags: int = 0
    ) -> None:
        await self._tracker(
            m.Rename(
                old_parent=old_parent,
                old_name=old_name,
                new_parent=new_parent,
                new_name=new_name,
                flags=flags,
            ),
            m.OkReply,
        )

    async def open_file(self, ino: int) -> Attr:
        """Hold `ino` open for this client: an unlink keeps its data until `release_file`.

        Holds are counted per client session: every `open_file` needs one `release_file`."""
        return (await self.open_file_and_chunks(ino))[0]

    async def open_file_and_chunks(
        self, ino: int
    ) -> tuple[Attr, FileChunks | None, OpenMark | None]:
        """`open_file`, the file's chunk list when it is small enough to come with it, and the
        open's mark, for the writes made through it to carry (`commit`, `setattr`,
        `punch_chunks`): the tracker refuses them if this session's locks on the file were
        lost to an expired lease after the open (LockFenced)."""
        reply = await self._tracker(m.OpenFile(ino=ino, session=self.session), m.AttrReply)
        attr = Attr.from_wire(reply.attr)
        if reply.chunks is None:
            return attr, None, _open_mark(reply)
        chunks = FileChunks(attr.size, reply.chunk_size_bytes, _chunk_map(reply.chunks))
        return attr, chunks, _open_mark(reply)

    async def release_file(self, ino: int) -> None:
        await self.release_files([ino])

    async def release_files(self, inos: list[int], unused: Sequence[Placement] = ()) -> None:
        """Give back one `open_file` (or `create`) per entry of `inos`, and the placements
        from `create` that were never written."""
        await self._tracker(
            m.ReleaseFiles(
                inos=inos,
                session=self.session,
                unused=[[p.chunk_id, p.version] for p in unused],
            ),
            m.OkReply,
        )

    # --- locks (cluster/locks.py) --------------------------------------------------

    async def set_lock(
        self, ino: int, owner: int, lock: LockRange, wait_s: float = 0.0
    ) -> m.LockReply:
        """Take, convert or release a lock of this session's `owner`; with `wait_s`, the
        tracker holds the request that long while another owner's lock is in the way."""
        request = m.SetLock(
            ino=ino, session=self.session, owner=owner, flock=lock.flock, type=lock.type,
            start=lock.start, end=lock.end, pid=lock.pid, wait_s=wait_s,
        )  # fmt: skip
        return await self._tracker(request, m.LockReply)

    async def get_lock(self, ino: int, owner: int, lock: LockRange) -> m.LockReply:
        """The first lock of another owner that conflicts with this one (F_GETLK)."""
        request = m.GetLock(
            ino=ino, session=self.session, owner=owner, type=lock.type, start=lock.start,
            end=lock.end,
        )  # fmt: skip
        return await self._tracker(request, m.LockReply)

    async def release_locks(self, ino: int, owner: int) -> None:
        await self._tracker(m.ReleaseLocks(ino=ino, session=self.session, owner=owner), m.OkReply)

    async def reclaim_locks(self, locks: list[list[int]]) -> m.LockReply:
        """Hand a new tracker (in its grace period) the locks this session held."""
        return await self._tracker(m.ReclaimLocks(session=self.session, locks=locks), m.LockReply)

    async def keep_locks(self, table: str) -> None:
        """Renew this session's lock lease; LocksLost if the tracker no longer holds them."""
        await self._tracker(m.KeepLocks(session=self.session, table=table), m.OkReply)

    async def sync(self) -> None:
        """Wait until every change this client made is on the tracker's disk (chunk commits
        are already; namespace changes reach it within a second on their own)."""
        await self._tracker(m.Sync(), m.OkReply)

    async def statfs(self) -> FsStats:
        r = await self._tracker(m.StatFs(), m.StatFsReply)
        return FsStats(r.capacity_bytes, r.used_bytes, r.free_bytes, r.files)

    async def tracker_roles(self) -> list[dict[str, Any]]:
        """Every tracker of the list: address, role (active, standby, unreachable), lease."""
        return await roles(self.pool, self.trackers.addrs)

    async def cluster_status(self) -> m.ClusterStatusReply:
        return await self._tracker(m.ClusterStatus(), m.ClusterStatusReply)

    async def fsck(self, path: str = "/") -> m.FsckReply:
        return await self._tracker(m.Fsck(path=os.fsencode(path)), m.FsckReply)

    async def set_replication(self, path: str, copies: int) -> None:
        await self._tracker(m.SetReplication(path=os.fsencode(path), copies=copies), m.OkReply)

    async def decommission(self, keeper: str, cancel: bool = False) -> None:
        await self._tracker(m.Decommission(keeper=keeper, cancel=cancel), m.OkReply)

    # --- paths (for the CLI and the Python API) ------------------------------------------

    async def resolve(self, path: str) -> Attr:
        return await self._attr(m.ResolvePath(path=os.fsencode(path)))

    async def _parent_and_name(self, path: str) -> tuple[int, bytes]:
        parent_path, _, name = path.rstrip("/").rpartition("/")
        if not name:
            raise NotFound(f"{path}: no name")
        parent = await self.resolve(parent_path or "/")
        if not parent.is_dir:
            raise NotADir(f"{parent_path}: not a directory")
        return parent.ino, os.fsencode(name)

    async def list_dir(self, path: str) -> list[DirEntry]:
        attr = await self.resolve(path)
        if not attr.is_dir:
            raise NotADir(f"{path}: not a directory")
        entries: list[DirEntry] = []
        offset = 0
        while page := await self.readdir(attr.ino, offset):
            entries.extend(page)
            offset = page[-1].next_offset
        return entries

    async def make_dirs(self, path: str, mode: int = 0o755) -> Attr:
        """mkdir -p: create every missing directory on the way."""
        attr = await self.resolve("/")
        walked = ""
        for part in [p for p in path.split("/") if p]:
            walked += "/" + part
            try:
                attr = await self.lookup(attr.ino, os.fsencode(part))
            except NotFound:
                attr = await self.mkdir(attr.ino, os.fsencode(part), mode, os.getuid(), os.getgid())
            if not attr.is_dir:
                raise NotADir(f"{walked}: not a directory")
        return attr

    async def remove(self, path: str, recursive: bool = False) -> None:
        parent, name = await self._parent_and_name(path)
        attr = await self.lookup(parent, name)
        if attr.is_dir:
            if recursive:
                await self._remove_tree(attr.ino)
            await self.rmdir(parent, name)
        else:
            await self.unlink(parent, name)

    async def _remove_tree(self, ino: int) -> None:
        while entries := await self.readdir(ino, 0):
            for entry in entries:
                if entry.attr.is_dir:
                    await self._remove_tree(entry.attr.ino)
                    await self.rmdir(ino, entry.name)
                else:
                    await self.unlink(ino, entry.name)

    async def move(self, src: str, dst: str) -> None:
        old_parent, old_name = await self._parent_and_name(src)
        try:
            target = await self.resolve(dst)
        except NotFound:
            target = None
        if target is not None and target.is_dir:
            new_parent, new_name = target.ino, old_name
        else:
            new_parent, new_name = await self._parent_and_name(dst)
        await self.rename(old_parent, old_name, new_parent, new_name)

    # --- chunks ---------------------------------------------------------------------------

    async def get_chunks(self, ino: int, first_index: int = 0, count: int = 1 << 30) -> FileChunks:
        reply = await self._tracker(
            m.GetChunks(ino=ino, first_index=first_index, count=count), m.ChunksReply
        )
        return FileChunks(reply.size_bytes, reply.chunk_size_bytes, _chunk_map(reply.chunks))

    def _ordered(self, keepers: tuple[str, ...]) -> list[str]:
        """Healthy keepers first, in the tracker's order; recently failed ones last."""
        now = trio.current_time()
        self._suspect = {a: t for a, t in self._suspect.items() if now - t < 30.0}
        return sorted(keepers, key=lambda a: a in self._suspect)

    async def read_chunk(
        self, info: ChunkInfo, offset: int = 0, length: int | None = None
    ) -> bytes | bytearray:
        """Bytes [offset, offset+length) of a chunk, each block verified; zeros past its length.
        The result belongs to the caller (a whole chunk comes back without a copy).

        Tries every copy before it gives up with Unavailable (EIO on the mount).
        """
        if length is None:
            length = info.length - offset
        end = offset + length
        stored_end = min(end, info.length)
        if offset >= stored_end:
            return bytes(length)
        errors: list[str] = []
        tried: set[str] = set()
        while True:
            try:
                async with self.transfers:
                    # Chosen once a transfer slot is ours, not before: a copy that failed while
                    # this read waited for one (a hung keeper) is tried last, not again first.
                    addr = next((a for a in self._ordered(info.keepers) if a not in tried), "")
                    if not addr:
                        break
                    tried.add(addr)
                    with trio.fail_after(self.io_timeout_s):
                        data = await self._read_copy(addr, info, offset, stored_end - offset)
            except (Unavailable, trio.TooSlowError, ChecksumMismatch, DfsError) as exc:
                reason = str(exc) or "timeout"
                errors.append(f"{addr}: {reason}")
                self._suspect[addr] = trio.current_time()
                if isinstance(exc, trio.TooSlowError):
                    self.pool.drop(addr)
                log.warning(
                    "chunk %d v%d: copy on %s failed: %s", info.chunk_id, info.version, addr, reason
                )
                if isinstance(exc, ChecksumMismatch):
                    await self._report_bad(info, addr, reason)
                continue
            self._suspect.pop(addr, None)
            if end > stored_end:
                return data + bytes(end - stored_end)
            return data
        raise Unavailable(
            f"chunk {info.chunk_id} v{info.version}: no readable copy"
            f" ({'; '.join(errors) or 'no keepers'})"
        )

    async def read_blocks(self, info: ChunkInfo, first: int, stop: int) -> tuple[bytes, bytes]:
        """Blocks [first, stop) of a chunk version, verified, with the checksums of all its
        blocks: what a patch over that version needs of it. Fails over like `read_chunk`."""
        block = checksum.BLOCK_SIZE
        offset, end = first * block, min(info.length, stop * block)
        errors: list[str] = []
        for addr in self._ordered(info.keepers):
            try:
                async with self.transfers:
                    with trio.fail_after(self.io_timeout_s):
                        reply, payload = await self._read_verified(addr, info, offset, end - offset)
            except (trio.TooSlowError, DfsError) as exc:
                errors.append(f"{addr}: {exc or 'timeout'}")
                continue
            if reply.first_block != first or len(payload) < end - offset:
                errors.append(f"{addr}: sent other blocks than asked for")
                continue
            data = bytes(memoryview(payload)[: end - offset])
            PAYLOADS.give(payload)
            return bytes(reply.checksums), data
        raise Unavailable(
            f"chunk {info.chunk_id} v{info.version}: no readable copy ({'; '.join(errors)})"
        )

    async def _read_verified(
        self, addr: str, info: ChunkInfo, offset: int, length: int
    ) -> tuple[m.ReadChunkReply, bytearray]:
        """One copy's blocks covering [offset, offset+length), each checked against checksums
        whose digest the tracker gave."""
        request = m.ReadChunk(
            chunk_id=info.chunk_id, version=info.version, offset_bytes=offset, length_bytes=length
        )
        reply, payload = await self.pool.call(addr, request, m.ReadChunkReply)
        if checksum.digest(reply.checksums) != info.digest:
            raise ChecksumMismatch("checksum list does not match the tracker's digest")
        bad = checksum.verify_blocks(payload, reply.checksums, reply.first_block)
        if bad is not None:
            raise ChecksumMismatch(f"block {bad} does not match its checksum")
        return reply, payload

    async def _read_copy(
        self, addr: str, info: ChunkInfo, offset: int, length: int
    ) -> bytes | bytearray:
        reply, payload = await self._read_verified(addr, info, offset, length)
        skip = offset - reply.first_block * checksum.BLOCK_SIZE
        if skip < 0 or skip + length > len(payload):
            raise ChecksumMismatch("keeper sent a range that does not cover the request")
        if skip == 0 and length == len(payload):
            return payload  # the whole received buffer: hand it over rather than copy 8 MiB
        data = bytes(memoryview(payload)[skip : skip + length])
        PAYLOADS.give(payload)
        return data

    async def _report_bad(self, info: ChunkInfo, addr: str, reason: str) -> None:
        try:
            await self._tracker(
                m.ReportBadChunk(
                    chunk_id=info.chunk_id, version=info.version, addr=addr, reason=reason
                ),
                m.OkReply,
            )
        except DfsError as exc:
            log.info("could not report bad chunk %d: %s", info.chunk_id, exc)

    async def write_chunk(
        self,
        ino: int,
        index: int,
        data: bytes | bytearray | memoryview,
        placement: Placement | None = None,
        *,
        sync: bool = True,
    ) -> ChunkInfo:
        """Store `data` as a new version of chunk `index` of `ino` on its placement (the one
        given, from `create`, else a new one from the tracker); with `sync`, fsynced on every
        copy (else written into the keepers' files, on their disks within their write-back
        interval or at `sync_chunks`).

        The version is not visible to readers until `commit`. If a keeper fails, the tracker
        is asked for a placement without it; NoSpace means no keeper can take it.
        """
        sums = checksum.block_checksums(data)
        exclude: list[str] = []
        last_error: Exception | None = None
        for _attempt in range(WRITE_ATTEMPTS):
            if placement is not None:
                alloc, placement = placement.as_allocation(), None
            else:
                alloc = await self._allocate(ino, index, exclude)
            if not alloc.keepers:
                raise NoSpace("no keeper can take a new chunk")
            request = m.PutChunk(
                chunk_id=alloc.chunk_id,
                version=alloc.version,
                checksums=sums,
                forward=alloc.keepers[1:],
                sync=sync,
            )
            reply, error = await self._send_chunk(alloc.keepers, request, data)
            if error is not None:
                last_error = error
                exclude.extend(a for a in reply.failed if a not in exclude)
                continue
            written = ChunkInfo(
                index,
                alloc.chunk_id,
                alloc.version,
                len(data),
                checksum.digest(sums),
                tuple(reply.stored),
            )
            exclude.extend(a for a in reply.failed if a not in exclude)
            # Some copies down: keep what is durable and let the healer add the rest, as HDFS
            # does, as long as at least two copies (or all that were asked) made it.
            enough = len(reply.stored) >= min(2, len(alloc.keepers))
            if reply.failed:
                log.warning(
                    "chunk %d: copies on %s failed, %s",
                    alloc.chunk_id,
                    ", ".join(reply.failed),
                    "keeping the others" if enough else "asking for another placement",
                )
            if enough:
                return written
            last_error = Unavailable(f"only {reply.stored or 'no keeper'} stored the chunk")
            await self.abandon([written])
        if isinstance(last_error, NoSpace):
            raise NoSpace(f"chunk {index} of inode {ino}: {last_error.message}")
        raise Unavailable(f"chunk {index} of inode {ino} could not be written: {last_error}")

    async def write_patch(
        self,
        ino: int,
        base: ChunkInfo,
        length: int,
        checksums: bytes,
        blocks: list[int],
        data: bytes | bytearray | memoryview,
        *,
        sync: bool = True,
        placement: Placement | None = None,
    ) -> ChunkInfo:
        """Store a new version of `base`'s chunk as the changed `blocks` only (their bytes back
        to back in `data`; `checksums` of every block of the new version), on the keepers
        that hold `base` (`placement`: a spare from `commit_with_spares` after `base`, else
        one asked for now). Raises if that cannot be done (the base moved on, a keeper lacks
        it, too few copies took it): the caller then writes the whole chunk instead."""
        if placement is not None and placement.chunk_id == base.chunk_id:
            alloc = placement.as_allocation()
        else:
            alloc = await self._tracker(
                m.AllocateChunk(ino=ino, index=base.index, base_version=base.version),
                m.AllocateReply,
            )
        written = ChunkInfo(
            base.index,
            alloc.chunk_id,
            alloc.version,
            length,
            checksum.digest(checksums),
            tuple(alloc.keepers),
        )
        request = m.PatchChunk(
            chunk_id=alloc.chunk_id,
            base_version=base.version,
            version=alloc.version,
            length_bytes=length,
            checksums=checksums,
            blocks=blocks,
            forward=alloc.keepers[1:],
            sync=sync,
        )
        reply, error = await self._send_chunk(alloc.keepers, request, data)
        if error is not None:
            await self.abandon([written])
            raise Unavailable(f"patch of chunk {alloc.chunk_id} failed: {error or 'timeout'}")
        written = dataclasses.replace(written, keepers=tuple(reply.stored))
        if len(reply.stored) < min(2, len(alloc.keepers)):
            await self.abandon([written])
            raise Unavailable(f"only {reply.stored or 'no keeper'} took the patch")
        return written

    async def _send_chunk(
        self,
        keepers: list[str],
        request: m.PutChunk | m.PatchChunk,
        data: bytes | bytearray | memoryview,
    ) -> tuple[m.PutChunkReply, DfsError | trio.TooSlowError | None]:
        """Store a whole chunk or a patch on `keepers`, within one transfer slot and a timeout
        that grows with the bytes sent. Returns the copies stored and failed, and the first
        error if none was stored (None otherwise); it never raises for a keeper's failure.

        Up to FANOUT_MAX_BYTES the copies are sent to every keeper at once, each told to
        forward nothing: a small write then waits for the slowest keeper, not for the sum of
        the hops down a pipeline. Bigger writes go down the pipeline (keepers[0] forwards to
        the next as it writes), so the writer sends the bytes once.
        """
        # Down a pipeline, a keeper waits io_timeout_s per keeper after it (keeper/server.py)
        # before it reports one failed: the writer waits one more, to hear that report.
        timeout = self.io_timeout_s + len(data) / SLOWEST_TRANSFER_BYTES_PER_S
        if len(data) > FANOUT_MAX_BYTES or len(keepers) < 2:
            timeout += self.io_timeout_s * (len(keepers) - 1)
            targets = [(keepers[0], dataclasses.replace(request, forward=keepers[1:]))]
        else:
            targets = [(addr, dataclasses.replace(request, forward=[])) for addr in keepers]
        stored: list[str] = []
        failed: list[str] = []
        errors: list[DfsError | trio.TooSlowError] = []

        async def one(addr: str, request: m.PutChunk | m.PatchChunk) -> None:
            try:
                with trio.fail_after(timeout):
                    reply, _ = await self.pool.call(addr, request, m.PutChunkReply, data)
            except (DfsError, trio.TooSlowError) as exc:
                self.pool.drop(addr)
                errors.append(exc)
                failed.extend([addr, *request.forward])
                log.warning(
                    "chunk %d v%d: storing on %s failed: %s",
                    request.chunk_id,
                    request.version,
                    addr,
                    exc or "timeout",
                )
                return
            stored.extend(reply.stored)
            failed.extend(reply.failed)

        async with self.transfers:
            if len(targets) == 1:
                await one(*targets[0])
            else:
                async with trio.open_nursery() as nursery:
                    for addr, sub in targets:
                        nursery.start_soon(one, addr, sub)
        # In the order of the placement, whichever reply came first.
        order = {addr: i for i, addr in enumerate(keepers)}
        stored.sort(key=lambda a: order.get(a, len(order)))
        reply = m.PutChunkReply(stored=stored, failed=failed)
        return reply, (errors[0] if errors and not stored else None)

    async def _allocate(self, ino: int, index: int, exclude: list[str]) -> m.AllocateReply:
        """A placement; while the tracker knows no live keeper (just restarted, or every keeper
        down), wait for one for at most io_timeout_s, then fail."""
        deadline = trio.current_time() + self.io_timeout_s
        delay = 0.1
        while True:
            try:
                return await self._tracker(
                    m.AllocateChunk(ino=ino, index=index, exclude=exclude), m.AllocateReply
                )
            except Unavailable:
                if trio.current_time() + delay > deadline:
                    raise
                await trio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def abandon(self, chunks: list[ChunkInfo]) -> None:
        """Give back written chunk versions that will never be committed (a failed or
        abandoned write), so their space is freed now rather than after gc_grace_s."""
        if chunks:
            await self._tracker(m.AbandonChunks(chunks=[c.to_wire() for c in chunks]), m.OkReply)

    async def commit(
        self,
        ino: int,
        size_bytes: int,
        chunks: list[ChunkInfo],
        mtime_ns: int | None = None,
        *,
        sync: bool = True,
        opened: OpenMark | None = None,
        locks_table: str = "",
    ) -> Attr:
        """Publish written chunk versions and the file size atomically; with `sync`, return
        once the commit is on the tracker's disk (else once it is committed). `opened`: the
        open the chunks were written through (`open_file_and_chunks`), if any;
        `locks_table`: the lock table of the locks held on the file meanwhile, if any."""
        attr, _ = await self.commit_with_spares(
            ino, size_bytes, chunks, mtime_ns, sync=sync, opened=opened, locks_table=locks_table
        )
        return attr

    async def commit_with_spares(
        self,
        ino: int,
        size_bytes: int,
        chunks: list[ChunkInfo],
        mtime_ns: int | None = None,
        *,
        sync: bool = True,
        spares: bool = False,
        opened: OpenMark | None = None,
        locks_table: str = "",
    ) -> tuple[Attr, dict[int, Placement]]:
        """`commit`; with `spares`, also a next version of each chunk committed, by index,
        allocated on its holders: `write_patch` takes it and needs no AllocateChunk. Give
        back the ones left unused with `release_files`."""
        reply = await self._tracker(
            m.CommitChunks(
                ino=ino,
                size_bytes=size_bytes,
                mtime_ns=time.time_ns() if mtime_ns is None else mtime_ns,
                chunks=[c.to_wire() for c in chunks],
                sync=sync,
                spares=spares,
                session=self.session,
                opened=_wire_mark(opened),
                locks_table=locks_table,
            ),
            m.AttrReply,
        )
        placements = {
            int(index): Placement.from_wire([chunk_id, version, keepers])
            for index, chunk_id, version, keepers in reply.spares or ()
        }
        return Attr.from_wire(reply.attr), placements

    async def sync_chunks(self, chunks: list[ChunkInfo]) -> None:
        """Have every keeper that holds one of `chunks` fsync it (those stored without
        `sync`); one request per keeper, all at once. Any keeper failing fails the call:
        the data is then not known to be on every copy's disk."""
        by_keeper: dict[str, list[list[int]]] = {}
        for info in chunks:
            for addr in info.keepers:
                by_keeper.setdefault(addr, []).append([info.chunk_id, info.version])
        failures: list[str] = []

        async def one(addr: str, pairs: list[list[int]]) -> None:
            try:
                with trio.fail_after(self.io_timeout_s):
                    await self.pool.call(addr, m.SyncChunks(chunks=pairs), m.OkReply)
            except (DfsError, trio.TooSlowError) as exc:
                self.pool.drop(addr)
                failures.append(f"{addr}: {exc or 'timeout'}")

        async with trio.open_nursery() as nursery:
            for addr, pairs in by_keeper.items():
                nursery.start_soon(one, addr, pairs)
        if failures:
            raise Unavailable(f"chunks not synced on {', '.join(failures)}")

    # --- whole files ---------------------------------------------------------------------

    async def create_file(self, path: str, mode: int = 0o644) -> Attr:
        """Create (or truncate) a regular file at `path`."""
        parent, name = await self._parent_and_name(path)
        try:
            attr = await self.lookup(parent, name)
        except NotFound:
            return await self.mknod(parent, name, stat_mod.S_IFREG | mode, os.getuid(), os.getgid())
        if attr.is_dir:
            raise IsADir(path)
        return await self.setattr(attr.ino, size_bytes=0)

    async def upload(
        self, local: str | Path, remote: str, progress: Callable[[int], None] | None = None
    ) -> Attr:
        """Copy a local file into the cluster; durable on every copy when it returns."""
        attr = await self.create_file(remote)
        chunk_size = (await self.get_chunks(attr.ino, 0, 0)).chunk_size
        written: list[ChunkInfo] = []
        size = 0
        with open(local, "rb") as source:
            gate = trio.Semaphore(int(self.transfers.total_tokens))
            async with _nursery() as nursery:
                index = 0
                while True:
                    data = await trio.to_thread.run_sync(source.read, chunk_size)
                    if not data:
                        break
                    size += len(data)
                    await _start_bounded(
                        nursery, gate, self._upload_one, attr.ino, index, data, written, progress
                    )
                    index += 1
        written.sort(key=lambda c: c.index)
        return await self.commit(attr.ino, size, written)

    async def _upload_one(
        self,
        ino: int,
        index: int,
        data: bytes,
        written: list[ChunkInfo],
        progress: Callable[[int], None] | None,
    ) -> None:
        written.append(await self.write_chunk(ino, index, data))
        if progress:
            progress(len(data))

    async def _located_chunks(self, ino: int) -> FileChunks:
        """The file's chunk list once the tracker knows a copy of every chunk, or as it is
        after `io_timeout_s`: a tracker that just restarted hears from its keepers within
        seconds, and a read must not fail in the meantime."""
        deadline = trio.current_time() + self.io_timeout_s
        while True:
            chunks = await self.get_chunks(ino)
            located = all(info.keepers for info in chunks.chunks.values())
            if located or trio.current_time() >= deadline:
                return chunks
            await trio.sleep(0.5)

    async def download(
        self, remote: str, local: str | Path, progress: Callable[[int], None] | None = None
    ) -> int:
        """Copy a cluster file to a local path; every byte checked. Returns its size.

        A regular file is written beside the destination and renamed over it. "-" (standard
        output) and a destination that is not a regular file (a pipe, a terminal, /dev/null)
        get the bytes written into them in order instead: renaming over /dev/null as root
        would replace the device with a copy of the file."""
        attr = await self.resolve(remote)
        if attr.is_dir:
            raise IsADir(remote)
        chunks = await self._located_chunks(attr.ino)
        if str(local) == "-":
            await self._stream(chunks, sys.stdout.fileno(), progress)
            return chunks.size
        if _is_stream(local):
            # A FIFO's open waits for a reader: in a worker thread, not the event loop.
            fd = await trio.to_thread.run_sync(os.open, local, os.O_WRONLY)
            try:
                await self._stream(chunks, fd, progress)
            finally:
                os.close(fd)
            return chunks.size
        tmp = Path(f"{local}.dfs-part")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, chunks.size)

            async def fetch(index: int) -> None:
                info = chunks.chunks.get(index)
                start = index * chunks.chunk_size
                length = min(chunks.chunk_size, chunks.size - start)
                if info is None:
                    return  # a hole: ftruncate already made it zeros
                data = await self.read_chunk(info, 0, length)
                await trio.to_thread.run_sync(os.pwrite, fd, data, start)
                _recycle(data)
                if progress:
                    progress(length)

            count = (
                (chunks.size + chunks.chunk_size - 1) // chunks.chunk_size
                if chunks.chunk_size
                else 0
            )
            gate = trio.Semaphore(int(self.transfers.total_tokens))
            async with _nursery() as nursery:
                for index in range(count):
                    await _start_bounded(nursery, gate, fetch, index)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        os.replace(tmp, local)
        return chunks.size

    async def _stream(
        self, chunks: FileChunks, fd: int, progress: Callable[[int], None] | None
    ) -> None:
        """Write a file's bytes in order to `fd`, which may not seek, fetching up to
        `transfers` chunks ahead of the writer (so at most that many are held)."""
        count = (chunks.size + chunks.chunk_size - 1) // chunks.chunk_size if chunks.size else 0
        ahead = max(1, int(self.transfers.total_tokens))

        async def fetch(index: int, slot: _Slot) -> None:
            start = index * chunks.chunk_size
            length = min(chunks.chunk_size, chunks.size - start)
            info = chunks.chunks.get(index)
            slot.data = await self.read_chunk(info, 0, length) if info else bytes(length)
            slot.done.set()

        async with _nursery() as nursery:
            send, receive = trio.open_memory_channel[_Slot](ahead - 1)

            async def produce() -> None:
                async with send:
                    for index in range(count):
                        slot = _Slot()
                        await send.send(slot)  # waits while `ahead` chunks are in the works
                        nursery.start_soon(fetch, index, slot)

            nursery.start_soon(produce)
            async with receive:
                async for slot in receive:
                    await slot.done.wait()
                    await trio.to_thread.run_sync(_write_all, fd, slot.data)
                    if progress:
                        progress(len(slot.data))
                    _recycle(slot.data)
                    slot.data = b""


class _Slot:
    """One chunk on its way to a stream: filled by its fetch, written in turn."""

    __slots__ = ("data", "done")

    def __init__(self) -> None:
        self.data: bytes | bytearray = b""
        self.done = trio.Event()


def _open_mark(reply: m.AttrReply) -> OpenMark | None:
    return None if reply.opened is None else (str(reply.opened[0]), int(reply.opened[1]))


def _wire_mark(mark: OpenMark | None) -> list[Any] | None:
    return None if mark is None else list(mark)


def _chunk_map(records: list[list[Any]]) -> dict[int, ChunkInfo]:
    """Chunk records from the tracker, by chunk index."""
    infos = (ChunkInfo.from_wire(raw) for raw in records)
    return {info.index: info for info in infos}


def _is_stream(path: str | Path) -> bool:
    """Does `path` exist as something other than a regular file or a directory?"""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return False
    return not (stat_mod.S_ISREG(mode) or stat_mod.S_ISDIR(mode))


def _recycle(data: bytes | bytearray) -> None:
    """Give a chunk buffer that has been written out back for the next read: a fresh 8 MiB
    buffer costs a zero-fill (the caller holds no other reference to it)."""
    if isinstance(data, bytearray):
        PAYLOADS.give(data)


def _write_all(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


@asynccontextmanager
async def _nursery() -> AsyncIterator[trio.Nursery]:
    """A nursery whose failures surface as one DfsError when that is all they are."""
    try:
        async with trio.open_nursery() as nursery:
            yield nursery
    except BaseExceptionGroup as group:
        error = collapse(group)
        if error is group:
            raise
        raise error from None


async def _start_bounded(
    nursery: trio.Nursery, gate: trio.Semaphore, fn: Callable[..., Awaitable[None]], *args: object
) -> None:
    """Start `fn(*args)` in `nursery` once `gate` has room: the caller stops producing work
    (reading the next chunk into memory) while that many transfers are running."""
    await gate.acquire()

    async def run() -> None:
        try:
            await fn(*args)
        finally:
            gate.release()

    nursery.start_soon(run)
