"""What the kernel knows about our inodes: lookup counts and the attributes last reported.

Lookup counts follow pyfuse3's contract (`developer-notes/lookup_counts.rst`): lookup, mknod,
mkdir, create, symlink and link add one; a readdirplus entry adds one only when
`readdir_reply` returned True; `forget` takes them away and never raises. Deletion itself is
not ours to defer: the tracker keeps an unlinked inode while this mount holds it open
(`Client.open_file`), so a count reaching zero only drops what we remember about the inode.

Attributes are never cached for long, on either side: the kernel gets `ENTRY_TIMEOUT_S` and
`ATTR_TIMEOUT_S` of one second so that a change made on another mount shows within a second,
and `open` always asks the tracker (close-to-open). What matters is remembering what we last
*told* the kernel (`reported`): with libfuse's default `auto_inval_data`, the kernel drops an
inode's page cache whenever it sees its size or mtime change, so the page cache always matches
the last reported (size, mtime). `open` compares that with the tracker's fresh attributes to
decide whether the kernel may keep its page cache (`FileInfo.keep_cache`).
"""

from __future__ import annotations

import logging
import stat

import pyfuse3
import trio

from cluster.client import Attr

log = logging.getLogger(__name__)

ENTRY_TIMEOUT_S = 1.0
ATTR_TIMEOUT_S = 1.0
# st_blksize: `cp` and friends size their writes by it, and FUSE requests of 1 MiB (or the
# kernel's 128 KiB split of them) are far cheaper per byte than 4 KiB ones.
BLKSIZE = 1 << 20


def entry_attributes(
    attr: Attr, size: int | None = None, mtime_ns: int | None = None
) -> pyfuse3.EntryAttributes:
    """The kernel's view of `attr`, with this mount's unflushed size and mtime if given."""
    entry = pyfuse3.EntryAttributes()
    entry.st_ino = pyfuse3.InodeT(attr.ino)
    entry.generation = attr.generation
    entry.entry_timeout = ENTRY_TIMEOUT_S
    entry.attr_timeout = ATTR_TIMEOUT_S
    entry.st_mode = pyfuse3.ModeT(attr.mode)
    entry.st_nlink = attr.nlink
    entry.st_uid = attr.uid
    entry.st_gid = attr.gid
    entry.st_rdev = attr.rdev
    entry.st_size = attr.size if size is None else size
    entry.st_blksize = BLKSIZE
    # What is stored, not what holes span (`du` of a sparse file, `ls -s`); bytes appended
    # here and not yet committed count as stored.
    stored = attr.stored if size is None else attr.stored + max(0, size - attr.size)
    entry.st_blocks = (stored + 511) // 512 if stat.S_ISREG(attr.mode) else 0
    entry.st_atime_ns = attr.atime_ns
    entry.st_mtime_ns = attr.mtime_ns if mtime_ns is None else mtime_ns
    entry.st_ctime_ns = (
        max(attr.ctime_ns, entry.st_mtime_ns) if mtime_ns is not None else attr.ctime_ns
    )
    return entry


class AttrCache:
    """Attributes from the tracker, reused for ATTR_TIMEOUT_S.

    The kernel itself may keep attributes that long, so reusing them here loses no
    consistency, and it saves the tracker round trip that follows every write (the kernel
    drops its cached attributes after a write and asks again). A commit or a setattr stores
    the tracker's new answer; a create, mkdir, link, unlink or rmdir stores the directory's
    new attributes from the reply (the kernel asks for them right after), and a rename clears
    the cache.
    """

    def __init__(self) -> None:
        self._entries: dict[int, tuple[Attr, float]] = {}

    def get(self, ino: int) -> Attr | None:
        entry = self._entries.get(ino)
        if entry is None or entry[1] < trio.current_time():
            return None
        return entry[0]

    def put(self, attr: Attr) -> Attr:
        self._entries[attr.ino] = (attr, trio.current_time() + ATTR_TIMEOUT_S)
        if len(self._entries) > 100_000:
            self._entries.clear()  # a bound, not a policy: entries are short-lived anyway
        return attr

    def put_newer(self, attr: Attr) -> None:
        """Store `attr` unless the cache holds a newer change of the inode: replies to
        concurrent changes of one directory may arrive in any order."""
        entry = self._entries.get(attr.ino)
        if entry is None or entry[0].ctime_ns <= attr.ctime_ns:
            self.put(attr)

    def drop(self, ino: int) -> None:
        self._entries.pop(ino, None)

    def clear(self) -> None:
        self._entries.clear()


