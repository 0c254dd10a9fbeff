"""flock and fcntl locks hold across mounts (two mounts stand for two hosts): contention,
blocking waits, F_GETLK, EAGAIN and EDEADLK as on ext4, a dead mount's locks released after
its lease, an interrupted wait, and two SQLite writers on one database through two mounts.

Each lock holder is a process of its own (`Holder`): fcntl locks belong to processes, and a
process that exits drops them through close(), as a real program's would.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import sqlite3
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster_procs import ProcCluster
from tests.conftest import MakeCluster
from tests.mount.conftest import Mount, MountFactory

# A lock holder: takes the lock its arguments name (kind, mode, start, length), prints
# "locked" (or the errno it failed with), then holds it until its stdin closes.
HOLDER = textwrap.dedent(
    """
    import fcntl, os, sys
    path, kind, mode, start, length, block = sys.argv[1:7]
    fd = os.open(path, os.O_RDWR)
    op = {"sh": fcntl.LOCK_SH, "ex": fcntl.LOCK_EX}[mode]
    op |= 0 if block == "wait" else fcntl.LOCK_NB
    try:
        if kind == "flock":
            fcntl.flock(fd, op)
        else:
            fcntl.lockf(fd, op, int(length), int(start))
    except OSError as exc:
        print(f"error {exc.errno}", flush=True)
        sys.exit(1)
    print("locked", flush=True)
    # "lock START LENGTH" takes one more (blocking) range; "write OFFSET TEXT" writes and
    # fsyncs, "put OFFSET TEXT" only writes; each answers "locked" or "wrote", or "error ERRNO".
    for line in sys.stdin:
        command, first, second = line.split()
        try:
            if command == "lock":
                fcntl.lockf(fd, fcntl.LOCK_EX, int(second), int(first))
                print("locked", flush=True)
            else:
                os.pwrite(fd, second.encode(), int(first))
                if command == "write":
                    os.fsync(fd)
                print("wrote", flush=True)
        except OSError as exc:
            print(f"error {exc.errno}", flush=True)
    """
)
WAIT_S = 60.0  # bounds a wait only to catch a hang


class Holder:
    def __init__(self, path: Path, kind: str, mode: str, start: int = 0, length: int = 0,
                 *, wait: bool = False) -> None:  # fmt: skip
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(path), kind, mode, str(start), str(length),
             "wait" if wait else "nowait"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip

    def answer(self, timeout: float = WAIT_S) -> str:
        """The holder's next line ("locked" or "error ERRNO")."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        os.set_blocking(self.proc.stdout.fileno(), False)
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if line:
                return line.strip()
            if self.proc.poll() is not None:
                rest = self.proc.stdout.read()
                return rest.strip() if rest else f"exited {self.proc.returncode}"
            time.sleep(0.02)
        raise AssertionError(f"no answer from the lock holder in {timeout} s")

    def still_waiting(self, for_s: float) -> bool:
        time.sleep(for_s)
        assert self.proc.stdout is not None
        os.set_blocking(self.proc.stdout.fileno(), False)
        return self.proc.poll() is None and not self.proc.stdout.readline()

    def lock_more(self, start: int, length: int) -> None:
        self._tell(f"lock {start} {length}")

    def write(self, offset: int, text: str, *, fsync: bool = True) -> None:
        """Write `text` (no spaces) at `offset` through the locked descriptor, and fsync."""
        self._tell(f"{'write' if fsync else 'put'} {offset} {text}")

    def _tell(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def release(self) -> None:
        """Exit: the process's close() drops its locks."""
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            self.proc.wait(timeout=WAIT_S)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=WAIT_S)


@pytest.fixture
def holders() -> Iterator[list[Holder]]:
    made: list[Holder] = []
    yield made
    for holder in made:
        holder.kill()


def two_mounts(cluster: ProcCluster, mount: MountFactory, name: str) -> tuple[Mount, Mount, str]:
    a, b = mount(cluster, "a"), mount(cluster, "b")
    (a.path / name).write_bytes(b"x" * 4096)
    return a, b, name


