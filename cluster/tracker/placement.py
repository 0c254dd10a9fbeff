"""Where new chunk copies go.

Copies go to distinct live keepers with room for a chunk, least used first, and spread over as
many zones as exist before two copies share a zone. A full keeper gets nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

from cluster.tracker.keepers import KeeperState


def choose(candidates: Sequence[KeeperState], copies: int, chunk_bytes: int) -> list[KeeperState]:
    """Keepers for a new chunk."""
    return choose_more([], candidates, copies, chunk_bytes)


def choose_more(
    present: Sequence[KeeperState], candidates: Sequence[KeeperState], copies: int, chunk_bytes: int
) -> list[KeeperState]:
    """`copies` more keepers for a chunk already on `present`, spreading zones the same way."""
    roomy = [k for k in candidates if k.free_bytes >= chunk_bytes]
    roomy.sort(key=lambda k: ((k.used_bytes + k.reserved_bytes) / max(1, k.capacity_bytes), k.addr))
    all_zones = {k.zone for k in roomy} | {k.zone for k in present}
    counts = dict.fromkeys(all_zones, 0)
    for k in present:
        counts[k.zone] += 1
    chosen: list[KeeperState] = []
    while len(chosen) < copies and roomy:
        fewest = min(counts[k.zone] for k in roomy)
        pick = next(k for k in roomy if counts[k.zone] == fewest)
        chosen.append(pick)
        counts[pick.zone] += 1
        roomy.remove(pick)
    return chosen
