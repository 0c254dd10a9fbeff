"""Property-based fuzzing of everything that reads bytes or messages from a peer.

Whatever arrives, the decoder raises only ProtocolError/EOFError and the handlers only
DfsError (an error reply for that request): no crash, no hang, and nothing written outside the
data directory. CI runs a bounded number of examples; `make fuzz` (HYPOTHESIS_PROFILE=fuzz)
runs every fuzzer as many times longer as its profile is.

The handler fuzzers send *well-typed* messages, derived from the declarations in
`cluster/messages.py`: every field holds a value of its declared type, mostly a plausible one
(inode numbers that exist, names that are there, chunk ids and versions the tracker handed
out), so that requests get past the handlers' checks into the code behind them. They run
against a tracker or keeper seeded with a small namespace and chunks, and count how many
requests were answered with a reply, per message type: a fuzzer whose requests all bounce off
the checks would be fuzzing nothing.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import stat
import struct
import sys
import tempfile
import typing
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster import checksum
from cluster import messages as m
from cluster.auth import Credentials
from cluster.errors import DfsError, ProtocolError
from cluster.keeper.chunkstore import ChunkStore
from cluster.keeper.server import KeeperServer
from cluster.protocol import FileRegion, FrameStream, Limits
from cluster.tracker.server import Tracker

CREDENTIALS = Credentials(b"fuzz-secret-fuzz-secret")
CHUNK = 1 << 20


def budget(ci_examples: int) -> int:
    """Examples for one fuzzer: its CI budget, times as many as the loaded profile runs more
    than the "ci" one (so `make fuzz` lengthens every fuzzer, not only those without one)."""
    ci = settings.get_profile("ci").max_examples
    return max(ci_examples, ci_examples * settings().max_examples // ci)


FUZZ = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# --- values of the declared types: anything, and plausible ones ----------------------------

ints = st.one_of(
    st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1),
    st.integers(min_value=-3, max_value=40),
)
# Addresses stay on loopback: a fuzzed forward list must never send traffic elsewhere.
addrs = st.sampled_from(["127.0.0.1:1", "127.0.0.1:0", "nonsense", "", "127.0.0.1:99999"])
scalars = st.one_of(st.none(), st.booleans(), ints, st.binary(max_size=64), st.text(max_size=20))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=5), max_leaves=20)


def strategy_for(hint: Any, name: str) -> st.SearchStrategy[Any]:
    """Any value of the type `hint` (what the decoder's field checks let through)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if name in ("forward", "exclude", "keepers") or (hint is str and name == "addr"):
        return st.lists(addrs, max_size=3) if origin is list else addrs
    if hint is int:
        return ints
    if hint is float:
        return st.floats(allow_nan=True, allow_infinity=True)
    if hint is bool:
        return st.booleans()
    if hint is bytes:
        if name == "checksums":
            return st.one_of(st.binary(max_size=40), st.just(checksum.block_checksums(b"x" * 10)))
        return st.one_of(st.binary(max_size=300), st.sampled_from([b"/", b"/a/../..", b"..", b"."]))
    if hint is str:
        return st.text(max_size=40)
    if origin is list:
        return st.lists(
            strategy_for(args[0], name) if args and args[0] is not Any else values, max_size=6
        )
    if origin is dict:
        return st.dictionaries(st.text(max_size=8), values, max_size=4)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        return st.one_of(*(strategy_for(a, name) for a in args))
    if hint is type(None):
        return st.none()
    return values


class Known:
    """Inode numbers and chunk ids that exist in the seeded tracker below (and the next few,
    which requests create), filled in when it is made; keepers "keeper-a" to "keeper-c" at
    127.0.0.1:1 to :3 (where nothing listens)."""

    inos: list[int] = list(range(1, 10))
    dirs: list[int] = [1]
    chunk_ids: list[int] = list(range(1, 10))
    entries: list[tuple[int, bytes]] = [(1, b"d")]  # (directory, name) of each name
    empty_dirs: list[tuple[int, bytes]] = [(1, b"d")]  # (directory, name) of empty ones
    links: list[int] = [1]  # symbolic links


KNOWN = Known()
KEEPER_IDS = ["keeper-a", "keeper-b", "keeper-c"]
KEEPER_ADDRS = ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]


