"""Who may talk to the cluster: the shared secret, the handshake proofs, optional TLS.

Every connection starts with a mutual challenge-response on the cluster secret:

    client -> server  Hello(version, role, client nonce)
    server -> client  HelloReply(version, role, server nonce)
    client -> server  Authenticate(client proof)
    server -> client  AuthenticateReply(server proof), or ErrorReply(AuthFailed) and the
                      connection is closed with the peer's address logged

where each proof is HMAC-SHA256(secret, label | client nonce | server nonce) with a label per
side. Both nonces are fresh random bytes per connection, so a recorded exchange proves nothing
on a new connection (no replay), and the secret itself never crosses the wire or reaches a log.
The client checks the server's proof too: a server without the secret cannot impersonate one,
and a client without it never sees a server proof to study.

With TLS configured (`tls_cert`, `tls_key` on servers, `tls_ca` everywhere), the stream is
wrapped before the handshake; a plain client then gets nothing but a failed TLS handshake.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

NONCE_BYTES = 32
MIN_SECRET_BYTES = 16


class SecretError(Exception):
    """The secret file is missing, unreadable, too open or too short."""


def new_secret(path: Path) -> None:
    """Write a fresh random secret readable by its owner only; never overwrite one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise SecretError(f"{path} already exists; remove it first to replace the secret") from None
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_hex(32) + "\n")
        out.flush()
        os.fsync(out.fileno())


def load_secret(path: str | Path) -> bytes:
    file = Path(path)
    try:
        info = file.stat()
    except OSError as exc:
        raise SecretError(f"cannot read the cluster secret {file}: {exc.strerror}") from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SecretError(
            f"the cluster secret {file} is readable by group or others"
            f" (mode {stat.S_IMODE(info.st_mode):04o}); chmod 600 it"
        )
    value = file.read_bytes().strip()
    if len(value) < MIN_SECRET_BYTES:
        raise SecretError(f"the cluster secret {file} is shorter than {MIN_SECRET_BYTES} bytes")
    return value


def nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def proof(secret: bytes, side: bytes, client_nonce: bytes, server_nonce: bytes) -> bytes:
    return hmac.new(secret, side + b"\0" + client_nonce + server_nonce, hashlib.sha256).digest()


def check(expected: bytes, given: bytes) -> bool:
    return hmac.compare_digest(expected, given)


@dataclass(frozen=True)
class Credentials:
    """What a process needs to open and accept connections."""

    secret: bytes
    tls_server: ssl.SSLContext | None = None
    tls_client: ssl.SSLContext | None = None

    def __repr__(self) -> str:  # never print the secret
        return f"Credentials(tls={'on' if self.tls_client or self.tls_server else 'off'})"

    @classmethod
    def from_settings(cls, settings: dict[str, Any], server: bool = False) -> Credentials:
        if not settings.get("secret_file"):
            raise SecretError(
                "no cluster secret: create one with `dfs secret new PATH` and pass"
                " --secret-file PATH (or set secret_file in the config)"
            )
        secret = load_secret(settings["secret_file"])
        ca = settings.get("tls_ca") or None
        cert = settings.get("tls_cert") or None
        key = settings.get("tls_key") or None
        tls_client = tls_server = None
        if ca:
            tls_client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
        if server and (cert or key):
            if not (cert and key and ca):
                raise SecretError("TLS needs tls_cert, tls_key and tls_ca together")
            tls_server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls_server.load_cert_chain(cert, key)
        return cls(secret, tls_server, tls_client)
