"""The mount against ext4: one sequence of namespace calls, run in the mount and in a local
directory, must give the same results, the same errno and the same tree."""

from __future__ import annotations

import ctypes
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import MakeCluster
from tests.mount.conftest import MountFactory, oserror

pytestmark = pytest.mark.mount

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
_libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100


def renameat2(src: str, dst: str, flags: int) -> None:
    if _libc.renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), src)


def scenario(root: Path) -> list[tuple[str, str]]:
    """Run every step under `root`; returns (step, 'ok' or errno name) in order."""
    results: list[tuple[str, str]] = []

    def p(name: str) -> str:
        return str(root / name)

    def step(name: str, fn: Callable[[], object]) -> None:
        results.append((name, oserror(fn)))

    def write(name: str, data: bytes) -> Callable[[], None]:
        def run() -> None:
            with open(p(name), "wb") as f:
                f.write(data)

        return run

    step("mkdir d", lambda: os.mkdir(p("d")))
    step("mkdir d again", lambda: os.mkdir(p("d")))
    step("mkdir under missing", lambda: os.mkdir(p("missing/x")))
    step("write f", write("f", b"file f"))
    step("write d/inner", write("d/inner", b"inner"))
    step("mkdir under a file", lambda: os.mkdir(p("f/x")))
    step("open under a file", lambda: os.close(os.open(p("f/x"), os.O_RDONLY)))
    step("rmdir a file", lambda: os.rmdir(p("f")))
    step("unlink a dir", lambda: os.unlink(p("d")))
    step("rmdir non-empty", lambda: os.rmdir(p("d")))
    step("rmdir missing", lambda: os.rmdir(p("nothing")))
    step("unlink missing", lambda: os.unlink(p("nothing")))
    step("create 255-byte name", write("n" * 255, b"x"))
    step("create 256-byte name", write("n" * 256, b"x"))
    step("mkdir 256-byte name", lambda: os.mkdir(p("m" * 256)))
    step("stat 256-byte name", lambda: os.stat(p("s" * 256)))
    step(
        "O_EXCL on existing",
        lambda: os.close(os.open(p("f"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)),
    )
    step("open dir for writing", lambda: os.close(os.open(p("d"), os.O_WRONLY)))
    step("truncate a dir", lambda: os.truncate(p("d"), 0))

    # rename
    step("rename file over dir", lambda: os.rename(p("f"), p("d")))
    step("rename dir over file", lambda: os.rename(p("d"), p("f")))
    step("rename dir into itself", lambda: os.rename(p("d"), p("d/sub")))
    step("rename missing", lambda: os.rename(p("nothing"), p("x")))
    step("rename to missing dir", lambda: os.rename(p("f"), p("missing/f")))
    step("rename f g", lambda: os.rename(p("f"), p("g")))
    step("write f2", write("f2", b"second file"))
    step("rename f2 over g", lambda: os.rename(p("f2"), p("g")))
    step("mkdir e", lambda: os.mkdir(p("e")))
    step("mkdir e2", lambda: os.mkdir(p("e2")))
    step("rename e over empty e2", lambda: os.rename(p("e"), p("e2")))
    step("rename e2 over non-empty d", lambda: os.rename(p("e2"), p("d")))
    step("rename g into d", lambda: os.rename(p("g"), p("d/g")))
    step("rename d/g back", lambda: os.rename(p("d/g"), p("g")))
    step("rename onto itself", lambda: os.rename(p("g"), p("g")))
    step("write h", write("h", b"h"))
    step("noreplace over existing", lambda: renameat2(p("h"), p("g"), RENAME_NOREPLACE))
    step("noreplace to free name", lambda: renameat2(p("h"), p("h2"), RENAME_NOREPLACE))
    step("exchange g h2", lambda: renameat2(p("g"), p("h2"), RENAME_EXCHANGE))
    step("exchange with missing", lambda: renameat2(p("g"), p("nothing"), RENAME_EXCHANGE))

    # hard links
    step("link g l", lambda: os.link(p("g"), p("l")))
    step("link g l again", lambda: os.link(p("g"), p("l")))
    step("link a dir", lambda: os.link(p("d"), p("dl")))
    step("link missing", lambda: os.link(p("nothing"), p("x")))
    step("link into missing dir", lambda: os.link(p("g"), p("missing/l")))
    step("unlink g", lambda: os.unlink(p("g")))
    step("read l", lambda: Path(p("l")).read_bytes())

    # symlinks
    step("symlink s -> l", lambda: os.symlink("l", p("s")))
    step("symlink s again", lambda: os.symlink("l", p("s")))
    step("symlink dangling", lambda: os.symlink("nowhere/at/all", p("dangling")))
    step("open dangling", lambda: os.close(os.open(p("dangling"), os.O_RDONLY)))
    step("symlink to dir", lambda: os.symlink("d", p("sd")))
    step("write through dir symlink", write("sd/via", b"via link"))
    step("unlink dir symlink", lambda: os.unlink(p("sd")))
    step("rmdir a symlink", lambda: os.rmdir(p("s")))

    # chmod and special files
    step("chmod l 640", lambda: os.chmod(p("l"), 0o640))
    step("chmod d 2755", lambda: os.chmod(p("d"), 0o2755))
    step("chmod missing", lambda: os.chmod(p("nothing"), 0o600))
    step("mkfifo", lambda: os.mkfifo(p("fifo"), 0o600))
    step("mkfifo again", lambda: os.mkfifo(p("fifo"), 0o600))
    step("mkdir in setgid dir", lambda: os.mkdir(p("d/sg")))
    step("mkdir sgd", lambda: os.mkdir(p("sgd")))
    step("chmod sgd 2775", lambda: os.chmod(p("sgd"), 0o2775))
    step("mkdir sgd/child", lambda: os.mkdir(p("sgd/child")))  # inherits the setgid bit
    step("write sgd/file", write("sgd/file", b"in a setgid dir"))

    # removal
    step("unlink d/inner", lambda: os.unlink(p("d/inner")))
    step("rmdir d still has via", lambda: os.rmdir(p("d")))
    step("unlink d/via", lambda: os.unlink(p("d/via")))
    step("rmdir d/sg", lambda: os.rmdir(p("d/sg")))
    step("rmdir d", lambda: os.rmdir(p("d")))
    step("rmdir d again", lambda: os.rmdir(p("d")))
    return results


def tree(root: Path) -> dict[str, tuple[object, ...]]:
    """Everything comparable about a tree (not inode numbers, times or directory sizes)."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = os.lstat(path)
            rel = str(path.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(path), st.st_size)
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", oct(st.st_mode), st.st_nlink)
            elif stat.S_ISREG(st.st_mode):
                out[rel] = ("file", oct(st.st_mode), st.st_nlink, st.st_size, path.read_bytes())
            else:
                out[rel] = ("special", oct(st.st_mode), st.st_nlink)
    return out


def test_namespace_calls_match_ext4(
    make_cluster: MakeCluster, mount: MountFactory, tmp_path: Path
) -> None:
    cluster = make_cluster(keepers=1, replication=1)
    m = mount(cluster)
    local = tmp_path / "ext4"
    local.mkdir()
    assert os.statvfs(local).f_namemax == 255  # really a Linux disk file system
    expected = scenario(local)
    got = scenario(m.path)
    mismatches = [(e[0], e[1], g[1]) for e, g in zip(expected, got, strict=True) if e != g]
    assert not mismatches, "step, ext4, dfs:\n" + "\n".join(map(str, mismatches))
    # Every error case is really exercised.
    seen = {result for _, result in expected}
    for name in (
        "ENOENT",
        "EEXIST",
        "ENOTEMPTY",
        "EISDIR",
        "ENOTDIR",
        "ENAMETOOLONG",
        "EPERM",
        "EINVAL",
    ):
        assert name in seen, name
    assert tree(m.path) == tree(local)
