"""Real tracker and keeper processes on 127.0.0.1 for tests.

Processes are started from the installed console scripts, bind port 0 and announce their
address on a ready line on stderr, which is read from their log file. Every process is
registered with its `ProcCluster`, and the fixture that made the cluster stops each one by PID
when the test ends, whether it passed or not.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from cluster import auth
from cluster import messages as m
from cluster.client import Client
from cluster.errors import NotActive
from cluster.rpc import ConnectionPool

BIN = Path(sys.executable).parent
START_TIMEOUT_S = 20.0


def _wait_ready(proc: subprocess.Popen[bytes], log: Path, prefix: str) -> str:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if log.exists():
            for line in log.read_text(errors="replace").splitlines():
                if line.startswith(prefix):
                    return line.rsplit(" ", 1)[1]
        if proc.poll() is not None:
            raise RuntimeError(f"{prefix} exited with {proc.returncode}:\n{log.read_text()}")
        time.sleep(0.05)
    raise RuntimeError(f"{prefix} not ready in {START_TIMEOUT_S}s:\n{log.read_text()}")


def _in_trio() -> bool:
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        return False
    return True


@dataclass
class Daemon:
    name: str
    argv: list[str]
    data_dir: Path
    log: Path
    ready_prefix: str
    proc: subprocess.Popen[bytes] | None = None
    addr: str = ""
    restarts: int = 0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def port(self) -> int:
        return int(self.addr.rsplit(":", 1)[1])

    def start(self, env: dict[str, str]) -> None:
        self.launch(env)
        self.wait_ready()

    def launch(self, env: dict[str, str]) -> None:
        """Start the process without waiting for it to be ready (`wait_ready`): several
        daemons then start side by side, which is most of a test cluster's start-up."""
        argv = list(self.argv)
        if self.addr:  # a restart comes back on the same port
            argv[argv.index("--listen") + 1] = self.addr
        self.log = self.log.with_name(f"{self.name}.{self.restarts}.log")
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=out, env=env)

    def wait_ready(self) -> None:
        assert self.proc is not None
        self.addr = _wait_ready(self.proc, self.log, self.ready_prefix)

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL and reap."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGCONT)
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def wait_exit(self, timeout: float = 60) -> int:
        """The exit status, once the process has exited (after a signal of its own)."""
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def logs(self) -> str:
        return "".join(
            p.read_text(errors="replace")
            for p in sorted(self.log.parent.glob(f"{self.name}.*.log"))
        )


