"""flock and fcntl locks held for the whole cluster, as MooseFS and JuiceFS hold them.

Each mount's FUSE lock requests (getlk, setlk, flock) come here, so two hosts opening one
SQLite database exclude each other as two processes on one ext4 do. The rules are Linux's:

- fcntl (POSIX) locks are byte ranges per owner (a process, or an open file for OFD locks):
  setting a range replaces what the owner held there, splitting and merging its own locks;
  a read lock conflicts with another owner's write lock, a write lock with any other lock.
- flock locks cover the whole file, per open file; converting one is not atomic (the old lock
  is dropped, then the new one waited for), as flock(2) documents.
- The two kinds never conflict with each other.
- A blocking fcntl wait that would close a cycle of owners waiting for each other fails with
  EDEADLK instead (flock waits are not checked, as on Linux).

Locks live in the active tracker's memory and in no store: they are taken and dropped far
more often than anything is written (SQLite takes several per transaction), and they belong
to live mounts. A mount keeps its session's lease by asking (any lock request, or KeepLocks);
a session silent for the lease loses every lock it held, so a dead or cut-off mount cannot
block the others for longer than that.

A tracker restart or takeover loses the table, so locks are reclaimed as NFS reclaims them:
while locks are held the tracker notes in its store until when they may be (one write per
lease), and a tracker that starts before then grants nothing new for one lease (the grace
period, LockGrace) while the mounts, told LocksLost at their next renewal, send back what
they hold (ReclaimLocks). A mount keeps a table of its own locks for that (the same class).
"""

from __future__ import annotations

import fcntl
import uuid
from dataclasses import dataclass

import trio

from cluster.errors import Deadlock, InvalidArgument
from cluster.messages import LOCK_TO_END

Owner = tuple[str, int]  # (session, the kernel's lock owner)
# A waiter counts as waiting this long after its last request's hold ended: a wait is a series
# of requests, and the cycle must be seen from whichever side closes it, not lost in a gap.
WAIT_GAP_S = 2.0
LOCK_TYPES = (fcntl.F_RDLCK, fcntl.F_WRLCK, fcntl.F_UNLCK)


@dataclass(slots=True)
class Lock:
    owner: Owner
    write: bool
    start: int
    end: int  # inclusive; LOCK_TO_END for "to the end"
    pid: int

    @property
    def type(self) -> int:
        return fcntl.F_WRLCK if self.write else fcntl.F_RDLCK

    def overlaps(self, start: int, end: int) -> bool:
        return self.start <= end and start <= self.end


@dataclass(frozen=True, slots=True)
class LockRange:
    """What one lock request asks for: its kind, type (F_RDLCK, F_WRLCK, F_UNLCK) and bytes
    start..end inclusive (a whole file for flock), and the asking process (fcntl only)."""

    flock: bool
    type: int
    start: int = 0
    end: int = LOCK_TO_END
    pid: int = 0

    def unlocked(self) -> LockRange:
        return LockRange(self.flock, fcntl.F_UNLCK, self.start, self.end)


def check_range(lock_type: int, start: int, end: int) -> None:
    if lock_type not in LOCK_TYPES:
        raise InvalidArgument(f"lock type {lock_type} is not F_RDLCK, F_WRLCK or F_UNLCK")
    if not 0 <= start <= end <= LOCK_TO_END:
        raise InvalidArgument(f"lock range {start}..{end} is empty or out of range")


# (lock table id, fences made in it so far): see LockTable.open_mark.
OpenMark = tuple[str, int]
# Fences kept at most (a few dozen bytes each): the oldest go first. Only a session that lost
# locks on that many files, and still writes through opens made before, would miss one.
MAX_FENCES = 100_000