class DirCache:
    """Whole listings of busy directories, reused for ENTRY_TIMEOUT_S.

    A `stat` of many names in one directory, or a `cp -r` into it, is one tracker lookup per
    name: at a few thousand round trips a second, the slowest thing the mount does. After
    `PREFETCH_AFTER` lookups of one directory within the timeout, the mount fetches its whole
    listing (readdir pages, with attributes) and answers further lookups from it, found or not,
    until the timeout passes: the same staleness the kernel's own entry cache allows. This
    mount's own changes update the listing (create, mkdir, link, unlink...) or drop them all
    (rename), so it never contradicts what this mount did; attributes come from AttrCache
    first, which holds the newest answers (commits, setattr) of this mount.
    """

    PREFETCH_AFTER = 8
    MAX_ENTRIES = 20_000  # bigger directories are looked up name by name

    def __init__(self) -> None:
        self._listings: dict[int, tuple[float, dict[bytes, Attr]]] = {}
        self._misses: dict[int, tuple[float, int]] = {}

    def get(self, parent: int, name: bytes) -> Attr | bool | None:
        """The cached entry; False when the listing is fresh and lacks `name`; None when
        this directory is not cached."""
        listing = self._listings.get(parent)
        if listing is None:
            return None
        if listing[0] < trio.current_time():
            del self._listings[parent]
            return None
        return listing[1].get(name, False)

    def should_fetch(self, parent: int) -> bool:
        """Count a lookup that missed the cache; True when the listing is worth fetching."""
        now = trio.current_time()
        since, count = self._misses.get(parent, (now, 0))
        if now - since > ENTRY_TIMEOUT_S:
            since, count = now, 0
        count += 1
        self._misses[parent] = (since, count)
        if len(self._misses) > 10_000:
            self._misses.clear()
        return count == self.PREFETCH_AFTER

    def store(self, parent: int, entries: dict[bytes, Attr], fetched_at: float) -> None:
        self._listings[parent] = (fetched_at + ENTRY_TIMEOUT_S, entries)

    def added(self, parent: int, name: bytes, attr: Attr) -> None:
        listing = self._listings.get(parent)
        if listing is not None:
            listing[1][name] = attr

    def removed(self, parent: int, name: bytes) -> None:
        listing = self._listings.get(parent)
        if listing is not None:
            listing[1].pop(name, None)

    def clear(self) -> None:
        self._listings.clear()


class InodeTable:
    """Lookup counts and last-reported (size, mtime) per inode; touched only from the trio
    thread and without awaits, so every method is atomic with respect to other handlers."""

    def __init__(self) -> None:
        self.lookups: dict[int, int] = {}
        self.reported: dict[int, tuple[int, int]] = {}

    def entry(
        self,
        attr: Attr,
        *,
        lookup: bool,
        local: tuple[int, int] | None = None,
    ) -> pyfuse3.EntryAttributes:
        """Build the reply for `attr`; count a lookup if the reply hands the kernel a reference.

        `local` is this mount's (size, mtime_ns) of a file with unflushed writes.
        """
        size, mtime_ns = local if local is not None else (None, None)
        entry = entry_attributes(attr, size, mtime_ns)
        if lookup:
            self.add_lookup(attr.ino)
        if attr.is_file:
            self.reported[attr.ino] = (entry.st_size, entry.st_mtime_ns)
        return entry

    def add_lookup(self, ino: int, count: int = 1) -> None:
        self.lookups[ino] = self.lookups.get(ino, 0) + count

    def forget(self, ino: int, count: int) -> None:
        """Drop `count` references; never raises (pyfuse3 calls it outside any request)."""
        left = self.lookups.get(ino, 0) - count
        if left > 0:
            self.lookups[ino] = left
            return
        if left < 0:
            log.debug("inode %d forgotten more often than looked up (%d)", ino, left)
        self.lookups.pop(ino, None)
        self.reported.pop(ino, None)

    def page_cache_valid(self, attr: Attr) -> bool:
        """True when the kernel's cached pages of `attr.ino` match the tracker's `attr`."""
        return self.reported.get(attr.ino) == (attr.size, attr.mtime_ns)

    def note_reported(self, ino: int, size: int, mtime_ns: int) -> None:
        self.reported[ino] = (size, mtime_ns)
