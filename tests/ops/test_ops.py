"""Issue 6: systemd units, readiness notification, metrics, the status page, config errors and
graceful shutdown, on real processes."""

from __future__ import annotations

import filecmp
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.cluster_procs import BIN, ProcCluster, free_port, wait_until
from tests.conftest import MakeCluster, random_file
from tests.mount.conftest import fusermount_u, is_mounted

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
UNITS = sorted((ROOT / "systemd").glob("*.service"))


def test_unit_files_verify(tmp_path: Path) -> None:
    assert {u.name for u in UNITS} == {
        "dfs-tracker.service",
        "dfs-keeper@.service",
        "dfs-mount@.service",
    }
    checked = []
    for unit in UNITS:
        text = unit.read_text()
        assert "Type=notify" in text
        assert "Restart=on-failure" in text
        # Installed units run /usr/local/bin/dfs-*; here the same commands live in the venv.
        text = text.replace("/usr/local/bin/", f"{BIN}/")
        name = unit.name.replace("@.", "@instance.")
        (tmp_path / name).write_text(text)
        checked.append(str(tmp_path / name))
    result = subprocess.run(
        ["systemd-analyze", "verify", *checked], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr
    for unit in UNITS:
        if "mount" not in unit.name:
            text = unit.read_text()
            for hardening in (
                "User=dfs",
                "ProtectSystem=strict",
                "ReadWritePaths=",
                "NoNewPrivileges=true",
                "PrivateTmp=true",
            ):
                assert hardening in text, (unit.name, hardening)


class NotifyListener:
    """A datagram socket standing in for systemd's $NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(20)

    def expect(self, state: str) -> None:
        message = self.sock.recv(4096).decode()
        assert state in message.split("\n"), message

    def pending(self) -> list[str]:
        """Every message already sent and not read yet."""
        messages = []
        self.sock.setblocking(False)
        try:
            while True:
                messages.append(self.sock.recv(4096).decode())
        except BlockingIOError:
            return messages
        finally:
            self.sock.settimeout(20)

    def close(self) -> None:
        self.sock.close()


def test_daemons_notify_ready_only_when_serving_and_stopping_on_sigterm(
    cluster: ProcCluster, tmp_path: Path
) -> None:
    listener = NotifyListener(tmp_path / "notify")
    procs = []
    try:
        env = cluster.env | {"NOTIFY_SOCKET": str(listener.path)}
        for command, extra in (
            ("dfs-tracker", []),
            ("dfs-keeper", ["--tracker", cluster.tracker_addr]),
        ):
            port = free_port()
            argv = [str(BIN / command), "--listen", f"127.0.0.1:{port}"]
            argv += ["--data", str(tmp_path / command), *extra]
            proc = subprocess.Popen(argv, env=env, stderr=subprocess.DEVNULL)
            procs.append(proc)
            listener.expect("READY=1")
            # READY means serving: the port accepts a connection right now.
            with socket.create_connection(("127.0.0.1", port), timeout=2):
                pass
            proc.send_signal(signal.SIGTERM)
            listener.expect("STOPPING=1")
            assert proc.wait(timeout=30) == 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        listener.close()


def _mount_pids(mnt: Path) -> list[int]:
    """dfs-mount processes serving `mnt` (a detached one is not our child)."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(mnt).encode() in cmdline and any(
            b"dfs-mount" in a or b"dfsmount" in a for a in cmdline
        ):
            pids.append(int(entry))
    return pids


