"""Every message of the dfs protocol, declared once.

Names carry the direction as MooseFS does: a client asks the tracker (`Lookup`), a keeper asks
the tracker (`RegisterKeeper`), a client or a keeper asks a keeper (`PutChunk`). Each request
has a reply twin; any request may instead be answered with `ErrorReply`.

On the wire a message is a msgpack map: `t` (its `MsgType`), `id` (the request id, echoed in the
reply) and its named fields. Fields are checked against their declared types when decoded, so a
handler never sees a malformed message: a wrong type, a missing or unknown field is a
`ProtocolError` that closes the connection. Chunk bytes travel as the frame's raw payload.

Units are in the field names; `ino` is an inode number, names are bytes (as FUSE gives them),
`addr` is "host:port" of a keeper's data port.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, ClassVar, TypeVar

from cluster.errors import ProtocolError

PROTOCOL_VERSION = 2


class MsgType(IntEnum):
    # any direction
    HELLO = 1
    HELLO_REPLY = 2
    ERROR_REPLY = 3
    PING = 4
    PONG = 5
    OK_REPLY = 6
    AUTHENTICATE = 7
    AUTHENTICATE_REPLY = 8
    # client -> tracker: namespace
    LOOKUP = 20
    GET_ATTR = 21
    SET_ATTR = 22
    RESOLVE_PATH = 23
    READ_DIR = 24
    MAKE_NODE = 25
    SYMLINK = 26
    READ_LINK = 27
    LINK = 28
    UNLINK = 29
    REMOVE_DIR = 30
    RENAME = 31
    OPEN_FILE = 32
    RELEASE_FILES = 33
    STAT_FS = 34
    SYNC = 35
    SET_LOCK = 36
    GET_LOCK = 37
    RELEASE_LOCKS = 38
    KEEP_LOCKS = 39
    RECLAIM_LOCKS = 46
    ATTR_REPLY = 40
    READ_DIR_REPLY = 41
    READ_LINK_REPLY = 42
    UNLINK_REPLY = 43
    STAT_FS_REPLY = 44
    LOCK_REPLY = 45
    # client -> tracker: chunks
    GET_CHUNKS = 50
    ALLOCATE_CHUNK = 51
    COMMIT_CHUNKS = 52
    REPORT_BAD_CHUNK = 53
    ABANDON_CHUNKS = 54
    PUNCH_CHUNKS = 55
    CHUNKS_REPLY = 60
    ALLOCATE_REPLY = 61
    # client -> tracker: administration
    CLUSTER_STATUS = 70
    CLUSTER_STATUS_REPLY = 71
    FSCK = 72
    FSCK_REPLY = 73
    SET_REPLICATION = 74
    DECOMMISSION = 75
    DISK_USAGE = 76
    DISK_USAGE_REPLY = 77
    TRACKER_ROLE = 78
    TRACKER_ROLE_REPLY = 79
    # keeper -> tracker
    REGISTER_KEEPER = 80
    HEARTBEAT = 81
    REGISTER_REPLY = 82
    HEARTBEAT_REPLY = 83
    GOODBYE = 84
    # client -> tracker: extended attributes
    SET_XATTR = 90
    GET_XATTR = 91
    LIST_XATTR = 92
    REMOVE_XATTR = 93
    GET_XATTR_REPLY = 94
    LIST_XATTR_REPLY = 95
    # client/keeper -> keeper
    PUT_CHUNK = 100
    PUT_CHUNK_REPLY = 101
    READ_CHUNK = 102
    READ_CHUNK_REPLY = 103
    SYNC_CHUNKS = 104
    PATCH_CHUNK = 105


@dataclass(frozen=True, slots=True)
class Message:
    TYPE: ClassVar[MsgType]

    def to_wire(self, request_id: int) -> dict[str, Any]:
        body = {name: getattr(self, name) for name in _FIELD_NAMES[type(self)]}
        body["t"] = int(self.TYPE)
        body["id"] = request_id
        return body


REGISTRY: dict[int, type[Message]] = {}
Check = Callable[[Any], bool]
# Per message class: its field names in order, and a compiled type check per field. Checks
# are built once at import, because decoding runs on every request and reply and walking the
# type hints each time cost more than the rest of the decode.
_FIELD_NAMES: dict[type[Message], tuple[str, ...]] = {}
_FIELD_CHECKS: dict[type[Message], dict[str, Check]] = {}

M = TypeVar("M", bound=type[Message])


def message(cls: M) -> M:
    """Register a message class under its type code (once, at import)."""
    if cls.TYPE in REGISTRY:
        raise RuntimeError(f"duplicate message type {cls.TYPE!r}")
    REGISTRY[cls.TYPE] = cls
    hints = typing.get_type_hints(cls)
    names = tuple(f.name for f in dataclasses.fields(cls))
    _FIELD_NAMES[cls] = names
    _FIELD_CHECKS[cls] = {name: _check_for(hints[name]) for name in names}
    return cls


def _any(value: Any) -> bool:
    return True


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_float(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_for(hint: Any) -> Check:
    """A function telling whether a decoded msgpack value fits the type hint `hint`."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return _any
    if origin is typing.Union or origin is types.UnionType:
        options = [_check_for(arg) for arg in typing.get_args(hint)]
        return lambda value: any(check(value) for check in options)
    if hint is type(None):
        return lambda value: value is None
    if origin is list:
        (item_hint,) = typing.get_args(hint) or (Any,)
        item = _check_for(item_hint)
        if item is _any:
            return lambda value: isinstance(value, list)
        return lambda value: isinstance(value, list) and all(item(v) for v in value)
    if origin is dict:
        return lambda value: isinstance(value, dict)
    if hint is int:
        return _is_int
    if hint is float:
        return _is_float
    if isinstance(hint, type):
        return lambda value: isinstance(value, hint)
    return _any


