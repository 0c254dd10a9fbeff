"""Client side of the protocol: connections, request/reply matching and a pool per address.

A `Connection` carries one request at a time (callers that want parallelism take several
connections from the pool, which is what parallel chunk transfers do). A call that fails or is
cancelled half-way leaves the stream in an unknown state, so the connection is marked broken
and never reused. Every failure to reach or understand a peer surfaces as `ConnectionLost`
(an `Unavailable`), the one error callers retry or fail over on; a `DfsError` answered by the
peer is raised as itself, so "the tracker is down" and "no keeper is up" stay apart.
"""

from __future__ import annotations

import itertools
import logging
import select
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import trio

from cluster import auth, trace
from cluster import messages as m
from cluster.auth import Credentials
from cluster.errors import AuthFailed, ConnectionLost, ProtocolError, error_from_wire
from cluster.protocol import Buffer, FrameStream

log = logging.getLogger(__name__)

R = TypeVar("R", bound=m.Message)

CONNECT_TIMEOUT_S = 5.0
# A pooled connection idle for longer than this is dropped rather than reused: servers close
# idle links after their idle timeout (60 s by default), and a reply must never be lost to that.
POOL_IDLE_S = 20.0
POOL_KEEP_PER_ADDR = 16

_request_ids = itertools.count(1)


