"""Issue 4's promises on real processes: dead keepers are repaired around, returning keepers
are trimmed, corruption is scrubbed away, garbage is collected, goals and drains converge."""

from __future__ import annotations

import filecmp
import os
import time
from pathlib import Path

import trio

from cluster.client import ChunkInfo
from cluster.errors import printable
from tests.cluster_procs import ProcCluster, chunk_files, wait_until
from tests.conftest import MakeCluster, random_file

MiB = 1 << 20
CHUNK = 1 * MiB
REPAIR_TIMEOUT_S = 90


def fast_cluster(
    make_cluster: MakeCluster, keepers: int, replication: int, **kw: object
) -> ProcCluster:
    kw.setdefault("keeper_args", ["--scrub-rate-mb-s", "0.5"])
    return make_cluster(
        keepers=keepers, replication=replication, chunk_size=CHUNK, dead_after_s=3.0, **kw
    )


def put_files(
    cluster: ProcCluster, tmp: Path, count: int, max_size: int = 3 * MiB
) -> dict[str, Path]:
    """`count` files of assorted sizes, put through the client library in one process (the
    CLI's start-up, once per file, was most of these tests' time; tests/procs/test_core.py
    covers `dfs put` itself)."""
    files = {
        f"/file{i}": random_file(tmp / f"file{i}", (i * 997_331) % max_size + 1)
        for i in range(count)
    }

    async def put_all() -> None:
        async with cluster.client() as client:
            for remote, local in files.items():
                await client.upload(local, remote)

    trio.run(put_all)
    return files


def assert_identical(cluster: ProcCluster, files: dict[str, Path], tmp: Path) -> None:
    out = tmp / "readback"

    async def get_all() -> None:
        async with cluster.client() as client:
            for remote, local in files.items():
                await client.download(remote, out)
                assert filecmp.cmp(local, out, shallow=False), remote

    trio.run(get_all)


def holders_per_chunk(cluster: ProcCluster, files: dict[str, Path]) -> list[list[str]]:
    async def holders() -> list[list[str]]:
        async with cluster.client() as client:
            found = []
            for remote in files:
                chunks = await client.get_chunks((await client.resolve(remote)).ino)
                found += [list(c.keepers) for c in chunks.chunks.values()]
            return found

    return trio.run(holders)


def live_addrs(cluster: ProcCluster) -> set[str]:
    return {k["addr"] for k in cluster.status()["keepers"] if k["state"] == "alive"}


def test_killed_keeper_is_repaired_around(make_cluster: MakeCluster, tmp_path: Path) -> None:
    cluster = fast_cluster(make_cluster, keepers=4, replication=3)
    files = put_files(cluster, tmp_path, 50)
    assert cluster.healthy()
    started = time.monotonic()
    cluster.keepers[0].kill()
    wait_until(lambda: cluster.fsck()[0] == 1, 30, "fsck to notice the dead keeper")
    wait_until(cluster.healthy, REPAIR_TIMEOUT_S, "re-replication")
    print(f"repair took {time.monotonic() - started:.1f}s")
    alive = live_addrs(cluster)
    for holders in holders_per_chunk(cluster, files):
        assert len(set(holders) & alive) == 3
    assert_identical(cluster, files, tmp_path)


def test_two_successive_losses_lose_nothing(make_cluster: MakeCluster, tmp_path: Path) -> None:
    cluster = fast_cluster(make_cluster, keepers=5, replication=3)
    files = put_files(cluster, tmp_path, 20)
    for victim in cluster.keepers[:2]:
        victim.kill()
        wait_until(lambda: cluster.fsck()[0] == 1, 30, "fsck to notice the dead keeper")
        wait_until(cluster.healthy, REPAIR_TIMEOUT_S, "re-replication")
    assert_identical(cluster, files, tmp_path)