def decode(body: dict[str, Any]) -> tuple[int, Message]:
    """Turn a decoded header into (request id, message); ProtocolError if it is not valid."""
    msg_type = body.pop("t", None)
    request_id = body.pop("id", None)
    if not isinstance(request_id, int) or isinstance(request_id, bool):
        raise ProtocolError("message without a request id")
    cls = REGISTRY.get(msg_type) if isinstance(msg_type, int) else None
    if cls is None:
        raise ProtocolError(f"unknown message type {msg_type!r}")
    checks = _FIELD_CHECKS[cls]
    for name, value in body.items():
        check = checks.get(name)
        if check is None:
            raise ProtocolError(f"{cls.__name__}: unknown field {name!r}")
        if not check(value):
            raise ProtocolError(f"{cls.__name__}: field {name!r} has the wrong type")
    try:
        return request_id, cls(**body)
    except TypeError as exc:
        raise ProtocolError(f"{cls.__name__}: {exc}") from None


# --- any direction ---------------------------------------------------------------------------


@message
@dataclass(frozen=True, slots=True)
class Hello(Message):
    """First message on every connection: protocol version, the caller's role and a fresh
    nonce. Nothing but the handshake (see auth.py) is processed until it succeeds."""

    TYPE = MsgType.HELLO
    version: int
    role: str
    nonce: bytes


@message
@dataclass(frozen=True, slots=True)
class HelloReply(Message):
    """The server's nonce."""

    TYPE = MsgType.HELLO_REPLY
    version: int
    role: str
    nonce: bytes


@message
@dataclass(frozen=True, slots=True)
class Authenticate(Message):
    """The client's proof that it knows the cluster secret."""

    TYPE = MsgType.AUTHENTICATE
    proof: bytes


@message
@dataclass(frozen=True, slots=True)
class AuthenticateReply(Message):
    """The server's proof, sent only to a client that proved itself."""

    TYPE = MsgType.AUTHENTICATE_REPLY
    proof: bytes


@message
@dataclass(frozen=True, slots=True)
class ErrorReply(Message):
    """The request failed with a DfsError; `code` names its class (errors.ERRORS_BY_CODE)."""

    TYPE = MsgType.ERROR_REPLY
    code: int
    message: str


