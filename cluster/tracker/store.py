"""The tracker's persistent state: namespace (with extended attributes), chunk lists and
pending chunk versions.

`MetadataStore` is the interface the rest of the tracker uses; `SqliteStore` implements it on
SQLite in WAL mode, `PostgresStore` (pgstore.py) on PostgreSQL. Both share `SqlStore`, the
methods written once in the SQL both speak, so their semantics cannot drift apart. Every
namespace operation is one transaction (`with store.transaction():`); callers never await
inside one, so trio tasks cannot interleave half-done changes.

Durability (of SQLite; a PostgreSQL commit is durable when it returns) comes in two steps, as
on a local filesystem. A commit is in the WAL at once, so it survives SIGKILL of the tracker
(synchronous=NORMAL: the bytes are in the kernel). It reaches the disk, surviving power loss
too, at the next `sync_to_disk` (an fsync of the WAL, which covers every commit before it):
the tracker calls it before acknowledging data (a chunk commit, an fsync), before telling
keepers to delete anything, and at least once a second (`tracker/durability.py`). An fsync
per operation cost each create and unlink about 150 us, a third of their time through the
mount, for a guarantee nobody was given: as on ext4, a new name is on the disk once the
file's data is, or after fsync of its directory.

After a stop that was not clean, the last second of commits may be gone while inode numbers
and chunk ids from it are still known elsewhere (the kernel, keepers' disks); so every id
counter then jumps ahead by `SKIP_AFTER_CRASH` and no id is ever handed out twice.

Which keeper holds which chunk is *not* here: that is soft state rebuilt from keeper reports.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

ROOT_INO = 1
# Chunk ids per query when a keeper's report is checked (SQLite takes up to 32,766 values).
NEEDED_BATCH = 500
# How far inode numbers, directory cookies and chunk ids jump after an unclean stop: far more
# than a tracker hands out in the second of commits such a stop can lose.
SKIP_AFTER_CRASH = 1 << 20
# How far each chunk's version jumps at its first allocation after an unclean stop: far more
# versions than one chunk is given in the second of commits such a stop can lose (a log
# appended to with O_DSYNC gets a version per write), and versions are 32 bits.
VERSION_SKIP_AFTER_CRASH = 1 << 16

SCHEMA = """
-- One row per file, directory, symlink, FIFO or device node.
CREATE TABLE IF NOT EXISTS inodes (
    ino         INTEGER PRIMARY KEY AUTOINCREMENT, -- never reused, so FUSE generation stays 0
    mode        INTEGER NOT NULL,  -- st_mode: file type bits and permission bits
    nlink       INTEGER NOT NULL,  -- names pointing here (dirs: 2 + subdirectories);
                                   -- 0 while an unlinked file is still open somewhere
    uid         INTEGER NOT NULL,
    gid         INTEGER NOT NULL,
    rdev        INTEGER NOT NULL DEFAULT 0,
    size        INTEGER NOT NULL DEFAULT 0,  -- bytes; chunks past it are never kept
    atime_ns    INTEGER NOT NULL,
    mtime_ns    INTEGER NOT NULL,
    ctime_ns    INTEGER NOT NULL,
    chunk_size  INTEGER NOT NULL DEFAULT 0,  -- bytes per chunk, fixed when the file is made
    replication INTEGER NOT NULL DEFAULT 0,  -- copies per chunk; 0: the cluster default
    target      BLOB,              -- symlink target, NULL otherwise
    stored      INTEGER NOT NULL DEFAULT 0  -- bytes in committed chunks (st_blocks): holes
                                            -- are not stored; kept by the chunk methods
);

-- Names. The id is the readdir cookie: stable while other entries come and go.
CREATE TABLE IF NOT EXISTS dentries (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    parent  INTEGER NOT NULL,      -- a directory inode
    name    BLOB NOT NULL,         -- bytes as the kernel gives them, at most 255
    ino     INTEGER NOT NULL,
    UNIQUE (parent, name)
);
CREATE INDEX IF NOT EXISTS dentries_by_parent ON dentries (parent, id);
CREATE INDEX IF NOT EXISTS dentries_by_ino ON dentries (ino);

