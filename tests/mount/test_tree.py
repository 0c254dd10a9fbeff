"""Many files and real tools through the mount: cp -r, diff, tar, rm -rf, git, rsync, and a
directory of 10,000 entries."""

from __future__ import annotations

import os
import random
import subprocess
import time
from pathlib import Path

import pytest
import trio

from cluster.auth import Credentials
from cluster.client import ROOT_INO, Client
from tests.cluster_procs import ProcCluster, chunk_files
from tests.conftest import MakeCluster
from tests.mount.conftest import MountFactory

pytestmark = pytest.mark.mount

KiB = 1 << 10


def run(*argv: str | Path, cwd: Path | None = None) -> str:
    result = subprocess.run(
        [str(a) for a in argv], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"{argv}: {result.stdout}{result.stderr}"
    return result.stdout


def same_tree(a: Path, b: Path) -> None:
    """rsync as the oracle: checksums, permissions, times, links, hard links; no output = same."""
    diff = run("rsync", "-anciH", "--delete", f"{a}/", f"{b}/")
    assert diff == "", diff
    run("diff", "-r", "--no-dereference", a, b)


def small_tree(root: Path, rng: random.Random, dirs: int, files_per_dir: int) -> Path:
    for d in range(dirs):
        directory = root / f"dir{d:02d}"
        directory.mkdir(parents=True)
        for f in range(files_per_dir):
            size = rng.choice((0, 1, 100, 1000, 4096, rng.randrange(20 * KiB)))
            (directory / f"file{f:03d}.txt").write_bytes(rng.randbytes(size))
    return root


def wait_chunks_gone(cluster: ProcCluster, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        left = {k.name: len(chunk_files(k.data_dir)) for k in cluster.keepers}
        if not any(left.values()):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"chunks still on the keepers after rm -rf: {left}")
        time.sleep(0.2)


def test_cp_r_diff_tar_and_rm_rf_of_1000_files(
    make_cluster: MakeCluster, mount: MountFactory, tmp_path: Path
) -> None:
    cluster = make_cluster()
    m = mount(cluster)
    src = small_tree(tmp_path / "src", random.Random(2), dirs=20, files_per_dir=50)
    run("cp", "-r", src, m.path / "src")
    run("diff", "-r", src, m.path / "src")
    assert sum(len(files) for _, _, files in os.walk(m.path / "src")) == 1000

    run("tar", "-C", m.path, "-cf", tmp_path / "out.tar", "src")
    (tmp_path / "untarred").mkdir()
    run("tar", "-C", tmp_path / "untarred", "-xf", tmp_path / "out.tar")
    run("diff", "-r", src, tmp_path / "untarred" / "src")

    assert any(chunk_files(k.data_dir) for k in cluster.keepers)
    run("rm", "-rf", m.path / "src")
    assert os.listdir(m.path) == []
    wait_chunks_gone(cluster)


def test_tar_git_and_rsync_in_the_mount(
    make_cluster: MakeCluster, mount: MountFactory, tmp_path: Path
) -> None:
    cluster = make_cluster(chunk_size=256 * KiB)
    m = mount(cluster)
    rng = random.Random(10)
    src = small_tree(tmp_path / "src", rng, dirs=4, files_per_dir=20)
    (src / "big.bin").write_bytes(rng.randbytes(700 * KiB))  # several chunks
    (src / "empty").mkdir()
    (src / "link").symlink_to("dir00/file000.txt")
    (src / "dangling").symlink_to("no/such/file")
    os.link(src / "dir01" / "file001.txt", src / "hardlink")
    (src / "script.sh").write_text("#!/bin/sh\necho hi\n")
    (src / "script.sh").chmod(0o755)
    (src / "private").write_text("secret\n")
    (src / "private").chmod(0o600)

    # tar x into the mount
    run("tar", "-C", src, "-cf", tmp_path / "src.tar", ".")
    (m.path / "untar").mkdir()
    run("tar", "-C", m.path / "untar", "-xf", tmp_path / "src.tar")
    same_tree(src, m.path / "untar")

    # rsync in and out
    run("rsync", "-aH", f"{src}/", f"{m.path / 'rsynced'}/")
    same_tree(src, m.path / "rsynced")
    run("rsync", "-aH", f"{m.path / 'rsynced'}/", f"{tmp_path / 'back'}/")
    same_tree(src, tmp_path / "back")

    # git: init, add, commit, a second commit, gc (pack files), fsck, clone out
    repo = m.path / "repo"
    run("cp", "-a", src, repo)
    git = ("git", "-c", "user.name=dfs", "-c", "user.email=dfs@example.com", "-c", "gc.auto=0")
    run(*git, "init", "-q", cwd=repo)
    run(*git, "add", "-A", cwd=repo)
    run(*git, "commit", "-qm", "first", cwd=repo)
    (repo / "dir00" / "file000.txt").write_text("changed\n")
    run(*git, "commit", "-qam", "second", cwd=repo)
    run(*git, "gc", "-q", cwd=repo)
    run(*git, "fsck", "--full", "--strict", cwd=repo)
    assert run(*git, "status", "--porcelain", cwd=repo) == ""
    run(*git, "clone", "-q", repo, tmp_path / "clone")
    assert (tmp_path / "clone" / "dir00" / "file000.txt").read_text() == "changed\n"
    assert (tmp_path / "clone" / "big.bin").read_bytes() == (src / "big.bin").read_bytes()

    # The same, seen from another mount after this one is gone.
    m.unmount()
    other = mount(cluster, "other")
    same_tree(src, other.path / "rsynced")
    run(*git, "fsck", "--full", "--strict", cwd=other.path / "repo")


def test_directory_of_10000_entries(make_cluster: MakeCluster, mount: MountFactory) -> None:
    cluster = make_cluster(keepers=1, replication=1)
    names = {f"entry-{i:05d}-{'x' * (i % 40)}" for i in range(10_000)}

    async def create() -> None:
        credentials = Credentials.from_settings({"secret_file": str(cluster.secret_file)})
        async with Client.connect(cluster.tracker_addr, credentials) as client:
            directory = await client.mkdir(ROOT_INO, b"big", 0o755, os.getuid(), os.getgid())
            limit = trio.Semaphore(16)

            async def one(name: str) -> None:
                async with limit:
                    await client.mknod(
                        directory.ino, name.encode(), 0o100644, os.getuid(), os.getgid()
                    )

            async with trio.open_nursery() as nursery:
                for name in names:
                    nursery.start_soon(one, name)

    trio.run(create)
    m = mount(cluster)
    big = m.path / "big"
    assert set(os.listdir(big)) == names
    assert len(os.listdir(big)) == len(names)  # no duplicates either

    # Deleting while listing: every entry still present is seen exactly once.
    seen: list[str] = []
    deleted: set[str] = set()
    with os.scandir(big) as entries:
        for i, entry in enumerate(entries):
            seen.append(entry.name)
            if i % 2 == 0:
                os.unlink(entry.path)
                deleted.add(entry.name)
    assert len(seen) == len(set(seen)), "an entry was listed twice"
    assert set(seen) == names
    assert set(os.listdir(big)) == names - deleted