@message
@dataclass(frozen=True, slots=True)
class Ping(Message):
    """Keepalive: an idle link proves it is alive."""

    TYPE = MsgType.PING


@message
@dataclass(frozen=True, slots=True)
class Pong(Message):
    TYPE = MsgType.PONG


@message
@dataclass(frozen=True, slots=True)
class OkReply(Message):
    TYPE = MsgType.OK_REPLY


# --- client -> tracker: namespace ------------------------------------------------------------

# An attribute record, as a list for compactness:
# [ino, mode, nlink, uid, gid, rdev, size, atime_ns, mtime_ns, ctime_ns, generation,
#  stored_bytes, xattrs (how many extended attributes: with 0 the mount answers ENODATA itself)]
AttrList = list[int]


@message
@dataclass(frozen=True, slots=True)
class Lookup(Message):
    TYPE = MsgType.LOOKUP
    parent: int
    name: bytes


@message
@dataclass(frozen=True, slots=True)
class GetAttr(Message):
    TYPE = MsgType.GET_ATTR
    ino: int


@message
@dataclass(frozen=True, slots=True)
class SetAttr(Message):
    """Change what is not None. A smaller `size_bytes` drops the chunks past it."""

    TYPE = MsgType.SET_ATTR
    ino: int
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size_bytes: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None
    ctime_ns: int | None = None
    # The client's session, and the mark of the open it writes through (AttrReply.opened): a
    # size change is a write, refused where the session's locks were lost to an expired lease
    # after that open (errors.LockFenced).
    session: str = ""
    opened: list[Any] | None = None
    locks_table: str = ""  # the lock table of the writer's locks on the file, if any


@message
@dataclass(frozen=True, slots=True)
class ResolvePath(Message):
    """Walk an absolute path from the root (for the CLI; the mount walks with Lookup)."""

    TYPE = MsgType.RESOLVE_PATH
    path: bytes


@message
@dataclass(frozen=True, slots=True)
class ReadDir(Message):
    """Entries of a directory after the cookie `offset` (0: from the start), with attributes."""

    TYPE = MsgType.READ_DIR
    ino: int
    offset: int
    limit: int


@message
@dataclass(frozen=True, slots=True)
class MakeNode(Message):
    """Create a file, directory, FIFO or device node; `mode` includes the file type bits.
    With a `session`, a new regular file is also opened for it (OpenFile in the same trip)."""

    TYPE = MsgType.MAKE_NODE
    parent: int
    name: bytes
    mode: int
    uid: int
    gid: int
    rdev: int = 0
    session: str = ""


@message
@dataclass(frozen=True, slots=True)
class Symlink(Message):
    TYPE = MsgType.SYMLINK
    parent: int
    name: bytes
    target: bytes
    uid: int
    gid: int


@message
@dataclass(frozen=True, slots=True)
class ReadLink(Message):
    TYPE = MsgType.READ_LINK
    ino: int


@message
@dataclass(frozen=True, slots=True)
class Link(Message):
    TYPE = MsgType.LINK
    ino: int
    new_parent: int
    new_name: bytes


@message
@dataclass(frozen=True, slots=True)
class Unlink(Message):
    """Remove a name. An inode left without names is deleted unless some client holds it open
    (OpenFile), in which case it goes when the last holder releases it."""

    TYPE = MsgType.UNLINK
    parent: int
    name: bytes


@message
@dataclass(frozen=True, slots=True)
class RemoveDir(Message):
    TYPE = MsgType.REMOVE_DIR
    parent: int
    name: bytes


@message
@dataclass(frozen=True, slots=True)
class Rename(Message):
    """Atomic rename; `flags` takes RENAME_NOREPLACE (1) and RENAME_EXCHANGE (2)."""

    TYPE = MsgType.RENAME
    old_parent: int
    old_name: bytes
    new_parent: int
    new_name: bytes
    flags: int = 0


@message
@dataclass(frozen=True, slots=True)
class OpenFile(Message):
    """Mark an inode open by `session` (so unlink defers its deletion); returns fresh attrs."""

    TYPE = MsgType.OPEN_FILE
    ino: int
    session: str


