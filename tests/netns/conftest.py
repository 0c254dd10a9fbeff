"""A dfs cluster spread over network namespaces (tests/netlab.py): the tracker, each keeper
and the client side (a `dfs-mount` and the `dfs` command) each on a host of their own.

Every process is stopped by PID and every mount unmounted when the test ends, then the
namespaces are removed, whatever the outcome.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from cluster import auth
from tests.cluster_procs import BIN, Daemon
from tests.mount.conftest import MOUNT_TIMEOUT_S, fusermount_u, is_mounted
from tests.netlab import NetLab, Node


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
    tracker: Daemon | None = None
    tracker_node: Node | None = None
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
    def tracker_addr(self) -> str:
        assert self.tracker is not None
        return self.tracker.addr

    def start_tracker(self) -> Node:
        node = self.lab.node("t")
        data = self.root / "tracker"
        argv = [
            str(BIN / "dfs-tracker"),
            "--listen", f"{node.addr}:0",
            "--data", str(data),
            "--replication", str(self.replication),
            "--heartbeat-s", str(self.heartbeat_s),
            "--dead-after-s", str(self.dead_after_s),
            "--log-level", "INFO",
        ]  # fmt: skip
        self.tracker = Daemon(
            "tracker", node.exec_argv(argv), data, self.root / "tracker.log",
            "dfs-tracker: listening on",
        )  # fmt: skip
        self.tracker_node = node
        self.tracker.start(self.env)
        return node

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

    def dfs(self, *args: str, check: bool = True, timeout: float = 300) -> str:
        argv = self.client.exec_argv([str(BIN / "dfs"), "--tracker", self.tracker_addr, *args])
        result = subprocess.run(argv, capture_output=True, text=True, env=self.env, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"dfs {' '.join(args)} failed: {result.stderr}")
        return result.stdout

    def status(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.dfs("status", "--json"))
        return data

    def alive(self) -> int:
        return sum(1 for k in self.status()["keepers"] if k["state"] == "alive")

    def healthy(self) -> bool:
        argv = self.client.exec_argv(
            [str(BIN / "dfs"), "--tracker", self.tracker_addr, "fsck", "--json"]
        )
        result = subprocess.run(argv, capture_output=True, env=self.env, timeout=120)
        return result.returncode == 0

    def mount(self, name: str, *extra: str) -> NetMount:
        path = self.root / name
        path.mkdir()
        log = self.root / f"{name}.log"
        argv = self.client.net_argv(
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
        if self.tracker is not None:
            self.tracker.stop()

    def logs(self) -> str:
        daemons = [d for d, _ in self.keepers] + ([self.tracker] if self.tracker else [])
        return "\n".join(d.logs() for d in daemons) + "".join(
            m.log.read_text(errors="replace") for m in self.mounts
        )


@pytest.fixture
def net_cluster(tmp_path: Path) -> Iterator[NetCluster]:
    """A tracker and three keepers (replication 2), each on a host of its own, and a client
    host; `net_cluster.lab` partitions and heals them."""
    lab = NetLab()
    cluster: NetCluster | None = None
    try:
        cluster = NetCluster(lab, tmp_path)
        cluster.start_tracker()
        for _ in range(3):
            cluster.add_keeper()
        deadline = time.monotonic() + 30
        while cluster.alive() != 3:
            assert time.monotonic() < deadline, "keepers did not register across the bridge"
            time.sleep(0.2)
        yield cluster
    finally:
        try:
            if cluster is not None:
                cluster.stop()
        finally:
            lab.close()
