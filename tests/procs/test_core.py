"""Issue 2's promises on real tracker and keeper processes: round trips, keeper loss, tracker
restart, corruption, parallel puts and hostile input."""

from __future__ import annotations

import filecmp
import os
import socket
import stat
import struct
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgpack

from cluster import messages as m
from tests.cluster_procs import BIN, ProcCluster, chunk_files
from tests.conftest import MakeCluster, random_file

MiB = 1 << 20


def put_get(cluster: ProcCluster, local: Path, remote: str, tmp: Path) -> Path:
    cluster.dfs("put", str(local), remote)
    out = tmp / (local.name + ".out")
    cluster.dfs("get", remote, str(out))
    return out


def test_round_trip_three_copies_on_distinct_keepers(cluster: ProcCluster, tmp_path: Path) -> None:
    big = random_file(tmp_path / "big", 200 * MiB)
    empty = random_file(tmp_path / "empty", 0)
    odd = random_file(tmp_path / "odd", cluster.chunk_size + 1)
    for local in (big, empty, odd):
        out = put_get(cluster, local, f"/{local.name}", tmp_path)
        assert filecmp.cmp(local, out, shallow=False), local.name

    keeper_addrs = {k.addr for k in cluster.keepers}
    for name, expected_chunks in (("big", 25), ("empty", 0), ("odd", 2)):
        info = cluster.stat(f"/{name}")
        assert len(info["chunks"]) == expected_chunks
        for chunk in info["chunks"]:
            assert len(set(chunk["keepers"])) == 3
            assert set(chunk["keepers"]) <= keeper_addrs
    # Every keeper really has every chunk on its disk.
    for keeper in cluster.keepers:
        assert len(chunk_files(keeper.data_dir)) == 27


def test_get_survives_a_killed_keeper(cluster: ProcCluster, tmp_path: Path) -> None:
    data = random_file(tmp_path / "data", 40 * MiB + 123)
    cluster.dfs("put", str(data), "/data")
    cluster.keepers[0].kill()
    out = tmp_path / "out"
    cluster.dfs("get", "/data", str(out))
    assert filecmp.cmp(data, out, shallow=False)


def test_tracker_sigkill_and_restart_keeps_acknowledged_files(
    cluster: ProcCluster, tmp_path: Path
) -> None:
    files = {f"/f{i}": random_file(tmp_path / f"f{i}", i * 3 * MiB + i) for i in range(5)}
    cluster.dfs("mkdir", "/dir/sub")
    for remote, local in files.items():
        cluster.dfs("put", str(local), remote)
    cluster.dfs("put", str(files["/f1"]), "/dir/sub/nested")
    assert cluster.tracker is not None
    cluster.restart(cluster.tracker)  # SIGKILL, then the same data dir and port
    listing = cluster.dfs("ls", "/").stdout
    for remote in files:
        assert remote.lstrip("/") in listing
    assert "nested" in cluster.dfs("ls", "/dir/sub").stdout
    # Keepers re-register on their own; reads work once they have.
    cluster.wait_alive(3)
    for remote, local in [*files.items(), ("/dir/sub/nested", files["/f1"])]:
        out = tmp_path / "out"
        cluster.dfs("get", remote, str(out))
        assert filecmp.cmp(local, out, shallow=False), remote


def test_corrupt_copy_is_skipped_and_reported(cluster: ProcCluster, tmp_path: Path) -> None:
    data = random_file(tmp_path / "data", 3 * MiB)
    cluster.dfs("put", str(data), "/data")
    [victim] = chunk_files(cluster.keepers[0].data_dir)
    raw = bytearray(victim.read_bytes())
    raw[-1000] ^= 0xFF  # a data byte, not the header
    victim.write_bytes(bytes(raw))
    # Read until the corrupt copy has been tried: reads rotate over copies, so make the
    # corrupted keeper the only one that is up for one read, then bring the others back.
    for other in cluster.keepers[1:]:
        other.signal(19)  # SIGSTOP
    try:
        failed = cluster.dfs(
            "--io-timeout-s", "2", "get", "/data", str(tmp_path / "x"), check=False
        )
    finally:
        for other in cluster.keepers[1:]:
            other.signal(18)  # SIGCONT
    assert failed.returncode != 0, "a corrupt copy must never be returned"
    out = tmp_path / "out"
    cluster.dfs("get", "/data", str(out))
    assert filecmp.cmp(data, out, shallow=False)
    assert cluster.tracker is not None
    assert "bad copy of chunk" in cluster.tracker.logs()


