"""The tracker's history rings: a day of samples fits in memory fixed at the start, the day
ring averages each minute, a gone keeper's series leave once the ring holds none of them."""

from __future__ import annotations

import math
import tracemalloc

from cluster.tracker.history import DAY_POINTS, HOUR_POINTS, STEP_S, History, Key


def sample(n: int, keepers: list[str]) -> dict[Key, float]:
    values: dict[Key, float] = {("", "write_mb_s"): float(n % 12), ("", "clients"): 2.0}
    for addr in keepers:
        values[(addr, "chunks")] = float(n)
        values[(addr, "free_bytes")] = 1e12 - n
    return values


def test_a_day_of_samples_in_bounded_memory() -> None:
    history = History()
    keepers = ["10.0.0.1:9421", "10.0.0.2:9421", "10.0.0.3:9421"]
    start = 1_699_999_980.0  # on a minute boundary
    steps_per_day = int(86400 / STEP_S)
    tracemalloc.start()
    for n in range(steps_per_day):
        history.record(start + n * STEP_S, sample(n, keepers))
        if n == steps_per_day // 2:
            full = history.memory_bytes()
            held, _ = tracemalloc.get_traced_memory()
    after, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # Once both rings are allocated, a second half day adds nothing.
    assert history.memory_bytes() == full
    assert after - held < 64 << 10
    series = 2 + 2 * len(keepers)
    assert full == (HOUR_POINTS + DAY_POINTS) * 8 + series * (HOUR_POINTS + DAY_POINTS) * 4
    hour = history.document("hour")["hour"]
    assert len(hour["t"]) == HOUR_POINTS
    assert hour["t"][-1] == start + (steps_per_day - 1) * STEP_S
    assert all(b - a == STEP_S for a, b in zip(hour["t"], hour["t"][1:], strict=False))
    day = history.document("day")["day"]
    assert len(day["t"]) == DAY_POINTS - 1  # the last minute is still being averaged
    # Each minute is the mean of its twelve 5 s samples: 0..11 -> 5.5.
    assert set(day["cluster"]["write_mb_s"]) == {5.5}


def test_a_gone_keeper_leaves_after_a_lap() -> None:
    history = History()
    for n in range(10):
        history.record(n * STEP_S, sample(n, ["a:1", "b:1"]))
    doc = history.document("hour")["hour"]
    assert sorted(doc["keepers"]) == ["a:1", "b:1"]
    before = history.hour.memory_bytes()
    for n in range(10, 10 + 2 * HOUR_POINTS):  # pruned at a lap's end with nothing left of it
        history.record(n * STEP_S, sample(n, ["a:1"]))
    doc = history.document("hour")["hour"]
    assert sorted(doc["keepers"]) == ["a:1"]
    assert history.hour.memory_bytes() < before
    # A gap is null, not a made-up value.
    history.record((10 + 2 * HOUR_POINTS) * STEP_S, {("", "clients"): 1.0})
    doc = history.document("hour")["hour"]
    assert doc["keepers"]["a:1"]["chunks"][-1] is None
    assert not any(isinstance(v, float) and math.isnan(v) for v in doc["cluster"]["write_mb_s"])
