"""Where new chunk copies go.

Copies go to distinct live keepers with room for a chunk, least used first, and spread over as
many zones as exist before two copies share a zone. A full keeper gets nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

from cluster.tracker.keepers import KeeperState


def choose(candidates: Sequence[KeeperState], copies: int, chunk_bytes: int) -> list[KeeperState]:
    roomy = [k for k in candidates if k.free_bytes >= chunk_bytes]
    roomy.sort(key=lambda k: ((k.used_bytes + k.reserved_bytes) / max(1, k.capacity_bytes), k.addr))
    all_zones = {k.zone for k in roomy}
    chosen: list[KeeperState] = []
    zones_used: set[str] = set()
    while len(chosen) < copies and roomy:
        pick = next((k for k in roomy if k.zone not in zones_used), roomy[0])
        chosen.append(pick)
        zones_used.add(pick.zone)
        roomy.remove(pick)
        if zones_used >= all_zones:
            zones_used.clear()  # every zone has a copy: start the next round
    return chosen
