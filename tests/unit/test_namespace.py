"""POSIX rules of the tracker's namespace on a real SQLite file."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from cluster.errors import Exists, InvalidArgument, IsADir, NameTooLong, NotADir, NotEmpty, NotFound
from cluster.tracker.namespace import RENAME_EXCHANGE, RENAME_NOREPLACE, Namespace
from cluster.tracker.store import ROOT_INO, ChunkRow, SqliteStore

FILE = stat.S_IFREG | 0o644
DIR = stat.S_IFDIR | 0o755


@pytest.fixture
def ns(tmp_path: Path) -> Namespace:
    return Namespace(SqliteStore(tmp_path / "meta.db"), chunk_size=1 << 20)


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


def test_state_survives_reopen(tmp_path: Path) -> None:
    ns = Namespace(SqliteStore(tmp_path / "meta.db"), 1 << 20)
    d = ns.make_node(ROOT_INO, b"d", DIR, 0, 0)
    ns.symlink(d.ino, b"l", b"../target", 0, 0)
    ns.store.close()
    again = Namespace(SqliteStore(tmp_path / "meta.db"), 1 << 20)
    assert again.readlink(again.resolve(b"/d/l").ino) == b"../target"