@message
@dataclass(frozen=True, slots=True)
class ReleaseFiles(Message):
    """Give back opens of this session, one per entry (an inode may appear more than once).
    Sent in batches: nobody waits for a close to reach the tracker."""

    TYPE = MsgType.RELEASE_FILES
    inos: list[int]
    session: str
    # [chunk_id, version] allocated at create (`AttrReply.first_chunk`) and never written.
    unused: list[list[int]] = field(default_factory=list)


@message
@dataclass(frozen=True, slots=True)
class StatFs(Message):
    TYPE = MsgType.STAT_FS


@message
@dataclass(frozen=True, slots=True)
class Sync(Message):
    """Answered once every change committed before it is on the tracker's disk (fsync of a
    file with nothing left to commit, fsyncdir). Chunk commits do this by themselves."""

    TYPE = MsgType.SYNC


# --- client -> tracker: locks (cluster/locks.py) -------------------------------------
# A lock covers bytes start..end inclusive (end LOCK_TO_END: to the end of any file), as the
# kernel's; `type` is fcntl's F_RDLCK, F_WRLCK or F_UNLCK. Its owner is (session, owner): the
# mount's session and the kernel's lock owner (a process's file table, or an open file for
# flock and OFD locks).
LOCK_TO_END = (1 << 63) - 1


@message
@dataclass(frozen=True, slots=True)
class SetLock(Message):
    """Take, convert or release (F_UNLCK) a lock. With `wait_s` > 0 the tracker holds the
    request that long while the lock is taken, then answers `granted=False`; the mount asks
    again (a bounded hold keeps every request short, and the next one renews the wait)."""

    TYPE = MsgType.SET_LOCK
    ino: int
    session: str
    owner: int
    flock: bool  # flock(2) locks; fcntl's (POSIX) otherwise: Linux keeps the two apart
    type: int
    start: int
    end: int
    pid: int
    wait_s: float = 0.0


@message
@dataclass(frozen=True, slots=True)
class GetLock(Message):
    """F_GETLK: the first lock of another owner that conflicts with this one."""

    TYPE = MsgType.GET_LOCK
    ino: int
    session: str
    owner: int
    type: int
    start: int
    end: int


@message
@dataclass(frozen=True, slots=True)
class ReleaseLocks(Message):
    """Drop every lock `owner` holds on `ino` (close(), or the last close of an open file)."""

    TYPE = MsgType.RELEASE_LOCKS
    ino: int
    session: str
    owner: int


@message
@dataclass(frozen=True, slots=True)
class KeepLocks(Message):
    """Renew the session's lease while it holds locks. `table` is the lock table the mount's
    locks were granted in (`LockReply.table`): a tracker whose table is another (it restarted
    or took over, and holds none of them) or that let the session's lease expire answers
    LocksLost instead of OK."""

    TYPE = MsgType.KEEP_LOCKS
    session: str
    table: str


@message
@dataclass(frozen=True, slots=True)
class ReclaimLocks(Message):
    """After a tracker restart or takeover, the locks this session held, to be granted
    again during the new tracker's grace period (NFS's reclaim). Each is
    [ino, flock (0/1), owner, type, start, end, pid]."""

    TYPE = MsgType.RECLAIM_LOCKS
    session: str
    locks: list[list[int]]


@message
@dataclass(frozen=True, slots=True)
class LockReply(Message):
    """`granted`, or else the conflicting lock (`type` F_UNLCK: none; `pid` only when it is
    the asking session's own, else 0). When a lock is granted, `attr` is the file's fresh
    attributes: the mount drops cached data that is older (a lock holder sees every write of
    the previous one)."""

    TYPE = MsgType.LOCK_REPLY
    granted: bool
    type: int
    start: int
    end: int
    pid: int
    lease_s: float
    table: str  # which incarnation of the tracker's lock table answered (KeepLocks)
    attr: AttrList | None = None


