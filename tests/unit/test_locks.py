"""The tracker's lock table (cluster/locks.py): Linux's rules for fcntl and flock
locks, waits, deadlock detection and session leases, on trio's virtual clock."""

from __future__ import annotations

import fcntl

import pytest
import trio

from cluster import locks
from cluster.errors import Deadlock, InvalidArgument
from cluster.locks import LockTable
from cluster.messages import LOCK_TO_END

R, W, U = fcntl.F_RDLCK, fcntl.F_WRLCK, fcntl.F_UNLCK
A, B, C = ("mount-a", 1), ("mount-b", 1), ("mount-b", 2)  # B and C: one mount, two owners
INO = 7


def ranges(table: LockTable, owner: tuple[str, int]) -> list[tuple[int, int, int]]:
    return [
        (lock.type, lock.start, lock.end)
        for lock in table._posix.get(INO, [])
        if lock.owner == owner
    ]


def test_an_owner_splits_and_merges_its_own_ranges() -> None:
    table = LockTable(30)
    assert table.try_set(INO, False, A, W, 0, 99, 10) is None
    assert table.try_set(INO, False, A, U, 40, 59, 10) is None
    assert ranges(table, A) == [(W, 0, 39), (W, 60, 99)]
    assert table.try_set(INO, False, B, W, 40, 59, 20) is None  # the hole is free
    blocker = table.try_set(INO, False, B, W, 30, 45, 20)
    assert blocker is not None
    assert (blocker.owner, blocker.start, blocker.end) == (A, 0, 39)
    assert ranges(table, B) == [(W, 40, 59)]  # a refused request changes nothing
    assert table.try_set(INO, False, B, U, 0, LOCK_TO_END, 20) is None
    assert table.try_set(INO, False, A, W, 40, 59, 10) is None
    assert ranges(table, A) == [(W, 0, 99)]  # neighbours of one type merge
    # Downgrading the middle splits it into three locks of two types.
    assert table.try_set(INO, False, A, R, 10, 19, 10) is None
    assert ranges(table, A) == [(W, 0, 9), (R, 10, 19), (W, 20, 99)]


def test_read_locks_share_and_write_locks_exclude_other_owners() -> None:
    table = LockTable(30)
    assert table.try_set(INO, False, A, R, 0, LOCK_TO_END, 10) is None
    assert table.try_set(INO, False, C, R, 0, 9, 30) is None
    assert table.try_set(INO, False, A, W, 0, 99, 10) is not None  # C reads 0..9
    assert table.try_set(INO, False, A, W, 10, 99, 10) is None  # an upgrade beside C
    assert table.conflict(INO, False, B, R, 50, 50) is not None
    assert table.conflict(INO, False, B, R, 5, 5) is None
    assert table.conflict(INO, False, A, W, 0, 99) is not None  # C, not A itself
    assert table.conflict(INO, False, B, U, 0, 99) is None


def test_flock_is_apart_from_fcntl_and_converts_by_dropping_first() -> None:
    table = LockTable(30)
    assert table.try_set(INO, False, A, W, 0, LOCK_TO_END, 10) is None
    assert table.try_set(INO, True, B, R, 0, LOCK_TO_END, 0) is None  # other kind: no conflict
    assert table.try_set(INO, True, C, R, 0, LOCK_TO_END, 0) is None
    assert table.try_set(INO, True, C, W, 0, LOCK_TO_END, 0) is not None  # B shares it
    # As flock(2) says: the failed conversion has dropped C's shared lock.
    assert [lock.owner for lock in table._flock[INO]] == [B]


def test_bad_types_and_ranges_are_refused() -> None:
    table = LockTable(30)
    with pytest.raises(InvalidArgument):
        table.try_set(INO, False, A, 9, 0, 1, 0)
    with pytest.raises(InvalidArgument):
        table.try_set(INO, False, A, W, 5, 4, 0)


async def test_a_waiter_is_granted_when_the_holder_releases(autojump_clock: trio.abc.Clock) -> None:
    table = LockTable(30)
    assert table.try_set(INO, False, A, W, 0, 9, 10) is None
    granted_at: list[float] = []

    async def wait() -> None:
        assert await table.set_waiting(INO, False, B, W, 5, 5, 20, wait_s=10) is None
        granted_at.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait)
        await trio.sleep(3)
        table.release_owner(INO, A)
        released_at = trio.current_time()
    assert granted_at == [released_at]
    # A wait that runs out returns what is still in the way.
    blocker = await table.set_waiting(INO, False, A, W, 0, 9, 10, wait_s=2)
    assert blocker is not None
    assert blocker.owner == B


async def test_a_cycle_of_waits_is_a_deadlock_from_whichever_side_closes_it(
    autojump_clock: trio.abc.Clock,
) -> None:
    table = LockTable(30)
    assert table.try_set(INO, False, A, W, 0, 0, 10) is None
    assert table.try_set(INO, False, B, W, 1, 1, 20) is None
    # A waits for B in a series of 1 s requests; B's request comes in a gap between two.
    assert await table.set_waiting(INO, False, A, W, 1, 1, 10, wait_s=1) is not None
    with pytest.raises(Deadlock):
        await table.set_waiting(INO, False, B, W, 0, 0, 20, wait_s=1)
    # Once A has stopped asking for a while, it no longer counts as waiting.
    await trio.sleep(5)
    assert await table.set_waiting(INO, False, B, W, 0, 0, 20, wait_s=1) is not None