-- The committed chunk list of each file. A missing index is a hole (reads as zeros).
CREATE TABLE IF NOT EXISTS chunks (
    ino       INTEGER NOT NULL,
    idx       INTEGER NOT NULL,    -- chunk number: bytes [idx*chunk_size, ...)
    chunk_id  INTEGER NOT NULL,    -- stable for (ino, idx); a rewrite bumps the version
    version   INTEGER NOT NULL,
    length    INTEGER NOT NULL,    -- valid bytes; anything stored past it reads as zeros
    digest    INTEGER NOT NULL,    -- xxh3_64 of the packed block checksums
    PRIMARY KEY (ino, idx)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS chunks_by_id ON chunks (chunk_id);

-- Versions handed out to writers and not yet committed. Keepers may hold them; they are not
-- garbage until they are older than the grace period.
CREATE TABLE IF NOT EXISTS allocations (
    chunk_id   INTEGER NOT NULL,
    version    INTEGER NOT NULL,
    ino        INTEGER NOT NULL,
    idx        INTEGER NOT NULL,
    created_ns INTEGER NOT NULL,
    PRIMARY KEY (chunk_id, version)
) WITHOUT ROWID;

-- The highest version ever handed out per chunk id. A (chunk id, version) pair is never
-- handed out twice, even after the chunk was truncated away: a delete queued for an old copy
-- must never hit a new one.
CREATE TABLE IF NOT EXISTS chunk_versions (
    chunk_id INTEGER PRIMARY KEY,
    top      INTEGER NOT NULL
);

-- Extended attributes (getfattr/setfattr, rsync -X, cp --preserve=xattr). Deleted with the
-- inode, in the same transaction (`delete_inode`).
CREATE TABLE IF NOT EXISTS xattrs (
    ino    INTEGER NOT NULL,       -- the inode they belong to
    name   BLOB NOT NULL,          -- whole name with its namespace (user., trusted., security.),
                                   -- 1 to 255 bytes, as the kernel gives it
    value  BLOB NOT NULL,          -- 0 to 64 KiB of any bytes
    PRIMARY KEY (ino, name)
);

-- Keepers being drained by `dfs decommission`: no new chunks, their copies moved elsewhere.
CREATE TABLE IF NOT EXISTS draining (
    keeper_id TEXT PRIMARY KEY
);

-- Recursive totals of each directory's tree, kept in the transaction of every change (as
-- MooseFS's dirinfo and CephFS's recursive statistics): `dfs du` reads one row instead of
-- walking the tree. A change to an entry adds its difference to its directory and to every
-- directory above it. Counted per name: a file with two hard links in a tree counts twice
-- there (as `du -l` and `find | wc -l` do, not as `du`), so each name's directory chain is
-- what a change reaches; an unlinked file that is still open has no name and counts nowhere.
CREATE TABLE IF NOT EXISTS dirstats (
    ino     INTEGER PRIMARY KEY,   -- a directory inode (exactly one row per directory)
    files   INTEGER NOT NULL,      -- names of non-directories in the tree (files, symlinks,
                                   -- FIFOs, device nodes)
    dirs    INTEGER NOT NULL,      -- directories in the tree, this one included
    bytes   INTEGER NOT NULL,      -- st_size of the regular files in the tree
    chunks  INTEGER NOT NULL,      -- their committed chunks
    stored  INTEGER NOT NULL       -- the bytes in those chunks (their st_blocks)
);

-- Counters: next chunk id.
CREATE TABLE IF NOT EXISTS counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""


@dataclass(slots=True)
class Inode:
    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    chunk_size: int
    replication: int
    target: bytes | None
    stored: int = 0  # read from the store, never written through update_inode
    xattrs: int = 0  # how many extended attributes: counted when read, never written

    def as_list(self) -> list[int]:
        """The wire form (messages.AttrList); generation is 0 as inodes are never reused."""
        return [
            self.ino,
            self.mode,
            self.nlink,
            self.uid,
            self.gid,
            self.rdev,
            self.size,
            self.atime_ns,
            self.mtime_ns,
            self.ctime_ns,
            0,
            self.stored,
            self.xattrs,
        ]


def _to_sql(u64: int) -> int:
    """SQLite integers are signed 64-bit; digests are unsigned."""
    return u64 - (1 << 64) if u64 >= 1 << 63 else u64


def _from_sql(i64: int) -> int:
    return i64 + (1 << 64) if i64 < 0 else i64


@dataclass(frozen=True, slots=True)
class ChunkRow:
    ino: int
    idx: int
    chunk_id: int
    version: int
    length: int
    digest: int


_INODE_COLUMNS = (
    "ino, mode, nlink, uid, gid, rdev, size, atime_ns, mtime_ns, ctime_ns, chunk_size,"
    " replication, target"
)


def _inode_values(inode: Inode) -> tuple[object, ...]:
    """Every column but `ino`, in _INODE_COLUMNS order."""
    return (
        inode.mode,
        inode.nlink,
        inode.uid,
        inode.gid,
        inode.rdev,
        inode.size,
        inode.atime_ns,
        inode.mtime_ns,
        inode.ctime_ns,
        inode.chunk_size,
        inode.replication,
        inode.target,
    )


_S_IFMT = 0o170000  # the file type bits of st_mode, for SQL
# Directories whose parent the store remembers (a change inside a tree updates the totals of
# every directory above it, so their chain is read on every create and unlink). At about 100
# bytes an entry, the cache is dropped whole when it grows past this.
PARENT_CACHE_MAX = 200_000
# Deeper than any real tree; only a corrupt table (a cycle) would reach it.
MAX_DEPTH = 100_000


@dataclass(slots=True)
class DirStats:
    """Totals of a tree (a `dirstats` row), or what one entry adds to its directory's."""

    files: int = 0
    dirs: int = 0
    bytes: int = 0
    chunks: int = 0
    stored: int = 0

    def values(self) -> tuple[int, int, int, int, int]:
        return (self.files, self.dirs, self.bytes, self.chunks, self.stored)

    def __bool__(self) -> bool:
        return any(self.values())

    def __neg__(self) -> DirStats:
        return DirStats(*(-v for v in self.values()))