@message
@dataclass(frozen=True, slots=True)
class AttrReply(Message):
    """`chunk_size_bytes` is set for regular files created or opened (0 otherwise).
    `parent_attr` is the directory that gained a name (create, mkdir, symlink, link), after the
    change: the mount keeps it rather than ask for it again, as the kernel does next."""

    TYPE = MsgType.ATTR_REPLY
    attr: AttrList
    chunk_size_bytes: int = 0
    parent_attr: AttrList | None = None
    # For a regular file created and opened in one trip: [chunk_id, version, [keeper addrs]],
    # chunk 0 allocated at once, so that a small file costs create, store and commit.
    first_chunk: list[Any] | None = None
    # For an OpenFile of a file of at most a few chunks: its chunk records (as in ChunksReply),
    # so that reading a small file takes no GetChunks.
    chunks: list[list[Any]] | None = None
    # For an OpenFile (or a MakeNode that opens): [lock table id, fences so far], for the
    # writes through this open to carry (cluster/locks.py, LockTable.open_mark).
    opened: list[Any] | None = None
    # For a CommitChunks with `spares`: per committed chunk, a next version allocated at once
    # on the keepers that hold it, [index, chunk_id, version, [keeper addrs]], so that the
    # next synced write of that chunk (a log, a database page) patches it with no AllocateChunk.
    spares: list[list[Any]] | None = None


@message
@dataclass(frozen=True, slots=True)
class ReadDirReply(Message):
    """`entries`: [name, attr, cookie of the next entry]; empty at the end."""

    TYPE = MsgType.READ_DIR_REPLY
    entries: list[list[Any]]


@message
@dataclass(frozen=True, slots=True)
class ReadLinkReply(Message):
    TYPE = MsgType.READ_LINK_REPLY
    target: bytes


@message
@dataclass(frozen=True, slots=True)
class UnlinkReply(Message):
    """The inode that lost a name, its remaining link count, and the directory that lost the
    name, after the change (unlink and rmdir)."""

    TYPE = MsgType.UNLINK_REPLY
    ino: int
    nlink: int
    parent_attr: AttrList | None = None


@message
@dataclass(frozen=True, slots=True)
class StatFsReply(Message):
    TYPE = MsgType.STAT_FS_REPLY
    capacity_bytes: int
    used_bytes: int
    free_bytes: int
    files: int


# --- client -> tracker: extended attributes ----------------------------------------------------

# `name` is the whole name with its namespace (b"user.mime_type"); only user., trusted. and
# security. are kept. Who may read or write which namespace is the kernel's check on the mount
# (as for every file system); the tracker checks names, sizes and file types, as ext4 does.


@message
@dataclass(frozen=True, slots=True)
class SetXattr(Message):
    """Set an extended attribute; `flags` takes XATTR_CREATE (1: EEXIST if it exists) and
    XATTR_REPLACE (2: ENODATA if it does not). Answered with `AttrReply` (ctime moved)."""

    TYPE = MsgType.SET_XATTR
    ino: int
    name: bytes
    value: bytes
    flags: int = 0


@message
@dataclass(frozen=True, slots=True)
class GetXattr(Message):
    """One extended attribute's value (`GetXattrReply`); ENODATA if it has none."""

    TYPE = MsgType.GET_XATTR
    ino: int
    name: bytes


@message
@dataclass(frozen=True, slots=True)
class GetXattrReply(Message):
    TYPE = MsgType.GET_XATTR_REPLY
    value: bytes


@message
@dataclass(frozen=True, slots=True)
class ListXattr(Message):
    """The names of an inode's extended attributes, every namespace (`ListXattrReply`)."""

    TYPE = MsgType.LIST_XATTR
    ino: int


@message
@dataclass(frozen=True, slots=True)
class ListXattrReply(Message):
    TYPE = MsgType.LIST_XATTR_REPLY
    names: list[bytes]


@message
@dataclass(frozen=True, slots=True)
class RemoveXattr(Message):
    """Remove an extended attribute (ENODATA if it has none); answered with `AttrReply`."""

    TYPE = MsgType.REMOVE_XATTR
    ino: int
    name: bytes


