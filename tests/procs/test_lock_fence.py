"""A session whose locks were released by an expired lease cannot write the files it had
locked through the opens it made before (the tracker's fence: cluster/locks.py,
LockTable.fenced).

A mount that was silent (partitioned, stopped) past its lease may not know yet that another
host took its lock and changed the file; whatever it writes now was written believing it held
the lock. The tracker refuses it, whatever the mount knows: commits, truncates and punched
holes through an open made before the loss answer LockFenced (EIO at the mount), as NFS
answers writes under a lost lock. An open made after it writes. Here through the client
library, which holds a lock without renewing its lease: a mount that has fallen silent.
"""

from __future__ import annotations

import fcntl
import signal
from pathlib import Path

import pytest
import trio

from cluster.client import Client
from cluster.errors import DfsError, LockFenced, LockGrace
from cluster.locks import LockRange, OpenMark
from cluster.messages import LOCK_TO_END
from dfsmount.cache import DataCache
from dfsmount.locks import MountLocks
from tests.cluster_procs import ProcCluster
from tests.conftest import MakeCluster

WHOLE_WRITE = LockRange(flock=False, type=fcntl.F_WRLCK, pid=1)
LEASE_S = 3.0


async def _put(
    client: Client, ino: int, data: bytes, opened: OpenMark | None, locks_table: str = ""
) -> None:
    """Write `data` as the whole file through `client`'s open `opened` (under locks of
    `locks_table`), as a mount's flush does."""
    info = await client.write_chunk(ino, 0, data)
    await client.commit(ino, len(data), [info], opened=opened, locks_table=locks_table)


async def _open(client: Client, ino: int) -> OpenMark | None:
    return (await client.open_file_and_chunks(ino))[2]


async def _read(client: Client, path: str, scratch: Path) -> bytes:
    await client.download(path, scratch)
    return scratch.read_bytes()


@pytest.fixture
def cluster(make_cluster: MakeCluster) -> ProcCluster:
    """Two keepers, and sessions whose locks go three seconds after their last renewal."""
    return make_cluster(keepers=2, replication=2, tracker_args=["--lock-lease-s", str(LEASE_S)])


def test_writes_under_a_lock_lost_to_an_expired_lease_are_refused_until_reopened(
    cluster: ProcCluster, tmp_path: Path
) -> None:
    out = tmp_path / "out"

    async def main() -> None:
        async with cluster.client() as silent, cluster.client() as other:
            ino = (await silent.create_file("/shared")).ino
            old_open = await _open(silent, ino)
            assert old_open is not None
            await _put(silent, ino, b"before", old_open)
            # A second open of the silent session's stays open through what follows: what
            # counts is when an open was made, not how many are open.
            second_open = await _open(silent, ino)
            assert (await silent.set_lock(ino, 1, WHOLE_WRITE)).granted
            await _put(silent, ino, b"under the lock", old_open)

            # `silent` renews nothing: past its lease, the lock is the other session's.
            with trio.fail_after(30):  # catches a hang
                while not (await other.set_lock(ino, 2, WHOLE_WRITE, wait_s=1.0)).granted:
                    pass
            await _put(other, ino, b"the other host's", await _open(other, ino))

            # Every write of the silent session through an open made before is refused.
            with pytest.raises(LockFenced):
                await _put(silent, ino, b"stale", old_open)
            with pytest.raises(LockFenced):
                await _put(silent, ino, b"stale", second_open)
            with pytest.raises(LockFenced):
                await silent.setattr(ino, size_bytes=0, opened=old_open)
            with pytest.raises(LockFenced):
                await silent.punch_chunks(ino, 0, 1, old_open)
            assert await _read(other, "/shared", out) == b"the other host's"
            # Times, modes and other files are not writes under the lock.
            await silent.setattr(ino, mode=0o600, opened=old_open)
            elsewhere, _, _, elsewhere_open = await silent.create(1, b"elsewhere", 0o644)
            await _put(silent, elsewhere.ino, b"fine", elsewhere_open)

            # Opened again (the file closed, or not yet: its opens are still counted here),
            # it writes knowing; the old opens stay refused.
            new_open = await _open(silent, ino)
            await _put(silent, ino, b"after reopening", new_open)
            assert await _read(other, "/shared", out) == b"after reopening"
            await silent.release_files([ino])
            with pytest.raises(LockFenced):
                await _put(silent, ino, b"stale", old_open)

    trio.run(main)


def test_a_session_that_releases_its_lock_in_time_is_not_fenced(
    cluster: ProcCluster, tmp_path: Path
) -> None:
    out = tmp_path / "out"

    async def main() -> None:
        async with cluster.client() as client:
            ino = (await client.create_file("/f")).ino
            opened = await _open(client, ino)
            assert (await client.set_lock(ino, 1, WHOLE_WRITE)).granted
            await client.set_lock(ino, 1, WHOLE_WRITE.unlocked())
            await trio.sleep(LEASE_S + 2)  # the lease runs out with nothing held
            await _put(client, ino, b"written later", opened)
            assert await _read(client, "/f", out) == b"written later"

    trio.run(main)


