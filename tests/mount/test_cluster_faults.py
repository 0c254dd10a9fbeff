"""Cluster failures under the mount (issue 4, tests 9 and 11; issue 5, test 3): a keeper
killed while `cp` writes, a keeper frozen while `cat` reads (each fault landing while the
command is surely mid-file, and the failover seen in the mount's log), the time a hung keeper
may cost a read, calls waiting through a tracker restart, and the whole round trip over TLS."""

from __future__ import annotations

import filecmp
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.cluster_procs import ProcCluster, wait_until
from tests.conftest import MakeCluster, random_file
from tests.mount.conftest import (
    Mount,
    MountFactory,
    PipeReader,
    first_copy_holder,
    read_failovers,
    sha256_of,
    write_failovers,
)
from tests.procs.test_security import make_tls_files

pytestmark = pytest.mark.mount

MiB = 1 << 20


def _stored_bytes(cluster: ProcCluster) -> int:
    return sum(
        f.stat().st_size for k in cluster.keepers for f in (k.data_dir / "chunks").glob("*/*.dfs")
    )


def test_cp_into_the_mount_survives_a_killed_keeper(
    make_cluster: MakeCluster, mount: MountFactory, tmp_path: Path
) -> None:
    cluster = make_cluster(keepers=4, replication=2, dead_after_s=3.0)
    mnt = mount(cluster, "mnt", "--dirty-mb", "64")
    size = 240 * MiB + 5
    local = random_file(tmp_path / "big", size)
    victim = cluster.keepers[0]
    # cp copies from a pipe that this test feeds: it is surely still copying at the kill, and
    # the second half of the file is written to the mount after it.
    cp = subprocess.Popen(["cp", "/dev/stdin", str(mnt.path / "big")], stdin=subprocess.PIPE)
    half_fed, go_on = threading.Event(), threading.Event()

    def feed() -> None:
        assert cp.stdin is not None
        with open(local, "rb") as source, cp.stdin:
            for offset in range(0, size, MiB):
                if offset == size // 2 // MiB * MiB:
                    half_fed.set()
                    if not go_on.wait(timeout=300):
                        return
                cp.stdin.write(source.read(MiB))

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        assert half_fed.wait(timeout=120), "cp did not take the first half"
        # Uploads are flowing: what the dirty bound (64 MiB) cannot hold is on two keepers.
        wait_until(lambda: _stored_bytes(cluster) >= 2 * 48 * MiB, 120, "uploads under way")
        assert cp.poll() is None, "cp ended before the kill"
        victim.kill()
        go_on.set()
        assert cp.wait(timeout=300) == 0
        feeder.join(timeout=60)
    finally:
        go_on.set()
        if cp.poll() is None:
            cp.kill()
            cp.wait()
    assert write_failovers(mnt, victim.addr), "no chunk write failed over from the killed keeper"
    assert filecmp.cmp(local, mnt.path / "big", shallow=False)
    mnt.unmount()
    again = mount(cluster, "again")
    assert filecmp.cmp(local, again.path / "big", shallow=False)
    wait_until(cluster.healthy, 120, "the cluster to heal")


