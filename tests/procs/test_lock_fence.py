"""A session whose locks were released by an expired lease cannot write the files it had
locked until it closes them (the tracker's fence: cluster/locks.py, LockTable.fenced).

A mount that was silent (partitioned, stopped) past its lease may not know yet that another
host took its lock and changed the file; whatever it writes now was written believing it held
the lock. The tracker refuses it, whatever the mount knows: commits, truncates and punched
holes answer LockFenced (EIO at the mount), as NFS answers writes under a lost lock. A new
open, made after the file was closed, writes again. Here through the client library, which
holds a lock without renewing its lease: a mount that has fallen silent.
"""

from __future__ import annotations

import fcntl
from pathlib import Path

import pytest
import trio

from cluster.client import Client
from cluster.errors import LockFenced
from cluster.locks import LockRange
from tests.cluster_procs import ProcCluster
from tests.conftest import MakeCluster

WHOLE_WRITE = LockRange(flock=False, type=fcntl.F_WRLCK, pid=1)
LEASE_S = 1.0


async def _put(client: Client, ino: int, data: bytes) -> None:
    """Write `data` as the whole file through `client`'s session, as a mount's flush does."""
    info = await client.write_chunk(ino, 0, data)
    await client.commit(ino, len(data), [info])


async def _read(client: Client, path: str, scratch: Path) -> bytes:
    await client.download(path, scratch)
    return scratch.read_bytes()


@pytest.fixture
def cluster(make_cluster: MakeCluster) -> ProcCluster:
    """Two keepers, and sessions whose locks go one second after their last renewal."""
    return make_cluster(keepers=2, replication=2, tracker_args=["--lock-lease-s", str(LEASE_S)])


def test_writes_under_a_lock_lost_to_an_expired_lease_are_refused_until_reopened(
    cluster: ProcCluster, tmp_path: Path
) -> None:
    out = tmp_path / "out"

    async def main() -> None:
        async with cluster.client() as silent, cluster.client() as other:
            ino = (await silent.create_file("/shared")).ino
            await silent.open_file(ino)
            await _put(silent, ino, b"before")
            assert (await silent.set_lock(ino, 1, WHOLE_WRITE)).granted
            await _put(silent, ino, b"under the lock")

            # `silent` renews nothing: past its lease, the lock is the other session's.
            with trio.fail_after(30):  # catches a hang
                while not (await other.set_lock(ino, 2, WHOLE_WRITE, wait_s=1.0)).granted:
                    pass
            await other.open_file(ino)
            await _put(other, ino, b"the other host's")
            await other.release_files([ino])

            # Every write of the silent session to the file it had locked is refused.
            with pytest.raises(LockFenced):
                await _put(silent, ino, b"stale")
            with pytest.raises(LockFenced):
                await silent.setattr(ino, size_bytes=0)
            with pytest.raises(LockFenced):
                await silent.punch_chunks(ino, 0, 1)
            assert await _read(other, "/shared", out) == b"the other host's"
            # Times, modes and other files are not writes under the lock.
            await silent.setattr(ino, mode=0o600)
            elsewhere = (await silent.create_file("/elsewhere")).ino
            await _put(silent, elsewhere, b"fine")

            # Closed (its opens given back) and opened again: it writes knowing.
            await silent.release_files([ino])
            await silent.open_file(ino)
            await _put(silent, ino, b"after reopening")
            assert await _read(other, "/shared", out) == b"after reopening"

    trio.run(main)


def test_a_session_that_releases_its_lock_in_time_is_not_fenced(
    cluster: ProcCluster, tmp_path: Path
) -> None:
    out = tmp_path / "out"

    async def main() -> None:
        async with cluster.client() as client:
            ino = (await client.create_file("/f")).ino
            await client.open_file(ino)
            assert (await client.set_lock(ino, 1, WHOLE_WRITE)).granted
            await client.set_lock(ino, 1, WHOLE_WRITE.unlocked())
            await trio.sleep(LEASE_S * 3)  # the lease runs out with nothing held
            await _put(client, ino, b"written later")
            assert await _read(client, "/f", out) == b"written later"

    trio.run(main)
