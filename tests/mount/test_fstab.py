"""Mounted from an fstab line, as a client host does at boot: `mount -T FSTAB MOUNTPOINT` runs
fuse3's mount.fuse3, which runs `dfs-mount TRACKERS MOUNTPOINT -o OPTIONS`; `umount` ends it.

mount.fuse3 looks the program up on a fixed PATH (/usr/local/sbin:/usr/local/bin:/usr/sbin:
/usr/bin:/sbin:/bin), where `pip install` puts it on a client host; the test links this
checkout's dfs-mount into /usr/local/sbin for its duration (unless a real install is there).

The line's options carry dfs settings (the secret file, sync_on_close), mount(8)'s own
(`_netdev`, `nofail`, `x-systemd.*`) and FUSE's (`default_permissions`): each must land where
it belongs, or the mount fails or behaves otherwise.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import MakeCluster
from tests.mount.conftest import BIN, fusermount_u, is_mounted
from tests.mount.test_durability_levels import cluster_with_metrics, unsynced

pytestmark = pytest.mark.mount

CHUNK = 1 << 20


HELPER_PATH_LINK = Path("/usr/local/sbin/dfs-mount")


@contextmanager
def dfs_mount_on_helper_path() -> Iterator[None]:
    """This checkout's dfs-mount where mount.fuse3 finds it, for the test's duration; a real
    installed file is left alone (and used)."""
    ours = BIN / "dfs-mount"
    if HELPER_PATH_LINK.exists() and not HELPER_PATH_LINK.is_symlink():
        yield
        return
    HELPER_PATH_LINK.unlink(missing_ok=True)  # a link left by an earlier checkout
    HELPER_PATH_LINK.parent.mkdir(parents=True, exist_ok=True)
    HELPER_PATH_LINK.symlink_to(ours)
    try:
        yield
    finally:
        HELPER_PATH_LINK.unlink(missing_ok=True)


def mount_pids(mountpoint: Path) -> list[int]:
    """The dfs-mount processes serving `mountpoint` (started detached by mount(8))."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(b"dfsmount" in a or b"dfs-mount" in a for a in argv) and (
            os.fsencode(mountpoint) in argv
        ):
            pids.append(int(entry.name))
    return pids


def test_an_fstab_line_mounts_and_umount_ends_it(make_cluster: MakeCluster, tmp_path: Path) -> None:
    cluster, ports = cluster_with_metrics(make_cluster)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    options = ",".join(
        [
            "_netdev",
            "nofail",
            "x-systemd.requires=network-online.target",
            f"secret_file={cluster.secret_file}",
            "sync_on_close",
            "default_permissions",
            "cache-mb=32",
        ]
    )
    fstab = tmp_path / "fstab"
    fstab.write_text(f"{cluster.tracker_addr}  {mnt}  fuse.dfs-mount  {options}  0 0\n")
    # Nothing from the environment: every setting must come from the line.
    env = {k: v for k, v in os.environ.items() if not k.startswith("DFS_")}
    with contextlib.ExitStack() as stack:
        stack.enter_context(dfs_mount_on_helper_path())
        stack.callback(stop_mount, mnt)
        result = subprocess.run(
            ["mount", "-T", str(fstab), str(mnt)],
            capture_output=True,
            text=True,
            env=env,
            timeout=90,
        )
        assert result.returncode == 0, result.stderr
        assert is_mounted(mnt)
        assert len(mount_pids(mnt)) == 1

        data = os.urandom(CHUNK + 123)
        (mnt / "from-fstab").write_bytes(data)
        assert unsynced(ports) == 0  # sync_on_close from the line: close returned synced
        out = tmp_path / "back"
        cluster.dfs("get", "/from-fstab", str(out))
        assert out.read_bytes() == data

        result = subprocess.run(["umount", str(mnt)], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert not is_mounted(mnt)
        deadline = time.monotonic() + 30
        while mount_pids(mnt) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert mount_pids(mnt) == [], "dfs-mount did not exit after umount"


def stop_mount(mnt: Path) -> None:
    fusermount_u(mnt)
    for pid in mount_pids(mnt):
        os.kill(pid, 9)


def test_the_fstab_form_rejects_a_bad_setting(make_cluster: MakeCluster, tmp_path: Path) -> None:
    """A dfs setting given with -o is checked like its flag: one line, exit 2, no mount."""
    cluster = make_cluster(keepers=1, replication=1)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    result = subprocess.run(
        [str(BIN / "dfs-mount"), cluster.tracker_addr, str(mnt), "-o", "cache_mb=lots"],
        capture_output=True,
        text=True,
        env=cluster.env,
        timeout=60,
    )
    assert result.returncode == 2
    assert "cache_mb" in result.stderr
    assert "Traceback" not in result.stderr
    assert not is_mounted(mnt)
