"""The tracker lease on a real PostgreSQL (cluster/tracker/leader.py): one holder at a time,
taken over only after expiry, and a deposed holder's transactions fenced off."""

from __future__ import annotations

import psycopg
import pytest

from cluster.errors import NotActive
from cluster.tracker.leader import Lease
from cluster.tracker.pgstore import PostgresStore


def _tracker(uri: str, addr: str) -> tuple[PostgresStore, Lease, list[str]]:
    store = PostgresStore(uri, start=False)
    lease = Lease(store, lease_s=30)
    lease.addr = addr
    store.fence = -1
    fenced: list[str] = []
    store.on_fenced = lambda: fenced.append(addr)
    return store, lease, fenced


def _expire(uri: str) -> None:
    """What a SIGSTOP past the lease comes to: the row's expiry passes."""
    with psycopg.connect(uri, autocommit=True) as db:
        db.execute("UPDATE leader SET expires = now() - interval '1 second'")


def test_one_holder_and_a_fenced_deposed_one(pg_uri: str) -> None:
    a_store, a, a_fenced = _tracker(pg_uri, "127.0.0.1:1")
    b_store, b, _ = _tracker(pg_uri, "127.0.0.1:2")
    try:
        assert a.try_acquire()
        a_store.fence = a.epoch
        a_store.start()
        assert not b.try_acquire()  # live, and not at B's address
        assert b.not_active().hint == "127.0.0.1:1"
        with pytest.raises(NotActive), b_store.transaction():  # a standby commits nothing
            b_store.set_draining("standby", True)
        assert a.renew()

        _expire(pg_uri)
        assert b.try_acquire()
        assert b.epoch == 2
        b_store.fence = b.epoch
        b_store.start()
        assert not a.renew()  # A learns it at its next renewal ...
        # ... or at its next transaction, whichever comes first.
        with pytest.raises(NotActive) as caught, a_store.transaction():
            a_store.set_draining("deposed", True)
        assert caught.value.hint == "127.0.0.1:2"
        assert a_fenced == ["127.0.0.1:1"]
        assert b_store.draining() == set()  # neither change was made
    finally:
        for store in (a_store, b_store):
            store.close()


def test_a_tracker_back_on_its_own_address_takes_over_at_once(pg_uri: str) -> None:
    first, lease, _ = _tracker(pg_uri, "127.0.0.1:7")
    assert lease.try_acquire()
    first.close()  # gone without releasing (as after SIGKILL): the lease is still live
    again, lease2, _ = _tracker(pg_uri, "127.0.0.1:7")
    try:
        assert lease2.try_acquire()
        assert lease2.epoch == 2
    finally:
        again.close()