# --- client -> tracker: chunks -----------------------------------------------------------------

# A chunk record: [index, chunk_id, version, length_bytes, digest, [keeper addr, ...]]
ChunkList = list[Any]


@message
@dataclass(frozen=True, slots=True)
class GetChunks(Message):
    """The chunks of a file from `first_index`, at most `count`, with the keepers holding each."""

    TYPE = MsgType.GET_CHUNKS
    ino: int
    first_index: int = 0
    count: int = 1 << 30


@message
@dataclass(frozen=True, slots=True)
class ChunksReply(Message):
    """`chunk_size_bytes` is the file's chunk size; indices missing from `chunks` are holes."""

    TYPE = MsgType.CHUNKS_REPLY
    size_bytes: int
    chunk_size_bytes: int
    chunks: list[ChunkList]


@message
@dataclass(frozen=True, slots=True)
class AllocateChunk(Message):
    """Ask where to write a new version of chunk `index` of `ino`, avoiding `exclude` addrs."""

    TYPE = MsgType.ALLOCATE_CHUNK
    ino: int
    index: int
    exclude: list[str] = field(default_factory=list)
    # Nonzero: a version to be written as a patch over this committed version, so it goes to
    # the live keepers that hold that version (StaleChunk if it is not the committed one).
    base_version: int = 0


@message
@dataclass(frozen=True, slots=True)
class AllocateReply(Message):
    TYPE = MsgType.ALLOCATE_REPLY
    chunk_id: int
    version: int
    keepers: list[str]
    chunk_size_bytes: int


@message
@dataclass(frozen=True, slots=True)
class CommitChunks(Message):
    """Publish written chunk versions and the new file size in one transaction.

    `chunks`: [index, chunk_id, version, length_bytes, digest, [keeper addrs that stored it]].
    Readers see the old list until this commits, the new one after: never a mix.
    """

    TYPE = MsgType.COMMIT_CHUNKS
    ino: int
    size_bytes: int
    mtime_ns: int
    chunks: list[ChunkList]
    # Answer once the commit is in the fsynced WAL (fsync, `dfs put`); without it, once it is
    # committed (in the WAL, safe from a tracker crash: `close`).
    sync: bool = True
    # Allocate a next version of each chunk committed (AttrReply.spares).
    spares: bool = False
    # The writer's session and its open's mark: as SetAttr's.
    session: str = ""
    opened: list[Any] | None = None
    locks_table: str = ""  # the lock table of the writer's locks on the file, if any


@message
@dataclass(frozen=True, slots=True)
class PunchChunks(Message):
    """Make chunks `first_index` to `end_index - 1` holes (fallocate's punch hole or zero
    range over whole chunks): their copies are deleted and they read as zeros. Answered with
    `AttrReply`; the size stays."""

    TYPE = MsgType.PUNCH_CHUNKS
    ino: int
    first_index: int
    end_index: int
    session: str = ""  # and `opened`: as SetAttr's
    opened: list[Any] | None = None
    locks_table: str = ""  # the lock table of the writer's locks on the file, if any


@message
@dataclass(frozen=True, slots=True)
class AbandonChunks(Message):
    """Written versions that will never be committed (same records as CommitChunks): the
    tracker forgets them and has their copies deleted. Committed versions are left alone."""

    TYPE = MsgType.ABANDON_CHUNKS
    chunks: list[ChunkList]


@message
@dataclass(frozen=True, slots=True)
class ReportBadChunk(Message):
    """A reader found a copy whose bytes or checksums are wrong."""

    TYPE = MsgType.REPORT_BAD_CHUNK
    chunk_id: int
    version: int
    addr: str
    reason: str


@message
@dataclass(frozen=True, slots=True)
class ClusterStatus(Message):
    TYPE = MsgType.CLUSTER_STATUS


@message
@dataclass(frozen=True, slots=True)
class TrackerRole(Message):
    """Answered by every tracker, active or standby (`dfs status` asks each of its list)."""

    TYPE = MsgType.TRACKER_ROLE


