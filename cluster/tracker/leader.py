"""Which tracker is active, when several share one PostgreSQL database: a lease in the database.

The lease is the one row of `leader` (schema version 2 in pgstore.py): the holder's id, an
epoch, the expiry and the active tracker's HOST:PORT. Every time is the database's (`now()`),
so no tracker's clock matters, and there is no election of our own: the database's row lock
decides.

- The active tracker renews the row every RENEW_S (`expires = now() + lease_s`, only while the
  epoch is still its own).
- A standby reads the row every RENEW_S and takes over once `expires` has passed, with one
  `UPDATE ... WHERE epoch = <the epoch it read>` that also bumps the epoch: of two standbys
  that try at once, the second finds the epoch moved and updates nothing. A tracker that
  starts on the address the row names takes over at once: it holds that port now, so the
  tracker that wrote the row (on this host) is gone, as after a restart under systemd.
- Fencing: every transaction of the active tracker begins by reading the epoch `FOR SHARE`
  (PostgresStore.transaction) and fails with NotActive if it moved. The share lock makes a
  takeover wait for a transaction that passed the check, so nothing a deposed tracker does
  commits after the new one took over. A tracker fenced off steps down to standby.
"""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cluster.errors import NotActive

if TYPE_CHECKING:
    from cluster.tracker.pgstore import PostgresStore

log = logging.getLogger(__name__)

# How often the active tracker renews its lease and a standby looks at it.
RENEW_S = 1.0


@dataclass
class LeaderRow:
    holder: str = ""
    epoch: int = 0
    addr: str = ""
    expires_in_s: float = 0.0  # by the database's clock; <= 0: expired

    @property
    def live(self) -> bool:
        return bool(self.holder) and self.expires_in_s > 0

    def as_dict(self) -> dict[str, object]:
        return {
            "holder": self.holder,
            "epoch": self.epoch,
            "addr": self.addr,
            "expires_in_s": round(self.expires_in_s, 2),
        }


def _wildcard(addr: str) -> bool:
    host = addr.rpartition(":")[0].strip("[]")
    return host in ("", "0.0.0.0", "::")


class Lease:
    def __init__(self, store: PostgresStore, lease_s: float) -> None:
        self.store = store
        self.lease_s = lease_s
        self.addr = ""  # ours, advertised in the row; set once the tracker listens
        self.holder = f"{os.uname().nodename}/{os.getpid()}/{uuid.uuid4().hex[:8]}"
        self.epoch: int | None = None  # ours while we hold the lease
        self.row = LeaderRow()  # as last read

    def read(self) -> LeaderRow:
        row = self.store._exec(
            "SELECT holder, epoch, addr, EXTRACT(EPOCH FROM expires - now())"
            " FROM leader WHERE id = 1"
        ).fetchone()
        assert row is not None
        self.row = LeaderRow(str(row[0]), int(row[1]), str(row[2]), float(row[3]))
        return self.row

    def try_acquire(self) -> bool:
        """Take the lease if it expired (or names our own address); True if we hold it now."""
        row = self.read()
        # Our own address in a live row means our previous life, gone since we hold its port;
        # not so for a wildcard (0.0.0.0:9420 on two hosts), which must wait out the expiry.
        mine = self.addr if not _wildcard(self.addr) else "\0"
        if row.live and row.addr != mine:
            return False
        won = self.store._exec(
            "UPDATE leader SET holder = ?, epoch = epoch + 1, addr = ?,"
            " expires = now() + make_interval(secs => ?)"
            " WHERE id = 1 AND epoch = ? AND (expires <= now() OR addr = ?)"
            " RETURNING epoch",
            (self.holder, self.addr, self.lease_s, row.epoch, mine),
        ).fetchone()
        if won is None:
            return False
        self.epoch = int(won[0])
        self.row = LeaderRow(self.holder, self.epoch, self.addr, self.lease_s)
        log.info(
            "took the lease: active at %s (epoch %d, previous holder %s)",
            self.addr,
            self.epoch,
            row.holder or "none",
        )
        return True

    def renew(self) -> bool:
        """Move the expiry on; False if another tracker holds the lease now."""
        if self.epoch is None:
            return False
        done = self.store._exec(
            "UPDATE leader SET expires = now() + make_interval(secs => ?)"
            " WHERE id = 1 AND epoch = ? RETURNING epoch",
            (self.lease_s, self.epoch),
        ).fetchone()
        if done is None:
            self.read()
            return False
        self.row.expires_in_s = self.lease_s
        return True

    def release(self) -> None:
        """At a clean stop: let a standby take over at once rather than after the expiry."""
        if self.epoch is not None:
            self.store._exec(
                "UPDATE leader SET expires = now() WHERE id = 1 AND epoch = ?", (self.epoch,)
            )
            self.epoch = None

    def not_active(self) -> NotActive:
        """What a standby answers: where the active tracker is, if the row says so."""
        row = self.row
        return NotActive.pointing_to(row.addr if row.live and row.addr != self.addr else "")
