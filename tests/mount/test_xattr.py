"""Extended attributes through the mount, against ext4: the same calls in the mount and in a
local directory give the same values and the same errno, as root and as a second user; real
tools (`cp --preserve=xattr`, `cp -a`, `rsync -X`) carry them both ways; they outlive the
mount, show on another mount, and survive a tracker crash.

The local directory is ext4 without `ea_inode`, which keeps one block of attributes per inode
(ENOSPC past about 4 KiB): values compared here stay small, and the 64 KiB that dfs (like ext4
with ea_inode, or XFS) keeps is checked on the mount alone.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.cluster_procs import free_port
from tests.conftest import MakeCluster
from tests.mount.conftest import MountFactory
from tests.mount.test_caching import tracker_requests

pytestmark = pytest.mark.mount

NOBODY = 65534
_libc = ctypes.CDLL(None, use_errno=True)
_libc.getxattr.restype = ctypes.c_ssize_t
_libc.listxattr.restype = ctypes.c_ssize_t


def outcome(fn: Callable[[], object]) -> str:
    """'ok', the value `fn` returned (repr), or the errno name it failed with."""
    try:
        value = fn()
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return "ok" if value is None else repr(value)


def raw_getxattr(path: str, name: str, size: int) -> int:
    """getxattr(2) with a buffer of `size` bytes (0: ask for the size), as libattr calls it."""
    buf = ctypes.create_string_buffer(max(size, 1))
    got = _libc.getxattr(os.fsencode(path), os.fsencode(name), buf if size else None, size)
    if got < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return int(got)


def raw_listxattr(path: str, size: int) -> int:
    buf = ctypes.create_string_buffer(max(size, 1))
    got = _libc.listxattr(os.fsencode(path), buf if size else None, size)
    if got < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return int(got)


def scenario(root: Path) -> list[tuple[str, str]]:
    """Run every step under `root` as root; (step, outcome) in order."""
    results: list[tuple[str, str]] = []

    def p(name: str) -> str:
        return str(root / name)

    def step(name: str, fn: Callable[[], object]) -> None:
        results.append((name, outcome(fn)))

    def listed(path: str, follow: bool = True) -> Callable[[], list[str]]:
        return lambda: sorted(os.listxattr(path, follow_symlinks=follow))

    def times(path: str) -> tuple[int, int]:
        st = os.stat(path)
        return st.st_ctime_ns, st.st_mtime_ns

    f, d, link, fifo = p("f"), p("d"), p("l"), p("fifo")
    Path(f).write_bytes(b"data")
    os.mkdir(d)
    os.symlink("f", link)
    os.mkfifo(fifo)

    step("set user.a", lambda: os.setxattr(f, "user.a", b"1"))
    step("get user.a", lambda: os.getxattr(f, "user.a"))
    step("list", listed(f))
    step("create existing", lambda: os.setxattr(f, "user.a", b"2", os.XATTR_CREATE))
    step("replace missing", lambda: os.setxattr(f, "user.b", b"2", os.XATTR_REPLACE))
    step("replace existing", lambda: os.setxattr(f, "user.a", b"22", os.XATTR_REPLACE))
    step("create missing", lambda: os.setxattr(f, "user.b", b"3", os.XATTR_CREATE))
    step("get replaced", lambda: os.getxattr(f, "user.a"))
    step("get created", lambda: os.getxattr(f, "user.b"))
    step("get missing", lambda: os.getxattr(f, "user.missing"))
    step("remove missing", lambda: os.removexattr(f, "user.missing"))
    step("size probe", lambda: raw_getxattr(f, "user.a", 0))
    step("buffer too small", lambda: raw_getxattr(f, "user.a", 1))
    step("buffer just right", lambda: raw_getxattr(f, "user.a", 2))
    step("list size probe", lambda: raw_listxattr(f, 0))
    step("list buffer too small", lambda: raw_listxattr(f, 3))
    step("remove user.a", lambda: os.removexattr(f, "user.a"))
    step("get removed", lambda: os.getxattr(f, "user.a"))
    step("list after remove", listed(f))
    step("empty value", lambda: os.setxattr(f, "user.empty", b""))
    step("get empty value", lambda: os.getxattr(f, "user.empty"))
    binary = bytes(range(256)) * 3
    step("binary value", lambda: os.setxattr(f, "user.binary", binary))
    step("get binary value", lambda: os.getxattr(f, "user.binary") == binary)
    step("255-byte name", lambda: os.setxattr(f, "user." + "n" * 250, b"x"))
    step("get 255-byte name", lambda: os.getxattr(f, "user." + "n" * 250))
    step("256-byte name", lambda: os.setxattr(f, "user." + "n" * 251, b"x"))
    step("get 256-byte name", lambda: os.getxattr(f, "user." + "n" * 251))
    step("empty name", lambda: os.setxattr(f, "", b"x"))
    step("bare prefix", lambda: os.setxattr(f, "user.", b"x"))
    step("unknown namespace", lambda: os.setxattr(f, "foo.bar", b"x"))
    step("get unknown namespace", lambda: os.getxattr(f, "foo.bar"))
    step("value over 64 KiB", lambda: os.setxattr(f, "user.huge", b"v" * 65537))
    step("trusted", lambda: os.setxattr(f, "trusted.t", b"root only"))
    step("security", lambda: os.setxattr(f, "security.s", b"label"))
    step("get trusted", lambda: os.getxattr(f, "trusted.t"))
    step("list all namespaces", listed(f))
    # Directories, symlinks, FIFOs: user.* only on files and directories.
    step("set on a dir", lambda: os.setxattr(d, "user.d", b"dir"))
    step("get on a dir", lambda: os.getxattr(d, "user.d"))
    step("list a dir", listed(d))
    step("user on a symlink", lambda: os.setxattr(link, "user.x", b"x", follow_symlinks=False))
    step("get user on a symlink", lambda: os.getxattr(link, "user.x", follow_symlinks=False))
    step("through a symlink", lambda: os.setxattr(link, "user.via", b"link"))
    step("get through a symlink", lambda: os.getxattr(f, "user.via"))
    step(
        "trusted on a symlink",
        lambda: os.setxattr(link, "trusted.x", b"x", follow_symlinks=False),
    )
    step("list a symlink", listed(link, follow=False))
    step("user on a fifo", lambda: os.setxattr(fifo, "user.x", b"x"))
    step("trusted on a fifo", lambda: os.setxattr(fifo, "trusted.x", b"x"))
    step("list a fifo", listed(fifo))

    # ctime moves on set and remove (and a stat right after shows it); mtime does not.
    before = times(f)
    time.sleep(0.05)  # ext4 takes ctime from a clock of a few ms
    step("set for ctime", lambda: os.setxattr(f, "user.c", b"1"))
    after_set = times(f)
    results.append(("ctime moved on set", str(after_set[0] > before[0])))
    results.append(("mtime kept on set", str(after_set[1] == before[1])))
    time.sleep(0.05)
    step("remove for ctime", lambda: os.removexattr(f, "user.c"))
    after_remove = times(f)
    results.append(("ctime moved on remove", str(after_remove[0] > after_set[0])))
    results.append(("mtime kept on remove", str(after_remove[1] == before[1])))
    time.sleep(0.05)
    step("failed create", lambda: os.setxattr(f, "user.b", b"x", os.XATTR_CREATE))
    results.append(("ctime kept on failure", str(times(f)[0] == after_remove[0])))

    # Attributes go with the inode: a new file of the same name has none.
    step("unlink", lambda: os.unlink(f))
    Path(f).write_bytes(b"new")
    step("list a new file", listed(f))
    return results


def test_xattrs_match_ext4(tmp_path: Path, make_cluster: MakeCluster, mount: MountFactory) -> None:
    cluster = make_cluster(keepers=1, replication=1)
    m = mount(cluster)
    local = tmp_path / "local"
    local.mkdir()
    expected = scenario(local)
    got = scenario(m.path)
    mismatches = [(e[0], e[1], g[1]) for e, g in zip(expected, got, strict=True) if e != g]
    assert not mismatches, "step, ext4, dfs:\n" + "\n".join(map(str, mismatches))
    results = dict(expected)
    assert results["create existing"] == "EEXIST"
    assert results["replace missing"] == "ENODATA"
    assert results["256-byte name"] == "ERANGE"
    assert results["value over 64 KiB"] == "E2BIG"
    assert results["user on a symlink"] == "EPERM"
    assert results["ctime moved on set"] == "True"

    # What ext4 here cannot keep (one 4 KiB block per inode) and dfs does: 64 KiB values.
    big = m.path / "big"
    big.write_bytes(b"")
    value = os.urandom(65536)
    os.setxattr(big, "user.big", value)
    assert os.getxattr(big, "user.big") == value
    assert raw_getxattr(str(big), "user.big", 0) == 65536

    # No ACLs: the POSIX ACL names are not kept, and say so.
    # user::rwx, group::r-x, other::r-x (linux/posix_acl_xattr.h), valid as the kernel checks
    acl = struct.pack("<I", 2) + b"".join(
        struct.pack("<HHI", tag, perm, 0xFFFFFFFF) for tag, perm in ((1, 7), (4, 5), (0x20, 5))
    )
    for name in ("system.posix_acl_access", "system.posix_acl_default"):
        with pytest.raises(OSError, match="Operation not supported"):
            os.getxattr(m.path / "d", name)
        with pytest.raises(OSError, match="Operation not supported"):
            os.setxattr(m.path / "d", name, acl)


def tree_xattrs(root: Path) -> dict[str, dict[str, bytes]]:
    """Every file's and directory's extended attributes under `root`, by relative path."""
    found: dict[str, dict[str, bytes]] = {}
    for path in sorted([root, *root.rglob("*")]):
        found[str(path.relative_to(root))] = {
            name: os.getxattr(path, name, follow_symlinks=False)
            for name in sorted(os.listxattr(path, follow_symlinks=False))
        }
    return found


def make_tree(root: Path) -> None:
    (root / "sub").mkdir(parents=True)
    (root / "a").write_bytes(b"a" * 1000)
    (root / "sub" / "b").write_bytes(b"b")
    (root / "plain").write_bytes(b"no attributes")
    os.symlink("a", root / "link")
    os.setxattr(root / "a", "user.mime_type", b"text/plain")
    os.setxattr(root / "a", "user.checksum", os.urandom(32))
    os.setxattr(root / "a", "trusted.origin", b"test")
    os.setxattr(root / "sub", "user.dir", b"directory")
    os.setxattr(root / "sub" / "b", "user." + "long" * 60, b"\0" * 500)
    os.setxattr(root / "sub" / "b", "security.label", b"system_u:object_r:dfs_t")


def run(*argv: str) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{argv}: {result.stderr}"


def test_cp_and_rsync_keep_xattrs_both_ways(
    tmp_path: Path, make_cluster: MakeCluster, mount: MountFactory
) -> None:
    cluster = make_cluster(keepers=1, replication=1)
    m = mount(cluster)
    src = tmp_path / "src"
    make_tree(src)
    want = tree_xattrs(src)
    assert all(want[name] for name in ("a", "sub", "sub/b"))
    assert not want["plain"]

    run("cp", "-r", "--preserve=xattr", str(src), str(m.path / "cp"))
    assert tree_xattrs(m.path / "cp") == want
    run("cp", "-a", str(src), str(m.path / "cp-a"))
    assert tree_xattrs(m.path / "cp-a") == want
    run("rsync", "-aX", f"{src}/", f"{m.path / 'rsync'}/")
    assert tree_xattrs(m.path / "rsync") == want
    # A second run finds nothing to change (rsync compares the attributes it reads back).
    result = subprocess.run(
        ["rsync", "-aXi", f"{src}/", f"{m.path / 'rsync'}/"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", result.stdout
    # And back out to ext4.
    run("rsync", "-aX", f"{m.path / 'rsync'}/", f"{tmp_path / 'back'}/")
    assert tree_xattrs(tmp_path / "back") == want
    run("cp", "-r", "--preserve=xattr", str(m.path / "cp"), str(tmp_path / "cp-back"))
    assert tree_xattrs(tmp_path / "cp-back") == want


def test_xattrs_outlive_the_mount_and_show_on_another(
    make_cluster: MakeCluster, mount: MountFactory
) -> None:
    cluster = make_cluster(keepers=1, replication=1)
    one = mount(cluster, "one")
    two = mount(cluster, "two")
    (one.path / "f").write_bytes(b"x")
    os.setxattr(one.path / "f", "user.k", b"v1")
    os.setxattr(one.path / "f", "trusted.t", b"t")
    assert os.getxattr(two.path / "f", "user.k") == b"v1"
    assert sorted(os.listxattr(two.path / "f")) == ["trusted.t", "user.k"]

    # A change on one mount shows on the other within the attribute timeout (one second).
    os.getxattr(two.path / "f", "user.k")  # cached there now
    os.setxattr(one.path / "f", "user.k", b"v2")
    os.removexattr(one.path / "f", "trusted.t")
    deadline = time.monotonic() + 5
    while os.getxattr(two.path / "f", "user.k") != b"v2" or len(os.listxattr(two.path / "f")) > 1:
        assert time.monotonic() < deadline, "another mount's change never showed"
        time.sleep(0.1)

    one.unmount()
    two.unmount()
    assert cluster.tracker is not None
    cluster.restart(cluster.tracker)  # SIGKILL: what was acknowledged is committed
    one.restart()
    assert os.getxattr(one.path / "f", "user.k") == b"v2"
    assert os.listxattr(one.path / "f") == ["user.k"]


def test_the_kernel_asking_costs_no_tracker_trips(
    make_cluster: MakeCluster, mount: MountFactory
) -> None:
    """`ls -l` asks for security.selinux of every name, and every write for
    security.capability: answered by the mount from attributes that say "none"."""
    port = free_port()
    cluster = make_cluster(
        keepers=1, replication=1, tracker_args=["--metrics", f"127.0.0.1:{port}"]
    )
    writer = mount(cluster, "writer")
    (writer.path / "d").mkdir()
    for i in range(100):
        (writer.path / "d" / f"f{i}").write_bytes(b"x")
    os.setxattr(writer.path / "d" / "f0", "user.one", b"1")
    reader = mount(cluster, "reader")

    def xattr_requests() -> float:
        counts = tracker_requests(port)
        return sum(counts.get(t, 0.0) for t in ("GetXattr", "ListXattr"))

    before = xattr_requests()
    listing = subprocess.run(
        ["ls", "-l", str(reader.path / "d")], capture_output=True, text=True, timeout=60
    )
    assert listing.returncode == 0, listing.stderr
    assert xattr_requests() - before < 10

    before = xattr_requests()
    fd = os.open(reader.path / "d" / "f1", os.O_WRONLY | os.O_APPEND)
    try:
        for _ in range(300):
            os.write(fd, b"y" * 4096)
    finally:
        os.close(fd)
    assert xattr_requests() - before < 10


# --- as a second, unprivileged user ----------------------------------------------------------

# Run as the unprivileged user; prints [[step, outcome], ...] as JSON.
AS_NOBODY = r"""
import errno, json, os, sys
root = sys.argv[1]
out = []
def p(name): return os.path.join(root, name)
def step(name, fn):
    try:
        value = fn()
    except OSError as exc:
        out.append([name, errno.errorcode.get(exc.errno, str(exc.errno))])
    else:
        out.append([name, "ok" if value is None else repr(value)])