@message
@dataclass(frozen=True, slots=True)
class TrackerRoleReply(Message):
    """`role`: active or standby; `leader`: the leader row as this tracker last read it
    (holder, epoch, addr, expires_in_s), empty with SQLite, where the one tracker is always
    active."""

    TYPE = MsgType.TRACKER_ROLE_REPLY
    role: str
    addr: str
    leader: dict[str, Any] = field(default_factory=dict)


@message
@dataclass(frozen=True, slots=True)
class ClusterStatusReply(Message):
    """`keepers`: one map per keeper (id, addr, zone, state, used/capacity bytes, chunks)."""

    TYPE = MsgType.CLUSTER_STATUS_REPLY
    keepers: list[dict[str, Any]]
    chunk_size_bytes: int
    replication: int
    files: int
    chunks: int
    health: dict[str, Any] = field(default_factory=dict)

    def document(self) -> dict[str, Any]:
        """The JSON form shared by `dfs status --json` and the status page's /api/status."""
        return {
            "health": self.health,
            "keepers": self.keepers,
            "chunk_size": self.chunk_size_bytes,
            "replication": self.replication,
            "files": self.files,
            "chunks": self.chunks,
        }


@message
@dataclass(frozen=True, slots=True)
class Fsck(Message):
    """Check every file under `path`: how many live copies each chunk has against its goal."""

    TYPE = MsgType.FSCK
    path: bytes


@message
@dataclass(frozen=True, slots=True)
class FsckReply(Message):
    """`problems`: {path, chunk index, chunk id, live copies, goal}; `lost` counts chunks with
    no live copy, `degraded` those with fewer than their goal."""

    TYPE = MsgType.FSCK_REPLY
    files: int
    chunks: int
    degraded: int
    lost: int
    problems: list[dict[str, Any]]


@message
@dataclass(frozen=True, slots=True)
class SetReplication(Message):
    """Set the copies per chunk of a file, or of every file under a directory."""

    TYPE = MsgType.SET_REPLICATION
    path: bytes
    copies: int


@message
@dataclass(frozen=True, slots=True)
class Decommission(Message):
    """Drain a keeper (by address or id): copy its chunks elsewhere, place nothing new on it.
    `cancel` puts it back in service."""

    TYPE = MsgType.DECOMMISSION
    keeper: str
    cancel: bool = False


@message
@dataclass(frozen=True, slots=True)
class DiskUsage(Message):
    """`dfs du`: the totals of the tree at `path`, from the counters the tracker keeps per
    directory (no walk)."""

    TYPE = MsgType.DISK_USAGE
    path: bytes


@message
@dataclass(frozen=True, slots=True)
class DiskUsageReply(Message):
    """Counted per name (a file with two hard links in the tree counts twice): `files` are
    non-directories, `dirs` directories including `path` itself, `size_bytes` the sizes of
    the regular files, `chunks` their committed chunks, `stored_bytes` the bytes in those."""

    TYPE = MsgType.DISK_USAGE_REPLY
    ino: int
    files: int
    dirs: int
    size_bytes: int
    chunks: int
    stored_bytes: int


# --- keeper -> tracker -------------------------------------------------------------------------

# A chunk held by a keeper: [chunk_id, version]
HeldChunk = list[int]


@message
@dataclass(frozen=True, slots=True)
class RegisterKeeper(Message):
    """A keeper (re)joins with its whole inventory; later heartbeats carry only changes."""

    TYPE = MsgType.REGISTER_KEEPER
    keeper_id: str
    addr: str
    zone: str
    capacity_bytes: int
    used_bytes: int
    chunks: list[HeldChunk]
    # More of the inventory of the registration just made (a big one comes in parts): added
    # to what the tracker has for this keeper rather than starting over.
    continued: bool = False


@message
@dataclass(frozen=True, slots=True)
class RegisterReply(Message):
    TYPE = MsgType.REGISTER_REPLY
    heartbeat_s: float


