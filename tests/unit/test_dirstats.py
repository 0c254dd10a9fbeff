"""The recursive totals the tracker keeps per directory (`dfs du`): after random mixes of
creates, unlinks, renames across directories (replacing and exchanging), hard links,
symlinks, commits, truncates, punches and rmdirs, every directory's kept totals equal a walk
of its tree, on both stores (SQLite and PostgreSQL); they survive a restart, and a SQLite
database made before them is migrated."""

from __future__ import annotations

import random
import sqlite3
import stat
from pathlib import Path

import pytest

from cluster.errors import DfsError
from cluster.tracker.namespace import RENAME_EXCHANGE, RENAME_NOREPLACE, Namespace
from cluster.tracker.store import ROOT_INO, ChunkRow, DirStats, SqliteStore, SqlStore
from tests.conftest import OpenStore
from tests.stores import sql_rows

FILE = stat.S_IFREG | 0o644
DIR = stat.S_IFDIR | 0o755
CHUNK = 1 << 16


def walk(store: SqlStore, ino: int) -> DirStats:
    """The totals of the tree at directory `ino`, counted name by name (the oracle)."""
    total = DirStats(dirs=1)
    after = 0
    while page := store.list_dentries(ino, after, 1000):
        after = page[-1][0]
        for _, _, child in page:
            inode = store.get_inode(child)
            assert inode is not None
            if stat.S_ISDIR(inode.mode):
                sub = walk(store, child)
                total.files += sub.files
                total.dirs += sub.dirs
                total.bytes += sub.bytes
                total.chunks += sub.chunks
                total.stored += sub.stored
                continue
            rows = store.get_chunks(child, 0, 1 << 62)
            total.files += 1
            total.bytes += inode.size if stat.S_ISREG(inode.mode) else 0
            total.chunks += len(rows)
            total.stored += sum(row.length for row in rows)
    return total


def check(store: SqlStore) -> None:
    kept = store.kept_dirstats()
    dirs = [
        ino for ino, in sql_rows(store, "SELECT ino FROM inodes WHERE (mode & ?) = ?",
                                 (0o170000, stat.S_IFDIR))
    ]  # fmt: skip
    assert sorted(kept) == sorted(dirs)
    for ino in dirs:
        assert kept[ino] == walk(store, ino), f"directory {ino}"
    assert kept == store.compute_dirstats()


def commit(ns: Namespace, ino: int, size: int, next_id: list[int]) -> None:
    """What the tracker's CommitChunks does to the store: chunk rows, then the size."""
    store = ns.store
    with store.transaction():
        inode = ns.inode(ino)
        keep = (size + CHUNK - 1) // CHUNK
        for idx in range(keep):
            if random.random() < 0.3:
                continue  # a hole
            length = min(CHUNK, size - idx * CHUNK)
            next_id[0] += 1
            store.put_chunk(ChunkRow(ino, idx, next_id[0], 1, length, 0))
        store.drop_chunks_from(ino, keep)
        inode.size = size
        store.update_inode(inode)


