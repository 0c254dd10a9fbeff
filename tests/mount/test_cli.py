"""The dfs-mount command: clear one-line errors, a detached start that returns once mounted,
and clean exits on SIGTERM (after flushing) and on fusermount3 -u."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from cluster import auth
from tests.cluster_procs import ProcCluster
from tests.conftest import MakeCluster
from tests.mount.conftest import BIN, MountFactory, fusermount_u, is_mounted

pytestmark = pytest.mark.mount


def dfs_mount(
    *args: str | Path, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "dfs-mount"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def one_line_error(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines, result.stderr
    assert lines[-1].startswith("dfs-mount: "), result.stderr
    for word in words:
        assert word in lines[-1], result.stderr


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_bad_mountpoints_and_missing_tools(cluster: ProcCluster, tmp_path: Path) -> None:
    addr, env = cluster.tracker_addr, cluster.env
    result = dfs_mount(tmp_path / "nope", "--tracker", addr, "--foreground", env=env)
    one_line_error(result, "does not exist")
    full = tmp_path / "full"
    full.mkdir()
    (full / "something").touch()
    one_line_error(dfs_mount(full, "--tracker", addr, "--foreground", env=env), "not empty")
    one_line_error(dfs_mount(full / "something", "--tracker", addr, env=env), "not a directory")
    empty = tmp_path / "empty"
    empty.mkdir()
    no_path = dict(env, PATH="/nonexistent")
    one_line_error(dfs_mount(empty, "--tracker", addr, env=no_path), "fusermount3")
    assert not is_mounted(empty)


def test_unreachable_tracker_and_bad_secrets(cluster: ProcCluster, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    started = time.monotonic()
    for extra in (["--foreground"], []):
        tracker = f"127.0.0.1:{free_port()}"
        result = dfs_mount(
            mnt, "--tracker", tracker, "--retry-window-s", "1", *extra, env=cluster.env
        )
        one_line_error(result, "tracker")
    assert time.monotonic() - started < 30

    env = {k: v for k, v in cluster.env.items() if k != "DFS_SECRET_FILE"}
    one_line_error(dfs_mount(mnt, "--tracker", cluster.tracker_addr, env=env), "secret")
    wrong = tmp_path / "wrong-secret"
    auth.new_secret(wrong)
    result = dfs_mount(mnt, "--tracker", cluster.tracker_addr, "--secret-file", wrong, env=env)
    one_line_error(result, "tracker")
    assert not is_mounted(mnt)


def _mount_processes(mnt: Path) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(mnt).encode() in cmdline and any(
            b"dfsmount" in arg or b"dfs-mount" in arg for arg in cmdline
        ):
            pids.append(int(entry))
    return pids


def test_detached_start_returns_when_mounted(cluster: ProcCluster, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        # capture_output: the command must return even though the mount lives on.
        result = dfs_mount(mnt, "--tracker", cluster.tracker_addr, env=cluster.env)
        assert result.returncode == 0, result.stderr
        assert f"dfs-mount: mounted {cluster.tracker_addr} at {mnt}" in result.stderr
        assert os.path.ismount(mnt)
        (mnt / "hello").write_text("hello")
        assert (mnt / "hello").read_text() == "hello"
        pids = _mount_processes(mnt)
        assert len(pids) == 1, pids
        subprocess.run(["fusermount3", "-u", str(mnt)], check=True, timeout=30)
        deadline = time.monotonic() + 30
        while _mount_processes(mnt):
            assert time.monotonic() < deadline, "dfs-mount did not exit after fusermount3 -u"
            time.sleep(0.05)
    finally:
        fusermount_u(mnt)
        for pid in _mount_processes(mnt):
            os.kill(pid, signal.SIGKILL)


def test_sigterm_flushes_open_files_and_unmounts(
    make_cluster: MakeCluster, mount: MountFactory, tmp_path: Path
) -> None:
    cluster = make_cluster()
    m = mount(cluster)
    data = os.urandom(300_000)  # far less than a chunk: only in the write buffer
    fd = os.open(m.path / "open-at-sigterm", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.kill(m.pid, signal.SIGTERM)
        assert m.proc is not None
        assert m.proc.wait(timeout=60) == 0, m.logs()
        assert not is_mounted(m.path)
    finally:
        try:
            os.close(fd)
        except OSError:
            pass  # the mount is gone
    m.check_logs()
    other = mount(cluster, "other")
    assert (other.path / "open-at-sigterm").read_bytes() == data


def _readahead_kb(path: Path) -> int:
    dev = os.stat(path).st_dev
    bdi = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
    return int(bdi.read_text())


def test_kernel_readahead_is_set_on_the_mount(cluster: ProcCluster, mount: MountFactory) -> None:
    assert _readahead_kb(mount(cluster, "default").path) == 1024
    assert _readahead_kb(mount(cluster, "tuned", "--readahead-kb", "2048").path) == 2048
