"""Per-block xxHash checksums of chunk data.

A chunk is checksummed in blocks of `BLOCK_SIZE` bytes (the last one may be short) with
xxh3_64, which hashes about 12 GB/s here, so checksumming never limits the data path. The block
checksums are packed as little-endian u64s; the tracker keeps only their `digest`, which is
enough to validate the checksums a keeper sends with the data it serves.
"""

from __future__ import annotations

import struct

import xxhash

# 64 KiB: small enough that a range read checks little extra data, large enough that an
# 8 MiB chunk has only 128 checksums (1 KiB) to carry.
BLOCK_SIZE = 64 * 1024
CHECKSUM_SIZE = 8

Buffer = bytes | bytearray | memoryview


def block_count(length: int) -> int:
    return (length + BLOCK_SIZE - 1) // BLOCK_SIZE


def block_length(length: int, index: int) -> int:
    """Bytes of block `index` in a chunk of `length` bytes (0 past its end)."""
    return max(0, min(BLOCK_SIZE, length - index * BLOCK_SIZE))


def block_checksums(data: Buffer) -> bytes:
    """The packed xxh3_64 of every block of `data`."""
    view = memoryview(data)
    sums = [
        xxhash.xxh3_64_intdigest(view[offset : offset + BLOCK_SIZE])
        for offset in range(0, len(view), BLOCK_SIZE)
    ]
    return struct.pack(f"<{len(sums)}Q", *sums)


def digest(checksums: Buffer) -> int:
    """One 64-bit value that names a chunk's whole checksum list (the tracker stores this)."""
    return int(xxhash.xxh3_64_intdigest(checksums))


def verify_blocks(data: Buffer, checksums: Buffer, first_block: int = 0) -> int | None:
    """Check `data`, which starts at block `first_block`, against the chunk's `checksums`.

    Returns the index of the first bad block, or None when all match.
    """
    view = memoryview(data)
    sums = memoryview(checksums).cast("B")
    for i, offset in enumerate(range(0, len(view), BLOCK_SIZE)):
        block = first_block + i
        start = block * CHECKSUM_SIZE
        if start + CHECKSUM_SIZE > len(sums):
            return block
        (expected,) = struct.unpack_from("<Q", sums, start)
        if xxhash.xxh3_64_intdigest(view[offset : offset + BLOCK_SIZE]) != expected:
            return block
    return None
