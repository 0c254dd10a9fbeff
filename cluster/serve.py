"""Server side of the protocol: accept, greet, dispatch, and never let one peer hurt the rest.

`serve()` runs the accept loop in its own nursery and reports the bound port through
`task_status`, so tests bind port 0. Each connection runs `_serve_connection`, which:
- wraps the stream in TLS when configured, then runs the mutual challenge-response of
  `auth.py` under a handshake timeout; nothing else is processed before it succeeds, and a
  failure is logged with the peer's address;
- reads each next frame under the idle timeout, so a silent or trickling peer is dropped;
- answers `Ping` itself and passes every other request to the handler;
- turns a `DfsError` into an `ErrorReply` for that request only;
- closes the connection, with a logged reason, on a `ProtocolError` or a broken stream.
An unexpected exception in a handler is logged with its traceback and closes that connection
only: the server keeps serving everyone else.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol

import trio

from cluster import auth, metrics, trace
from cluster import messages as m
from cluster.auth import Credentials
from cluster.errors import AuthFailed, DfsError, ProtocolError
from cluster.protocol import FileRegion, FrameStream, Limits, Payload, Unencodable

log = logging.getLogger(__name__)


class Handler(Protocol):
    async def handle(
        self, msg: m.Message, payload: bytearray, peer: str
    ) -> tuple[m.Message, Payload]:
        """Answer one request; raise DfsError to answer with an error."""
        ...


@dataclass(frozen=True, slots=True)
class ServeOptions:
    role: str
    credentials: Credentials
    idle_timeout_s: float = 60.0
    handshake_timeout_s: float = 10.0
    max_connections: int = 1024
    limits: Limits = field(default_factory=Limits)


def _peer_name(stream: trio.abc.Stream) -> str:
    sock = getattr(stream, "socket", None)
    try:
        host, port = sock.getpeername()[:2] if sock is not None else ("?", 0)
    except OSError:
        return "?"
    return f"{host}:{port}"


class Server:
    """One listening server. `run` serves until cancelled or until `shutdown()`, which stops
    accepting, lets requests in flight finish (up to `grace_s`) and closes idle links."""

    def __init__(self, handler: Handler, options: ServeOptions, grace_s: float = 10.0) -> None:
        self.handler = handler
        self.options = options
        self.grace_s = grace_s
        self.stopping = trio.Event()
        self.finished = trio.Event()
        self.slots = trio.CapacityLimiter(options.max_connections)
        # Scopes of connections waiting for their next request: shutdown cancels these only.
        self.idle_scopes: set[trio.CancelScope] = set()
        # Requests being answered, by message type (from decoding to the reply sent, payload
        # included), and the most there have been at once: a keeper's transfers in flight.
        self.in_flight: dict[str, int] = {}
        self.peak_in_flight: dict[str, int] = {}
        # Connections open now, by the role the peer gave in its Hello ("client", "keeper").
        self.connected: dict[str, int] = {}

    @contextmanager
    def answering(self, name: str) -> Iterator[None]:
        """Count one request of type `name` in flight while the block runs."""
        now = self.in_flight[name] = self.in_flight.get(name, 0) + 1
        self.peak_in_flight[name] = max(now, self.peak_in_flight.get(name, 0))
        try:
            yield
        finally:
            self.in_flight[name] -= 1

    def in_flight_summary(self) -> str:
        """The requests being answered now, as "2 PutChunk, 1 ReadChunk" ("none")."""
        busy = [f"{n} {name}" for name, n in sorted(self.in_flight.items()) if n]
        return ", ".join(busy) or "none"

    def shutdown(self) -> None:
        self.stopping.set()
        for scope in self.idle_scopes:
            scope.cancel()

    async def run(
        self, host: str, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve; `task_status.started(port)` once accepting (bind port 0 for any)."""
        listeners = await trio.open_tcp_listeners(port, host=host)
        bound = listeners[0].socket.getsockname()[1]
        log.info("%s listening on %s:%d", self.options.role, host, bound)
        try:
            await self._serve(listeners, bound, task_status)
        finally:
            self.finished.set()

    async def _serve(
        self, listeners: list[trio.SocketListener], bound: int, task_status: trio.TaskStatus[int]
    ) -> None:
        async with trio.open_nursery() as connections:
            async with trio.open_nursery() as accepting:
                accepting.start_soon(
                    partial(
                        trio.serve_listeners, self._guarded, listeners, handler_nursery=connections
                    )
                )
                task_status.started(bound)
                await self.stopping.wait()
                accepting.cancel_scope.cancel()
            log.info("%s: no longer accepting; finishing requests in flight", self.options.role)
            connections.cancel_scope.deadline = trio.current_time() + self.grace_s

    async def _guarded(self, stream: trio.SocketStream) -> None:
        peer = _peer_name(stream)
        if self.slots.available_tokens == 0:
            log.warning(
                "%s: refusing %s, %d connections open",
                self.options.role,
                peer,
                self.slots.total_tokens,
            )
            await stream.aclose()
            return
        async with self.slots:
            await _serve_connection(self, stream, peer)


