"""This mount's side of cluster-wide flock and fcntl locks (cluster/locks.py).

The kernel hands every lock request to the mount (pyfuse3's `enable_locks`); the mount asks
the tracker, so locks hold across hosts. The mount keeps a table of the locks it holds (the
tracker's own class, one session): so that a close() of a file nobody locked costs no
request, so that an open file's locks go at its last close, so that the session's lease is
renewed while anything is held, and so that a new tracker (a restart, a takeover) can be given
them back in its grace period.

Lock waits are a series of bounded requests (the tracker holds each up to WAIT_HOLD_S): a
cancelled wait (the kernel interrupted it: a signal reached the waiting process) stops between
two of them, and a granted lock is always recorded, because each request is shielded.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable

import trio

from cluster import messages as m
from cluster.client import Client
from cluster.errors import DfsError, LockGrace, LocksLost, WouldBlock
from cluster.locks import LockRange, LockTable
from cluster.messages import LOCK_TO_END

log = logging.getLogger(__name__)

# How long the tracker holds one request of a lock wait.
WAIT_HOLD_S = 1.0
MINE = ""  # the session of the mount's own table: owners are the kernel's alone


def range_of(start: int, length: int) -> tuple[int, int]:
    """A struct flock's l_start/l_len (0: to the end) as an inclusive byte range."""
    return start, LOCK_TO_END if length == 0 else start + length - 1


def length_of(start: int, end: int) -> int:
    return 0 if end >= LOCK_TO_END else end - start + 1


