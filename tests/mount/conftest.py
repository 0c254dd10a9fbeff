"""Real FUSE mounts of real clusters.

`mount(cluster)` starts `dfs-mount MNT --tracker ADDR --foreground` as a subprocess and returns
once the kernel shows the mount; it fails at once (never skips) if the process dies first, so
a machine without FUSE fails these tests. Whatever happens, teardown unmounts with
`fusermount3 -u` (then `-z -u`), kills the process by PID, and fails the test if the mount
logged a traceback (a bug caught by the FUSE error boundary).
"""

from __future__ import annotations

import errno
import hashlib
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.cluster_procs import Daemon, ProcCluster

BIN = Path(sys.executable).parent
MOUNT_TIMEOUT_S = 30.0
EXIT_TIMEOUT_S = 30.0


def is_mounted(path: Path) -> bool:
    """From /proc/self/mounts, so that a dead FUSE mount (ENOTCONN on stat) still counts."""
    target = os.path.abspath(path).replace(" ", "\\040")
    with open("/proc/self/mounts") as mounts:
        return any(line.split()[1] == target for line in mounts if line.strip())


def fusermount_u(path: Path) -> None:
    """Unmount, lazily if need be; quiet when nothing is mounted."""
    if not is_mounted(path):
        return
    result = subprocess.run(["fusermount3", "-u", str(path)], capture_output=True, timeout=30)
    if result.returncode != 0 and is_mounted(path):
        subprocess.run(["fusermount3", "-z", "-u", str(path)], capture_output=True, timeout=30)


@dataclass
class Mount:
    cluster: ProcCluster
    path: Path
    log: Path
    argv: list[str]
    proc: subprocess.Popen[bytes] | None = None
    allow_tracebacks: bool = False
    logs_seen: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        self.path.mkdir(exist_ok=True)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=out, env=self.cluster.env)
        deadline = time.monotonic() + MOUNT_TIMEOUT_S
        while not (is_mounted(self.path) and os.path.ismount(self.path)):
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"dfs-mount exited with {self.proc.returncode} before mounting:\n{self.logs()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"dfs-mount not mounted in {MOUNT_TIMEOUT_S}s:\n{self.logs()}")
            time.sleep(0.05)

    def unmount(self) -> None:
        """The ordinary way out: `fusermount3 -u` succeeds and the process exits 0."""
        assert self.proc is not None
        result = subprocess.run(
            ["fusermount3", "-u", str(self.path)], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
        assert self.proc.wait(timeout=EXIT_TIMEOUT_S) == 0, self.logs()
        assert not is_mounted(self.path)
        self.check_logs()

    def kill(self) -> None:
        """SIGKILL the mount process (the kernel mount stays, dead, until unmounted)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=EXIT_TIMEOUT_S)

    def restart(self) -> None:
        """Mount again at the same place (after unmount or kill)."""
        fusermount_u(self.path)
        self.start()

    def cleanup(self) -> None:
        try:
            fusermount_u(self.path)
        finally:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=EXIT_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    os.kill(self.proc.pid, signal.SIGUSR1)  # stacks into the log, then kill
                    time.sleep(0.5)
                    self.proc.kill()
                    self.proc.wait(timeout=EXIT_TIMEOUT_S)

    def logs(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def check_logs(self) -> None:
        if not self.allow_tracebacks:
            assert "Traceback" not in self.logs(), self.logs()


MountFactory = Callable[..., Mount]


@pytest.fixture
def mount(tmp_path: Path) -> Iterator[MountFactory]:
    """`mount(cluster, name="mnt", *extra_args, at=None)`: a started Mount at tmp_path/name
    (or at `at`, for a mountpoint that other users can reach)."""
    made: list[Mount] = []

    def make(cluster: ProcCluster, name: str = "mnt", *extra: str, at: Path | None = None) -> Mount:
        path = at if at is not None else tmp_path / name
        argv = [
            str(BIN / "dfs-mount"),
            str(path),
            "--tracker",
            cluster.tracker_addr,
            "--foreground",
            "--log-level",
            "INFO",
            *extra,
        ]
        m = Mount(cluster, path, tmp_path / f"{name}.mount.log", argv)
        made.append(m)
        m.start()
        return m

    try:
        yield make
    finally:
        failures = []
        for m in reversed(made):
            m.cleanup()
        for m in made:
            try:
                m.check_logs()
            except AssertionError as exc:
                failures.append(str(exc))
        assert not failures, "\n".join(failures)


def oserror(fn: Callable[[], object]) -> str:
    """Run `fn`; 'ok' or the errno name it failed with (for comparing with ext4)."""
    try:
        fn()
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return "ok"


# --- faults that land mid-operation -------------------------------------------------------


class PipeReader:
    """The stdout pipe of a process reading the mount (`cat`), drained at the test's pace.

    The pipe is the throttle: once it is full (64 KiB) the process blocks writing into it, so
    while the test takes nothing, the reader is surely alive and mid-file, however fast the
    mount is. Every byte taken is hashed; no call blocks longer than `timeout`.
    """

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self.proc = proc
        self.fd = proc.stdout.fileno()
        self.digest = hashlib.sha256()
        self.taken = 0

    def take(self, count: int | None = None, timeout: float = 120.0) -> None:
        """Take `count` more bytes, or everything up to end-of-file (None)."""
        deadline = time.monotonic() + timeout
        goal = None if count is None else self.taken + count
        while goal is None or self.taken < goal:
            left = deadline - time.monotonic()
            assert left > 0, f"the reader stalled at byte {self.taken}"
            if not select.select([self.fd], [], [], left)[0]:
                continue
            want = 1 << 20 if goal is None else min(1 << 20, goal - self.taken)
            block = os.read(self.fd, want)
            if not block:
                assert goal is None, f"end of file at byte {self.taken}, expected {goal}"
                return
            self.digest.update(block)
            self.taken += len(block)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def first_copy_holder(cluster: ProcCluster, remote: str, from_index: int) -> Daemon:
    """The keeper listed first (the copy a reader tries first) for the most chunks of `remote`
    from chunk `from_index` on: a fault there lands on reads still to come."""
    counts: dict[str, int] = {}
    for chunk in cluster.stat(remote)["chunks"]:
        if chunk["index"] >= from_index and chunk["keepers"]:
            counts[chunk["keepers"][0]] = counts.get(chunk["keepers"][0], 0) + 1
    assert counts, f"{remote} has no chunk from index {from_index} on"
    addr = max(counts, key=lambda a: counts[a])
    return next(k for k in cluster.keepers if k.addr == addr)


def read_failovers(m: Mount, addr: str) -> list[str]:
    """The mount's log lines saying a read of a copy on keeper `addr` failed (cluster/client.py
    `read_chunk`; the next copy is tried)."""
    return [line for line in m.logs().splitlines() if f"copy on {addr} failed" in line]


def write_failovers(m: Mount, addr: str) -> list[str]:
    """The mount's log lines saying a chunk write to keeper `addr` failed and a new placement
    was asked for (cluster/client.py `write_chunk`)."""
    return [
        line
        for line in m.logs().splitlines()
        if addr in line and "failed" in line and "asking for another placement" in line
    ]
