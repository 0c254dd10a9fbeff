"""The bytes each inode stores (its st_blocks), kept by the chunk methods of the store, and
the migration that adds them to a database made before they existed."""

from __future__ import annotations

import sqlite3
import stat
from pathlib import Path

from cluster.tracker.namespace import Namespace
from cluster.tracker.store import ROOT_INO, ChunkRow, SqliteStore

FILE = stat.S_IFREG | 0o644
CHUNK = 1 << 20


def test_stored_follows_commits_truncates_and_punches(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "meta.db")
    ns = Namespace(store, chunk_size=CHUNK)
    f = ns.make_node(ROOT_INO, b"f", FILE, 0, 0)
    for idx, length in [(0, CHUNK), (1, CHUNK), (2, CHUNK), (5, 1000)]:
        with store.transaction():
            store.put_chunk(ChunkRow(f.ino, idx, 100 + idx, 1, length, 7))
    assert ns.inode(f.ino).stored == 3 * CHUNK + 1000
    with store.transaction():  # a rewrite of a chunk replaces its length
        store.put_chunk(ChunkRow(f.ino, 5, 105, 2, 5000, 7))
    assert ns.inode(f.ino).stored == 3 * CHUNK + 5000
    inode, removal = ns.punch(f.ino, 1, 3)
    assert inode.stored == CHUNK + 5000
    assert sorted(row.idx for row in removal.chunks) == [1, 2]
    inode, _ = ns.setattr(f.ino, size=CHUNK // 2)
    assert inode.stored == CHUNK // 2
    assert inode.as_list()[11] == CHUNK // 2


def test_a_database_without_the_column_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "meta.db"
    store = SqliteStore(path)
    ns = Namespace(store, chunk_size=CHUNK)
    f = ns.make_node(ROOT_INO, b"f", FILE, 0, 0)
    with store.transaction():
        store.put_chunk(ChunkRow(f.ino, 0, 1, 1, 4096, 7))
        store.put_chunk(ChunkRow(f.ino, 3, 2, 1, 100, 7))
    store.close()
    # What an older tracker left: the same tables without `stored`.
    db = sqlite3.connect(path)
    columns = "ino, mode, nlink, uid, gid, rdev, size, atime_ns, mtime_ns, ctime_ns, chunk_size"
    columns += ", replication, target"
    db.executescript(
        f"CREATE TABLE old AS SELECT {columns} FROM inodes; DROP TABLE inodes;"
        " ALTER TABLE old RENAME TO inodes;"
    )
    db.commit()
    db.close()
    again = SqliteStore(path)
    inode = again.get_inode(f.ino)
    assert inode is not None
    assert inode.stored == 4096 + 100