def test_fcntl_locks_exclude_across_mounts(
    cluster: ProcCluster, mount: MountFactory, holders: list[Holder]
) -> None:
    a, b, name = two_mounts(cluster, mount, "f")
    holders.append(writer := Holder(a.path / name, "fcntl", "ex", 0, 100))
    assert writer.answer() == "locked"

    fd = os.open(b.path / name, os.O_RDWR)
    try:
        # Overlapping: EAGAIN, as on ext4. Beside it: granted.
        with pytest.raises(BlockingIOError) as exc:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 50)
        assert exc.value.errno == errno.EAGAIN
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 100, 100)
        # F_GETLK names the other mount's lock; its pid is not of this host: 0.
        probe = struct.pack("hhqqi", fcntl.F_WRLCK, os.SEEK_SET, 50, 10, 0)
        l_type, _, l_start, l_len, l_pid = struct.unpack(
            "hhqqi", fcntl.fcntl(fd, fcntl.F_GETLK, probe)
        )
        assert (l_type, l_start, l_len, l_pid) == (fcntl.F_WRLCK, 0, 100, 0)
        free = struct.pack("hhqqi", fcntl.F_WRLCK, os.SEEK_SET, 300, 10, 0)
        assert struct.unpack("hhqqi", fcntl.fcntl(fd, fcntl.F_GETLK, free))[0] == fcntl.F_UNLCK
    finally:
        os.close(fd)  # drops this process's lock on 100..199

    # A blocking wait on the other mount is granted when the holder lets go.
    holders.append(waiter := Holder(b.path / name, "fcntl", "ex", 0, 0, wait=True))
    assert waiter.still_waiting(1.0)
    writer.release()
    assert waiter.answer() == "locked"
    # Read locks share; a write lock then waits for both.
    waiter.release()
    holders.append(reader_a := Holder(a.path / name, "fcntl", "sh", 0, 0))
    holders.append(reader_b := Holder(b.path / name, "fcntl", "sh", 0, 0))
    assert (reader_a.answer(), reader_b.answer()) == ("locked", "locked")
    holders.append(late := Holder(b.path / name, "fcntl", "ex", 0, 0))
    assert late.answer() == f"error {errno.EAGAIN}"


def test_flock_excludes_across_mounts_apart_from_fcntl(
    cluster: ProcCluster, mount: MountFactory, holders: list[Holder]
) -> None:
    a, b, name = two_mounts(cluster, mount, "f")
    holders.append(first := Holder(a.path / name, "flock", "ex"))
    assert first.answer() == "locked"
    holders.append(second := Holder(b.path / name, "flock", "ex"))
    assert second.answer() == f"error {errno.EWOULDBLOCK}"
    # flock and fcntl locks never conflict on Linux.
    holders.append(other_kind := Holder(b.path / name, "fcntl", "ex", 0, 0))
    assert other_kind.answer() == "locked"
    holders.append(waiter := Holder(b.path / name, "flock", "sh", wait=True))
    assert waiter.still_waiting(1.0)
    first.release()
    assert waiter.answer() == "locked"


def test_a_wait_that_would_deadlock_gets_edeadlk(
    cluster: ProcCluster, mount: MountFactory, holders: list[Holder]
) -> None:
    a, b, name = two_mounts(cluster, mount, "f")
    holders.append(one := Holder(a.path / name, "fcntl", "ex", 0, 1))
    holders.append(two := Holder(b.path / name, "fcntl", "ex", 1, 1))
    assert (one.answer(), two.answer()) == ("locked", "locked")
    one.lock_more(1, 1)  # waits for two
    assert one.still_waiting(2.5)  # across the tracker's 1 s holds: still known to wait
    two.lock_more(0, 1)  # would wait for one: a cycle
    assert two.answer() == f"error {errno.EDEADLK}"
    two.release()
    assert one.answer() == "locked"


def test_a_killed_waiter_dies_and_a_killed_mounts_locks_are_released(
    make_cluster: MakeCluster, mount: MountFactory, holders: list[Holder]
) -> None:
    cluster = make_cluster(tracker_args=["--lock-lease-s", "2"])
    a, b, name = two_mounts(cluster, mount, "f")
    a.allow_tracebacks = True  # it is killed
    holders.append(holder := Holder(a.path / name, "fcntl", "ex", 0, 0))
    assert holder.answer() == "locked"

    # A process waiting for a lock can be killed: the kernel interrupts the request.
    holders.append(waiter := Holder(b.path / name, "fcntl", "ex", 0, 0, wait=True))
    assert waiter.still_waiting(1.0)
    os.kill(waiter.proc.pid, signal.SIGKILL)
    assert waiter.proc.wait(timeout=WAIT_S) == -signal.SIGKILL

    # The holder's mount dies with the lock held: it goes once the session's lease ends.
    a.kill()
    holder.kill()
    started = time.monotonic()
    holders.append(after := Holder(b.path / name, "fcntl", "ex", 0, 0, wait=True))
    assert after.answer() == "locked"
    print(f"lock of a killed mount released after {time.monotonic() - started:.1f} s")


