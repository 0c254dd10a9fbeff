"""POSIX permissions on the mount, checked by the kernel (`default_permissions`), seen by a
second, unprivileged user through `-o allow_other`, and compared with ext4."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import MakeCluster
from tests.mount.conftest import MountFactory

pytestmark = pytest.mark.mount

NOBODY = 65534

# Run as the unprivileged user; prints [[step, result], ...] as JSON.
AS_NOBODY = r"""
import errno, json, os, stat, sys
root = sys.argv[1]
out = []
def p(name): return os.path.join(root, name)
def step(name, fn):
    try:
        value = fn()
    except OSError as exc:
        value = errno.errorcode.get(exc.errno, exc.errno)
    out.append([name, "ok" if value is None else value])
def write(name, data=b"x", flags=os.O_WRONLY | os.O_CREAT):
    def run():
        fd = os.open(p(name), flags, 0o666)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
    return run
def mode(name): return lambda: oct(os.lstat(p(name)).st_mode)
def owner(name): return lambda: [os.lstat(p(name)).st_uid, os.lstat(p(name)).st_gid]

step("read private", lambda: open(p("private"), "rb").read() and None)
step("read readonly", lambda: open(p("readonly"), "rb").read().decode())
step("write readonly", write("readonly"))
step("truncate readonly", lambda: os.truncate(p("readonly"), 0))
step("chmod readonly", lambda: os.chmod(p("readonly"), 0o666))
step("chown readonly", lambda: os.chown(p("readonly"), os.getuid(), -1))
step("utime readonly now", lambda: os.utime(p("readonly")))
step("utime readonly explicit", lambda: os.utime(p("readonly"), (1, 1)))
step("list closed", lambda: os.listdir(p("closed")))
step("stat in closed", lambda: os.stat(p("closed/inside")) and None)
step("create in root dir", write("mine-at-top"))
step("mkdir in root dir", lambda: os.mkdir(p("dir-at-top")))
step("rmdir pub", lambda: os.rmdir(p("pub")))
step("create pub/mine", write("pub/mine", b"mine"))
step("owner pub/mine", owner("pub/mine"))
step("mode pub/mine", mode("pub/mine"))
step("chmod pub/mine", lambda: os.chmod(p("pub/mine"), 0o600))
step("mode pub/mine after", mode("pub/mine"))
step("chown pub/mine to root", lambda: os.chown(p("pub/mine"), 0, -1))
step("chgrp pub/mine to root", lambda: os.chown(p("pub/mine"), -1, 0))
step("utime pub/mine explicit", lambda: os.utime(p("pub/mine"), ns=(5, 123456789)))
step("mtime pub/mine", lambda: os.stat(p("pub/mine")).st_mtime_ns)
step("mkdir pub/d", lambda: os.mkdir(p("pub/d"), 0o750))
step("mode pub/d", mode("pub/d"))
step("symlink pub/l", lambda: os.symlink("mine", p("pub/l")))
step("mkfifo pub/fifo", lambda: os.mkfifo(p("pub/fifo"), 0o640))
step("mode pub/fifo", mode("pub/fifo"))
step("unlink sticky/roots", lambda: os.unlink(p("sticky/roots")))
step("rename sticky/roots", lambda: os.rename(p("sticky/roots"), p("sticky/moved")))
step("create sticky/mine", write("sticky/mine"))
step("unlink sticky/mine", lambda: os.unlink(p("sticky/mine")))
step("write suid", write("suid", b"y", os.O_WRONLY))
step("mode suid after write", mode("suid"))
step("mkdir sgid/sub", lambda: os.mkdir(p("sgid/sub")))
step("mode sgid/sub", mode("sgid/sub"))
step("owner sgid/sub", owner("sgid/sub"))
step("create sgid/f", write("sgid/f"))
step("owner sgid/f", owner("sgid/f"))
step("link to private", lambda: os.link(p("private"), p("pub/hard")))
print(json.dumps(out))
"""


def prepare(root: Path) -> None:
    """As root: the same starting tree in the mount and on ext4."""
    root.chmod(0o755)
    (root / "private").write_bytes(b"secret")
    (root / "private").chmod(0o600)
    (root / "readonly").write_bytes(b"readable")
    (root / "readonly").chmod(0o644)
    (root / "pub").mkdir()
    (root / "pub").chmod(0o777)
    (root / "closed").mkdir()
    (root / "closed" / "inside").touch()
    (root / "closed").chmod(0o700)
    (root / "sticky").mkdir()
    (root / "sticky").chmod(0o1777)
    (root / "sticky" / "roots").write_bytes(b"root's")
    (root / "sticky" / "roots").chmod(0o666)
    (root / "suid").write_bytes(b"x")
    (root / "suid").chmod(0o4777)
    (root / "sgid").mkdir()
    os.chown(root / "sgid", 0, 0)
    (root / "sgid").chmod(0o2777)


def as_nobody(root: Path) -> list[list[object]]:
    # The system interpreter: ours may live where the unprivileged user cannot go (/root).
    python = shutil.which("python3", path="/usr/bin:/bin")
    assert python is not None, "no system python3 for the unprivileged user"
    result = subprocess.run(
        [python, "-c", AS_NOBODY, str(root)],
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",
    )
    assert result.returncode == 0, result.stderr
    steps: list[list[object]] = json.loads(result.stdout)
    return steps


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory the unprivileged user can reach (tmp_path is root's, mode 0700)."""
    base = Path(tempfile.mkdtemp(prefix="dfs-perm-", dir="/tmp"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_permissions_match_ext4_for_another_user(
    public_dir: Path, make_cluster: MakeCluster, mount: MountFactory
) -> None:
    # public_dir comes first: set up before the mount, removed after it is unmounted.
    cluster = make_cluster(keepers=1, replication=1)
    m = mount(cluster, "perm", "-o", "allow_other", at=public_dir / "mnt")
    local = public_dir / "local"
    local.mkdir()
    for root in (local, m.path):
        prepare(root)
    expected = as_nobody(local)
    got = as_nobody(m.path)
    mismatches = [(e[0], e[1], g[1]) for e, g in zip(expected, got, strict=True) if e != g]
    assert not mismatches, "step, ext4, dfs:\n" + "\n".join(map(str, mismatches))
    results = {str(name): value for name, value in expected}
    assert results["read private"] == "EACCES"
    assert results["chmod readonly"] == "EPERM"
    assert results["unlink sticky/roots"] == "EPERM"
    assert not int(str(results["mode suid after write"]), 8) & stat.S_ISUID
    # What nobody did, root sees the same way on another mount.
    other = mount(cluster, "other")
    assert os.stat(other.path / "pub" / "mine").st_uid == NOBODY
    assert (other.path / "pub" / "mine").read_bytes() == b"mine"
