"""Real clusters whose servers keep their data on power-cut layers (lazyfs.py).

`power_cluster(...)` starts one lazyfs process per server, each mounted on the server's
`--data` directory, then the tracker, the keepers and (on demand) `dfs-mount`s. `cut(daemons)`
is a power cut of those machines: SIGKILL the servers, drop what their layers hold that was
never fsynced, mount the layers again and restart the servers on the same ports.

Teardown, whatever happened: unmount and kill every `dfs-mount`, stop every server, then
unmount every layer (`fusermount3 -u`, then lazily) and kill its process by PID. A traceback in
a layer's log (a harness bug) or in a mount's log (a mount bug) fails the test.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.cluster_procs import BIN, Daemon, ProcCluster
from tests.mount.conftest import Mount, fusermount_u, is_mounted
from tests.powercut.lazyfs import CUT_DONE

REPO = Path(__file__).resolve().parents[2]
LAYER_TIMEOUT_S = 30.0


def blob(tag: str, size: int) -> bytes:
    """`size` bytes, the same for the same tag, different for different tags."""
    return random.Random(tag).randbytes(size)


def write_file(path: Path, data: bytes, *, sync: bool, flags: int = os.O_TRUNC) -> None:
    """Open (creating), write all of `data`, fsync if asked, close."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | flags, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def sync_dir(path: Path) -> None:
    """fsync a directory: its names become durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class Layer:
    """One lazyfs process: `backing` seen at `mountpoint`, with power cuts on demand."""

    backing: Path
    mountpoint: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    cuts: int = 0

    def start(self) -> None:
        self.launch()
        self.wait_mounted()

    def launch(self) -> None:
        self.backing.mkdir(exist_ok=True)
        self.mountpoint.mkdir(exist_ok=True)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.powercut.lazyfs", self.backing, self.mountpoint],
                stdout=out,
                stderr=out,
                cwd=REPO,
            )

    def wait_mounted(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + LAYER_TIMEOUT_S
        while not (is_mounted(self.mountpoint) and os.path.ismount(self.mountpoint)):
            if self.proc.poll() is not None:
                raise AssertionError(f"lazyfs exited with {self.proc.returncode}:\n{self.logs()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"lazyfs not mounted in {LAYER_TIMEOUT_S}s:\n{self.logs()}")
            time.sleep(0.02)

    def cut(self) -> None:
        """The power cut: everything not fsynced is gone. Whoever used the layer must be dead
        (SIGKILLed and reaped) first. The layer is unmounted afterwards; `start` mounts it
        again."""
        assert self.proc is not None
        assert self.proc.poll() is None, self.logs()
        self.proc.send_signal(signal.SIGUSR1)
        try:
            code = self.proc.wait(timeout=LAYER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"lazyfs did not finish its cut:\n{self.logs()}") from None
        self.cuts += 1
        assert code == 0, self.logs()
        assert self.logs().count(CUT_DONE) == self.cuts, self.logs()
        assert not is_mounted(self.mountpoint)

    def stop(self) -> None:
        """Unmount, keeping the backing directory as it is."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=LAYER_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=LAYER_TIMEOUT_S)
        fusermount_u(self.mountpoint)

    def logs(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def check_logs(self) -> None:
        """A traceback in the layer's log is a bug of the layer (pyfuse3 logs what a handler
        raised other than FUSEError)."""
        assert "Traceback" not in self.logs(), self.logs()


LayerFactory = Callable[[str], Layer]


@pytest.fixture
def layer(tmp_path: Path) -> Iterator[LayerFactory]:
    """`layer(name)`: a started lazyfs mount at tmp_path/name over tmp_path/name.backing."""
    made: list[Layer] = []

    def make(name: str) -> Layer:
        lazy = Layer(tmp_path / f"{name}.backing", tmp_path / name, tmp_path / f"{name}.lazyfs.log")
        made.append(lazy)
        lazy.start()
        return lazy

    try:
        yield make
    finally:
        failures: list[str] = []
        for lazy in made:
            attempt(failures, lazy.stop)
            attempt(failures, lazy.check_logs)
        assert not failures, "\n".join(failures)


@dataclass
class PowerCluster:
    """A ProcCluster whose servers keep their data on layers, with mounts on top."""

    procs: ProcCluster
    layers: dict[str, Layer] = field(default_factory=dict)  # by daemon name
    mounts: list[Mount] = field(default_factory=list)
    mount_args: list[str] = field(default_factory=list)

    @property
    def tracker(self) -> Daemon:
        assert self.procs.tracker is not None
        return self.procs.tracker

    @property
    def keepers(self) -> list[Daemon]:
        return self.procs.keepers

    @property
    def servers(self) -> list[Daemon]:
        return [self.tracker, *self.keepers]

    def add_layers(self, names: Sequence[str]) -> None:
        root = self.procs.root
        for name in names:
            lazy = Layer(root / f"{name}.backing", root / name, root / f"{name}.lazyfs.log")
            self.layers[name] = lazy
            lazy.launch()
        for name in names:
            self.layers[name].wait_mounted()

    def cut(self, daemons: Sequence[Daemon]) -> None:
        """A power cut of these servers' machines, all at once, then their restart (the
        tracker first)."""
        for daemon in daemons:
            daemon.kill()
        for daemon in daemons:
            self.layers[daemon.name].cut()
        for daemon in daemons:
            self.layers[daemon.name].launch()
        for daemon in daemons:
            self.layers[daemon.name].wait_mounted()
        for daemon in sorted(daemons, key=lambda d: d is not self.tracker):
            self.procs.restart(daemon)

    def kill(self, daemon: Daemon) -> None:
        """SIGKILL and restart: what the server wrote stays in the (layer's) page cache."""
        self.procs.restart(daemon)

    def mount(self, name: str = "mnt") -> Mount:
        root = self.procs.root
        argv = [
            str(BIN / "dfs-mount"),
            str(root / name),
            "--tracker",
            self.procs.tracker_addr,
            "--foreground",
            "--log-level",
            "INFO",
            *self.mount_args,
        ]
        mnt = Mount(self.procs, root / name, root / f"{name}.mount.log", argv)
        self.mounts.append(mnt)
        mnt.start()
        return mnt

    def logs(self) -> str:
        parts = [self.procs.logs()]
        parts += [f"--- {name} layer:\n{lazy.logs()}" for name, lazy in self.layers.items()]
        parts += [f"--- mount {m.path}:\n{m.logs()}" for m in self.mounts]
        return "\n".join(parts)


PowerClusterFactory = Callable[..., PowerCluster]


@pytest.fixture
def power_cluster(tmp_path: Path) -> Iterator[PowerClusterFactory]:
    """`power_cluster(keepers=3, replication=3, chunk_size=1 MiB, ...)`: a started cluster
    on layers (see the module docstring)."""
    made: list[PowerCluster] = []

    def make(
        keepers: int = 3,
        replication: int = 3,
        chunk_size: int = 1 << 20,
        heartbeat_s: float = 0.5,
        dead_after_s: float = 30.0,
        tracker_args: Sequence[str] = (),
        keeper_args: Sequence[str] = (),
        mount_args: Sequence[str] = ("--io-timeout-s", "5"),
    ) -> PowerCluster:
        root = tmp_path / f"power{len(made)}"
        root.mkdir()
        procs = ProcCluster(
            root,
            replication,
            chunk_size,
            heartbeat_s,
            dead_after_s,
            tracker_args=list(tracker_args),
            keeper_args=list(keeper_args),
        )
        cluster = PowerCluster(procs, mount_args=list(mount_args))
        made.append(cluster)
        cluster.add_layers(["tracker", *(f"keeper{n}" for n in range(keepers))])
        procs.start_tracker()
        for _ in range(keepers):
            procs.add_keeper()
        procs.wait_alive(keepers)
        return cluster

    try:
        yield make
    finally:
        # In this order, each step whatever the others did: mounts, servers, layers.
        failures: list[str] = []
        for cluster in made:
            for mnt in reversed(cluster.mounts):
                attempt(failures, mnt.cleanup)
                attempt(failures, mnt.check_logs)
            for daemon in [*cluster.keepers, cluster.procs.tracker]:
                if daemon is not None:
                    attempt(failures, daemon.stop)
            for lazy in cluster.layers.values():
                attempt(failures, lazy.stop)
                attempt(failures, lazy.check_logs)
        assert not failures, "\n".join(failures)


def attempt(failures: list[str], step: Callable[[], object]) -> None:
    """Run a teardown step; note its failure and go on with the next."""
    try:
        step()
    except Exception as exc:
        failures.append(f"{step}: {exc!r}")
