"""Which tracker to call, when the `tracker` setting lists several (one active, the others
standing by on the same PostgreSQL database: cluster/tracker/leader.py).

Clients (and so the CLI and the mount) and the keepers' heartbeats keep one `Trackers` and
call `current`. A standby answers NotActive, naming the active tracker when it knows it: the
caller goes there (`follow`). A tracker that cannot be reached, or a NotActive without a name,
sends the caller to the next one of the list (`next`). With one tracker listed both keep it.

Both take the address the caller asked, and move only if that is still `current`: a client's
parallel transfers all fail on a dead tracker at once, and if each stepped on from wherever
another had already moved `current`, an even number of them would step it back to the dead
one, again and again, in lockstep, until the retry window ran out.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from cluster import messages as m
from cluster.config import addr_list
from cluster.errors import DfsError, NotActive
from cluster.rpc import ConnectionPool

log = logging.getLogger(__name__)


class Trackers:
    def __init__(self, spec: str) -> None:
        self.addrs = addr_list(spec) or [spec]
        self.current = self.addrs[0]

    def __str__(self) -> str:
        return ",".join(self.addrs)

    def follow(self, asked: str, exc: NotActive) -> str:
        """Go where the answer of standby `asked` points (a tracker outside the list too: the
        active one knows best), or to the next tracker if it names none."""
        if asked != self.current:
            return self.current  # another caller has moved on already
        hint = exc.hint
        if hint and hint != self.current:
            log.info("tracker %s is standing by; following it to %s", self.current, hint)
            self.current = hint
            return hint
        return self.next(asked)

    def next(self, failed: str) -> str:
        """The tracker after `failed` in the list (the first if it is not listed), unless
        another caller has moved on from `failed` already."""
        if failed != self.current:
            return self.current
        try:
            at = self.addrs.index(self.current)
        except ValueError:
            at = -1
        self.current = self.addrs[(at + 1) % len(self.addrs)]
        return self.current


async def roles(
    pool: ConnectionPool, addrs: list[str], timeout_s: float = 3.0
) -> list[dict[str, Any]]:
    """Ask every tracker of `addrs` (at once) for its role: one map each, in list order, with
    `addr`, `role` (active, standby or unreachable) and `leader` (the lease as it sees it)."""
    found: list[dict[str, Any]] = [
        {"addr": addr, "role": "unreachable", "leader": {}} for addr in addrs
    ]

    async def ask(entry: dict[str, Any]) -> None:
        with trio.move_on_after(timeout_s):
            try:
                reply, _ = await pool.call(entry["addr"], m.TrackerRole(), m.TrackerRoleReply)
            except DfsError as exc:
                entry["error"] = exc.message
                return
            entry["role"] = reply.role
            entry["leader"] = reply.leader

    async with trio.open_nursery() as nursery:
        for entry in found:
            nursery.start_soon(ask, entry)
    return found
