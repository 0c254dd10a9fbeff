"""POSIX namespace rules on top of the metadata store.

Each public method is one transaction and raises a DfsError with the errno ext4 would give.
Methods are synchronous: the tracker calls them from its trio tasks without awaiting inside,
so no two operations interleave. Chunk rows that an operation drops are returned to the caller,
which tells the keepers to delete them; the store never talks to keepers.
"""

from __future__ import annotations

import os
import stat
import time
from collections import defaultdict
from dataclasses import dataclass, field

from cluster import xattrs
from cluster.errors import (
    Exists,
    InvalidArgument,
    IsADir,
    NameTooLong,
    NoData,
    NoSpace,
    NotADir,
    NotEmpty,
    NotFound,
    NotPermitted,
    TooBig,
)
from cluster.tracker.store import ROOT_INO, ChunkRow, DirStats, Inode, MetadataStore

NAME_MAX = 255
PATH_MAX = 4096
LINK_MAX = 65000
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
# Names and values of one inode together, at most (ENOSPC past it, as on a full ext4 xattr
# block): every row lives in the tracker's one database, and 16 values of the largest size
# are more than any tool sets (ext4 without ea_inode keeps 4 KiB per inode).
XATTR_INODE_MAX = 1 << 20


def check_name(name: bytes) -> None:
    if len(name) > NAME_MAX:
        raise NameTooLong(f"name of {len(name)} bytes")
    if not name or b"/" in name or b"\0" in name or name in (b".", b".."):
        raise InvalidArgument(f"invalid name {name!r}")


@dataclass(slots=True)
class Removal:
    """What an operation freed: chunks to delete on the keepers."""

    chunks: list[ChunkRow] = field(default_factory=list)


