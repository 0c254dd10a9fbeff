"""Open file and directory handles: fh numbers, per-handle flags and read position, and the
rule for when an inode stops being open on this mount.

All handles on one inode share its `FileState` (dfsmount.cache), from the first open to the
last release; those two edges are serialized per inode by `inode_lock`, so a release racing
with a new open never drops the state the new open has just joined. The tracker counts opens
per session: every handle holds one (`Client.open_file` at open, given back through the
`ReleaseQueue` after its release), which keeps an unlinked file's data until the last
handle anywhere is gone.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from cluster.client import DirEntry
from dfsmount.cache import FileState


@dataclass(slots=True)
class OpenFile:
    fh: int
    ino: int
    flags: int
    state: FileState
    # Where the next read would start if the reader is sequential (read-ahead trigger).
    next_read: int = 0

    @property
    def append(self) -> bool:
        return bool(self.flags & os.O_APPEND)


@dataclass(slots=True)
class OpenDir:
    """A directory being listed: the last page the tracker sent, so that the kernel's small
    readdir requests (a few dozen entries each) do not each cost a tracker round trip."""

    fh: int
    ino: int
    page_offset: int = -1  # the cookie `page` was fetched from; -1: no page
    page: list[DirEntry] = field(default_factory=list)


class HandleTable:
    def __init__(self) -> None:
        self._numbers = itertools.count(1)
        self.files: dict[int, OpenFile] = {}
        self.dirs: dict[int, OpenDir] = {}
        self.open_count: dict[int, int] = {}  # ino -> open file handles
        self._inode_locks: dict[int, tuple[trio.Lock, int]] = {}

    def add_file(self, ino: int, flags: int, state: FileState) -> OpenFile:
        handle = OpenFile(next(self._numbers), ino, flags, state)
        self.files[handle.fh] = handle
        self.open_count[ino] = self.open_count.get(ino, 0) + 1
        return handle

    def remove_file(self, fh: int) -> tuple[OpenFile, bool]:
        """Forget `fh`; returns it and whether it was the inode's last open handle."""
        handle = self.files.pop(fh)
        left = self.open_count[handle.ino] - 1
        if left:
            self.open_count[handle.ino] = left
        else:
            del self.open_count[handle.ino]
        return handle, left == 0

    def is_open(self, ino: int) -> bool:
        return ino in self.open_count

    def add_dir(self, ino: int) -> OpenDir:
        handle = OpenDir(next(self._numbers), ino)
        self.dirs[handle.fh] = handle
        return handle

    @asynccontextmanager
    async def inode_lock(self, ino: int) -> AsyncIterator[None]:
        """Serialize first-open and last-release of one inode."""
        lock, users = self._inode_locks.get(ino, (trio.Lock(), 0))
        self._inode_locks[ino] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._inode_locks[ino]
            if users == 1:
                del self._inode_locks[ino]
            else:
                self._inode_locks[ino] = (lock, users - 1)