@pytest.mark.parametrize("tracker_restarts", [False, True], ids=["same-tracker", "restarted"])
def test_a_mount_stopped_past_its_lease_cannot_write_under_the_lost_lock(
    make_cluster: MakeCluster, mount: MountFactory, holders: list[Holder], tracker_restarts: bool
) -> None:
    """A's mount is stopped (SIGSTOP) with a lock held: past its lease the lock is B's, and B
    changes the file. Woken, A's process believes it still holds the lock; its writes through
    the descriptor it locked fail with EIO (as NFS's under a lost lock) and B's bytes stay.
    What A wrote under the lock and had not flushed is dropped. A new open on A writes. With
    the tracker restarted meanwhile, the new one knows nothing of A's lock (A could not
    reclaim it): A's mount alone must refuse."""
    cluster = make_cluster(tracker_args=["--lock-lease-s", "2"])
    a, b, name = two_mounts(cluster, mount, "f")
    holders.append(holder := Holder(a.path / name, "fcntl", "ex", 0, 0))
    assert holder.answer() == "locked"
    holder.write(0, "under-A's-lock")
    assert holder.answer() == "wrote"
    holder.write(200, "unflushed", fsync=False)  # in A's buffers (and the kernel's pages)
    assert holder.answer() == "wrote"

    os.kill(a.pid, signal.SIGSTOP)
    try:
        if tracker_restarts:
            assert cluster.tracker is not None
            cluster.restart(cluster.tracker)
        holders.append(other := Holder(b.path / name, "fcntl", "ex", 0, 0, wait=True))
        assert other.answer() == "locked"  # once A's lease ran out
        other.write(0, "B-took-the-lock")
        assert other.answer() == "wrote"
    finally:
        os.kill(a.pid, signal.SIGCONT)

    holder.write(0, "stale-write-of-A")
    assert holder.answer() == f"error {errno.EIO}"
    holder.write(100, "again")  # for good, not once
    assert holder.answer() == f"error {errno.EIO}"
    other.release()
    b_bytes = b"B-took-the-lock" + b"x" * (4096 - 15)
    assert (b.path / name).read_bytes() == b_bytes
    # A reads B's bytes, not its own refused ones (nor from the kernel's pages), and a
    # reader's close there succeeds.
    assert (a.path / name).read_bytes() == b_bytes
    assert "writes refused until the file is closed" in a.logs()

    # An open made since writes (knowing the lock was lost: it takes it anew), while the
    # descriptor opened before stays refused.
    holders.append(anew := Holder(a.path / name, "fcntl", "ex", 0, 0, wait=True))
    assert anew.answer() == "locked"
    anew.write(0, "A-again")
    assert anew.answer() == "wrote"
    holder.write(0, "stale-again")
    assert holder.answer() == f"error {errno.EIO}"
    assert (b.path / name).read_bytes()[:15] == b"A-againthe-lock"


def test_an_unmount_releases_the_locks_still_held(
    cluster: ProcCluster, mount: MountFactory, holders: list[Holder]
) -> None:
    a, b, name = two_mounts(cluster, mount, "f")
    holders.append(holder := Holder(a.path / name, "flock", "ex"))
    assert holder.answer() == "locked"
    holders.append(early := Holder(b.path / name, "flock", "ex"))
    assert early.answer() == f"error {errno.EWOULDBLOCK}"
    # SIGTERM ends the mount with the holder's file still open: its lock goes at once, not
    # after the session's 30 s lease.
    assert a.proc is not None
    a.proc.send_signal(signal.SIGTERM)
    assert a.proc.wait(timeout=WAIT_S) == 0
    holders.append(after := Holder(b.path / name, "flock", "ex"))
    assert after.answer() == "locked"


