"""The mount's data layer (dfsmount.cache) without FUSE, on a real cluster: the dirty bound
holds under a fast writer, partial overwrites patch the stored chunk, reads see unflushed
writes, and a failed upload is reported by flush and every later write."""

from __future__ import annotations

import os
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from cluster.auth import Credentials
from cluster.client import ROOT_INO, Client
from cluster.errors import DfsError, LockFenced
from dfsmount.cache import DataCache, FileState
from tests.cluster_procs import ProcCluster
from tests.conftest import MakeCluster

MiB = 1 << 20


@asynccontextmanager
async def data_cache(cluster: ProcCluster, dirty_bytes: int = 64 * MiB) -> AsyncIterator[DataCache]:
    credentials = Credentials.from_settings({"secret_file": str(cluster.secret_file)})
    async with (
        Client.connect(cluster.tracker_addr, credentials, retry_window_s=5) as client,
        trio.open_nursery() as nursery,
    ):
        yield DataCache(client, nursery, dirty_bytes=dirty_bytes, cache_bytes=16 * MiB)
        nursery.cancel_scope.cancel()


async def new_file(cache: DataCache, name: bytes) -> FileState:
    attr = await cache.client.mknod(ROOT_INO, name, stat.S_IFREG | 0o644, 0, 0)
    return cache.open_state(await cache.client.open_file(attr.ino))


async def read_all(cache: DataCache, ino: int) -> bytes:
    """Through a fresh state, as another open would see the committed file."""
    state = FileState(cache, await cache.client.getattr(ino))
    return bytes(await state.read(0, state.size + 1, sequential=True))


async def test_dirty_bytes_stay_bounded(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(chunk_size=1 * MiB)
    limit = 3 * MiB
    async with data_cache(cluster, dirty_bytes=limit) as cache:
        state = await new_file(cache, b"bounded")
        data = os.urandom(24 * MiB + 5)
        peak = 0
        for offset in range(0, len(data), 128 * 1024):
            await state.write(offset, data[offset : offset + 128 * 1024])
            peak = max(peak, cache.budget.used)
        assert peak <= limit
        # Unflushed writes are readable through the same state.
        assert bytes(await state.read(0, len(data), sequential=False)) == data
        await state.flush()
        assert cache.budget.used == 0
        assert await read_all(cache, state.ino) == data


async def test_partial_overwrites_patch_stored_chunks(
    make_cluster: MakeCluster, tmp_path: Path
) -> None:
    cluster = make_cluster(chunk_size=1 * MiB)
    async with data_cache(cluster) as cache:
        local = tmp_path / "base"
        base = bytearray(os.urandom(3 * MiB + 100))
        local.write_bytes(base)
        attr = await cache.client.upload(local, "/patched")
        state = cache.open_state(await cache.client.open_file(attr.ino))
        for offset, patch in ((10, b"head"), (MiB - 2, b"across"), (3 * MiB + 98, b"grow")):
            await state.write(offset, patch)
            end = offset + len(patch)
            base[offset:end] = patch
            # Reads merge the stored chunk with the buffered patch before any flush.
            assert bytes(await state.read(offset - 5, len(patch) + 10, sequential=False)) == bytes(
                base[offset - 5 : end + 5]
            )
        await state.flush()
        assert await read_all(cache, state.ino) == bytes(base)


async def test_failed_upload_is_reported_and_sticky(make_cluster: MakeCluster) -> None:
    cluster = make_cluster(keepers=2, replication=2, chunk_size=1 * MiB)
    async with data_cache(cluster) as cache:
        state = await new_file(cache, b"doomed")
        for keeper in cluster.keepers:
            keeper.kill()
        await state.write(0, os.urandom(MiB))  # a full chunk: uploads in the background
        failed = False
        try:
            await state.flush()
        except DfsError:
            failed = True
        assert failed, "flush acknowledged a chunk no keeper stored"
        failed = False
        try:
            await state.write(MiB, b"more")
        except DfsError:
            failed = True
        assert failed, "a write after a failed upload was accepted"
        assert (await cache.client.getattr(state.ino)).size == 0  # nothing was committed


async def test_a_fenced_file_drops_what_was_not_committed_and_says_so_once(
    make_cluster: MakeCluster,
) -> None:
    """FileState.fence (the mount's locks on the file were lost): an upload in flight lands
    and is given back, buffered writes go, their budget is freed; the next flush fails and
    the one after (a reader's close) does not; writes and truncates fail; reads show the
    tracker's bytes; an open made since gets a state of its own that writes."""
    cluster = make_cluster(chunk_size=1 * MiB)
    async with data_cache(cluster) as cache:
        state = await new_file(cache, b"fenced")
        await state.write(0, b"committed")
        await state.flush()
        await state.write(0, os.urandom(MiB))  # a full chunk: uploading in the background
        await state.write(MiB, b"buffered")
        assert state.uploading
        assert state.dirty

        state.fence(LockFenced("the locks were lost"))
        assert not state.dirty
        for upload in list(state.uploading.values()):
            await upload.done.wait()
        assert not state.pending  # the chunk that landed was given back, not kept
        assert cache.budget.used == 0
        with pytest.raises(LockFenced):
            await state.flush()
        assert not await state.flush()
        with pytest.raises(LockFenced):
            await state.write(0, b"more")
        with pytest.raises(LockFenced):
            await state.setattr(size_bytes=0)
        assert bytes(await state.read(0, 100, sequential=False)) == b"committed"
        assert await read_all(cache, state.ino) == b"committed"

        fresh = cache.open_state(await cache.client.open_file(state.ino))
        assert fresh is not state
        await fresh.write(0, b"after")
        await fresh.flush()
        assert await read_all(cache, state.ino) == b"aftertted"
