"""A mount partitioned longer than its session lease loses its locks; a shorter partition
keeps them.

Two client hosts, each with a mount of the same cluster, and the tracker and keepers on
hosts of their own. A lock held through mount A must not block the cluster forever when A's
host is cut off (the tracker cannot tell a cut-off mount from a dead one, so it frees the lock
once A's lease runs out), and A must learn of it when it comes back rather than go on
believing it holds the lock. A partition shorter than the lease is a hiccup, not a loss: A's
lock holds through it and after it. tests/mount/test_locks.py has the same on one host, where
only a killed mount can fall silent; here the mount lives on, cut off.

The lock holders are processes of the test's own network namespace working on the mount
paths (the mounts run under `nsenter --net` only, so their paths are seen here).
"""

from __future__ import annotations

import errno
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.cluster_procs import wait_until
from tests.mount.test_locks import Holder
from tests.netcluster import NetCluster, NetMount, net_cluster
from tests.netlab import Node

pytestmark = pytest.mark.mount

NAME = "shared"
DATA = b"x" * 4096
LOST = "locks were released"  # dfsmount/locks.py, when the tracker says LocksLost
EXPIRED = "silent for"  # the tracker, when a session's lease runs out with locks held
# A's renewal sent during the partition reaches the tracker on a TCP retransmission after
# the heal (backoff of seconds); this only bounds it to catch a hang.
TOLD_TIMEOUT_S = 30.0


@dataclass
class TwoHosts:
    cluster: NetCluster
    a_host: Node
    a: NetMount
    b: NetMount
    holders: list[Holder] = field(default_factory=list)

    def hold(self, mount: NetMount, *, wait: bool = False) -> Holder:
        """A process that takes an exclusive fcntl lock on the whole shared file."""
        holder = Holder(mount.path / NAME, "fcntl", "ex", 0, 0, wait=wait)
        self.holders.append(holder)
        return holder


@contextmanager
def two_hosts(root: Path, lease_s: float) -> Iterator[TwoHosts]:
    """Tracker and two keepers, and mounts A and B on client hosts of their own, with
    sessions leased for `lease_s`. Ends with A's host healed (a cut-off mount would make a
    holder's last close() wait on it) and every holder killed before the mounts stop."""
    with net_cluster(root, keepers=2, tracker_args=["--lock-lease-s", str(lease_s)]) as cluster:
        a_host, b_host = cluster.lab.node("ca"), cluster.lab.node("cb")
        hosts = TwoHosts(
            cluster, a_host, cluster.mount("a", host=a_host), cluster.mount("b", host=b_host)
        )
        try:
            (hosts.a.path / NAME).write_bytes(DATA)
            yield hosts
        finally:
            try:
                cluster.lab.heal(a_host)
            finally:
                for holder in hosts.holders:
                    holder.kill()


def test_a_mount_partitioned_longer_than_its_lease_loses_its_locks(tmp_path: Path) -> None:
    """Cut off past its lease, A's lock goes to B's waiter; healed, A is told (LocksLost),
    forgets the lock, refuses writes under it (EIO), and works on: it reads, writes other
    files and locks again."""
    lease_s = 3.0
    with two_hosts(tmp_path, lease_s) as hosts:
        lab, a, b = hosts.cluster.lab, hosts.a, hosts.b
        assert hosts.hold(a).answer() == "locked"
        assert hosts.hold(b).answer() == f"error {errno.EAGAIN}"

        lab.partition(hosts.a_host)
        cut = time.monotonic()
        waiter = hosts.hold(b, wait=True)
        assert waiter.answer() == "locked"
        granted_s = time.monotonic() - cut
        print(f"B's wait granted {granted_s:.1f} s into A's partition (lease {lease_s} s)")
        # A renews every third of the lease: the lock outlives at least two thirds of it.
        assert granted_s >= lease_s * 2 / 3 - 0.2, "A's lock went before its lease ran out"
        assert EXPIRED in hosts.cluster.trackers[0].logs()
        assert LOST not in a.log.read_text(errors="replace")  # cut off: nobody told A yet

        lab.heal(hosts.a_host)
        healed = time.monotonic()
        wait_until(lambda: LOST in a.log.read_text(errors="replace"), TOLD_TIMEOUT_S,
                   "A's mount to be told its locks were released")  # fmt: skip
        print(f"A told its locks were lost {time.monotonic() - healed:.1f} s after the heal")

        # A's holder, still believing it holds the lock, cannot write under it.
        hosts.holders[0].write(0, "stale")
        assert hosts.holders[0].answer() == f"error {errno.EIO}"

        # A works on: reads, writes that B sees, and locks again once B lets go.
        assert (a.path / NAME).read_bytes() == DATA
        (a.path / "after").write_bytes(b"back")
        assert (b.path / "after").read_bytes() == b"back"
        hosts.holders[0].kill()  # A's first holder: its close() finds nothing to release
        waiter.release()
        assert hosts.hold(a, wait=True).answer() == "locked"
        assert hosts.hold(b).answer() == f"error {errno.EAGAIN}"


def test_a_partition_shorter_than_the_lease_keeps_the_lock(tmp_path: Path) -> None:
    """Cut off for a fraction of its lease, A keeps its lock through the partition and,
    renewing again once healed, for longer than a whole lease after it."""
    lease_s, cut_s = 6.0, 1.0
    with two_hosts(tmp_path, lease_s) as hosts:
        lab, a, b = hosts.cluster.lab, hosts.a, hosts.b
        assert hosts.hold(a).answer() == "locked"

        lab.partition(hosts.a_host)
        cut = time.monotonic()
        assert hosts.hold(b).answer() == f"error {errno.EAGAIN}"
        time.sleep(max(0.0, cut_s - (time.monotonic() - cut)))
        lab.heal(hosts.a_host)
        assert hosts.hold(b).answer() == f"error {errno.EAGAIN}"

        # A whole lease past the heal: only renewals made after the partition keep it.
        time.sleep(lease_s + 1)
        assert hosts.hold(b).answer() == f"error {errno.EAGAIN}"
        assert LOST not in a.log.read_text(errors="replace")
        assert EXPIRED not in hosts.cluster.trackers[0].logs()
