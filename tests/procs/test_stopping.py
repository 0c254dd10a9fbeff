"""SIGTERM, the graceful stop, on real processes.

A keeper that is SIGTERMed tells the tracker it is leaving: no new chunk goes to it, nothing is
re-replicated until it has been away for `dead_after_s`, and it finishes the transfers it has
in flight before it exits. A SIGTERMed tracker finishes the requests (commits) in flight.
"""

from __future__ import annotations

import filecmp
import os
import re
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

import trio

from cluster import checksum
from cluster import messages as m
from cluster.auth import Credentials
from cluster.client import ChunkInfo, Placement
from cluster.protocol import PREFIX, pack_header
from cluster.rpc import Connection
from tests.cluster_procs import Daemon, ProcCluster, chunk_files, wait_until
from tests.conftest import MakeCluster, random_file

MiB = 1 << 20
CHUNK = 2 * MiB  # past FANOUT_MAX_BYTES: chunks go down the keeper pipeline
TiB = 1 << 40
GiB = 1 << 30


def chunk_ids(cluster: ProcCluster, remotes: list[str]) -> set[int]:
    return {c["id"] for remote in remotes for c in cluster.stat(remote)["chunks"]}


def files_of(keeper: Daemon, ids: set[int]) -> set[str]:
    """Names of `keeper`'s chunk files that belong to the chunks `ids`."""
    return {p.name for p in chunk_files(keeper.data_dir) if int(p.name.split("_")[1], 16) in ids}


async def placements(cluster: ProcCluster, count: int, name: str) -> list[Placement]:
    """Where the tracker places chunk 0 of `count` new files (asked at create, as the mount
    does): the tracker's answer itself, whether or not the keepers named are up."""
    found = []
    async with cluster.client() as client:
        for i in range(count):
            _, _, first, _ = await client.create(1, f"{name}{i}".encode(), 0o644)
            assert first is not None, "no keeper to place a chunk on"
            found.append(first)
    return found


def add_preferred_keeper(cluster: ProcCluster, tmp: Path) -> Daemon:
    """A keeper that placement puts first for every new chunk: it joins last, empty, beside
    keepers that already hold data, and has by far the most room (placement takes the least
    used keepers, by used/capacity, first)."""
    seed = random_file(tmp / "seed", 3 * CHUNK)
    cluster.dfs("put", str(seed), "/seed")
    wait_until(
        lambda: all(k["used_bytes"] > 0 for k in cluster.status()["keepers"]),
        30,
        "the keepers to report what they hold",
    )
    keeper = cluster.add_keeper(capacity=TiB)
    cluster.wait_alive(len(cluster.keepers))
    return keeper


