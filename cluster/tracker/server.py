"""The tracker: answers namespace and chunk requests, and keeps the keeper registry.

`Tracker.handle` is the one dispatcher; each request maps to one method. Namespace changes go
through `Namespace` (one SQLite transaction each, no await inside), so requests never observe
each other half-done. Deletions that a change implies are queued on the keepers that hold the
chunks and leave with their next heartbeat reply.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import stat
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from cluster import messages as m
from cluster.auth import Credentials
from cluster.errors import (
    DfsError,
    InvalidArgument,
    LockFenced,
    LockGrace,
    LocksLost,
    NoSpace,
    NotActive,
    NotFound,
    StaleChunk,
    StoreUnavailable,
    Unavailable,
    printable,
)
from cluster.locks import Lock, LockTable, check_range
from cluster.protocol import Payload
from cluster.rpc import ConnectionPool
from cluster.serve import ServeOptions, Server
from cluster.tracker import placement
from cluster.tracker.durability import GroupSync
from cluster.tracker.healer import Healer
from cluster.tracker.history import History
from cluster.tracker.keepers import KeeperRegistry, KeeperState
from cluster.tracker.leader import RENEW_S, Lease
from cluster.tracker.namespace import Namespace, Removal
from cluster.tracker.store import ChunkRow, Inode, SqliteStore, SqlStore
from cluster.trackers import roles

log = logging.getLogger(__name__)

MAX_CHUNK_SIZE = 64 << 20
# The longest a lock wait holds one request (SetLock.wait_s): far below any RPC timeout.
MAX_LOCK_HOLD_S = 5.0
# An open of a file of at most this many chunks returns its chunk list with the attributes.
OPEN_WITH_CHUNKS = 4


def _chunk_record(raw: list[Any], max_length: int) -> tuple[int, int, int, int, int, list[str]]:
    """Validate a chunk record from a client: [index, id, version, length, digest, [addr]]."""
    if len(raw) == 6:
        index, chunk_id, version, length, digest, addrs = raw
        numbers = (index, chunk_id, version, length, digest)
        if (
            all(isinstance(v, int) and not isinstance(v, bool) for v in numbers)
            and isinstance(addrs, list)
            and all(isinstance(a, str) for a in addrs)
            and 0 <= length <= max_length
            and index >= 0
        ):
            return index, chunk_id, version, length, digest, addrs
    raise InvalidArgument(f"malformed chunk record {raw!r}")


def open_store(spec: str, data_dir: Path) -> SqlStore:
    """The metadata store named by the tracker key `store`: `sqlite` (a file in the data
    directory) or a postgresql:// URI."""
    if spec == "sqlite":
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        return SqliteStore(data_dir / "meta.db")
    from cluster.tracker.pgstore import PostgresStore, redact  # psycopg only when asked for

    store = PostgresStore(spec, start=False)  # started once it holds the lease
    log.info("metadata in PostgreSQL at %s", redact(spec))
    return store


# Chunks of a keeper's report checked between two chances for other requests to run.
CLASSIFY_SLICE = 5000


