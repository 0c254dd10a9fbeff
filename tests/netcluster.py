"""A dfs cluster spread over network namespaces (tests/netlab.py): each tracker, each keeper
and the client side (a `dfs-mount` and the `dfs` command) on a host of their own.

Used by the tests in tests/netns/ (through their fixtures) and by `make bench` (bench/hops.py),
which is why it is a module of its own rather than a conftest. `net_cluster()` stops every
process by PID, unmounts every mount and removes the namespaces when its block ends, whatever
the outcome.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster import auth
from tests.cluster_procs import BIN, Daemon
from tests.mount.conftest import MOUNT_TIMEOUT_S, fusermount_u, is_mounted
from tests.netlab import NetLab, Node, Wire

KEEPERS = 3
REGISTER_TIMEOUT_S = 30.0


@dataclass
class NetMount:
    path: Path
    log: Path
    proc: subprocess.Popen[bytes]

    def stop(self) -> None:
        fusermount_u(self.path)
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@dataclass
class NetCluster:
    lab: NetLab
    root: Path
    replication: int = 2
    heartbeat_s: float = 0.5
    dead_after_s: float = 6.0
    # Flags for every tracker (e.g. a shared `--store` and `--lease-s` for a standby pair).
    tracker_args: list[str] = field(default_factory=list)
    tracker: Daemon | None = None
    tracker_node: Node | None = None
    # More trackers on the same store, each on a host of its own: `add_tracker`.
    standbys: list[tuple[Daemon, Node]] = field(default_factory=list)
    keepers: list[tuple[Daemon, Node]] = field(default_factory=list)
    mounts: list[NetMount] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.secret = self.root / "secret"
        auth.new_secret(self.secret)
        self.client = self.lab.node("c")

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DFS_")}
        env["DFS_SECRET_FILE"] = str(self.secret)
        return env

    @property
    def trackers(self) -> list[Daemon]:
        assert self.tracker is not None
        return [self.tracker, *(d for d, _ in self.standbys)]

    @property
    def tracker_addr(self) -> str:
        """The `tracker` setting: the tracker's HOST:PORT, or the list of them."""
        return ",".join(d.addr for d in self.trackers if d.addr)

    def _tracker(self, name: str) -> tuple[Daemon, Node]:
        node = self.lab.node(name)
        data = self.root / name
        argv = [
            str(BIN / "dfs-tracker"),
            "--listen", f"{node.addr}:0",
            "--data", str(data),
            "--replication", str(self.replication),
            "--heartbeat-s", str(self.heartbeat_s),
            "--dead-after-s", str(self.dead_after_s),
            "--log-level", "INFO",
            *self.tracker_args,
        ]  # fmt: skip
        daemon = Daemon(
            name, node.exec_argv(argv), data, self.root / f"{name}.log",
            "dfs-tracker: listening on",
        )  # fmt: skip
        return daemon, node

    def start_tracker(self) -> Node:
        self.tracker, self.tracker_node = self._tracker("t")
        self.tracker.start(self.env)
        return self.tracker_node

    def add_tracker(self) -> tuple[Daemon, Node]:
        """One more tracker, on a host of its own and the first one's flags (so its store,
        which must be PostgreSQL to be shared): it stands by while another is active."""
        daemon, node = self._tracker(f"t{len(self.standbys) + 1}")
        self.standbys.append((daemon, node))
        daemon.start(self.env)
        return daemon, node

    def add_keeper(self, *args: str) -> tuple[Daemon, Node]:
        n = len(self.keepers)
        node = self.lab.node(f"k{n}")
        data = self.root / f"keeper{n}"
        argv = [
            str(BIN / "dfs-keeper"),
            "--listen", f"{node.addr}:0",
            "--tracker", self.tracker_addr,
            "--data", str(data),
            "--heartbeat-s", str(self.heartbeat_s),
            "--log-level", "INFO",
            *args,
        ]  # fmt: skip
        keeper = Daemon(
            f"keeper{n}", node.exec_argv(argv), data, self.root / f"keeper{n}.log",
            "dfs-keeper: serving on",
        )  # fmt: skip
        self.keepers.append((keeper, node))
        keeper.start(self.env)
        return keeper, node

    def restart(self, daemon: Daemon) -> None:
        """SIGKILL `daemon` and start it again on its host and port."""
        daemon.kill()
        daemon.restarts += 1
        daemon.start(self.env)

    def dfs_argv(self, *args: str) -> list[str]:
        """`dfs ARGS` on the client host."""
        return self.client.exec_argv([str(BIN / "dfs"), "--tracker", self.tracker_addr, *args])

    def dfs(self, *args: str, check: bool = True, timeout: float = 300) -> str:
        argv = self.dfs_argv(*args)
        result = subprocess.run(argv, capture_output=True, text=True, env=self.env, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"dfs {' '.join(args)} failed: {result.stderr}")
        return result.stdout

    def dfs_background(self, *args: str) -> subprocess.Popen[str]:
        """Start `dfs ARGS` on the client host and return at once (the caller waits for it or
        kills it)."""
        return subprocess.Popen(
            self.dfs_argv(*args),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self.env,
        )

    def status(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.dfs("status", "--json"))
        return data

    def alive(self) -> int:
        return sum(1 for k in self.status()["keepers"] if k["state"] == "alive")

    def wait_alive(self, count: int, timeout: float = REGISTER_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while self.alive() != count:
            assert time.monotonic() < deadline, f"{count} keepers did not register across hops"
            time.sleep(0.2)

    def healthy(self) -> bool:
        argv = self.dfs_argv("fsck", "--json")
        result = subprocess.run(argv, capture_output=True, env=self.env, timeout=120)
        return result.returncode == 0

    def mount(self, name: str, *extra: str, host: Node | None = None) -> NetMount:
        """A `dfs-mount` on `host` (the client host by default; another `lab.node()` for a
        mount that can be partitioned apart from the others), seen by the test at root/NAME."""
        path = self.root / name
        path.mkdir()
        log = self.root / f"{name}.log"
        argv = (host or self.client).net_argv(
            [str(BIN / "dfs-mount"), str(path), "--tracker", self.tracker_addr, "--foreground",
             "--log-level", "INFO", *extra]
        )  # fmt: skip
        with open(log, "wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=out, env=self.env)
        m = NetMount(path, log, proc)
        self.mounts.append(m)
        deadline = time.monotonic() + MOUNT_TIMEOUT_S
        while not (is_mounted(path) and os.path.ismount(path)):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"dfs-mount did not mount:\n{log.read_text()}")
            time.sleep(0.05)
        return m

    def stop(self) -> None:
        for m in self.mounts:
            m.stop()
        for keeper, _ in self.keepers:
            keeper.stop()
        for tracker in self.trackers if self.tracker is not None else []:
            tracker.stop()

    def logs(self) -> str:
        daemons = [d for d, _ in self.keepers] + (self.trackers if self.tracker else [])
        return "\n".join(d.logs() for d in daemons) + "".join(
            m.log.read_text(errors="replace") for m in self.mounts
        )


@contextmanager
def net_cluster(
    root: Path,
    *,
    lab: NetLab | None = None,
    wire: Wire | None = None,
    keepers: int = KEEPERS,
    trackers: int = 1,
    tracker_args: Sequence[str] = (),
    **settings: Any,
) -> Iterator[NetCluster]:
    """`trackers` trackers (the first active, the others standing by on the store that
    `tracker_args` names), `keepers` keepers all registered, and a client host, in `lab` or
    in a lab of its own (veth and a bridge, or the userspace `wire`); every process stopped
    when the block ends, and the lab removed if it made it."""
    own_lab = lab is None
    if lab is None:
        lab = NetLab(wire=wire)
    cluster: NetCluster | None = None
    try:
        cluster = NetCluster(lab, root, tracker_args=list(tracker_args), **settings)
        cluster.start_tracker()
        for _ in range(trackers - 1):
            cluster.add_tracker()
        for _ in range(keepers):
            cluster.add_keeper()
        cluster.wait_alive(keepers)
        yield cluster
    finally:
        try:
            if cluster is not None:
                cluster.stop()
        finally:
            if own_lab:
                lab.close()
