"""Framing: how messages and bulk bytes travel on a byte stream.

A frame is `header_len:u32 payload_len:u32` (big-endian), then `header_len` bytes of msgpack
(the message, see `messages.py`), then `payload_len` raw bytes (chunk data, never re-encoded).
Both lengths are checked against the per-peer limits before a single body byte is read, so an
oversized or garbage prefix costs the server nothing but the connection. Every read runs under
the caller's idle/read timeout.

`FrameStream` owns one stream. Writers share a lock so two tasks never interleave frames; reads
are done by one task at a time (the owner of the connection).
"""

from __future__ import annotations

import os
import select
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import trio

from cluster.errors import ProtocolError


class Unencodable(ValueError):
    """A header msgpack cannot pack (a str with lone surrogates, an int beyond 64 bits)."""


PREFIX = struct.Struct(">II")
# A header carries names, attributes and chunk lists; 4 MiB holds a readdir page or a chunk
# list of a 100 GiB file with room to spare, and bounds what a bad peer can make us buffer.
MAX_HEADER = 4 * 1024 * 1024
# The largest chunk (64 MiB) plus slack; payloads are only chunk data.
# The slowest rate a chunk transfer is allowed before it counts as stalled: a writer's timeout
# and a keeper's forward down a pipeline both grow by the bytes sent at this rate, and must
# agree (the writer waits one hop longer than the keeper, to hear which keeper failed).
SLOWEST_TRANSFER_BYTES_PER_S = 20 << 20
MAX_PAYLOAD = 65 * 1024 * 1024

Buffer = bytes | bytearray | memoryview
# A stalled peer fails a file send after this long (the send runs in a worker thread, where
# trio's cancellation cannot reach); clients give up on a silent keeper sooner than that.
FILE_SEND_TIMEOUT_S = 30.0
# File sends in flight per process: each holds a thread until its peer has read the chunk.
FILE_SEND_THREADS = 32
# What one receive asks the socket for when reading prefixes and headers.
READ_SIZE = 16 * 1024


class BufferPool:
    """Reusable payload buffers.

    A fresh 8 MiB bytearray costs a zero-fill and a page fault per 4 KiB: about 14% of a
    keeper's CPU when chunks stream in. Whoever received a payload and is done with every view
    of it gives it back with `give`; a buffer that is never given back is simply collected.
    Giving back a buffer that is still in use would corrupt data, so only the code that owns a
    payload to the end (the keeper's put handler, the client's read) does it.
    """

    def __init__(self, max_bytes: int = 32 << 20) -> None:
        self.max_bytes = max_bytes
        self._free: dict[int, list[bytearray]] = {}
        self._bytes = 0

    def take(self, size: int) -> bytearray:
        free = self._free.get(size)
        if free:
            self._bytes -= size
            return free.pop()
        return bytearray(size)

    def give(self, buffer: bytearray) -> None:
        size = len(buffer)
        if size >= 64 * 1024 and self._bytes + size <= self.max_bytes:
            self._free.setdefault(size, []).append(buffer)
            self._bytes += size


PAYLOADS = BufferPool()


@dataclass(slots=True)
class FileRegion:
    """A payload that stays in a file until it is sent: `length` bytes at `offset` of `fd`.

    A keeper answers reads with one. Over plain TCP `os.sendfile` moves the bytes from the page
    cache to the socket inside the kernel, in a worker thread, so that a cold read waits for
    the disk there and not in the event loop; the keeper neither copies nor allocates 8 MiB
    per read. Over TLS the bytes are read and sent in pieces. Whoever sends it closes it.

    `more` continues the payload with further (fd, offset, length) pieces, sent in order: the
    blocks of a patched chunk version lie in several files (keeper/chunkstore.py). Every fd
    named is closed once.
    """

    fd: int
    offset: int
    length: int
    more: tuple[tuple[int, int, int], ...] = ()

    def pieces(self) -> list[tuple[int, int, int]]:
        return [(self.fd, self.offset, self.length), *self.more]

    def __len__(self) -> int:
        return self.length + sum(piece[2] for piece in self.more)

    def close(self) -> None:
        for fd in {piece[0] for piece in self.pieces()}:
            os.close(fd)


Payload = Buffer | FileRegion


@dataclass(frozen=True, slots=True)
class Limits:
    max_header: int = MAX_HEADER
    max_payload: int = MAX_PAYLOAD


def pack_header(body: dict[str, Any]) -> bytes:
    packed: bytes = msgpack.packb(body, use_bin_type=True)
    return packed


def unpack_header(raw: Buffer, limits: Limits = Limits()) -> dict[str, Any]:
    """Decode a header, refusing anything that is not a msgpack map with string keys."""
    try:
        body = msgpack.unpackb(
            raw,
            raw=False,
            strict_map_key=True,
            max_bin_len=limits.max_header,
            max_str_len=limits.max_header,
        )
    except Exception as exc:  # msgpack raises many unrelated types for bad input
        raise ProtocolError(f"undecodable header: {exc.__class__.__name__}") from None
    if not isinstance(body, dict):
        raise ProtocolError("header is not a map")
    return body


_FILE_SENDS: trio.lowlevel.RunVar[trio.CapacityLimiter] = trio.lowlevel.RunVar("file_sends")


def _file_sends() -> trio.CapacityLimiter:
    """The threads file sends may hold, apart from trio's default budget that the keeper's
    disk writes use: a slow reader holds its thread for the whole send, and must not keep
    writes waiting for one."""
    try:
        return _FILE_SENDS.get()
    except LookupError:
        limiter = trio.CapacityLimiter(FILE_SEND_THREADS)
        _FILE_SENDS.set(limiter)
        return limiter


