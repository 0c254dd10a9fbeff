"""Issue 2's promises on real tracker and keeper processes: round trips, keeper loss, tracker
restart, corruption, parallel puts and hostile input."""

from __future__ import annotations

import filecmp
import hashlib
import os
import socket
import stat
import struct
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgpack
import trio

from cluster import messages as m
from tests.cluster_procs import BIN, ProcCluster, chunk_files, free_port, scrape, wait_until
from tests.conftest import MakeCluster, random_file

KiB = 1 << 10
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


def test_corrupt_copy_is_skipped_and_reported(make_cluster: MakeCluster, tmp_path: Path) -> None:
    # No scrubber: it would find the corrupt copy and drop it before the read does.
    cluster = make_cluster(keeper_args=["--scrub-rate-mb-s", "0"])
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


def test_put_and_get_keep_several_transfers_in_flight(
    make_cluster: MakeCluster, tmp_path: Path
) -> None:
    """The client moves chunks in parallel: the keeper sees more than one transfer at once.

    One keeper with replication 1, so every transfer of the client reaches it. With
    `--transfers 1` first: the gauge counts exactly the client's transfers, one at a time."""
    port = free_port()
    cluster = make_cluster(keepers=0, replication=1, chunk_size=256 * KiB)
    cluster.add_keeper(args=["--metrics", f"127.0.0.1:{port}"])
    cluster.wait_alive(1)
    data = random_file(tmp_path / "data", 32 * 256 * KiB + 123)  # 33 chunks

    def peaks() -> dict[str, float]:
        metrics = scrape(port)
        return {
            kind: metrics[f'dfs_keeper_transfers_in_flight_peak{{type="{kind}"}}']
            for kind in ("PutChunk", "ReadChunk")
        }

    cluster.dfs("--transfers", "1", "put", str(data), "/serial")
    cluster.dfs("--transfers", "1", "get", "/serial", str(tmp_path / "serial"))
    assert filecmp.cmp(data, tmp_path / "serial", shallow=False)
    assert peaks() == {"PutChunk": 1, "ReadChunk": 1}

    cluster.dfs("put", str(data), "/parallel")
    assert peaks()["PutChunk"] >= 2, "dfs put moved one chunk at a time"
    cluster.dfs("get", "/parallel", str(tmp_path / "parallel"))
    assert peaks()["ReadChunk"] >= 2, "dfs get moved one chunk at a time"
    assert filecmp.cmp(data, tmp_path / "parallel", shallow=False)
    assert len(cluster.stat("/parallel")["chunks"]) == 33
    print(f"transfers in flight at most: {peaks()}")


def tree(cluster: ProcCluster, tmp: Path) -> dict[str, tuple[int, str]]:
    """Every path in the cluster: (inode, "dir" or the sha256 of the file's bytes), read
    through the client library."""

    async def walk() -> dict[str, tuple[int, str]]:
        found: dict[str, tuple[int, str]] = {}
        async with cluster.client() as client:

            async def visit(path: str) -> None:
                for entry in await client.list_dir(path or "/"):
                    child = f"{path}/{entry.name.decode()}"
                    if entry.attr.is_dir:
                        found[child] = (entry.attr.ino, "dir")
                        await visit(child)
                    else:
                        await client.download(child, tmp / "tree-file")
                        digest = hashlib.sha256((tmp / "tree-file").read_bytes()).hexdigest()
                        found[child] = (entry.attr.ino, digest)

            await visit("")
        return found

    return trio.run(walk)


def test_mv_renames_and_moves_files_and_directories(
    make_cluster: MakeCluster, tmp_path: Path
) -> None:
    cluster = make_cluster(keepers=2, replication=2, chunk_size=1 * MiB)
    a = random_file(tmp_path / "a", 2 * MiB + 5)
    b = random_file(tmp_path / "b", 1 * MiB + 7)
    cluster.dfs("mkdir", "/d1/sub")
    cluster.dfs("mkdir", "/d2")
    cluster.dfs("put", str(a), "/a")
    cluster.dfs("put", str(b), "/d1/sub/b")
    start = tree(cluster, tmp_path)
    file_a, file_b, d1, sub, d2 = (start[p] for p in ("/a", "/d1/sub/b", "/d1", "/d1/sub", "/d2"))
    assert file_a[1] == hashlib.sha256(a.read_bytes()).hexdigest()

    def moved(src: str, dst: str, expected: dict[str, tuple[int, str]]) -> None:
        cluster.dfs("mv", src, dst)
        assert tree(cluster, tmp_path) == expected, f"dfs mv {src} {dst}"

    # A file: renamed in its directory, moved across directories under a new name, then
    # into a directory keeping its name. Same inode, same bytes, nothing else touched.
    moved("/a", "/a2", {"/a2": file_a, "/d1": d1, "/d1/sub": sub, "/d1/sub/b": file_b, "/d2": d2})
    moved(
        "/a2", "/d2/x", {"/d2/x": file_a, "/d1": d1, "/d1/sub": sub, "/d1/sub/b": file_b, "/d2": d2}
    )
    moved(
        "/d2/x", "/d1", {"/d1/x": file_a, "/d1": d1, "/d1/sub": sub, "/d1/sub/b": file_b, "/d2": d2}
    )
    # A directory, with what is in it: renamed, then moved into another directory.
    moved(
        "/d1", "/d3", {"/d3/x": file_a, "/d3": d1, "/d3/sub": sub, "/d3/sub/b": file_b, "/d2": d2}
    )
    moved(
        "/d3",
        "/d2/",
        {"/d2/d3/x": file_a, "/d2/d3": d1, "/d2/d3/sub": sub, "/d2/d3/sub/b": file_b, "/d2": d2},
    )
    assert cluster.stat("/d2")["nlink"] == 3  # its name, its ".", and d3's ".."
    assert cluster.stat("/")["nlink"] == 3

    # Onto an existing file: that file is replaced, and its chunks are freed.
    replaced = {c["id"] for c in cluster.stat("/d2/d3/sub/b")["chunks"]}
    moved(
        "/d2/d3/x",
        "/d2/d3/sub/b",
        {"/d2/d3/sub/b": file_a, "/d2/d3": d1, "/d2/d3/sub": sub, "/d2": d2},
    )

    def freed() -> bool:
        held = {
            int(p.name.split("_")[1], 16) for k in cluster.keepers for p in chunk_files(k.data_dir)
        }
        return not held & replaced

    wait_until(freed, 30, "the replaced file's chunks to be deleted")

    # Errors: one line each, exit 1, nothing changed.
    cluster.dfs("mkdir", "/d2/d3/sub/dir/b")
    before = tree(cluster, tmp_path)
    failures = {
        ("/missing", "/y"): "no such source",
        ("/d2/d3/sub/b", "/nowhere/y"): "no such target directory",
        ("/d2", "/d2/d3/sub/inside"): "a directory into itself",
        ("/d2/d3/sub", "/d2/d3/sub/b"): "a directory onto a file",
        ("/d2/d3/sub/b", "/d2/d3/sub/dir"): "a file onto a directory (dir/b)",
        ("/", "/d2/root"): "the root",
    }
    for (src, dst), what in failures.items():
        result = cluster.dfs("mv", src, dst, check=False)
        assert result.returncode == 1, (what, result.stdout, result.stderr)
        assert result.stderr.count("\n") == 1, (what, result.stderr)
        assert result.stderr.startswith("dfs mv: "), (what, result.stderr)
        assert "Traceback" not in result.stderr
    assert tree(cluster, tmp_path) == before
