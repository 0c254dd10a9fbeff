"""DESIGN.md, guarantee 1 (durable when acknowledged, at two levels), under real power cuts.

Each server keeps its data on a lazyfs layer (conftest.py), so a cut loses exactly what the
server never fsynced, as a machine losing power would under POSIX rules. The tests state the
guarantees, not how the servers meet them: which process fsyncs what, and when, is theirs.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import trio

from cluster.auth import Credentials
from cluster.client import Client
from cluster.errors import DfsError, NotFound
from tests.cluster_procs import BIN, ProcCluster, chunk_files, wait_until
from tests.powercut.conftest import PowerCluster, PowerClusterFactory, blob, sync_dir, write_file

T = TypeVar("T")

PIECE = 64 << 10  # old-or-new is checked piece by piece, at this size
SETTLE_S = 90.0  # bound on healing and on reports reaching fsck


# --- helpers ----------------------------------------------------------------------------------


def read(path: Path) -> bytes | int:
    """The file's bytes, or the errno its open or read failed with."""
    try:
        return path.read_bytes()
    except OSError as exc:
        return exc.errno or errno.EIO


def describe(got: bytes | int) -> str:
    if isinstance(got, int):
        return errno.errorcode.get(got, str(got))
    return f"{len(got)} bytes"


def old_or_new(got: bytes, old: bytes, new: bytes) -> str | None:
    """None when `got` is, piece by piece, the old or the new contents; else what is wrong."""
    if len(got) not in (len(old), len(new)):
        return f"size {len(got)} is neither the old {len(old)} nor the new {len(new)}"
    for start in range(0, len(got), PIECE):
        piece = got[start : start + PIECE]
        if piece not in (old[start : start + PIECE], new[start : start + PIECE]):
            return f"bytes at {start} are neither old nor new"
    return None


def dfs_get(procs: ProcCluster, remote: str, local: Path) -> bytes | str:
    result = procs.dfs("get", remote, str(local), check=False, timeout=60)
    if result.returncode != 0:
        return f"dfs get failed: {result.stderr.strip()}"
    return local.read_bytes()


def with_client(procs: ProcCluster, job: Callable[[Client], Awaitable[T]]) -> T:
    """Run `job` with an in-process client of the cluster (the code `dfs` runs, without a
    process start per call: fast enough to poll, and to act between a close and a kill)."""

    async def run() -> T:
        credentials = Credentials.from_settings({"secret_file": str(procs.secret_file)})
        async with Client.connect(
            procs.tracker_addr, credentials, retry_window_s=10, io_timeout_s=5
        ) as client:
            return await job(client)

    return trio.run(run)


def check_copies(
    procs: ProcCluster,
    files: dict[str, bytes],
    only: str = "",
    must_hold: frozenset[tuple[str, int]] = frozenset(),
) -> list[str]:
    """Read every copy of every chunk of `files` from each keeper the tracker lists for it (or
    from keeper `only`, and then also the chunks `must_hold` names as (path, index) even if
    the tracker does not list them there), checked against the expected bytes: one line per
    copy that did not come back whole. "WRONG BYTES" would mean a keeper served corrupt
    data."""

    async def job(client: Client) -> list[str]:
        bad: list[str] = []
        for path, data in files.items():
            chunks = await client.get_chunks((await client.resolve(path)).ino)
            for index, info in sorted(chunks.chunks.items()):
                want = data[index * chunks.chunk_size : (index + 1) * chunks.chunk_size]
                listed = info.keepers
                if (path, index) in must_hold and only not in listed:
                    listed = (*listed, only)
                for addr in listed:
                    if only and addr != only:
                        continue
                    try:
                        got = await client.read_chunk(replace(info, keepers=(addr,)))
                    except DfsError as exc:
                        what = "fsynced, lost" if (path, index) in must_hold else "refused"
                        bad.append(f"{path} #{index} on {addr}: {what} ({exc})")
                        continue
                    if bytes(got) != want:
                        bad.append(f"{path} #{index} on {addr}: WRONG BYTES")
        return bad

    return with_client(procs, job)


