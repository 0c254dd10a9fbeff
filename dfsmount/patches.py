"""Block-level updates: what of a chunk a flush has to send when it changed only a little.

A chunk is checksummed in 64 KiB blocks; a flush that changed a few of them sends just those
(`PatchChunk`), and the keepers that hold the committed version build the new one from it
(keeper/chunkstore.py). So a 4 KiB write and fsync in an 8 MiB chunk moves one block per
replica, not the chunk. `plan` decides whether a buffer is worth a patch and which blocks it
touches; `build` makes the blocks' new bytes and the new version's checksums from the base's,
taking the base's bytes and checksums from wherever they already are: the blocks this file
sent last (`Recent`: a log being appended to rewrites its tail block again and again), the
read cache, or else one read of just those blocks from a keeper.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cluster import checksum
from cluster.client import ChunkInfo, Client
from dfsmount.buffers import ChunkBuffer
from dfsmount.chunkcache import ChunkCache

BLOCK = checksum.BLOCK_SIZE
SUM = checksum.CHECKSUM_SIZE
# A patch is sent when it carries at most this fraction of the new version's blocks; past it,
# the whole chunk costs about as much and leaves the keepers one file to read.
MAX_PATCH_FRACTION = 0.5


@dataclass
class Recent:
    """The checksums of the version this file last stored for one chunk, and the bytes of
    the blocks it sent then."""

    version: int
    checksums: bytes
    blocks: dict[int, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class Plan:
    length: int  # of the new version
    blocks: list[int]  # that change, ascending


def plan(buf: ChunkBuffer, base: ChunkInfo) -> Plan | None:
    """The blocks a patch of `buf` over `base` must carry, or None if a whole write is
    better (or needed)."""
    length = max(base.length, len(buf.data))
    count = checksum.block_count(length)
    if count == 0:
        return None
    changed: set[int] = set()
    for start, end in buf.extents:
        changed.update(range(start // BLOCK, checksum.block_count(end)))
    # Blocks whose length changes (the base's partial last block when the chunk grows, and
    # everything past the base's end) carry new bytes too.
    changed.update(
        b
        for b in range(count)
        if checksum.block_length(length, b) != checksum.block_length(base.length, b)
    )
    if len(changed) > count * MAX_PATCH_FRACTION:
        return None
    return Plan(length, sorted(changed))


async def build(
    buf: ChunkBuffer,
    base: ChunkInfo,
    todo: Plan,
    recent: Recent | None,
    cache: ChunkCache,
    client: Client,
) -> tuple[bytes, bytes, dict[int, bytes]]:
    """(checksums of the new version, the changed blocks back to back, those blocks by
    number). The base's bytes past its committed length read as zeros (a truncate on the
    tracker leaves the keepers' copy longer)."""
    if recent is not None and recent.version != base.version:
        recent = None
    need = [
        b
        for b in todo.blocks
        if b * BLOCK < base.length
        and not buf.covers(b * BLOCK, b * BLOCK + checksum.block_length(todo.length, b))
        and (recent is None or b not in recent.blocks)
    ]
    base_sums = recent.checksums if recent is not None else None
    fetched: dict[int, bytes] = {}
    whole = cache.peek(base)
    if whole is not None:
        if base_sums is None:
            base_sums = checksum.block_checksums(memoryview(whole)[: base.length])
        for b in need:
            fetched[b] = bytes(whole[b * BLOCK : min(base.length, (b + 1) * BLOCK)])
    elif need or base_sums is None:
        first = need[0] if need else 0
        stop = need[-1] + 1 if need else 1
        base_sums, data = await client.read_blocks(base, first, stop)
        for b in need:
            offset = (b - first) * BLOCK
            fetched[b] = data[offset : offset + min(BLOCK, base.length - b * BLOCK)]
    assert base_sums is not None
    count = checksum.block_count(todo.length)
    sums = bytearray(base_sums[: count * SUM])
    sums.extend(bytes(count * SUM - len(sums)))
    sent: dict[int, bytes] = {}
    for b in todo.blocks:
        out = bytearray(checksum.block_length(todo.length, b))
        old = fetched.get(b)
        if old is None and recent is not None:
            old = recent.blocks.get(b)
        if old is not None:
            keep = min(len(out), len(old), max(0, base.length - b * BLOCK))
            out[:keep] = old[:keep]
        buf.overlay(out, b * BLOCK)
        sent[b] = bytes(out)
        sums[b * SUM : (b + 1) * SUM] = checksum.block_checksums(out)
    return bytes(sums), b"".join(sent[b] for b in todo.blocks), sent