def test_eight_parallel_puts(cluster: ProcCluster, tmp_path: Path) -> None:
    files = [random_file(tmp_path / f"p{i}", (i + 1) * 2 * MiB + 7 * i) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda f: cluster.dfs("put", str(f), f"/{f.name}"), files))
    for local in files:
        out = tmp_path / (local.name + ".out")
        cluster.dfs("get", f"/{local.name}", str(out))
        assert filecmp.cmp(local, out, shallow=False)


def _send_raw(addr: str, payload: bytes, shutdown: bool = False) -> bytes:
    """Send bytes on a fresh connection; return what the server sent back before closing."""
    host, port = addr.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=15) as sock:
        sock.sendall(payload)
        if shutdown:
            sock.shutdown(socket.SHUT_WR)
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass  # closed with our bytes unread: closed all the same
        return received


def _frame(body: dict[str, object]) -> bytes:
    header: bytes = msgpack.packb(body)
    return struct.pack(">II", len(header), 0) + header


def test_bad_input_closes_only_that_connection(make_cluster: MakeCluster, tmp_path: Path) -> None:
    cluster = make_cluster(keepers=2, replication=2)
    hello = _frame(
        {"t": 1, "id": 1, "version": m.PROTOCOL_VERSION, "role": "client", "nonce": bytes(32)}
    )
    attacks = {
        "garbage": b"\x13\x37" * 5000,
        "huge length": struct.pack(">II", 0xFFFFFFF0, 0xFFFFFFF0),
        "truncated": struct.pack(">II", 100, 0) + b"\x81",
        "unknown type": hello + _frame({"t": 9999, "id": 2}),
        "not a map": struct.pack(">II", 1, 0) + b"\x01",
        "wrong field type": hello + _frame({"t": 21, "id": 2, "ino": "root"}),
    }
    targets = [cluster.tracker_addr, cluster.keepers[0].addr]
    for target in targets:
        for name, attack in attacks.items():
            received = _send_raw(target, attack, shutdown=name == "truncated")
            # At most the reply to the hello comes back, then the connection is closed.
            if attack.startswith(hello):
                (header_len, payload_len) = struct.unpack(">II", received[:8])
                assert len(received) == 8 + header_len + payload_len, name
            else:
                assert received == b"", name
    tracker_log = cluster.tracker.logs() if cluster.tracker else ""
    assert "closing connection from" in tracker_log
    assert "unknown message type" in tracker_log
    # Everyone else is still served.
    data = random_file(tmp_path / "after", 5 * MiB)
    out = put_get(cluster, data, "/after", tmp_path)
    assert filecmp.cmp(data, out, shallow=False)
    assert all(k.running for k in cluster.keepers)
    assert cluster.tracker
    assert cluster.tracker.running


def test_cli_errors_are_one_line(cluster: ProcCluster, tmp_path: Path) -> None:
    missing = cluster.dfs("get", "/no/such/file", str(tmp_path / "x"), check=False)
    assert missing.returncode == 1
    assert missing.stderr.count("\n") == 1
    assert "Traceback" not in missing.stderr
    unreachable = subprocess.run(
        [str(BIN / "dfs"), "--tracker", "127.0.0.1:1", "--retry-window-s", "1", "ls", "/"],
        capture_output=True, text=True, timeout=60, env=cluster.env,
    )  # fmt: skip
    assert unreachable.returncode == 1
    assert "unreachable" in unreachable.stderr
    assert "Traceback" not in unreachable.stderr


def test_get_into_a_stream_writes_into_it(make_cluster: MakeCluster, tmp_path: Path) -> None:
    """`dfs get` to "-", a FIFO or /dev/null writes the bytes in order into it; renaming a
    downloaded copy over /dev/null (as root) would have replaced the device."""
    cluster = make_cluster(keepers=2, replication=2, chunk_size=1 * MiB)
    data = random_file(tmp_path / "data", 5 * MiB + 123)
    cluster.dfs("put", str(data), "/f")
    expected = data.read_bytes()

    out = subprocess.run(
        [str(BIN / "dfs"), "--tracker", cluster.tracker_addr, "get", "/f", "-"],
        capture_output=True,
        env=cluster.env,
        timeout=120,
        check=True,
    )
    assert out.stdout == expected

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)

    def read_fifo() -> bytes:
        with open(fifo, "rb") as pipe:
            return pipe.read()

    with ThreadPoolExecutor(1) as pool:
        reader = pool.submit(read_fifo)
        cluster.dfs("get", "/f", str(fifo))
        assert reader.result(timeout=120) == expected
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)

    before = os.stat("/dev/null")
    cluster.dfs("get", "/f", "/dev/null")
    after = os.stat("/dev/null")
    assert stat.S_ISCHR(after.st_mode)
    assert (after.st_ino, after.st_rdev) == (before.st_ino, before.st_rdev)
