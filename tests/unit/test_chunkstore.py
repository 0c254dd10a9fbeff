"""Chunk files: validated ids, checked checksums, atomic writes, range reads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cluster import checksum
from cluster.errors import ChecksumMismatch, InvalidArgument, NoSpace, NotFound
from cluster.keeper.chunkstore import ChunkStore


async def test_write_read_delete(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path)
    data = os.urandom(5 * checksum.BLOCK_SIZE + 3)
    await store.write(1, 1, data, checksum.block_checksums(data))
    whole = await store.read(1, 1, 0, 0)
    assert whole.data == data
    assert whole.length == len(data)
    part = await store.read(1, 1, checksum.BLOCK_SIZE + 10, 20)
    assert part.first_block == 1
    assert part.data == data[checksum.BLOCK_SIZE : 2 * checksum.BLOCK_SIZE]
    assert store.held() == [[1, 1]]
    assert store.used_bytes > len(data)
    assert await store.delete(1, 1)
    assert store.used_bytes == 0
    with pytest.raises(NotFound):
        await store.read(1, 1, 0, 0)


async def test_regions_for_sendfile_hold_the_same_blocks(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path)
    data = os.urandom(3 * checksum.BLOCK_SIZE + 5)
    await store.write(7, 2, data, checksum.block_checksums(data))
    for offset, length in [(0, 0), (checksum.BLOCK_SIZE + 1, 10), (len(data) - 1, 1)]:
        read = await store.read(7, 2, offset, length)
        span, region = await store.open_read(7, 2, offset, length)
        try:
            assert (span.length, span.first_block, span.checksums) == (
                read.length,
                read.first_block,
                read.checksums,
            )
            assert os.pread(region.fd, region.length, region.offset) == read.data
        finally:
            region.close()
    # A file cut short is reported as a bad copy, not sent as a short payload.
    path = store.path(7, 2)
    os.truncate(path, path.stat().st_size - 1)
    with pytest.raises(ChecksumMismatch):
        await store.open_read(7, 2, 0, 0)


@pytest.mark.parametrize(
    ("chunk_id", "version"), [(0, 1), (-1, 1), (1 << 63, 1), (1, 0), (1, 1 << 32)]
)
async def test_malformed_ids_are_rejected(tmp_path: Path, chunk_id: int, version: int) -> None:
    store = ChunkStore(tmp_path)
    with pytest.raises(InvalidArgument):
        await store.write(chunk_id, version, b"x", checksum.block_checksums(b"x"))
    with pytest.raises(InvalidArgument):
        await store.read(chunk_id, version, 0, 0)
    assert list(tmp_path.rglob("*.dfs")) == []


async def test_corrupt_upload_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path)
    data = bytearray(os.urandom(100_000))
    sums = checksum.block_checksums(data)
    data[70_000] ^= 1
    with pytest.raises(ChecksumMismatch):
        await store.write(5, 1, data, sums)
    assert list((tmp_path / "chunks").rglob("*")) == [] or not list(tmp_path.rglob("*.dfs"))
    assert store.held() == []


async def test_scan_finds_chunks_and_removes_temporaries(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path)
    await store.write(0x1234, 3, b"abc", checksum.block_checksums(b"abc"))
    leftover = store.path(0x1234, 3).parent / ".tmp-crashed"
    leftover.write_bytes(b"partial")
    again = ChunkStore(tmp_path)
    again.scan()
    assert again.held() == [[0x1234, 3]]
    assert not leftover.exists()
    assert again.verify(0x1234, 3)
    raw = bytearray(store.path(0x1234, 3).read_bytes())
    raw[-1] ^= 1
    store.path(0x1234, 3).write_bytes(raw)
    assert not again.verify(0x1234, 3)


async def test_capacity_is_enforced(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path, capacity_bytes=100_000)
    data = os.urandom(90_000)
    await store.write(1, 1, data, checksum.block_checksums(data))
    with pytest.raises(NoSpace):
        await store.write(2, 1, data, checksum.block_checksums(data))