def known(kind: str) -> st.SearchStrategy[Any]:
    """One of the values of the list `kind` of KNOWN (taken when drawn), about as often each
    (`sampled_from` would mostly take the first)."""

    def pick(i: int) -> Any:
        values: list[Any] = getattr(KNOWN, kind)
        return values[i % len(values)]

    return st.integers(0, 1 << 16).map(pick)


inos = known("inos")
dirs = known("dirs")
chunk_ids = known("chunk_ids")
versions = st.integers(min_value=1, max_value=4)
names = st.one_of(
    st.sampled_from([b"d", b"e", b"f", b"g", b"sub", b"link", b"hard", b"fifo", b"new", b"x"]),
    st.sampled_from([b"user.mime", b"trusted.t", b"security.s", b"other.o"]),
    st.binary(min_size=1, max_size=12),
)
paths = st.one_of(
    st.sampled_from([b"/", b"/d", b"/d/f", b"/g", b"/d/sub", b"/link", b"/nope", b"/d/../g"]),
    st.binary(max_size=20),
)
pairs = st.lists(st.tuples(chunk_ids, versions).map(list), max_size=4)
live_addrs = st.sampled_from(KEEPER_ADDRS)


@st.composite
def chunk_records(draw: st.DrawFn) -> list[Any]:
    """[index, chunk id, version, length, digest, [keeper addrs]], as CommitChunks sends."""
    length = draw(st.sampled_from([0, 1, 4096, CHUNK // 2, CHUNK]))
    digest = draw(st.sampled_from([0, checksum.digest(checksum.block_checksums(b"x"))]))
    holders = draw(st.lists(live_addrs, max_size=3, unique=True))
    return [draw(st.integers(0, 5)), draw(chunk_ids), draw(versions), length, digest, holders]


MODES = [
    stat.S_IFREG | 0o644,
    stat.S_IFDIR | 0o755,
    stat.S_IFDIR | 0o2775,
    stat.S_IFIFO | 0o600,
    stat.S_IFCHR | 0o600,
    stat.S_IFLNK | 0o777,
    0o644,
]
# Plausible values by field name; fields of other names get any value of their type.
PLAUSIBLE: dict[str, st.SearchStrategy[Any]] = {
    "ino": inos,
    "parent": st.one_of(dirs, inos),
    "new_parent": st.one_of(dirs, inos),
    "old_parent": st.one_of(dirs, inos),
    "inos": st.lists(inos, max_size=4),
    "name": names,
    "new_name": names,
    "old_name": names,
    "target": st.sampled_from([b"d/f", b"../x", b"/abs"]),
    "path": paths,
    "mode": st.one_of(st.sampled_from(MODES), st.integers(0, 0o177777)),
    "uid": st.integers(0, 70000),
    "gid": st.integers(0, 70000),
    "rdev": st.integers(0, 1 << 20),
    "size_bytes": st.integers(0, 3 * CHUNK),
    "atime_ns": st.integers(0, 1 << 62),
    "mtime_ns": st.integers(0, 1 << 62),
    "ctime_ns": st.integers(0, 1 << 62),
    "offset": st.integers(0, 20),
    "limit": st.integers(0, 50),
    "flags": st.integers(0, 3),
    "session": st.sampled_from(["session-1", "session-2"]),
    # Mostly no locks held (as most writes are); else a lock table no tracker here has.
    "locks_table": st.sampled_from(["", "", "", "another-table"]),
    "unused": pairs,
    "index": st.integers(0, 5),
    "first_index": st.integers(0, 5),
    "end_index": st.integers(0, 6),
    "count": st.integers(0, 10),
    "exclude": st.lists(live_addrs, max_size=2),
    "chunk_id": chunk_ids,
    "version": versions,
    "digest": st.integers(0, (1 << 64) - 1),
    "addr": live_addrs,
    "reason": st.text(max_size=20),
    "keeper_id": st.sampled_from(KEEPER_IDS),
    "keeper": st.sampled_from([*KEEPER_IDS, *KEEPER_ADDRS, "keeper"]),
    "zone": st.sampled_from(["", "a", "b"]),
    "capacity_bytes": st.integers(0, 1 << 40),
    "used_bytes": st.integers(0, 1 << 40),
    "copies": st.integers(0, 5),
    "added": pairs,
    "removed": pairs,
    "value": st.binary(max_size=100),
    "offset_bytes": st.integers(0, CHUNK + 100),
    "length_bytes": st.integers(0, CHUNK + 100),
    "forward": st.just([]),
}


xattr_names = st.one_of(
    st.sampled_from([b"user.mime", b"user.x", b"trusted.t", b"security.s"]), names
)


def plausible_for(cls: type[m.Message], field: str, hint: Any) -> st.SearchStrategy[Any]:
    if field == "chunks":  # chunk records for commits, [id, version] pairs elsewhere
        item = typing.get_args(hint)[0] if typing.get_args(hint) else Any
        if typing.get_args(item) == (int,):
            return pairs
        return st.lists(chunk_records(), max_size=4)
    if field == "name" and cls.__name__.endswith("Xattr"):
        return xattr_names
    if field == "ino" and cls is m.ReadLink:
        return st.one_of(known("links"), inos)
    found = PLAUSIBLE.get(field)
    if found is None:
        return strategy_for(hint, field)
    if type(None) in typing.get_args(hint):  # optional: often left out, as clients do
        return st.one_of(st.none(), found)
    return found


entries = known("entries")
empty_dirs = known("empty_dirs")
NAME_FIELDS = (("parent", "name"), ("old_parent", "old_name"), ("new_parent", "new_name"))


@st.composite
def naming_entries(draw: st.DrawFn, message: st.SearchStrategy[m.Message]) -> m.Message:
    """`message` with each of its (directory, name) pairs naming an existing entry."""
    msg = draw(message)
    fields = {f.name for f in dataclasses.fields(msg)}
    # What removing a directory can act on is an empty one.
    pool = empty_dirs if isinstance(msg, m.RemoveDir) else entries
    for parent, name in NAME_FIELDS:
        # A target name (rename, link) is an existing entry half the time, else a fresh one.
        if parent in fields and name in fields and (parent != "new_parent" or draw(st.booleans())):
            where, what = draw(pool)
            msg = dataclasses.replace(msg, **{parent: where, name: what})
    return msg


_KINDS: dict[type[m.Message], list[st.SearchStrategy[m.Message]]] = {}


def message_kinds(cls: type[m.Message]) -> list[st.SearchStrategy[m.Message]]:
    """Messages of `cls` in three kinds: plausible values in every field (names of entries
    that exist, where a message has a directory and a name), plausible values with fresh
    names, and any value of its declared type in each field."""
    if cls in _KINDS:
        return _KINDS[cls]
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    plausible = {f: plausible_for(cls, f, hints[f]) for f in fields}
    mixed = {f: st.one_of(plausible[f], strategy_for(hints[f], f)) for f in fields}
    _KINDS[cls] = [
        naming_entries(st.builds(cls, **plausible)),
        st.builds(cls, **plausible),
        st.builds(cls, **mixed),
    ]
    return _KINDS[cls]


def messages_for(classes: list[type[m.Message]]) -> st.SearchStrategy[m.Message]:
    """Messages of `classes`, of the three kinds of `message_kinds` as often each."""
    return st.one_of(*(kind for cls in classes for kind in message_kinds(cls)))


@st.composite
def batches(draw: st.DrawFn, classes: list[type[m.Message]]) -> list[m.Message]:
    """A message of each kind of every class in `classes`, in any order, and a few more of
    any class: every handler gets plausible requests in every example (chosen freely, some
    kinds of request would crowd out the rest, and a rare one might never come)."""
    order = draw(st.permutations([kind for cls in classes for kind in message_kinds(cls)]))
    batch = [draw(kind) for kind in order]
    for _ in range(draw(st.integers(0, 8))):
        batch.insert(draw(st.integers(0, len(batch))), draw(messages_for(classes)))
    return batch


def through_the_wire(msg: m.Message) -> m.Message | None:
    """What a server's handler would get for `msg`: None if it would not even be decoded
    (unencodable, or refused by the field checks)."""
    try:
        raw = msgpack.packb(msg.to_wire(1), use_bin_type=True)
    except (TypeError, ValueError, OverflowError):
        return None
    try:
        return m.decode(msgpack.unpackb(raw, raw=False))[1]
    except ProtocolError:
        return None


REQUESTS = [
    cls
    for cls in m.REGISTRY.values()
    if not cls.__name__.endswith("Reply") and cls not in (m.Hello, m.Ping, m.Pong, m.Authenticate)
]
TRACKER_MESSAGES = [cls for cls in REQUESTS if cls.TYPE < 100]
KEEPER_MESSAGES = [cls for cls in REQUESTS if cls.TYPE >= 100]
# Requests a plausible message of gets past the checks into the tracker's own code: the
# tracker fuzzer must see each answered at least once.
TRACKER_REACHES = {
    m.Lookup,
    m.GetAttr,
    m.SetAttr,
    m.ResolvePath,
    m.ReadDir,
    m.MakeNode,
    m.Symlink,
    m.ReadLink,
    m.Link,
    m.Unlink,
    m.RemoveDir,
    m.Rename,
    m.OpenFile,
    m.ReleaseFiles,
    m.GetChunks,
    m.AllocateChunk,
    m.CommitChunks,
    m.PunchChunks,
    m.SetXattr,
    m.GetXattr,
    m.ListXattr,
    m.RemoveXattr,
    m.StatFs,
    m.Sync,
    m.AbandonChunks,
    m.ReportBadChunk,
    m.ClusterStatus,
    m.Fsck,
    m.SetReplication,
    m.Decommission,
    m.DiskUsage,
    m.RegisterKeeper,
    m.Heartbeat,
    m.Goodbye,
}
KEEPER_REACHES = {m.PutChunk, m.ReadChunk, m.SyncChunks}


class Reach:
    """How each request ended, per message type."""

    def __init__(self) -> None:
        self.outcomes: dict[str, Counter[str]] = {}

    def note(self, msg: m.Message, outcome: str) -> None:
        self.outcomes.setdefault(type(msg).__name__, Counter())[outcome] += 1

    def answered(self) -> set[str]:
        return {name for name, seen in self.outcomes.items() if seen["reply"]}

    def report(self) -> str:
        return "\n".join(
            f"  {name:<16} " + ", ".join(f"{k} {v}" for k, v in seen.most_common())
            for name, seen in sorted(self.outcomes.items())
        )

    def check(self, expected: set[type[m.Message]]) -> None:
        print(f"\nrequests by outcome:\n{self.report()}")
        handled = sum(
            n for seen in self.outcomes.values() for k, n in seen.items() if k != "not decoded"
        )
        assert handled > 0, "no request got past the field checks"
        never = {cls.__name__ for cls in expected} - self.answered()
        assert not never, f"never answered with a reply: {sorted(never)}\n{self.report()}"


# --- nothing is written outside the data directory -------------------------------------------

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_PATH_EVENTS = {
    "os.mkdir": (0,),
    "os.remove": (0,),
    "os.rmdir": (0,),
    "os.rename": (0, 1),
    "os.truncate": (0,),
    "os.symlink": (1,),
    "os.link": (1,),
    "os.chmod": (0,),
    "os.chown": (0,),
    "os.utime": (0,),
    "shutil.rmtree": (0,),
    "shutil.copyfile": (1,),
    "sqlite3.connect": (0,),
}


class WriteWatch:
    """An audit hook that records every write outside `inside` while `watching` is on."""

    def __init__(self) -> None:
        self.inside: Path | None = None
        self.outside: list[str] = []
        self._busy = False
        sys.addaudithook(self._hook)

    def _hook(self, event: str, args: tuple[Any, ...]) -> None:
        if self.inside is None or self._busy:
            return
        if event == "open":
            if not (isinstance(args[2], int) and args[2] & _WRITE_FLAGS):
                return
            targets = [args[0]]
        elif event in _PATH_EVENTS:
            targets = [args[i] for i in _PATH_EVENTS[event] if i < len(args)]
        else:
            return
        self._busy = True
        try:
            for target in targets:
                if isinstance(target, int):
                    continue  # an open file descriptor: where it points was checked at open
                path = Path(os.path.abspath(os.fsdecode(target)))
                if not path.is_relative_to(self.inside):
                    self.outside.append(f"{event} {path}")
        finally:
            self._busy = False

    @contextmanager
    def watching(self, inside: Path) -> Iterator[None]:
        self.inside, self.outside = inside, []
        try:
            yield
        finally:
            self.inside = None


_WATCH: list[WriteWatch] = []


def write_watch() -> WriteWatch:
    """The one audit hook of this process (hooks cannot be removed: made once, on first use)."""
    if not _WATCH:
        _WATCH.append(WriteWatch())
    return _WATCH[0]


@contextmanager
def in_empty_dir(path: Path) -> Iterator[None]:
    """Run with `path` (made empty) as the working directory: a relative write lands there."""
    path.mkdir()
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)
    assert list(path.iterdir()) == [], "something was written to the working directory"


# --- frames and the decoder ----------------------------------------------------------------


@settings(FUZZ, max_examples=budget(150))
@given(st.binary(max_size=400))
def test_frame_decoder_survives_any_bytes(raw: bytes) -> None:
    async def go() -> None:
        left, right = trio.testing.memory_stream_pair()
        frames = FrameStream(right, Limits(max_header=1 << 16, max_payload=1 << 16))
        await left.send_all(raw)
        await left.aclose()
        with trio.fail_after(5):
            while True:
                try:
                    header, _ = await frames.receive()
                except (ProtocolError, EOFError):
                    return
                try:
                    m.decode(header)
                except ProtocolError:
                    return

    trio.run(go)


@settings(FUZZ, max_examples=budget(150))
@given(
    st.sampled_from(list(m.REGISTRY.values())),
    st.dictionaries(st.text(max_size=12), values, max_size=6),
)
def test_message_decoder_accepts_only_declared_shapes(
    cls: type[m.Message], body: dict[str, Any]
) -> None:
    wire = msgpack.unpackb(msgpack.packb(body | {"t": int(cls.TYPE), "id": 1}), raw=False)
    try:
        _, msg = m.decode(wire)
    except ProtocolError:
        return
    assert isinstance(msg, cls)


@settings(FUZZ, max_examples=budget(150))
@given(messages_for(REQUESTS))
def test_every_well_typed_message_survives_the_wire(msg: m.Message) -> None:
    """What the fuzzers below build is what a peer could send: it round-trips as itself."""
    decoded = through_the_wire(msg)
    if decoded is not None:
        assert decoded == msg


# --- the tracker's handlers ----------------------------------------------------------------


def _record(index: int, info: m.AllocateReply, length: int) -> list[Any]:
    digest = checksum.digest(checksum.block_checksums(b"\0" * length))
    return [index, info.chunk_id, info.version, length, digest, info.keepers]


async def _register_keepers(
    tracker: Tracker,
    held: list[list[int]],
    only_first: tuple[list[int], ...] | list[list[int]] = (),
) -> None:
    """Every keeper holds `held`; the first one also `only_first` (chunks below their goal)."""
    for keeper_id, addr in zip(KEEPER_IDS, KEEPER_ADDRS, strict=True):
        request = m.RegisterKeeper(
            keeper_id=keeper_id,
            addr=addr,
            zone="",
            capacity_bytes=1 << 34,
            used_bytes=0,
            chunks=[*held, *only_first] if keeper_id == KEEPER_IDS[0] else held,
        )
        await tracker.handle(request, bytearray(), "seed")


async def _seed(tracker: Tracker) -> tuple[list[list[int]], list[list[int]]]:
    """A small namespace: /d, /d/f (one chunk), /g (two chunks and a third one allocated,
    never committed), /link, /d/sub, /fifo, /e, /hard a second name of /d/f, and /d/caf\\xe9
    (a name that is not UTF-8) with one chunk that only one keeper holds. Fills in KNOWN;
    returns the chunk versions every keeper holds, and those only the first one holds."""
    await _register_keepers(tracker, [])

    async def call(msg: m.Message) -> Any:
        reply, _ = await tracker.handle(msg, bytearray(), "seed")
        return reply

    def made(reply: Any) -> int:
        ino: int = reply.attr[0]
        return ino

    d = made(await call(m.MakeNode(parent=1, name=b"d", mode=stat.S_IFDIR | 0o755, uid=0, gid=0)))
    f = made(await call(m.MakeNode(parent=d, name=b"f", mode=stat.S_IFREG | 0o644, uid=0, gid=0)))
    g = made(await call(m.MakeNode(parent=1, name=b"g", mode=stat.S_IFREG | 0o600, uid=1, gid=1)))
    held = []
    for ino, count in ((f, 1), (g, 2)):
        records = []
        for index in range(count):
            info = await call(m.AllocateChunk(ino=ino, index=index))
            records.append(_record(index, info, CHUNK))
            held.append([info.chunk_id, info.version])
        await call(m.CommitChunks(ino=ino, size_bytes=count * CHUNK, mtime_ns=1, chunks=records))
    info = await call(m.AllocateChunk(ino=g, index=2))
    held.append([info.chunk_id, info.version])
    odd = made(
        await call(m.MakeNode(parent=d, name=b"caf\xe9", mode=stat.S_IFREG | 0o644, uid=0, gid=0))
    )
    info = await call(m.AllocateChunk(ino=odd, index=0))
    await call(m.CommitChunks(ino=odd, size_bytes=5, mtime_ns=1, chunks=[_record(0, info, 5)]))
    only_first = [[info.chunk_id, info.version]]
    link = made(await call(m.Symlink(parent=1, name=b"link", target=b"d/f", uid=0, gid=0)))
    sub = made(
        await call(m.MakeNode(parent=d, name=b"sub", mode=stat.S_IFDIR | 0o755, uid=0, gid=0))
    )
    fifo = made(
        await call(m.MakeNode(parent=1, name=b"fifo", mode=stat.S_IFIFO | 0o600, uid=0, gid=0))
    )
    e = made(await call(m.MakeNode(parent=1, name=b"e", mode=stat.S_IFDIR | 0o700, uid=0, gid=0)))
    await call(m.Link(ino=f, new_parent=1, new_name=b"hard"))
    for ino in (d, f, g):
        await call(m.SetXattr(ino=ino, name=b"user.mime", value=b"text/plain"))
    created = [d, f, g, link, sub, fifo, e]
    # The first of each comes up most often: one that most requests can act on.
    KNOWN.dirs = [d, 1, sub, e]
    KNOWN.empty_dirs = [(d, b"sub"), (1, b"e")]
    KNOWN.links = [link]
    KNOWN.entries = [
        (1, b"g"),
        (d, b"f"),
        (1, b"d"),
        (1, b"link"),
        (d, b"sub"),
        (1, b"fifo"),
        (1, b"hard"),
        (1, b"e"),
    ]
    KNOWN.inos = [f, 1, *created, max(created) + 1, max(created) + 2]
    ids = sorted({chunk_id for chunk_id, _ in held + only_first})
    KNOWN.chunk_ids = [*ids, *range(max(ids) + 1, max(ids) + 10 - len(ids))]
    return held, only_first


class TrackerSeed:
    """A seeded tracker data directory, made once; each example runs on a fresh copy."""

    def __init__(self) -> None:
        self.dir = tempfile.TemporaryDirectory(prefix="dfs-fuzz-seed-")
        self.data = Path(self.dir.name) / "tracker"
        tracker = Tracker(self.data, credentials=CREDENTIALS, chunk_size=CHUNK)
        try:
            self.held, self.only_first = trio.run(_seed, tracker)
        finally:
            tracker.store.close()

    @contextmanager
    def tracker(self, root: Path) -> Iterator[Tracker]:
        data = root / "tracker"
        shutil.copytree(self.data, data)
        tracker = Tracker(data, credentials=CREDENTIALS, chunk_size=CHUNK, dead_after_s=30.0)
        try:
            yield tracker
        finally:
            tracker.store.close()


_TRACKER_SEED: list[TrackerSeed] = []


def tracker_seed() -> TrackerSeed:
    if not _TRACKER_SEED:
        _TRACKER_SEED.append(TrackerSeed())
    return _TRACKER_SEED[0]


def tracker_fuzzer(tmp_path: Path, reach: Reach) -> Callable[[], None]:
    seed = tracker_seed()
    watch = write_watch()
    examples = iter(range(1 << 62))

    @settings(FUZZ, max_examples=budget(60))
    @given(batches(REQUESTS))
    def fuzz(batch: list[m.Message]) -> None:
        root = tmp_path / f"example{next(examples)}"
        root.mkdir()
        with seed.tracker(root) as tracker:
            data = root / "tracker"

            async def go() -> None:
                await _register_keepers(tracker, seed.held, seed.only_first)
                with trio.fail_after(10):
                    for sent in batch:
                        msg = through_the_wire(sent)
                        if msg is None:
                            reach.note(sent, "not decoded")
                            continue
                        try:
                            with watch.watching(data):
                                reply, _ = await tracker.handle(msg, bytearray(), "fuzz")
                        except DfsError as exc:
                            reach.note(msg, type(exc).__name__)
                            continue
                        finally:
                            assert watch.outside == [], f"{msg!r} wrote {watch.outside}"
                        reach.note(msg, "reply")
                        # Whatever came back must itself be encodable for the wire.
                        msgpack.packb(reply.to_wire(1))
                    # What the requests changed is what the healer and the status page read.
                    tracker.healer.scan()
                    msgpack.packb(tracker.status().to_wire(1))
                    tracker.history.sample(tracker, 1e9)
                    # `dfs du`'s totals still equal a count of the namespace.
                    assert tracker.store.kept_dirstats() == tracker.store.compute_dirstats()

            with in_empty_dir(root / "cwd"):
                trio.run(go)
        assert sorted(p.name for p in root.iterdir()) == ["cwd", "tracker"]
        shutil.rmtree(root)

    return fuzz


def test_tracker_handlers_answer_anything_with_replies_or_dfs_errors(tmp_path: Path) -> None:
    reach = Reach()
    tracker_fuzzer(tmp_path, reach)()
    reach.check(TRACKER_REACHES)


# --- the keeper's handlers -----------------------------------------------------------------

BLOCK = checksum.BLOCK_SIZE
payloads = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda n, b: bytes([b]) * n, st.integers(0, 3 * BLOCK + 10), st.integers(0, 255)),
)


