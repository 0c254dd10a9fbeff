"""The FUSE request handlers: thin translations between pyfuse3 and the cluster client.

Every handler goes through `fuse_op`, the one error boundary: a `DfsError` becomes
`FUSEError(e.errno)`; any other exception is a bug, logged with its traceback and answered with
EIO, because pyfuse3 lets only FUSEError through and anything else would end `pyfuse3.main()`
and with it the mount. Cancellation (a BaseException) is never caught.

Who owns what: `InodeTable` (lookup counts, what the kernel was told), `HandleTable` (open
files and directories), `DataCache` (file bytes: write buffers, uploads, read cache),
`XattrCache` (what is known of extended attributes). The namespace rules (ENOTEMPTY, EISDIR,
ENAMETOOLONG, ENODATA, ...) are the tracker's; permissions are the kernel's
(`default_permissions`, and its xattr namespace rules).
"""

from __future__ import annotations

import errno
import fcntl
import functools
import logging
import os
import stat
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, ParamSpec, TypeVar

import pyfuse3
import trio

from cluster import trace
from cluster.client import Attr, Client, DirEntry
from cluster.errors import DfsError, Exists, NoData, NotFound
from cluster.locks import OpenMark
from cluster.xattrs import check_name as check_xattr_name
from dfsmount.cache import DataCache, FileState
from dfsmount.handles import HandleTable, OpenDir
from dfsmount.inodes import AttrCache, DirCache, InodeTable, entry_attributes
from dfsmount.locks import LockRange, MountLocks, length_of, range_of
from dfsmount.releases import ReleaseQueue
from dfsmount.xattrs import XattrCache

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

# Entries asked of the tracker per readdir page; the kernel takes a few dozen per request.
READDIR_PAGE = 500
NAME_MAX = 255
# statfs is cached this long: editors and shells call it constantly.
STATFS_CACHE_S = 1.0
# f_bsize == f_frsize (df computes sizes from f_frsize, some tools from f_bsize).
STATFS_BLOCK = 1 << 20
# The tracker has no inode limit; report plenty free.
FREE_INODES = 1 << 32
# A read within this distance of where the last one ended counts as sequential: the kernel's
# read-ahead sends several requests at once, and they may arrive out of order.
SEQUENTIAL_SLACK = 4 << 20
# fallocate(2) modes (linux/falloc.h); any other bit gets EOPNOTSUPP, as on ext4 for most.
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
FALLOCATE_MODES = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE
# flock(2) operations as the lock types they take (Linux's flock locks are whole-file).
FLOCK_TYPES = {
    fcntl.LOCK_SH: fcntl.F_RDLCK,
    fcntl.LOCK_EX: fcntl.F_WRLCK,
    fcntl.LOCK_UN: fcntl.F_UNLCK,
}