def random_ops(ns: Namespace, rng: random.Random, steps: int) -> None:
    store = ns.store
    assert isinstance(store, SqlStore)
    dirs = list(store.kept_dirstats())
    next_id = [sql_rows(store, "SELECT COALESCE(max(chunk_id), 0) FROM chunks")[0][0]]
    names = [b"a", b"b", b"c", b"d"]

    def entries() -> list[tuple[int, bytes, int]]:
        rows = sql_rows(store, "SELECT parent, name, ino FROM dentries")
        return [(int(p), bytes(n), int(i)) for p, n, i in rows]

    def files() -> list[int]:
        return [i for _, _, i in entries() if not stat.S_ISDIR(ns.inode(i).mode)]

    for _ in range(steps):
        op = rng.choice(
            ["file", "file", "dir", "symlink", "link", "unlink", "rmdir", "rename", "rename",
             "commit", "commit", "truncate", "punch", "open_unlink"]
        )  # fmt: skip
        parent = rng.choice(dirs)
        name = rng.choice(names) + bytes([rng.randrange(97, 101)])
        try:
            if op == "file":
                ns.make_node(parent, name, FILE, 0, 0)
            elif op == "dir":
                dirs.append(ns.make_node(parent, name, DIR, 0, 0).ino)
            elif op == "symlink":
                ns.symlink(parent, name, b"some/target", 0, 0)
            elif op == "link" and files():
                ns.link(rng.choice(files()), parent, name)
            elif op == "unlink" and entries():
                p, n, _ = rng.choice(entries())
                ns.unlink(p, n)
            elif op == "rmdir" and entries():
                empty = [e for e in entries() if e[2] in dirs and not store.has_dentries(e[2])]
                p, n, _ = rng.choice(empty or entries())
                ns.rmdir(p, n)
            elif op == "rename" and entries():
                p, n, _ = rng.choice(entries())
                flags = rng.choice([0, 0, RENAME_NOREPLACE, RENAME_EXCHANGE])
                ns.rename(p, n, rng.choice(dirs), name, flags)
            elif op == "commit" and files():
                ino = rng.choice(files())
                if stat.S_ISREG(ns.inode(ino).mode):
                    commit(ns, ino, rng.randrange(0, 5 * CHUNK), next_id)
            elif op == "truncate" and files():
                ino = rng.choice(files())
                if stat.S_ISREG(ns.inode(ino).mode):
                    ns.setattr(ino, size=rng.randrange(0, 3 * CHUNK))
            elif op == "punch" and files():
                ino = rng.choice(files())
                if stat.S_ISREG(ns.inode(ino).mode):
                    ns.punch(ino, rng.randrange(0, 3), rng.randrange(3, 6))
            elif op == "open_unlink" and entries():
                # An unlinked file held open keeps its chunks (and may be written) but has no
                # name: it counts nowhere, and its release changes nothing.
                p, n, i = rng.choice(entries())
                if stat.S_ISREG(ns.inode(i).mode):
                    ns.open(i, "s")
                    ns.unlink(p, n)
                    if ns.store.get_inode(i) is not None:
                        commit(ns, i, rng.randrange(0, 3 * CHUNK), next_id)
                    ns.release(i, "s")
        except DfsError:
            pass  # ENOTEMPTY, EEXIST, EISDIR...: refused operations change nothing
        dirs = [d for d in dirs if store.get_inode(d) is not None]


@pytest.mark.parametrize("seed", range(8))
def test_totals_equal_a_walk_after_random_operations(open_store: OpenStore, seed: int) -> None:
    store = open_store()
    ns = Namespace(store, chunk_size=CHUNK)
    rng = random.Random(seed)
    random.seed(seed)
    for _ in range(6):
        random_ops(ns, rng, 60)
        check(store)
    store.close()
    again = open_store()  # a restart: the totals were persisted
    check(again)
    again.close()


def test_hard_links_count_once_per_name(open_store: OpenStore) -> None:
    store = open_store()
    ns = Namespace(store, chunk_size=CHUNK)
    a = ns.make_node(ROOT_INO, b"a", DIR, 0, 0)
    b = ns.make_node(ROOT_INO, b"b", DIR, 0, 0)
    f = ns.make_node(a.ino, b"f", FILE, 0, 0)
    commit(ns, f.ino, 3 * CHUNK, [0])
    ns.link(f.ino, b.ino, b"g")
    ns.link(f.ino, b.ino, b"h")
    size = 3 * CHUNK
    chunks = len(store.get_chunks(f.ino, 0, 10))
    assert ns.disk_usage(b"/a")[1] == DirStats(1, 1, size, chunks, store.get_inode(f.ino).stored)  # type: ignore[union-attr]
    assert ns.disk_usage(b"/b")[1].files == 2
    assert ns.disk_usage(b"/b")[1].bytes == 2 * size
    root = ns.disk_usage(b"/")[1]
    assert (root.files, root.dirs, root.bytes) == (3, 3, 3 * size)
    # A commit through one name moves every directory that links it.
    commit(ns, f.ino, CHUNK, [1000])
    assert ns.disk_usage(b"/b")[1].bytes == 2 * CHUNK
    assert ns.disk_usage(b"/")[1].bytes == 3 * CHUNK
    # A file is its own total.
    inode, own = ns.disk_usage(b"/b/g")
    assert inode.ino == f.ino
    assert (own.files, own.dirs, own.bytes) == (1, 0, CHUNK)
    check(store)


def test_a_database_without_totals_is_migrated(tmp_path: Path) -> None:
    """SQLite only: PostgreSQL databases start at a schema version with the totals."""
    path = tmp_path / "meta.db"
    store = SqliteStore(path)
    ns = Namespace(store, chunk_size=CHUNK)
    random_ops(ns, random.Random(99), 300)
    expected = store.kept_dirstats()
    check(store)
    store.close()
    # What an older tracker left: no dirstats table.
    db = sqlite3.connect(path)
    db.execute("DROP TABLE dirstats")
    db.commit()
    db.close()
    again = SqliteStore(path)
    assert again.kept_dirstats() == expected
    check(again)
    again.close()
