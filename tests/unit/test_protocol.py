"""Frames and messages: round trips, and every kind of malformed input is a ProtocolError."""

from __future__ import annotations

import struct

import msgpack
import pytest
import trio
import trio.testing

from cluster import errors
from cluster import messages as m
from cluster.errors import ProtocolError
from cluster.protocol import FrameStream, Limits


async def _pair() -> tuple[FrameStream, FrameStream]:
    left, right = trio.testing.memory_stream_pair()
    return FrameStream(left), FrameStream(right)


async def test_round_trip_with_payload() -> None:
    sender, receiver = await _pair()
    msg = m.PutChunk(chunk_id=7, version=2, checksums=b"\x01" * 8, forward=["127.0.0.1:1"])
    payload = bytes(range(256)) * 1000
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender.send, msg.to_wire(42), payload)
        header, data = await receiver.receive()
    request_id, decoded = m.decode(header)
    assert (request_id, decoded) == (42, msg)
    assert data == payload


async def test_every_message_round_trips_its_defaults() -> None:
    sender, receiver = await _pair()
    samples = [m.Ping(), m.OkReply(), m.StatFs(), m.Hello(version=1, role="x", nonce=b"n" * 32)]
    for sample in samples:
        await sender.send(sample.to_wire(1))
        header, _ = await receiver.receive()
        assert m.decode(header)[1] == sample


@pytest.mark.parametrize(
    "raw",
    [
        struct.pack(">II", 0, 0),  # empty header
        struct.pack(">II", 1 << 30, 0),  # oversized header
        struct.pack(">II", 10, 1 << 31),  # oversized payload
        struct.pack(">II", 1, 0) + b"\xc1",  # invalid msgpack
        struct.pack(">II", 1, 0) + b"\x01",  # not a map
    ],
)
async def test_malformed_frames(raw: bytes) -> None:
    left, right = trio.testing.memory_stream_pair()
    receiver = FrameStream(right, Limits(max_header=1 << 20, max_payload=1 << 20))
    await left.send_all(raw)
    with pytest.raises(ProtocolError):
        await receiver.receive()


async def test_truncated_frame_is_an_error_and_clean_close_is_eof() -> None:
    left, right = trio.testing.memory_stream_pair()
    receiver = FrameStream(right)
    await left.send_all(struct.pack(">II", 50, 0) + b"\x80")
    await left.aclose()
    with pytest.raises(ProtocolError):
        await receiver.receive()
    left, right = trio.testing.memory_stream_pair()
    await left.aclose()
    with pytest.raises(EOFError):
        await FrameStream(right).receive()


@pytest.mark.parametrize(
    "body",
    [
        {"t": 9999, "id": 1},  # unknown type
        {"t": int(m.MsgType.GET_ATTR)},  # no request id
        {"t": int(m.MsgType.GET_ATTR), "id": 1, "ino": "1"},  # wrong type
        {"t": int(m.MsgType.GET_ATTR), "id": 1},  # missing field
        {"t": int(m.MsgType.GET_ATTR), "id": 1, "ino": 1, "evil": 2},  # unknown field
        {"t": int(m.MsgType.GET_ATTR), "id": 1, "ino": True},  # bool is not an int
        {"t": int(m.MsgType.PUT_CHUNK), "id": 1, "chunk_id": 1, "version": 1, "checksums": "x"},
    ],
)
def test_invalid_messages(body: dict[str, object]) -> None:
    raw = msgpack.unpackb(msgpack.packb(body), raw=False)
    with pytest.raises(ProtocolError):
        m.decode(raw)


def test_message_types_are_unique_and_registered() -> None:
    assert len(m.REGISTRY) == len({cls.TYPE for cls in m.REGISTRY.values()})
    assert m.REGISTRY[int(m.MsgType.PUT_CHUNK)] is m.PutChunk


def test_every_error_class_comes_back_from_the_wire_as_itself() -> None:
    """An error missing from ERRORS_BY_CODE would reach the client as a plain DfsError (EIO,
    and no `except` of its class would catch it)."""

    def subclasses(cls: type[errors.DfsError]) -> list[type[errors.DfsError]]:
        return [cls] + [c for sub in cls.__subclasses__() for c in subclasses(sub)]

    # ConnectionLost is local: it never crosses the wire (it travels as Unavailable).
    everyone = [c for c in subclasses(errors.DfsError) if c is not errors.ConnectionLost]
    assert len({cls.code for cls in everyone}) == len(everyone), "two classes share a code"
    for cls in everyone:
        assert type(errors.error_from_wire(cls.code, "x")) is cls, cls.__name__


async def test_back_to_back_frames_over_a_socket() -> None:
    """Frames sent in one burst over a real socket are parsed from the read-ahead buffer and
    straight from the socket alike: small ones, payloads and headers larger than one read."""
    left, right = trio.socket.socketpair()
    sender = FrameStream(trio.SocketStream(left))
    receiver = FrameStream(trio.SocketStream(right))
    frames = []
    for i in range(60):
        names = [b"n" * (i * 97 % 300)] * (1 + i * 37 % 400)  # headers up to ~120 KB
        payload = bytes([i]) * (i * 4099 % 70_000 if i % 3 else 0)
        frames.append((m.ReadDirReply(entries=[[n, [i], i] for n in names]), payload))
    async with trio.open_nursery() as nursery:

        async def send_all() -> None:
            for i, (msg, payload) in enumerate(frames):
                await sender.send(msg.to_wire(i), payload)

        nursery.start_soon(send_all)
        for i, (msg, payload) in enumerate(frames):
            header, data = await receiver.receive()
            assert m.decode(header) == (i, msg)
            assert data == payload
    await sender.aclose()
    with pytest.raises(EOFError):
        await receiver.receive()