def fuse_op(fn: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """The error boundary of a FUSE handler (see the module docstring)."""

    name = f"fuse {fn.__name__}"

    @functools.wraps(fn)
    async def handler(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            with trace.span(name):
                return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except DfsError as exc:
            log.debug("%s: %s (%s)", fn.__name__, exc, errno.errorcode.get(exc.errno, exc.errno))
            raise pyfuse3.FUSEError(exc.errno) from None
        except Exception:
            log.exception("%s failed", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return handler


class Operations(pyfuse3.Operations):
    # No NFS export: the tracker has no parent pointers to answer lookups of "..".
    supports_dot_lookup = False
    # The writeback cache would let the kernel keep file sizes of its own and ignore ours,
    # which breaks close-to-open between mounts.
    enable_writeback_cache = False
    # flock and fcntl locks are the cluster's (held by the tracker), not this kernel's,
    # unless the mount says `local_locks`.
    enable_locks = True

    def __init__(
        self,
        client: Client,
        nursery: trio.Nursery,
        *,
        dirty_bytes: int,
        cache_bytes: int,
        sync_on_close: bool = False,
        local_locks: bool = False,
    ) -> None:
        super().__init__()
        # As MooseFS's mfsnoposixlocks/mfsnobsdlocks and JuiceFS's --no-posix-lock: the
        # kernel keeps locks per mount, for programs that lock often and share nothing.
        self.enable_locks = not local_locks
        self.client = client
        # close() at fsync's level (DESIGN.md, guarantee 1): on every copy's disk, not only in
        # every copy's file.
        self.sync_on_close = sync_on_close
        self.inodes = InodeTable()
        self.attrs = AttrCache()
        self.xattrs = XattrCache()
        self.dirs = DirCache()
        self.handles = HandleTable()
        self.data = DataCache(client, nursery, dirty_bytes=dirty_bytes, cache_bytes=cache_bytes)
        self.data.on_commit = self.attrs.put
        self.data.on_discard = self._forget_pages
        client.dir_changed = self.attrs.put_newer
        self.releases = ReleaseQueue(client)
        nursery.start_soon(self.releases.run, name="releases")
        self.locks = MountLocks(client)
        self.locks.on_lost = lambda inos, exc: self.data.fence(inos, str(exc))
        self.data.before_change = self.locks.confirm
        self.data.on_grace = self.locks.renew_soon
        nursery.start_soon(self.locks.keep_lease, name="lock lease")
        # Set once the kernel's INIT request is answered: the kernel applies its settings for
        # the mount (read-ahead among them) when it gets that answer.
        self.session_started = trio.Event()
        self._statfs: tuple[float, pyfuse3.StatvfsData] | None = None

    def init(self) -> None:
        """pyfuse3 calls this for INIT, just before answering it."""
        self.session_started.set()

    def _reply(self, attr: Attr, *, lookup: bool) -> pyfuse3.EntryAttributes:
        self.attrs.put(attr)
        return self.inodes.entry(attr, lookup=lookup, local=self.data.local_attrs(attr.ino))

    # --- names and attributes -------------------------------------------------------------

    @fuse_op
    async def lookup(
        self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        log.debug("lookup %d %r", parent_inode, name)
        if name == b".":
            attr = await self.client.getattr(parent_inode)
        elif len(name) > NAME_MAX:
            raise pyfuse3.FUSEError(errno.ENAMETOOLONG)
        else:
            attr = await self._lookup(parent_inode, name)
        return self._reply(attr, lookup=True)

    async def _lookup(self, parent: int, name: bytes) -> Attr:
        cached = self.dirs.get(parent, name)
        if cached is None and self.dirs.should_fetch(parent):
            await self._fetch_listing(parent)
            cached = self.dirs.get(parent, name)
        if cached is False:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if isinstance(cached, Attr):
            return self.attrs.get(cached.ino) or cached
        return await self.client.lookup(parent, name)

    async def _fetch_listing(self, parent: int) -> None:
        fetched_at = trio.current_time()
        entries: dict[bytes, Attr] = {}
        offset = 0
        while page := await self.client.readdir(parent, offset, READDIR_PAGE):
            for entry in page:
                entries[entry.name] = entry.attr
            if len(entries) > DirCache.MAX_ENTRIES:
                return
            offset = page[-1].next_offset
        self.dirs.store(parent, entries, fetched_at)

    async def forget(self, inode_list: Sequence[tuple[pyfuse3.InodeT, int]]) -> None:
        try:
            for ino, count in inode_list:
                self.inodes.forget(ino, count)
        except Exception:  # pyfuse3: forget must not raise
            log.exception("forget failed")

    @fuse_op
    async def getattr(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        log.debug("getattr %d", inode)
        attr = self.attrs.get(inode) or await self.client.getattr(inode)
        return self._reply(attr, lookup=False)

    @fuse_op
    async def setattr(
        self,
        inode: pyfuse3.InodeT,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: pyfuse3.FileHandleT | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        log.debug("setattr %d", inode)
        changes: dict[str, Any] = {}
        if fields.update_mode:
            changes["mode"] = attr.st_mode  # type bits included; the tracker keeps its own
        if fields.update_uid:
            changes["uid"] = attr.st_uid
        if fields.update_gid:
            changes["gid"] = attr.st_gid
        if fields.update_size:
            changes["size_bytes"] = attr.st_size
        if fields.update_atime:
            changes["atime_ns"] = attr.st_atime_ns
        if fields.update_mtime:
            changes["mtime_ns"] = attr.st_mtime_ns
        if fields.update_ctime:
            changes["ctime_ns"] = attr.st_ctime_ns
        if not changes:
            return self._reply(await self.client.getattr(inode), lookup=False)
        state = self.data.files.get(inode)
        if state is not None and (fields.update_size or fields.update_mtime or fields.update_atime):
            # A later commit of buffered writes must not undo the truncate or the times.
            new = await state.setattr(**changes)
        else:
            new = await self.client.setattr(inode, **changes)
        return self._reply(new, lookup=False)

    @fuse_op
    async def readlink(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileNameT:
        return pyfuse3.FileNameT(await self.client.readlink(inode))

    @fuse_op
    async def mknod(
        self,
        parent_inode: pyfuse3.InodeT,
        name: pyfuse3.FileNameT,
        mode: pyfuse3.ModeT,
        rdev: int,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        log.debug("mknod %d %r %o", parent_inode, name, mode)
        attr = await self.client.mknod(parent_inode, name, mode, ctx.uid, ctx.gid, rdev)
        self.dirs.added(parent_inode, name, attr)
        return self._reply(attr, lookup=True)

    @fuse_op
    async def mkdir(
        self,
        parent_inode: pyfuse3.InodeT,
        name: pyfuse3.FileNameT,
        mode: pyfuse3.ModeT,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        log.debug("mkdir %d %r %o", parent_inode, name, mode)
        attr = await self.client.mkdir(parent_inode, name, mode, ctx.uid, ctx.gid)
        self.dirs.added(parent_inode, name, attr)
        # Empty as of the tracker's answer: `tar x`, `cp -r` and `git clone` look up every name
        # before they create it, and these are answered here (within the cache's timeout).
        self.dirs.store(attr.ino, {}, trio.current_time())
        return self._reply(attr, lookup=True)

    @fuse_op
    async def unlink(
        self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, ctx: pyfuse3.RequestContext
    ) -> None:
        log.debug("unlink %d %r", parent_inode, name)
        ino, nlink = await self.client.unlink(parent_inode, name)
        self.attrs.drop(ino)  # nlink and ctime changed
        self.dirs.removed(parent_inode, name)
        if nlink:
            self.dirs.clear()  # other names of the inode, listed anywhere, show its old nlink

    @fuse_op
    async def rmdir(
        self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, ctx: pyfuse3.RequestContext
    ) -> None:
        log.debug("rmdir %d %r", parent_inode, name)
        await self.client.rmdir(parent_inode, name)
        self.dirs.removed(parent_inode, name)

    @fuse_op
    async def symlink(
        self,
        parent_inode: pyfuse3.InodeT,
        name: pyfuse3.FileNameT,
        target: pyfuse3.FileNameT,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        log.debug("symlink %d %r -> %r", parent_inode, name, target)
        attr = await self.client.symlink(parent_inode, name, target, ctx.uid, ctx.gid)
        self.dirs.added(parent_inode, name, attr)
        return self._reply(attr, lookup=True)

    @fuse_op
    async def rename(
        self,
        parent_inode_old: pyfuse3.InodeT,
        name_old: pyfuse3.FileNameT,
        parent_inode_new: pyfuse3.InodeT,
        name_new: pyfuse3.FileNameT,
        flags: pyfuse3.FlagT,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        log.debug(
            "rename %d %r -> %d %r (%d)",
            parent_inode_old,
            name_old,
            parent_inode_new,
            name_new,
            flags,
        )
        # pyfuse3's RENAME_NOREPLACE (1) and RENAME_EXCHANGE (2) are the client's flags too.
        self.attrs.clear()
        self.dirs.clear()
        await self.client.rename(parent_inode_old, name_old, parent_inode_new, name_new, int(flags))
        self.attrs.clear()
        self.dirs.clear()  # a replaced target could be listed anywhere

    @fuse_op
    async def link(
        self,
        inode: pyfuse3.InodeT,
        new_parent_inode: pyfuse3.InodeT,
        new_name: pyfuse3.FileNameT,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        log.debug("link %d -> %d %r", inode, new_parent_inode, new_name)
        attr = await self.client.link(inode, new_parent_inode, new_name)
        self.dirs.added(new_parent_inode, new_name, attr)
        return self._reply(attr, lookup=True)

    @fuse_op
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        now = trio.current_time()
        if self._statfs is not None and now - self._statfs[0] < STATFS_CACHE_S:
            return self._statfs[1]
        stats = await self.client.statfs()
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = STATFS_BLOCK
        data.f_blocks = stats.capacity_bytes // STATFS_BLOCK
        data.f_bfree = data.f_bavail = stats.free_bytes // STATFS_BLOCK
        data.f_files = stats.files + FREE_INODES
        data.f_ffree = data.f_favail = FREE_INODES
        data.f_namemax = 255
        self._statfs = (now, data)
        return data

    # --- extended attributes (dfsmount/xattrs.py) ----------------------------------------

    @fuse_op
    async def setxattr(
        self,
        inode: pyfuse3.InodeT,
        name: pyfuse3.XAttrNameT,
        value: bytes,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        log.debug("setxattr %d %r (%d bytes)", inode, name, len(value))
        check_xattr_name(name)  # system.posix_acl_*: EOPNOTSUPP, no tracker trip
        attr = await self.client.setxattr(inode, name, value)
        self.xattrs.changed(inode, name, value)
        self.attrs.put(attr)  # ctime moved: the kernel asks for it next (`stat`)

    @fuse_op
    async def getxattr(
        self, inode: pyfuse3.InodeT, name: pyfuse3.XAttrNameT, ctx: pyfuse3.RequestContext
    ) -> bytes:
        log.debug("getxattr %d %r", inode, name)
        check_xattr_name(name)
        known, value = self.xattrs.value(inode, name)
        if not known:
            attr = self.attrs.get(inode)
            if attr is None or attr.xattrs:
                epoch = self.xattrs.epoch
                try:
                    value = await self.client.getxattr(inode, name)
                except NoData:
                    value = None
                self.xattrs.put_value(inode, name, value, epoch)
        if value is None:
            raise pyfuse3.FUSEError(errno.ENODATA)
        return value

    @fuse_op
    async def listxattr(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> Sequence[pyfuse3.XAttrNameT]:
        log.debug("listxattr %d", inode)
        names = self.xattrs.names(inode)
        if names is None:
            attr = self.attrs.get(inode)
            if attr is not None and not attr.xattrs:
                names = []
            else:
                epoch = self.xattrs.epoch
                names = await self.client.listxattr(inode)
                self.xattrs.put_names(inode, names, epoch)
        if ctx.uid != 0:
            # As ext4: trusted.* is listed to CAP_SYS_ADMIN only (the kernel already keeps
            # get and set of them to it); root stands for it, as the request carries no caps.
            names = [n for n in names if not n.startswith(b"trusted.")]
        return [pyfuse3.XAttrNameT(n) for n in names]

    @fuse_op
    async def removexattr(
        self, inode: pyfuse3.InodeT, name: pyfuse3.XAttrNameT, ctx: pyfuse3.RequestContext
    ) -> None:
        log.debug("removexattr %d %r", inode, name)
        check_xattr_name(name)
        attr = await self.client.removexattr(inode, name)
        self.xattrs.changed(inode, name, None)
        self.attrs.put(attr)

    # --- files ----------------------------------------------------------------------------

    async def _open(
        self,
        ino: int,
        flags: int,
        attr: Attr | None,
        created_chunk_size: int = 0,
        created_mark: OpenMark | None = None,
    ) -> tuple[FileState, int, bool]:
        """Open `ino` on the tracker (fresh attrs: close-to-open) and add a handle.

        The tracker counts opens per session, so every handle holds one open of its own,
        given back by its `release`. Returns the state, the fh, and whether the kernel may
        keep its page cache (`attr` is given for a file just created: nothing is cached).
        """
        async with self.handles.inode_lock(ino):
            chunks = None
            if created_chunk_size and attr is not None:
                fresh, mark = attr, created_mark  # created and opened on the tracker in one trip
            else:
                fresh, chunks, mark = await self.client.open_file_and_chunks(ino)
            self.attrs.put(fresh)  # close-to-open: later getattrs must not see older attrs
            try:
                if not self.handles.is_open(ino):
                    keep = attr is not None or self.inodes.page_cache_valid(fresh)
                    state = self.data.open_state(fresh, mark)
                    if created_chunk_size and state.remote is None:
                        state.chunk_size = created_chunk_size
                        state.remote = {}
                        state.sync_known = True  # new: nothing of it is unsynced yet
                else:
                    state = self.data.open_state(fresh, mark)
                    keep = not state.adopt(fresh)
                if chunks is not None:
                    state.offer_map(chunks)
                handle = self.handles.add_file(ino, flags, state)
            except BaseException:
                self.releases.put(ino)
                raise
        if not keep:
            self.inodes.note_reported(ino, fresh.size, fresh.mtime_ns)
            try:
                # The kernel's size may be up to ATTR_TIMEOUT_S old; make it ask again.
                pyfuse3.invalidate_inode(pyfuse3.InodeT(ino), attr_only=True)
            except OSError:
                pass  # the kernel does not have the inode cached: nothing to invalidate
        return state, handle.fh, keep

    @fuse_op
    async def open(
        self, inode: pyfuse3.InodeT, flags: pyfuse3.FlagT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileInfo:
        log.debug("open %d %o", inode, flags)
        try:
            state, fh, keep = await self._open(inode, flags, None)
        except NotFound:
            # Another mount removed it while this kernel's entry (or our listing) still named
            # it: ESTALE makes the kernel look the name up again, as NFS clients do.
            self.dirs.clear()
            raise pyfuse3.FUSEError(errno.ESTALE) from None
        if flags & os.O_TRUNC:
            # Even an empty file: as on ext4, O_TRUNC sets mtime and ctime. The new attributes
            # go into the cache, which the kernel's next getattr (`stat` after `: > f`) reads.
            try:
                self.attrs.put(await state.setattr(size_bytes=0))
            except BaseException:
                await self.release(pyfuse3.FileHandleT(fh))
                raise
        return pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(fh), keep_cache=keep)

    @fuse_op
    async def create(
        self,
        parent_inode: pyfuse3.InodeT,
        name: pyfuse3.FileNameT,
        mode: pyfuse3.ModeT,
        flags: pyfuse3.FlagT,
        ctx: pyfuse3.RequestContext,
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        log.debug("create %d %r %o", parent_inode, name, mode)
        mode = pyfuse3.ModeT(stat.S_IFREG | stat.S_IMODE(mode))
        # One tracker trip creates and opens the file, tells its chunk size and places its
        # chunk 0: a small file needs no other request before its data is stored.
        try:
            attr, chunk_size, first_chunk, opened = await self.client.create(
                parent_inode, name, mode, ctx.uid, ctx.gid
            )
        except Exists:
            if flags & os.O_EXCL:
                raise
            # Another mount made it since this kernel's entry (or our listing) said it was
            # absent: ESTALE makes the kernel look it up again and open what is there, with
            # the permission checks of an open.
            self.dirs.clear()
            raise pyfuse3.FUSEError(errno.ESTALE) from None
        self.dirs.added(parent_inode, name, attr)
        state, fh, _ = await self._open(
            attr.ino, flags, attr, created_chunk_size=chunk_size, created_mark=opened
        )
        state.first_chunk, state.first_chunk_at = first_chunk, trio.current_time()
        return pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(fh), keep_cache=True), self._reply(
            attr, lookup=True
        )

    @fuse_op
    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        handle = self.handles.files[fh]
        sequential = abs(off - handle.next_read) <= SEQUENTIAL_SLACK
        handle.next_read = max(handle.next_read, off + size) if sequential else off + size
        # pyfuse3 takes any contiguous buffer; avoiding a copy to bytes matters at 1 GB/s.
        return await handle.state.read(off, size, sequential=sequential)  # type: ignore[return-value]

    @fuse_op
    async def write(self, fh: pyfuse3.FileHandleT, off: int, buf: bytes) -> int:
        handle = self.handles.files[fh]
        if handle.append:
            off = handle.state.size
        await handle.state.write(off, buf)
        return len(buf)

    @fuse_op
    async def flush(self, fh: pyfuse3.FileHandleT) -> None:
        log.debug("flush %d", fh)
        await self.handles.files[fh].state.flush(sync=self.sync_on_close)

    @fuse_op
    async def fsync(self, fh: pyfuse3.FileHandleT, datasync: bool) -> None:
        log.debug("fsync %d", fh)
        if not await self.handles.files[fh].state.flush(sync=True):
            await self.client.sync()  # nothing to commit: the file's creation may still be new

    @fuse_op
    async def fallocate(self, fh: pyfuse3.FileHandleT, mode: int, offset: int, length: int) -> None:
        """fallocate(2). Nothing is reserved on keepers (a later write, close or fsync still
        reports ENOSPC); mode 0 extends the size, punch hole and zero range make the range read
        as zeros, with the chunks wholly inside it freed."""
        log.debug("fallocate %d mode %#x [%d, +%d)", fh, mode, offset, length)
        if mode & ~FALLOCATE_MODES or (mode & FALLOC_FL_PUNCH_HOLE and mode & FALLOC_FL_ZERO_RANGE):
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        state, end = self.handles.files[fh].state, offset + length
        if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
            attr = await state.zero_range(offset, min(end, state.size))
            if attr is not None:
                self.attrs.put(attr)  # st_blocks went down
        if not mode & FALLOC_FL_KEEP_SIZE and end > state.size:
            self.attrs.put(await state.setattr(size_bytes=end))

    @fuse_op
    async def release(self, fh: pyfuse3.FileHandleT) -> None:
        log.debug("release %d", fh)
        handle, _ = self.handles.remove_file(fh)
        ino = handle.ino
        async with self.handles.inode_lock(ino):
            try:
                # mmap write-back may have sent writes after the last flush (close).
                await handle.state.flush(sync=self.sync_on_close)
            except DfsError as exc:
                if handle.state.error_reported:
                    log.debug("inode %d: released after a reported error: %s", ino, exc)
                else:  # nobody was told: only the log can say it
                    log.warning("inode %d: data written after the last flush is lost: %s", ino, exc)
            finally:
                unused = self.data.drop(ino) if not self.handles.is_open(ino) else []
                self.releases.put(ino, unused)
        try:
            await self.locks.release_handle(ino, fh)
        except DfsError as exc:
            log.warning("inode %d: its locks stay until the lock lease ends: %s", ino, exc)

    # --- locks (dfsmount/locks.py) ----------------------------------------------------------

    @fuse_op
    async def getlk(
        self, fh: pyfuse3.FileHandleT, owner: int, lock: tuple[int, int, int, int]
    ) -> tuple[int, int, int, int]:
        l_type, l_start, l_len, l_pid = lock
        asked = LockRange(False, l_type, *range_of(l_start, l_len))
        reply = await self.locks.test(self.handles.files[fh].ino, owner, asked)
        if reply.type == fcntl.F_UNLCK:
            return fcntl.F_UNLCK, l_start, l_len, l_pid
        return reply.type, reply.start, length_of(reply.start, reply.end), reply.pid

    @fuse_op
    async def setlk(
        self, fh: pyfuse3.FileHandleT, owner: int, lock: tuple[int, int, int, int], sleep: bool
    ) -> None:
        l_type, l_start, l_len, l_pid = lock
        asked = LockRange(False, l_type, *range_of(l_start, l_len), l_pid)
        log.debug("setlk %d owner %#x %s wait %s", fh, owner, asked, sleep)
        await self._lock(fh, owner, asked, sleep)

    @fuse_op
    async def flock(self, fh: pyfuse3.FileHandleT, owner: int, op: int) -> None:
        log.debug("flock %d owner %#x op %d", fh, owner, op)
        lock_type = FLOCK_TYPES.get(op & ~fcntl.LOCK_NB)
        if lock_type is None:
            raise pyfuse3.FUSEError(errno.EINVAL)
        await self._lock(fh, owner, LockRange(True, lock_type), not op & fcntl.LOCK_NB)

    async def _lock(self, fh: int, owner: int, asked: LockRange, wait: bool) -> None:
        """Lock or unlock, keeping the file's data coherent as NFS does: releasing a lock
        first stores the writes made under it on every copy, and taking one drops cached data
        older than the tracker's, so a lock holder sees every write of the previous one."""
        handle = self.handles.files[fh]
        if asked.type == fcntl.F_UNLCK:
            # An unlock never fails on Linux: a flush error is the writer's (close reports it).
            try:
                await handle.state.flush(sync=self.sync_on_close)
            except DfsError as exc:
                log.warning("inode %d: unlocked with writes not stored: %s", handle.ino, exc)
            await self.locks.unlock(handle.ino, owner, asked)
            return
        if handle.state.has_local_changes:
            # Writes of this mount first (as NFS does): then the map can be taken fresh.
            await handle.state.flush(sync=self.sync_on_close)
        reply = await self.locks.set(handle.ino, fh, owner, asked, wait)
        if reply.attr is not None:
            # Granted: an interrupt now must not turn it into EINTR (the lock is held).
            with trio.CancelScope(shield=True):
                await self._revalidate(handle.ino, handle.state, Attr.from_wire(reply.attr))

    async def _revalidate(self, ino: int, state: FileState, fresh: Attr) -> None:
        async with self.handles.inode_lock(ino):
            changed = state.adopt(fresh)
            if not changed and self.inodes.page_cache_valid(fresh):
                return
            self.attrs.put(fresh)
            self.inodes.note_reported(ino, fresh.size, fresh.mtime_ns)
        # In a thread: dropping pages waits for reads of them in flight, which this loop serves.
        await trio.to_thread.run_sync(_invalidate_inode, ino)

    def _forget_pages(self, ino: int) -> None:
        """Writes dropped before they landed (a lost lock): the kernel's pages and size of
        the file must come from the tracker again."""
        self.attrs.drop(ino)
        self.data.nursery.start_soon(trio.to_thread.run_sync, _invalidate_inode, ino)

    @fuse_op
    async def release_lock_owner(self, fh: pyfuse3.FileHandleT, owner: int) -> None:
        handle = self.handles.files.get(fh)
        if handle is not None:
            await self.locks.release_owner(handle.ino, owner, fh)

    # --- directories ----------------------------------------------------------------------

    @fuse_op
    async def opendir(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileHandleT:
        log.debug("opendir %d", inode)
        return pyfuse3.FileHandleT(self.handles.add_dir(inode).fh)

    @fuse_op
    async def readdir(
        self, fh: pyfuse3.FileHandleT, start_id: int, token: pyfuse3.ReaddirToken
    ) -> None:
        log.debug("readdir %d from %d", fh, start_id)
        handle = self.handles.dirs[fh]
        offset = start_id
        while entries := await self._dir_page(handle, offset):
            for entry in entries:
                attr = entry.attr
                local = self.data.local_attrs(attr.ino)
                reply = entry_attributes(attr, *(local or (None, None)))
                if not pyfuse3.readdir_reply(
                    token, pyfuse3.FileNameT(entry.name), reply, entry.next_offset
                ):
                    return
                self.inodes.add_lookup(attr.ino)
                if attr.is_file:
                    self.inodes.note_reported(attr.ino, reply.st_size, reply.st_mtime_ns)
                offset = entry.next_offset

    async def _dir_page(self, handle: OpenDir, offset: int) -> list[DirEntry]:
        """Entries from cookie `offset` on, from the handle's cached page when it has them."""
        if handle.page_offset == offset:
            return handle.page
        for i, entry in enumerate(handle.page):
            if entry.next_offset == offset and i + 1 < len(handle.page):
                return handle.page[i + 1 :]
        epoch = self.xattrs.epoch
        handle.page = await self.client.readdir(handle.ino, offset, READDIR_PAGE)
        handle.page_offset = offset
        for entry in handle.page:  # `ls -l` asks each for security.selinux next
            if not entry.attr.xattrs:
                self.xattrs.put_names(entry.attr.ino, [], epoch)
        return handle.page

    @fuse_op
    async def releasedir(self, fh: pyfuse3.FileHandleT) -> None:
        self.handles.dirs.pop(fh, None)

    @fuse_op
    async def fsyncdir(self, fh: pyfuse3.FileHandleT, datasync: bool) -> None:
        """Namespace changes are committed when they return; this puts them on the disk."""
        await self.client.sync()

    # --- lifecycle ------------------------------------------------------------------------

    async def shutdown(self) -> None:
        """After the kernel is gone (or on SIGTERM): flush every open file and tell the
        tracker this mount no longer holds them, nor their locks (the others need not wait
        for the lease). Failures are logged."""
        await self.data.flush_all()
        for handle in list(self.handles.files.values()):
            self.handles.remove_file(handle.fh)
            self.releases.put(handle.ino)
        await self.releases.flush()
        try:
            await self.locks.release_all()
        except DfsError as exc:
            log.warning("locks stay until the lock lease ends: %s", exc)


def _invalidate_inode(ino: int) -> None:
    try:
        pyfuse3.invalidate_inode(pyfuse3.InodeT(ino), attr_only=False)
    except OSError:
        pass  # the kernel does not have the inode cached: nothing to invalidate