def holding(procs: ProcCluster, files: dict[str, bytes], addr: str) -> frozenset[tuple[str, int]]:
    """The chunks of `files`, as (path, index), that the tracker lists on keeper `addr`."""

    async def job(client: Client) -> frozenset[tuple[str, int]]:
        held: set[tuple[str, int]] = set()
        for path in files:
            chunks = await client.get_chunks((await client.resolve(path)).ino)
            held |= {(path, i) for i, c in chunks.chunks.items() if addr in c.keepers}
        return frozenset(held)

    return with_client(procs, job)


def ids(procs: ProcCluster, paths: list[str]) -> tuple[set[int], set[int]]:
    """The inode numbers and chunk ids of these files."""

    async def job(client: Client) -> tuple[set[int], set[int]]:
        inos: set[int] = set()
        chunk_ids: set[int] = set()
        for path in paths:
            attr = await client.resolve(path)
            inos.add(attr.ino)
            if attr.is_file:
                chunks = await client.get_chunks(attr.ino)
                chunk_ids |= {c.chunk_id for c in chunks.chunks.values()}
        return inos, chunk_ids

    return with_client(procs, job)


def download_all(procs: ProcCluster, files: dict[str, bytes], dest: Path) -> list[str]:
    """What `dfs get` does (`Client.download`) for each file: one line per file that does not
    come back identical."""

    async def job(client: Client) -> list[str]:
        bad: list[str] = []
        for i, (path, data) in enumerate(files.items()):
            local = dest / f"download{i}"
            try:
                await client.download(path, local)
            except DfsError as exc:
                bad.append(f"{path}: acknowledged, but the download fails: {exc}")
                continue
            if local.read_bytes() != data:
                bad.append(f"{path}: acknowledged, but downloads as other bytes")
        return bad

    return with_client(procs, job)


def fsck_code(procs: ProcCluster) -> int:
    """`dfs fsck`'s exit code: 0 healthy, 1 degraded, 2 data lost."""

    async def job(client: Client) -> int:
        report = await client.fsck("/")
        return 2 if report.lost else 1 if report.degraded else 0

    return with_client(procs, job)


def failure(pc: PowerCluster, problems: list[str]) -> str:
    """An assertion message: the problems, then what each layer dropped at its cuts."""
    cuts = [
        f"{name}: {line}"
        for name, lazy in pc.layers.items()
        for line in lazy.logs().splitlines()
        if "lazyfs: cut /" in line
    ]
    return "\n".join(["", *problems, "--- what the power cuts dropped:", *cuts])


# --- the tests --------------------------------------------------------------------------------


