"""The tracker's metadata in PostgreSQL: the second `MetadataStore` backend (tracker key
`store = "postgresql://USER@HOST:PORT/DB"`, or `postgresql://USER@/DB?host=/socket/dir`).

Same tables, same semantics and the same SQL as `SqliteStore` (both share `SqlStore`); what
differs is here:

- *Connection.* One psycopg 3 connection in autocommit mode, used only from the trio thread
  (the interface stays synchronous: a namespace change is one transaction with no await
  inside). `transaction()` sends BEGIN/COMMIT itself. A lost connection makes the call under
  way fail with `StoreUnavailable` (clients retry it within `retry_window_s`, as across a
  tracker restart), and the next call connects again. A transaction is never carried over to
  a new connection: what it did is rolled back with the old one.
- *Durability.* A commit is durable when COMMIT returns (`synchronous_commit` on, which the
  store sets for its session if the server has it off), so `sync_to_disk` has nothing to do and
  `GroupSync` never waits (`durable_at_commit`).
- *Ids.* Inode numbers, directory cookies and chunk ids come from rows of `counters`
  (`inodes`, `dentries`: the last one handed out; `chunk_id`: the next one), moved in the
  transaction that uses them, so an id is never handed out twice. After a start that follows
  an unclean stop (`clean_stop` is not 1) they jump by SKIP_AFTER_CRASH, and each chunk's
  version by VERSION_SKIP_AFTER_CRASH at its first new version, exactly as in SQLite: nothing
  committed is lost here, but a database restored from a backup or failed over to an
  asynchronous replica may lack the last commits, whose ids keepers and kernels still know.
- *Schema versions.* `schema_version` holds one row, the version of the schema the tables
  are at; `MIGRATIONS[n]` brings version n - 1 to n, each in one transaction under an advisory
  lock, so trackers starting together migrate once. A database at a version newer than this
  code knows is refused. The versions:

    1. the tables of `SqliteStore`'s SCHEMA in PostgreSQL types (every integer BIGINT, as
       SQLite's are 64-bit; names, targets and extended attributes BYTEA), with `counters`
       holding the id counters, the root directory and its totals.
    2. `leader`: one row, the lease of the active tracker when several share the database
       (holder, epoch, expiry by the database's clock, the active one's HOST:PORT; see
       cluster/tracker/leader.py).

- *Fencing.* While `fence` is set (a tracker that shares the database through the lease),
  every transaction first reads the lease's epoch `FOR SHARE` and fails with NotActive unless
  it is `fence`; `on_fenced` is then called, and the tracker steps down.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
import psycopg.errors

from cluster.errors import NotActive, StoreUnavailable, Unavailable
from cluster.tracker.store import (
    _INODE_COLUMNS,
    ROOT_INO,
    SKIP_AFTER_CRASH,
    VERSION_SKIP_AFTER_CRASH,
    SqlStore,
)

log = logging.getLogger(__name__)

# How long a (re)connection may block the tracker before the call fails with
# StoreUnavailable; the client retries it.
CONNECT_TIMEOUT_S = 2
# Any statement that runs longer than this is cancelled (and its transaction rolled back):
# the tracker's statements take milliseconds, so this only bounds a hung server or a lock
# held by a stuck peer.
STATEMENT_TIMEOUT_MS = 10_000
# A server that stops answering (a partition, a dead host) fails the call after this long
# instead of hanging the tracker on a socket read (libpq's tcp_user_timeout and keepalives;
# Unix sockets ignore them).
TCP_TIMEOUT_MS = 10_000
# A transaction left open by a tracker that stopped in it (SIGSTOP, a hung host) is rolled
# back by the server after this long, so that its lock on the lease cannot hold a takeover up:
# the tracker never waits for anything but the database inside a transaction.
IDLE_IN_TRANSACTION_MS = 5_000
# Taken for the schema check and migrations, so that trackers starting at once migrate once.
MIGRATION_LOCK = 0x64667321

MIGRATIONS: dict[int, str] = {
    1: f"""
