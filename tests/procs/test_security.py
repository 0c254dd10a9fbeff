"""Issue 5 on real processes: nobody without the secret gets in, handshakes cannot be
replayed, TLS works end to end, and trickling peers are dropped."""

from __future__ import annotations

import filecmp
import os
import socket
import struct
import subprocess
import time
from pathlib import Path

import msgpack
import pytest
import trio

from cluster import auth
from cluster import messages as m
from cluster.auth import Credentials
from cluster.errors import AuthFailed, Unavailable
from cluster.rpc import Connection
from tests.cluster_procs import BIN, ProcCluster
from tests.conftest import MakeCluster, random_file


def _frame(body: dict[str, object]) -> bytes:
    header: bytes = msgpack.packb(body)
    return struct.pack(">II", len(header), 0) + header


def _read_frame(sock: socket.socket) -> dict[str, object]:
    def exact(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    header_len, payload_len = struct.unpack(">II", exact(8))
    body: dict[str, object] = msgpack.unpackb(exact(header_len), raw=False)
    exact(payload_len)
    return body


def _connect(addr: str) -> socket.socket:
    host, port = addr.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=10)


def test_wrong_or_missing_secret_gets_nothing(cluster: ProcCluster, tmp_path: Path) -> None:
    data = random_file(tmp_path / "data", 100_000)
    cluster.dfs("put", str(data), "/data")
    chunk = cluster.stat("/data")["chunks"][0]
    wrong = tmp_path / "wrong"
    auth.new_secret(wrong)
    env = cluster.env
    for secret_env in ({"DFS_SECRET_FILE": str(wrong)}, {"DFS_SECRET_FILE": ""}):
        result = subprocess.run(
            [str(BIN / "dfs"), "--tracker", cluster.tracker_addr, "ls", "/"],
            env=env | secret_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode != 0
        assert "data" not in result.stdout
        assert "secret" in result.stderr or "authentication failed" in result.stderr

    async def read_chunk(secret: bytes) -> None:
        conn = await Connection.open(chunk["keepers"][0], "client", Credentials(secret))
        await conn.call(m.ReadChunk(chunk_id=chunk["id"], version=chunk["version"]))

    with pytest.raises(AuthFailed):
        trio.run(read_chunk, auth.load_secret(wrong))
    # Without any secret a raw client can only say hello: the chunk request closes the link.
    with _connect(chunk["keepers"][0]) as sock:
        sock.sendall(
            _frame(
                {"t": 1, "id": 1, "version": m.PROTOCOL_VERSION, "role": "x", "nonce": bytes(32)}
            )
        )
        assert _read_frame(sock)["t"] == int(m.MsgType.HELLO_REPLY)
        sock.sendall(
            _frame({"t": int(m.MsgType.READ_CHUNK), "id": 2, "chunk_id": chunk["id"], "version": 1})
        )
        assert _read_frame(sock)["t"] == int(m.MsgType.ERROR_REPLY)
        assert sock.recv(100) == b""
    # The right secret works, and the failures were logged with the peer's address.
    trio.run(read_chunk, auth.load_secret(cluster.secret_file))
    assert cluster.tracker is not None
    assert "failed to prove the cluster secret" in cluster.tracker.logs()
    assert "127.0.0.1:" in cluster.tracker.logs()
    assert auth.load_secret(cluster.secret_file).decode() not in cluster.logs()


def test_recorded_handshake_cannot_be_replayed(cluster: ProcCluster) -> None:
    secret = auth.load_secret(cluster.secret_file)
    client_nonce = auth.nonce()
    hello = _frame(
        {"t": 1, "id": 1, "version": m.PROTOCOL_VERSION, "role": "client", "nonce": client_nonce}
    )
    with _connect(cluster.tracker_addr) as sock:
        sock.sendall(hello)
        reply = _read_frame(sock)
        server_nonce = reply["nonce"]
        assert isinstance(server_nonce, bytes)
        proof = auth.proof(secret, b"client", client_nonce, server_nonce)
        recorded = _frame({"t": int(m.MsgType.AUTHENTICATE), "id": 2, "proof": proof})
        sock.sendall(recorded)
        assert _read_frame(sock)["t"] == int(m.MsgType.AUTHENTICATE_REPLY)
    with _connect(cluster.tracker_addr) as sock:
        sock.sendall(hello + recorded)  # the same bytes on a new connection
        second = _read_frame(sock)
        assert second["nonce"] != server_nonce
        answer = _read_frame(sock)
        assert answer["t"] == int(m.MsgType.ERROR_REPLY)
        assert sock.recv(100) == b""


def test_servers_refuse_an_open_secret_file(cluster: ProcCluster, tmp_path: Path) -> None:
    made = tmp_path / "made"
    result = subprocess.run(
        [str(BIN / "dfs"), "secret", "new", str(made)], capture_output=True, timeout=30
    )
    assert result.returncode == 0
    assert made.stat().st_mode & 0o777 == 0o600
    os.chmod(made, 0o640)
    refused = subprocess.run(
        [str(BIN / "dfs-tracker"), "--listen", "127.0.0.1:0", "--data", str(tmp_path / "t"),
         "--secret-file", str(made)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert refused.returncode == 2
    assert "readable by group or others" in refused.stderr
    missing = subprocess.run(
        [str(BIN / "dfs-keeper"), "--listen", "127.0.0.1:0", "--data", str(tmp_path / "k"),
         "--tracker", cluster.tracker_addr],
        capture_output=True, text=True, timeout=30, env=cluster.env | {"DFS_SECRET_FILE": ""},
    )  # fmt: skip
    assert missing.returncode == 2
    assert "no cluster secret" in missing.stderr


def make_tls_files(directory: Path) -> dict[str, str]:
    """A CA and a server certificate for 127.0.0.1, made with the openssl command."""

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    ca_key, ca = directory / "ca.key", directory / "ca.pem"
    key, csr, cert = directory / "server.key", directory / "server.csr", directory / "server.pem"
    ext = directory / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        str(ca_key),
        "-out",
        str(ca),
        "-days",
        "2",
        "-subj",
        "/CN=dfs test CA",
    )
    run(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        str(key),
        "-out",
        str(csr),
        "-subj",
        "/CN=127.0.0.1",
    )
    run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
        "-out", str(cert), "-days", "2", "-extfile", str(ext))  # fmt: skip
    return {"DFS_TLS_CA": str(ca), "DFS_TLS_CERT": str(cert), "DFS_TLS_KEY": str(key)}


def test_tls_round_trip_and_plain_clients_get_nothing(
    make_cluster: MakeCluster, tmp_path: Path
) -> None:
    tls_dir = tmp_path / "tls"
    tls_dir.mkdir()
    tls_env = make_tls_files(tls_dir)
    cluster = make_cluster(keepers=2, replication=2, env=tls_env)
    data = random_file(tmp_path / "data", 9 << 20)
    cluster.dfs("put", str(data), "/data")
    cluster.dfs("get", "/data", str(tmp_path / "out"))
    assert filecmp.cmp(data, tmp_path / "out", shallow=False)
    for addr in (cluster.tracker_addr, cluster.keepers[0].addr):
        with _connect(addr) as sock:
            sock.sendall(
                _frame(
                    {
                        "t": 1,
                        "id": 1,
                        "version": m.PROTOCOL_VERSION,
                        "role": "x",
                        "nonce": bytes(32),
                    }
                )
            )
            received = b""
            try:
                while chunk := sock.recv(4096):
                    received += chunk
            except ConnectionResetError:
                pass
            assert b"nonce" not in received  # only TLS alert bytes, never a protocol reply
    # A client that trusts a different CA refuses the servers.
    other = tmp_path / "other"
    other.mkdir()
    wrong_ca = make_tls_files(other)["DFS_TLS_CA"]
    refused = cluster.dfs("--tls-ca", wrong_ca, "--retry-window-s", "1", "ls", "/", check=False)
    assert refused.returncode != 0


def test_trickling_connections_are_dropped(cluster: ProcCluster, tmp_path: Path) -> None:
    """Slowloris: 200 connections sending a byte a second hold nothing for long."""
    hello = _frame(
        {"t": 1, "id": 1, "version": m.PROTOCOL_VERSION, "role": "x", "nonce": bytes(32)}
    )
    socks = []
    targets = [cluster.tracker_addr, cluster.keepers[0].addr]
    for i in range(200):
        sock = _connect(targets[i % 2])
        sock.setblocking(False)
        socks.append(sock)
    data = random_file(tmp_path / "data", 3 << 20)
    started = time.monotonic()
    closed: set[int] = set()
    put_done = False
    try:
        while len(closed) < len(socks) and time.monotonic() - started < 40:
            for i, sock in enumerate(socks):
                if i in closed:
                    continue
                try:
                    sock.send(hello[int(time.monotonic() - started) % len(hello) :][:1])
                    if sock.recv(1) == b"":
                        closed.add(i)
                except BlockingIOError:
                    pass
                except OSError:
                    closed.add(i)
            if not put_done:
                cluster.dfs("put", str(data), "/data")
                cluster.dfs("get", "/data", str(tmp_path / "out"))
                assert filecmp.cmp(data, tmp_path / "out", shallow=False)
                put_done = True
            time.sleep(1)
    finally:
        for sock in socks:
            sock.close()
    assert put_done
    assert len(closed) == len(socks), f"{len(socks) - len(closed)} trickling connections survived"


def test_unreachable_and_unauthenticated_are_distinct_errors(tmp_path: Path) -> None:
    async def go() -> None:
        secret = auth.nonce()
        with pytest.raises(Unavailable):
            await Connection.open("127.0.0.1:1", "client", Credentials(secret))

    trio.run(go)