class Tracker:
    def __init__(
        self,
        data_dir: Path,
        *,
        replication: int = 3,
        chunk_size: int = 8 << 20,
        heartbeat_s: float = 2.0,
        dead_after_s: float = 30.0,
        gc_grace_s: float = 3600.0,
        store: str = "sqlite",
        lease_s: float = 5.0,
        lock_lease_s: float = 30.0,
        peers: list[str] | None = None,
        credentials: Credentials,
    ) -> None:
        self.credentials = credentials
        self.server = Server(self, ServeOptions(role="tracker", credentials=credentials))
        if not 0 < chunk_size <= MAX_CHUNK_SIZE or chunk_size % 65536:
            raise ValueError("chunk_size must be a multiple of 64 KiB, at most 64 MiB")
        self.replication = replication
        self.chunk_size = chunk_size
        self.heartbeat_s = heartbeat_s
        self.dead_after_s = dead_after_s
        self.gc_grace_s = gc_grace_s
        self.lock_lease_s = lock_lease_s
        self.addr = ""  # HOST:PORT, once listening
        self.peers = peers or []  # every tracker of the `tracker` list, for the status page
        self.history = History()
        self.store = open_store(store, data_dir)
        # With PostgreSQL, trackers sharing the database take turns through a lease (leader.py)
        # and only its holder is active; with SQLite the one tracker always is.
        self.lease: Lease | None = None
        if store != "sqlite":
            from cluster.tracker.pgstore import PostgresStore

            assert isinstance(self.store, PostgresStore)
            self.lease = Lease(self.store, lease_s)
            self.store.fence = -1  # a standby until it holds the lease
            self.store.on_fenced = self._step_down
        self.active = False
        self._active_scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        self._pool: ConnectionPool | None = None  # to the other trackers, for tracker_roles
        self._fresh_state(set())
        if self.lease is None:
            self._activate()
        self._handlers: dict[type[m.Message], Callable[[Any, str], Awaitable[m.Message]]] = {
            m.Lookup: self.lookup,
            m.GetAttr: self.get_attr,
            m.SetAttr: self.set_attr,
            m.ResolvePath: self.resolve_path,
            m.ReadDir: self.read_dir,
            m.MakeNode: self.make_node,
            m.Symlink: self.symlink,
            m.ReadLink: self.read_link,
            m.Link: self.link,
            m.Unlink: self.unlink,
            m.RemoveDir: self.remove_dir,
            m.Rename: self.rename,
            m.OpenFile: self.open_file,
            m.ReleaseFiles: self.release_files,
            m.SetLock: self.set_lock,
            m.GetLock: self.get_lock,
            m.ReleaseLocks: self.release_locks,
            m.KeepLocks: self.keep_locks,
            m.ReclaimLocks: self.reclaim_locks,
            m.StatFs: self.stat_fs,
            m.Sync: self.sync,
            m.SetXattr: self.set_xattr,
            m.GetXattr: self.get_xattr,
            m.ListXattr: self.list_xattr,
            m.RemoveXattr: self.remove_xattr,
            m.GetChunks: self.get_chunks,
            m.AllocateChunk: self.allocate_chunk,
            m.CommitChunks: self.commit_chunks,
            m.PunchChunks: self.punch_chunks,
            m.ReportBadChunk: self.report_bad_chunk,
            m.AbandonChunks: self.abandon_chunks,
            m.ClusterStatus: self.cluster_status,
            m.Fsck: self.fsck,
            m.SetReplication: self.set_replication,
            m.Decommission: self.decommission,
            m.DiskUsage: self.disk_usage,
            m.RegisterKeeper: self.register_keeper,
            m.Heartbeat: self.heartbeat,
            m.Goodbye: self.goodbye,
        }

    def _fresh_state(self, draining: set[str]) -> None:
        """The in-memory state of a tracker that has just started: no keepers known yet."""
        self.namespace = Namespace(self.store, self.chunk_size)
        self.durable = GroupSync(self.store)
        self.registry = KeeperRegistry(self.dead_after_s, draining)
        self.locks = LockTable(self.lock_lease_s)
        self._locks_noted_until = 0.0  # what the store says of held locks (Unix time)
        self.healer = Healer(
            self.store,
            self.registry,
            self.replication,
            interval_s=min(1.0, self.heartbeat_s),
            startup_grace_s=self.dead_after_s,
            copy_timeout_s=max(30.0, 10 * self.heartbeat_s),
            gc_grace_s=self.gc_grace_s,
        )

    def _activate(self) -> None:
        """Become the active tracker, as at a fresh start after an unclean stop: the store's
        start-up (ids jump), no keeper known until they register, the healer waiting
        dead_after_s before it acts."""
        if self.lease is not None:
            self.lease.store.fence = self.lease.epoch
            self.lease.store.start()
        self._fresh_state(self.store.draining())
        held_until = self.store.locks_held_until()
        if held_until > time.time():
            # Mounts may hold locks of the tracker before: they get one lease to reclaim them.
            self.locks = LockTable(self.lock_lease_s, grace=True)
            self._locks_noted_until = held_until
        removal = self.namespace.collect_orphans()
        if removal.chunks:
            log.info("collected %d chunks of files unlinked while open", len(removal.chunks))
        self.active = True
        if self._nursery is not None:
            self._nursery.start_soon(self._active_tasks, name="active")

    def _step_down(self) -> None:
        """The lease went to another tracker: serve nothing until it comes back to us."""
        if self.lease is not None:
            self.lease.store.fence = -1
            self.lease.epoch = None
        if not self.active:
            return
        log.warning("no longer the active tracker: standing by")
        self.active = False
        if self._active_scope is not None:
            self._active_scope.cancel()
        self._fresh_state(set())

    async def _active_tasks(self) -> None:
        """What only the active tracker runs; cancelled when it steps down."""
        if self.locks.in_grace():
            log.info("granting no new locks for %.0f s: mounts reclaim theirs", self.lock_lease_s)
        with trio.CancelScope() as scope:
            self._active_scope = scope
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._heal, name="healer")
                nursery.start_soon(self.durable.run, name="background sync")
                nursery.start_soon(self._expire_lock_sessions, name="lock leases")

    async def _lead(self) -> None:
        """Hold the lease while active (renew it every RENEW_S); while standing by, take it
        as soon as it expires."""
        while True:
            await trio.sleep(RENEW_S)
            self._lease_step()

    def _lease_step(self) -> None:
        assert self.lease is not None
        try:
            if self.active:
                if not self.lease.renew():
                    log.warning("the lease was taken by %s", self.lease.row.addr or "?")
                    self._step_down()
            elif self.lease.try_acquire():
                try:
                    self._activate()
                except Unavailable as exc:  # the database went away, or the lease moved on
                    log.warning("could not become active: %s", exc)
                    self._step_down()
        except StoreUnavailable as exc:
            log.debug("lease: %s", exc)

    def role(self) -> m.TrackerRoleReply:
        return m.TrackerRoleReply(
            role="active" if self.active else "standby",
            addr=self.addr,
            leader=self.lease.row.as_dict() if self.lease else {},
        )

    async def tracker_roles(self) -> list[dict[str, Any]]:
        """Every tracker of the `tracker` list and this one: address, role, the lease as each
        sees it (the status page; `dfs status` asks them itself)."""
        own = self.addr
        # One address is just this tracker's own `tracker` setting, not a list of peers.
        addrs = [a for a in self.peers if a != own] if len(self.peers) > 1 else []
        if self._pool is None:
            self._pool = ConnectionPool("tracker", self.credentials)
        found = await roles(self._pool, addrs)
        mine = self.role()
        found.append({"addr": own, "role": mine.role, "leader": mine.leader})
        return sorted(found, key=lambda t: str(t["addr"]))

    async def run(
        self, host: str, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until cancelled or `shutdown()`; `task_status.started(port)` once accepting."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self.history.run, self, name="history")
                bound = await nursery.start(self.server.run, host, port)
                self.addr = f"{host}:{bound}"
                if self.lease is None:
                    nursery.start_soon(self._active_tasks, name="active")
                else:
                    self.lease.addr = self.addr
                    self._lease_step()  # a first try before the ready line
                    nursery.start_soon(self._lead, name="lease")
                task_status.started(bound)
                # After shutdown() the server finishes the requests (commits) in flight and
                # returns; then the healer stops too.
                await self.server.finished.wait()
                nursery.cancel_scope.cancel()
        finally:
            if self.lease is not None:
                with contextlib.suppress(DfsError):
                    self.lease.release()  # a standby need not wait for the expiry
            self.store.close()

    def shutdown(self) -> None:
        self.server.shutdown()

    async def _heal(self) -> None:
        """Run the healer; when the metadata database is out of reach, start it over once it
        is back, with the start-up grace again (keepers may have lost us meanwhile)."""
        while True:
            try:
                await self.healer.run()
            except StoreUnavailable as exc:
                log.warning("healer paused: %s", exc)
                await trio.sleep(1.0)
            except NotActive:
                return  # stepped down (the scope is cancelled)

    async def handle(
        self, msg: m.Message, payload: bytearray, peer: str
    ) -> tuple[m.Message, Payload]:
        if type(msg) is m.TrackerRole:
            return self.role(), b""
        if not self.active:
            assert self.lease is not None
            raise self.lease.not_active()
        handler = self._handlers.get(type(msg))
        if handler is None:
            raise InvalidArgument(f"the tracker does not serve {type(msg).__name__}")
        self.history.count(type(msg))
        try:
            return await handler(msg, peer), b""
        except OverflowError:
            # SQLite stores signed 64-bit integers; a larger id cannot name anything.
            raise InvalidArgument("a number in the request is out of range") from None

    def _removed(self, removal: Removal) -> None:
        for row in removal.chunks:
            self.registry.queue_delete(row.chunk_id, row.version)

    # --- namespace ------------------------------------------------------------------------

    async def lookup(self, msg: m.Lookup, peer: str) -> m.Message:
        return m.AttrReply(attr=self.namespace.lookup(msg.parent, msg.name).as_list())

    async def get_attr(self, msg: m.GetAttr, peer: str) -> m.Message:
        return m.AttrReply(attr=self.namespace.inode(msg.ino).as_list())

    async def set_attr(self, msg: m.SetAttr, peer: str) -> m.Message:
        if msg.size_bytes is not None:
            self._check_not_fenced(msg.session, msg.ino, msg.opened, msg.locks_table)
        inode, removal = self.namespace.setattr(
            msg.ino,
            mode=msg.mode,
            uid=msg.uid,
            gid=msg.gid,
            size=msg.size_bytes,
            atime_ns=msg.atime_ns,
            mtime_ns=msg.mtime_ns,
            ctime_ns=msg.ctime_ns,
        )
        self._removed(removal)
        return m.AttrReply(attr=inode.as_list())

    async def resolve_path(self, msg: m.ResolvePath, peer: str) -> m.Message:
        return m.AttrReply(attr=self.namespace.resolve(msg.path).as_list())

    async def read_dir(self, msg: m.ReadDir, peer: str) -> m.Message:
        entries = self.namespace.readdir(msg.ino, msg.offset, msg.limit)
        return m.ReadDirReply(
            entries=[[name, inode.as_list(), cookie] for name, inode, cookie in entries]
        )

    def _dir_attr(self, ino: int) -> list[int]:
        """A directory's attributes right after this request changed it, for the reply."""
        return self.namespace.inode(ino).as_list()

    async def make_node(self, msg: m.MakeNode, peer: str) -> m.Message:
        inode = self.namespace.make_node(msg.parent, msg.name, msg.mode, msg.uid, msg.gid, msg.rdev)
        parent_attr = self._dir_attr(msg.parent)
        if not (msg.session and stat.S_ISREG(inode.mode)):
            return m.AttrReply(attr=inode.as_list(), parent_attr=parent_attr)
        self.namespace.open(inode.ino, msg.session)
        try:
            first = self._allocate(inode, 0, [], reserve=False)
            first_chunk: list[Any] | None = [first.chunk_id, first.version, first.keepers]
        except (Unavailable, NoSpace):
            first_chunk = None  # the first write asks again, and fails if it must
        return m.AttrReply(
            attr=inode.as_list(),
            chunk_size_bytes=inode.chunk_size or self.chunk_size,
            parent_attr=parent_attr,
            first_chunk=first_chunk,
            opened=list(self.locks.open_mark()),
        )

    async def symlink(self, msg: m.Symlink, peer: str) -> m.Message:
        inode = self.namespace.symlink(msg.parent, msg.name, msg.target, msg.uid, msg.gid)
        return m.AttrReply(attr=inode.as_list(), parent_attr=self._dir_attr(msg.parent))

    async def read_link(self, msg: m.ReadLink, peer: str) -> m.Message:
        return m.ReadLinkReply(target=self.namespace.readlink(msg.ino))

    async def link(self, msg: m.Link, peer: str) -> m.Message:
        inode = self.namespace.link(msg.ino, msg.new_parent, msg.new_name)
        return m.AttrReply(attr=inode.as_list(), parent_attr=self._dir_attr(msg.new_parent))

    async def unlink(self, msg: m.Unlink, peer: str) -> m.Message:
        inode, removal = self.namespace.unlink(msg.parent, msg.name)
        self._removed(removal)
        return m.UnlinkReply(
            ino=inode.ino, nlink=inode.nlink, parent_attr=self._dir_attr(msg.parent)
        )

    async def remove_dir(self, msg: m.RemoveDir, peer: str) -> m.Message:
        inode = self.namespace.rmdir(msg.parent, msg.name)
        return m.UnlinkReply(ino=inode.ino, nlink=0, parent_attr=self._dir_attr(msg.parent))

    async def rename(self, msg: m.Rename, peer: str) -> m.Message:
        removal = self.namespace.rename(
            msg.old_parent, msg.old_name, msg.new_parent, msg.new_name, msg.flags
        )
        self._removed(removal)
        return m.OkReply()

    async def open_file(self, msg: m.OpenFile, peer: str) -> m.Message:
        inode = self.namespace.open(msg.ino, msg.session)
        chunk_bytes = inode.chunk_size or self.chunk_size
        chunks = None
        if stat.S_ISREG(inode.mode) and inode.size <= OPEN_WITH_CHUNKS * chunk_bytes:
            rows = self.store.get_chunks(inode.ino, 0, OPEN_WITH_CHUNKS)
            chunks = [self._chunk_record(r) for r in rows]
        return m.AttrReply(
            attr=inode.as_list(),
            chunk_size_bytes=chunk_bytes,
            chunks=chunks,
            opened=list(self.locks.open_mark()),
        )

    # --- locks (locks.py) -------------------------------------------------------------------

    async def _expire_lock_sessions(self) -> None:
        while True:
            await trio.sleep(min(1.0, self.lock_lease_s / 4))
            self._note_locks_held()
            for session, count in self.locks.expire():
                if count:
                    log.warning(
                        "session %s silent for %.0f s: its %d locks released",
                        session,
                        self.lock_lease_s,
                        count,
                    )

    def _note_locks_held(self, *, granting: bool = False) -> None:
        """While locks are held, keep the store saying so a lease ahead (one write per lease):
        a tracker that takes over before then grants reclaims first. Before a grant
        (`granting`) the note must reach past the longest wait: if it cannot be written, the
        request fails (StoreUnavailable: the mount asks again) rather than grant a lock that
        a takeover would not know of."""
        now = time.time()
        ahead = self.lock_lease_s + MAX_LOCK_HOLD_S
        if not (granting or self.locks.any_held()) or self._locks_noted_until > now + ahead:
            return
        until = now + ahead + self.lock_lease_s
        try:
            with self.store.transaction():
                self.store.set_locks_held_until(until)
            self._locks_noted_until = until
        except DfsError as exc:
            if granting:
                raise StoreUnavailable(f"cannot note held locks in the store: {exc}") from exc
            log.warning("could not note held locks in the store: %s", exc)

    def _check_not_lost(self, session: str) -> None:
        if self.locks.lost(session):
            lease = self.lock_lease_s
            raise LocksLost(f"the session was silent for longer than its {lease} s lease")

    def _check_not_fenced(
        self, session: str, ino: int, opened: list[Any] | None, locks_table: str
    ) -> None:
        """Refuse a write of `session` to `ino` through an open made before its locks there
        were released by an expired lease (LockTable.fenced), or made under locks of another
        lock table (`locks_table`: a tracker before a restart or takeover) that were not
        reclaimed here: while they still may be (the grace period), the writer is told to
        ask again (LockGrace, after its mount has reclaimed them); after, they are lost."""
        if locks_table and locks_table != self.locks.id:
            if self.locks.in_grace():
                raise LockGrace(f"inode {ino}: reclaim the locks of table {locks_table} first")
            raise LockFenced(
                f"inode {ino}: written under locks of table {locks_table}, which this tracker "
                "never had back; close the file and open it again"
            )
        mark = None
        if opened is not None:
            if len(opened) != 2 or not isinstance(opened[0], str) or type(opened[1]) is not int:
                raise InvalidArgument("malformed open mark")
            mark = (opened[0], opened[1])
        if self.locks.fenced(session, ino, mark):
            raise LockFenced(
                f"inode {ino}: this mount's locks on it were released while it was silent for "
                f"longer than its {self.lock_lease_s} s lease; close the file and open it again"
            )

    async def _after_grace(self) -> None:
        """New locks wait for the grace period; past MAX_LOCK_HOLD_S the mount asks again."""
        if self.locks.in_grace():
            await self.locks.wait_grace(MAX_LOCK_HOLD_S)
            if self.locks.in_grace():
                raise LockGrace()

    def _lock_reply(self, blocker: Lock | None, session: str, ino: int | None) -> m.LockReply:
        if blocker is None:
            attr = self.namespace.inode(ino).as_list() if ino is not None else None
            return m.LockReply(
                granted=True, type=fcntl.F_UNLCK, start=0, end=0, pid=0,
                lease_s=self.lock_lease_s, table=self.locks.id, attr=attr,
            )  # fmt: skip
        return m.LockReply(
            granted=False,
            type=blocker.type,
            start=blocker.start,
            end=blocker.end,
            pid=blocker.pid if blocker.owner[0] == session else 0,
            lease_s=self.lock_lease_s,
            table=self.locks.id,
        )

    async def set_lock(self, msg: m.SetLock, peer: str) -> m.Message:
        if not stat.S_ISREG(self.namespace.inode(msg.ino).mode) and not msg.flock:
            raise InvalidArgument("fcntl locks are for regular files")
        # A session whose lease ran out hears so before anything new is granted to it.
        self._check_not_lost(msg.session)
        if msg.type != fcntl.F_UNLCK:
            await self._after_grace()
            self._note_locks_held(granting=True)  # before: a takeover must know of the grant
        self.locks.touch(msg.session)
        owner = (msg.session, msg.owner)
        args = (msg.ino, msg.flock, owner, msg.type, msg.start, msg.end, msg.pid)
        if msg.wait_s > 0:
            blocker = await self.locks.set_waiting(*args, min(msg.wait_s, MAX_LOCK_HOLD_S))
        else:
            blocker = self.locks.try_set(*args)
        self.locks.touch(msg.session)
        # A granted lock carries fresh attributes so that the mount revalidates its cache.
        fresh = msg.ino if msg.type != fcntl.F_UNLCK else None
        return self._lock_reply(blocker, msg.session, fresh)

    async def get_lock(self, msg: m.GetLock, peer: str) -> m.Message:
        check_range(msg.type, msg.start, msg.end)
        self.namespace.inode(msg.ino)  # ENOENT for a file that is gone
        await self._after_grace()
        self.locks.touch(msg.session)
        owner = (msg.session, msg.owner)
        blocker = self.locks.conflict(msg.ino, False, owner, msg.type, msg.start, msg.end)
        return self._lock_reply(blocker, msg.session, None)

    async def release_locks(self, msg: m.ReleaseLocks, peer: str) -> m.Message:
        self.locks.touch(msg.session)
        self.locks.release_owner(msg.ino, (msg.session, msg.owner))
        return m.OkReply()

    async def reclaim_locks(self, msg: m.ReclaimLocks, peer: str) -> m.Message:
        if any(len(lock) != 7 for lock in msg.locks):
            raise InvalidArgument("malformed lock to reclaim")
        if not self.locks.in_grace():
            raise LocksLost("too late to reclaim them: this tracker's grace period is over")
        self._note_locks_held(granting=True)  # another takeover must know of them too
        refused = self.locks.reclaim(msg.session, msg.locks)
        if refused:
            # All or nothing: the mount forgets them all, so none may stay here unreleased.
            self.locks.drop_session(msg.session)
            raise LocksLost(f"{refused} of the session's locks conflict with others' reclaims")
        self.locks.touch(msg.session)
        log.info("session %s reclaimed %d locks", msg.session, len(msg.locks))
        return self._lock_reply(None, msg.session, None)

    async def keep_locks(self, msg: m.KeepLocks, peer: str) -> m.Message:
        if msg.table != self.locks.id:
            raise LocksLost("the tracker restarted or failed over since they were granted")
        self._check_not_lost(msg.session)
        self.locks.touch(msg.session)
        return m.OkReply()

    async def release_files(self, msg: m.ReleaseFiles, peer: str) -> m.Message:
        if any(len(item) != 2 for item in msg.unused):
            raise InvalidArgument("malformed unused allocation")
        for ino in msg.inos:
            self._removed(self.namespace.release(ino, msg.session))
        if msg.unused:
            # Nothing was written under these: dropping the rows is all there is to free.
            with self.store.transaction():
                for chunk_id, version in msg.unused:
                    self.store.remove_allocation(chunk_id, version)
        return m.OkReply()

    async def sync(self, msg: m.Sync, peer: str) -> m.Message:
        await self.durable.sync()
        return m.OkReply()

    async def set_xattr(self, msg: m.SetXattr, peer: str) -> m.Message:
        inode = self.namespace.setxattr(msg.ino, msg.name, msg.value, msg.flags)
        return m.AttrReply(attr=inode.as_list())

    async def get_xattr(self, msg: m.GetXattr, peer: str) -> m.Message:
        return m.GetXattrReply(value=self.namespace.getxattr(msg.ino, msg.name))

    async def list_xattr(self, msg: m.ListXattr, peer: str) -> m.Message:
        return m.ListXattrReply(names=self.namespace.listxattr(msg.ino))

    async def remove_xattr(self, msg: m.RemoveXattr, peer: str) -> m.Message:
        return m.AttrReply(attr=self.namespace.removexattr(msg.ino, msg.name).as_list())

    async def stat_fs(self, msg: m.StatFs, peer: str) -> m.Message:
        live = self.registry.live()
        capacity = sum(k.capacity_bytes for k in live)
        used = sum(k.used_bytes for k in live)
        return m.StatFsReply(
            capacity_bytes=capacity,
            used_bytes=used,
            free_bytes=max(0, capacity - used),
            files=self.store.count_inodes(),
        )

    # --- chunks ---------------------------------------------------------------------------

    def _copies(self, inode: Inode) -> int:
        return inode.replication or self.replication

    def _addrs(self, row: ChunkRow) -> list[str]:
        """Live keepers holding the committed version, rotated by chunk id to spread reads."""
        live: list[str] = []
        stale: list[str] = []
        for keeper_id in self.registry.chunks.holders_of(row.chunk_id, row.version):
            keeper = self.registry.keepers.get(keeper_id)
            if keeper is None:
                continue
            (live if self.registry.is_alive(keeper_id) else stale).append(keeper.addr)
        live.sort()
        if live:
            turn = row.chunk_id % len(live)
            live = live[turn:] + live[:turn]
        return live + sorted(stale)

    async def get_chunks(self, msg: m.GetChunks, peer: str) -> m.Message:
        inode = self.namespace.inode(msg.ino)
        rows = self.store.get_chunks(msg.ino, msg.first_index, max(0, msg.count))
        return m.ChunksReply(
            size_bytes=inode.size,
            chunk_size_bytes=inode.chunk_size or self.chunk_size,
            chunks=[self._chunk_record(r) for r in rows],
        )

    def _chunk_record(self, row: ChunkRow) -> list[Any]:
        return [row.idx, row.chunk_id, row.version, row.length, row.digest, self._addrs(row)]

    async def allocate_chunk(self, msg: m.AllocateChunk, peer: str) -> m.Message:
        inode = self.namespace.inode(msg.ino)
        if msg.base_version:
            reply = self._allocate_patch(inode, msg.index, msg.base_version)
        else:
            reply = self._allocate(inode, msg.index, msg.exclude)
        # No fsync here: after a power loss the store makes every chunk's versions jump (as it
        # does ids), so a version handed out now is never handed out again.
        return reply

    def _allocate_patch(self, inode: Inode, index: int, base_version: int) -> m.AllocateReply:
        """A new version of chunk `index` written as a patch over its committed version
        `base_version`: it goes to the live keepers that hold that version, which alone can
        apply it."""
        chunk_bytes = inode.chunk_size or self.chunk_size
        with self.store.transaction():
            current = self.store.chunk_for(inode.ino, index)
            if current is None or current.version != base_version:
                raise StaleChunk(f"chunk {index} of inode {inode.ino} is not at v{base_version}")
            writable = {k.addr for k in self.registry.writable()}
            holders = [addr for addr in self._addrs(current) if addr in writable]
            if not holders:
                raise StaleChunk(
                    f"no writable keeper holds chunk {current.chunk_id} v{base_version}"
                )
            version = self.store.next_version(current.chunk_id)
            self.store.add_allocation(current.chunk_id, version, inode.ino, index)
        return m.AllocateReply(
            chunk_id=current.chunk_id,
            version=version,
            keepers=holders[: self._copies(inode)],
            chunk_size_bytes=chunk_bytes,
        )

    def _allocate(
        self, inode: Inode, index: int, exclude: list[str], *, reserve: bool = True
    ) -> m.AllocateReply:
        """Choose keepers for a new version of chunk `index` and record the allocation.

        `reserve` counts the whole chunk against the chosen keepers' free space until their
        next heartbeat, so that a burst of big writes spreads out; the speculative allocation
        at create does not, since most new files are small and many stay empty.
        """
        chunk_bytes = inode.chunk_size or self.chunk_size
        candidates = [k for k in self.registry.writable() if k.addr not in exclude]
        if not candidates:
            raise Unavailable("no live keepers")
        chosen = placement.choose(candidates, self._copies(inode), chunk_bytes)
        if not chosen:
            raise NoSpace("every live keeper is full")
        with self.store.transaction():
            current = self.store.chunk_for(inode.ino, index)
            if current is not None:
                chunk_id = current.chunk_id
            else:
                chunk_id = self.store.allocation_for(inode.ino, index) or self.store.next_chunk_id()
            version = self.store.next_version(chunk_id)
            self.store.add_allocation(chunk_id, version, inode.ino, index)
        if reserve:
            for keeper in chosen:
                keeper.reserved_bytes += chunk_bytes
        return m.AllocateReply(
            chunk_id=chunk_id,
            version=version,
            keepers=[k.addr for k in chosen],
            chunk_size_bytes=chunk_bytes,
        )

    async def commit_chunks(self, msg: m.CommitChunks, peer: str) -> m.Message:
        self._check_not_fenced(msg.session, msg.ino, msg.opened, msg.locks_table)
        replaced: list[ChunkRow] = []
        with self.store.transaction():
            inode = self.namespace.inode(msg.ino)
            chunk_bytes = inode.chunk_size or self.chunk_size
            for raw in msg.chunks:
                index, chunk_id, version, length, digest, addrs = _chunk_record(raw, chunk_bytes)
                if not self.store.remove_allocation(chunk_id, version):
                    raise StaleChunk(f"chunk {chunk_id} v{version} was not allocated")
                row = ChunkRow(msg.ino, index, chunk_id, version, length, digest)
                old = self.store.put_chunk(row)
                if old is not None and (old.chunk_id, old.version) != (chunk_id, version):
                    replaced.append(old)
                for addr in addrs:
                    keeper = self.registry.by_addr(str(addr))
                    if keeper is not None:
                        self.registry.chunks.add(keeper.keeper_id, chunk_id, version)
            if msg.size_bytes < 0:
                raise InvalidArgument("negative size")
            keep = (msg.size_bytes + chunk_bytes - 1) // chunk_bytes
            replaced += self.store.drop_chunks_from(msg.ino, keep)
            inode.size = msg.size_bytes
            inode.mtime_ns = msg.mtime_ns
            inode.ctime_ns = time.time_ns()
            self.store.update_inode(inode)
            inode = self.namespace.inode(msg.ino)  # read back: the stored bytes changed
            spares = self._spares(inode, msg.chunks) if msg.spares else None
        for old in replaced:
            self.registry.queue_delete(old.chunk_id, old.version)
        if msg.sync:  # fsync, `dfs put`: on the disk; close: committed (in the WAL) is enough
            await self.durable.sync()
        return m.AttrReply(attr=inode.as_list(), spares=spares)

    def _spares(self, inode: Inode, chunks: list[Any]) -> list[list[Any]]:
        """(transaction held) A next version of each chunk just committed, on its writable
        holders, for the writer's next patch of it. Left unused, it is collected with every
        other allocation after gc_grace_s, or given back at release."""
        writable = {k.addr for k in self.registry.writable()}
        spares: list[list[Any]] = []
        for raw in chunks:
            index, chunk_id, _, _, _, addrs = _chunk_record(raw, MAX_CHUNK_SIZE)
            holders = [str(a) for a in addrs if str(a) in writable]
            if holders:
                version = self.store.next_version(chunk_id)
                self.store.add_allocation(chunk_id, version, inode.ino, index)
                spares.append([index, chunk_id, version, holders[: self._copies(inode)]])
        return spares

    async def punch_chunks(self, msg: m.PunchChunks, peer: str) -> m.Message:
        self._check_not_fenced(msg.session, msg.ino, msg.opened, msg.locks_table)
        inode, removal = self.namespace.punch(msg.ino, msg.first_index, msg.end_index)
        self._removed(removal)
        return m.AttrReply(attr=inode.as_list())

    async def abandon_chunks(self, msg: m.AbandonChunks, peer: str) -> m.Message:
        dropped: list[tuple[int, int, list[Any]]] = []
        with self.store.transaction():
            for raw in msg.chunks:
                _, chunk_id, version, _, _, addrs = _chunk_record(raw, MAX_CHUNK_SIZE)
                if self.store.remove_allocation(chunk_id, version):
                    dropped.append((chunk_id, version, addrs))
        for chunk_id, version, addrs in dropped:
            for addr in addrs:
                keeper = self.registry.by_addr(str(addr))
                if keeper is not None:
                    keeper.to_delete.add((chunk_id, version))
            self.registry.queue_delete(chunk_id, version)
        return m.OkReply()

    async def report_bad_chunk(self, msg: m.ReportBadChunk, peer: str) -> m.Message:
        keeper = self.registry.by_addr(msg.addr)
        log.warning(
            "bad copy of chunk %d v%d on %s reported by %s: %s",
            msg.chunk_id,
            msg.version,
            msg.addr,
            peer,
            msg.reason,
        )
        if (
            keeper is not None
            and self.registry.chunks.holds(keeper.keeper_id, msg.chunk_id, msg.version)
            == msg.version
        ):
            self.registry.chunks.remove(keeper.keeper_id, msg.chunk_id, msg.version)
            keeper.to_delete.add((msg.chunk_id, msg.version))
        return m.OkReply()

    async def cluster_status(self, msg: m.ClusterStatus, peer: str) -> m.Message:
        return self.status()

    def status(self) -> m.ClusterStatusReply:
        """The cluster at a glance: `dfs status`, the status page and /api/status."""
        now = trio.current_time()
        health = self.healer.health
        keepers = []
        for k in sorted(self.registry.keepers.values(), key=lambda k: k.addr):
            alive = k.alive(now, self.registry.dead_after_s)
            entry: dict[str, Any] = {
                "id": k.keeper_id,
                "addr": k.addr,
                "zone": k.zone,
                "state": self._state(k) if alive else "dead",
                "used_bytes": k.used_bytes,
                "capacity_bytes": k.capacity_bytes,
                "chunks": len(self.registry.chunks.by_keeper.get(k.keeper_id, ())),
                "last_seen_s": round(now - k.last_seen, 1),
            }
            if k.draining:
                left = health.drain_left.get(k.keeper_id, 0)
                entry["drain_left"] = left
                # Only a scan that started after the drain began can say it is done.
                entry["removable"] = (
                    health.scanned_at > k.draining_since
                    and left == 0
                    and not health.degraded
                    and alive
                )
            keepers.append(entry)
        return m.ClusterStatusReply(
            keepers=keepers,
            chunk_size_bytes=self.chunk_size,
            replication=self.replication,
            files=self.store.count_inodes(),
            chunks=self.store.count_chunks(),
            health=health.as_dict(),
        )

    @staticmethod
    def _state(keeper: KeeperState) -> str:
        return "draining" if keeper.draining else "leaving" if keeper.leaving else "alive"

    async def fsck(self, msg: m.Fsck, peer: str) -> m.Message:
        live = {k.keeper_id for k in self.registry.live() if not k.draining}
        files = self.namespace.walk_files(msg.path)
        problems: list[dict[str, Any]] = []
        chunks = degraded = lost = 0
        for path, inode in files:
            goal = self._copies(inode)
            for row in self.store.get_chunks(inode.ino, 0, 1 << 62):
                chunks += 1
                holders = self.registry.chunks.holders_of(row.chunk_id, row.version)
                copies = sum(1 for h in holders if h in live)
                readable = sum(1 for h in holders if self.registry.is_alive(h))
                if copies >= goal:
                    continue
                if readable == 0:
                    lost += 1
                else:
                    degraded += 1
                problems.append(
                    {
                        "path": printable(path.decode(errors="surrogateescape")),
                        "index": row.idx,
                        "chunk_id": row.chunk_id,
                        "copies": copies,
                        "goal": goal,
                        "state": "lost" if readable == 0 else "degraded",
                    }
                )
        return m.FsckReply(
            files=len(files), chunks=chunks, degraded=degraded, lost=lost, problems=problems[:10000]
        )

    async def disk_usage(self, msg: m.DiskUsage, peer: str) -> m.Message:
        inode, totals = self.namespace.disk_usage(msg.path)
        return m.DiskUsageReply(
            ino=inode.ino,
            files=totals.files,
            dirs=totals.dirs,
            size_bytes=totals.bytes,
            chunks=totals.chunks,
            stored_bytes=totals.stored,
        )

    async def set_replication(self, msg: m.SetReplication, peer: str) -> m.Message:
        changed = self.namespace.set_replication(msg.path, msg.copies)
        log.info("replication of %s set to %d (%d inodes)", msg.path, msg.copies, changed)
        return m.OkReply()

    async def decommission(self, msg: m.Decommission, peer: str) -> m.Message:
        keeper = self.registry.find(msg.keeper)
        if keeper is None:
            raise NotFound(f"no keeper {msg.keeper}")
        with self.store.transaction():
            self.store.set_draining(keeper.keeper_id, not msg.cancel)
        keeper.draining = not msg.cancel
        keeper.draining_since = trio.current_time()
        if msg.cancel:
            self.registry.draining.discard(keeper.keeper_id)
        else:
            self.registry.draining.add(keeper.keeper_id)
        log.info("keeper %s %s", keeper.addr, "back in service" if msg.cancel else "draining")
        return m.OkReply()

    # --- keepers --------------------------------------------------------------------------

    async def _classify(self, keeper: KeeperState, held: list[list[int]]) -> None:
        """Record what a keeper holds; queue deletion of versions no file needs. A keeper's
        whole inventory is checked in slices, letting other requests through between them:
        a hundred keepers re-registering after a takeover must not starve the handshakes and
        heartbeats of the rest."""
        pairs: list[tuple[int, int]] = []
        for item in held:
            if len(item) != 2 or not all(type(x) is int and 0 <= x < 1 << 63 for x in item):
                raise InvalidArgument("malformed chunk report")
            pairs.append((item[0], item[1]))
        for start in range(0, len(pairs), CLASSIFY_SLICE):
            part = pairs[start : start + CLASSIFY_SLICE]
            needed = self.store.needed_versions(part)
            for chunk_id, version in part:
                if (chunk_id, version) in needed:
                    self.registry.chunks.add(keeper.keeper_id, chunk_id, version)
                else:
                    keeper.to_delete.add((chunk_id, version))
            if len(pairs) > CLASSIFY_SLICE:
                await trio.lowlevel.checkpoint()

    @staticmethod
    def _check_space(capacity: int, used: int) -> None:
        if not (0 <= capacity < 1 << 60 and 0 <= used < 1 << 60):
            raise InvalidArgument("capacity or used bytes out of range")

    async def goodbye(self, msg: m.Goodbye, peer: str) -> m.Message:
        keeper = self.registry.keepers.get(msg.keeper_id)
        if keeper is not None:
            keeper.leaving = True
            log.info("keeper %s at %s is stopping", msg.keeper_id[:8], keeper.addr)
        return m.OkReply()

    async def register_keeper(self, msg: m.RegisterKeeper, peer: str) -> m.Message:
        self._check_space(msg.capacity_bytes, msg.used_bytes)
        known = self.registry.keepers.get(msg.keeper_id)
        if msg.continued and known is not None:
            await self._classify(known, msg.chunks)
            return m.RegisterReply(heartbeat_s=self.heartbeat_s)
        if msg.continued:  # its first part went to a tracker that is gone: start over
            raise NotFound(f"keeper {msg.keeper_id[:8]} has no registration to continue")
        keeper = self.registry.register(
            msg.keeper_id, msg.addr, msg.zone, msg.capacity_bytes, msg.used_bytes
        )
        await self._classify(keeper, msg.chunks)
        log.info(
            "keeper %s at %s registered with %d chunks (%d to delete)",
            msg.keeper_id[:8],
            msg.addr,
            len(msg.chunks),
            len(keeper.to_delete),
        )
        return m.RegisterReply(heartbeat_s=self.heartbeat_s)

    async def heartbeat(self, msg: m.Heartbeat, peer: str) -> m.Message:
        self._check_space(msg.capacity_bytes, msg.used_bytes)
        keeper = self.registry.keepers.get(msg.keeper_id)
        if keeper is None:
            return m.HeartbeatReply(delete=[], reregister=True)
        keeper.last_seen = trio.current_time()
        keeper.capacity_bytes = msg.capacity_bytes
        keeper.used_bytes = msg.used_bytes
        keeper.reserved_bytes = 0
        keeper.read_bytes, keeper.written_bytes = msg.read_bytes, msg.written_bytes
        for chunk_id, version in ((c[0], c[1]) for c in msg.removed if len(c) == 2):
            self.registry.chunks.remove(keeper.keeper_id, chunk_id, version)
        await self._classify(keeper, msg.added)
        for chunk_id, _version in ((c[0], c[1]) for c in msg.added if len(c) == 2):
            row = self.store.chunk_by_id(chunk_id)
            self.healer.copy_arrived(keeper.keeper_id, chunk_id, row.length if row else 0)
        delete = sorted(keeper.to_delete)
        if delete:
            # What made these chunks deletable (an unlink, a truncate, a newer version) must
            # be on the disk first, or a power loss could bring back a name without its data.
            await self.durable.sync()
            keeper.to_delete.difference_update(delete)
        replicate, keeper.to_replicate = keeper.to_replicate, []
        return m.HeartbeatReply(delete=[[c, v] for c, v in delete], replicate=replicate)