def test_scrubber_replaces_corrupt_copies(make_cluster: MakeCluster, tmp_path: Path) -> None:
    cluster = fast_cluster(
        make_cluster, keepers=4, replication=3, keeper_args=["--scrub-rate-mb-s", "50"]
    )
    files = put_files(cluster, tmp_path, 8, max_size=2 * MiB)
    victim = cluster.keepers[0]
    corrupted = chunk_files(victim.data_dir)[:5]
    assert len(corrupted) == 5
    for path in corrupted:
        raw = bytearray(path.read_bytes())
        raw[-1] ^= 0x55  # the last data byte (the middle may be header padding)
        path.write_bytes(bytes(raw))
    wait_until(
        lambda: victim.logs().count("is corrupt; dropping this copy") >= 5, 60, "the scrubber"
    )
    assert victim.logs().count("is corrupt; dropping this copy") == 5
    # The tracker must learn of the drops and copy the chunks again: "healthy" alone could be
    # the state from before it heard of them.
    chunks = len(holders_per_chunk(cluster, files))
    wait_until(
        lambda: cluster.status()["health"]["copies_done"] >= 5, REPAIR_TIMEOUT_S, "5 new copies"
    )
    wait_until(
        lambda: sum(len(chunk_files(k.data_dir)) for k in cluster.keepers) == 3 * chunks,
        REPAIR_TIMEOUT_S,
        "3 copies of every chunk on the keepers' disks",
    )
    wait_until(cluster.healthy, REPAIR_TIMEOUT_S, "replacement copies")
    assert_identical(cluster, files, tmp_path)
    for holders in holders_per_chunk(cluster, files):
        assert len(set(holders)) == 3


def test_returning_keeper_is_trimmed(make_cluster: MakeCluster, tmp_path: Path) -> None:
    cluster = fast_cluster(make_cluster, keepers=4, replication=3)
    files = put_files(cluster, tmp_path, 15)
    victim = cluster.keepers[0]
    before = len(chunk_files(victim.data_dir))
    assert before > 0
    victim.kill()
    wait_until(lambda: cluster.fsck()[0] == 1, 30, "fsck to notice the dead keeper")
    wait_until(cluster.healthy, REPAIR_TIMEOUT_S, "re-replication")
    victim.restarts += 1
    victim.start(cluster.env)
    chunks = len(holders_per_chunk(cluster, files))

    def trimmed() -> bool:
        on_disk = sum(len(chunk_files(k.data_dir)) for k in cluster.keepers)
        return on_disk == 3 * chunks and all(len(h) == 3 for h in holders_per_chunk(cluster, files))

    wait_until(trimmed, REPAIR_TIMEOUT_S, "extra copies to be trimmed")
    assert cluster.healthy()
    assert_identical(cluster, files, tmp_path)


def test_rm_frees_chunks_on_every_keeper(make_cluster: MakeCluster, tmp_path: Path) -> None:
    # A fast scrubber, so deletions race with scrub passes (which once killed a keeper).
    cluster = make_cluster(keeper_args=["--scrub-rate-mb-s", "2000"])
    used_before = sum(k["used_bytes"] for k in cluster.status()["keepers"])
    files = put_files(cluster, tmp_path, 6, max_size=20 * MiB)
    cluster.dfs("mkdir", "/tree/a")
    cluster.dfs("put", str(files["/file1"]), "/tree/a/x")
    assert all(chunk_files(k.data_dir) for k in cluster.keepers)
    for remote in files:
        cluster.dfs("rm", remote)
    cluster.dfs("rm", "-r", "/tree")
    wait_until(
        lambda: all(not chunk_files(k.data_dir) for k in cluster.keepers), 30, "chunk deletion"
    )
    wait_until(
        lambda: sum(k["used_bytes"] for k in cluster.status()["keepers"]) <= used_before,
        30,
        "freed space in dfs status",
    )
    assert all(k.running for k in cluster.keepers)


def test_setrep_converges_up_and_down(make_cluster: MakeCluster, tmp_path: Path) -> None:
    cluster = fast_cluster(make_cluster, keepers=3, replication=1)
    files = put_files(cluster, tmp_path, 6)
    assert all(len(h) == 1 for h in holders_per_chunk(cluster, files))
    cluster.dfs("setrep", "3", "/")
    wait_until(
        lambda: all(len(h) == 3 for h in holders_per_chunk(cluster, files)),
        REPAIR_TIMEOUT_S,
        "3 copies",
    )
    assert cluster.healthy()
    cluster.dfs("setrep", "2", "/file0")
    cluster.dfs("setrep", "2", "/")
    chunks = len(holders_per_chunk(cluster, files))
    wait_until(
        lambda: (
            all(len(h) == 2 for h in holders_per_chunk(cluster, files))
            and sum(len(chunk_files(k.data_dir)) for k in cluster.keepers) == 2 * chunks
        ),
        REPAIR_TIMEOUT_S,
        "2 copies",
    )
    assert_identical(cluster, files, tmp_path)


