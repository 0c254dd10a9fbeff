from __future__ import annotations

from cluster.tracker.keepers import KeeperState
from cluster.tracker.placement import choose

GiB = 1 << 30


def keeper(addr: str, used: int, zone: str = "", capacity: int = 100 * GiB) -> KeeperState:
    return KeeperState(addr, addr, zone, capacity, used, 0.0)


def test_least_used_first_and_distinct() -> None:
    keepers = [keeper("a", 50 * GiB), keeper("b", 10 * GiB), keeper("c", 30 * GiB), keeper("d", 0)]
    chosen = choose(keepers, 3, 1 << 20)
    assert [k.addr for k in chosen] == ["d", "b", "c"]


def test_full_keepers_get_nothing() -> None:
    keepers = [keeper("a", 100 * GiB), keeper("b", 0, capacity=1 << 20), keeper("c", 0)]
    assert [k.addr for k in choose(keepers, 3, 8 << 20)] == ["c"]
    assert choose([keeper("a", 100 * GiB)], 1, 1) == []


def test_zones_are_spread_before_doubling_up() -> None:
    keepers = [
        keeper("a1", 0, "a"),
        keeper("a2", 0, "a"),
        keeper("b1", 5, "b"),
        keeper("c1", 9, "c"),
    ]
    chosen = choose(keepers, 3, 1)
    assert sorted(k.zone for k in chosen) == ["a", "b", "c"]
    chosen = choose(keepers, 4, 1)
    assert sorted(k.zone for k in chosen) == ["a", "a", "b", "c"]


def test_reserved_bytes_steer_a_burst() -> None:
    a, b = keeper("a", 0), keeper("b", 1)
    first = choose([a, b], 1, 8 << 20)[0]
    first.reserved_bytes += 8 << 20
    second = choose([a, b], 1, 8 << 20)[0]
    assert {first.addr, second.addr} == {"a", "b"}