-- One row per file, directory, symlink, FIFO or device node (as in SQLite's SCHEMA).
CREATE TABLE inodes (
    ino         BIGINT PRIMARY KEY,  -- from counters 'inodes', never reused
    mode        BIGINT NOT NULL,     -- st_mode: file type bits and permission bits
    nlink       BIGINT NOT NULL,     -- names pointing here (dirs: 2 + subdirectories);
                                     -- 0 while an unlinked file is still open somewhere
    uid         BIGINT NOT NULL,
    gid         BIGINT NOT NULL,
    rdev        BIGINT NOT NULL DEFAULT 0,
    size        BIGINT NOT NULL DEFAULT 0,  -- bytes; chunks past it are never kept
    atime_ns    BIGINT NOT NULL,
    mtime_ns    BIGINT NOT NULL,
    ctime_ns    BIGINT NOT NULL,
    chunk_size  BIGINT NOT NULL DEFAULT 0,  -- bytes per chunk, fixed when the file is made
    replication BIGINT NOT NULL DEFAULT 0,  -- copies per chunk; 0: the cluster default
    target      BYTEA,               -- symlink target, NULL otherwise
    stored      BIGINT NOT NULL DEFAULT 0   -- bytes in committed chunks (st_blocks)
);

-- Names. The id (from counters 'dentries') is the readdir cookie.
CREATE TABLE dentries (
    id      BIGINT PRIMARY KEY,
    parent  BIGINT NOT NULL,       -- a directory inode
    name    BYTEA NOT NULL,        -- bytes as the kernel gives them, at most 255
    ino     BIGINT NOT NULL,
    UNIQUE (parent, name)
);
CREATE INDEX dentries_by_parent ON dentries (parent, id);
CREATE INDEX dentries_by_ino ON dentries (ino);

-- The committed chunk list of each file. A missing index is a hole (reads as zeros).
CREATE TABLE chunks (
    ino       BIGINT NOT NULL,
    idx       BIGINT NOT NULL,
    chunk_id  BIGINT NOT NULL,     -- stable for (ino, idx); a rewrite bumps the version
    version   BIGINT NOT NULL,
    length    BIGINT NOT NULL,     -- valid bytes
    digest    BIGINT NOT NULL,     -- xxh3_64 of the block checksums, stored signed
    PRIMARY KEY (ino, idx)
);
CREATE INDEX chunks_by_id ON chunks (chunk_id);

-- Versions handed out to writers and not yet committed.
CREATE TABLE allocations (
    chunk_id   BIGINT NOT NULL,
    version    BIGINT NOT NULL,
    ino        BIGINT NOT NULL,
    idx        BIGINT NOT NULL,
    created_ns BIGINT NOT NULL,
    PRIMARY KEY (chunk_id, version)
);
CREATE INDEX allocations_by_chunk ON allocations (ino, idx);

-- The highest version ever handed out per chunk id.
CREATE TABLE chunk_versions (
    chunk_id BIGINT PRIMARY KEY,
    top      BIGINT NOT NULL
);

-- Extended attributes, deleted with their inode.
CREATE TABLE xattrs (
    ino    BIGINT NOT NULL,
    name   BYTEA NOT NULL,         -- whole name with its namespace, 1 to 255 bytes
    value  BYTEA NOT NULL,         -- 0 to 64 KiB
    PRIMARY KEY (ino, name)
);

-- Keepers being drained by `dfs decommission`.
CREATE TABLE draining (
    keeper_id TEXT PRIMARY KEY
);

-- Recursive totals of each directory's tree (see SQLite's SCHEMA).
CREATE TABLE dirstats (
    ino     BIGINT PRIMARY KEY,
    files   BIGINT NOT NULL,
    dirs    BIGINT NOT NULL,
    bytes   BIGINT NOT NULL,
    chunks  BIGINT NOT NULL,
    stored  BIGINT NOT NULL
);

-- Counters: 'inodes' and 'dentries' (the last id handed out), 'chunk_id' (the next one),
-- 'clean_stop' (1 after a clean stop, 0 while a tracker has the store open).
CREATE TABLE counters (
    name  TEXT PRIMARY KEY,
    value BIGINT NOT NULL
);

INSERT INTO inodes ({_INODE_COLUMNS})
    SELECT {ROOT_INO}, {0o40755}, 2, 0, 0, 0, 0, t, t, t, 0, 0, NULL
    FROM (SELECT CAST(extract(epoch FROM now()) * 1000000000 AS BIGINT) AS t) AS clock;
INSERT INTO dirstats VALUES ({ROOT_INO}, 0, 1, 0, 0, 0);
INSERT INTO counters (name, value) VALUES
    ('inodes', {ROOT_INO}), ('dentries', 0), ('chunk_id', 1);
""",
    2: """
