"""A FUSE passthrough file system that can forget what was never fsynced, like LazyFS.

SIGKILL of a server leaves its unsynced writes in the kernel's page cache, where the restarted
server finds them; only a power cut loses them. To test what survives a power cut, a server's
data directory is mounted through this layer:

    python -m tests.powercut.lazyfs BACKING MOUNTPOINT

Every operation passes through to BACKING at once, so reads, `mmap` (SQLite's `-shm`) and
locks behave as on a local disk. Beside that, the layer keeps the *durable state*: what a
power cut would leave, under the strict POSIX rules (not ext4's extra ordering):

- a file's contents are what they were at its last fsync/fdatasync. Until a file is first
  written after the mount it is clean (its durable contents are BACKING's); from then on its
  durable contents are a shadow copy beside BACKING, and the byte ranges written since the
  last fsync are remembered, so an fsync copies only those ranges and the size;
- a directory's names are what they were at its last fsync (FUSE `fsyncdir`). A rename is
  durable once both directories were fsynced after it; a name made durable before its file
  was ever fsynced comes back with the file's old contents (empty for a new file).

Files and directories that exist at mount time start durable as they are.

SIGUSR1 is the power cut: the layer unmounts (the processes using it must be SIGKILLed
before), rewrites BACKING to exactly the durable state and exits 0; mounting it again is the
restart. SIGTERM or SIGINT unmount and keep BACKING as it is.

A cut drops every unsynced write whole, where a real disk may keep any part of them: the worst
case for lost data, not for torn files. Not modelled: sync(2)/syncfs(2) (FUSE does not pass
them on), the durability of attributes (mode and owner are kept as they are at the cut, times
are not), special files, xattrs and fallocate (EOPNOTSUPP), RENAME_EXCHANGE/NOREPLACE
(EINVAL). Handlers never await, so each runs whole and the model never sees half an
operation.
"""

from __future__ import annotations

import argparse
import errno
import functools
import logging
import os
import shutil
import signal
import stat
import sys
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import pyfuse3
import trio

log = logging.getLogger("lazyfs")

P = ParamSpec("P")
T = TypeVar("T")

READY = "lazyfs: mounted"
CUT_DONE = "lazyfs: cut done"
TIMEOUT_S = 1.0  # entry and attribute cache: nobody but this layer changes BACKING


def shadow_dir(backing: Path) -> Path:
    return backing.with_name(backing.name + ".lazyfs-shadow")


@dataclass(eq=False)
class Node:
    """One inode of BACKING: what the kernel refers to as `id`, and its durable state."""

    id: int
    mode: int  # st_mode, kept up to date for rebuilding BACKING
    uid: int
    gid: int
    target: bytes = b""  # of a symlink
    # --- durable state
    # A directory's durable names (None for anything but a directory).
    durable: dict[bytes, Node] | None = None
    # A file's durable contents are BACKING's while clean; else the shadow file (missing:
    # empty).
    clean: bool = True
    dirty: list[tuple[int, int]] = field(default_factory=list)  # [start, end) since fsync
    refs: int = 0  # durable names of this node, in any directory
    # --- live state
    lookups: int = 0  # the kernel's references
    fd: int | None = None  # an O_PATH descriptor while the kernel knows the node

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_file(self) -> bool:
        return stat.S_ISREG(self.mode)

    def mark(self, start: int, end: int) -> None:
        if end <= start:
            return
        if self.dirty and start <= self.dirty[-1][1] and end >= self.dirty[-1][0]:
            last = self.dirty[-1]
            self.dirty[-1] = (min(start, last[0]), max(end, last[1]))
        else:
            self.dirty.append((start, end))