class MountLocks:
    def __init__(self, client: Client) -> None:
        self.client = client
        self.lease_s = 30.0
        # The tracker lock table our locks were granted in (None: none yet).
        self.table: str | None = None
        self._mine = LockTable(self.lease_s)
        # fh -> owners that locked through it and were never named by a close (flush) of it:
        # flock and OFD owners (the open file itself), whose locks go at its last close.
        self._through: dict[int, set[int]] = {}
        self._renew_now = trio.Event()
        # When the tracker last confirmed our session (trio clock): past a lease without it,
        # the locks may be another's by now and must not be reclaimed.
        self._confirmed = trio.current_time()
        # A reclaim and the changes to what we hold (grants recorded, unlocks, releases) go
        # one at a time: an unlock sent during a reclaim could otherwise be undone by it.
        self._order = trio.Lock()
        # Releases the tracker did not get (unreachable past the retry window): sent again
        # before each renewal, so that a lock we no longer hold is not kept alive by it.
        self._unsent: list[Callable[[], Awaitable[object]]] = []
        # Told the inodes whose locks were lost while held (another host may have changed
        # them since): the data cache refuses writes to them until their last close.
        self.on_lost: Callable[[set[int], LocksLost], object] = lambda inos, exc: None

    async def set(self, ino: int, fh: int, owner: int, lock: LockRange, wait: bool) -> m.LockReply:
        """Take (or convert) a lock, waiting for it if `wait`; WouldBlock if another owner's
        is in the way and not `wait`. Returns the tracker's grant, with the file's attrs."""
        while True:
            with trio.CancelScope(shield=True):
                try:
                    reply = await self.client.set_lock(
                        ino, owner, lock, WAIT_HOLD_S if wait else 0.0
                    )
                except LockGrace:
                    self._renew_now.set()  # a new tracker: reclaim ours before asking again
                    reply = None
                except LocksLost as exc:
                    async with self._order:
                        self._lost(exc)
                    continue  # a fresh start: ask again
                if reply is not None:
                    async with self._order:
                        self._answered(ino, fh, owner, lock, reply)
                    if reply.granted:
                        return reply
            if reply is not None and not wait:
                raise WouldBlock(f"inode {ino}: held by another owner")
            await trio.lowlevel.checkpoint()  # an interrupted wait ends here

    async def unlock(self, ino: int, owner: int, lock: LockRange) -> None:
        """Release a range (or an flock): `lock` of type F_UNLCK."""
        async with self._order:
            if (MINE, owner) not in self._mine.owners_on(ino):
                return  # holds nothing there
            self._mine.apply(ino, (MINE, owner), lock)
            await self._send_release(functools.partial(self.client.set_lock, ino, owner, lock))

    async def test(self, ino: int, owner: int, lock: LockRange) -> m.LockReply:
        while True:
            try:
                return await self.client.get_lock(ino, owner, lock)
            except LockGrace:
                self._renew_now.set()

    async def release_owner(self, ino: int, owner: int, closed_fh: int | None = None) -> None:
        """close() of `closed_fh` by `owner` (or the last close of an open file): every lock
        `owner` holds on `ino` goes."""
        if closed_fh is not None:
            # A process's owner, named by its close: not one of the open file's own.
            self._through.get(closed_fh, set()).discard(owner)
        async with self._order:
            if (MINE, owner) not in self._mine.owners_on(ino):
                return
            self._mine.release_owner(ino, (MINE, owner))
            await self._send_release(functools.partial(self.client.release_locks, ino, owner))

    async def _send_release(self, send: Callable[[], Awaitable[object]]) -> None:
        """A release never fails for the program (Linux's never do): if the tracker cannot
        be told now, it is told before the next renewal."""
        try:
            await send()
        except LocksLost as exc:
            self._lost(exc)  # gone already
        except DfsError as exc:
            log.warning("a lock release will be sent again: %s", exc)
            self._unsent.append(send)

    async def release_handle(self, ino: int, fh: int) -> None:
        """The last close of an open file: its flock and OFD locks go (their owner is the open
        file, and the kernel names it only for flock)."""
        for owner in self._through.pop(fh, set()):
            await self.release_owner(ino, owner)

    async def release_all(self) -> None:
        """Unmount: every lock this mount holds goes."""
        for ino, _, owner, *_ in self._mine.dump():
            await self.release_owner(ino, owner)

    def _answered(self, ino: int, fh: int, owner: int, lock: LockRange, reply: m.LockReply) -> None:
        """Note the tracker's answer to a lock request in our own table (under `_order`)."""
        self._confirmed = trio.current_time()
        if reply.lease_s != self.lease_s:
            self.lease_s = reply.lease_s
            self._renew_now.set()
        if not reply.granted:
            if lock.flock:  # as on the tracker: a refused conversion has dropped the old lock
                self._mine.apply(ino, (MINE, owner), lock.unlocked())
            return
        if self.table != reply.table:
            if self.table is not None and self._mine.any_held():
                self._lost(LocksLost("those held before the tracker changed were not reclaimed"))
            self.table = reply.table
        self._through.setdefault(fh, set()).add(owner)
        if self._mine.apply(ino, (MINE, owner), lock) is not None:
            log.error("inode %d: a lock the tracker granted conflicts with our own table", ino)

    def _lost(self, exc: LocksLost) -> None:
        held = {ino for ino, *_ in self._mine.dump()}
        if held:
            log.error("this mount's locks were released: %s", exc)
            self.on_lost(held, exc)
        self._mine = LockTable(self.lease_s)
        self.table = None

    async def keep_lease(self) -> None:
        """Renew the session's lease on the tracker while this mount holds locks (every
        third of the lease, so that two renewals may fail before it runs out), and reclaim
        them from a tracker that no longer has them."""
        while True:
            with trio.move_on_after(self.lease_s / 3):
                await self._renew_now.wait()
            self._renew_now = trio.Event()
            async with self._order:
                unsent, self._unsent = self._unsent, []
                for send in unsent:
                    await self._send_release(send)
            await self._renew()

    async def confirm(self, ino: int) -> str:
        """Before a commit, truncate or punch of `ino` (DataCache.before_change): if this
        mount holds locks there and has not heard from the tracker for most of a lease (it
        was stopped, or cut off), renew now, for at most what is left of the lease. If they
        were lost, or the lease runs out unconfirmed (another mount may hold them by then),
        the file is fenced (on_lost) before anything written under them goes out, even to a
        tracker that does not know of the loss (one that restarted or took over). Returns
        the lock table our locks on `ino` were granted in ("" if none), for the change to
        carry: a tracker that took over refuses it until they are reclaimed."""
        if self.table is None or not self._mine.owners_on(ino):
            return ""
        if self._stale():
            with trio.move_on_at(self._confirmed + self.lease_s):
                await self._renew()
            if trio.current_time() - self._confirmed > self.lease_s:
                async with self._order:
                    if self._mine.owners_on(ino):
                        self._lost(LocksLost("the lease ran out before the tracker confirmed it"))
        return self.table or ""

    def renew_soon(self) -> None:
        """A tracker waits for our reclaim (LockGrace): renew now, which reclaims."""
        self._renew_now.set()

    def _stale(self) -> bool:
        return trio.current_time() - self._confirmed > self.lease_s * 2 / 3

    async def _renew(self) -> None:
        """Renew the lease of what we hold; reclaim from a tracker that no longer has it."""
        table = self.table
        if not self._mine.any_held() or table is None:
            return
        try:
            await self.client.keep_locks(table)
            self._confirmed = trio.current_time()
        except LocksLost as exc:
            with trio.CancelScope(shield=True):  # half a reclaim would be worse than none
                async with self._order:
                    if self.table == table:  # nobody reclaimed or lost them meanwhile
                        await self._reclaim(exc)
        except DfsError as exc:
            log.warning("could not renew the lock lease: %s", exc)

    async def _reclaim(self, lost: LocksLost) -> None:
        """Hand our locks to a new tracker in its grace period; unless our lease has run out
        since the last confirmation: then another mount may hold them now (as NFS clients,
        we give up rather than take them back)."""
        if trio.current_time() - self._confirmed > self.lease_s:
            self._lost(LocksLost(f"{lost}; and this mount's lease had run out"))
            return
        held = self._mine.dump()
        try:
            reply = await self.client.reclaim_locks(held)
        except LocksLost as exc:
            self._lost(LocksLost(f"{lost} ({exc})"))
        except DfsError as exc:
            log.warning("could not reclaim the locks yet: %s", exc)
        else:
            log.info("reclaimed %d locks from a new tracker (%s)", len(held), lost)
            self.table = reply.table
            self._confirmed = trio.current_time()