@st.composite
def keeper_requests(draw: st.DrawFn) -> tuple[m.Message, bytes]:
    """A request for a keeper and its payload: a chunk with its true checksums, mostly."""
    msg = draw(messages_for(KEEPER_MESSAGES))
    payload = b""
    if isinstance(msg, m.PutChunk):
        payload = draw(payloads)
        if draw(st.integers(0, 3)):
            msg = dataclasses.replace(msg, checksums=checksum.block_checksums(payload))
    return msg, payload


def _seed_keeper(data: Path) -> None:
    """Every chunk id the fuzzer uses, in versions 1 and 2, of sizes from 10 bytes to more
    than a block."""
    tracker_seed()  # fills in KNOWN
    store = ChunkStore(data)
    store.scan()

    async def go() -> None:
        for i, chunk_id in enumerate(KNOWN.chunk_ids):
            for version in (1, 2):
                body = bytes([i]) * (10 + i * (BLOCK // 3) * version)
            await store.write(chunk_id, version, body, checksum.block_checksums(body), sync=True)

    trio.run(go)


def keeper_fuzzer(tmp_path: Path, reach: Reach) -> Callable[[], None]:
    seed = tmp_path / "seed"
    if not seed.exists():
        _seed_keeper(seed)
    watch = write_watch()
    examples = iter(range(1 << 62))

    @settings(FUZZ, max_examples=budget(200))
    @given(st.lists(keeper_requests(), min_size=1, max_size=6))
    def fuzz(batch: list[tuple[m.Message, bytes]]) -> None:
        root = tmp_path / f"example{next(examples)}"
        data = root / "data"
        shutil.copytree(seed, data)
        store = ChunkStore(data)
        store.scan()
        server = KeeperServer(store, CREDENTIALS, addr="127.0.0.1:1")

        async def go() -> None:
            with trio.fail_after(20):
                for sent, payload in batch:
                    msg = through_the_wire(sent)
                    if msg is None:
                        reach.note(sent, "not decoded")
                        continue
                    try:
                        with watch.watching(data):
                            _, out = await server.handle(msg, bytearray(payload), "fuzz")
                    except DfsError as exc:
                        reach.note(msg, type(exc).__name__)
                        continue
                    finally:
                        assert watch.outside == [], f"{msg!r} wrote {watch.outside}"
                    reach.note(msg, "reply")
                    if isinstance(out, FileRegion):
                        out.close()
                await server.peers.aclose()

        with in_empty_dir(root / "cwd"):
            trio.run(go)
        for path in root.rglob("*"):
            assert path.is_relative_to(data) or path == root / "cwd", path
            if path.is_file():
                assert path.parent.parent == data / "chunks", path
        shutil.rmtree(root)

    return fuzz


def test_keeper_handlers_never_write_outside_the_data_dir(tmp_path: Path) -> None:
    reach = Reach()
    keeper_fuzzer(tmp_path, reach)()
    reach.check(KEEPER_REACHES)


def test_the_fuzz_profile_lengthens_every_fuzzer(tmp_path: Path) -> None:
    """`make fuzz` selects a profile with more examples than "ci": each fuzzer must run as
    many times more as that (a fuzzer's own `max_examples` would otherwise cap it at its CI
    budget). Under "ci" this checks the CI budgets; under "fuzz", that they grew."""
    more = settings().max_examples / settings.get_profile("ci").max_examples
    fuzzers = [
        test_frame_decoder_survives_any_bytes,
        test_message_decoder_accepts_only_declared_shapes,
        test_every_well_typed_message_survives_the_wire,
        tracker_fuzzer(tmp_path, Reach()),
        keeper_fuzzer(tmp_path, Reach()),
    ]
    for fuzzer in fuzzers:
        # Hypothesis keeps a test's own settings on the function it wraps.
        own = getattr(fuzzer, "_hypothesis_internal_use_settings", None)
        assert own is not None, fuzzer
        assert own.max_examples >= 50 * more, fuzzer


def test_oversized_frames_are_refused_before_reading_the_body() -> None:
    async def go() -> None:
        left, right = trio.testing.memory_stream_pair()
        frames = FrameStream(right, Limits(max_header=1000, max_payload=1000))
        await left.send_all(struct.pack(">II", 1001, 0))
        with pytest.raises(ProtocolError, match="out of bounds"):
            await frames.receive()

    trio.run(go)