def _sendfile(sock_fd: int, region: FileRegion) -> None:
    """Send a whole region on a non-blocking socket, waiting for room with poll (a worker
    thread's loop: the trio thread keeps serving)."""
    poller = select.poll()
    poller.register(sock_fd, select.POLLOUT)
    for fd, offset, left in region.pieces():
        while left:
            try:
                sent = os.sendfile(sock_fd, fd, offset, left)
            except BlockingIOError:
                if not poller.poll(FILE_SEND_TIMEOUT_S * 1000):
                    raise trio.BrokenResourceError("peer stopped reading") from None
                continue
            if sent == 0:
                raise trio.BrokenResourceError("the file ended before the payload")
            offset += sent
            left -= sent


class FrameStream:
    """One connection's frames. The stream may be plain TCP or TLS."""

    def __init__(self, stream: trio.abc.Stream, limits: Limits = Limits()) -> None:
        self.stream = stream
        self.limits = limits
        self._send_lock = trio.StrictFIFOLock()
        self._pending = bytearray()  # bytes read ahead of the frame being parsed
        self._gulp = bytearray(READ_SIZE)
        # recv_into a reused buffer is 4x faster than receive_some over loopback; use it when
        # the stream is a plain socket.
        sock = getattr(stream, "socket", None)
        self._sock: Any = sock if sock is not None and hasattr(sock, "recv_into") else None

    async def send(self, header: dict[str, Any], payload: Payload = b"") -> None:
        """Send one frame. Raises `Unencodable`, having sent nothing, if the header does not
        pack (the message is at fault, not the connection)."""
        try:
            raw = pack_header(header)
        except (TypeError, ValueError, OverflowError) as exc:
            raise Unencodable(f"{exc.__class__.__name__}: {exc}") from exc
        prefix = PREFIX.pack(len(raw), len(payload))
        async with self._send_lock:
            if isinstance(payload, FileRegion):
                await self.stream.send_all(prefix + raw)
                await self._send_region(payload)
            elif len(payload) < 64 * 1024:
                await self.stream.send_all(prefix + raw + bytes(payload))
            else:
                await self.stream.send_all(prefix + raw)
                await self.stream.send_all(payload)

    async def _send_region(self, region: FileRegion) -> None:
        if self._sock is None:
            for fd, offset, length in region.pieces():
                end = offset + length
                while offset < end:
                    piece = await trio.to_thread.run_sync(
                        os.pread, fd, min(end - offset, 1 << 20), offset
                    )
                    if not piece:
                        raise trio.BrokenResourceError("the file ended before the payload")
                    await self.stream.send_all(piece)
                    offset += len(piece)
            return
        await trio.to_thread.run_sync(_sendfile, self._sock.fileno(), region, limiter=_file_sends())

    async def receive(
        self, started: Callable[[], object] | None = None
    ) -> tuple[dict[str, Any], bytearray]:
        """Read one frame. Raises ProtocolError on bad framing, EOFError on a clean close.
        `started` is called once the frame's prefix is in: from then on the peer is not idle
        but sending (a server that stops lets such a request arrive and answers it)."""
        prefix = await self._take(PREFIX.size, eof_ok=True)
        if prefix is None:
            raise EOFError
        if started is not None:
            started()
        header_len, payload_len = PREFIX.unpack(prefix)
        if header_len == 0 or header_len > self.limits.max_header:
            raise ProtocolError(f"header length {header_len} out of bounds")
        if payload_len > self.limits.max_payload:
            raise ProtocolError(f"payload length {payload_len} out of bounds")
        raw = await self._take(header_len)
        assert raw is not None
        header = unpack_header(raw, self.limits)
        payload = PAYLOADS.take(payload_len) if payload_len else bytearray()
        if payload_len:
            await self._receive_into(memoryview(payload))
        return header, payload

    async def _take(self, size: int, eof_ok: bool = False) -> bytearray | None:
        """The next `size` bytes, read in gulps of up to READ_SIZE so that a small frame (the
        prefix, the header and a small payload) costs one receive, not three: each receive is
        a trip through trio's scheduler. None on a clean close before the first byte."""
        if size > READ_SIZE:  # a big header: straight into its own buffer
            out = bytearray(size)
            got = await self._receive_into(memoryview(out), eof_ok=eof_ok)
            return out if got else None
        while len(self._pending) < size:
            if self._sock is not None:
                n = await self._sock.recv_into(self._gulp)
                more: Buffer = memoryview(self._gulp)[:n]
            else:
                more = await self.stream.receive_some(READ_SIZE)
                n = len(more)
            if n == 0:
                if eof_ok and not self._pending:
                    return None
                raise ProtocolError(
                    f"connection closed mid-frame ({len(self._pending)}/{size} bytes)"
                )
            self._pending += more
        out = self._pending[:size]
        del self._pending[:size]
        return out

    async def _receive_into(self, view: memoryview, eof_ok: bool = False) -> int:
        """Fill `view`: first from what `_take` read ahead, then straight from the socket."""
        filled = 0
        if self._pending:
            take = min(len(self._pending), len(view))
            view[:take] = self._pending[:take]
            del self._pending[:take]
            filled = take
        while filled < len(view):
            if self._sock is not None:
                n = await self._sock.recv_into(view[filled:])
            else:
                data = await self.stream.receive_some(max(len(view) - filled, READ_SIZE))
                n = min(len(data), len(view) - filled)
                view[filled : filled + n] = data[:n]
                self._pending += data[n:]
            if n == 0:
                if eof_ok and filled == 0:
                    return 0
                raise ProtocolError(f"connection closed mid-frame ({filled}/{len(view)} bytes)")
            filled += n
        return filled

    async def aclose(self) -> None:
        with trio.move_on_after(1, shield=True):
            await self.stream.aclose()