def split_addr(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"not HOST:PORT: {addr!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


class Connection:
    def __init__(self, frames: FrameStream, addr: str) -> None:
        self.frames = frames
        self.addr = addr
        self.broken = False
        self.last_used = trio.current_time()
        self._lock = trio.Lock()

    @classmethod
    async def open(cls, addr: str, role: str, credentials: Credentials) -> Connection:
        """Connect, wrap in TLS when configured, and run the mutual handshake."""
        try:
            host, port = split_addr(addr)
        except ValueError as exc:
            raise ConnectionLost(str(exc)) from None
        try:
            with trio.fail_after(CONNECT_TIMEOUT_S):
                stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
        except (OSError, trio.TooSlowError) as exc:
            raise ConnectionLost(f"cannot connect to {addr}: {exc or 'timeout'}") from None
        if credentials.tls_client is not None:
            stream = trio.SSLStream(stream, credentials.tls_client, server_hostname=host)
        conn = cls(FrameStream(stream), addr)
        try:
            with trio.fail_after(CONNECT_TIMEOUT_S):
                await conn._handshake(role, credentials)
        except trio.TooSlowError:
            await conn.aclose()
            raise ConnectionLost(f"{addr}: no answer to the handshake") from None
        except BaseException:
            await conn.aclose()
            raise
        return conn

    async def _handshake(self, role: str, credentials: Credentials) -> None:
        client_nonce = auth.nonce()
        hello = m.Hello(version=m.PROTOCOL_VERSION, role=role, nonce=client_nonce)
        reply, _ = await self.call(hello)
        if not isinstance(reply, m.HelloReply) or reply.version != m.PROTOCOL_VERSION:
            raise ConnectionLost(f"{self.addr}: incompatible peer")
        proof = auth.proof(credentials.secret, b"client", client_nonce, reply.nonce)
        answer, _ = await self.call(m.Authenticate(proof=proof))
        expected = auth.proof(credentials.secret, b"server", client_nonce, reply.nonce)
        if not isinstance(answer, m.AuthenticateReply) or not auth.check(expected, answer.proof):
            raise AuthFailed(f"{self.addr} could not prove it knows the cluster secret")

    async def call(self, request: m.Message, payload: Buffer = b"") -> tuple[m.Message, bytearray]:
        """Send one request and wait for its reply; raise the peer's DfsError if it failed."""
        reply, reply_payload = await self.exchange(request, payload)
        if isinstance(reply, m.ErrorReply):
            raise error_from_wire(reply.code, reply.message)
        return reply, reply_payload

    async def exchange(
        self, request: m.Message, payload: Buffer = b""
    ) -> tuple[m.Message, bytearray]:
        """Send one request and return its reply, an `ErrorReply` included: a request the
        peer refused leaves the connection as good as before."""
        if self.broken:
            raise ConnectionLost(f"{self.addr}: connection is broken")
        request_id = next(_request_ids)
        async with self._lock:
            try:
                with trace.span(f"call {type(request).__name__} {self.addr}"):
                    await self.frames.send(request.to_wire(request_id), payload)
                    header, reply_payload = await self.frames.receive()
                    reply_id, reply = m.decode(header)
            except BaseException as exc:
                self.broken = True
                if isinstance(exc, EOFError):
                    raise ConnectionLost(f"{self.addr}: connection closed by the peer") from None
                broken = ProtocolError | OSError | trio.BrokenResourceError | ssl.SSLError
                if isinstance(exc, broken):
                    raise ConnectionLost(f"{self.addr}: {exc}") from None
                raise
            finally:
                self.last_used = trio.current_time()
        if reply_id != request_id:
            self.broken = True
            raise ConnectionLost(f"{self.addr}: reply to another request")
        return reply, reply_payload

    async def aclose(self) -> None:
        self.broken = True
        await self.frames.aclose()


class ConnectionPool:
    """Idle connections by address. Callers borrow one per request (or per chunk transfer)."""

    def __init__(self, role: str, credentials: Credentials) -> None:
        self.role = role
        self.credentials = credentials
        self._idle: dict[str, list[Connection]] = {}
        self._closed = False

    @asynccontextmanager
    async def connection(self, addr: str) -> AsyncIterator[Connection]:
        conn = await self._take(addr)
        try:
            yield conn
        except BaseException:
            conn.broken = True
            raise
        finally:
            self._give_back(conn)

    async def call(
        self, addr: str, request: m.Message, response: type[R], payload: Buffer = b""
    ) -> tuple[R, bytearray]:
        """One request on a borrowed connection; the reply must be of type `response`.
        The peer's refusal (an ErrorReply: no such file, ...) is raised once the connection is
        back in the pool: it is still good, and closing it would cost the next call a new
        connection and handshake."""
        async with self.connection(addr) as conn:
            reply, data = await conn.exchange(request, payload)
        if isinstance(reply, m.ErrorReply):
            raise error_from_wire(reply.code, reply.message)
        if not isinstance(reply, response):
            raise ConnectionLost(f"{addr}: unexpected {reply.__class__.__name__}")
        return reply, data

    async def _take(self, addr: str) -> Connection:
        idle = self._idle.get(addr, [])
        now = trio.current_time()
        while idle:
            conn = idle.pop()
            if not conn.broken and now - conn.last_used < POOL_IDLE_S and not _peer_gone(conn):
                return conn
            await conn.aclose()
        return await Connection.open(addr, self.role, self.credentials)

    def _give_back(self, conn: Connection) -> None:
        if conn.broken or self._closed:
            conn.broken = True
            _close_later(conn)
            return
        idle = self._idle.setdefault(conn.addr, [])
        if len(idle) >= POOL_KEEP_PER_ADDR:
            _close_later(conn)
            return
        idle.append(conn)

    def drop(self, addr: str) -> None:
        """Forget every idle connection to `addr` (it died or restarted)."""
        for conn in self._idle.pop(addr, []):
            _close_later(conn)

    async def aclose(self) -> None:
        self._closed = True
        for conns in self._idle.values():
            for conn in conns:
                await conn.aclose()
        self._idle.clear()


def _socket(conn: Connection) -> Any:
    stream: object = conn.frames.stream
    while hasattr(stream, "transport_stream"):  # a TLS stream wraps the socket stream
        stream = stream.transport_stream
    return getattr(stream, "socket", None)


def _peer_gone(conn: Connection) -> bool:
    """Whether an idle connection's peer has closed it (it restarted, or timed us out): a
    request sent on it would fail, and a keeper that is alive again would look dead."""
    sock = _socket(conn)
    if sock is None:
        return False
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLRDHUP)
    return any(
        events & (select.POLLRDHUP | select.POLLHUP | select.POLLERR)
        for _, events in poller.poll(0)
    )


def _close_later(conn: Connection) -> None:
    """Close without awaiting: a closed socket needs no orderly goodbye, and the caller may be
    in a cancelled scope where awaiting would raise."""
    conn.broken = True
    sock = _socket(conn)
    if sock is not None:
        sock.close()


__all__ = ["Connection", "ConnectionPool", "split_addr"]