def test_fsynced_data_survives_a_cut_of_every_server(
    power_cluster: PowerClusterFactory, tmp_path: Path
) -> None:
    """fsync() on the mount returns once a power cut of every machine loses none of it, and
    whatever was written after it comes back whole (old or new) or is reported, never
    corrupt."""
    pc = power_cluster(replication=2)
    mnt = pc.mount()
    root = mnt.path
    (root / "dir").mkdir()
    synced = {
        "small": blob("small", 3000),
        "one": blob("one", 700_000),
        "multi": blob("multi", 2_600_000),
        "dir/nested": blob("nested", 1_300_000),
    }
    old = {
        "overwritten": blob("overwritten", 2_200_000),
        "appended": blob("appended", 500_000),
        "open": blob("open", 2_100_000),
    }
    for name, data in {**synced, **old}.items():
        write_file(root / name, data, sync=True)
    # Closed first (stored without fsync), fsynced later through another descriptor.
    synced["closed-then-synced"] = blob("closed-then-synced", 1_100_000)
    write_file(root / "closed-then-synced", synced["closed-then-synced"], sync=False)
    fd = os.open(root / "closed-then-synced", os.O_WRONLY)
    os.fsync(fd)
    os.close(fd)
    sync_dir(root / "dir")
    sync_dir(root)

    # After the fsyncs, changes that nobody fsyncs: the power goes before the write-back.
    new = dict(old)
    changed = bytearray(old["overwritten"])
    changed[500_000:1_700_000] = blob("overwritten-new", 1_200_000)
    new["overwritten"] = bytes(changed)
    with open(root / "overwritten", "r+b") as f:
        f.seek(500_000)
        f.write(changed[500_000:1_700_000])
    new["appended"] = old["appended"] + blob("appended-new", 400_000)
    write_file(root / "appended", new["appended"][500_000:], sync=False, flags=os.O_APPEND)
    fresh = {"fresh": blob("fresh", 1_500_000), "dir/fresh": blob("fresh2", 200_000)}
    for name, data in fresh.items():
        write_file(root / name, data, sync=False)
    new["open"] = blob("open-new", 2_100_000)
    fd = os.open(root / "open", os.O_WRONLY)  # still open when the power goes
    os.write(fd, new["open"])

    mnt.kill()  # the client's machine loses power too
    try:
        os.close(fd)
    except OSError:
        pass  # the mount is gone
    pc.cut(pc.servers)
    pc.procs.wait_alive(len(pc.keepers))
    # Every keeper has reported by now: a read of a chunk without a copy may fail at once.
    mnt.argv += ["--io-timeout-s", "1"]
    mnt.restart()

    problems: list[str] = []
    unreadable: list[str] = []
    for name, data in synced.items():
        got = read(root / name)
        if got != data:
            problems.append(f"{name}: fsynced, but reads back {describe(got)} through the mount")
        fetched = dfs_get(pc.procs, f"/{name}", tmp_path / "got")
        if fetched != data:
            what = fetched if isinstance(fetched, str) else f"{len(fetched)} wrong bytes"
            problems.append(f"{name}: fsynced, but `dfs get` gives {what}")
    for name in old:
        got = read(root / name)
        if isinstance(got, int):
            if got != errno.EIO:
                problems.append(f"{name}: fsynced once, now fails with {describe(got)}")
            unreadable.append(name)
        elif wrong := old_or_new(got, old[name], new[name]):
            problems.append(f"{name}: changed after its fsync and now corrupt: {wrong}")
    for name, data in fresh.items():
        got = read(root / name)
        if got == errno.EIO:
            unreadable.append(name)
        elif got not in (errno.ENOENT, b"", data):
            problems.append(f"{name}: never fsynced and now corrupt: {describe(got)}")
    assert not problems, failure(pc, problems)
    # What cannot be read is reported, not served: fsck names it (at once or once the keepers
    # have found their torn copies).
    for name in unreadable:
        wait_until(
            lambda name=name: pc.procs.fsck(f"/{name}")[0] != 0,  # type: ignore[misc]
            SETTLE_S,
            f"fsck to report /{name}, which reads fail with EIO",
        )


def test_acknowledged_metadata_survives_a_tracker_cut(
    power_cluster: PowerClusterFactory, tmp_path: Path
) -> None:
    """What the tracker acknowledged at the fsync level (chunk commits of `dfs put`, fsync of
    a file, names after fsync of their directory) survives a power cut of the tracker, and no
    inode number or chunk id handed out before the cut is handed out again."""
    pc = power_cluster()
    procs = pc.procs
    mnt = pc.mount()
    root = mnt.path
    files: dict[str, bytes] = {}

    put = tmp_path / "put.bin"
    put.write_bytes(blob("put", 1_500_000))
    procs.dfs("put", str(put), "/put.bin")
    files["/put.bin"] = put.read_bytes()
    files["/synced"] = blob("synced", 1_200_000)
    write_file(root / "synced", files["/synced"], sync=True)
    (root / "gone").write_bytes(b"unlinked later")
    (root / "before-rename").write_bytes(b"renamed later")
    sync_dir(root)

    (root / "d").mkdir()
    files["/d/closed"] = blob("closed", 300_000)
    write_file(root / "d" / "closed", files["/d/closed"], sync=False)
    files["/d/empty"] = b""
    (root / "d" / "empty").touch()
    os.symlink("closed", root / "d" / "link")
    os.link(root / "d" / "closed", root / "d" / "hard")
    files["/d/hard"] = files["/d/closed"]
    os.unlink(root / "gone")
    os.rename(root / "before-rename", root / "renamed")
    files["/renamed"] = b"renamed later"
    sync_dir(root / "d")
    sync_dir(root)
    before = {p: stat_view(procs, p) for p in ["/put.bin", "/synced", "/d/closed", "/d/hard"]}
    seen_inos, seen_chunks = ids(procs, [*files, "/d", "/d/link"])

    # Ids handed out just before the cut, by changes nobody made durable: the cut may lose
    # the changes, never the promise that their ids are not handed out again.
    (root / "late").mkdir()
    for i in range(3):
        write_file(root / "late" / f"f{i}", blob(f"late{i}", 200_000), sync=False)
    late_inos, late_chunks = ids(procs, ["/late", *(f"/late/f{i}" for i in range(3))])
    pc.cut([pc.tracker])
    procs.wait_alive(len(pc.keepers))

    problems = download_all(procs, files, tmp_path)
    for path, info in before.items():
        if (now := stat_view(procs, path)) != info:
            problems.append(f"{path}: `dfs stat` was {info}, is {now} after the cut")
    present = exists(procs, ["/gone", "/before-rename", "/d/link"])
    if present["/gone"] or present["/before-rename"]:
        problems.append("a name removed before an fsync of its directory is back after the cut")
    if not present["/d/link"]:
        problems.append("/d/link: a symlink made durable by fsyncdir is gone")
    assert not problems, failure(pc, [*problems, f"names after the cut: {listing(procs)}"])

    # New ids after the restart, through the mount (it reconnects on its own) and `dfs put`.
    for i in range(3):
        write_file(root / f"after{i}", blob(f"after{i}", 200_000), sync=False)
    procs.dfs("put", str(put), "/after-put.bin")
    new_inos, new_chunks = ids(procs, [*(f"/after{i}" for i in range(3)), "/after-put.bin"])
    late = exists(procs, ["/late", *(f"/late/f{i}" for i in range(3))])
    lost = f"the cut lost {[path for path, there in late.items() if not there]}"
    reused = sorted(new_inos & (seen_inos | late_inos))
    assert not reused, failure(pc, [f"inode numbers handed out again: {reused} ({lost})"])
    reused = sorted(new_chunks & (seen_chunks | late_chunks))
    assert not reused, failure(pc, [f"chunk ids handed out again: {reused} ({lost})"])