class Namespace:
    def __init__(self, store: MetadataStore, chunk_size: int) -> None:
        self.store = store
        self.chunk_size = chunk_size
        # ino -> session -> open count. Soft state: an unlinked file stays while held open.
        self.open_by: dict[int, dict[str, int]] = defaultdict(dict)

    # --- reads ----------------------------------------------------------------------------

    def inode(self, ino: int) -> Inode:
        inode = self.store.get_inode(ino)
        if inode is None:
            raise NotFound(f"inode {ino}")
        return inode

    def directory(self, ino: int) -> Inode:
        inode = self.inode(ino)
        if not stat.S_ISDIR(inode.mode):
            raise NotADir(f"inode {ino} is not a directory")
        return inode

    def lookup(self, parent: int, name: bytes) -> Inode:
        self.directory(parent)
        if len(name) > NAME_MAX:
            raise NameTooLong(f"name of {len(name)} bytes")
        ino = self.store.lookup(parent, name)
        if ino is None:
            raise NotFound(os.fsdecode(name))
        return self.inode(ino)

    def resolve(self, path: bytes) -> Inode:
        if len(path) > PATH_MAX:
            raise NameTooLong("path too long")
        inode = self.inode(ROOT_INO)
        for part in path.split(b"/"):
            if part in (b"", b"."):
                continue
            if part == b"..":
                parent = self.store.parent_of(inode.ino)
                inode = self.inode(parent if parent is not None else ROOT_INO)
                continue
            inode = self.lookup(inode.ino, part)
        return inode

    def disk_usage(self, path: bytes) -> tuple[Inode, DirStats]:
        """`dfs du`: the totals of the tree at `path`, read from the counters the store keeps
        per directory (one row, whatever the size of the tree); for a file, its own."""
        inode = self.resolve(path)
        totals = self.store.dirstats(inode.ino) if stat.S_ISDIR(inode.mode) else None
        return inode, totals or self.store.entry_stats(inode.ino)

    def readdir(self, ino: int, offset: int, limit: int) -> list[tuple[bytes, Inode, int]]:
        self.directory(ino)
        entries = []
        for dentry_id, name, child in self.store.list_dentries(
            ino, offset, max(1, min(limit, 10000))
        ):
            inode = self.store.get_inode(child)
            if inode is not None:
                entries.append((name, inode, dentry_id))
        return entries

    # --- creation -------------------------------------------------------------------------

    def make_node(
        self, parent: int, name: bytes, mode: int, uid: int, gid: int, rdev: int = 0
    ) -> Inode:
        with self.store.transaction():
            directory = self._new_name(parent, name)
            if directory.mode & stat.S_ISGID:
                # BSD group semantics on a setgid directory, as on ext4.
                gid = directory.gid
                if stat.S_ISDIR(mode):
                    mode |= stat.S_ISGID
            if stat.S_IFMT(mode) == 0:
                mode |= stat.S_IFREG
            if stat.S_IFMT(mode) not in (
                stat.S_IFREG,
                stat.S_IFDIR,
                stat.S_IFIFO,
                stat.S_IFCHR,
                stat.S_IFBLK,
                stat.S_IFSOCK,
            ):
                raise InvalidArgument(f"unsupported file type {oct(mode)}")
            is_dir = stat.S_ISDIR(mode)
            inode = self._insert(mode, uid, gid, nlink=2 if is_dir else 1, rdev=rdev)
            if directory.replication:  # a goal set on a directory holds for what it gets
                inode.replication = directory.replication
                self.store.update_inode(inode)
            self.store.add_dentry(parent, name, inode.ino)
            if is_dir:
                directory.nlink += 1
            self._touch_dir(directory)
            return inode

    def symlink(self, parent: int, name: bytes, target: bytes, uid: int, gid: int) -> Inode:
        if len(target) > PATH_MAX or not target:
            raise (NameTooLong if target else NotFound)("bad symlink target")
        with self.store.transaction():
            directory = self._new_name(parent, name)
            inode = self._insert(stat.S_IFLNK | 0o777, uid, gid, nlink=1, target=target)
            inode.size = len(target)
            self.store.update_inode(inode)
            self.store.add_dentry(parent, name, inode.ino)
            self._touch_dir(directory)
            return inode

    def readlink(self, ino: int) -> bytes:
        inode = self.inode(ino)
        if inode.target is None:
            raise InvalidArgument("not a symlink")
        return bytes(inode.target)

    def link(self, ino: int, new_parent: int, new_name: bytes) -> Inode:
        with self.store.transaction():
            inode = self.inode(ino)
            if stat.S_ISDIR(inode.mode):
                raise NotPermitted("hard link to a directory")
            if inode.nlink >= LINK_MAX:
                raise NotPermitted("too many links")
            directory = self._new_name(new_parent, new_name)
            self.store.add_dentry(new_parent, new_name, ino)
            inode.nlink += 1
            inode.ctime_ns = time.time_ns()
            self.store.update_inode(inode)
            self._touch_dir(directory)
            return inode

    # --- removal --------------------------------------------------------------------------

    def unlink(self, parent: int, name: bytes) -> tuple[Inode, Removal]:
        with self.store.transaction():
            directory = self.directory(parent)
            inode = self.lookup(parent, name)
            if stat.S_ISDIR(inode.mode):
                raise IsADir(os.fsdecode(name))
            self.store.remove_dentry(parent, name)
            self._touch_dir(directory)
            removal = self._drop_link(inode)
            return inode, removal

    def rmdir(self, parent: int, name: bytes) -> Inode:
        """Remove an empty directory; returns it as it was."""
        with self.store.transaction():
            directory = self.directory(parent)
            if name == b".":
                raise InvalidArgument("rmdir .")
            if name == b"..":
                raise NotEmpty("rmdir ..")
            inode = self.lookup(parent, name)
            if not stat.S_ISDIR(inode.mode):
                raise NotADir(os.fsdecode(name))
            if self.store.has_dentries(inode.ino):
                raise NotEmpty(os.fsdecode(name))
            self.store.remove_dentry(parent, name)
            self.store.delete_inode(inode.ino)
            directory.nlink -= 1
            self._touch_dir(directory)
            return inode

    def rename(
        self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes, flags: int
    ) -> Removal:
        with self.store.transaction():
            check_name(new_name)
            src_dir = self.directory(old_parent)
            dst_dir = self.directory(new_parent) if new_parent != old_parent else src_dir
            moving = self.lookup(old_parent, old_name)
            existing_ino = self.store.lookup(new_parent, new_name)
            removal = Removal()
            if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or flags == (
                RENAME_NOREPLACE | RENAME_EXCHANGE
            ):
                raise InvalidArgument("bad rename flags")
            moving_dir = stat.S_ISDIR(moving.mode)
            if moving_dir and self._is_ancestor(moving.ino, new_parent):
                raise InvalidArgument("cannot move a directory into itself")
            if existing_ino == moving.ino:
                return removal  # same inode: POSIX says do nothing
            if flags & RENAME_EXCHANGE:
                if existing_ino is None:
                    raise NotFound(os.fsdecode(new_name))
                other = self.inode(existing_ino)
                if stat.S_ISDIR(other.mode) and self._is_ancestor(other.ino, old_parent):
                    raise InvalidArgument("cannot move a directory into itself")
                self.store.remove_dentry(old_parent, old_name)
                self.store.remove_dentry(new_parent, new_name)
                self.store.add_dentry(old_parent, old_name, other.ino)
                self.store.add_dentry(new_parent, new_name, moving.ino)
                if stat.S_ISDIR(other.mode) != moving_dir and src_dir is not dst_dir:
                    delta = 1 if moving_dir else -1
                    dst_dir.nlink += delta
                    src_dir.nlink -= delta
                self._touch(moving, other)
                self._touch_dir(src_dir, dst_dir)
                return removal
            if existing_ino is not None:
                if flags & RENAME_NOREPLACE:
                    raise Exists(os.fsdecode(new_name))
                existing = self.inode(existing_ino)
                if stat.S_ISDIR(existing.mode):
                    if not moving_dir:
                        raise IsADir(os.fsdecode(new_name))
                    if self.store.has_dentries(existing.ino):
                        raise NotEmpty(os.fsdecode(new_name))
                    self.store.remove_dentry(new_parent, new_name)
                    self.store.delete_inode(existing.ino)
                    dst_dir.nlink -= 1
                else:
                    if moving_dir:
                        raise NotADir(os.fsdecode(new_name))
                    self.store.remove_dentry(new_parent, new_name)
                    removal = self._drop_link(existing)
            self.store.remove_dentry(old_parent, old_name)
            self.store.add_dentry(new_parent, new_name, moving.ino)
            if moving_dir and src_dir is not dst_dir:
                src_dir.nlink -= 1
                dst_dir.nlink += 1
            self._touch(moving)
            self._touch_dir(src_dir, dst_dir)
            return removal

    # --- attributes -----------------------------------------------------------------------

    def setattr(
        self,
        ino: int,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        size: int | None = None,
        atime_ns: int | None = None,
        mtime_ns: int | None = None,
        ctime_ns: int | None = None,
    ) -> tuple[Inode, Removal]:
        with self.store.transaction():
            inode = self.inode(ino)
            removal = Removal()
            now = time.time_ns()
            if mode is not None:
                inode.mode = stat.S_IFMT(inode.mode) | (mode & 0o7777)
            if uid is not None:
                inode.uid = uid
            if gid is not None:
                inode.gid = gid
            if size is not None:
                if stat.S_ISDIR(inode.mode):
                    raise IsADir("truncate of a directory")
                if not stat.S_ISREG(inode.mode):
                    raise InvalidArgument("truncate of a special file")
                if size < 0:
                    raise InvalidArgument("negative size")
                removal.chunks = self._truncate(inode, size)
                inode.size = size
                if mtime_ns is None:
                    inode.mtime_ns = now
            if atime_ns is not None:
                inode.atime_ns = atime_ns
            if mtime_ns is not None:
                inode.mtime_ns = mtime_ns
            inode.ctime_ns = ctime_ns if ctime_ns is not None else now
            self.store.update_inode(inode)
            if removal.chunks or size is not None:
                inode = self.inode(ino)  # read back: a truncate changes the stored bytes
            return inode, removal

    def punch(self, ino: int, first_index: int, end_index: int) -> tuple[Inode, Removal]:
        """Make whole chunks holes (fallocate's punch hole and zero range): they read as
        zeros and their copies are deleted. The size stays; mtime and ctime move."""
        with self.store.transaction():
            inode = self.inode(ino)
            if not stat.S_ISREG(inode.mode):
                raise InvalidArgument("punch in a file that is not regular")
            if not 0 <= first_index <= end_index:
                raise InvalidArgument("bad chunk range")
            removal = Removal()
            removal.chunks = self.store.drop_chunks_between(ino, first_index, end_index)
            inode.mtime_ns = inode.ctime_ns = time.time_ns()
            self.store.update_inode(inode)
            return self.inode(ino), removal

    def _truncate(self, inode: Inode, size: int) -> list[ChunkRow]:
        chunk_size = inode.chunk_size or self.chunk_size
        keep = (size + chunk_size - 1) // chunk_size
        dropped = self.store.drop_chunks_from(inode.ino, keep)
        if keep:
            last = self.store.chunk_for(inode.ino, keep - 1)
            limit = size - (keep - 1) * chunk_size
            if last is not None and last.length > limit:
                self.store.put_chunk(
                    ChunkRow(last.ino, last.idx, last.chunk_id, last.version, limit, last.digest)
                )
        return dropped

    # --- extended attributes --------------------------------------------------------------

    def getxattr(self, ino: int, name: bytes) -> bytes:
        xattrs.check_name(name)
        self.inode(ino)
        value = self.store.get_xattr(ino, name)
        if value is None:
            raise NoData(f"inode {ino} has no {name!r}")
        return value

    def listxattr(self, ino: int) -> list[bytes]:
        """Every name, in every namespace (the mount hides trusted.* from unprivileged users)."""
        self.inode(ino)
        return list(self.store.xattr_sizes(ino))

    def setxattr(self, ino: int, name: bytes, value: bytes, flags: int = 0) -> Inode:
        """Set one extended attribute; ctime moves, as on ext4. Who may is the kernel's check;
        user.* only on regular files and directories (EPERM), as ext4."""
        if flags & ~(xattrs.XATTR_CREATE | xattrs.XATTR_REPLACE):
            raise InvalidArgument(f"bad setxattr flags {flags:#x}")
        xattrs.check_name(name)
        if len(value) > xattrs.XATTR_SIZE_MAX:
            raise TooBig(f"extended attribute value of {len(value)} bytes")
        with self.store.transaction():
            inode = self.inode(ino)
            if name.startswith(b"user.") and not (
                stat.S_ISREG(inode.mode) or stat.S_ISDIR(inode.mode)
            ):
                raise NotPermitted("user.* attributes are for files and directories only")
            sizes = self.store.xattr_sizes(ino)
            if name in sizes and flags & xattrs.XATTR_CREATE:
                raise Exists(f"inode {ino} has {name!r}")
            if name not in sizes and flags & xattrs.XATTR_REPLACE:
                raise NoData(f"inode {ino} has no {name!r}")
            sizes[name] = len(value)
            listed = sum(len(n) + 1 for n in sizes)
            if listed > xattrs.XATTR_LIST_MAX or listed + sum(sizes.values()) > XATTR_INODE_MAX:
                raise NoSpace(f"no room for more extended attributes on inode {ino}")
            self.store.set_xattr(ino, name, value)
            inode.ctime_ns = time.time_ns()
            self.store.update_inode(inode)
            return self.inode(ino)  # read back: the count of attributes changed

    def removexattr(self, ino: int, name: bytes) -> Inode:
        xattrs.check_name(name)
        with self.store.transaction():
            inode = self.inode(ino)
            if not self.store.remove_xattr(ino, name):
                raise NoData(f"inode {ino} has no {name!r}")
            inode.ctime_ns = time.time_ns()
            self.store.update_inode(inode)
            return self.inode(ino)

    # --- open files -----------------------------------------------------------------------

    def open(self, ino: int, session: str) -> Inode:
        inode = self.inode(ino)
        holders = self.open_by[ino]
        holders[session] = holders.get(session, 0) + 1
        return inode

    def release(self, ino: int, session: str) -> Removal:
        holders = self.open_by.get(ino)
        if holders is None:
            return Removal()  # never opened (or the tracker restarted since): nothing held
        if session in holders:
            holders[session] -= 1
            if holders[session] <= 0:
                del holders[session]
        if holders:
            return Removal()
        self.open_by.pop(ino, None)
        with self.store.transaction():
            inode = self.store.get_inode(ino)
            if inode is not None and inode.nlink == 0:
                return self._delete(inode)
        return Removal()

    def set_replication(self, path: bytes, copies: int) -> int:
        """Set the goal of a file, or of a directory and everything under it; returns how
        many inodes changed."""
        if not 1 <= copies <= 32:
            raise InvalidArgument("copies must be between 1 and 32")
        with self.store.transaction():
            todo = [self.resolve(path).ino]
            changed = 0
            while todo:
                inode = self.inode(todo.pop())
                inode.replication = copies
                self.store.update_inode(inode)
                changed += 1
                if stat.S_ISDIR(inode.mode):
                    after = 0
                    while page := self.store.list_dentries(inode.ino, after, 1000):
                        todo.extend(child for _, _, child in page)
                        after = page[-1][0]
            return changed

    def walk_files(self, path: bytes) -> list[tuple[bytes, Inode]]:
        """Every regular file at or under `path`, with its path."""
        root = self.resolve(path)
        found: list[tuple[bytes, Inode]] = []
        todo = [(path.rstrip(b"/") or b"/", root)]
        while todo:
            where, inode = todo.pop()
            if stat.S_ISREG(inode.mode):
                found.append((where, inode))
            elif stat.S_ISDIR(inode.mode):
                after = 0
                while page := self.store.list_dentries(inode.ino, after, 1000):
                    for _, name, child in page:
                        child_inode = self.store.get_inode(child)
                        if child_inode is not None:
                            todo.append((where.rstrip(b"/") + b"/" + name, child_inode))
                    after = page[-1][0]
        return found

    def collect_orphans(self) -> Removal:
        """At start-up nobody holds anything open: delete inodes left without names."""
        removal = Removal()
        with self.store.transaction():
            for ino in self.store.orphans():
                inode = self.store.get_inode(ino)
                if inode is not None:
                    removal.chunks += self._delete(inode).chunks
        return removal

    # --- helpers --------------------------------------------------------------------------

    def _new_name(self, parent: int, name: bytes) -> Inode:
        check_name(name)
        directory = self.directory(parent)
        if self.store.lookup(parent, name) is not None:
            raise Exists(os.fsdecode(name))
        return directory

    def _insert(
        self, mode: int, uid: int, gid: int, nlink: int, rdev: int = 0, target: bytes | None = None
    ) -> Inode:
        now = time.time_ns()
        inode = Inode(0, mode, nlink, uid, gid, rdev, 0, now, now, now, self.chunk_size, 0, target)
        self.store.insert_inode(inode)
        return inode

    def _drop_link(self, inode: Inode) -> Removal:
        inode.nlink -= 1
        inode.ctime_ns = time.time_ns()
        if inode.nlink > 0 or self.open_by.get(inode.ino):
            self.store.update_inode(inode)
            return Removal()
        return self._delete(inode)

    def _delete(self, inode: Inode) -> Removal:
        dropped = self.store.drop_chunks_from(inode.ino, 0)
        self.store.delete_inode(inode.ino)
        return Removal(dropped)

    def _is_ancestor(self, ancestor: int, ino: int) -> bool:
        """Is `ancestor` the directory `ino` or one of its parents?"""
        seen = 0
        while ino != ROOT_INO and seen < 100000:
            if ino == ancestor:
                return True
            parent = self.store.parent_of(ino)
            if parent is None:
                return False
            ino = parent
            seen += 1
        return ino == ancestor

    def _touch(self, *inodes: Inode) -> None:
        now = time.time_ns()
        for inode in inodes:
            inode.ctime_ns = now
            self.store.update_inode(inode)

    def _touch_dir(self, *dirs: Inode) -> None:
        now = time.time_ns()
        for directory in {d.ino: d for d in dirs}.values():
            directory.mtime_ns = directory.ctime_ns = now
            self.store.update_inode(directory)
