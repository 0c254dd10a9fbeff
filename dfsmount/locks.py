"""This mount's side of cluster-wide flock and fcntl locks (cluster/tracker/locks.py).

The kernel hands every lock request to the mount (pyfuse3's `enable_locks`); the mount asks
the tracker, so locks hold across hosts. What the mount keeps is only which owners may hold
locks on which inodes: so that a close() of a file nobody locked costs no request, so that
an open file's locks go at its last close, and so that the session's lease is renewed while
anything is held.

Lock waits are a series of bounded requests (the tracker holds each up to WAIT_HOLD_S): a
cancelled wait (the kernel interrupted it: a signal reached the waiting process) stops between
two of them, and a granted lock is always recorded, because each request is shielded.
"""

from __future__ import annotations

import fcntl
import logging

import trio

from cluster import messages as m
from cluster.client import Client
from cluster.errors import DfsError, LocksLost, WouldBlock
from cluster.messages import LOCK_TO_END

log = logging.getLogger(__name__)

# How long the tracker holds one request of a lock wait.
WAIT_HOLD_S = 1.0
# flock(2) operations (sys/file.h)
LOCK_SH, LOCK_EX, LOCK_NB, LOCK_UN = fcntl.LOCK_SH, fcntl.LOCK_EX, fcntl.LOCK_NB, fcntl.LOCK_UN


def range_of(start: int, length: int) -> tuple[int, int]:
    """A struct flock's l_start/l_len (0: to the end) as an inclusive byte range."""
    return start, LOCK_TO_END if length == 0 else start + length - 1


def length_of(start: int, end: int) -> int:
    return 0 if end >= LOCK_TO_END else end - start + 1


class MountLocks:
    def __init__(self, client: Client) -> None:
        self.client = client
        self.lease_s = 30.0
        # The tracker lock table our locks were granted in (None: we hold nothing).
        self.table: str | None = None
        # ino -> owners that may hold locks on it; fh -> (ino, owners that locked through it).
        self._owners: dict[int, set[int]] = {}
        self._through: dict[int, set[int]] = {}
        self._lease_changed = trio.Event()

    @property
    def holding(self) -> bool:
        return bool(self._owners)

    async def set(
        self,
        ino: int,
        fh: int,
        owner: int,
        *,
        flock: bool,
        lock_type: int,
        start: int,
        end: int,
        pid: int,
        wait: bool,
    ) -> m.LockReply:
        """Take (or convert) a lock, waiting for it if `wait`; WouldBlock if another owner's
        is in the way and not `wait`. Returns the tracker's grant, with the file's attrs."""
        while True:
            with trio.CancelScope(shield=True):
                reply = await self.client.set_lock(
                    ino, owner, flock=flock, lock_type=lock_type, start=start, end=end,
                    pid=pid, wait_s=WAIT_HOLD_S if wait else 0.0,
                )  # fmt: skip
                if reply.granted:
                    self._granted(ino, fh, owner, reply)
                    return reply
            if not wait:
                raise WouldBlock(f"inode {ino}: held by another owner")
            await trio.lowlevel.checkpoint()  # an interrupted wait ends here

    async def unlock(self, ino: int, owner: int, *, flock: bool, start: int, end: int) -> None:
        """Release a range (or an flock); the owner stays noted: it may hold other ranges."""
        if owner not in self._owners.get(ino, ()):
            return  # never locked anything here
        await self.client.set_lock(
            ino, owner, flock=flock, lock_type=fcntl.F_UNLCK, start=start, end=end, pid=0
        )

    async def test(self, ino: int, owner: int, lock_type: int, start: int, end: int) -> m.LockReply:
        return await self.client.get_lock(ino, owner, lock_type=lock_type, start=start, end=end)

    async def release_owner(self, ino: int, owner: int) -> None:
        """close(): every lock `owner` holds on `ino` goes."""
        owners = self._owners.get(ino)
        if owners is None or owner not in owners:
            return
        # Forgotten here first: a renewal racing with this release must not count it.
        owners.discard(owner)
        if not owners:
            del self._owners[ino]
        await self.client.release_locks(ino, owner)

    async def release_handle(self, ino: int, fh: int) -> None:
        """The last close of an open file: its flock and OFD locks go (their owner is the open
        file, and the kernel names it only for flock)."""
        for owner in self._through.pop(fh, set()):
            await self.release_owner(ino, owner)

    def _granted(self, ino: int, fh: int, owner: int, reply: m.LockReply) -> None:
        if self.table != reply.table:
            if self.table is not None and self._owners:
                log.error("locks granted before the tracker restarted or failed over are lost")
                self._owners.clear()
            self.table = reply.table
        self._owners.setdefault(ino, set()).add(owner)
        self._through.setdefault(fh, set()).add(owner)
        if reply.lease_s != self.lease_s:
            self.lease_s = reply.lease_s
            self._lease_changed.set()

    async def keep_lease(self) -> None:
        """Renew the session's lease on the tracker while this mount holds locks (every
        third of the lease, so that two renewals may fail before it runs out)."""
        while True:
            with trio.move_on_after(self.lease_s / 3):
                await self._lease_changed.wait()
                self._lease_changed = trio.Event()
            if not self._owners or self.table is None:
                continue
            try:
                await self.client.keep_locks(self.table)
            except LocksLost as exc:
                files = len(self._owners)
                log.error("this mount's locks on %d files were released: %s", files, exc)
                self._owners.clear()
                self.table = None
            except DfsError as exc:
                log.warning("could not renew the lock lease: %s", exc)