@dataclass
class ProcCluster:
    root: Path
    replication: int
    chunk_size: int
    heartbeat_s: float
    dead_after_s: float
    tracker_args: list[str] = field(default_factory=list)
    keeper_args: list[str] = field(default_factory=list)
    extra_env: dict[str, str] = field(default_factory=dict)
    tracker: Daemon | None = None
    keepers: list[Daemon] = field(default_factory=list)
    # More trackers on the same store (PostgreSQL), standing by: `add_tracker`.
    standbys: list[Daemon] = field(default_factory=list)

    @property
    def secret_file(self) -> Path:
        return self.root / "secret"

    @property
    def trackers(self) -> list[Daemon]:
        """The first tracker and those added with `add_tracker`."""
        assert self.tracker is not None
        return [self.tracker, *self.standbys]

    @property
    def tracker_addr(self) -> str:
        """The `tracker` setting: the tracker's HOST:PORT, or the list of them."""
        return ",".join(d.addr for d in self.trackers if d.addr)

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        for key in list(env):
            if key.startswith("DFS_"):
                del env[key]
        env["DFS_SECRET_FILE"] = str(self.secret_file)
        env.update(self.extra_env)
        if self.tracker is not None and self.tracker.addr:
            env["DFS_TRACKER"] = self.tracker_addr
        return env

    def start_tracker(self) -> Daemon:
        if not self.secret_file.exists():
            auth.new_secret(self.secret_file)
        data = self.root / "tracker"
        self.tracker = Daemon(
            "tracker",
            [
                str(BIN / "dfs-tracker"),
                "--listen", "127.0.0.1:0",
                "--data", str(data),
                "--replication", str(self.replication),
                "--chunk-size", str(self.chunk_size),
                "--heartbeat-s", str(self.heartbeat_s),
                "--dead-after-s", str(self.dead_after_s),
                "--log-level", "INFO",
                *self.tracker_args,
            ],
            data,
            self.root / "tracker.log",
            "dfs-tracker: listening on",
        )  # fmt: skip
        self.tracker.start(self.env)
        return self.tracker

    def add_tracker(self) -> Daemon:
        """Start one more tracker with the first one's flags (so on its store, which must be
        PostgreSQL to be shared) on a port of its own: it stands by while another is active."""
        assert self.tracker is not None
        n = len(self.standbys) + 1
        argv = list(self.tracker.argv)
        argv[argv.index("--listen") + 1] = "127.0.0.1:0"
        data = self.root / f"tracker{n}"
        argv[argv.index("--data") + 1] = str(data)
        daemon = Daemon(
            f"tracker{n}", argv, data, self.root / f"tracker{n}.log", "dfs-tracker: listening on"
        )
        self.standbys.append(daemon)
        daemon.start(self.env)
        return daemon

    def add_keeper(
        self, capacity: int | None = None, zone: str = "", args: Sequence[str] = ()
    ) -> Daemon:
        """Start one more keeper; `args` are flags for this one only (e.g. `--metrics`)."""
        keeper = self.launch_keeper(capacity, zone, args)
        keeper.wait_ready()
        return keeper

    def launch_keeper(
        self, capacity: int | None = None, zone: str = "", args: Sequence[str] = ()
    ) -> Daemon:
        """`add_keeper` without waiting for it to be ready (`Daemon.wait_ready`)."""
        n = len(self.keepers)
        data = self.root / f"keeper{n}"
        argv = [
            str(BIN / "dfs-keeper"),
            "--listen", "127.0.0.1:0",
            "--tracker", self.tracker_addr,
            "--data", str(data),
            "--heartbeat-s", str(self.heartbeat_s),
            "--log-level", "INFO",
            *self.keeper_args,
            *args,
        ]  # fmt: skip
        if capacity is not None:
            argv += ["--capacity", str(capacity)]
        if zone:
            argv += ["--zone", zone]
        keeper = Daemon(
            f"keeper{n}", argv, data, self.root / f"keeper{n}.log", "dfs-keeper: serving on"
        )
        self.keepers.append(keeper)
        keeper.launch(self.env)
        return keeper

    def restart(self, daemon: Daemon) -> None:
        daemon.kill()
        daemon.restarts += 1
        daemon.start(self.env)

    def dfs(
        self, *args: str, check: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(BIN / "dfs"), "--tracker", self.tracker_addr, *args],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"dfs {' '.join(args)} failed ({result.returncode}): {result.stderr}"
            )
        return result

    def dfs_background(self, *args: str) -> subprocess.Popen[str]:
        """Start `dfs ARGS` and return at once (the caller waits for it or kills it)."""
        return subprocess.Popen(
            [str(BIN / "dfs"), "--tracker", self.tracker_addr, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self.env,
        )

    @asynccontextmanager
    async def client(self, **options: Any) -> AsyncIterator[Client]:
        """The client library, connected to this cluster (inside `trio.run`)."""
        settings = {"secret_file": str(self.secret_file), "tls_ca": self.env.get("DFS_TLS_CA")}
        credentials = auth.Credentials.from_settings(settings)
        async with Client.connect(self.tracker_addr, credentials, **options) as client:
            yield client

    def status(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.dfs("status", "--json").stdout)
        return data

    def stat(self, path: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.dfs("stat", "--json", path).stdout)
        return data

    def keeper_state(self, keeper: Daemon) -> str:
        """What `dfs status` says of `keeper`: alive, leaving, draining or dead."""
        for entry in self.status()["keepers"]:
            if entry["addr"] == keeper.addr:
                return str(entry["state"])
        raise AssertionError(f"{keeper.name} at {keeper.addr} is not in dfs status")

    def wait_alive(self, count: int, timeout: float = 20) -> None:
        """Until exactly `count` keepers are registered and alive (asked through the client
        library in this process: a `dfs status` per poll cost a Python start each; from
        inside a trio test, which cannot start another trio loop, through `dfs status`)."""
        if _in_trio():
            deadline = time.monotonic() + timeout
            while True:
                alive = sum(1 for k in self.status()["keepers"] if k["state"] == "alive")
                if alive == count:
                    return
                if time.monotonic() > deadline:
                    raise AssertionError(f"{alive} keepers alive, expected {count}")
                time.sleep(0.1)

        async def poll() -> None:
            alive = 0
            async with self.client() as client:
                with trio.move_on_after(timeout):
                    while True:
                        keepers = (await client.cluster_status()).keepers
                        alive = sum(1 for k in keepers if k["state"] == "alive")
                        if alive == count:
                            return
                        await trio.sleep(0.05)
                raise AssertionError(f"{alive} keepers alive, expected {count}")

        trio.run(poll)

    def stop(self) -> None:
        for daemon in [*self.keepers, self.tracker, *self.standbys]:
            if daemon is not None:
                daemon.stop()

    def fsck(self, path: str = "/") -> tuple[int, dict[str, Any]]:
        result = self.dfs("fsck", "--json", path, check=False)
        if result.returncode not in (0, 1, 2):
            raise AssertionError(f"dfs fsck failed: {result.stderr}")
        report: dict[str, Any] = json.loads(result.stdout)
        return result.returncode, report

    def healthy(self) -> bool:
        return self.fsck()[0] == 0

    def logs(self) -> str:
        parts = [d.logs() for d in [self.tracker, *self.standbys, *self.keepers] if d is not None]
        return "\n".join(parts)


def free_port() -> int:
    """A port that was free a moment ago (for servers that cannot report theirs)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `check` until it holds; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.2)


def kill_once_under_way(
    transfer: subprocess.Popen[Any], stored: Callable[[], int], kill: Callable[[], None], what: str
) -> float:
    """Wait until `transfer` (a put or cp) has `stored()` ten chunk files and is still going,
    then `kill()` (the active tracker): the takeover tests' cut. Returns time.monotonic() at
    the kill."""
    wait_until(lambda: stored() >= 10, 60, f"the {what} to be under way")
    assert transfer.poll() is None, f"the {what} finished before the kill"
    kill()
    return time.monotonic()


def first_active_answer(secret_file: Path, addr: str, since: float, timeout: float) -> float:
    """Seconds from `since` (time.monotonic) to the first request the tracker at `addr`
    answers as the active tracker (polled every 20 ms, straight to it, through the client
    library's own pool): a takeover's time, as a client sees it."""

    async def poll() -> float:
        credentials = auth.Credentials.from_settings({"secret_file": str(secret_file)})
        pool = ConnectionPool("client", credentials)
        try:
            with trio.fail_after(timeout):
                while True:
                    try:
                        await pool.call(addr, m.StatFs(), m.StatFsReply)
                        return time.monotonic() - since
                    except NotActive:
                        await trio.sleep(0.02)
        finally:
            await pool.aclose()

    return trio.run(poll)


def chunk_files(data_dir: Path) -> list[Path]:
    return sorted((data_dir / "chunks").glob("*/chunk_*.dfs"))


def scrape(port: int) -> dict[str, float]:
    """The Prometheus metrics served on 127.0.0.1:`port`, by series name with labels."""
    url = f"http://127.0.0.1:{port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        match = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[^}]*\})?) (\S+)", line)
        assert match, f"not Prometheus text format: {line!r}"
        values[match[1]] = float(match[2])
    return values
