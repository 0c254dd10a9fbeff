from __future__ import annotations

import os

from cluster import checksum


def test_block_checksums_detect_any_flipped_byte() -> None:
    data = bytearray(os.urandom(3 * checksum.BLOCK_SIZE + 17))
    sums = checksum.block_checksums(data)
    assert len(sums) == 4 * checksum.CHECKSUM_SIZE
    assert checksum.verify_blocks(data, sums) is None
    for position in (0, checksum.BLOCK_SIZE + 5, len(data) - 1):
        data[position] ^= 1
        assert checksum.verify_blocks(data, sums) == position // checksum.BLOCK_SIZE
        data[position] ^= 1


def test_range_verification_and_digest() -> None:
    data = os.urandom(4 * checksum.BLOCK_SIZE)
    sums = checksum.block_checksums(data)
    tail = data[2 * checksum.BLOCK_SIZE :]
    assert checksum.verify_blocks(tail, sums, first_block=2) is None
    assert checksum.verify_blocks(tail, sums, first_block=1) == 1
    assert checksum.digest(sums) != checksum.digest(checksum.block_checksums(data[:-1]))


def test_empty_chunk() -> None:
    assert checksum.block_checksums(b"") == b""
    assert checksum.verify_blocks(b"", b"") is None
    assert checksum.block_count(0) == 0
