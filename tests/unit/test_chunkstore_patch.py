"""Patched chunk versions on a keeper: only the changed blocks are written, reads see the
whole version, old versions can go while newer ones build on them, and compaction and a
restart keep every byte."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cluster import checksum
from cluster.errors import ChecksumMismatch, InvalidArgument, NotFound
from cluster.keeper.chunkstore import ChunkStore

BLOCK = checksum.BLOCK_SIZE


def _blocks(data: bytes, numbers: list[int]) -> bytes:
    return b"".join(data[b * BLOCK : (b + 1) * BLOCK] for b in numbers)


async def _patch(
    store: ChunkStore, base: int, version: int, new: bytes, numbers: list[int]
) -> None:
    await store.patch(
        1, base, version, len(new), checksum.block_checksums(new), numbers, _blocks(new, numbers)
    )


async def _whole(store: ChunkStore, version: int) -> bytes:
    read = await store.read(1, version, 0, 0)
    assert checksum.verify_blocks(read.data, read.checksums) is None
    return read.data


async def test_patches_write_only_their_blocks(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path)
    v1 = os.urandom(10 * BLOCK + 123)
    await store.write(1, 1, v1, checksum.block_checksums(v1))
    v2 = bytearray(v1)
    v2[3 * BLOCK + 5 : 3 * BLOCK + 9] = b"abcd"
    await _patch(store, 1, 2, bytes(v2), [3])
    assert store.files[(1, 2, "o")] <= 4096 + BLOCK  # a header page and one block
    assert await _whole(store, 2) == v2
    assert await _whole(store, 1) == v1  # the base is untouched
    # Grow the chunk: the base's partial last block and the new ones travel.
    v3 = bytes(v2) + os.urandom(2 * BLOCK)
    await _patch(store, 2, 3, v3, [10, 11, 12])
    await store.delete(1, 1)
    await store.delete(1, 2)  # v3 still needs their files
    assert store.held() == [[1, 3]]
    assert await _whole(store, 3) == v3
    part = await store.read(1, 3, 3 * BLOCK, 10)
    assert part.first_block == 3
    assert part.data == v3[3 * BLOCK : 4 * BLOCK]
    # A restart finds the same versions from the files' names and the patches' headers.
    again = ChunkStore(tmp_path)
    again.scan()
    assert again.held() == [[1, 1], [1, 2], [1, 3]]  # the tracker deletes 1 and 2 again
    assert await _whole(again, 3) == v3
    assert again.compact(1, 3)
    for version in (1, 2):
        await again.delete(1, version)
    assert await _whole(again, 3) == v3
    assert sorted(again.files) == [(1, 3, "f")]  # every patch file is gone
    assert again.used_bytes == again.files[(1, 3, "f")]


async def test_bad_patches_are_refused(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path)
    v1 = os.urandom(4 * BLOCK)
    await store.write(1, 1, v1, checksum.block_checksums(v1))
    v2 = bytearray(v1)
    v2[0] ^= 1
    v2[2 * BLOCK] ^= 1
    with pytest.raises(InvalidArgument):  # block 2 changed but is not sent
        await _patch(store, 1, 2, bytes(v2), [0])
    with pytest.raises(NotFound):  # no such base here
        await _patch(store, 7, 2, bytes(v2), [0, 2])
    sums = checksum.block_checksums(bytes(v2))
    with pytest.raises(ChecksumMismatch):
        await store.patch(1, 1, 2, len(v2), sums, [0, 2], bytes(2 * BLOCK))
    assert store.held() == [[1, 1]]


async def test_a_torn_patch_is_dropped_at_start(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path)
    v1 = os.urandom(4 * BLOCK)
    await store.write(1, 1, v1, checksum.block_checksums(v1))
    v2 = bytearray(v1)
    v2[BLOCK] ^= 1
    await _patch(store, 1, 2, bytes(v2), [1])
    path = store.path(1, 2, "o")
    with open(path, "r+b") as f:
        f.seek(20)
        f.write(b"\xff")
    again = ChunkStore(tmp_path)
    again.scan()
    assert again.held() == [[1, 1]]
    assert not path.exists()
