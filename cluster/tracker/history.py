"""The tracker's recent history: what the status page draws, in bounded memory.

Every `STEP_S` (5 s) `History.run` takes one sample of the cluster: rates from counters that
only grow (chunk bytes the keepers report in their heartbeats, requests counted by
`Tracker.handle`, bytes re-replicated by the healer) and gauges read as they are (free space,
chunks held, chunk health, the repair queue, client connections). A sample goes into the
*hour* ring (720 points of 5 s); the samples of each wall-clock minute are averaged into the
*day* ring (1,440 points of 1 min). Long-term history is Prometheus's job (`--metrics`).

Memory is bounded and allocated up front: a ring is an `array` per series (float32 values,
NaN where a series has no value, e.g. a keeper that was dead) plus one of float64 times. There
is a series per cluster figure and four per keeper; a keeper's series are dropped once the
ring holds no value of it (checked once a lap: gone for one or two spans). `memory_bytes`
reports what the arrays take.

Rates: a counter's increase over the time since the previous sample. A keeper's counters
start at zero when it starts: a value below the previous one is a restart, and the new value
is the whole increase. A keeper seen for the first time gives its rates from the next sample.

Everything here runs on the tracker's trio thread, between requests: no locks.
"""

from __future__ import annotations

import math
import time
from array import array
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import trio

from cluster import messages as m

if TYPE_CHECKING:
    from cluster.tracker.server import Tracker

STEP_S = 5.0
HOUR_POINTS = 720  # 1 h of 5 s steps
DAY_STEP_S = 60.0
DAY_POINTS = 1440  # 1 day of 1 min steps
MB = 1e6

# Metadata requests by kind, as the status page shows them.
OP_KINDS: dict[type[m.Message], str] = {
    m.MakeNode: "create",
    m.Symlink: "create",
    m.Lookup: "lookup",
    m.ResolvePath: "lookup",
    m.Unlink: "unlink",
    m.RemoveDir: "unlink",
    m.CommitChunks: "commit",
}
KINDS = ("create", "lookup", "unlink", "commit")

# Series of the whole cluster and of each keeper; the page and /api/history use these names.
CLUSTER_SERIES = (
    "read_mb_s",  # chunk bytes all keepers sent (reads and copies served), MB/s
    "write_mb_s",  # chunk bytes all keepers stored (every copy counts), MB/s
    *(f"{kind}_per_s" for kind in KINDS),
    "under_goal",  # chunks with fewer live copies than their goal (and at least one)
    "lost",  # chunks without a live copy
    "repair_mb_s",  # bytes re-replicated by the healer, MB/s
    "repair_queue",  # copies ordered and not yet arrived
    "clients",  # client connections open to the tracker (a mount may hold several)
)
KEEPER_SERIES = ("read_mb_s", "write_mb_s", "free_bytes", "chunks")

Key = tuple[str, str]  # (keeper address, or "" for the cluster; series name)


class Ring:
    """The last `size` points of every series, one time per point."""

    def __init__(self, step_s: float, size: int) -> None:
        self.step_s = step_s
        self.size = size
        self.times = array("d", [math.nan]) * size
        self.series: dict[Key, array[float]] = {}
        self.next = 0  # where the next point goes
        self.count = 0  # points held (at most size)

    def append(self, t: float, values: dict[Key, float]) -> None:
        # float32 holds up to 3.4e38; anything past that (only a bogus report) is infinite.
        values = {k: v if abs(v) < 3e38 else math.copysign(math.inf, v) for k, v in values.items()}
        i = self.next
        self.times[i] = t
        for key, column in self.series.items():
            column[i] = values.get(key, math.nan)
        for key, value in values.items():
            if key not in self.series:
                column = array("f", [math.nan]) * self.size
                column[i] = value
                self.series[key] = column
        self.next = (i + 1) % self.size
        self.count = min(self.count + 1, self.size)
        if self.next == 0:  # once per lap: forget series with no value left in the ring
            for key in [k for k, col in self.series.items() if all(map(math.isnan, col))]:
                del self.series[key]

    def order(self) -> Iterator[int]:
        """Indices of the points held, oldest first."""
        start = (self.next - self.count) % self.size
        return ((start + j) % self.size for j in range(self.count))

    def document(self) -> dict[str, Any]:
        """The JSON form: times and every series, oldest first, null where there is none."""
        order = list(self.order())

        def column(values: array[float]) -> list[float | None]:
            return [round(v, 3) if math.isfinite(v := values[i]) else None for i in order]

        cluster: dict[str, list[float | None]] = {}
        keepers: dict[str, dict[str, list[float | None]]] = {}
        for (group, name), values in sorted(self.series.items()):
            if group:
                keepers.setdefault(group, {})[name] = column(values)
            else:
                cluster[name] = column(values)
        return {
            "step_s": self.step_s,
            "points": self.size,
            "t": [round(self.times[i], 3) for i in order],
            "cluster": cluster,
            "keepers": keepers,
        }

    def memory_bytes(self) -> int:
        arrays = [self.times, *self.series.values()]
        return sum(a.buffer_info()[1] * a.itemsize for a in arrays)