class LockTable:
    """Every lock of the cluster, the waits for them, and the sessions' leases."""

    def __init__(self, lease_s: float, *, grace: bool = False) -> None:
        """`grace`: mounts may hold locks of an earlier tracker; the grace period (one lease)
        starts at the first `in_grace` (a tracker calls it as it becomes active)."""
        self.lease_s = lease_s
        # Names this incarnation: a mount holding locks of another one has lost them.
        self.id = uuid.uuid4().hex
        # ino -> locks, fcntl's and flock's apart (they never conflict).
        self._posix: dict[int, list[Lock]] = {}
        self._flock: dict[int, list[Lock]] = {}
        # Set and replaced whenever an inode's locks shrink: waiters look again.
        self._released: dict[int, trio.Event] = {}
        # A blocked fcntl waiter -> the owner whose lock it waits for, and until when it counts
        # as waiting (deadlock detection).
        self._waits_for: dict[Owner, tuple[Owner, float]] = {}
        # session -> when its lease ends (trio clock), and the inodes it holds locks on.
        self._lease_ends: dict[str, float] = {}
        self._inodes_of: dict[str, set[int]] = {}
        # Sessions whose lease ended while they held locks, until they are told.
        self._lost: set[str] = set()
        # (session, inode) of locks released by an expired lease -> the fence's number: the
        # session's writes there through opens made before it are refused (`fenced`). Opens
        # are marked with the number reached (`open_mark`). Oldest forgotten past MAX_FENCES.
        self._fenced: dict[tuple[str, int], int] = {}
        self._fences = 0
        # Reclaims only until then (trio clock; None: not started); new locks wait for it.
        self._grace_ends: float | None = None if grace else 0.0
        self._grace_over = trio.Event()
        if not grace:
            self._grace_over.set()

    # --- after a restart or takeover: reclaims ----------------------------------------------

    def in_grace(self) -> bool:
        if self._grace_over.is_set():
            return False
        if self._grace_ends is None:
            self._grace_ends = trio.current_time() + self.lease_s
        if trio.current_time() >= self._grace_ends:
            self._grace_over.set()
            return False
        return True

    async def wait_grace(self, max_s: float) -> None:
        """Wait up to `max_s` for the grace period to end."""
        if self.in_grace():
            assert self._grace_ends is not None
            with trio.move_on_after(min(max_s, self._grace_ends - trio.current_time())):
                await self._grace_over.wait()
            self.in_grace()  # sets _grace_over once the time has come

    def reclaim(self, session: str, locks: list[list[int]]) -> int:
        """Grant again what `session` held; returns how many could not be (conflicting with
        another reclaim: a mount that broke the rules, or held stale locks)."""
        refused = 0
        for ino, flock, owner, lock_type, start, end, pid in locks:
            blocker = self.try_set(ino, bool(flock), (session, owner), lock_type, start, end, pid)
            refused += blocker is not None
        return refused

    def any_held(self) -> bool:
        return bool(self._posix or self._flock)

    def dump(self) -> list[list[int]]:
        """Every lock, in ReclaimLocks' form (the owner without its session)."""
        return [
            [ino, int(table is self._flock), lock.owner[1], lock.type, lock.start, lock.end,
             lock.pid]
            for table in (self._posix, self._flock)
            for ino, locks in table.items()
            for lock in locks
        ]  # fmt: skip

    def owners_on(self, ino: int) -> set[Owner]:
        return {lock.owner for table in (self._posix, self._flock) for lock in table.get(ino, ())}

    # --- leases ---------------------------------------------------------------------------

    def touch(self, session: str) -> None:
        self._lease_ends[session] = trio.current_time() + self.lease_s

    def lost(self, session: str) -> bool:
        """Whether `session` lost locks to an expired lease since it was last told."""
        if session in self._lost:
            self._lost.discard(session)
            return True
        return False

    def expire(self) -> list[tuple[str, int]]:
        """Drop the sessions whose lease ended; returns (session, locks released) of each."""
        now = trio.current_time()
        for waiter in [w for w, (_, until) in self._waits_for.items() if until < now]:
            del self._waits_for[waiter]  # gave up waiting (interrupted, or its mount died)
        for ino in [i for i, e in self._released.items() if not e.statistics().tasks_waiting]:
            del self._released[ino]  # its waiters gave up
        gone = [s for s, end in self._lease_ends.items() if end < now]
        released = []
        for session in gone:
            del self._lease_ends[session]
            count = self.drop_session(session, fence=True)
            if count:
                self._lost.add(session)
            released.append((session, count))
        return released

    def drop_session(self, session: str, *, fence: bool = False) -> int:
        """Release every lock of `session`; returns how many. With `fence`, the inodes it
        held locks on are fenced against its writes (see `fenced`)."""
        count = 0
        for ino in self._inodes_of.pop(session, set()):
            for table in (self._posix, self._flock):
                locks = table.get(ino, [])
                kept = [lock for lock in locks if lock.owner[0] != session]
                if fence and len(kept) < len(locks):
                    self._fence(session, ino)
                count += len(locks) - len(kept)
                self._store(table, ino, kept)
            self._wake(ino)
        return count

    def _fence(self, session: str, ino: int) -> None:
        self._fences += 1
        self._fenced.pop((session, ino), None)  # the newest last, for MAX_FENCES
        self._fenced[(session, ino)] = self._fences
        while len(self._fenced) > MAX_FENCES:
            del self._fenced[next(iter(self._fenced))]

    def open_mark(self) -> OpenMark:
        """What an open made now is marked with (and its writes carry): later fences of this
        table refuse them, earlier ones do not."""
        return (self.id, self._fences)

    def fenced(self, session: str, ino: int, opened: OpenMark | None) -> bool:
        """Whether a write of `session` to `ino` through an open marked `opened` must be
        refused: the session lost locks there to an expired lease after that open, so another
        host may have taken them and changed the file since, and what it writes now was
        written believing it held them. An open made after the fence (the file closed and
        opened again) was made knowing; so was a write with no open (`opened` None). An open
        marked by another table (before a restart or takeover) came before any fence here."""
        fence = self._fenced.get((session, ino))
        if fence is None or opened is None:
            return False
        table, number = opened
        return table != self.id or number < fence

    # --- queries and changes --------------------------------------------------------------

    def conflict(
        self, ino: int, flock: bool, owner: Owner, lock_type: int, start: int, end: int
    ) -> Lock | None:
        """The first lock of another owner that `lock_type` over start..end conflicts with."""
        if lock_type == fcntl.F_UNLCK:
            return None
        write = lock_type == fcntl.F_WRLCK
        for lock in (self._flock if flock else self._posix).get(ino, ()):
            if lock.owner != owner and (write or lock.write) and lock.overlaps(start, end):
                return lock
        return None

    def apply(self, ino: int, owner: Owner, lock: LockRange) -> Lock | None:
        """`try_set` of a LockRange."""
        return self.try_set(ino, lock.flock, owner, lock.type, lock.start, lock.end, lock.pid)

    def try_set(
        self, ino: int, flock: bool, owner: Owner, lock_type: int, start: int, end: int, pid: int
    ) -> Lock | None:
        """Set the lock unless another owner's conflicts: then return that one, changing
        nothing. (An flock conversion has already dropped the old lock: not atomic.)"""
        check_range(lock_type, start, end)
        if flock:
            self._replace(self._flock, ino, owner, fcntl.F_UNLCK, 0, LOCK_TO_END, pid)
        blocker = self.conflict(ino, flock, owner, lock_type, start, end)
        if blocker is None:
            table = self._flock if flock else self._posix
            self._replace(table, ino, owner, lock_type, start, end, pid)
        return blocker

    async def set_waiting(
        self,
        ino: int,
        flock: bool,
        owner: Owner,
        lock_type: int,
        start: int,
        end: int,
        pid: int,
        wait_s: float,
    ) -> Lock | None:
        """`try_set`, waiting up to `wait_s` for conflicting locks to go; returns the one
        still in the way, or None once set. Raises Deadlock for an fcntl wait that would
        close a cycle."""
        blocker = self.try_set(ino, flock, owner, lock_type, start, end, pid)
        until = trio.current_time() + wait_s + WAIT_GAP_S
        try:
            with trio.move_on_after(wait_s):
                while blocker is not None:
                    if not flock:
                        self._check_deadlock(owner, blocker.owner)
                        self._waits_for[owner] = (blocker.owner, until)
                    await self._released.setdefault(ino, trio.Event()).wait()
                    blocker = self.try_set(ino, flock, owner, lock_type, start, end, pid)
        except Deadlock:
            self._waits_for.pop(owner, None)
            raise
        if blocker is None:
            self._waits_for.pop(owner, None)
        return blocker

    def release_owner(self, ino: int, owner: Owner) -> None:
        """Drop every lock (both kinds) `owner` holds on `ino`."""
        for table in (self._posix, self._flock):
            locks = table.get(ino)
            if locks and any(lock.owner == owner for lock in locks):
                self._store(table, ino, [lock for lock in locks if lock.owner != owner])
                self._wake(ino)
        self._forget_if_free(ino, owner[0])

    def _forget_if_free(self, ino: int, session: str) -> None:
        """Keep `_inodes_of` to the inodes a session holds locks on (a long-lived mount that
        locks many files one after another must not grow it)."""
        tables = (self._posix, self._flock)
        if any(lock.owner[0] == session for t in tables for lock in t.get(ino, ())):
            return
        inodes = self._inodes_of.get(session)
        if inodes is not None:
            inodes.discard(ino)
            if not inodes:
                del self._inodes_of[session]

    def _check_deadlock(self, waiter: Owner, holder: Owner) -> None:
        now = trio.current_time()
        seen = set()
        while holder not in seen:
            if holder == waiter:
                raise Deadlock(f"inode lock wait of owner {waiter[1]:#x} would deadlock")
            seen.add(holder)
            waits = self._waits_for.get(holder)
            if waits is None or waits[1] < now:
                return
            holder = waits[0]

    def _replace(
        self,
        table: dict[int, list[Lock]],
        ino: int,
        owner: Owner,
        lock_type: int,
        start: int,
        end: int,
        pid: int,
    ) -> None:
        """Make `owner`'s locks over start..end be `lock_type` (none for F_UNLCK), splitting
        the locks it held there and merging neighbours of one type (POSIX rules)."""
        locks = table.get(ino, [])
        mine: list[Lock] = []
        others: list[Lock] = []
        shrunk = False
        for lock in locks:
            if lock.owner != owner:
                others.append(lock)
            elif not lock.overlaps(start, end):
                mine.append(lock)
            else:
                shrunk = True
                if lock.start < start:
                    mine.append(Lock(owner, lock.write, lock.start, start - 1, lock.pid))
                if lock.end > end:
                    mine.append(Lock(owner, lock.write, end + 1, lock.end, lock.pid))
        if lock_type != fcntl.F_UNLCK:
            mine.append(Lock(owner, lock_type == fcntl.F_WRLCK, start, end, pid))
            self._inodes_of.setdefault(owner[0], set()).add(ino)
        mine.sort(key=lambda lock: lock.start)
        merged: list[Lock] = []
        for lock in mine:
            last = merged[-1] if merged else None
            if last is not None and last.write == lock.write and last.end + 1 >= lock.start:
                last.end = max(last.end, lock.end)
            else:
                merged.append(lock)
        self._store(table, ino, others + merged)
        if shrunk:  # released or downgraded: a waiter may fit now
            self._wake(ino)
            self._forget_if_free(ino, owner[0])

    @staticmethod
    def _store(table: dict[int, list[Lock]], ino: int, locks: list[Lock]) -> None:
        if locks:
            table[ino] = locks
        else:
            table.pop(ino, None)

    def _wake(self, ino: int) -> None:
        event = self._released.pop(ino, None)
        if event is not None:
            event.set()
