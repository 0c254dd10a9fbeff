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
from dataclasses import dataclass, field
from typing import Protocol

import trio

from cluster import auth
from cluster import messages as m
from cluster.auth import Credentials
from cluster.errors import AuthFailed, DfsError, ProtocolError
from cluster.protocol import Buffer, FrameStream, Limits

log = logging.getLogger(__name__)


class Handler(Protocol):
    async def handle(
        self, msg: m.Message, payload: bytearray, peer: str
    ) -> tuple[m.Message, Buffer]:
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


async def serve(
    handler: Handler,
    host: str,
    port: int,
    options: ServeOptions,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled; `task_status.started(port)` once accepting."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[1]
    slots = trio.CapacityLimiter(options.max_connections)
    log.info("%s listening on %s:%d", options.role, host, bound)

    async def guarded(stream: trio.SocketStream) -> None:
        peer = _peer_name(stream)
        if slots.available_tokens == 0:
            log.warning(
                "%s: refusing %s, %d connections open", options.role, peer, slots.total_tokens
            )
            await stream.aclose()
            return
        async with slots:
            await _serve_connection(handler, stream, peer, options)

    task_status.started(bound)
    await trio.serve_listeners(guarded, listeners)


async def _handshake(frames: FrameStream, options: ServeOptions, peer: str) -> None:
    """TLS (when configured), Hello and the mutual proof of the cluster secret."""
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


async def _serve_connection(
    handler: Handler, stream: trio.abc.Stream, peer: str, options: ServeOptions
) -> None:
    try:
        if options.credentials.tls_server is not None:
            stream = trio.SSLStream(stream, options.credentials.tls_server, server_side=True)
        frames = FrameStream(stream, options.limits)
        with trio.move_on_after(options.handshake_timeout_s) as handshake:
            await _handshake(frames, options, peer)
        if handshake.cancelled_caught:
            raise ProtocolError("no handshake in time")
        while True:
            with trio.move_on_after(options.idle_timeout_s) as idle:
                header, payload = await frames.receive()
            if idle.cancelled_caught:
                log.debug("closing idle connection from %s", peer)
                return
            request_id, request = m.decode(header)
            out_payload: Buffer = b""
            if isinstance(request, m.Ping):
                answer: m.Message = m.Pong()
            else:
                try:
                    answer, out_payload = await handler.handle(request, payload, peer)
                except DfsError as exc:
                    answer = m.ErrorReply(code=exc.code, message=exc.message)
                except Exception as exc:
                    # A bug, not the peer's fault: answer this request with EIO and go on.
                    log.exception("%s from %s failed", type(request).__name__, peer)
                    answer = m.ErrorReply(code=DfsError.code, message=f"internal error: {exc}")
            await frames.send(answer.to_wire(request_id), out_payload)
    except EOFError:
        log.debug("%s closed the connection", peer)
    except AuthFailed as exc:
        log.warning("closing connection from %s: %s", peer, exc.message)
    except ProtocolError as exc:
        log.warning("closing connection from %s: %s", peer, exc)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        log.info("connection from %s lost: %s", peer, exc)
    except Exception:
        log.exception("closing connection from %s after an unexpected error", peer)
    finally:
        with trio.move_on_after(1, shield=True):
            await stream.aclose()
