"""The tracker's durability: on both stores (a real SQLite file, a real PostgreSQL database),
ids and chunk versions never handed out twice across an unclean stop; on SQLite, group syncs
that cover every commit made before they were asked for; on PostgreSQL, no sync at all, as a
commit is durable when it returns."""

from __future__ import annotations

import stat
from pathlib import Path

import trio

from cluster.tracker.durability import BACKGROUND_SYNC_S, GroupSync
from cluster.tracker.namespace import Namespace
from cluster.tracker.pgstore import PostgresStore
from cluster.tracker.store import (
    ROOT_INO,
    SKIP_AFTER_CRASH,
    VERSION_SKIP_AFTER_CRASH,
    MetadataStore,
    SqliteStore,
)
from tests.conftest import OpenStore
from tests.stores import crash

FILE = stat.S_IFREG | 0o644


def _new_ids(store: MetadataStore, name: bytes) -> tuple[int, int]:
    """Create a file and allocate a chunk id; return (inode number, chunk id)."""
    inode = Namespace(store, chunk_size=1 << 20).make_node(ROOT_INO, name, FILE, 0, 0)
    with store.transaction():
        chunk_id = store.next_chunk_id()
    return inode.ino, chunk_id


def test_ids_jump_after_an_unclean_stop(open_store: OpenStore) -> None:
    store = open_store()
    ino, chunk_id = _new_ids(store, b"a")
    crash(store)
    store = open_store()
    next_ino, next_chunk = _new_ids(store, b"b")
    assert next_ino > ino + SKIP_AFTER_CRASH
    assert next_chunk > chunk_id + SKIP_AFTER_CRASH
    store.close()


def test_ids_go_on_after_a_clean_stop(open_store: OpenStore) -> None:
    store = open_store()
    ino, chunk_id = _new_ids(store, b"a")
    store.close()
    store = open_store()
    assert _new_ids(store, b"b") == (ino + 1, chunk_id + 1)
    # Still open: a crash now must be noticed at the next start.
    crash(store)
    store = open_store()
    assert _new_ids(store, b"c")[0] > ino + SKIP_AFTER_CRASH
    store.close()


def _version(store: MetadataStore, chunk_id: int) -> int:
    with store.transaction():
        return store.next_version(chunk_id)


def test_chunk_versions_jump_after_an_unclean_stop(open_store: OpenStore) -> None:
    """Allocations are not fsynced (a new version of a chunk is handed out many times a second
    to a log written with O_DSYNC): a version lost with the last second of commits must still
    never be handed out again. (PostgreSQL loses no commit, but a database restored or failed
    over to an asynchronous replica can: it jumps the same way.)"""
    store = open_store()
    first = [_version(store, 7) for _ in range(3)]
    assert first == [1, 2, 3]
    crash(store)
    store = open_store()
    after = _version(store, 7)
    assert after > 3 + VERSION_SKIP_AFTER_CRASH - 1
    assert _version(store, 7) == after + 1  # one jump per chunk, then one by one
    assert _version(store, 8) > VERSION_SKIP_AFTER_CRASH  # a chunk first seen now jumps too
    store.close()
    store = open_store()
    assert _version(store, 7) == after + 2  # a clean stop: no jump
    store.close()


async def test_one_fsync_serves_every_waiting_caller(tmp_path: Path) -> None:
    """SQLite only: the WAL fsync that PostgreSQL does inside COMMIT (see the next test)."""
    store = SqliteStore(tmp_path / "meta.db")
    durable = GroupSync(store)
    assert not durable.behind
    await durable.sync()
    assert durable.syncs == 0  # nothing committed since the store synced at start-up

    ns = Namespace(store, chunk_size=1 << 20)
    ns.make_node(ROOT_INO, b"f", FILE, 0, 0)
    assert durable.behind
    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(durable.sync)
    assert durable.syncs == 1
    assert not durable.behind

    ns.unlink(ROOT_INO, b"f")
    await durable.sync()
    assert durable.syncs == 2
    store.close()


async def test_postgresql_commits_need_no_sync(pg_uri: str) -> None:
    """A PostgreSQL commit is durable when COMMIT returns: the group sync has nothing to wait
    for, while the change mark still moves with every commit."""
    store = PostgresStore(pg_uri)
    durable = GroupSync(store)
    before = store.changes()
    Namespace(store, chunk_size=1 << 20).make_node(ROOT_INO, b"f", FILE, 0, 0)
    assert store.changes() != before
    assert not durable.behind
    await durable.sync()
    assert durable.syncs == 0
    store.close()


async def test_background_sync_catches_up_within_its_interval(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "meta.db")
    durable = GroupSync(store)
    Namespace(store, chunk_size=1 << 20).make_node(ROOT_INO, b"f", FILE, 0, 0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(durable.run)
        await trio.sleep(BACKGROUND_SYNC_S * 2.5)  # an fsync takes milliseconds
        nursery.cancel_scope.cancel()
    assert not durable.behind
    assert durable.syncs == 1
    store.close()


def test_ids_jump_even_if_the_crash_came_before_any_was_used(open_store: OpenStore) -> None:
    """A store that crashed before its first name or chunk still jumps: the counters to move
    exist from the start."""
    crash(open_store())
    store = open_store()
    ino, chunk_id = _new_ids(store, b"a")
    assert chunk_id > SKIP_AFTER_CRASH
    ((cookie, _, child),) = store.list_dentries(ROOT_INO, 0, 10)
    assert child == ino
    assert cookie > SKIP_AFTER_CRASH
    store.close()


class _WrappingStore(SqliteStore):
    """SQLite's change count as CPython reports it, opened 3 changes short of its wrap (SQLite
    only: PostgreSQL's mark is a Python integer)."""

    def __init__(self, path: Path) -> None:
        self._offset = 0
        super().__init__(path)
        self._offset = (1 << 31) - 3 - super().changes()

    def changes(self) -> int:
        count = super().changes() + self._offset
        return (count + (1 << 31)) % (1 << 32) - (1 << 31)


async def test_syncs_go_on_across_the_change_counter_wrap(tmp_path: Path) -> None:
    store = _WrappingStore(tmp_path / "meta.db")
    durable = GroupSync(store)
    ns = Namespace(store, chunk_size=1 << 20)
    assert store.changes() == (1 << 31) - 3
    for i in range(6):  # the first create crosses from 2**31 - 1 to -2**31
        ns.make_node(ROOT_INO, b"f%d" % i, FILE, 0, 0)
        assert durable.behind
        await durable.sync()
        assert durable.syncs == i + 1
        assert not durable.behind
    store.close()


def test_the_note_of_held_locks_outlives_a_crash(open_store: OpenStore) -> None:
    """What a tracker taking over reads to know whether mounts may still hold locks
    (cluster/locks.py): written in a transaction, there after a crash and a restart."""
    store = open_store()
    assert store.locks_held_until() == 0.0  # a fresh cluster: no grace period
    with store.transaction():
        store.set_locks_held_until(1_900_000_000.5)
    with store.transaction():
        store.set_locks_held_until(1_900_000_060.5)
    crash(store)
    assert open_store().locks_held_until() == 1_900_000_061
