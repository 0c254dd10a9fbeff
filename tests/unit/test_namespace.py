"""POSIX rules of the tracker's namespace on each metadata store: a real SQLite file and a real
PostgreSQL database (the `open_store` fixture)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from cluster.errors import (
    Exists,
    InvalidArgument,
    IsADir,
    NameTooLong,
    NoData,
    NoSpace,
    NotADir,
    NotEmpty,
    NotFound,
    NotPermitted,
    NotSupported,
    OutOfRange,
    TooBig,
)
from cluster.tracker.namespace import RENAME_EXCHANGE, RENAME_NOREPLACE, Namespace
from cluster.tracker.store import ROOT_INO, ChunkRow, SqliteStore
from cluster.xattrs import XATTR_CREATE, XATTR_REPLACE
from tests.conftest import OpenStore
from tests.stores import sql_rows

FILE = stat.S_IFREG | 0o644
DIR = stat.S_IFDIR | 0o755


@pytest.fixture
def ns(open_store: OpenStore) -> Namespace:
    return Namespace(open_store(), chunk_size=1 << 20)


def test_create_lookup_and_errors(ns: Namespace) -> None:
    f = ns.make_node(ROOT_INO, b"f", FILE, 1000, 1000)
    assert ns.lookup(ROOT_INO, b"f").ino == f.ino
    with pytest.raises(Exists):
        ns.make_node(ROOT_INO, b"f", FILE, 0, 0)
    with pytest.raises(NotFound):
        ns.lookup(ROOT_INO, b"nope")
    with pytest.raises(NameTooLong):
        ns.make_node(ROOT_INO, b"x" * 256, FILE, 0, 0)
    with pytest.raises(NotADir):
        ns.make_node(f.ino, b"child", FILE, 0, 0)
    with pytest.raises(InvalidArgument):
        ns.make_node(ROOT_INO, b"a/b", FILE, 0, 0)


def test_directories_count_links_and_refuse_removal_when_full(ns: Namespace) -> None:
    d = ns.make_node(ROOT_INO, b"d", DIR, 0, 0)
    ns.make_node(d.ino, b"sub", DIR, 0, 0)
    assert ns.inode(d.ino).nlink == 3
    with pytest.raises(NotEmpty):
        ns.rmdir(ROOT_INO, b"d")
    with pytest.raises(IsADir):
        ns.unlink(ROOT_INO, b"d")
    ns.rmdir(d.ino, b"sub")
    assert ns.inode(d.ino).nlink == 2
    ns.rmdir(ROOT_INO, b"d")
    with pytest.raises(NotFound):
        ns.lookup(ROOT_INO, b"d")


def test_setgid_directory_passes_its_group(ns: Namespace) -> None:
    d = ns.make_node(ROOT_INO, b"shared", DIR | stat.S_ISGID, 0, 50)
    f = ns.make_node(d.ino, b"f", FILE, 1000, 1000)
    sub = ns.make_node(d.ino, b"sub", DIR, 1000, 1000)
    assert (f.gid, sub.gid) == (50, 50)
    assert sub.mode & stat.S_ISGID


def test_rename_rules(ns: Namespace) -> None:
    a = ns.make_node(ROOT_INO, b"a", DIR, 0, 0)
    b = ns.make_node(ROOT_INO, b"b", DIR, 0, 0)
    f = ns.make_node(a.ino, b"f", FILE, 0, 0)
    g = ns.make_node(b.ino, b"g", FILE, 0, 0)
    with pytest.raises(Exists):
        ns.rename(a.ino, b"f", b.ino, b"g", RENAME_NOREPLACE)
    ns.rename(a.ino, b"f", b.ino, b"g", 0)  # replaces g
    assert ns.lookup(b.ino, b"g").ino == f.ino
    with pytest.raises(NotFound):
        ns.inode(g.ino)
    with pytest.raises(InvalidArgument):
        ns.rename(ROOT_INO, b"a", a.ino, b"inside", 0)
    with pytest.raises(NotADir):
        ns.rename(ROOT_INO, b"a", b.ino, b"g", 0)
    with pytest.raises(IsADir):
        ns.rename(b.ino, b"g", ROOT_INO, b"a", 0)
    ns.rename(ROOT_INO, b"a", b.ino, b"a", 0)
    assert ns.inode(b.ino).nlink == 3
    assert ns.inode(ROOT_INO).nlink == 3
    h = ns.make_node(ROOT_INO, b"h", FILE, 0, 0)
    ns.rename(ROOT_INO, b"h", b.ino, b"g", RENAME_EXCHANGE)
    assert ns.lookup(b.ino, b"g").ino == h.ino
    assert ns.lookup(ROOT_INO, b"h").ino == f.ino


def test_unlink_of_an_open_file_defers_deletion(ns: Namespace) -> None:
    f = ns.make_node(ROOT_INO, b"f", FILE, 0, 0)
    ns.store.put_chunk(ChunkRow(f.ino, 0, 77, 1, 10, 5))
    ns.open(f.ino, "session")
    _, removal = ns.unlink(ROOT_INO, b"f")
    assert removal.chunks == []
    assert ns.inode(f.ino).nlink == 0
    assert [c.chunk_id for c in ns.release(f.ino, "session").chunks] == [77]
    with pytest.raises(NotFound):
        ns.inode(f.ino)


def test_truncate_drops_and_shortens_chunks(ns: Namespace) -> None:
    f = ns.make_node(ROOT_INO, b"f", FILE, 0, 0)
    for idx in range(3):
        ns.store.put_chunk(ChunkRow(f.ino, idx, 10 + idx, 1, 1 << 20, 0))
    _, removal = ns.setattr(f.ino, size=(1 << 20) + 100)
    assert [c.chunk_id for c in removal.chunks] == [12]
    assert ns.store.chunk_for(f.ino, 1) == ChunkRow(f.ino, 1, 11, 1, 100, 0)


def test_readdir_cookies_survive_removals(ns: Namespace) -> None:
    for i in range(10):
        ns.make_node(ROOT_INO, b"f%d" % i, FILE, 0, 0)
    first = ns.readdir(ROOT_INO, 0, 4)
    ns.unlink(ROOT_INO, b"f5")
    rest = ns.readdir(ROOT_INO, first[-1][2], 100)
    names = [n for n, _, _ in first + rest]
    assert names == [b"f%d" % i for i in range(10) if i != 5]


def test_state_survives_reopen(open_store: OpenStore) -> None:
    ns = Namespace(open_store(), 1 << 20)
    d = ns.make_node(ROOT_INO, b"d", DIR, 0, 0)
    ns.symlink(d.ino, b"l", b"../target", 0, 0)
    ns.store.close()
    again = Namespace(open_store(), 1 << 20)
    assert again.readlink(again.resolve(b"/d/l").ino) == b"../target"


# --- extended attributes ---------------------------------------------------------------------


def xattr_rows(ns: Namespace) -> int:
    return int(sql_rows(ns.store, "SELECT count(*) FROM xattrs")[0][0])


def test_xattrs_set_get_list_remove_as_ext4(ns: Namespace) -> None:
    f = ns.make_node(ROOT_INO, b"f", FILE, 0, 0)
    assert f.xattrs == 0
    after = ns.setxattr(f.ino, b"user.a", b"1")
    assert after.xattrs == 1
    assert after.ctime_ns > f.ctime_ns
    assert after.mtime_ns == f.mtime_ns
    ns.setxattr(f.ino, b"trusted.t", b"\0binary\xff")
    ns.setxattr(f.ino, b"security.s", b"")
    assert ns.getxattr(f.ino, b"user.a") == b"1"
    assert ns.getxattr(f.ino, b"trusted.t") == b"\0binary\xff"
    assert ns.getxattr(f.ino, b"security.s") == b""
    assert sorted(ns.listxattr(f.ino)) == [b"security.s", b"trusted.t", b"user.a"]
    assert ns.inode(f.ino).xattrs == 3

    with pytest.raises(Exists):
        ns.setxattr(f.ino, b"user.a", b"2", XATTR_CREATE)
    with pytest.raises(NoData):
        ns.setxattr(f.ino, b"user.b", b"2", XATTR_REPLACE)
    ns.setxattr(f.ino, b"user.a", b"2", XATTR_REPLACE)
    ns.setxattr(f.ino, b"user.b", b"3", XATTR_CREATE)
    assert (ns.getxattr(f.ino, b"user.a"), ns.getxattr(f.ino, b"user.b")) == (b"2", b"3")
    with pytest.raises(NoData):
        ns.getxattr(f.ino, b"user.missing")
    with pytest.raises(NoData):
        ns.removexattr(f.ino, b"user.missing")
    before = ns.inode(f.ino)
    removed = ns.removexattr(f.ino, b"user.a")
    assert removed.xattrs == 3
    assert removed.ctime_ns > before.ctime_ns
    with pytest.raises(NoData):
        ns.getxattr(f.ino, b"user.a")
    with pytest.raises(NotFound):
        ns.getxattr(12345, b"user.a")


def test_xattr_names_values_and_file_types(ns: Namespace) -> None:
    f = ns.make_node(ROOT_INO, b"f", FILE, 0, 0)
    d = ns.make_node(ROOT_INO, b"d", DIR, 0, 0)
    link = ns.symlink(ROOT_INO, b"l", b"f", 0, 0)
    fifo = ns.make_node(ROOT_INO, b"p", stat.S_IFIFO | 0o644, 0, 0)
    ns.setxattr(f.ino, b"user." + b"n" * 250, b"255-byte name")
    with pytest.raises(OutOfRange):
        ns.setxattr(f.ino, b"user." + b"n" * 251, b"x")
    with pytest.raises(OutOfRange):
        ns.getxattr(f.ino, b"")
    ns.setxattr(f.ino, b"user.big", b"v" * 65536)
    with pytest.raises(TooBig):
        ns.setxattr(f.ino, b"user.bigger", b"v" * 65537)
    with pytest.raises(InvalidArgument):
        ns.setxattr(f.ino, b"user.", b"x")
    with pytest.raises(InvalidArgument):
        ns.setxattr(f.ino, b"user.a", b"x", 4)
    for name in (b"system.posix_acl_access", b"system.posix_acl_default", b"other.x"):
        with pytest.raises(NotSupported):
            ns.setxattr(f.ino, name, b"x")
        with pytest.raises(NotSupported):
            ns.getxattr(f.ino, name)
    # As ext4: user.* only on regular files and directories; other namespaces anywhere.
    ns.setxattr(d.ino, b"user.d", b"dir")
    for other in (link, fifo):
        with pytest.raises(NotPermitted):
            ns.setxattr(other.ino, b"user.x", b"x")
        ns.setxattr(other.ino, b"trusted.x", b"x")
    assert ns.listxattr(link.ino) == [b"trusted.x"]


def test_xattrs_per_inode_are_bounded(ns: Namespace) -> None:
    f = ns.make_node(ROOT_INO, b"f", FILE, 0, 0)
    for i in range(15):
        ns.setxattr(f.ino, b"user.v%02d" % i, b"v" * 65536)
    with pytest.raises(NoSpace):
        ns.setxattr(f.ino, b"user.v15", b"v" * 65536)
    ns.setxattr(f.ino, b"user.v00", b"w" * 65536)  # a replacement takes no more room
    g = ns.make_node(ROOT_INO, b"g", FILE, 0, 0)
    for i in range(256):  # 256 names of 255 bytes and their NULs fill a listxattr answer
        ns.setxattr(g.ino, b"user.%03d" % i + b"n" * 247, b"")
    with pytest.raises(NoSpace):
        ns.setxattr(g.ino, b"user.more", b"")
    assert len(ns.listxattr(g.ino)) == 256


def test_xattrs_are_deleted_with_their_inode(ns: Namespace) -> None:
    f = ns.make_node(ROOT_INO, b"f", FILE, 0, 0)
    ns.setxattr(f.ino, b"user.a", b"1")
    ns.link(f.ino, ROOT_INO, b"f2")
    ns.unlink(ROOT_INO, b"f")
    assert ns.getxattr(f.ino, b"user.a") == b"1"  # a name is left
    ns.open(f.ino, "session")
    ns.unlink(ROOT_INO, b"f2")
    assert ns.getxattr(f.ino, b"user.a") == b"1"  # open: kept until released
    ns.release(f.ino, "session")
    assert xattr_rows(ns) == 0

    d = ns.make_node(ROOT_INO, b"d", DIR, 0, 0)
    ns.setxattr(d.ino, b"user.d", b"1")
    ns.rmdir(ROOT_INO, b"d")
    assert xattr_rows(ns) == 0

    old = ns.make_node(ROOT_INO, b"old", FILE, 0, 0)
    new = ns.make_node(ROOT_INO, b"new", FILE, 0, 0)
    ns.setxattr(old.ino, b"user.old", b"1")
    ns.setxattr(new.ino, b"user.new", b"1")
    ns.rename(ROOT_INO, b"new", ROOT_INO, b"old", 0)  # replaces old
    assert ns.listxattr(new.ino) == [b"user.new"]
    assert xattr_rows(ns) == 1
    e = ns.make_node(ROOT_INO, b"e", DIR, 0, 0)
    ns.setxattr(e.ino, b"user.e", b"1")
    ns.make_node(ROOT_INO, b"e2", DIR, 0, 0)
    ns.rename(ROOT_INO, b"e2", ROOT_INO, b"e", 0)  # replaces the empty directory e
    assert xattr_rows(ns) == 1

    orphan = ns.make_node(ROOT_INO, b"orphan", FILE, 0, 0)
    ns.setxattr(orphan.ino, b"user.o", b"1")
    ns.open(orphan.ino, "crashed mount")
    ns.unlink(ROOT_INO, b"orphan")
    ns.open_by.clear()  # as after a tracker restart
    ns.collect_orphans()
    assert xattr_rows(ns) == 1


def test_xattrs_survive_reopen_and_old_databases_get_the_table(tmp_path: Path) -> None:
    """SQLite only: a database made before extended attributes existed (PostgreSQL databases
    start at a schema version that has them)."""
    store = SqliteStore(tmp_path / "meta.db")
    store.db.execute("DROP TABLE xattrs")  # a database made before extended attributes
    store.close()
    ns = Namespace(SqliteStore(tmp_path / "meta.db"), 1 << 20)
    f = ns.make_node(ROOT_INO, b"f", FILE, 0, 0)
    ns.setxattr(f.ino, b"user.kept", b"across restarts")
    ns.store.close()
    again = Namespace(SqliteStore(tmp_path / "meta.db"), 1 << 20)
    assert again.getxattr(f.ino, b"user.kept") == b"across restarts"
    assert again.lookup(ROOT_INO, b"f").xattrs == 1