@message
@dataclass(frozen=True, slots=True)
class Heartbeat(Message):
    """Free space, the chunks added and removed since the last beat, and the chunk bytes the
    keeper has sent (`read_bytes`: reads and copies served) and received (`written_bytes`:
    writes, patches and copies stored) since it started, for the tracker's history."""

    TYPE = MsgType.HEARTBEAT
    keeper_id: str
    capacity_bytes: int
    used_bytes: int
    added: list[HeldChunk] = field(default_factory=list)
    removed: list[HeldChunk] = field(default_factory=list)
    read_bytes: int = 0
    written_bytes: int = 0


@message
@dataclass(frozen=True, slots=True)
class HeartbeatReply(Message):
    """Commands for the keeper: chunk versions to delete, and chunks to copy from another
    keeper (`replicate`: [chunk_id, version, source addr, digest]). `reregister` asks for the
    full inventory again (the tracker restarted or lost track of this keeper)."""

    TYPE = MsgType.HEARTBEAT_REPLY
    delete: list[HeldChunk]
    reregister: bool = False
    replicate: list[list[Any]] = field(default_factory=list)


@message
@dataclass(frozen=True, slots=True)
class Goodbye(Message):
    """A keeper is stopping on purpose (SIGTERM): place nothing new on it. It is not dead,
    so nothing is re-replicated unless it stays away past dead_after_s."""

    TYPE = MsgType.GOODBYE
    keeper_id: str


# --- client/keeper -> keeper -------------------------------------------------------------------


@message
@dataclass(frozen=True, slots=True)
class PutChunk(Message):
    """Store a chunk version; the payload is its bytes. The keeper checks `checksums` (packed
    per-block xxh3_64) before it answers, forwards the chunk to `forward[0]` with the rest of
    the list, and answers once its own copy and every copy downstream are stored: written into
    the chunk file (safe from a crash of any process), and with `sync` also fsynced (safe from
    a power cut). An unsynced copy reaches the disk within the keeper's write-back interval."""

    TYPE = MsgType.PUT_CHUNK
    chunk_id: int
    version: int
    checksums: bytes
    forward: list[str] = field(default_factory=list)
    sync: bool = True


@message
@dataclass(frozen=True, slots=True)
class PutChunkReply(Message):
    """`stored`: the addrs that hold the chunk durably (this keeper first)."""

    TYPE = MsgType.PUT_CHUNK_REPLY
    stored: list[str]
    failed: list[str] = field(default_factory=list)


@message
@dataclass(frozen=True, slots=True)
class PatchChunk(Message):
    """Store a chunk version as changed blocks over `base_version`, which the keeper holds:
    the payload is blocks `blocks` (ascending) of the new version back to back, each 64 KiB
    but the chunk's last, which ends at `length_bytes`. `checksums` are those of every block
    of the new version; a block not sent must be the base's own (same bytes, same checksum).
    Forwarded, synced and answered as `PutChunk`."""

    TYPE = MsgType.PATCH_CHUNK
    chunk_id: int
    base_version: int
    version: int
    length_bytes: int
    checksums: bytes
    blocks: list[int]
    forward: list[str] = field(default_factory=list)
    sync: bool = True


@message
@dataclass(frozen=True, slots=True)
class SyncChunks(Message):
    """fsync these chunk versions ([chunk_id, version] each) if they are not on the disk yet;
    answered with `OkReply` once they are. A version this keeper does not hold is an error."""

    TYPE = MsgType.SYNC_CHUNKS
    chunks: list[list[int]]


@message
@dataclass(frozen=True, slots=True)
class ReadChunk(Message):
    """Read `length_bytes` from `offset_bytes` of a chunk version (0 length: to the end)."""

    TYPE = MsgType.READ_CHUNK
    chunk_id: int
    version: int
    offset_bytes: int = 0
    length_bytes: int = 0


@message
@dataclass(frozen=True, slots=True)
class ReadChunkReply(Message):
    """The payload is whole blocks from `first_block` covering the range asked for; the reader
    checks them against `checksums` (all blocks of the chunk), whose digest the tracker keeps."""

    TYPE = MsgType.READ_CHUNK_REPLY
    length_bytes: int
    first_block: int
    checksums: bytes