def test_a_mount_confirms_its_lease_before_a_write_under_its_locks(cluster: ProcCluster) -> None:
    """The mount's side (dfsmount/locks.py, MountLocks.confirm, awaited before a commit,
    truncate or punch of a file it holds locks on): a tracker that restarted or took over
    knows no fence, so a mount that was silent for most of its lease asks before it writes,
    and fences the file itself if its locks were lost or cannot be confirmed in time."""

    async def main() -> None:
        async with cluster.client() as client:
            ino = (await client.create_file("/f")).ino
            locks = MountLocks(client)  # its keep_lease task never runs: a silent mount
            lost: list[set[int]] = []
            locks.on_lost = lambda inos, exc: lost.append(inos)
            assert (await locks.set(ino, 1, 7, WHOLE_WRITE, wait=False)).granted
            await locks.confirm(ino)  # just granted: nothing to ask
            await locks.confirm(ino + 1)  # holds nothing there
            assert lost == []

            # Past its lease the tracker has let the locks go: told so, the mount fences.
            await trio.sleep(LEASE_S + 1.5)
            await locks.confirm(ino)
            assert lost == [{ino}]

            # The tracker stops answering: the mount gives up when its lease runs out.
            assert (await locks.set(ino, 1, 7, WHOLE_WRITE, wait=False)).granted
            tracker = cluster.tracker
            assert tracker is not None
            tracker.signal(signal.SIGSTOP)
            try:
                await trio.sleep(LEASE_S * 2 / 3 + 0.2)
                started = trio.current_time()
                with trio.fail_after(LEASE_S + 10):  # catches a hang
                    await locks.confirm(ino)
                assert lost == [{ino}, {ino}]
                # At the lease's end, not after the client's io timeout and retry window.
                assert trio.current_time() - started < LEASE_S
            finally:
                tracker.signal(signal.SIGCONT)

    trio.run(main)


def test_writes_under_locks_of_an_earlier_tracker_wait_for_their_reclaim(
    cluster: ProcCluster, tmp_path: Path
) -> None:
    """A restarted (or new) tracker knows no fence of the old one. A write made under locks
    granted by the old one (the mount names their lock table) is answered LockGrace while
    they may still be reclaimed, goes through once they are, and is refused (LockFenced) if
    they were not by the end of the grace period: another host may hold them by then."""
    out = tmp_path / "out"
    tracker = cluster.tracker
    assert tracker is not None

    async def main() -> None:
        async with cluster.client() as reclaims, cluster.client() as forgets:
            writers = {}
            for name, client in ((b"r", reclaims), (b"f", forgets)):
                attr, _, _, opened = await client.create(1, name, 0o644)
                reply = await client.set_lock(attr.ino, 1, WHOLE_WRITE)
                assert reply.granted
                await _put(client, attr.ino, b"under the old tracker", opened, reply.table)
                writers[name] = (client, attr.ino, opened, reply.table)
            await trio.to_thread.run_sync(cluster.restart, tracker)  # its lock table is gone

            client, ino, opened, old_table = writers[b"r"]
            with trio.fail_after(30):  # catches a hang
                while True:  # asked until the new tracker answers
                    try:
                        await _put(client, ino, b"too early", opened, old_table)
                        raise AssertionError("a write under unreclaimed locks was taken")
                    except LockGrace:
                        break
                    except DfsError:
                        await trio.sleep(0.2)  # not up yet
            reclaimed = await client.reclaim_locks([[ino, 0, 1, fcntl.F_WRLCK, 0, LOCK_TO_END, 1]])
            await _put(client, ino, b"after the reclaim", opened, reclaimed.table)
            assert await _read(client, "/r", out) == b"after the reclaim"

            client, ino, opened, old_table = writers[b"f"]
            await trio.sleep(LEASE_S + 1)  # the grace period is over
            with pytest.raises(LockFenced):
                await _put(client, ino, b"never reclaimed", opened, old_table)
            assert await _read(client, "/f", out) == b"under the old tracker"

    trio.run(main)


def test_a_flush_under_locks_of_an_earlier_tracker_waits_for_the_mount_to_reclaim(
    make_cluster: MakeCluster, tmp_path: Path
) -> None:
    """The mount's side of the above (dfsmount/cache.py, FileState._under_locks): a flush
    told LockGrace has the mount reclaim its locks at once (the lease task is only started
    then, so the flush surely comes first) and commits under the new table."""
    lease_s = 10.0  # the mount's own lease must outlast the restart, or it gives them up
    cluster = make_cluster(keepers=2, replication=2, tracker_args=["--lock-lease-s", str(lease_s)])
    tracker = cluster.tracker
    assert tracker is not None

    async def main() -> None:
        async with cluster.client() as client, trio.open_nursery() as nursery:
            cache = DataCache(client, nursery, dirty_bytes=16 << 20, cache_bytes=16 << 20)
            locks = MountLocks(client)
            cache.before_change = locks.confirm
            graces: list[float] = []

            def on_grace() -> None:
                if not graces:
                    nursery.start_soon(locks.keep_lease)
                graces.append(trio.current_time())
                locks.renew_soon()

            cache.on_grace = on_grace
            attr, _, _, opened = await client.create(1, b"g", 0o644)
            state = cache.open_state(attr, opened)
            assert (await locks.set(attr.ino, 1, 7, WHOLE_WRITE, wait=False)).granted
            old_table = locks.table
            await state.write(0, b"before")
            await state.flush()
            await trio.to_thread.run_sync(cluster.restart, tracker)

            await state.write(0, b"across the restart")
            with trio.fail_after(60):  # catches a hang
                await state.flush()
            assert graces, "the commit was not asked to wait for the reclaim"
            assert locks.table not in (None, old_table)
            assert await _read(client, "/g", tmp_path / "out") == b"across the restart"
            nursery.cancel_scope.cancel()

    trio.run(main)