def test_dfs_mount_notifies_ready_once_mounted_and_stopping_at_the_end(
    cluster: ProcCluster, tmp_path: Path
) -> None:
    """As systemd's Type=notify needs: READY=1 once the mount point is live (with and without
    --foreground), STOPPING=1 on SIGTERM and when the kernel ends the session."""
    listener = NotifyListener(tmp_path / "notify")
    env = cluster.env | {"NOTIFY_SOCKET": str(listener.path)}
    mounts: list[Path] = []
    try:
        for foreground in (True, False):
            mnt = tmp_path / ("foreground" if foreground else "detached")
            mnt.mkdir()
            mounts.append(mnt)
            argv = [str(BIN / "dfs-mount"), str(mnt), "--tracker", cluster.tracker_addr]
            proc = subprocess.Popen(
                argv + (["--foreground"] if foreground else []),
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            listener.expect("READY=1")
            # READY means mounted and serving: the mount point works right now.
            assert is_mounted(mnt), "READY=1 before the mount"
            (mnt / "probe").write_bytes(b"ready")
            assert (mnt / "probe").read_bytes() == b"ready"
            if foreground:
                proc.send_signal(signal.SIGTERM)
                listener.expect("STOPPING=1")
                assert proc.wait(timeout=60) == 0
                # The end of the session may say it again; nothing else comes.
                assert set(listener.pending()) <= {"STOPPING=1"}
            else:
                assert proc.wait(timeout=60) == 0  # returned once mounted; the child serves
                subprocess.run(["fusermount3", "-u", str(mnt)], check=True, timeout=30)
                listener.expect("STOPPING=1")
                deadline = time.monotonic() + 60
                while _mount_pids(mnt):
                    assert time.monotonic() < deadline, "the mount process did not exit"
                    time.sleep(0.1)
                assert set(listener.pending()) <= {"STOPPING=1"}
            assert not is_mounted(mnt)
    finally:
        for mnt in mounts:
            fusermount_u(mnt)
            for pid in _mount_pids(mnt):
                os.kill(pid, signal.SIGKILL)
        listener.close()


def _scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        match = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[^}]*\})?) (\S+)", line)
        assert match, f"not Prometheus text format: {line!r}"
        values[match[1]] = float(match[2])
    return values


def test_metrics_count_the_bytes_of_a_put(make_cluster: MakeCluster, tmp_path: Path) -> None:
    tracker_port = free_port()
    ports = [free_port() for _ in range(2)]
    cluster = make_cluster(
        keepers=0, replication=2, tracker_args=["--metrics", f"127.0.0.1:{tracker_port}"]
    )
    for port in ports:
        cluster.keeper_args = ["--metrics", f"127.0.0.1:{port}"]
        cluster.add_keeper()
    cluster.wait_alive(2)

    def received() -> float:
        return sum(
            _scrape(port).get('dfs_payload_bytes_received_total{role="keeper"}', 0.0)
            for port in ports
        )

    before = received()
    size = 5 << 20
    cluster.dfs("put", str(random_file(tmp_path / "data", size)), "/data")
    assert received() - before >= 2 * size  # both copies came through a keeper's data port
    keeper = _scrape(ports[0])
    assert keeper["dfs_keeper_chunks"] >= 1
    assert keeper["dfs_keeper_free_bytes"] > 0
    assert any(k.startswith("dfs_request_seconds_bucket{") for k in keeper)
    wait_until(lambda: _scrape(tracker_port).get("dfs_keepers_alive") == 2, 10, "the keepers gauge")
    tracker = _scrape(tracker_port)
    assert "dfs_chunks_under_replicated" in tracker
    assert "dfs_replication_queue" in tracker
    assert tracker['dfs_request_seconds_count{role="tracker",type="CommitChunks"}'] >= 1


def _api_status(port: int) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(
        urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status", timeout=10).read()
    )
    return data


def _without_clock(status: dict[str, Any]) -> dict[str, Any]:
    """The status minus the one field that changes by itself (seconds since last heard)."""
    keepers = [
        {k: v for k, v in keeper.items() if k != "last_seen_s"} for keeper in status["keepers"]
    ]
    return status | {"keepers": keepers}