step("get readable", lambda: os.getxattr(p("readonly"), "user.a"))
step("set readonly", lambda: os.setxattr(p("readonly"), "user.b", b"x"))
step("remove readonly", lambda: os.removexattr(p("readonly"), "user.a"))
step("get private", lambda: os.getxattr(p("private"), "user.a"))
step("list private", lambda: sorted(os.listxattr(p("private"))))
step("list readonly", lambda: sorted(os.listxattr(p("readonly"))))
step("get trusted", lambda: os.getxattr(p("readonly"), "trusted.t"))
step("get security", lambda: os.getxattr(p("readonly"), "security.s"))
step("create pub/mine", lambda: open(p("pub/mine"), "wb").close())
step("set mine", lambda: os.setxattr(p("pub/mine"), "user.m", b"mine"))
step("get mine", lambda: os.getxattr(p("pub/mine"), "user.m"))
step("trusted on mine", lambda: os.setxattr(p("pub/mine"), "trusted.m", b"x"))
step("security on mine", lambda: os.setxattr(p("pub/mine"), "security.m", b"x"))
step("list mine", lambda: sorted(os.listxattr(p("pub/mine"))))
step("remove mine", lambda: os.removexattr(p("pub/mine"), "user.m"))
step("remove trusted of root's", lambda: os.removexattr(p("readonly"), "trusted.t"))
step("chmod mine 0444", lambda: os.chmod(p("pub/mine"), 0o444))
step("set mine read-only", lambda: os.setxattr(p("pub/mine"), "user.m", b"x"))
step("set on writable dir", lambda: os.setxattr(p("pub"), "user.p", b"x"))
step("set on sticky dir", lambda: os.setxattr(p("sticky"), "user.s", b"x"))
step("get on sticky dir", lambda: os.getxattr(p("sticky"), "user.root"))
step("mkfifo pub/fifo", lambda: os.mkfifo(p("pub/fifo")))
step("user on my fifo", lambda: os.setxattr(p("pub/fifo"), "user.x", b"x"))
step("symlink pub/l", lambda: os.symlink("mine", p("pub/l")))
step("user on my symlink", lambda: os.setxattr(p("pub/l"), "user.x", b"x", follow_symlinks=False))
print(json.dumps(out))
"""


def prepare(root: Path) -> None:
    """As root: the same starting tree in the mount and on ext4."""
    root.chmod(0o755)
    for name, mode in (("readonly", 0o644), ("private", 0o600)):
        (root / name).write_bytes(b"x")
        (root / name).chmod(mode)
        os.setxattr(root / name, "user.a", b"root's")
    os.setxattr(root / "readonly", "trusted.t", b"hidden")
    os.setxattr(root / "readonly", "security.s", b"label")
    (root / "pub").mkdir()
    (root / "pub").chmod(0o777)
    (root / "sticky").mkdir()
    (root / "sticky").chmod(0o1777)
    os.setxattr(root / "sticky", "user.root", b"r")


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
    base = Path(tempfile.mkdtemp(prefix="dfs-xattr-", dir="/tmp"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_xattr_permissions_match_ext4_for_another_user(
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
    assert results["set readonly"] == "EACCES"
    assert results["get private"] == "EACCES"
    assert results["list readonly"] == repr(["security.s", "user.a"])  # trusted.* hidden
    assert results["trusted on mine"] == "EPERM"
    assert results["set on sticky dir"] == "EPERM"
    # Root, on another mount, sees what nobody set and the trusted.* nobody could not see.
    other = mount(cluster, "other")
    assert os.getxattr(other.path / "pub", "user.p") == b"x"
    assert sorted(os.listxattr(other.path / "readonly")) == ["security.s", "trusted.t", "user.a"]
