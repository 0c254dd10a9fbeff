"""The mount's write buffers without FUSE or a cluster: extents, base merging, overlay reads,
and the dirty budget's backpressure."""

from __future__ import annotations

import random

import trio

from dfsmount.buffers import ChunkBuffer, DirtyBudget
from dfsmount.readahead import device_of

CHUNK = 4096


def test_extents_merge_and_cover() -> None:
    buf = ChunkBuffer(0)
    buf.write(10, b"a" * 10)
    buf.write(30, b"b" * 10)
    assert buf.extents == [(10, 20), (30, 40)]
    assert buf.covers(12, 18)
    assert buf.covers(30, 40)
    assert not buf.covers(15, 35)
    buf.write(20, b"c" * 10)  # adjacent on both sides: one extent
    assert buf.extents == [(10, 40)]
    buf.write(0, b"d" * 5)
    buf.write(2, b"e" * 50)  # swallows everything
    assert buf.extents == [(0, 52)]
    assert bytes(buf.data[:5]) == b"ddeee"
    assert buf.covers(0, 52)
    assert not buf.covers(0, 53)
    assert buf.covers(7, 7)  # empty range


def test_write_past_the_end_leaves_zeros_in_the_gap() -> None:
    buf = ChunkBuffer(3)
    buf.write(100, b"xyz")
    assert len(buf.data) == 103
    assert bytes(buf.data[:100]) == bytes(100)
    assert buf.extents == [(100, 103)]
    assert buf.growth(90, 20) == 7
    assert buf.growth(0, 10) == 0


def test_full_chunk() -> None:
    buf = ChunkBuffer(0)
    buf.write(0, bytes(CHUNK // 2))
    assert not buf.is_full(CHUNK)
    buf.write(CHUNK // 2, bytes(CHUNK // 2))
    assert buf.is_full(CHUNK)


def test_random_writes_against_a_model() -> None:
    """Writes over a base chunk: overlay reads before the merge and the merged upload both
    equal a plain bytearray patched the same way."""
    rng = random.Random(1)
    for _ in range(200):
        base = rng.randbytes(rng.randrange(CHUNK + 1))
        model = bytearray(base)
        buf = ChunkBuffer(0)
        for _ in range(rng.randrange(1, 12)):
            start = rng.randrange(CHUNK)
            data = rng.randbytes(rng.randrange(1, CHUNK - start + 1))
            buf.write(start, data)
            if start > len(model):
                model.extend(bytes(start - len(model)))
            model[start : start + len(data)] = data
            # Reads of any range: base bytes (zeros past it) with the writes laid over.
            a = rng.randrange(CHUNK)
            b = rng.randrange(a, CHUNK + 1)
            out = bytearray(base[a:b].ljust(b - a, b"\0"))
            buf.overlay(out, a)
            assert out == model[a:b].ljust(b - a, b"\0")
            if buf.covers(a, b):
                assert buf.read(a, b) == bytes(model[a:b].ljust(b - a, b"\0"))
        buf.merge_base(base)
        assert buf.data == model
        assert buf.extents == ([(0, len(model))] if model else [])


async def test_budget_backpressure() -> None:
    budget = DirtyBudget(100)
    assert budget.try_acquire(60)
    assert budget.try_acquire(40)
    assert not budget.try_acquire(1)
    woke = []

    async def writer() -> None:
        while not budget.try_acquire(30):
            await budget.wait()
        woke.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer)
        await trio.sleep(0.01)
        assert not woke
        budget.release(20)  # not enough yet
        await trio.sleep(0.01)
        assert not woke
        budget.release(40)
    assert woke
    assert budget.used == 70


def test_budget_lets_an_oversized_write_through_when_empty() -> None:
    budget = DirtyBudget(10)
    assert budget.try_acquire(1000)
    assert not budget.try_acquire(1)
    budget.release(1000)
    assert budget.used == 0


def test_the_mount_device_is_read_from_mountinfo() -> None:
    mountinfo = (
        "22 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
        "61 22 0:52 / /mnt/with\\040space rw,nosuid - fuse.dfs dfs rw,user_id=0\n"
        "62 22 0:53 / /mnt/x rw - fuse.dfs dfs rw\n"
        "63 62 0:54 / /mnt/x rw - fuse.dfs dfs rw\n"
    )
    assert device_of("/mnt/with space", mountinfo) == "0:52"
    assert device_of("/mnt/x", mountinfo) == "0:54"  # the newest mount over that path
    assert device_of("/mnt/none", mountinfo) is None