def test_a_mount_with_a_waiter_still_stops(
    cluster: ProcCluster, mount: MountFactory, holders: list[Holder]
) -> None:
    """SIGTERM ends a mount even while a process there waits for a lock held elsewhere: the
    wait ends (the waiter gets an error), it does not keep the mount alive."""
    a, b, name = two_mounts(cluster, mount, "f")
    holders.append(holder := Holder(a.path / name, "fcntl", "ex", 0, 0))
    assert holder.answer() == "locked"
    holders.append(waiter := Holder(b.path / name, "fcntl", "ex", 0, 0, wait=True))
    assert waiter.still_waiting(1.0)
    assert b.proc is not None
    b.proc.send_signal(signal.SIGTERM)
    assert b.proc.wait(timeout=WAIT_S) == 0
    assert waiter.answer().startswith("error ")


def test_local_locks_stay_per_mount(
    cluster: ProcCluster, mount: MountFactory, holders: list[Holder]
) -> None:
    """`local_locks`: the kernel's per-mount locks, as before cluster-wide ones."""
    a = mount(cluster, "a", "--local-locks", "true")
    b = mount(cluster, "b", "-o", "local_locks")
    (a.path / "f").write_bytes(b"x")
    holders.append(first := Holder(a.path / "f", "fcntl", "ex", 0, 0))
    assert first.answer() == "locked"
    holders.append(same_mount := Holder(a.path / "f", "fcntl", "ex", 0, 0))
    holders.append(other_mount := Holder(b.path / "f", "fcntl", "ex", 0, 0))
    assert same_mount.answer() == f"error {errno.EAGAIN}"
    assert other_mount.answer() == "locked"


def test_locks_are_reclaimed_from_a_restarted_tracker(
    make_cluster: MakeCluster, mount: MountFactory, holders: list[Holder]
) -> None:
    cluster = make_cluster(tracker_args=["--lock-lease-s", "3"])
    a, b, name = two_mounts(cluster, mount, "f")
    holders.append(holder := Holder(a.path / name, "fcntl", "ex", 0, 0))
    assert holder.answer() == "locked"
    assert cluster.tracker is not None
    cluster.restart(cluster.tracker)  # SIGKILL: the tracker's lock table is gone
    # The new tracker grants nothing new for one lease while mounts reclaim what they hold:
    # the lock is still a's.
    holders.append(other := Holder(b.path / name, "fcntl", "ex", 0, 0))
    assert other.answer() == f"error {errno.EAGAIN}"
    # A write under the lock, as the new tracker starts: committed once a has reclaimed it.
    holder.write(0, "written-across-the-restart")
    assert holder.answer() == "wrote"
    holder.release()
    holders.append(after := Holder(b.path / name, "fcntl", "ex", 0, 0, wait=True))
    assert after.answer() == "locked"
    assert "reclaimed 1 locks" in a.logs()
    assert (b.path / name).read_bytes().startswith(b"written-across-the-restart")


SQLITE_WRITER = textwrap.dedent(
    """
    import sqlite3, sys
    path, name, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    db = sqlite3.connect(path, timeout=120, isolation_level=None)
    for i in range(count):
        db.execute("BEGIN IMMEDIATE")
        (n,) = db.execute("SELECT n FROM counter").fetchone()
        db.execute("UPDATE counter SET n = ?", (n + 1,))
        db.execute("INSERT INTO rows VALUES (?, ?, randomblob(3000))", (name, i))
        db.execute("COMMIT")
    db.close()
    """
)


def test_two_mounts_run_sqlite_writers_on_one_database(
    cluster: ProcCluster, mount: MountFactory
) -> None:
    a, b = mount(cluster, "a"), mount(cluster, "b")
    db = sqlite3.connect(a.path / "shared.db")
    db.executescript(
        "CREATE TABLE counter (n INTEGER); INSERT INTO counter VALUES (0);"
        "CREATE TABLE rows (writer TEXT, i INTEGER, pad BLOB);"
    )
    db.close()
    count = 40
    writers = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                SQLITE_WRITER,
                str(m.path / "shared.db"),
                m.path.name,
                str(count),
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        for m in (a, b)
    ]
    try:
        for w in writers:
            _, err = w.communicate(timeout=600)
            assert w.returncode == 0, err
    finally:
        for w in writers:
            w.kill()
    for m in (b, a):  # each mount sees the whole, consistent database
        db = sqlite3.connect(m.path / "shared.db")
        try:
            assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
            # Every increment counted: no writer read a stale page or overlapped another.
            assert db.execute("SELECT n FROM counter").fetchone() == (2 * count,)
            rows = db.execute("SELECT writer, COUNT(*) FROM rows GROUP BY writer").fetchall()
            assert sorted(rows) == [("a", count), ("b", count)]
        finally:
            db.close()