def errors_as_fuse(fn: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """An OSError from BACKING goes back to the caller as its errno."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await fn(*args, **kwargs)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None

    return wrapper


def proc(fd: int) -> str:
    """A path that reopens an O_PATH descriptor."""
    return f"/proc/self/fd/{fd}"


def copy_range(src: int, dst: int, start: int, end: int) -> None:
    while start < end:
        n = os.copy_file_range(src, dst, end - start, start, start)
        if n == 0:
            break
        start += n


class LazyFS(pyfuse3.Operations):
    def __init__(self, backing: Path) -> None:
        super().__init__()
        self.backing = backing
        self.shadows = shadow_dir(backing)
        shutil.rmtree(self.shadows, ignore_errors=True)
        self.shadows.mkdir()
        self.nodes: dict[int, Node] = {}  # by id (the FUSE inode number)
        self.by_ino: dict[int, Node] = {}  # by BACKING's st_ino, for what exists there
        self.files: dict[int, Node] = {}  # open files by handle (the BACKING descriptor)
        self.dirs: dict[int, tuple[Node, list[tuple[bytes, os.stat_result]]]] = {}
        self.next_id = pyfuse3.ROOT_INODE
        self.next_dir_fh = 1
        self.root = self._new_node(os.lstat(backing), b"")
        self.root.fd = os.open(backing, os.O_PATH)
        self.root.lookups = 1
        self._scan(self.root, str(backing))

    # --- the node table -------------------------------------------------------------------

    def _new_node(self, st: os.stat_result, target: bytes) -> Node:
        node = Node(self.next_id, st.st_mode, st.st_uid, st.st_gid, target)
        self.next_id += 1
        if node.is_dir:
            node.durable = {}
        self.nodes[node.id] = node
        self.by_ino[st.st_ino] = node
        return node

    def _scan(self, directory: Node, path: str) -> None:
        """At mount: everything in BACKING is durable as it is."""
        assert directory.durable is not None
        with os.scandir(path) as entries:
            for entry in entries:
                st = entry.stat(follow_symlinks=False)
                target = os.readlink(os.fsencode(entry.path)) if entry.is_symlink() else b""
                node = self.by_ino.get(st.st_ino) or self._new_node(st, target)
                directory.durable[os.fsencode(entry.name)] = node
                node.refs += 1
                if entry.is_dir(follow_symlinks=False):
                    self._scan(node, entry.path)

    def _node(self, parent: Node, name: bytes) -> tuple[Node, os.stat_result]:
        """The node behind `name`, known to the kernel from now on (one more lookup)."""
        dir_fd = self._fd(parent)
        st = os.lstat(name, dir_fd=dir_fd)
        node = self.by_ino.get(st.st_ino)
        if node is None:  # made behind our back: not durable anywhere
            log.warning("lazyfs: %r appeared in BACKING without us", name)
            target = os.readlink(name, dir_fd=dir_fd) if stat.S_ISLNK(st.st_mode) else b""
            node = self._new_node(st, target)
            node.clean = False
        self._hold(node, parent, name)
        return node, st

    def _hold(self, node: Node, parent: Node, name: bytes) -> None:
        node.lookups += 1
        if node.fd is None:
            try:
                node.fd = os.open(name, os.O_PATH | os.O_NOFOLLOW, dir_fd=self._fd(parent))
            except FileNotFoundError:
                pass  # gone since a readdir listed it: the kernel will find out

    @staticmethod
    def _fd(node: Node) -> int:
        if node.fd is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return node.fd

    def _created(
        self, parent: Node, name: bytes, ctx: pyfuse3.RequestContext, target: bytes = b""
    ) -> Node:
        """A node just made in BACKING: nothing of it is durable yet."""
        dir_fd = self._fd(parent)
        if os.getuid() == 0:  # who asked for it owns it, as on any file system
            os.chown(name, ctx.uid, ctx.gid, dir_fd=dir_fd, follow_symlinks=False)
        node = self._new_node(os.lstat(name, dir_fd=dir_fd), target)
        node.clean = False  # durable contents: empty
        self._hold(node, parent, name)
        return node

    def _attrs(self, node: Node, st: os.stat_result | None = None) -> pyfuse3.EntryAttributes:
        if st is None:
            st = os.stat(self._fd(node))
        node.mode, node.uid, node.gid = st.st_mode, st.st_uid, st.st_gid
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = pyfuse3.InodeT(node.id)
        attrs.entry_timeout = attrs.attr_timeout = TIMEOUT_S
        attrs.st_mode = pyfuse3.ModeT(st.st_mode)
        attrs.st_nlink = st.st_nlink
        attrs.st_uid, attrs.st_gid, attrs.st_rdev = st.st_uid, st.st_gid, st.st_rdev
        attrs.st_size, attrs.st_blksize, attrs.st_blocks = st.st_size, st.st_blksize, st.st_blocks
        attrs.st_atime_ns, attrs.st_mtime_ns = st.st_atime_ns, st.st_mtime_ns
        attrs.st_ctime_ns = st.st_ctime_ns
        return attrs

    # --- the durable state ----------------------------------------------------------------

    def _shadow(self, node: Node) -> Path:
        return self.shadows / str(node.id)

    def _before_change(self, node: Node, fd: int) -> None:
        """Before the first change to a clean file's bytes: keep its durable contents."""
        if node.clean:
            out = os.open(self._shadow(node), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                copy_range(fd, out, 0, os.fstat(fd).st_size)
            finally:
                os.close(out)
            node.clean = False

    def _before_last_unlink(self, parent: Node, name: bytes) -> None:
        """A clean file that is durable somewhere keeps its contents when its last name goes
        (the bytes are in BACKING only while it has a name)."""
        dir_fd = self._fd(parent)
        try:
            st = os.lstat(name, dir_fd=dir_fd)
        except FileNotFoundError:
            return
        node = self.by_ino.get(st.st_ino)
        if node and node.is_file and node.clean and node.refs and st.st_nlink == 1:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dir_fd)
            try:
                self._before_change(node, fd)
            finally:
                os.close(fd)

    def _sync_file(self, node: Node, fd: int) -> None:
        """fsync: the ranges written since the last one, and the size, become durable."""
        if node.clean:
            return
        size = os.fstat(fd).st_size
        out = os.open(self._shadow(node), os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            for start, end in node.dirty:
                copy_range(fd, out, start, min(end, size))
            os.ftruncate(out, size)
        finally:
            os.close(out)
        node.dirty.clear()

    def _listing(self, node: Node) -> list[tuple[bytes, os.stat_result]]:
        fd = os.open(proc(self._fd(node)), os.O_RDONLY | os.O_DIRECTORY)
        try:
            with os.scandir(fd) as entries:
                found = [(os.fsencode(e.name), e.stat(follow_symlinks=False)) for e in entries]
        finally:
            os.close(fd)
        return sorted(found, key=lambda item: item[0])

    def _sync_dir(self, node: Node) -> None:
        """fsyncdir: the directory's names as they are now become its durable names."""
        assert node.durable is not None
        for old in node.durable.values():
            old.refs -= 1
        node.durable = {}
        for name, st in self._listing(node):
            child = self.by_ino.get(st.st_ino)
            if child is None:
                log.warning("lazyfs: %r appeared in BACKING without us; not made durable", name)
                continue
            node.durable[name] = child
            child.refs += 1

    # --- the cut --------------------------------------------------------------------------

    def cut(self) -> None:
        """Rewrite BACKING to the durable state (after unmounting)."""
        live: dict[int, str] = {}  # node id -> a path in BACKING, for clean files
        live_names: set[str] = set()
        for dirpath, dirnames, filenames in os.walk(self.backing):
            for name in dirnames + filenames:
                path = os.path.join(dirpath, name)
                live_names.add(os.path.relpath(path, self.backing))
                node = self.by_ino.get(os.lstat(path).st_ino)
                if node is not None:
                    live.setdefault(node.id, path)
        new = self.backing.with_name(self.backing.name + ".lazyfs-new")
        shutil.rmtree(new, ignore_errors=True)
        os.mkdir(new)
        placed: dict[int, str] = {}
        kept: set[str] = set()
        reverted: list[str] = []

        def build(directory: Node, path: str) -> None:
            assert directory.durable is not None
            for raw, node in sorted(directory.durable.items()):
                name = os.fsdecode(raw)
                dest = os.path.join(path, name)
                rel = os.path.relpath(dest, new)
                if node.is_dir:
                    if node.id in placed:  # moved and fsynced on both sides only in part
                        continue
                    os.mkdir(dest)
                    placed[node.id] = dest
                    kept.add(rel)
                    build(node, dest)
                    os.chmod(dest, stat.S_IMODE(node.mode))
                elif stat.S_ISLNK(node.mode):
                    os.symlink(node.target, dest)
                    kept.add(rel)
                elif node.is_file:
                    if node.id in placed:
                        os.link(placed[node.id], dest)
                    elif node.clean and node.id in live:
                        os.link(live[node.id], dest)
                    else:
                        if node.clean:
                            log.error("lazyfs: contents of %s were lost by the layer", rel)
                        if self._shadow(node).exists():
                            os.link(self._shadow(node), dest)
                        else:
                            open(dest, "wb").close()
                        if node.dirty:
                            reverted.append(rel)
                        os.chmod(dest, stat.S_IMODE(node.mode))
                    placed[node.id] = dest
                    kept.add(rel)
                if os.getuid() == 0:
                    os.chown(dest, node.uid, node.gid, follow_symlinks=False)

        build(self.root, str(new))
        os.chmod(new, stat.S_IMODE(self.root.mode))
        old = self.backing.with_name(self.backing.name + ".lazyfs-old")
        os.rename(self.backing, old)
        os.rename(new, self.backing)
        shutil.rmtree(old)
        shutil.rmtree(self.shadows)
        lost, revived = sorted(live_names - kept), sorted(kept - live_names)
        log.info(
            "lazyfs: cut %s: %d names kept, %d lost %s, %d came back %s, %d files reverted %s;"
            " lost at the top: %s",
            self.backing,
            len(kept),
            len(lost),
            lost[:20],
            len(revived),
            revived[:20],
            len(reverted),
            reverted[:20],
            [name for name in lost if os.sep not in name],
        )

    # --- FUSE: names ----------------------------------------------------------------------

    @errors_as_fuse
    async def lookup(
        self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self.nodes[parent_inode]
        if name == b".":
            node, st = parent, None
            node.lookups += 1
        else:
            node, st = self._node(parent, name)
        return self._attrs(node, st)

    async def forget(self, inode_list: Sequence[tuple[pyfuse3.InodeT, int]]) -> None:
        for inode, count in inode_list:
            node = self.nodes[inode]
            node.lookups -= count
            if node.lookups <= 0 and node is not self.root and node.fd is not None:
                os.close(node.fd)
                node.fd = None

    @errors_as_fuse
    async def getattr(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return self._attrs(self.nodes[inode])

    @errors_as_fuse
    async def setattr(
        self,
        inode: pyfuse3.InodeT,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: pyfuse3.FileHandleT | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        node = self.nodes[inode]
        path = proc(self._fd(node))
        if fields.update_size:
            fd = fh if fh is not None else os.open(path, os.O_RDWR)
            try:
                self._before_change(node, fd)
                old = os.fstat(fd).st_size
                os.ftruncate(fd, attr.st_size)
                node.mark(min(old, attr.st_size), max(old, attr.st_size))
            finally:
                if fh is None:
                    os.close(fd)
        if stat.S_ISLNK(node.mode):
            return self._attrs(node)  # nothing else to change on a symlink here
        if fields.update_mode:
            os.chmod(path, stat.S_IMODE(attr.st_mode))
        if fields.update_uid or fields.update_gid:
            uid = attr.st_uid if fields.update_uid else -1
            gid = attr.st_gid if fields.update_gid else -1
            os.chown(path, uid, gid)
        if fields.update_atime or fields.update_mtime:
            st = os.stat(path)
            atime = attr.st_atime_ns if fields.update_atime else st.st_atime_ns
            mtime = attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns
            os.utime(path, ns=(atime, mtime))
        return self._attrs(node)

    @errors_as_fuse
    async def readlink(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileNameT:
        return pyfuse3.FileNameT(self.nodes[inode].target)

    @errors_as_fuse
    async def mkdir(
        self,
        parent_inode: pyfuse3.InodeT,
        name: pyfuse3.FileNameT,
        mode: pyfuse3.ModeT,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        parent = self.nodes[parent_inode]
        os.mkdir(name, stat.S_IMODE(mode), dir_fd=self._fd(parent))
        return self._attrs(self._created(parent, name, ctx))

    @errors_as_fuse
    async def symlink(
        self,
        parent_inode: pyfuse3.InodeT,
        name: pyfuse3.FileNameT,
        target: pyfuse3.FileNameT,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        parent = self.nodes[parent_inode]
        os.symlink(target, name, dir_fd=self._fd(parent))
        return self._attrs(self._created(parent, name, ctx, bytes(target)))

    @errors_as_fuse
    async def link(
        self,
        inode: pyfuse3.InodeT,
        new_parent_inode: pyfuse3.InodeT,
        new_name: pyfuse3.FileNameT,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        node, parent = self.nodes[inode], self.nodes[new_parent_inode]
        os.link(proc(self._fd(node)), new_name, dst_dir_fd=self._fd(parent), follow_symlinks=True)
        node.lookups += 1
        return self._attrs(node)

    @errors_as_fuse
    async def unlink(
        self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, ctx: pyfuse3.RequestContext
    ) -> None:
        parent = self.nodes[parent_inode]
        self._before_last_unlink(parent, name)
        os.unlink(name, dir_fd=self._fd(parent))

    @errors_as_fuse
    async def rmdir(
        self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, ctx: pyfuse3.RequestContext
    ) -> None:
        os.rmdir(name, dir_fd=self._fd(self.nodes[parent_inode]))

    @errors_as_fuse
    async def rename(
        self,
        parent_inode_old: pyfuse3.InodeT,
        name_old: pyfuse3.FileNameT,
        parent_inode_new: pyfuse3.InodeT,
        name_new: pyfuse3.FileNameT,
        flags: pyfuse3.FlagT,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        if flags:
            raise pyfuse3.FUSEError(errno.EINVAL)  # RENAME_NOREPLACE/EXCHANGE: not needed
        old, new = self.nodes[parent_inode_old], self.nodes[parent_inode_new]
        self._before_last_unlink(new, name_new)
        os.rename(name_old, name_new, src_dir_fd=self._fd(old), dst_dir_fd=self._fd(new))

    # --- FUSE: files ----------------------------------------------------------------------

    @errors_as_fuse
    async def open(
        self, inode: pyfuse3.InodeT, flags: pyfuse3.FlagT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileInfo:
        node = self.nodes[inode]
        # Read-write whenever writing, so that fsync can copy from this descriptor.
        mode = os.O_RDONLY if flags & os.O_ACCMODE == os.O_RDONLY else os.O_RDWR
        fd = os.open(proc(self._fd(node)), mode | os.O_CLOEXEC)
        self.files[fd] = node
        return pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(fd), keep_cache=True)

    @errors_as_fuse
    async def create(
        self,
        parent_inode: pyfuse3.InodeT,
        name: pyfuse3.FileNameT,
        mode: pyfuse3.ModeT,
        flags: pyfuse3.FlagT,
        ctx: pyfuse3.RequestContext,
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        parent = self.nodes[parent_inode]
        try:
            fd = os.open(
                name,
                os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                stat.S_IMODE(mode),
                dir_fd=self._fd(parent),
            )
        except FileExistsError:
            if flags & os.O_EXCL:
                raise
            node, _ = self._node(parent, name)
            return await self.open(pyfuse3.InodeT(node.id), flags, ctx), self._attrs(node)
        node = self._created(parent, name, ctx)
        self.files[fd] = node
        return pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(fd), keep_cache=True), self._attrs(node)

    @errors_as_fuse
    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        return os.pread(fh, size, off)

    @errors_as_fuse
    async def write(self, fh: pyfuse3.FileHandleT, off: int, buf: bytes) -> int:
        node = self.files[fh]
        self._before_change(node, fh)
        view = memoryview(buf)
        done = 0
        while done < len(view):
            done += os.pwrite(fh, view[done:], off + done)
        node.mark(off, off + done)
        return done

    async def flush(self, fh: pyfuse3.FileHandleT) -> None:
        pass

    async def release(self, fh: pyfuse3.FileHandleT) -> None:
        del self.files[fh]
        os.close(fh)

    @errors_as_fuse
    async def fsync(self, fh: pyfuse3.FileHandleT, datasync: bool) -> None:
        self._sync_file(self.files[fh], fh)

    # --- FUSE: directories ----------------------------------------------------------------

    @errors_as_fuse
    async def opendir(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileHandleT:
        node = self.nodes[inode]
        fh = self.next_dir_fh
        self.next_dir_fh += 1
        self.dirs[fh] = (node, [])
        return pyfuse3.FileHandleT(fh)

    @errors_as_fuse
    async def readdir(
        self, fh: pyfuse3.FileHandleT, start_id: int, token: pyfuse3.ReaddirToken
    ) -> None:
        node, listing = self.dirs[fh]
        if start_id == 0:  # a listing per pass, so that offsets stay put while it lasts
            listing[:] = self._listing(node)
        for i in range(start_id, len(listing)):
            name, st = listing[i]
            child = self.by_ino.get(st.st_ino)
            if child is None:
                continue
            if not pyfuse3.readdir_reply(
                token, pyfuse3.FileNameT(name), self._attrs(child, st), i + 1
            ):
                return
            self._hold(child, node, name)

    async def releasedir(self, fh: pyfuse3.FileHandleT) -> None:
        self.dirs.pop(fh, None)

    @errors_as_fuse
    async def fsyncdir(self, fh: pyfuse3.FileHandleT, datasync: bool) -> None:
        self._sync_dir(self.dirs[fh][0])

    @errors_as_fuse
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = os.statvfs(self.backing)
        data = pyfuse3.StatvfsData()
        for key in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail"):
            setattr(data, key, getattr(st, key))
        for key in ("f_files", "f_ffree", "f_favail", "f_namemax"):
            setattr(data, key, getattr(st, key))
        return data


async def serve(fs: LazyFS, mountpoint: Path) -> bool:
    """Serve until a signal; True for a cut (SIGUSR1)."""
    cut = False

    async def watch(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        nonlocal cut
        with trio.open_signal_receiver(signal.SIGUSR1, signal.SIGTERM, signal.SIGINT) as signals:
            task_status.started()
            async for signum in signals:
                cut = signum == signal.SIGUSR1
                pyfuse3.terminate()
                return

    async with trio.open_nursery() as nursery:
        await nursery.start(watch)
        pyfuse3.init(
            fs, str(mountpoint), {"fsname=lazyfs", "subtype=lazyfs", "default_permissions"}
        )
        print(f"{READY} {fs.backing} at {mountpoint}", file=sys.stderr, flush=True)
        try:
            await pyfuse3.main()
        finally:
            pyfuse3.close(unmount=True)
        nursery.cancel_scope.cancel()
    return cut


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lazyfs", description=__doc__.split("\n")[0])
    parser.add_argument("backing", type=Path)
    parser.add_argument("mountpoint", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    backing = args.backing.resolve()
    for leftover in (".lazyfs-new", ".lazyfs-old"):
        shutil.rmtree(backing.with_name(backing.name + leftover), ignore_errors=True)
    fs = LazyFS(backing)
    args.mountpoint.mkdir(exist_ok=True)
    if trio.run(serve, fs, args.mountpoint):
        for fd in [n.fd for n in fs.nodes.values() if n.fd is not None] + list(fs.files):
            os.close(fd)
        fs.cut()
        print(CUT_DONE, file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
