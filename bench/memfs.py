"""memfs: a minimal in-memory pyfuse3 filesystem, the ceiling for the benchmark.

    python -m bench.memfs MOUNTPOINT [--writeback] [--timeout 1.0]

No network, no disk, no locks, no caches of its own: every request is answered from Python
dicts and bytearrays by the same stack dfs-mount uses (pyfuse3 + trio, one process, the same
mount options, attribute timeouts and `st_blksize`). Whatever dfs-mount reaches is bounded by
what this reaches on the same machine, so `bench.run` measures it in the same run and reports
dfs as a fraction of it: the distance to the ceiling is what dfs itself costs (tracker round
trips, chunking, checksums, replication), the rest is FUSE and Python.

`--writeback` turns on the kernel's writeback cache (dfs-mount keeps it off for close-to-open
consistency between mounts), which shows what batching writes in the kernel would be worth.

Mounted like a real filesystem, in its own process: it prints `memfs: mounted at PATH` on
stderr once the kernel has the mount, serves until `fusermount3 -u` ends the session or SIGINT
or SIGTERM arrives, then unmounts and exits 0. Good enough for the benchmark's tools (`cp`,
`cat`, `tar`, `ls`, `rm`) and POSIX basics; not a general-purpose filesystem (no xattrs, no
hard-link or symlink niceties beyond the basics, everything is lost at unmount).
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import stat
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import pyfuse3
import trio

PROG = "memfs"
READY_PREFIX = f"{PROG}: mounted at "
# As dfs-mount: `cp` sizes its writes by st_blksize, and statfs reports 1 MiB blocks.
BLKSIZE = 1 << 20
# statfs figures: memory is not a disk, so report something large and constant.
STATFS_BLOCKS = 1 << 24  # 16 TiB of 1 MiB blocks
STATFS_FILES = 1 << 32
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


@dataclass
class Node:
    """One inode: a file's bytes, a directory's entries, or a symlink's target."""

    ino: int
    mode: int
    uid: int
    gid: int
    rdev: int = 0
    nlink: int = 1
    data: bytearray = field(default_factory=bytearray)
    target: bytes = b""
    # name -> (inode, readdir cookie); cookies only grow, so insertion order is cookie order.
    children: dict[bytes, tuple[int, int]] = field(default_factory=dict)
    next_cookie: int = 1
    lookups: int = 0
    opens: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


@dataclass
class DirHandle:
    ino: int
    # Entries as of the first readdir call: (name, inode, cookie), in cookie order.
    snapshot: list[tuple[bytes, int, int]] = field(default_factory=list)


def _fail(code: int) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(code)