-- The lease of the active tracker (cluster/tracker/leader.py): one row, id 1. A standby takes
-- over once `expires` (the database's clock) has passed, bumping `epoch`; every transaction
-- of the active tracker checks the epoch is still its own.
CREATE TABLE leader (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    holder  TEXT NOT NULL,         -- host/pid/random of the tracker holding it; '' never held
    epoch   BIGINT NOT NULL,       -- +1 at every takeover
    expires TIMESTAMPTZ NOT NULL,  -- renewed every second by the holder
    addr    TEXT NOT NULL          -- the active tracker's HOST:PORT, for standbys to point to
);
INSERT INTO leader VALUES (1, '', 0, '2000-01-01 00:00:00+00', '');
""",
}
SCHEMA_VERSION = max(MIGRATIONS)


def redact(uri: str) -> str:
    """`uri` fit for a log line: any password replaced."""
    uri = re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", uri)
    return re.sub(r"(password=)[^&\s]*", r"\1***", uri)


class PostgresStore(SqlStore):
    durable_at_commit = True

    def __init__(self, uri: str, *, start: bool = True) -> None:
        """Connect and migrate; with `start`, also begin as the one tracker (`start()`); a
        tracker that shares the database calls `start()` once it holds the lease."""
        super().__init__()
        self.uri = uri
        self.db: psycopg.Connection[tuple[Any, ...]] | None = None
        self._sql: dict[str, str] = {}  # `?` statements -> psycopg's `%s`
        self._commits = 0
        self._broken = False  # the connection of the transaction under way was lost
        # The lease epoch every transaction must find (None: no check; -1: never, a standby).
        self.fence: int | None = None
        self.on_fenced: Callable[[], object] = lambda: None
        try:
            self._migrate()
        except StoreUnavailable as exc:
            raise StoreUnavailable(f"{redact(uri)}: {exc}") from None
        if start:
            self.start()

    def start(self) -> None:
        """Begin serving as the active tracker: the start-up counters (module docstring)."""
        self._dir_parent.clear()
        self._start_counters()

    # --- the connection -------------------------------------------------------------------

    def _connect(self) -> psycopg.Connection[tuple[Any, ...]]:
        if self.db is not None and not self.db.closed and not self.db.broken:
            return self.db
        if self._depth:
            # The transaction under way lived on the lost connection and is gone with it.
            raise StoreUnavailable("the connection to the metadata database was lost")
        try:
            db = psycopg.connect(
                self.uri,
                autocommit=True,
                connect_timeout=CONNECT_TIMEOUT_S,
                options=f"-c statement_timeout={STATEMENT_TIMEOUT_MS}"
                f" -c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION_MS}",
                application_name="dfs-tracker",
                tcp_user_timeout=TCP_TIMEOUT_MS,
                keepalives=1,
                keepalives_idle=5,
                keepalives_interval=2,
                keepalives_count=3,
            )
        except psycopg.Error as exc:
            raise StoreUnavailable(f"cannot reach the metadata database: {exc}") from None
        try:
            if db.execute("SHOW synchronous_commit").fetchone() == ("off",):
                db.execute("SET synchronous_commit = on")  # durable at COMMIT: see module doc
            if db.execute("SHOW fsync").fetchone() == ("off",):
                log.warning("PostgreSQL runs with fsync off: a power cut can lose metadata")
        except psycopg.Error as exc:
            db.close()
            raise StoreUnavailable(f"metadata database: {exc}") from None
        if self.db is not None:
            log.info("reconnected to the metadata database")
            self.db.close()
        self.db = db
        return db

    def _lost(self, exc: psycopg.Error) -> StoreUnavailable:
        """The connection failed under a call: drop it, and say so to the caller."""
        log.warning("metadata database unreachable: %s", str(exc).strip() or type(exc).__name__)
        if self._depth:
            self._broken = True
        if self.db is not None:
            self.db.close()
        return StoreUnavailable(f"metadata database unreachable: {exc}")

    def _exec(self, sql: str, params: Sequence[Any] = ()) -> psycopg.Cursor[tuple[Any, ...]]:
        statement = self._sql.get(sql)
        if statement is None:
            statement = self._sql[sql] = sql.replace("?", "%s")
        db = self._connect()
        try:
            return db.execute(statement, params)
        except psycopg.errors.NumericValueOutOfRange:
            raise OverflowError("a number is out of range for a BIGINT") from None
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            if db.closed or db.broken:
                raise self._lost(exc) from None
            raise

    def _execmany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        db = self._connect()
        try:
            with db.cursor() as cur:
                cur.executemany(sql.replace("?", "%s"), list(rows))
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            if db.closed or db.broken:
                raise self._lost(exc) from None
            raise

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One atomic unit, durable (power loss included) once it returns; nested uses join
        the outer one. Fails with StoreUnavailable if the database is lost under it."""
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        self._exec("BEGIN")
        self._depth = 1
        self._broken = False
        try:
            if self.fence is not None:
                self._check_fence()
            yield
            if self._broken:
                raise StoreUnavailable("the connection to the metadata database was lost")
        except BaseException:
            self._dir_parent.clear()
            if not self._broken and self.db is not None and not self.db.closed:
                try:
                    self.db.execute("ROLLBACK")
                except psycopg.Error:
                    self.db.close()
            raise
        else:
            self._depth = 0
            self._commit()
        finally:
            self._depth = 0

    def _check_fence(self) -> None:
        """(first in a transaction) Fail unless the lease is still at our epoch; the share
        lock keeps a takeover waiting until this transaction ends."""
        row = self._exec(
            "SELECT epoch, addr, expires > now() FROM leader WHERE id = 1 FOR SHARE"
        ).fetchone()
        if row is not None and int(row[0]) == self.fence:
            return
        was_active = self.fence != -1
        self.fence = -1
        if was_active:
            log.warning("the lease moved on (epoch %s): stepping down", row[0] if row else None)
            self.on_fenced()
        raise NotActive.pointing_to(str(row[1]) if row is not None and row[2] else "")

    def _commit(self) -> None:
        """COMMIT on the connection the transaction ran on (never on a new one, where it
        would succeed without committing anything)."""
        db = self.db
        if db is None or db.closed or db.broken:
            self._dir_parent.clear()
            raise StoreUnavailable("the connection to the metadata database was lost")
        try:
            db.execute("COMMIT")
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            # Cut off in the middle: the commit may or may not have been made.
            self._dir_parent.clear()
            raise self._lost(exc) from None
        self._commits += 1

    # --- schema, counters, lifecycle ------------------------------------------------------

    def _migrate(self) -> None:
        """Bring the database to SCHEMA_VERSION, one numbered step at a time."""
        with self.transaction():
            self._exec("SELECT pg_advisory_xact_lock(?)", (MIGRATION_LOCK,))
            self._exec("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = self._exec("SELECT version FROM schema_version").fetchone()
            version = int(row[0]) if row else 0
            if version > SCHEMA_VERSION:
                raise ValueError(
                    f"the metadata database is at schema version {version}, newer than this"
                    f" tracker's {SCHEMA_VERSION}: run a newer dfs-tracker"
                )
            for step in range(version + 1, SCHEMA_VERSION + 1):
                log.info("migrating the metadata database to schema version %d", step)
                self._connect().execute(MIGRATIONS[step])  # no parameters: a script
            if row is None:
                self._exec("INSERT INTO schema_version VALUES (?)", (SCHEMA_VERSION,))
            elif version != SCHEMA_VERSION:
                self._exec("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))

    def schema_version(self) -> int:
        row = self._exec("SELECT version FROM schema_version").fetchone()
        assert row is not None
        return int(row[0])

    def _start_counters(self) -> None:
        """Move every id counter past what an unclean stop may have lost (module docstring),
        and mark the store as open until `close` marks a clean stop."""
        with self.transaction():
            row = self._exec(
                "SELECT value FROM counters WHERE name = 'clean_stop' FOR UPDATE"
            ).fetchone()
            unclean = row is not None and row[0] != 1
            self._version_skip = VERSION_SKIP_AFTER_CRASH if unclean else 0
            self._skipped.clear()
            if row is None or row[0] != 1:
                self._exec(
                    "UPDATE counters SET value = value + ?"
                    " WHERE name IN ('inodes', 'dentries', 'chunk_id')",
                    (SKIP_AFTER_CRASH,),
                )
            self._set_clean_stop(0)

    def _set_clean_stop(self, value: int) -> None:
        self._exec(
            "INSERT INTO counters (name, value) VALUES ('clean_stop', ?)"
            " ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            (value,),
        )

    def close(self) -> None:
        """Mark a clean stop (so the next start does not jump) and disconnect. With the
        database unreachable the mark is missed, and the next start jumps: safe either way."""
        try:
            with self.transaction():
                self._set_clean_stop(1)
        except NotActive:
            pass  # a standby: the active tracker keeps the store open
        except Unavailable as exc:
            log.warning("could not mark a clean stop in the metadata database: %s", exc)
        if self.db is not None:
            self.db.close()

    def changes(self) -> int:
        """Transactions committed since the store was opened (a mark, as SQLite's change
        count is; compared for equality only)."""
        return self._commits

    def sync_to_disk(self) -> None:
        """Nothing to do: every COMMIT returned only once PostgreSQL had flushed it to its WAL
        on the disk (synchronous_commit on; with synchronous standbys configured, on theirs
        too), so every commit so far already survives power loss."""

    # --- ids ------------------------------------------------------------------------------

    def _insert_inode_row(self, values: tuple[object, ...]) -> int:
        row = self._exec(
            "WITH n AS (UPDATE counters SET value = value + 1 WHERE name = 'inodes'"
            " RETURNING value)"
            f" INSERT INTO inodes ({_INODE_COLUMNS}) SELECT n.value, {','.join('?' * len(values))}"
            " FROM n RETURNING ino",
            values,
        ).fetchone()
        assert row is not None
        return int(row[0])

    def _insert_dentry_row(self, parent: int, name: bytes, ino: int) -> None:
        self._exec(
            "WITH n AS (UPDATE counters SET value = value + 1 WHERE name = 'dentries'"
            " RETURNING value)"
            " INSERT INTO dentries (id, parent, name, ino) SELECT n.value, ?, ?, ? FROM n",
            (parent, name, ino),
        )