class MetadataStore(Protocol):
    """What the tracker needs from its database: `SqliteStore` (the default) or
    `PostgresStore` (pgstore.py)."""

    # True if a commit survives power loss once COMMIT returns (then `sync_to_disk` is a no-op
    # and GroupSync never waits); False if it does only after the next `sync_to_disk`.
    durable_at_commit: bool

    def transaction(self) -> AbstractContextManager[None]: ...
    def close(self) -> None: ...
    def changes(self) -> int: ...
    def sync_to_disk(self) -> None: ...
    def get_inode(self, ino: int) -> Inode | None: ...
    def insert_inode(self, inode: Inode) -> int: ...
    def update_inode(self, inode: Inode) -> None: ...
    def delete_inode(self, ino: int) -> None: ...
    def lookup(self, parent: int, name: bytes) -> int | None: ...
    def add_dentry(self, parent: int, name: bytes, ino: int) -> None: ...
    def remove_dentry(self, parent: int, name: bytes) -> None: ...
    def list_dentries(
        self, parent: int, after: int, limit: int
    ) -> list[tuple[int, bytes, int]]: ...
    def has_dentries(self, parent: int) -> bool: ...
    def parent_of(self, ino: int) -> int | None: ...
    def get_chunks(self, ino: int, first: int, count: int) -> list[ChunkRow]: ...
    def put_chunk(self, row: ChunkRow) -> ChunkRow | None: ...
    def drop_chunks_from(self, ino: int, first: int) -> list[ChunkRow]: ...
    def drop_chunks_between(self, ino: int, first: int, end: int) -> list[ChunkRow]: ...
    def chunk_for(self, ino: int, idx: int) -> ChunkRow | None: ...
    def committed_version(self, chunk_id: int) -> int | None: ...
    def next_chunk_id(self) -> int: ...
    def add_allocation(self, chunk_id: int, version: int, ino: int, idx: int) -> None: ...
    def top_allocated_version(self, chunk_id: int) -> int: ...
    def next_version(self, chunk_id: int) -> int: ...
    def allocation_for(self, ino: int, idx: int) -> int | None: ...
    def remove_allocation(self, chunk_id: int, version: int) -> bool: ...
    def is_allocated(self, chunk_id: int, version: int) -> bool: ...
    def needed_versions(self, held: Sequence[tuple[int, int]]) -> set[tuple[int, int]]: ...
    def count_inodes(self) -> int: ...
    def chunk_goals(self) -> list[tuple[int, int, int, int]]: ...
    def chunk_goals_after(self, after: int, limit: int) -> list[tuple[int, int, int, int]]: ...
    def chunk_by_id(self, chunk_id: int) -> ChunkRow | None: ...
    def expired_allocations(self, older_than_ns: int) -> list[tuple[int, int]]: ...
    def draining(self) -> set[str]: ...
    def locks_held_until(self) -> float: ...
    def set_locks_held_until(self, unix_s: float) -> None: ...
    def set_draining(self, keeper_id: str, draining: bool) -> None: ...
    def count_chunks(self) -> int: ...
    def orphans(self) -> list[int]: ...
    def get_xattr(self, ino: int, name: bytes) -> bytes | None: ...
    def set_xattr(self, ino: int, name: bytes, value: bytes) -> None: ...
    def remove_xattr(self, ino: int, name: bytes) -> bool: ...
    def xattr_sizes(self, ino: int) -> dict[bytes, int]: ...
    def dirstats(self, ino: int) -> DirStats | None: ...
    def entry_stats(self, ino: int) -> DirStats: ...