async def test_a_silent_session_loses_its_locks_once(autojump_clock: trio.abc.Clock) -> None:
    table = LockTable(lease_s=3)
    table.touch(A[0])
    table.touch(B[0])
    assert table.try_set(INO, False, A, W, 0, LOCK_TO_END, 10) is None
    assert table.try_set(INO + 1, True, A, W, 0, LOCK_TO_END, 0) is None
    await trio.sleep(2)
    table.touch(B[0])  # B keeps renewing; A says nothing
    assert table.expire() == []
    await trio.sleep(2)
    assert table.expire() == [(A[0], 2)]
    assert table.conflict(INO, False, B, W, 0, 0) is None
    assert table.lost(A[0])  # told once
    assert not table.lost(A[0])
    assert not table.lost(B[0])


async def test_an_expired_session_is_fenced_from_the_inodes_it_had_locked(
    autojump_clock: trio.abc.Clock,
) -> None:
    table = LockTable(lease_s=3)
    for session in (A[0], B[0]):
        table.touch(session)
    before = table.open_mark()  # an open made before anything is lost
    assert table.try_set(INO, False, A, W, 0, 99, 10) is None
    assert table.try_set(INO + 1, True, A, R, 0, LOCK_TO_END, 0) is None
    assert table.try_set(INO + 2, False, A, W, 0, 9, 10) is None
    assert table.try_set(INO + 2, False, A, U, 0, 9, 10) is None  # released in time
    assert table.try_set(INO + 3, False, B, W, 0, 9, 20) is None
    await trio.sleep(2)
    table.touch(B[0])
    await trio.sleep(2)
    assert table.expire() == [(A[0], 2)]
    after = table.open_mark()  # the file closed and opened again
    # Fenced: both kinds of lock, for opens made before, whatever else the table is told
    # meanwhile (the session's lease running again, its being told that it lost them).
    table.touch(A[0])
    assert table.lost(A[0])
    assert table.fenced(A[0], INO, before)
    assert table.fenced(A[0], INO + 1, before)
    assert not table.fenced(A[0], INO, after)
    assert not table.fenced(A[0], INO, None)  # no open: made knowing
    # Not what it had released in time, nor another session's.
    assert not table.fenced(A[0], INO + 2, before)
    assert not table.fenced(B[0], INO + 3, before)
    # An open of another table (before a restart or takeover) came before any fence here.
    assert table.fenced(A[0], INO, (LockTable(3).id, after[1] + 5))
    # A later fence refuses the opens made before it, the ones after the first included.
    assert table.try_set(INO, False, A, W, 0, 9, 10) is None
    await trio.sleep(2)
    table.touch(B[0])
    await trio.sleep(2)
    assert table.expire() == [(A[0], 1)]
    assert table.fenced(A[0], INO, after)
    assert not table.fenced(A[0], INO, table.open_mark())
    # A refused reclaim drops a session's locks without a fence: its table was another's.
    table.touch(B[0])
    assert table.try_set(INO + 4, False, B, W, 0, 9, 20) is None
    table.drop_session(B[0])
    assert not table.fenced(B[0], INO + 4, before)


def test_fences_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(locks, "MAX_FENCES", 3)
    table = LockTable(lease_s=3)
    before = table.open_mark()
    for ino in range(5):
        assert table.try_set(ino, False, A, W, 0, 9, 10) is None
        table.drop_session(A[0], fence=True)
    assert [table.fenced(A[0], ino, before) for ino in range(5)] == [False, False, True, True, True]


async def test_a_new_table_in_grace_takes_reclaims_then_new_locks(
    autojump_clock: trio.abc.Clock,
) -> None:
    old = LockTable(lease_s=3)
    assert old.try_set(INO, False, A, W, 0, 9, 10) is None
    assert old.try_set(INO, True, A, R, 0, LOCK_TO_END, 0) is None
    held = old.dump()

    new = LockTable(lease_s=3, grace=True)
    started = trio.current_time()
    assert new.in_grace()
    assert new.reclaim(A[0], held) == 0
    assert new.conflict(INO, False, B, W, 5, 5) is not None
    assert new.conflict(INO, True, B, W, 0, 0) is not None
    await new.wait_grace(max_s=10)
    assert trio.current_time() - started == pytest.approx(3)
    assert not new.in_grace()
    # Outside a grace period nothing waits.
    await old.wait_grace(max_s=10)
    assert trio.current_time() - started == pytest.approx(3)


def test_what_a_session_held_is_forgotten_once_released() -> None:
    table = LockTable(lease_s=3)
    for ino in range(100):
        assert table.try_set(ino, False, A, W, 0, 9, 10) is None
        assert table.try_set(ino, False, A, U, 0, LOCK_TO_END, 10) is None
        assert table.try_set(ino, True, A, R, 0, LOCK_TO_END, 0) is None
        table.release_owner(ino, A)
    assert table._inodes_of == {}
    assert not table.any_held()
