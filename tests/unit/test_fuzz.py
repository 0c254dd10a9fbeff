"""Property-based fuzzing of everything that reads bytes or messages from a peer.

Whatever arrives, the decoder raises only ProtocolError/EOFError and the handlers only
DfsError (an error reply for that request): no crash, no hang, and nothing written outside the
data directory. CI runs a bounded number of examples; `make fuzz` runs many more
(HYPOTHESIS_PROFILE=fuzz).
"""

from __future__ import annotations

import dataclasses
import os
import struct
import tempfile
import typing
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
from cluster.protocol import FrameStream, Limits
from cluster.tracker.server import Tracker

CREDENTIALS = Credentials(b"fuzz-secret-fuzz-secret")
ints = st.one_of(
    st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1),
    st.integers(min_value=-3, max_value=40),
)
# Addresses stay on loopback: a fuzzed forward list must never send traffic elsewhere.
addrs = st.sampled_from(["127.0.0.1:1", "127.0.0.1:0", "nonsense", "", "127.0.0.1:99999"])
scalars = st.one_of(st.none(), st.booleans(), ints, st.binary(max_size=64), st.text(max_size=20))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=5), max_leaves=20)


def strategy_for(hint: Any, name: str) -> st.SearchStrategy[Any]:
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


def messages_for(classes: list[type[m.Message]]) -> st.SearchStrategy[m.Message]:
    options = []
    for cls in classes:
        hints = typing.get_type_hints(cls)
        fields = {f.name: strategy_for(hints[f.name], f.name) for f in dataclasses.fields(cls)}
        options.append(st.builds(cls, **fields))
    return st.one_of(*options)


TRACKER_MESSAGES = [
    cls
    for cls in m.REGISTRY.values()
    if not cls.__name__.endswith("Reply")
    and cls not in (m.Hello, m.Ping, m.Pong, m.Authenticate, m.PutChunk, m.ReadChunk)
]


@settings(suppress_health_check=[HealthCheck.too_slow])
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


class TrackerHarness:
    def __init__(self) -> None:
        self.dir = tempfile.TemporaryDirectory(prefix="dfs-fuzz-")
        self.tracker = Tracker(
            Path(self.dir.name) / "t", credentials=CREDENTIALS, chunk_size=1 << 20
        )


TRACKER = TrackerHarness()


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(messages_for(TRACKER_MESSAGES), min_size=1, max_size=8))
def test_tracker_handlers_answer_anything_with_replies_or_dfs_errors(
    batch: list[m.Message],
) -> None:
    async def go() -> None:
        with trio.fail_after(10):
            for msg in batch:
                try:
                    reply, _ = await TRACKER.tracker.handle(msg, bytearray(), "fuzz")
                except DfsError:
                    continue
                # Whatever came back must itself be encodable for the wire.
                msgpack.packb(reply.to_wire(1))

    trio.run(go)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(
    messages_for([m.PutChunk, m.ReadChunk]),
    st.one_of(st.binary(max_size=2000), st.just(b"x" * 10)),
)
def test_keeper_handlers_never_write_outside_the_data_dir(msg: m.Message, payload: bytes) -> None:
    with tempfile.TemporaryDirectory(prefix="dfs-fuzz-") as tmp:
        root = Path(tmp)
        data = root / "data"
        server = KeeperServer(ChunkStore(data), CREDENTIALS, addr="127.0.0.1:1")

        async def go() -> None:
            with trio.fail_after(20):
                try:
                    await server.handle(msg, bytearray(payload), "fuzz")
                except DfsError:
                    pass

        trio.run(go)
        for path in root.rglob("*"):
            assert path.is_relative_to(data), path
            if path.is_file():
                assert path.parent.parent == data / "chunks", path


def test_oversized_frames_are_refused_before_reading_the_body() -> None:
    async def go() -> None:
        left, right = trio.testing.memory_stream_pair()
        frames = FrameStream(right, Limits(max_header=1000, max_payload=1000))
        await left.send_all(struct.pack(">II", 1001, 0))
        with pytest.raises(ProtocolError, match="out of bounds"):
            await frames.receive()

    trio.run(go)
    assert os.environ.get("HYPOTHESIS_PROFILE", "ci") in ("ci", "fuzz")