class MemFS(pyfuse3.Operations):
    """dict-based inodes; see the module docstring."""

    supports_dot_lookup = True

    def __init__(self, *, writeback: bool = False, timeout_s: float = 1.0) -> None:
        super().__init__()
        self.enable_writeback_cache = writeback
        self.timeout_s = timeout_s
        self.nodes: dict[int, Node] = {}
        self.parents: dict[int, int] = {}  # directory -> its parent, for ".."
        self.files: dict[int, tuple[int, bool]] = {}  # fh -> (inode, O_APPEND)
        self.dirs: dict[int, DirHandle] = {}
        self.next_ino = pyfuse3.ROOT_INODE + 1
        self.next_fh = 1
        now = time.time_ns()
        root = Node(pyfuse3.ROOT_INODE, stat.S_IFDIR | 0o755, os.getuid(), os.getgid(), nlink=2)
        root.atime_ns = root.mtime_ns = root.ctime_ns = now
        self.nodes[root.ino] = root
        self.parents[root.ino] = root.ino

    # --- helpers --------------------------------------------------------------------------

    def _node(self, ino: int) -> Node:
        node = self.nodes.get(ino)
        if node is None:
            raise _fail(errno.ENOENT)
        return node

    def _dir(self, ino: int) -> Node:
        node = self._node(ino)
        if not node.is_dir:
            raise _fail(errno.ENOTDIR)
        return node

    def _attrs(self, node: Node) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = pyfuse3.InodeT(node.ino)
        entry.generation = 0
        entry.entry_timeout = self.timeout_s
        entry.attr_timeout = self.timeout_s
        entry.st_mode = pyfuse3.ModeT(node.mode)
        entry.st_nlink = node.nlink
        entry.st_uid = node.uid
        entry.st_gid = node.gid
        entry.st_rdev = node.rdev
        if stat.S_ISLNK(node.mode):
            entry.st_size = len(node.target)
        elif node.is_dir:
            entry.st_size = 4096
        else:
            entry.st_size = len(node.data)
        entry.st_blksize = BLKSIZE
        entry.st_blocks = (entry.st_size + 511) // 512
        entry.st_atime_ns = node.atime_ns
        entry.st_mtime_ns = node.mtime_ns
        entry.st_ctime_ns = node.ctime_ns
        return entry

    def _entry(self, node: Node) -> pyfuse3.EntryAttributes:
        """Attributes for a reply that makes the kernel count one more lookup."""
        node.lookups += 1
        return self._attrs(node)

    def _maybe_free(self, node: Node) -> None:
        if node.nlink <= 0 and node.lookups <= 0 and node.opens <= 0:
            self.nodes.pop(node.ino, None)
            self.parents.pop(node.ino, None)

    def _check_name(self, name: bytes) -> None:
        if len(name) > 255:
            raise _fail(errno.ENAMETOOLONG)

    def _link_in(self, parent: Node, name: bytes, node: Node) -> None:
        parent.children[name] = (node.ino, parent.next_cookie)
        parent.next_cookie += 1
        parent.mtime_ns = parent.ctime_ns = time.time_ns()

    def _new_node(
        self, parent_ino: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext, rdev: int = 0
    ) -> Node:
        self._check_name(name)
        parent = self._dir(parent_ino)
        if name in parent.children:
            raise _fail(errno.EEXIST)
        gid = parent.gid if parent.mode & stat.S_ISGID else ctx.gid
        node = Node(self.next_ino, mode, ctx.uid, gid, rdev=rdev)
        self.next_ino += 1
        node.atime_ns = node.mtime_ns = node.ctime_ns = time.time_ns()
        if node.is_dir:
            node.nlink = 2
            parent.nlink += 1
            self.parents[node.ino] = parent.ino
            if parent.mode & stat.S_ISGID:
                node.mode |= stat.S_ISGID
        self.nodes[node.ino] = node
        self._link_in(parent, name, node)
        return node

    def _unlink_name(self, parent: Node, name: bytes) -> None:
        ino, _ = parent.children.pop(name)
        node = self.nodes[ino]
        now = time.time_ns()
        parent.mtime_ns = parent.ctime_ns = node.ctime_ns = now
        if node.is_dir:
            node.nlink = 0
            parent.nlink -= 1
        else:
            node.nlink -= 1
        self._maybe_free(node)

    # --- names and attributes -------------------------------------------------------------

    async def lookup(
        self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self._dir(parent_inode)
        if name == b".":
            return self._entry(parent)
        if name == b"..":
            return self._entry(self._node(self.parents.get(parent.ino, parent.ino)))
        child = parent.children.get(name)
        if child is None:
            raise _fail(errno.ENOENT)
        return self._entry(self.nodes[child[0]])

    async def forget(self, inode_list: Sequence[tuple[pyfuse3.InodeT, int]]) -> None:
        for ino, count in inode_list:
            node = self.nodes.get(ino)
            if node is not None:
                node.lookups -= count
                self._maybe_free(node)

    async def getattr(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return self._attrs(self._node(inode))

    async def setattr(
        self,
        inode: pyfuse3.InodeT,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: pyfuse3.FileHandleT | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        now = time.time_ns()
        if fields.update_size:
            if node.is_dir:
                raise _fail(errno.EISDIR)
            size = attr.st_size
            if size < len(node.data):
                del node.data[size:]
            else:
                node.data.extend(bytes(size - len(node.data)))
            node.mtime_ns = now
        if fields.update_mode:
            node.mode = stat.S_IFMT(node.mode) | stat.S_IMODE(attr.st_mode)
        if fields.update_uid:
            node.uid = attr.st_uid
        if fields.update_gid:
            node.gid = attr.st_gid
        if fields.update_atime:
            node.atime_ns = attr.st_atime_ns
        if fields.update_mtime:
            node.mtime_ns = attr.st_mtime_ns
        node.ctime_ns = attr.st_ctime_ns if fields.update_ctime else now
        return self._attrs(node)

    async def readlink(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileNameT:
        node = self._node(inode)
        if not stat.S_ISLNK(node.mode):
            raise _fail(errno.EINVAL)
        return pyfuse3.FileNameT(node.target)

    async def mknod(
        self,
        parent_inode: pyfuse3.InodeT,
        name: pyfuse3.FileNameT,
        mode: pyfuse3.ModeT,
        rdev: int,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        return self._entry(self._new_node(parent_inode, name, mode, ctx, rdev))

    async def mkdir(
        self,
        parent_inode: pyfuse3.InodeT,
        name: pyfuse3.FileNameT,
        mode: pyfuse3.ModeT,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        mode = pyfuse3.ModeT(stat.S_IFDIR | stat.S_IMODE(mode))
        return self._entry(self._new_node(parent_inode, name, mode, ctx))

    async def symlink(
        self,
        parent_inode: pyfuse3.InodeT,
        name: pyfuse3.FileNameT,
        target: pyfuse3.FileNameT,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        node = self._new_node(parent_inode, name, stat.S_IFLNK | 0o777, ctx)
        node.target = bytes(target)
        return self._entry(node)

    async def link(
        self,
        inode: pyfuse3.InodeT,
        new_parent_inode: pyfuse3.InodeT,
        new_name: pyfuse3.FileNameT,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        self._check_name(new_name)
        node = self._node(inode)
        if node.is_dir:
            raise _fail(errno.EPERM)
        parent = self._dir(new_parent_inode)
        if new_name in parent.children:
            raise _fail(errno.EEXIST)
        node.nlink += 1
        node.ctime_ns = time.time_ns()
        self._link_in(parent, new_name, node)
        return self._entry(node)

    async def unlink(
        self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, ctx: pyfuse3.RequestContext
    ) -> None:
        parent = self._dir(parent_inode)
        child = parent.children.get(name)
        if child is None:
            raise _fail(errno.ENOENT)
        if self.nodes[child[0]].is_dir:
            raise _fail(errno.EISDIR)
        self._unlink_name(parent, name)

    async def rmdir(
        self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, ctx: pyfuse3.RequestContext
    ) -> None:
        parent = self._dir(parent_inode)
        child = parent.children.get(name)
        if child is None:
            raise _fail(errno.ENOENT)
        node = self.nodes[child[0]]
        if not node.is_dir:
            raise _fail(errno.ENOTDIR)
        if node.children:
            raise _fail(errno.ENOTEMPTY)
        self._unlink_name(parent, name)

    async def rename(
        self,
        parent_inode_old: pyfuse3.InodeT,
        name_old: pyfuse3.FileNameT,
        parent_inode_new: pyfuse3.InodeT,
        name_new: pyfuse3.FileNameT,
        flags: pyfuse3.FlagT,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        if flags & RENAME_EXCHANGE:
            raise _fail(errno.EINVAL)
        self._check_name(name_new)
        old_parent = self._dir(parent_inode_old)
        new_parent = self._dir(parent_inode_new)
        moving = old_parent.children.get(name_old)
        if moving is None:
            raise _fail(errno.ENOENT)
        node = self.nodes[moving[0]]
        existing = new_parent.children.get(name_new)
        if existing is not None:
            if existing[0] == node.ino:
                return
            if flags & RENAME_NOREPLACE:
                raise _fail(errno.EEXIST)
            victim = self.nodes[existing[0]]
            if victim.is_dir and not node.is_dir:
                raise _fail(errno.EISDIR)
            if node.is_dir and not victim.is_dir:
                raise _fail(errno.ENOTDIR)
            if victim.is_dir and victim.children:
                raise _fail(errno.ENOTEMPTY)
            self._unlink_name(new_parent, name_new)
        del old_parent.children[name_old]
        old_parent.mtime_ns = old_parent.ctime_ns = time.time_ns()
        if node.is_dir and old_parent is not new_parent:
            old_parent.nlink -= 1
            new_parent.nlink += 1
            self.parents[node.ino] = new_parent.ino
        node.ctime_ns = time.time_ns()
        self._link_in(new_parent, name_new, node)

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        data = pyfuse3.StatvfsData()
        data.f_bsize = data.f_frsize = BLKSIZE
        used = sum(len(n.data) for n in self.nodes.values()) // BLKSIZE
        data.f_blocks = STATFS_BLOCKS
        data.f_bfree = data.f_bavail = STATFS_BLOCKS - used
        data.f_files = STATFS_FILES
        data.f_ffree = data.f_favail = STATFS_FILES - len(self.nodes)
        data.f_namemax = 255
        return data

    # --- files ----------------------------------------------------------------------------

    def _add_handle(self, node: Node, flags: int) -> pyfuse3.FileHandleT:
        fh = self.next_fh
        self.next_fh += 1
        self.files[fh] = (node.ino, bool(flags & os.O_APPEND))
        node.opens += 1
        return pyfuse3.FileHandleT(fh)

    async def open(
        self, inode: pyfuse3.InodeT, flags: pyfuse3.FlagT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileInfo:
        node = self._node(inode)
        if node.is_dir:
            raise _fail(errno.EISDIR)
        if flags & os.O_TRUNC and node.data:
            node.data = bytearray()
            node.mtime_ns = node.ctime_ns = time.time_ns()
        # The bytes change only through this mount: the kernel may keep its page cache.
        return pyfuse3.FileInfo(fh=self._add_handle(node, flags), keep_cache=True)

    async def create(
        self,
        parent_inode: pyfuse3.InodeT,
        name: pyfuse3.FileNameT,
        mode: pyfuse3.ModeT,
        flags: pyfuse3.FlagT,
        ctx: pyfuse3.RequestContext,
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        mode = pyfuse3.ModeT(stat.S_IFREG | stat.S_IMODE(mode))
        node = self._new_node(parent_inode, name, mode, ctx)
        fh = self._add_handle(node, flags)
        return pyfuse3.FileInfo(fh=fh, keep_cache=True), self._entry(node)

    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        node = self.nodes[self.files[fh][0]]
        # No copy: pyfuse3 replies from the buffer before any other handler can run (and
        # so before a write could resize the bytearray under the view).
        return memoryview(node.data)[off : off + size]  # type: ignore[return-value]

    async def write(self, fh: pyfuse3.FileHandleT, off: int, buf: bytes) -> int:
        ino, append = self.files[fh]
        node = self.nodes[ino]
        data = node.data
        if append:
            off = len(data)
        elif off > len(data):
            data.extend(bytes(off - len(data)))
        data[off : off + len(buf)] = buf
        node.mtime_ns = node.ctime_ns = time.time_ns()
        return len(buf)

    async def flush(self, fh: pyfuse3.FileHandleT) -> None:
        """Nothing is buffered here."""

    async def fsync(self, fh: pyfuse3.FileHandleT, datasync: bool) -> None:
        """Memory is as durable as it gets here."""

    async def release(self, fh: pyfuse3.FileHandleT) -> None:
        ino, _ = self.files.pop(fh)
        node = self.nodes[ino]
        node.opens -= 1
        self._maybe_free(node)

    # --- directories ----------------------------------------------------------------------

    async def opendir(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileHandleT:
        self._dir(inode)
        fh = self.next_fh
        self.next_fh += 1
        self.dirs[fh] = DirHandle(inode)
        return pyfuse3.FileHandleT(fh)

    async def readdir(
        self, fh: pyfuse3.FileHandleT, start_id: int, token: pyfuse3.ReaddirToken
    ) -> None:
        handle = self.dirs[fh]
        node = self._dir(handle.ino)
        if start_id == 0 or not handle.snapshot:
            handle.snapshot = [(name, ino, cookie) for name, (ino, cookie) in node.children.items()]
        entries = handle.snapshot
        # Cookies are increasing: find the first entry after start_id by bisection.
        lo, hi = 0, len(entries)
        while lo < hi:
            mid = (lo + hi) // 2
            if entries[mid][2] <= start_id:
                lo = mid + 1
            else:
                hi = mid
        for name, ino, cookie in entries[lo:]:
            current = node.children.get(name)
            if current is None or current[0] != ino:
                continue  # removed or replaced since the snapshot
            child = self.nodes[ino]
            # readdirplus: a successful reply counts as a lookup of the entry.
            if not pyfuse3.readdir_reply(
                token, pyfuse3.FileNameT(name), self._attrs(child), cookie
            ):
                return
            child.lookups += 1

    async def releasedir(self, fh: pyfuse3.FileHandleT) -> None:
        self.dirs.pop(fh, None)

    async def fsyncdir(self, fh: pyfuse3.FileHandleT, datasync: bool) -> None:
        """Nothing to write back."""


# --- the process ---------------------------------------------------------------------------


async def _serve(mountpoint: str) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_watch_signals)
        print(f"{READY_PREFIX}{mountpoint}", file=sys.stderr, flush=True)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


async def _watch_signals() -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            pyfuse3.terminate()
            return


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description="Mount an in-memory filesystem.")
    parser.add_argument("mountpoint")
    parser.add_argument("--writeback", action="store_true", help="enable the writeback cache")
    parser.add_argument(
        "--timeout", type=float, default=1.0, help="entry and attribute timeout (s), as dfs-mount"
    )
    args = parser.parse_args(argv)
    mountpoint = os.path.abspath(args.mountpoint)
    ops = MemFS(writeback=args.writeback, timeout_s=args.timeout)
    options = {"fsname=memfs", "subtype=memfs", "default_permissions"}
    try:
        pyfuse3.init(ops, mountpoint, options)
    except RuntimeError as exc:
        print(f"{PROG}: cannot mount at {mountpoint}: {exc}", file=sys.stderr, flush=True)
        return 1
    try:
        trio.run(_serve, mountpoint)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