def test_decommission_drains_a_keeper(make_cluster: MakeCluster, tmp_path: Path) -> None:
    cluster = fast_cluster(make_cluster, keepers=4, replication=2)
    files = put_files(cluster, tmp_path, 15)
    victim = cluster.keepers[0]
    assert chunk_files(victim.data_dir)
    cluster.dfs("decommission", victim.addr)

    def removable() -> bool:
        entry = next(k for k in cluster.status()["keepers"] if k["addr"] == victim.addr)
        return bool(entry.get("removable"))

    wait_until(removable, REPAIR_TIMEOUT_S, "the drain to finish")
    assert "may be removed" in cluster.dfs("status").stdout
    others = {k.addr for k in cluster.keepers[1:]}
    for holders in holders_per_chunk(cluster, files):
        assert len(set(holders) & others) >= 2
    victim.kill()
    # Only once the tracker knows the keeper is gone does "healthy" say the drain was enough.
    wait_until(lambda: cluster.keeper_state(victim) == "dead", 30, "the keeper to be dead")
    assert cluster.healthy()
    assert cluster.status()["health"]["copies_in_flight"] == 0
    assert_identical(cluster, files, tmp_path)


def test_tracker_killed_during_repair_still_converges(
    make_cluster: MakeCluster, tmp_path: Path
) -> None:
    cluster = fast_cluster(
        make_cluster,
        keepers=4,
        replication=3,
        # Slow repair (about 7 s here), so that the tracker dies while it is under way.
        keeper_args=["--replicate-rate-mb-s", "1", "--scrub-rate-mb-s", "0.5"],
    )
    files = put_files(cluster, tmp_path, 20)
    cluster.keepers[0].kill()
    wait_until(lambda: cluster.status()["health"].get("copies_done", 0) > 0, 60, "repair to start")
    assert cluster.fsck()[0] == 1, "repair should still be under way"
    assert cluster.tracker is not None
    cluster.restart(cluster.tracker)
    wait_until(cluster.healthy, REPAIR_TIMEOUT_S, "repair after the tracker restart")
    assert_identical(cluster, files, tmp_path)


def test_zones_get_a_copy_each(make_cluster: MakeCluster, tmp_path: Path) -> None:
    cluster = fast_cluster(make_cluster, keepers=4, replication=3, zones=["a", "a", "b", "c"])
    files = put_files(cluster, tmp_path, 10)
    zone_of = {k["addr"]: k["zone"] for k in cluster.status()["keepers"]}
    for holders in holders_per_chunk(cluster, files):
        assert sorted(zone_of[h] for h in holders) == ["a", "b", "c"]


def test_hung_keeper_does_not_stall_a_get(make_cluster: MakeCluster, tmp_path: Path) -> None:
    cluster = fast_cluster(make_cluster, keepers=3, replication=2)
    data = random_file(tmp_path / "data", 24 * MiB)
    cluster.dfs("put", str(data), "/data")
    frozen = cluster.keepers[0]
    frozen.signal(19)  # SIGSTOP: a hung keeper, connections open, nothing answers
    try:
        started = time.monotonic()
        out = tmp_path / "out"
        cluster.dfs("--io-timeout-s", "2", "get", "/data", str(out), timeout=120)
        assert filecmp.cmp(data, out, shallow=False)
        print(f"get with a hung keeper took {time.monotonic() - started:.1f}s")
    finally:
        frozen.signal(18)  # SIGCONT
    wait_until(lambda: len(live_addrs(cluster)) == 3, 30, "the frozen keeper to rejoin")
    assert os.path.exists(frozen.data_dir)


GC_GRACE_S = 8.0