def stat_view(procs: ProcCluster, path: str) -> dict[str, object]:
    """`dfs stat --json`, without what is soft state (where the copies are)."""
    result = procs.dfs("stat", "--json", path, check=False)
    if result.returncode != 0:
        return {"error": result.stderr.strip()}
    info: dict[str, Any] = json.loads(result.stdout)
    for chunk in info.get("chunks", []):
        del chunk["keepers"]
    return info


def exists(procs: ProcCluster, paths: list[str]) -> dict[str, bool]:
    async def job(client: Client) -> dict[str, bool]:
        found = {}
        for path in paths:
            try:
                await client.resolve(path)
            except NotFound:
                found[path] = False
            else:
                found[path] = True
        return found

    return with_client(procs, job)


def listing(procs: ProcCluster) -> list[str]:
    async def job(client: Client) -> list[str]:
        names = [f"/{e.name.decode()}" for e in await client.list_dir("/")]
        if "/d" in names:
            names += [f"/d/{e.name.decode()}" for e in await client.list_dir("/d")]
        return names

    return with_client(procs, job)


def test_keeper_cut_during_writes_serves_nothing_corrupt(
    power_cluster: PowerClusterFactory, tmp_path: Path
) -> None:
    """A power cut of one keeper while `dfs put`s and writes through the mount are in flight:
    every acknowledged file reads back whole, the keeper never serves bytes that fail their
    checksums, what it lost shows in fsck, and the tracker copies it back."""
    # Repair starts dead_after_s after the tracker's start: normally after the cut keeper is
    # back, for copies ordered from a keeper that is down are only retried 30 s later.
    pc = power_cluster(
        replication=3, dead_after_s=12.0, keeper_args=["--replicate-rate-mb-s", "10"]
    )
    procs = pc.procs
    mnt = pc.mount()
    victim = pc.keepers[0]
    files: dict[str, bytes] = {}
    before = tmp_path / "before.bin"
    before.write_bytes(blob("before", 2_500_000))
    procs.dfs("put", str(before), "/before.bin")
    files["/before.bin"] = before.read_bytes()

    puts: dict[str, tuple[subprocess.Popen[bytes], bytes]] = {}
    for i in range(4):
        local = tmp_path / f"put{i}.bin"
        local.write_bytes(blob(f"put{i}", 1_800_000))
        proc = subprocess.Popen(
            [str(BIN / "dfs"), "--tracker", procs.tracker_addr, "put", str(local), f"/put{i}"],
            env=procs.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        puts[f"/put{i}"] = (proc, local.read_bytes())
    closed: dict[str, bytes] = {}

    def writer() -> None:
        for i in range(16):
            data = blob(f"w{i}", 300_000)
            try:
                write_file(mnt.path / f"w{i}", data, sync=False)
            except OSError:
                continue  # not acknowledged: nothing promised
            closed[f"/w{i}"] = data

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        wait_until(lambda: len(closed) >= 3, 30, "the first files closed on the mount")
        # `dfs put` returns once every copy is fsynced: the keeper must keep its copies of
        # the puts done by now through the cut.
        synced = {"/before.bin": files["/before.bin"]}
        synced |= {path: data for path, (proc, data) in puts.items() if proc.poll() == 0}
        held = holding(procs, synced, victim.addr)
        pc.cut([victim])
    finally:
        thread.join(timeout=120)
    assert not thread.is_alive(), "writes through the mount hang after a keeper cut"
    for path, (proc, data) in puts.items():
        if proc.wait(timeout=120) == 0:
            files[path] = data
    files.update(closed)
    assert len(files) > 4, failure(pc, ["almost nothing was acknowledged"])

    # At restart, the keeper serves nothing corrupt: each copy the tracker lists on it reads
    # back exactly, or is refused; and it serves every fsynced copy it held.
    wrong = [line for line in check_copies(procs, files, only=victim.addr) if "WRONG" in line]
    wrong += check_copies(procs, synced, only=victim.addr, must_hold=held)
    assert not wrong, failure(pc, wrong)
    # What it lost is reported: the degraded state shows in fsck, then repair ends it.
    degraded_seen = False
    deadline = time.monotonic() + SETTLE_S
    while (code := fsck_code(procs)) != 0 or not degraded_seen:
        assert code != 2, failure(pc, [f"data lost after one keeper's cut: {procs.fsck()}"])
        degraded_seen |= code == 1
        assert time.monotonic() < deadline, failure(
            pc, [f"not healed in {SETTLE_S}s ({degraded_seen=}): {procs.fsck()}"]
        )
        time.sleep(0.05)
    assert procs.fsck()[0] == 0

    problems = download_all(procs, files, tmp_path)
    for path in closed:
        if read(mnt.path / path.lstrip("/")) != files[path]:
            problems.append(f"{path}: closed, but reads back otherwise through the mount")
    # Healed means real copies: every copy the tracker lists, on every keeper, reads back.
    problems += check_copies(procs, files)
    assert not problems, failure(pc, problems)
    assert chunk_files(victim.data_dir), "the cut keeper holds no chunks after the repair"


def test_closed_file_survives_sigkill_of_any_one_process(
    power_cluster: PowerClusterFactory, tmp_path: Path
) -> None:
    """After close() alone (no fsync), SIGKILL of the tracker, of any keeper or of the mount
    loses nothing: the killed process finds it again when it restarts."""
    pc = power_cluster(replication=3)
    procs = pc.procs
    mnt = pc.mount()
    files: dict[str, bytes] = {}
    for target in [pc.tracker, *pc.keepers, None]:  # None: the mount
        name = f"before-{target.name if target else 'mount'}"
        files[f"/{name}"] = blob(name, 1_300_000)
        write_file(mnt.path / name, files[f"/{name}"], sync=False)
        if target is None:
            mnt.kill()
            mnt.restart()
        elif target is pc.tracker:
            pc.kill(target)
        else:
            held = holding(procs, files, target.addr)
            pc.kill(target)
            # The restarted keeper itself serves what it held: nobody copied it back.
            refused = check_copies(procs, files, only=target.addr, must_hold=held)
            assert not refused, failure(pc, refused)
            # A fresh mount: the next write through this one could find its pooled connection
            # to the restarted keeper dead and fail over needlessly (another guarantee's bug).
            mnt.unmount()
            mnt.start()
        procs.wait_alive(len(pc.keepers))
    problems: list[str] = []
    for path, data in files.items():
        got = read(mnt.path / path.lstrip("/"))
        if got != data:
            problems.append(f"{path}: closed, then reads back {describe(got)} through the mount")
        fetched = dfs_get(procs, path, tmp_path / "got")
        if fetched != data:
            what = fetched if isinstance(fetched, str) else f"{len(fetched)} wrong bytes"
            problems.append(f"{path}: closed, but `dfs get` gives {what}")
    problems += check_copies(procs, files)
    assert not problems, failure(pc, problems)