async def serve(
    handler: Handler,
    host: str,
    port: int,
    options: ServeOptions,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled (a `Server` without graceful shutdown)."""
    await Server(handler, options).run(host, port, task_status=task_status)


async def _handshake(frames: FrameStream, options: ServeOptions, peer: str) -> str:
    """TLS (when configured), Hello and the mutual proof of the cluster secret; returns the
    role the peer gave in its Hello."""
    credentials = options.credentials
    header, _ = await frames.receive()
    request_id, hello = m.decode(header)
    if not isinstance(hello, m.Hello):
        raise ProtocolError(f"expected Hello, got {hello.__class__.__name__}")
    if hello.version != m.PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {hello.version} is not supported")
    if len(hello.nonce) != auth.NONCE_BYTES:
        raise ProtocolError("bad nonce")
    server_nonce = auth.nonce()
    reply = m.HelloReply(version=m.PROTOCOL_VERSION, role=options.role, nonce=server_nonce)
    await frames.send(reply.to_wire(request_id))
    header, _ = await frames.receive()
    request_id, answer = m.decode(header)
    expected = auth.proof(credentials.secret, b"client", hello.nonce, server_nonce)
    if not isinstance(answer, m.Authenticate) or not auth.check(expected, answer.proof):
        failed = m.ErrorReply(code=AuthFailed.code, message="authentication failed")
        await frames.send(failed.to_wire(request_id))
        raise AuthFailed(f"{hello.role} at {peer} failed to prove the cluster secret")
    proof = auth.proof(credentials.secret, b"server", hello.nonce, server_nonce)
    await frames.send(m.AuthenticateReply(proof=proof).to_wire(request_id))
    return hello.role


async def _serve_connection(server: Server, stream: trio.abc.Stream, peer: str) -> None:
    options = server.options
    role = options.role
    peer_role: str | None = None  # set once the peer has proved the secret
    try:
        if options.credentials.tls_server is not None:
            stream = trio.SSLStream(stream, options.credentials.tls_server, server_side=True)
        frames = FrameStream(stream, options.limits)
        with trio.move_on_after(options.handshake_timeout_s) as handshake:
            hello_role = await _handshake(frames, options, peer)
        if handshake.cancelled_caught:
            raise ProtocolError("no handshake in time")
        peer_role = hello_role
        server.connected[peer_role] = server.connected.get(peer_role, 0) + 1
        while not server.stopping.is_set():
            with trio.CancelScope() as idle:
                server.idle_scopes.add(idle)
                idle.deadline = trio.current_time() + options.idle_timeout_s
                try:
                    # A frame that has begun to arrive is a request in flight, not idleness.
                    header, payload = await frames.receive(
                        started=partial(server.idle_scopes.discard, idle)
                    )
                finally:
                    server.idle_scopes.discard(idle)
            if idle.cancelled_caught:
                log.debug("closing idle connection from %s", peer)
                return
            request_id, request = m.decode(header)
            name = type(request).__name__
            started = time.perf_counter()
            out_payload: Payload = b""
            with server.answering(name):
                if isinstance(request, m.Ping):
                    answer: m.Message = m.Pong()
                else:
                    try:
                        with trace.span(f"serve {name}"):
                            answer, out_payload = await server.handler.handle(
                                request, payload, peer
                            )
                    except DfsError as exc:
                        answer = m.ErrorReply(code=exc.code, message=exc.message)
                        metrics.REQUEST_ERRORS.labels(role, name).inc()
                    except Exception as exc:
                        # A bug, not the peer's fault: answer this request with EIO and go on.
                        log.exception("%s from %s failed", name, peer)
                        answer = m.ErrorReply(code=DfsError.code, message=f"internal error: {exc}")
                        metrics.REQUEST_ERRORS.labels(role, name).inc()
                try:
                    try:
                        await frames.send(answer.to_wire(request_id), out_payload)
                    except Unencodable as exc:  # nothing was sent: this request fails, not the link
                        log.error("%s from %s: the reply would not encode: %s", name, peer, exc)
                        failed = m.ErrorReply(code=DfsError.code, message="reply not encodable")
                        await frames.send(failed.to_wire(request_id))
                finally:
                    if isinstance(out_payload, FileRegion):
                        out_payload.close()
            metrics.REQUEST_SECONDS.labels(role, name).observe(time.perf_counter() - started)
            metrics.BYTES_RECEIVED.labels(role).inc(len(payload))
            metrics.BYTES_SENT.labels(role).inc(len(out_payload))
    except EOFError:
        log.debug("%s closed the connection", peer)
    except AuthFailed as exc:
        log.warning("closing connection from %s: %s", peer, exc.message)
        metrics.CONNECTIONS_CLOSED.labels(role).inc()
    except ProtocolError as exc:
        log.warning("closing connection from %s: %s", peer, exc)
        metrics.CONNECTIONS_CLOSED.labels(role).inc()
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        log.info("connection from %s lost: %s", peer, exc)
    except Exception:
        log.exception("closing connection from %s after an unexpected error", peer)
    finally:
        if peer_role is not None:
            server.connected[peer_role] -= 1
        with trio.move_on_after(1, shield=True):
            await stream.aclose()