class History:
    def __init__(self) -> None:
        self.hour = Ring(STEP_S, HOUR_POINTS)
        self.day = Ring(DAY_STEP_S, DAY_POINTS)
        self.ops = dict.fromkeys(KINDS, 0)  # requests answered since the start, by kind
        # What the previous sample read from counters, to take rates from.
        self._last_t = math.nan
        self._last_ops = dict(self.ops)
        self._last_copied = 0
        self._last_keeper: dict[str, tuple[int, int]] = {}  # keeper id -> (read, written)
        # The minute being averaged into the day ring: its start, sums and counts per series.
        self._minute = math.nan
        self._sums: dict[Key, float] = {}
        self._counts: dict[Key, int] = {}

    def count(self, msg_type: type[m.Message]) -> None:
        """One request of this type arrived (called by `Tracker.handle` for every request)."""
        kind = OP_KINDS.get(msg_type)
        if kind is not None:
            self.ops[kind] += 1

    async def run(self, tracker: Tracker) -> None:
        while True:
            self.sample(tracker, time.time())
            await trio.sleep(STEP_S)

    def sample(self, tracker: Tracker, now: float) -> dict[Key, float]:
        """Take one sample at wall-clock time `now` and record it; returns it."""
        dt = now - self._last_t  # NaN at the first sample: no rates yet
        values: dict[Key, float] = {}

        def rate(increase: float, unit: float = 1.0) -> float:
            return increase / dt / unit if dt > 0 else math.nan

        for kind in KINDS:
            values[("", f"{kind}_per_s")] = rate(self.ops[kind] - self._last_ops[kind])
        self._last_ops = dict(self.ops)
        read = write = 0.0
        rated = False
        seen: dict[str, tuple[int, int]] = {}
        for keeper in tracker.registry.live():
            addr = keeper.addr
            values[(addr, "free_bytes")] = float(keeper.free_bytes)
            values[(addr, "chunks")] = float(
                len(tracker.registry.chunks.by_keeper.get(keeper.keeper_id, ()))
            )
            now_counts = seen[keeper.keeper_id] = (keeper.read_bytes, keeper.written_bytes)
            before = self._last_keeper.get(keeper.keeper_id)
            if before is None:
                continue
            # A counter that went down is a keeper that restarted: it counts from zero.
            increase = [
                n - b if n >= b else max(n, 0) for n, b in zip(now_counts, before, strict=True)
            ]
            keeper_read, keeper_write = rate(increase[0], MB), rate(increase[1], MB)
            values[(addr, "read_mb_s")] = keeper_read
            values[(addr, "write_mb_s")] = keeper_write
            if not math.isnan(keeper_read):
                read += keeper_read
                write += keeper_write
                rated = True
        self._last_keeper = seen
        values[("", "read_mb_s")] = read if rated or dt > 0 else math.nan
        values[("", "write_mb_s")] = write if rated or dt > 0 else math.nan
        health = tracker.healer.health
        values[("", "under_goal")] = float(health.degraded)
        values[("", "lost")] = float(health.lost)
        values[("", "repair_mb_s")] = rate(health.bytes_copied - self._last_copied, MB)
        self._last_copied = health.bytes_copied
        values[("", "repair_queue")] = float(len(tracker.healer.in_flight))
        connected = tracker.server.connected
        values[("", "clients")] = float(sum(n for role, n in connected.items() if role != "keeper"))
        self._last_t = now
        values = {key: value for key, value in values.items() if not math.isnan(value)}
        self.record(now, values)
        return values

    def record(self, now: float, values: dict[Key, float]) -> None:
        """Put one sample in the hour ring, and into the average of its minute."""
        self.hour.append(now, values)
        minute = now // DAY_STEP_S * DAY_STEP_S
        if minute != self._minute:
            self.flush_minute()
            self._minute = minute
        for key, value in values.items():
            self._sums[key] = self._sums.get(key, 0.0) + value
            self._counts[key] = self._counts.get(key, 0) + 1

    def flush_minute(self) -> None:
        """Close the minute being averaged: one point of the day ring."""
        if self._counts:
            means = {key: self._sums[key] / n for key, n in self._counts.items()}
            self.day.append(self._minute, means)
        self._sums.clear()
        self._counts.clear()

    def document(self, span: str | None = None) -> dict[str, Any]:
        """/api/history: the hour ring, the day ring (the minute in progress not yet in it),
        and what they take in memory; `span` picks one ("hour" or "day")."""
        doc: dict[str, Any] = {"now": round(time.time(), 3), "memory_bytes": self.memory_bytes()}
        if span in (None, "hour"):
            doc["hour"] = self.hour.document()
        if span in (None, "day"):
            doc["day"] = self.day.document()
        return doc

    def memory_bytes(self) -> int:
        return self.hour.memory_bytes() + self.day.memory_bytes()