def test_sigtermed_keeper_is_leaving_until_dead_after_s(
    make_cluster: MakeCluster, tmp_path: Path
) -> None:
    dead_after_s = 10.0
    cluster = make_cluster(
        keepers=3, replication=2, chunk_size=CHUNK, dead_after_s=dead_after_s, capacity=4 * GiB
    )
    others = list(cluster.keepers)
    # Placement puts a copy of every chunk on the victim while it may.
    victim = add_preferred_keeper(cluster, tmp_path)
    old = {f"/old{i}": random_file(tmp_path / f"old{i}", 2 * CHUNK + i * 1000) for i in range(2)}
    for remote, local in old.items():
        cluster.dfs("put", str(local), remote)
    old_ids = chunk_ids(cluster, list(old))
    for remote in old:
        for chunk in cluster.stat(remote)["chunks"]:
            assert victim.addr in chunk["keepers"], "placement did not prefer the victim"
    assert victim.addr in {p.keepers[0] for p in trio.run(placements, cluster, 1, "before")}
    on_disk = {k.name: files_of(k, old_ids) for k in others}

    sigterm_at = time.monotonic()
    victim.signal(signal.SIGTERM)
    assert victim.wait_exit(30) == 0
    # Its last heartbeat came at most heartbeat_s before the SIGTERM: until this deadline the
    # tracker must not think it dead.
    deadline = sigterm_at + dead_after_s - 1.5

    # Leaving: shown as such, given no new chunk, its copies still counted.
    assert cluster.keeper_state(victim) == "leaving"
    row = next(line for line in cluster.dfs("status").stdout.splitlines() if victim.addr in line)
    assert "leaving" in row.split()
    for placement in trio.run(placements, cluster, 5, "leaving"):
        assert victim.addr not in placement.keepers
        assert len(placement.keepers) == 2
    new = random_file(tmp_path / "new", 3 * CHUNK)
    put = cluster.dfs("--log-level", "WARNING", "put", str(new), "/new")
    assert victim.addr not in put.stderr, "the put was sent to the leaving keeper"
    for chunk in cluster.stat("/new")["chunks"]:
        assert victim.addr not in chunk["keepers"]
        assert len(chunk["keepers"]) == 2

    # Nothing re-replicated, for as long as we can look before dead_after_s.
    async def look() -> tuple[m.ClusterStatusReply, m.FsckReply, list[tuple[str, ...]]]:
        async with cluster.client() as client:
            status = await client.cluster_status()
            report = await client.fsck("/")
            holders = []
            for remote in old:
                chunks = await client.get_chunks((await client.resolve(remote)).ino)
                holders += [info.keepers for info in chunks.chunks.values()]
        return status, report, holders

    looks = 0
    while time.monotonic() < deadline:
        status, report, holders = trio.run(look)
        disks = {k.name: files_of(k, old_ids) for k in others}
        if time.monotonic() >= deadline:
            break  # looked too late to be sure the tracker may not act yet
        assert status.health["copies_done"] == 0
        assert status.health["copies_in_flight"] == 0
        assert (report.degraded, report.lost) == (0, 0), report
        assert all(victim.addr in h and len(h) == 2 for h in holders), holders
        assert disks == on_disk, "copies were made while the keeper was only leaving"
        assert [k["state"] for k in status.keepers if k["addr"] == victim.addr] == ["leaving"]
        looks += 1
        time.sleep(0.2)
    assert looks >= 2, "the machine was too slow to look before dead_after_s"
    print(f"{looks} looks while leaving, {time.monotonic() - sigterm_at:.1f}s after SIGTERM")

    # Away for longer than dead_after_s: dead, and its chunks are copied elsewhere.
    wait_until(lambda: cluster.keeper_state(victim) == "dead", 30, "the keeper to be dead")
    assert time.monotonic() - sigterm_at > dead_after_s - 1
    wait_until(
        lambda: cluster.status()["health"]["copies_done"] >= len(old_ids), 60, "re-replication"
    )
    wait_until(cluster.healthy, 60, "fsck to be healthy")
    print(f"re-replicated {time.monotonic() - sigterm_at:.1f}s after SIGTERM")
    live = {k.addr for k in others}
    for remote in old:
        for chunk in cluster.stat(remote)["chunks"]:
            assert len(set(chunk["keepers"]) & live) == 2, chunk
    for remote, local in [*old.items(), ("/new", new)]:
        cluster.dfs("get", remote, str(tmp_path / "out"))
        assert filecmp.cmp(local, tmp_path / "out", shallow=False), remote


