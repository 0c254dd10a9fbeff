"""Write buffers: one chunk's unflushed bytes, and the mount-wide bound on them.

A `ChunkBuffer` holds the bytes written to one chunk since it was last uploaded, plus the list
of byte ranges (`extents`) that were actually written. Bytes between extents are zeros *in the
buffer*, but they stand for whatever the committed chunk (the "base") holds there, so a buffer
whose extents do not cover the base must be merged with it before it is uploaded
(`merge_base`) and reads of its gaps must consult the base (`overlay`). That way a small write
into the middle of a large chunk never waits for the chunk to be fetched; only the upload does.

`DirtyBudget` counts the bytes held by buffers (including those being uploaded) against
`dirty_mb`. Writers that would go over it wait until uploads give memory back: backpressure
instead of unbounded growth. Neither class awaits anything except `DirtyBudget.wait`, so their
methods are atomic with respect to other trio tasks.
"""

from __future__ import annotations

import bisect

import trio


class ChunkBuffer:
    """Unflushed bytes of chunk `index` of one file; offsets are relative to the chunk."""

    __slots__ = ("accounted", "data", "extents", "index")

    def __init__(self, index: int) -> None:
        self.index = index
        self.data = bytearray()
        # Sorted, disjoint, non-adjacent [start, end) ranges written since the last upload.
        self.extents: list[tuple[int, int]] = []
        # Bytes charged to the DirtyBudget for this buffer (released when it is dropped).
        self.accounted = 0

    def growth(self, start: int, length: int) -> int:
        """How many bytes `write(start, ...)` of `length` bytes would add to `data`."""
        return max(0, start + length - len(self.data))

    def write(self, start: int, buf: bytes | bytearray | memoryview) -> None:
        end = start + len(buf)
        if start > len(self.data):
            # Slice assignment past the end would append at len(data), not at start.
            self.data.extend(bytes(start - len(self.data)))
        self.data[start:end] = buf
        self._add_extent(start, end)

    def _add_extent(self, start: int, end: int) -> None:
        extents = self.extents
        # First extent that ends at or after `start` (adjacent ones merge too).
        i = bisect.bisect_left(extents, start, key=lambda e: e[1])
        j = i
        while j < len(extents) and extents[j][0] <= end:
            start = min(start, extents[j][0])
            end = max(end, extents[j][1])
            j += 1
        extents[i:j] = [(start, end)]

    def covers(self, start: int, end: int) -> bool:
        """True if every byte of [start, end) was written into this buffer."""
        if start >= end:
            return True
        i = bisect.bisect_right(self.extents, start, key=lambda e: e[0]) - 1
        return i >= 0 and self.extents[i][1] >= end

    def is_full(self, chunk_size: int) -> bool:
        return self.extents == [(0, chunk_size)]

    def merge_base(self, base: bytes | bytearray | memoryview) -> None:
        """Fill every unwritten byte below len(base) from the committed chunk `base`.

        Afterwards the buffer is the whole new chunk version: `extents` covers all of `data`.
        """
        view = memoryview(base)
        if len(view) > len(self.data):
            self.data.extend(bytes(len(view) - len(self.data)))
        cursor = 0
        for start, end in self.extents:
            if start > cursor:
                stop = min(start, len(view))
                if stop > cursor:
                    self.data[cursor:stop] = view[cursor:stop]
            cursor = max(cursor, end)
        if cursor < len(view):
            self.data[cursor : len(view)] = view[cursor:]
        self.extents = [(0, len(self.data))] if self.data else []

    def overlay(self, out: bytearray, start: int) -> None:
        """Copy the written bytes that fall in [start, start+len(out)) over `out`."""
        end = start + len(out)
        for e_start, e_end in self.extents:
            if e_end <= start:
                continue
            if e_start >= end:
                break
            a, b = max(start, e_start), min(end, e_end)
            out[a - start : b - start] = self.data[a:b]

    def read(self, start: int, end: int) -> bytes:
        """Bytes [start, end) of the buffer itself, zeros past its data (caller checked that
        the range needs no base)."""
        data = bytes(self.data[start:end])
        if len(data) < end - start:
            data += bytes(end - start - len(data))
        return data


class DirtyBudget:
    """Bytes held by write buffers, bounded by `limit`: writers wait while it is exhausted.

    One acquisition may always go through when nothing at all is held, so a single write larger
    than the limit cannot deadlock.
    """

    def __init__(self, limit: int) -> None:
        self.limit = max(1, limit)
        self.used = 0
        self._changed = trio.Event()

    def try_acquire(self, amount: int) -> bool:
        if self.used + amount <= self.limit or self.used == 0:
            self.used += amount
            return True
        return False

    def charge(self, amount: int) -> None:
        """Account `amount` without waiting (for an upload that must not block on itself)."""
        self.used += amount

    def release(self, amount: int) -> None:
        self.used -= amount
        if self.used < 0:  # a bookkeeping bug must not wedge every writer forever
            self.used = 0
        self._changed.set()
        self._changed = trio.Event()

    async def wait(self) -> None:
        """Until some bytes are released."""
        await self._changed.wait()