class SqlStore:
    """The MetadataStore methods both backends share, in the SQL both speak: `?` placeholders
    (the PostgreSQL store translates them), upserts as `INSERT ... ON CONFLICT`, sums cast back
    to integers. A backend supplies `_exec`/`_execmany` on its connection, transactions, the
    id counters (`_insert_inode_row`, `_insert_dentry_row`, `_start_counters`), durability
    (`changes`, `sync_to_disk`) and its schema and migrations."""

    # Is a commit durable (power loss included) when COMMIT returns? Then GroupSync has
    # nothing to wait for.
    durable_at_commit = False

    def __init__(self) -> None:
        self._depth = 0  # nesting of transaction(); 0: none open
        self._version_skip = 0
        self._skipped: set[int] = set()  # chunks whose version jumped since the start
        # directory -> its parent: as committed, or as read in the transaction under way (a
        # rollback clears it). Entries are dropped when a directory's name goes away.
        self._dir_parent: dict[int, int] = {}

    def _exec(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """Run one statement; the result has fetchone, fetchall, rowcount and iterates."""
        raise NotImplementedError

    def _execmany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        raise NotImplementedError

    def _insert_inode_row(self, values: tuple[object, ...]) -> int:
        """Insert an inode (every column but `ino`, in _INODE_COLUMNS order) under a number
        never handed out before; return the number."""
        raise NotImplementedError

    def _insert_dentry_row(self, parent: int, name: bytes, ino: int) -> None:
        """Insert a name under a cookie (`dentries.id`) never handed out before."""
        raise NotImplementedError

    def transaction(self) -> AbstractContextManager[None]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def changes(self) -> int:
        raise NotImplementedError

    def sync_to_disk(self) -> None:
        raise NotImplementedError

    # --- inodes ---------------------------------------------------------------------------

    def get_inode(self, ino: int) -> Inode | None:
        row = self._exec(
            f"SELECT {_INODE_COLUMNS}, stored,"
            " (SELECT count(*) FROM xattrs WHERE xattrs.ino = inodes.ino) FROM inodes WHERE ino=?",
            (ino,),
        ).fetchone()
        return Inode(*row) if row else None

    def insert_inode(self, inode: Inode) -> int:
        inode.ino = self._insert_inode_row(_inode_values(inode))
        if stat.S_ISDIR(inode.mode):
            self._exec("INSERT INTO dirstats VALUES (?, 0, 1, 0, 0, 0)", (inode.ino,))
        return inode.ino

    def update_inode(self, inode: Inode) -> None:
        if stat.S_ISREG(inode.mode):
            row = self._exec("SELECT size FROM inodes WHERE ino=?", (inode.ino,)).fetchone()
            if row is not None and row[0] != inode.size:
                self._add_to_names(inode.ino, DirStats(bytes=inode.size - row[0]))
        self._exec(
            "UPDATE inodes SET mode=?, nlink=?, uid=?, gid=?, rdev=?, size=?, atime_ns=?,"
            " mtime_ns=?, ctime_ns=?, chunk_size=?, replication=?, target=? WHERE ino=?",
            (*_inode_values(inode), inode.ino),
        )

    def delete_inode(self, ino: int) -> None:
        """Delete an inode and its extended attributes (in the caller's transaction)."""
        self._exec("DELETE FROM inodes WHERE ino=?", (ino,))
        self._exec("DELETE FROM xattrs WHERE ino=?", (ino,))
        self._exec("DELETE FROM dirstats WHERE ino=?", (ino,))
        self._dir_parent.pop(ino, None)

    def count_inodes(self) -> int:
        return int(self._exec("SELECT count(*) FROM inodes").fetchone()[0])

    def orphans(self) -> list[int]:
        return [r[0] for r in self._exec("SELECT ino FROM inodes WHERE nlink=0")]

    # --- names ----------------------------------------------------------------------------

    def lookup(self, parent: int, name: bytes) -> int | None:
        row = self._exec(
            "SELECT ino FROM dentries WHERE parent=? AND name=?", (parent, name)
        ).fetchone()
        return int(row[0]) if row else None

    def add_dentry(self, parent: int, name: bytes, ino: int) -> None:
        self._insert_dentry_row(parent, name, ino)
        self._add_up(parent, self.entry_stats(ino))

    def remove_dentry(self, parent: int, name: bytes) -> None:
        rows = self._exec(
            "DELETE FROM dentries WHERE parent=? AND name=? RETURNING ino", (parent, name)
        ).fetchall()
        for (ino,) in rows:
            self._dir_parent.pop(ino, None)
            self._add_up(parent, -self.entry_stats(int(ino)))

    def list_dentries(self, parent: int, after: int, limit: int) -> list[tuple[int, bytes, int]]:
        rows = self._exec(
            "SELECT id, name, ino FROM dentries WHERE parent=? AND id>? ORDER BY id LIMIT ?",
            (parent, after, limit),
        ).fetchall()
        return [(int(i), bytes(n), int(o)) for i, n, o in rows]

    def has_dentries(self, parent: int) -> bool:
        return (
            self._exec("SELECT 1 FROM dentries WHERE parent=? LIMIT 1", (parent,)).fetchone()
            is not None
        )

    def parent_of(self, ino: int) -> int | None:
        row = self._exec("SELECT parent FROM dentries WHERE ino=? LIMIT 1", (ino,)).fetchone()
        return int(row[0]) if row else None

    # --- chunks ---------------------------------------------------------------------------

    def get_chunks(self, ino: int, first: int, count: int) -> list[ChunkRow]:
        rows = self._exec(
            "SELECT ino, idx, chunk_id, version, length, digest FROM chunks"
            " WHERE ino=? AND idx>=? ORDER BY idx LIMIT ?",
            (ino, first, count),
        ).fetchall()
        return [ChunkRow(r[0], r[1], r[2], r[3], r[4], _from_sql(r[5])) for r in rows]

    def chunk_for(self, ino: int, idx: int) -> ChunkRow | None:
        row = self._exec(
            "SELECT ino, idx, chunk_id, version, length, digest FROM chunks WHERE ino=? AND idx=?",
            (ino, idx),
        ).fetchone()
        if row is None:
            return None
        return ChunkRow(row[0], row[1], row[2], row[3], row[4], _from_sql(row[5]))

    def put_chunk(self, row: ChunkRow) -> ChunkRow | None:
        """Set chunk `idx` of `ino`; returns the row it replaced."""
        old = self.chunk_for(row.ino, row.idx)
        self._exec(
            "INSERT INTO chunks (ino, idx, chunk_id, version, length, digest)"
            " VALUES (?,?,?,?,?,?) ON CONFLICT (ino, idx) DO UPDATE SET chunk_id ="
            " excluded.chunk_id, version = excluded.version, length = excluded.length,"
            " digest = excluded.digest",
            (row.ino, row.idx, row.chunk_id, row.version, row.length, _to_sql(row.digest)),
        )
        self._add_stored(
            row.ino, row.length - (old.length if old is not None else 0), 0 if old else 1
        )
        return old

    def drop_chunks_from(self, ino: int, first: int) -> list[ChunkRow]:
        return self.drop_chunks_between(ino, first, 1 << 62)

    def drop_chunks_between(self, ino: int, first: int, end: int) -> list[ChunkRow]:
        """Remove chunks `first` to `end - 1` of `ino` (they become holes); returns them."""
        dropped = [
            ChunkRow(r[0], r[1], r[2], r[3], r[4], _from_sql(r[5]))
            for r in self._exec(
                "SELECT ino, idx, chunk_id, version, length, digest FROM chunks"
                " WHERE ino=? AND idx>=? AND idx<?",
                (ino, first, end),
            )
        ]
        if dropped:
            self._exec("DELETE FROM chunks WHERE ino=? AND idx>=? AND idx<?", (ino, first, end))
            self._add_stored(ino, -sum(row.length for row in dropped), -len(dropped))
        return dropped

    def _add_stored(self, ino: int, delta: int, chunks: int) -> None:
        """`ino` gained `chunks` committed chunks (may be negative) holding `delta` bytes."""
        if delta:
            self._exec("UPDATE inodes SET stored = stored + ? WHERE ino=?", (delta, ino))
        self._add_to_names(ino, DirStats(chunks=chunks, stored=delta))

    def chunk_by_id(self, chunk_id: int) -> ChunkRow | None:
        row = self._exec(
            "SELECT ino, idx, chunk_id, version, length, digest FROM chunks WHERE chunk_id=?",
            (chunk_id,),
        ).fetchone()
        if row is None:
            return None
        return ChunkRow(row[0], row[1], row[2], row[3], row[4], _from_sql(row[5]))

    def committed_version(self, chunk_id: int) -> int | None:
        row = self._exec("SELECT version FROM chunks WHERE chunk_id=?", (chunk_id,)).fetchone()
        return int(row[0]) if row else None

    def count_chunks(self) -> int:
        return int(self._exec("SELECT count(*) FROM chunks").fetchone()[0])

    def next_chunk_id(self) -> int:
        # The row exists from the first start (_start_counters); it holds the next id.
        row = self._exec(
            "UPDATE counters SET value = value + 1 WHERE name = 'chunk_id' RETURNING value - 1"
        ).fetchone()
        return int(row[0])

    # --- allocations ----------------------------------------------------------------------

    def add_allocation(self, chunk_id: int, version: int, ino: int, idx: int) -> None:
        self._exec(
            "INSERT INTO allocations (chunk_id, version, ino, idx, created_ns) VALUES (?,?,?,?,?)",
            (chunk_id, version, ino, idx, time.time_ns()),
        )

    def top_allocated_version(self, chunk_id: int) -> int:
        row = self._exec(
            "SELECT max(version) FROM allocations WHERE chunk_id=?", (chunk_id,)
        ).fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    def next_version(self, chunk_id: int) -> int:
        """A version of `chunk_id` never handed out before."""
        row = self._exec("SELECT top FROM chunk_versions WHERE chunk_id=?", (chunk_id,)).fetchone()
        top = max(
            int(row[0]) if row else 0,
            self.top_allocated_version(chunk_id),
            self.committed_version(chunk_id) or 0,
        )
        if self._version_skip and chunk_id not in self._skipped:
            # The versions handed out in the last second before an unclean stop may be lost
            # here while keepers hold them: never hand them out again.
            self._skipped.add(chunk_id)
            top += self._version_skip
        self._exec(
            "INSERT INTO chunk_versions (chunk_id, top) VALUES (?, ?)"
            " ON CONFLICT (chunk_id) DO UPDATE SET top = excluded.top",
            (chunk_id, top + 1),
        )
        return top + 1

    def allocation_for(self, ino: int, idx: int) -> int | None:
        row = self._exec(
            "SELECT chunk_id FROM allocations WHERE ino=? AND idx=? LIMIT 1", (ino, idx)
        ).fetchone()
        return int(row[0]) if row else None

    def remove_allocation(self, chunk_id: int, version: int) -> bool:
        cur = self._exec(
            "DELETE FROM allocations WHERE chunk_id=? AND version=?", (chunk_id, version)
        )
        return bool(cur.rowcount > 0)

    def expired_allocations(self, older_than_ns: int) -> list[tuple[int, int]]:
        rows = self._exec(
            "SELECT chunk_id, version FROM allocations WHERE created_ns < ?", (older_than_ns,)
        ).fetchall()
        return [(int(c), int(v)) for c, v in rows]

    # --- extended attributes --------------------------------------------------------------

    def get_xattr(self, ino: int, name: bytes) -> bytes | None:
        row = self._exec("SELECT value FROM xattrs WHERE ino=? AND name=?", (ino, name)).fetchone()
        return bytes(row[0]) if row else None

    def set_xattr(self, ino: int, name: bytes, value: bytes) -> None:
        self._exec(
            "INSERT INTO xattrs (ino, name, value) VALUES (?,?,?)"
            " ON CONFLICT (ino, name) DO UPDATE SET value = excluded.value",
            (ino, name, value),
        )

    def remove_xattr(self, ino: int, name: bytes) -> bool:
        """Remove one; False if the inode had no attribute of that name."""
        cur = self._exec("DELETE FROM xattrs WHERE ino=? AND name=?", (ino, name))
        return bool(cur.rowcount > 0)

    def xattr_sizes(self, ino: int) -> dict[bytes, int]:
        """Name -> value length of every extended attribute of `ino`, in name order."""
        rows = self._exec(
            "SELECT name, length(value) FROM xattrs WHERE ino=? ORDER BY name", (ino,)
        ).fetchall()
        return {bytes(name): int(size) for name, size in rows}

    # --- recursive totals (dfs du) ---------------------------------------------------------

    def dirstats(self, ino: int) -> DirStats | None:
        """The totals of the tree under directory `ino` (None: not a directory)."""
        row = self._exec(
            "SELECT files, dirs, bytes, chunks, stored FROM dirstats WHERE ino=?", (ino,)
        ).fetchone()
        return DirStats(*row) if row else None

    def entry_stats(self, ino: int) -> DirStats:
        """What one name of `ino` adds to the totals of the directories above it."""
        row = self._exec(
            "SELECT mode, size, stored, (SELECT count(*) FROM chunks WHERE chunks.ino = ?)"
            " FROM inodes WHERE ino=?",
            (ino, ino),
        ).fetchone()
        if row is None:
            return DirStats()
        mode, size, stored, chunks = row
        if stat.S_ISDIR(mode):
            return self.dirstats(ino) or DirStats(dirs=1)
        return DirStats(1, 0, size if stat.S_ISREG(mode) else 0, chunks, stored)

    def _up_the_tree(self, directory: int) -> list[int]:
        """`directory` and every directory above it (a directory has exactly one name)."""
        chain = [directory]
        at = directory
        while at != ROOT_INO and len(chain) < MAX_DEPTH:
            parent = self._dir_parent.get(at)
            if parent is None:
                row = self._exec(
                    "SELECT parent FROM dentries WHERE ino=? LIMIT 1", (at,)
                ).fetchone()
                if row is None:
                    break
                if len(self._dir_parent) >= PARENT_CACHE_MAX:
                    self._dir_parent.clear()
                parent = self._dir_parent[at] = int(row[0])
            chain.append(parent)
            at = parent
        return chain

    def _add_up(self, directory: int, delta: DirStats) -> None:
        """Add `delta` to `directory` and to every directory above it."""
        if not delta:
            return
        chain = self._up_the_tree(directory)
        for start in range(0, len(chain), 500):  # SQLite takes at most 32,766 parameters
            part = chain[start : start + 500]
            self._exec(
                "UPDATE dirstats SET files = files + ?, dirs = dirs + ?, bytes = bytes + ?,"
                " chunks = chunks + ?, stored = stored + ?"
                f" WHERE ino IN ({','.join('?' * len(part))})",
                (*delta.values(), *part),
            )

    def _add_to_names(self, ino: int, delta: DirStats) -> None:
        """A change of file `ino` reaches the directories above each of its names."""
        if delta:
            parents = self._exec("SELECT parent FROM dentries WHERE ino=?", (ino,))
            for (parent,) in parents.fetchall():
                self._add_up(int(parent), delta)

    def compute_dirstats(self) -> dict[int, DirStats]:
        """Every directory's totals, counted from the namespace itself (a walk of the whole
        table, for the migration and to check the kept totals against)."""
        parent_of: dict[int, int | None] = {ROOT_INO: None}
        totals: dict[int, DirStats] = {}
        for (ino,) in self._exec(
            "SELECT ino FROM inodes WHERE (mode & ?) = ?", (_S_IFMT, stat.S_IFDIR)
        ):
            totals[ino] = DirStats(dirs=1)
        for ino, parent in self._exec(
            "SELECT d.ino, d.parent FROM dentries d JOIN inodes i ON i.ino = d.ino"
            " WHERE (i.mode & ?) = ?",
            (_S_IFMT, stat.S_IFDIR),
        ):
            parent_of[ino] = parent
        for parent, files, size, stored in self._exec(
            "SELECT d.parent, count(*),"
            " CAST(sum(CASE WHEN (i.mode & ?) = ? THEN i.size ELSE 0 END) AS BIGINT),"
            " CAST(sum(i.stored) AS BIGINT) FROM dentries d JOIN inodes i ON i.ino = d.ino"
            " WHERE (i.mode & ?) != ? GROUP BY d.parent",
            (_S_IFMT, stat.S_IFREG, _S_IFMT, stat.S_IFDIR),
        ):
            if parent in totals:
                totals[parent].files += files
                totals[parent].bytes += size
                totals[parent].stored += stored
        for parent, chunks in self._exec(
            "SELECT d.parent, count(*) FROM dentries d JOIN chunks c ON c.ino = d.ino"
            " GROUP BY d.parent"
        ):
            if parent in totals:
                totals[parent].chunks += chunks
        # Roll each directory's totals into its parent's, deepest first.
        depth: dict[int, int] = {}
        for ino in totals:
            chain: list[int] = []
            at: int | None = ino
            while at is not None and at not in depth and len(chain) < 100000:
                chain.append(at)
                at = parent_of.get(at)
            base = depth[at] if at is not None and at in depth else -1
            for i, node in enumerate(reversed(chain)):
                depth[node] = base + 1 + i
        for ino in sorted(totals, key=lambda i: -depth[i]):
            parent = parent_of.get(ino)
            if parent is not None and parent in totals:
                up, own = totals[parent], totals[ino]
                up.files += own.files
                up.dirs += own.dirs
                up.bytes += own.bytes
                up.chunks += own.chunks
                up.stored += own.stored
        return totals

    def kept_dirstats(self) -> dict[int, DirStats]:
        """Every directory's totals as kept in `dirstats`."""
        return {
            int(row[0]): DirStats(*row[1:])
            for row in self._exec("SELECT ino, files, dirs, bytes, chunks, stored FROM dirstats")
        }

    def rebuild_dirstats(self) -> None:
        """(in a transaction) Replace the kept totals with ones counted afresh."""
        self._exec("DELETE FROM dirstats")
        self._execmany(
            "INSERT INTO dirstats VALUES (?,?,?,?,?,?)",
            ((ino, *totals.values()) for ino, totals in self.compute_dirstats().items()),
        )

    # --- health ---------------------------------------------------------------------------

    def chunk_goals_after(self, after: int, limit: int) -> list[tuple[int, int, int, int]]:
        """`chunk_goals` of the first `limit` chunks with ids above `after`, in id order."""
        rows = self._exec(
            "SELECT c.chunk_id, c.version, c.length, i.replication"
            " FROM chunks c JOIN inodes i ON c.ino = i.ino"
            " WHERE c.chunk_id > ? ORDER BY c.chunk_id LIMIT ?",
            (after, limit),
        ).fetchall()
        return [(int(a), int(b), int(c), int(d)) for a, b, c, d in rows]

    def chunk_goals(self) -> list[tuple[int, int, int, int]]:
        """(chunk id, version, length, copies wanted; 0: the default) of every chunk."""
        rows = self._exec(
            "SELECT c.chunk_id, c.version, c.length, i.replication"
            " FROM chunks c JOIN inodes i ON c.ino = i.ino"
        ).fetchall()
        return [(int(a), int(b), int(c), int(d)) for a, b, c, d in rows]

    def draining(self) -> set[str]:
        return {r[0] for r in self._exec("SELECT keeper_id FROM draining")}

    def locks_held_until(self) -> float:
        """Until when (Unix time) mounts may hold locks granted by an earlier tracker: a
        tracker starting before then waits for them to be reclaimed (cluster/locks.py)."""
        row = self._exec("SELECT value FROM counters WHERE name = 'locks_until'").fetchone()
        return float(row[0]) if row else 0.0

    def set_locks_held_until(self, unix_s: float) -> None:
        self._exec(
            "INSERT INTO counters (name, value) VALUES ('locks_until', ?)"
            " ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            (int(unix_s) + 1,),
        )

    def set_draining(self, keeper_id: str, draining: bool) -> None:
        if draining:
            self._exec(
                "INSERT INTO draining (keeper_id) VALUES (?) ON CONFLICT DO NOTHING", (keeper_id,)
            )
        else:
            self._exec("DELETE FROM draining WHERE keeper_id=?", (keeper_id,))

    def is_allocated(self, chunk_id: int, version: int) -> bool:
        return (
            self._exec(
                "SELECT 1 FROM allocations WHERE chunk_id=? AND version=?", (chunk_id, version)
            ).fetchone()
            is not None
        )

    def needed_versions(self, held: Sequence[tuple[int, int]]) -> set[tuple[int, int]]:
        """Which (chunk id, version) pairs of a keeper's report a file needs: the committed
        version, or one allocated and not committed yet. Two queries per few hundred chunks,
        not two per chunk: a keeper's inventory is hundreds of thousands of them."""
        needed: set[tuple[int, int]] = set()
        for start in range(0, len(held), NEEDED_BATCH):
            part = held[start : start + NEEDED_BATCH]
            ids = sorted({chunk_id for chunk_id, _ in part})
            marks = ",".join("?" * len(ids))
            known = {
                (int(chunk_id), int(version))
                for table in ("chunks", "allocations")
                for chunk_id, version in self._exec(
                    f"SELECT chunk_id, version FROM {table} WHERE chunk_id IN ({marks})", ids
                ).fetchall()
            }
            needed.update(pair for pair in part if pair in known)
        return needed


class SqliteStore(SqlStore):
    """The default backend: one SQLite file in WAL mode in the tracker's data directory."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA foreign_keys=OFF")
        self.db.executescript(SCHEMA)
        self._wal_path = Path(f"{path}-wal")
        self._wal_fd: int | None = None
        self._migrate()
        if self.get_inode(ROOT_INO) is None:
            now = time.time_ns()
            with self.transaction():
                self.db.execute(
                    f"INSERT INTO inodes ({_INODE_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (ROOT_INO, 0o40755, 2, 0, 0, 0, 0, now, now, now, 0, 0, None),
                )
                self.db.execute("INSERT INTO dirstats VALUES (?, 0, 1, 0, 0, 0)", (ROOT_INO,))
        self._start_counters()

    def _migrate(self) -> None:
        """Bring a database made by an older tracker up to SCHEMA, one explicit step each."""
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(inodes)")}
        if "stored" not in columns:  # added with st_blocks: backfill from the chunk lists
            with self.transaction():
                self.db.execute("ALTER TABLE inodes ADD COLUMN stored INTEGER NOT NULL DEFAULT 0")
                self.db.execute(
                    "UPDATE inodes SET stored ="
                    " (SELECT COALESCE(SUM(length), 0) FROM chunks WHERE chunks.ino = inodes.ino)"
                )
        root = self.db.execute("SELECT 1 FROM inodes WHERE ino=?", (ROOT_INO,)).fetchone()
        has_totals = self.db.execute("SELECT 1 FROM dirstats WHERE ino=?", (ROOT_INO,)).fetchone()
        if root is not None and has_totals is None:
            # Added with `dfs du`: SCHEMA made the table empty; fill it from the namespace.
            with self.transaction():
                self.rebuild_dirstats()

    def _start_counters(self) -> None:
        """Move every id counter past what an unclean stop may have lost (module docstring),
        and mark the store as open until `close` marks a clean stop."""
        with self.transaction():
            row = self.db.execute("SELECT value FROM counters WHERE name='clean_stop'").fetchone()
            # Rows that exist from the start, so that the jump below always has one to move.
            self.db.execute("INSERT OR IGNORE INTO counters (name, value) VALUES ('chunk_id', 1)")
            for table in ("inodes", "dentries"):
                self.db.execute(
                    "INSERT INTO sqlite_sequence (name, seq) SELECT ?, 0"
                    " WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = ?)",
                    (table, table),
                )
            # Versions are per chunk: each jumps at its first allocation (next_version).
            # (A new database has no versions to protect.)
            unclean = row is not None and row[0] != 1
            self._version_skip = VERSION_SKIP_AFTER_CRASH if unclean else 0
            if row is None or row[0] != 1:
                self.db.execute(
                    "UPDATE sqlite_sequence SET seq = seq + ? WHERE name IN ('inodes', 'dentries')",
                    (SKIP_AFTER_CRASH,),
                )
                self.db.execute(
                    "UPDATE counters SET value = value + ? WHERE name = 'chunk_id'",
                    (SKIP_AFTER_CRASH,),
                )
            self._set_clean_stop(0)
        self.sync_to_disk()

    def close(self) -> None:
        with self.transaction():
            self._set_clean_stop(1)
        self.sync_to_disk()
        self.db.close()
        if self._wal_fd is not None:
            os.close(self._wal_fd)
            self._wal_fd = None

    def _exec(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        return self.db.execute(sql, params)

    def _execmany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        self.db.executemany(sql, rows)

    def _insert_inode_row(self, values: tuple[object, ...]) -> int:
        cur = self.db.execute(
            f"INSERT INTO inodes ({_INODE_COLUMNS}) VALUES (NULL,?,?,?,?,?,?,?,?,?,?,?,?)", values
        )
        assert cur.lastrowid is not None
        return cur.lastrowid

    def _insert_dentry_row(self, parent: int, name: bytes, ino: int) -> None:
        self.db.execute(
            "INSERT INTO dentries (parent, name, ino) VALUES (?,?,?)", (parent, name, ino)
        )

    def _set_clean_stop(self, value: int) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO counters (name, value) VALUES ('clean_stop', ?)", (value,)
        )

    def changes(self) -> int:
        """How many rows were changed since the store was opened: a mark for `sync_to_disk`,
        to be compared for equality only (SQLite's count is 32 bits and wraps)."""
        return self.db.total_changes

    def sync_to_disk(self) -> None:
        """Make every commit so far survive power loss: fsync the WAL, which holds them all
        (a checkpoint syncs what it moves into the database file). Touches no connection
        state, so it may run in a worker thread while the trio thread goes on committing."""
        fd = self._wal_fd
        try:
            if fd is None or os.fstat(fd).st_ino != os.stat(self._wal_path).st_ino:
                if fd is not None:
                    os.close(fd)
                    self._wal_fd = None
                fd = self._wal_fd = os.open(self._wal_path, os.O_RDONLY)
        except FileNotFoundError:
            return  # no WAL: everything is in the database file, synced by the checkpoint
        os.fsync(fd)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One atomic unit (durable against SIGKILL; against power loss after the next
        `sync_to_disk`); nested uses join the outer one."""
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        self.db.execute("BEGIN IMMEDIATE")
        self._depth = 1
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            self._dir_parent.clear()
            raise
        else:
            self.db.execute("COMMIT")
        finally:
            self._depth = 0