def test_sigtermed_keeper_finishes_its_transfers_in_flight(
    make_cluster: MakeCluster, tmp_path: Path
) -> None:
    """SIGTERM reaches the first keeper of every pipeline while each of the put's chunks is in
    its hands (held up by a stopped keeper downstream). Each must be finished there, and its
    copy on that keeper must read back: dropped transfers would be re-sent elsewhere, and the
    put would still succeed, without those copies."""
    cluster = make_cluster(keepers=0, replication=3, chunk_size=CHUNK)
    # The pipeline of every chunk: victim, middle, last (placement order: least used first).
    middle = cluster.add_keeper(capacity=16 * GiB)  # the one that holds things up
    cluster.add_keeper(capacity=4 * GiB)
    cluster.wait_alive(2)
    victim = add_preferred_keeper(cluster, tmp_path)
    data = random_file(tmp_path / "data", 8 * CHUNK)  # as many chunks as transfers in flight
    # Once through, so that the victim has connections to the middle keeper: a new one would
    # give up on the stopped keeper's handshake after a few seconds.
    cluster.dfs("put", str(data), "/warm-up")
    held = len(chunk_files(victim.data_dir))
    middle.signal(signal.SIGSTOP)
    try:
        put = cluster.dfs_background("put", str(data), "/data")
        wait_until(
            lambda: len(chunk_files(victim.data_dir)) == held + 8,
            60,
            "the victim to hold every chunk",
        )
        victim.signal(signal.SIGTERM)
        wait_until(lambda: "finishing transfers in flight" in victim.logs(), 30, "the SIGTERM")
        time.sleep(1)  # the victim has stopped accepting; its transfers wait downstream
    finally:
        middle.signal(signal.SIGCONT)
    _, err = put.communicate(timeout=120)
    assert put.returncode == 0, err
    assert victim.wait_exit(60) == 0
    assert "finishing transfers in flight (8 PutChunk)" in victim.logs()

    chunks = cluster.stat("/data")["chunks"]
    assert len(chunks) == 8
    for chunk in chunks:
        assert victim.addr in chunk["keepers"], "a transfer in flight was dropped"
        assert len(set(chunk["keepers"])) == 3
    cluster.dfs("get", "/data", str(tmp_path / "out"))
    assert filecmp.cmp(data, tmp_path / "out", shallow=False)

    # The victim's copies read back, checked, from the victim alone once it is back.
    victim.restarts += 1
    victim.start(cluster.env)
    cluster.wait_alive(3)

    async def read_from_victim() -> bytes:
        async with cluster.client() as client:
            attr = await client.resolve("/data")
            infos = (await client.get_chunks(attr.ino)).chunks
            parts = [
                await client.read_chunk(replace(infos[i], keepers=(victim.addr,)))
                for i in sorted(infos)
            ]
        return b"".join(parts)

    assert trio.run(read_from_victim) == data.read_bytes()


