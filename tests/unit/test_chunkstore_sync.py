"""The keeper's two durability levels: a chunk written without sync is in its file at once and
on the disk after `sync` or the write-back; a torn file is never served."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from cluster import checksum
from cluster.errors import ChecksumMismatch, NotFound
from cluster.keeper import chunkstore
from cluster.keeper.chunkstore import ChunkStore


async def _put(store: ChunkStore, chunk_id: int, version: int, *, sync: bool) -> bytes:
    data = os.urandom(3 * checksum.BLOCK_SIZE + 7)
    await store.write(chunk_id, version, data, checksum.block_checksums(data), sync=sync)
    return data


async def test_unsynced_writes_are_readable_and_synced_on_demand(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path)
    data = await _put(store, 1, 1, sync=False)
    await _put(store, 2, 1, sync=False)
    await _put(store, 3, 1, sync=True)
    assert store.unsynced == {(1, 1), (2, 1)}
    assert (await store.read(1, 1, 0, 0)).data == data  # in the file at once
    await store.sync([(1, 1), (3, 1)])  # 3 was synced already: nothing to do for it
    assert store.unsynced == {(2, 1)}
    assert store.syncs == 1
    with pytest.raises(NotFound):
        await store.sync([(9, 9)])
    await store.sync()
    assert store.unsynced == set()


async def test_delete_writes_back_first(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path)
    await _put(store, 5, 1, sync=True)
    await _put(store, 5, 2, sync=False)  # the newer version, not on the disk yet
    assert await store.delete(5, 1)
    assert store.unsynced == set()  # the old one went only after the new one was synced


async def test_write_back_runs_on_its_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chunkstore, "WRITEBACK_S", 0.05)
    store = ChunkStore(tmp_path)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(store.write_back)
        await _put(store, 7, 1, sync=False)
        with trio.fail_after(10):
            while store.unsynced:  # noqa: ASYNC110 (a state of the store, not an event)
                await trio.sleep(0.02)
        nursery.cancel_scope.cancel()
    assert store.syncs == 1


async def test_an_empty_chunk_file_is_never_served(tmp_path: Path) -> None:
    """What a power cut before the write-back can leave: the name, and no bytes."""
    store = ChunkStore(tmp_path)
    await _put(store, 8, 1, sync=False)
    os.truncate(store.path(8, 1), 0)
    with pytest.raises(ChecksumMismatch):
        await store.open_read(8, 1, 0, 0)
    assert not store.verify(8, 1)