async def _store_without_commit(cluster: ProcCluster, remote: str, chunks: int) -> list[ChunkInfo]:
    """A writer that stored chunk versions and died before its commit."""
    async with cluster.client() as client:
        attr = await client.create_file(remote)
        return [
            await client.write_chunk(attr.ino, index, os.urandom(CHUNK // 2))
            for index in range(chunks)
        ]


def _files_of(cluster: ProcCluster, versions: set[tuple[int, int]]) -> set[Path]:
    names = {f"chunk_{c:016x}_{v:08x}.dfs" for c, v in versions}
    return {p for k in cluster.keepers for p in chunk_files(k.data_dir) if p.name in names}


def test_uncommitted_versions_are_collected_after_the_grace(
    make_cluster: MakeCluster, tmp_path: Path
) -> None:
    cluster = fast_cluster(
        make_cluster, keepers=3, replication=2, tracker_args=["--gc-grace-s", str(GC_GRACE_S)]
    )
    kept = put_files(cluster, tmp_path, 2)
    kept_files = {p for k in cluster.keepers for p in chunk_files(k.data_dir)}
    assert len(kept_files) == 2 * len(holders_per_chunk(cluster, kept))
    started = time.monotonic()  # every allocation below is younger than this

    # Uncommitted versions of two kinds: stored through the client library and never
    # committed, and those of a `dfs put` SIGKILLed half-way through.
    written = trio.run(_store_without_commit, cluster, "/orphan", 3)
    assert all(len(info.keepers) == 2 for info in written)
    assert len(_files_of(cluster, {(i.chunk_id, i.version) for i in written})) == 6
    big = random_file(tmp_path / "big", 200 * CHUNK)  # long enough to be caught half-way
    put = cluster.dfs_background("put", str(big), "/big")
    try:
        wait_until(
            lambda: (
                sum(len(chunk_files(k.data_dir)) for k in cluster.keepers)
                >= len(kept_files) + 6 + 2 * 4
            ),
            60,
            "the put to store a few chunks",
        )
    finally:
        put.kill()
        put.wait()
    time.sleep(1)  # transfers the keepers had received finish
    garbage = {p for k in cluster.keepers for p in chunk_files(k.data_dir)} - kept_files
    assert _files_of(cluster, {(i.chunk_id, i.version) for i in written}) <= garbage
    assert len(garbage) >= 6 + 2 * 4
    assert cluster.stat("/big")["size"] == 0  # never committed
    print(f"{len(garbage)} uncommitted chunk files")

    # Not before the grace: every file stays while its allocation is younger than that.
    while time.monotonic() < started + GC_GRACE_S - 1.5:
        missing = {p for p in garbage if not p.exists()}
        assert not missing, f"collected before gc_grace_s: {sorted(p.name for p in missing)}"
        time.sleep(0.2)
    # After it: gone from every keeper's disk; committed chunks stay.
    wait_until(lambda: not any(p.exists() for p in garbage), GC_GRACE_S + 30, "garbage collection")
    print(f"collected {time.monotonic() - started - GC_GRACE_S:.1f}s after the grace")
    assert {p for k in cluster.keepers for p in chunk_files(k.data_dir)} == kept_files
    assert cluster.tracker is not None
    assert "chunk versions that were never committed" in cluster.tracker.logs()
    assert cluster.healthy()
    assert_identical(cluster, kept, tmp_path)


def test_fsck_exits_2_when_a_chunk_has_no_live_copy(
    make_cluster: MakeCluster, tmp_path: Path
) -> None:
    cluster = fast_cluster(make_cluster, keepers=2, replication=1)
    files = put_files(cluster, tmp_path, 6)
    # A name that is not UTF-8, in chunks on both keepers: fsck must report it too.
    odd = os.fsdecode(b"/caf\xe9")
    files[odd] = random_file(tmp_path / "odd", 4 * CHUNK)
    cluster.dfs("put", str(files[odd]), odd)
    victim = cluster.keepers[0]
    lost = {
        remote
        for remote in files
        if any(victim.addr in c["keepers"] for c in cluster.stat(remote)["chunks"])
    }
    assert odd in lost, "placement put all of /caf\\xe9 on one keeper"
    assert lost != set(files), "every file landed on the victim"
    assert cluster.healthy()
    victim.kill()
    wait_until(lambda: cluster.keeper_state(victim) == "dead", 30, "the keeper to be dead")
    code, report = cluster.fsck()
    assert code == 2, report
    assert report["lost"] >= len(lost)
    # Names that are not UTF-8 are reported with \\x escapes, as in error messages.
    assert {p["path"] for p in report["problems"] if p["state"] == "lost"} == {
        printable(remote) for remote in lost
    }
    assert "/caf\\xe9" in {p["path"] for p in report["problems"]}
    text = cluster.dfs("fsck", check=False)
    assert text.returncode == 2
    assert "DATA LOST" in text.stdout
    # A path without lost chunks below it is healthy; a lost one says so too.
    survivor = sorted(set(files) - lost)[0]
    assert cluster.fsck(survivor)[0] == 0
    assert cluster.fsck(sorted(lost)[0])[0] == 2
    failed = cluster.dfs(
        "--io-timeout-s", "2", "get", sorted(lost)[0], str(tmp_path / "x"), check=False
    )
    assert failed.returncode == 1
    assert failed.stderr.count("\n") == 1
    # The keeper comes back with its disk: nothing was lost after all.
    victim.restarts += 1
    victim.start(cluster.env)
    wait_until(cluster.healthy, 30, "fsck to be healthy with the keeper back")
    assert_identical(cluster, files, tmp_path)
