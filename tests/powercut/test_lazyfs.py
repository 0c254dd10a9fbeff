"""The power-cut layer itself: it keeps what was fsynced and drops the rest, so that a test on
top of it fails when a server forgets an fsync."""

from __future__ import annotations

import mmap
import os
import sqlite3
import subprocess
import sys

from tests.powercut.conftest import Layer, LayerFactory, sync_dir, write_file


def power_cut(lazy: Layer) -> None:
    lazy.cut()
    lazy.start()


def test_fsynced_write_survives_and_unsynced_write_is_lost(layer: LayerFactory) -> None:
    lazy = layer("fs")
    root = lazy.mountpoint
    write_file(root / "a", b"durable", sync=True)
    sync_dir(root)
    write_file(root / "a", b" and more", sync=False, flags=os.O_APPEND)
    write_file(root / "b", b"never synced", sync=False)
    sync_dir(root)  # b's name is durable, its contents are not
    assert (root / "a").read_bytes() == b"durable and more"  # until the cut, all is there
    power_cut(lazy)
    assert (root / "a").read_bytes() == b"durable"
    assert (root / "b").read_bytes() == b""


def test_files_present_at_mount_start_durable(layer: LayerFactory) -> None:
    lazy = layer("fs")
    lazy.stop()
    (lazy.backing / "sub").mkdir()
    (lazy.backing / "sub" / "old").write_bytes(b"x" * 100_000)
    (lazy.backing / "gone").write_bytes(b"z" * 5000)
    lazy.start()
    root = lazy.mountpoint
    os.unlink(root / "gone")  # never changed, its last name goes: its bytes must be kept
    with open(root / "sub" / "old", "r+b") as f:  # an overwrite and a truncate, unsynced
        f.write(b"y" * 10)
        f.truncate(50_000)
    os.unlink(root / "sub" / "old")
    power_cut(lazy)
    assert (root / "sub" / "old").read_bytes() == b"x" * 100_000
    assert (root / "gone").read_bytes() == b"z" * 5000


def test_fdatasync_of_ranges_and_size(layer: LayerFactory) -> None:
    lazy = layer("fs")
    path = lazy.mountpoint / "f"
    write_file(path, bytes(range(256)) * 1024, sync=True)
    sync_dir(lazy.mountpoint)
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, b"A" * 10, 1000)
        os.ftruncate(fd, 100_000)
        os.pwrite(fd, b"B" * 10, 200_000)  # a hole from 100,000 on
        os.fdatasync(fd)
        os.pwrite(fd, b"C" * 10, 0)  # after the sync: lost
    finally:
        os.close(fd)
    expected = bytearray((bytes(range(256)) * 1024)[:100_000])
    expected[1000:1010] = b"A" * 10
    expected += bytes(100_000) + b"B" * 10
    power_cut(lazy)
    assert path.read_bytes() == expected


def test_new_file_needs_its_directory_fsynced(layer: LayerFactory) -> None:
    lazy = layer("fs")
    root = lazy.mountpoint
    (root / "d").mkdir()
    write_file(root / "d" / "f", b"data", sync=True)  # the file is synced, no directory is
    sync_dir(root / "d")  # d's names are durable, but d itself is not in root
    write_file(root / "g", b"data", sync=True)
    power_cut(lazy)
    assert sorted(os.listdir(root)) == []


def test_tmp_fsync_rename_fsync_dir_survives(layer: LayerFactory) -> None:
    lazy = layer("fs")
    root = lazy.mountpoint
    write_file(root / "config", b"old", sync=True)
    sync_dir(root)
    write_file(root / "config.tmp", b"new", sync=True)
    os.rename(root / "config.tmp", root / "config")
    sync_dir(root)
    power_cut(lazy)
    assert sorted(os.listdir(root)) == ["config"]
    assert (root / "config").read_bytes() == b"new"


def test_rename_without_directory_fsync_reverts(layer: LayerFactory) -> None:
    lazy = layer("fs")
    root = lazy.mountpoint
    (root / "a").mkdir()
    (root / "b").mkdir()
    write_file(root / "config", b"old", sync=True)
    write_file(root / "a" / "moved", b"m", sync=True)
    sync_dir(root / "a")
    sync_dir(root)
    write_file(root / "config.tmp", b"new", sync=True)
    os.rename(root / "config.tmp", root / "config")  # replaces, and the old inode goes
    os.rename(root / "a" / "moved", root / "b" / "moved")
    sync_dir(root / "b")  # only one side of the move is durable: it shows on both
    power_cut(lazy)
    assert sorted(os.listdir(root)) == ["a", "b", "config"]
    assert (root / "config").read_bytes() == b"old"
    assert (root / "a" / "moved").read_bytes() == b"m"
    assert (root / "b" / "moved").read_bytes() == b"m"


def test_unlink_and_links_and_symlinks(layer: LayerFactory) -> None:
    lazy = layer("fs")
    root = lazy.mountpoint
    write_file(root / "f", b"contents", sync=True)
    os.link(root / "f", root / "hard")
    os.symlink("f", root / "soft")
    (root / "empty").mkdir()
    sync_dir(root)
    os.unlink(root / "f")
    os.unlink(root / "hard")
    os.rmdir(root / "empty")
    power_cut(lazy)  # the unlinks were never made durable
    assert sorted(os.listdir(root)) == ["empty", "f", "hard", "soft"]
    assert os.stat(root / "f").st_ino == os.stat(root / "hard").st_ino
    assert os.readlink(root / "soft") == "f"
    assert (root / "soft").read_bytes() == b"contents"
    os.unlink(root / "hard")
    sync_dir(root)
    power_cut(lazy)
    assert sorted(os.listdir(root)) == ["empty", "f", "soft"]


def test_mmap_writes_reach_the_file_and_count_when_synced(layer: LayerFactory) -> None:
    lazy = layer("fs")
    path = lazy.mountpoint / "m"
    write_file(path, bytes(8192), sync=True)
    sync_dir(lazy.mountpoint)
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 8192) as m:
        m[0:5] = b"first"
        m.flush()
        os.fsync(f.fileno())
        m[4096:4102] = b"second"  # written back by the kernel, never fsynced
    assert path.read_bytes()[4096:4102] == b"second"
    power_cut(lazy)
    data = path.read_bytes()
    assert data[:5] == b"first"
    assert data[4096:4102] == bytes(6)


SQLITE_WRITER = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("PRAGMA journal_mode=WAL")
db.execute("PRAGMA synchronous=" + sys.argv[2])
db.execute("CREATE TABLE t (n INTEGER PRIMARY KEY, v BLOB)")
for n in range(200):
    db.execute("INSERT INTO t VALUES (?, randomblob(3000))", (n,))
print("committed", flush=True)
time.sleep(60)
"""


def test_sqlite_wal_full_keeps_committed_rows(layer: LayerFactory) -> None:
    """SQLite with synchronous=FULL fsyncs the WAL (and its directory, once) at each commit:
    every committed row survives the cut. (With synchronous=OFF the same run loses them.)"""
    lazy = layer("fs")
    db = lazy.mountpoint / "test.db"
    writer = subprocess.Popen(
        [sys.executable, "-c", SQLITE_WRITER, str(db), "FULL"], stdout=subprocess.PIPE
    )
    try:
        assert writer.stdout is not None
        assert writer.stdout.readline() == b"committed\n"
    finally:
        writer.kill()  # no clean close: no checkpoint
        writer.wait(timeout=10)
    power_cut(lazy)
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert conn.execute("SELECT COUNT(*) FROM t").fetchone() == (200,)
    conn.close()