def test_sigtermed_keeper_finishes_a_chunk_it_is_receiving(
    make_cluster: MakeCluster, tmp_path: Path
) -> None:
    """A chunk whose bytes are arriving when SIGTERM comes is a transfer in flight too."""
    cluster = make_cluster(keepers=1, replication=1, chunk_size=CHUNK)
    victim = cluster.keepers[0]
    data = os.urandom(CHUNK)
    sums = checksum.block_checksums(data)

    async def put_across_the_sigterm() -> m.Message:
        async with cluster.client() as client:
            _, _, first, _ = await client.create(1, b"f", 0o644)
        assert first is not None
        credentials = Credentials.from_settings({"secret_file": str(cluster.secret_file)})
        conn = await Connection.open(victim.addr, "client", credentials)
        request = m.PutChunk(chunk_id=first.chunk_id, version=first.version, checksums=sums)
        header = pack_header(request.to_wire(1))
        stream = conn.frames.stream
        await stream.send_all(PREFIX.pack(len(header), len(data)) + header + data[: CHUNK // 2])
        await trio.sleep(0.5)
        victim.signal(signal.SIGTERM)
        await trio.to_thread.run_sync(
            wait_until, lambda: "finishing transfers in flight" in victim.logs(), 30, "SIGTERM"
        )
        await trio.sleep(0.5)
        try:
            with trio.fail_after(30):
                await stream.send_all(data[CHUNK // 2 :])
                raw, _ = await conn.frames.receive()
        finally:
            await conn.aclose()
        return m.decode(raw)[1]

    reply = trio.run(put_across_the_sigterm)
    assert reply == m.PutChunkReply(stored=[victim.addr], failed=[]), reply
    assert victim.wait_exit(30) == 0
    assert len(chunk_files(victim.data_dir)) == 1


def test_tracker_sigterm_finishes_the_commits_in_flight(
    make_cluster: MakeCluster, tmp_path: Path
) -> None:
    """SIGTERM reaches the tracker with commits in its hands (sent while it was stopped) and
    `dfs put`s running. Every commit it took on is finished and answered; the rest wait for
    it to come back; after its restart every file is whole, none half there."""
    cluster = make_cluster(keepers=3, replication=2, chunk_size=CHUNK)
    tracker = cluster.tracker
    assert tracker is not None
    sources = [random_file(tmp_path / f"src{i}", (i + 1) * CHUNK + 777 * i) for i in range(3)]
    for i in range(len(sources)):
        cluster.dfs("mkdir", f"/p{i}")
    puts: list[tuple[str, Path, int, str]] = []
    stop_putting = threading.Event()

    def putter(i: int) -> None:
        n = 0
        while not stop_putting.is_set():
            remote = f"/p{i}/{n}"
            result = cluster.dfs("put", str(sources[i]), remote, check=False)
            puts.append((remote, sources[i], result.returncode, result.stderr))
            n += 1

    # Files whose chunks are stored; their commits go out while the tracker is stopped.
    pending = 6
    payload = os.urandom(CHUNK + 5)
    ready = threading.Event()
    committed: list[str] = []
    errors: list[BaseException] = []

    async def commit_while_stopped() -> None:
        async with cluster.client(retry_window_s=60) as client:
            files = []
            for i in range(pending):
                attr = await client.create_file(f"/c{i}")
                written = [
                    await client.write_chunk(attr.ino, 0, payload[:CHUNK]),
                    await client.write_chunk(attr.ino, 1, payload[CHUNK:]),
                ]
                files.append((f"/c{i}", attr.ino, written))
            # A pooled connection per commit, so that each is sent at once, tracker stopped.
            async with trio.open_nursery() as nursery:
                for _ in range(pending):
                    nursery.start_soon(client.getattr, 1)
            ready.set()
            await trio.to_thread.run_sync(stopped.wait)

            async def commit(path: str, ino: int, written: list[ChunkInfo]) -> None:
                await client.commit(ino, len(payload), written)
                committed.append(path)

            async with trio.open_nursery() as nursery:
                for path, ino, written in files:
                    nursery.start_soon(commit, path, ino, written)

    def run_commits() -> None:
        try:
            trio.run(commit_while_stopped)
        except BaseException as exc:
            errors.append(exc)

    stopped = threading.Event()
    threads = [threading.Thread(target=putter, args=(i,)) for i in range(len(sources))]
    threads.append(threading.Thread(target=run_commits))
    for thread in threads:
        thread.start()
    try:
        assert ready.wait(60), errors
        wait_until(lambda: len(puts) >= 3, 60, "a few puts")
        tracker.signal(signal.SIGSTOP)
        stopped.set()
        time.sleep(1)  # the commits and the puts' requests wait in the tracker's sockets
        tracker.signal(signal.SIGTERM)
        tracker.signal(signal.SIGCONT)
        assert tracker.wait_exit(30) == 0
        time.sleep(1)  # the clients find it gone
        tracker.restarts += 1
        tracker.start(cluster.env)
        wait_until(lambda: len(committed) == pending or bool(errors), 90, "the commits")
        done = len(puts)
        wait_until(lambda: len(puts) >= done + 3, 90, "puts after the restart")
    finally:
        stop_putting.set()
        stopped.set()
        for thread in threads:
            thread.join(timeout=300)
    assert not errors, errors
    summary = re.search(r"finishing requests in flight \(([^)]*)\)", tracker.logs())
    assert summary, tracker.logs()
    print(f"in flight at SIGTERM: {summary[1]}; {len(puts)} puts")
    assert "CommitChunks" in summary[1], "no commit was in flight: the test proved nothing"

    cluster.wait_alive(3)
    failed = [(remote, code, err) for remote, _, code, err in puts if code != 0]
    assert not failed, failed  # the tracker was back within every put's retry window
    expected = {remote: local.read_bytes() for remote, local, _, _ in puts}
    expected |= {f"/c{i}": payload for i in range(pending)}

    async def read_back() -> dict[str, bytes]:
        found = {}
        async with cluster.client() as client:
            for remote in expected:
                await client.download(remote, tmp_path / "out")
                found[remote] = (tmp_path / "out").read_bytes()
        return found

    found = trio.run(read_back)
    assert [r for r in expected if found[r] != expected[r]] == []