def test_status_page_in_headless_chromium(make_cluster: MakeCluster, tmp_path: Path) -> None:
    port = free_port()
    # A fixed capacity, so that both views of the cluster can be compared field by field.
    cluster = make_cluster(
        keepers=3, capacity=1 << 30, tracker_args=["--http", f"127.0.0.1:{port}"]
    )
    status = _api_status(port)
    assert _without_clock(status) == _without_clock(cluster.status())
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "status-page.png"
    shot.unlink(missing_ok=True)
    chromium = [
        "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        # Less virtual time than the page's 5 s meta refresh, or the dump lands mid-reload.
        "--disable-sync", f"--user-data-dir={tmp_path / 'chromium'}", "--virtual-time-budget=2000",
    ]  # fmt: skip
    dom = subprocess.run(
        [*chromium, "--dump-dom", f"http://127.0.0.1:{port}/"],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    for keeper in cluster.keepers:
        assert keeper.addr in dom, f"{keeper.addr} not on the rendered page"
    subprocess.run(
        [*chromium, f"--screenshot={shot}", "--window-size=1100,500", f"http://127.0.0.1:{port}/"],
        capture_output=True, timeout=120, check=True,
    )  # fmt: skip
    assert shot.stat().st_size > 1000


def test_a_typo_in_the_config_names_the_key(tmp_path: Path) -> None:
    config = tmp_path / "dfs.toml"
    config.write_text('[tracker]\nlisten = "127.0.0.1:0"\nreplicaton = 2\n')
    result = subprocess.run(
        [str(BIN / "dfs-tracker"), "--config", str(config), "--data", str(tmp_path / "t")],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2
    assert "replicaton" in result.stderr
    assert "Traceback" not in result.stderr
    config.write_text('[keeper]\nheartbeat_s = "often"\n')
    result = subprocess.run(
        [str(BIN / "dfs-keeper"), "--config", str(config), "--listen", "127.0.0.1:0",
         "--data", str(tmp_path / "k")],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2
    assert "heartbeat_s" in result.stderr


def test_flag_beats_environment_beats_file(tmp_path: Path) -> None:
    from argparse import Namespace

    from cluster import config

    file = tmp_path / "dfs.toml"
    file.write_text("[cluster]\nreplication = 2\n[tracker]\ndead_after_s = 7\n")
    args = Namespace(config=str(file), replication=None, dead_after_s=None)
    assert config.load("tracker", args, {})["replication"] == 2
    assert config.load("tracker", args, {"DFS_REPLICATION": "4"})["replication"] == 4
    args.replication = "5"
    assert config.load("tracker", args, {"DFS_REPLICATION": "4"})["replication"] == 5
    assert config.load("tracker", args, {})["dead_after_s"] == 7.0


def test_sigterm_on_a_keeper_during_a_put(cluster: ProcCluster, tmp_path: Path) -> None:
    data = random_file(tmp_path / "data", 160 << 20)
    result: dict[str, subprocess.CompletedProcess[str]] = {}
    putter = threading.Thread(
        target=lambda: result.update(put=cluster.dfs("put", str(data), "/data", check=False))
    )
    victim = cluster.keepers[0]
    chunks_before = len(list((victim.data_dir / "chunks").glob("*/*.dfs")))
    putter.start()
    wait_until(
        lambda: len(list((victim.data_dir / "chunks").glob("*/*.dfs"))) > chunks_before + 2,
        60,
        "the put to start",
    )
    victim.signal(signal.SIGTERM)
    putter.join(timeout=300)
    assert result["put"].returncode == 0, result["put"].stderr
    assert victim.proc is not None
    assert victim.proc.wait(timeout=60) == 0  # a clean exit, after finishing its transfers
    assert "finishing transfers in flight" in victim.logs()
    cluster.dfs("get", "/data", str(tmp_path / "out"))
    assert filecmp.cmp(data, tmp_path / "out", shallow=False)
    assert os.path.getsize(tmp_path / "out") == 160 << 20
    time.sleep(0)