def test_frozen_keeper_does_not_stall_cat(
    make_cluster: MakeCluster, mount: MountFactory, tmp_path: Path
) -> None:
    cluster = make_cluster(keepers=3, replication=2)
    writer = mount(cluster, "writer")
    local = random_file(tmp_path / "big", 96 * MiB)
    subprocess.run(["cp", str(local), str(writer.path / "big")], check=True, timeout=300)
    chunk = cluster.stat("/big")["chunk_size"]
    freeze_at = 8 * MiB
    # The first copy of chunks not yet read (nor read ahead) at the freeze is on this keeper.
    frozen = first_copy_holder(cluster, "/big", freeze_at // chunk + 2)
    reader = mount(cluster, "reader", "--cache-mb", "32", "--io-timeout-s", "2")
    cat = subprocess.Popen(["cat", str(reader.path / "big")], stdout=subprocess.PIPE)
    try:
        pipe = PipeReader(cat)
        pipe.take(freeze_at)
        assert cat.poll() is None, "cat ended before the freeze"  # blocked on the full pipe
        frozen.signal(signal.SIGSTOP)
        started = time.monotonic()
        pipe.take()
        assert cat.wait(timeout=120) == 0
        elapsed = time.monotonic() - started
    finally:
        frozen.signal(signal.SIGCONT)
        if cat.poll() is None:
            cat.kill()
            cat.wait()
    assert pipe.taken == local.stat().st_size
    assert pipe.digest.hexdigest() == sha256_of(local)
    assert read_failovers(reader, frozen.addr), "no read failed over from the frozen keeper"
    # Failing over costs one io_timeout per chunk copy on the frozen keeper at most, once:
    # after that the client tries it last (the next test bounds it).
    assert elapsed < 60, f"cat took {elapsed:.1f}s after the freeze"
    wait_until(
        lambda: all(k["state"] == "alive" for k in cluster.status()["keepers"]), 30, "rejoin"
    )


def test_a_hung_keeper_costs_one_timeout_not_one_per_chunk(
    make_cluster: MakeCluster, mount: MountFactory, tmp_path: Path
) -> None:
    """Guarantee 2: with a keeper hung, reads fail over within a timeout, and at once after
    that. A client that forgot the failure would wait io_timeout_s again for every chunk whose
    first copy is on the hung keeper."""
    io_timeout_s = 2.0
    cluster = make_cluster(keepers=2, replication=2, chunk_size=MiB)
    for name in ("first", "second"):
        cluster.dfs("put", str(random_file(tmp_path / name, 40 * MiB)), f"/{name}")
    hung = cluster.keepers[0]
    first_on_hung = [
        c for c in cluster.stat("/first")["chunks"] if c["keepers"] and c["keepers"][0] == hung.addr
    ]
    # Far above one timeout (a loaded machine reads 40 MiB slowly), far below one per chunk.
    bound_s = 12.0
    assert len(first_on_hung) * io_timeout_s >= 2 * bound_s, len(first_on_hung)
    # One transfer at a time: chunks are fetched one after another (no parallel read-ahead
    # hides a timeout per chunk behind others).
    reader = mount(cluster, "reader", "--io-timeout-s", str(io_timeout_s), "--transfers", "1")
    hung.signal(signal.SIGSTOP)
    try:
        for name in ("first", "second"):
            started = time.monotonic()
            with open(tmp_path / f"{name}.out", "wb") as out:
                subprocess.run(
                    ["cat", str(reader.path / name)], stdout=out, check=True, timeout=120
                )
            elapsed = time.monotonic() - started
            assert filecmp.cmp(tmp_path / name, tmp_path / f"{name}.out", shallow=False)
            assert elapsed < bound_s, f"cat {name} took {elapsed:.1f}s with a keeper hung"
            failed = read_failovers(reader, hung.addr)
            # The first read waits for one timeout on the hung keeper, then remembers it: the
            # other chunks, and the second file, go to the other copy at once.
            assert len(failed) == 1, "\n".join(failed)
    finally:
        hung.signal(signal.SIGCONT)


def _tracker_restart_cluster(
    make_cluster: MakeCluster, mount: MountFactory, tmp_path: Path
) -> tuple[ProcCluster, Mount, bytes]:
    """Files in four directories the mount knows but has not looked into: each call made
    through it then needs a request of its own to the tracker."""
    cluster = make_cluster(keepers=2, replication=2, chunk_size=MiB)
    data = os.urandom(3 * MiB + 5)
    local = tmp_path / "data"
    local.write_bytes(data)
    for directory in ("s", "l", "c", "w"):
        cluster.dfs("mkdir", f"/{directory}")
    cluster.dfs("put", str(local), "/s/file")
    cluster.dfs("put", str(local), "/c/file")
    for i in range(3):
        cluster.dfs("put", str(local), f"/l/entry{i}")
    m = mount(cluster, "mnt", "--retry-window-s", "60")
    for directory in ("s", "l", "c", "w"):
        os.stat(m.path / directory)
    return cluster, m, data


def _across_a_tracker_restart(
    cluster: ProcCluster,
    calls: dict[str, Callable[[], object]],
    held: list[int],
    release: Callable[[], None],
) -> dict[str, object]:
    """SIGKILL the tracker, start `calls` in threads and check that all of them wait; restart
    the tracker with the processes `held` stopped until `release()` returns. Returns what each
    call returned or raised."""
    results: dict[str, object] = {}

    def run(name: str) -> None:
        try:
            results[name] = calls[name]()
        except OSError as exc:
            results[name] = exc

    assert cluster.tracker is not None
    cluster.tracker.kill()
    threads = [threading.Thread(target=run, args=(name,), daemon=True) for name in calls]
    for thread in threads:
        thread.start()
    time.sleep(3.0)
    waiting = [name for name, t in zip(calls, threads, strict=True) if t.is_alive()]
    assert waiting == list(calls), f"not waiting for the tracker: {results}"
    for pid in held:
        os.kill(pid, signal.SIGSTOP)
    try:
        cluster.restart(cluster.tracker)
        release()
    finally:
        for pid in held:
            os.kill(pid, signal.SIGCONT)
    for thread in threads:
        thread.join(timeout=60)
    return results


def _check(results: dict[str, object], expected: dict[str, object]) -> None:
    wrong = {
        name: repr(results.get(name, "unfinished"))[:200]
        for name in expected
        if results.get(name) != expected[name]
    }
    assert not wrong, f"calls failed or unfinished: {wrong}"


def test_calls_waiting_on_a_restarting_tracker_succeed(
    make_cluster: MakeCluster, mount: MountFactory, tmp_path: Path
) -> None:
    """Guarantee 5: calls through the mount while the tracker is down wait (for at most
    retry_window_s) and succeed once it is back, as if nothing happened."""
    cluster, m, data = _tracker_restart_cluster(make_cluster, mount, tmp_path)

    def create() -> bytes:
        with open(m.path / "w" / "new", "wb") as f:
            f.write(data)
        return data

    calls: dict[str, Callable[[], object]] = {
        "stat": lambda: os.stat(m.path / "s" / "file").st_size,
        "ls": lambda: sorted(os.listdir(m.path / "l")),
        "cat": lambda: (m.path / "c" / "file").read_bytes(),
        "create": create,
    }
    # The mount is held until the keepers have re-registered with the new tracker, the order a
    # restart mostly has (the next test takes the other order).
    results = _across_a_tracker_restart(cluster, calls, [m.pid], lambda: cluster.wait_alive(2))
    _check(results, {"stat": len(data), "ls": ["entry0", "entry1", "entry2"], "cat": data,
                     "create": data})  # fmt: skip
    # Each call retried on its own: at least one line per waiting request.
    retries = re.findall(rf"tracker {re.escape(cluster.tracker_addr)} unreachable", m.logs())
    assert len(retries) >= len(calls), m.logs()
    cluster.dfs("get", "/w/new", str(tmp_path / "got"))
    assert (tmp_path / "got").read_bytes() == data


def test_a_read_waiting_on_a_restarting_tracker_waits_for_the_keepers(
    make_cluster: MakeCluster, mount: MountFactory, tmp_path: Path
) -> None:
    """A tracker that has just restarted knows where no chunk is until the keepers
    re-register (each retries every RETRY_MAX_S = 2 s at most, plus its heartbeat): a read
    that reaches it first must wait for them, bounded, as a write's allocation does, and not
    fail at once with EIO; so must a small write that needs the rest of its chunk."""
    cluster, m, data = _tracker_restart_cluster(make_cluster, mount, tmp_path)

    def overwrite() -> bytes:
        """A small write into a stored chunk: it is stored with the rest of that chunk's
        bytes, which must be read first (from copies the new tracker does not know yet)."""
        with open(m.path / "s" / "file", "r+b") as f:
            f.seek(100)
            f.write(b"overwritten")
        return (m.path / "s" / "file").read_bytes()

    calls: dict[str, Callable[[], object]] = {
        "cat": lambda: (m.path / "c" / "file").read_bytes(),
        "create": lambda: (m.path / "w" / "new").write_bytes(data),
        "overwrite": overwrite,
    }
    # The keepers come back 3 s after the tracker: the mount's calls (retrying every second
    # at most) reach the new tracker before them.
    keepers = [k.pid for k in cluster.keepers]
    results = _across_a_tracker_restart(cluster, calls, keepers, lambda: time.sleep(3.0))
    overwritten = data[:100] + b"overwritten" + data[111:]
    _check(results, {"cat": data, "create": len(data), "overwrite": overwritten})


def test_tls_round_trip_through_the_mount(
    make_cluster: MakeCluster, mount: MountFactory, tmp_path: Path
) -> None:
    tls_dir = tmp_path / "tls"
    tls_dir.mkdir()
    cluster = make_cluster(keepers=2, replication=2, env=make_tls_files(tls_dir))
    local = random_file(tmp_path / "data", 20 * MiB + 3)
    cluster.dfs("put", str(local), "/put")
    cluster.dfs("get", "/put", str(tmp_path / "got"))
    assert filecmp.cmp(local, tmp_path / "got", shallow=False)
    mnt = mount(cluster)
    subprocess.run(["cp", str(local), str(mnt.path / "copied")], check=True, timeout=120)
    out = tmp_path / "out"
    with open(out, "wb") as sink:
        subprocess.run(["cat", str(mnt.path / "copied")], stdout=sink, check=True, timeout=120)
    assert filecmp.cmp(local, out, shallow=False)
    assert filecmp.cmp(local, mnt.path / "put", shallow=False)
