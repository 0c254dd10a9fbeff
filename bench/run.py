"""`make bench`: dfs against its ceiling and against ext4, all measured in the same run.

    python -m bench.run [--quick | --scale F] [--size-mb N] [--files N] [--creates N]
                        [--namespace-files N] [--memfs-writeback] [--only big|src|small]
                        [--no-hops | --hops-mb N] [--json PATH]

What it does: starts a local cluster (a tracker and three keepers, replication 2, otherwise
default settings) with its data in a scratch directory under /var/tmp, mounts it with
`dfs-mount`, mounts `bench.memfs` (a minimal in-memory pyfuse3 filesystem), and runs the same
workload on three targets, one after the other: a plain directory on the local ext4 disk that
also holds the keepers' data, memfs, and the dfs mount. Then it puts and gets the big file with the
`dfs` CLI, reads the peak RSS of dfs-mount and of every daemon, and, with
`--namespace-files N`, measures the tracker's create and lookup rates with N files
(`bench.namespace`), on SQLite and then on a PostgreSQL server started for the run, where it
also times the takeover of a standby tracker after SIGKILL of the active one.

Why three targets: absolute figures drift on shared machines, so each dfs figure is quoted as a
fraction of figures taken in the same run. memfs is the ceiling of any Python FUSE filesystem on
this machine (same pyfuse3 + trio stack, same mount options, no network, no disk): dfs/memfs is
what dfs's own work costs. ext4 is what users compare with: dfs/ext4 is what they notice.

The workload (sizes for the full run; `--quick` divides them by 16, `--scale` by anything):
- `cp` of a 1 GiB file of random bytes into the target, then `sync` (MB/s, 1 MB = 10^6 bytes);
  the source is read once beforehand so that its disk does not count;
- `cat` of it to /dev/null (MB/s), then (untimed) `cmp` with the source; dfs-mount is
  restarted before the `cat`, since it keeps the chunks it just uploaded in its read cache;
- `cp -r` of a tree of 2,000 files of 4 KiB (20 directories of 100), then `sync` (files/s);
- `ls -lR` of that tree, `tar c` of it (piped through `cat`, as GNU tar skips reading files it
  would write to /dev/null) and `rm -rf` of it (seconds);
- 5,000 empty files created in one directory (os.open + os.close), then stat-ed, then unlinked,
  one at a time (`bench.fileops`, ops/s);
- source trees: `tar x` of an archive of 3,000 real source files (this Python's standard
  library and installed packages, files of at most 64 KiB) then `sync`, `rm -rf` of the
  unpacked tree (cold), and `git clone` of this repository (file://) then `sync` (seconds);
- small synced writes (`bench.smallwrites`): 1,000 appends of 4 KiB with O_DSYNC, 300 writes
  of 4 KiB at random offsets of a 64 MiB file each followed by fsync, and 200 SQLite
  transactions of 50 rows in WAL mode (seconds); for dfs also the bytes the keepers wrote to
  disk per synced random write and copy (from /proc/PID/io, less the file's first 64 MiB);
- `dfs put` and `dfs get` of the big file (MB/s; the other columns repeat cp and cat);
- across hops (`bench.hops`, unless `--no-hops`): `cp` and `cat` of a 256 MiB file through a
  dfs mount whose client, tracker and keepers each sit in a network namespace of their own,
  joined by a userspace wire (this kernel has no sch_netem), first without delay or loss
  (what the wire itself costs), then with a 1 ms round trip and 0.5% of frames lost (MB/s,
  beside the loopback dfs figures of the same run; needs root and /dev/net/tun);
- dfs-mount's peak RSS while the big file is copied in and read back (the larger of the two
  mount processes' peaks), and each keeper's and the tracker's peak RSS over the whole run
  (MiB, from VmHWM in /proc/PID/status).

The phases that follow a write (cat, ls, tar, rm, stat, unlink) start from a cold cache: `sync`
and `echo 3 > /proc/sys/vm/drop_caches` (as root; otherwise the JSON says `cold_cache: false`).
That empties the kernel's page, dentry and inode caches for every target, and the keepers' page
cache too; memfs keeps its data in its own memory, which is the point of a ceiling.

Output: one table on stdout (each row: dfs, memfs, ext4, dfs/memfs, dfs/ext4; a fraction
below 1 means dfs is slower, also for rows measured in seconds or MiB, where it is the
reference divided by dfs), and the same as JSON (default bench/results/last.json), and a
screenshot of the tracker's status page (its history charts) after the run beside it
(`last.status.png`, headless Chromium).

Every phase has a deadline (`--phase-timeout`, or one derived from its size); whatever happens,
including Ctrl-C or SIGTERM, everything is unmounted and every process this started is stopped
by PID, and the scratch directory is removed (unless `--keep`, or if an unmount failed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import trio

from bench.hops import run_hops
from bench.procs import (
    BenchError,
    FuseMount,
    MiB,
    drop_caches,
    fstype,
    mounts_under,
    peak_rss_mib,
    reset_peak_rss,
    run_bounded,
    shell,
    write_bytes,
)
from bench.smallwrites import RANDOM_FILE_BYTES
from cluster import messages as m
from cluster.auth import Credentials
from cluster.errors import DfsError, NotActive
from cluster.rpc import ConnectionPool
from tests.cluster_procs import Daemon, ProcCluster, free_port
from tests.pg import PgServer

BIN = Path(sys.executable).parent
MB = 1_000_000
KEEPERS = 3
REPLICATION = 2
# The cluster's defaults (README, Configuration).
CHUNK_SIZE = 8 * MiB
HEARTBEAT_S = 2.0
DEAD_AFTER_S = 30.0
QUICK_SCALE = 1 / 16
FILES_PER_DIR = 100
# The repository `git clone` copies: this one.
REPO = Path(__file__).resolve().parents[1]
# The lease of the two trackers on PostgreSQL whose takeover is timed.
PG_LEASE_S = 3.0
SKIPPED_DIRS = {"__pycache__", "site-packages", "dist-packages"}
# Derived phase deadlines: a floor, plus the work at a rate far below anything acceptable.
DEADLINE_FLOOR_S = 60.0
DEADLINE_BYTES_PER_S = 4 * MB
DEADLINE_OPS_PER_S = 40.0


@dataclass(frozen=True)
class Sizes:
    big_bytes: int = 1024 * MiB
    files: int = 2000
    file_bytes: int = 4096
    creates: int = 5000
    appends: int = 1000
    random_writes: int = 300
    sqlite_txns: int = 200
    src_files: int = 3000
    hops_bytes: int = 256 * MiB

    def scaled(self, scale: float) -> Sizes:
        return Sizes(
            big_bytes=max(1, round(self.big_bytes / MiB * scale)) * MiB,
            files=max(10, round(self.files * scale)),
            file_bytes=self.file_bytes,
            creates=max(10, round(self.creates * scale)),
            appends=max(20, round(self.appends * scale)),
            random_writes=max(20, round(self.random_writes * scale)),
            sqlite_txns=max(10, round(self.sqlite_txns * scale)),
            src_files=max(50, round(self.src_files * scale)),
            hops_bytes=max(1, round(self.hops_bytes / MiB * scale)) * MiB,
        )

    @property
    def big_label(self) -> str:
        mib = self.big_bytes // MiB
        return f"{mib // 1024} GiB" if mib % 1024 == 0 else f"{mib} MiB"


@dataclass
class Row:
    key: str
    workload: str
    unit: str
    higher_is_better: bool
    dfs: float
    memfs: float | None = None
    ext4: float | None = None
    note: str = ""

    def fraction(self, reference: float | None) -> float | None:
        """dfs as a fraction of `reference`, in the direction where below 1 is worse."""
        if reference is None or reference <= 0 or self.dfs <= 0:
            return None
        return self.dfs / reference if self.higher_is_better else reference / self.dfs

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {
            "dfs_vs_memfs": self.fraction(self.memfs),
            "dfs_vs_ext4": self.fraction(self.ext4),
        }


Hook = Callable[[], None]


def _nothing() -> None:
    pass


@dataclass
class Hooks:
    """What a target needs done around the big-file phases (dfs: RSS and a fresh mount)."""

    before_cp: Hook = _nothing
    before_cat: Hook = _nothing
    after_cat: Hook = _nothing
    # Bytes the target's storage servers have written to disk so far (dfs: every keeper's
    # write_bytes from /proc/PID/io); None where there are none to ask.
    disk_bytes: Callable[[], int] | None = None


@dataclass
class Bench:
    """One run: the sources, the targets in order, what to undo, and the figures."""

    args: argparse.Namespace
    sizes: Sizes
    scratch: Path
    cleanups: list[tuple[str, Hook]] = field(default_factory=list)
    cold_cache: bool = True
    cluster: ProcCluster | None = None
    http_port: int = 0  # of the tracker's status page
    mounts: list[FuseMount] = field(default_factory=list)
    results: dict[str, dict[str, float]] = field(default_factory=dict)
    rss: dict[str, float] = field(default_factory=dict)
    namespace: dict[str, float] | None = None
    namespace_pg: dict[str, float] | None = None
    takeover_s: float | None = None
    phase: str = "setup"

    # --- helpers --------------------------------------------------------------------------

    def deadline(self, nbytes: int = 0, ops: int = 0) -> float:
        if self.args.phase_timeout:
            return float(self.args.phase_timeout)
        return DEADLINE_FLOOR_S + nbytes / DEADLINE_BYTES_PER_S + ops / DEADLINE_OPS_PER_S

    def cold(self) -> None:
        if not drop_caches():
            self.cold_cache = False

    def say(self, message: str) -> None:
        print(f"bench: {message}", file=sys.stderr, flush=True)

    @property
    def source(self) -> Path:
        return self.scratch / "src" / "big"

    @property
    def source_tree(self) -> Path:
        return self.scratch / "src" / "tree"

    def make_sources(self) -> None:
        """The big file and the tree, random bytes, on the scratch disk."""
        (self.scratch / "src").mkdir(exist_ok=True)
        with open(self.source, "wb") as out:
            left = self.sizes.big_bytes
            while left:
                n = min(left, 16 * MiB)
                out.write(os.urandom(n))
                left -= n
        for i in range(self.sizes.files):
            d = self.source_tree / f"d{i // FILES_PER_DIR:03d}"
            if i % FILES_PER_DIR == 0:
                d.mkdir(parents=True)
            (d / f"f{i:05d}").write_bytes(os.urandom(self.sizes.file_bytes))

    @property
    def source_archive(self) -> Path:
        return self.scratch / "src" / "source.tar"

    def make_source_archive(self) -> None:
        """A tar of `src_files` real source files: this Python's standard library, then its
        installed packages (files of at most 64 KiB, in name order)."""
        chosen: list[str] = []
        for top in (sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"]):
            for directory, subdirs, files in sorted(os.walk(top)):
                subdirs[:] = sorted(d for d in subdirs if d not in SKIPPED_DIRS)
                for name in sorted(files):
                    path = os.path.join(directory, name)
                    if (
                        os.path.isfile(path)
                        and not os.path.islink(path)
                        and os.path.getsize(path) <= 64 * 1024
                    ):
                        chosen.append(path)
                if len(chosen) >= self.sizes.src_files:
                    break
            if len(chosen) >= self.sizes.src_files:
                break
        chosen = chosen[: self.sizes.src_files]
        if len(chosen) < self.sizes.src_files:
            raise BenchError(f"only {len(chosen)} source files found for the archive")
        listing = self.scratch / "src" / "source.list"
        listing.write_text("".join(p.lstrip("/") + "\n" for p in chosen))
        run_bounded(
            ["tar", "-C", "/", "-cf", str(self.source_archive), "-T", str(listing)],
            self.deadline(),
            what="making the source archive",
        )

    def warm(self, path: Path) -> None:
        """Read `path` (a file or a tree) so that the copy does not wait for its disk."""
        q = shlex.quote(str(path))
        script = f"cat {q} > /dev/null" if path.is_file() else f"tar -cf - {q} | cat > /dev/null"
        shell(script, self.deadline(self.sizes.big_bytes), f"reading {path}")

    # --- the workload on one target -------------------------------------------------------

    def run_target(self, target: str, root: Path, hooks: Hooks | None = None) -> dict[str, float]:
        hooks = hooks or Hooks()
        r: dict[str, float] = {}
        if self.args.only in ("", "big"):
            r |= self.run_big_and_tree(target, root, hooks)
        if self.args.only in ("", "src"):
            r |= self.run_source_trees(target, root)
        if self.args.only in ("", "small"):
            r |= self.run_small_writes(target, root, hooks)
        return r

    def run_source_trees(self, target: str, root: Path) -> dict[str, float]:
        """What people do with source trees on a mounted file system: unpack an archive of
        real source files, remove the tree, clone a real git repository (this one)."""
        s, r = self.sizes, {}
        unpacked, clone = root / "unpacked", root / "clone"
        q = {name: shlex.quote(str(p)) for name, p in [("unpacked", unpacked), ("clone", clone)]}
        deadline = self.deadline(s.src_files * 32 * 1024, s.src_files)
        self.say(f"{target}: source trees")
        self.phase = f"{target}: tar x of {s.src_files} source files"
        self.warm(self.source_archive)
        unpacked.mkdir()
        archive = shlex.quote(str(self.source_archive))
        untar = f"tar -C {q['unpacked']} -xf {archive} && sync"
        r["src_untar_s"] = shell(untar, deadline, self.phase)
        found = sum(len(files) for _, _, files in os.walk(unpacked))
        if found != s.src_files:
            raise BenchError(f"{target}: tar x made {found} of {s.src_files} files")
        self.phase = f"{target}: rm -rf of the unpacked tree"
        self.cold()
        r["src_rm_s"] = shell(f"rm -rf {q['unpacked']}", deadline, self.phase)
        self.phase = f"{target}: git clone"
        repo = shlex.quote(f"file://{REPO}")
        r["git_clone_s"] = shell(
            f"git clone -q --no-hardlinks {repo} {q['clone']} && sync", deadline, self.phase
        )
        if not (clone / "bench" / "run.py").is_file():
            raise BenchError(f"{target}: the clone lacks bench/run.py")
        run_bounded(["rm", "-rf", str(clone)], deadline, what=f"{target}: rm the clone")
        return r

    def run_small_writes(self, target: str, root: Path, hooks: Hooks) -> dict[str, float]:
        """Synced appends, synced random writes and SQLite transactions (bench.smallwrites);
        for dfs also the keepers' disk bytes per synced random write and replica."""
        s, r = self.sizes, {}
        work = root / "small"
        work.mkdir()
        for op, count, key in [
            ("append", s.appends, "small_append_s"),
            ("random", s.random_writes, "small_random_s"),
            ("sqlite", s.sqlite_txns, "small_sqlite_s"),
        ]:
            self.phase = f"{target}: {count} x {op} (bench.smallwrites)"
            self.say(self.phase)
            before = hooks.disk_bytes() if hooks.disk_bytes and op == "random" else 0
            _, out = run_bounded(
                [sys.executable, "-m", "bench.smallwrites", op, str(work), str(count)],
                self.deadline(64 * MiB, 4 * count),
                what=self.phase,
            )
            r[key] = json.loads(out)["seconds"]
            if hooks.disk_bytes and op == "random":
                # The 64 MiB the file starts with is written first; subtract it per replica.
                written = hooks.disk_bytes() - before - REPLICATION * RANDOM_FILE_BYTES
                r["small_random_disk_bytes"] = max(0, written) / count / REPLICATION
        work.rmdir()
        return r

    def run_big_and_tree(self, target: str, root: Path, hooks: Hooks) -> dict[str, float]:
        s = self.sizes
        r: dict[str, float] = {}
        big, tree, creates = root / "big", root / "tree", root / "creates"
        q = {name: shlex.quote(str(p)) for name, p in [("big", big), ("tree", tree)]}

        self.phase = f"{target}: cp of the big file"
        self.say(self.phase)
        self.warm(self.source)
        hooks.before_cp()
        seconds = shell(
            f"cp {shlex.quote(str(self.source))} {q['big']} && sync",
            self.deadline(s.big_bytes),
            f"{target}: cp + sync",
        )
        if big.stat().st_size != s.big_bytes:
            raise BenchError(f"{target}: the copy has {big.stat().st_size} bytes")
        r["big_cp_mbs"] = s.big_bytes / MB / seconds

        self.phase = f"{target}: cat of the big file"
        hooks.before_cat()
        self.cold()
        seconds = shell(f"cat {q['big']} > /dev/null", self.deadline(s.big_bytes), self.phase)
        r["big_cat_mbs"] = s.big_bytes / MB / seconds
        hooks.after_cat()
        self.phase = f"{target}: checking the copy"
        # Untimed; mostly from the page cache that cat just filled, i.e. the bytes cat got.
        run_bounded(["cmp", str(self.source), str(big)], self.deadline(s.big_bytes), what="cmp")
        run_bounded(["rm", "-f", str(big)], self.deadline(), what=f"{target}: rm big")

        self.phase = f"{target}: cp -r of the tree"
        self.say(f"{target}: the tree")
        self.warm(self.source_tree)
        seconds = shell(
            f"cp -r {shlex.quote(str(self.source_tree))} {q['tree']} && sync",
            self.deadline(s.files * s.file_bytes, s.files),
            self.phase,
        )
        copied = sum(len(files) for _, _, files in os.walk(tree))
        if copied != s.files:
            raise BenchError(f"{target}: cp -r copied {copied} of {s.files} files")
        r["tree_cp_files_s"] = s.files / seconds
        for key, script in [
            ("tree_ls_s", f"ls -lR {q['tree']} > /dev/null"),
            ("tree_tar_s", f"tar -C {shlex.quote(str(root))} -cf - tree | cat > /dev/null"),
            ("tree_rm_s", f"rm -rf {q['tree']}"),
        ]:
            self.phase = f"{target}: {script}"
            self.cold()
            r[key] = shell(script, self.deadline(s.files * s.file_bytes, s.files), self.phase)

        self.say(f"{target}: {s.creates} creates, stats, unlinks")
        creates.mkdir()
        for op in ("create", "stat", "unlink"):
            self.phase = f"{target}: {op} of {s.creates} files"
            if op != "create":
                self.cold()
            _, out = run_bounded(
                [sys.executable, "-m", "bench.fileops", op, str(creates), str(s.creates)],
                self.deadline(ops=s.creates),
                what=self.phase,
            )
            r[f"{op}_ops"] = s.creates / json.loads(out)["seconds"]
        creates.rmdir()
        return r

    # --- targets --------------------------------------------------------------------------

    def on_cleanup(self, what: str, fn: Hook) -> None:
        self.cleanups.append((what, fn))

    def mount(
        self, name: str, path: Path, argv: list[str], env: dict[str, str] | None = None
    ) -> FuseMount:
        """Start a FUSE process whose `argv` mounts at `path`; unmounted at cleanup."""
        self.phase = f"mounting {name}"
        m = FuseMount(name, path, argv, self.scratch / f"{name}.log", env)
        self.mounts.append(m)
        self.on_cleanup(f"unmount {name}", m.stop)
        m.start()
        return m

    def run_ext4(self) -> None:
        root = self.scratch / "ext4"
        root.mkdir()
        self.results["ext4"] = self.run_target("ext4", root)

    def run_memfs(self) -> None:
        path = self.scratch / "mnt-memfs"
        argv = [sys.executable, "-m", "bench.memfs", str(path)]
        if self.args.memfs_writeback:
            argv.append("--writeback")
        m = self.mount("memfs", path, argv)
        self.results["memfs"] = self.run_target("memfs", m.path)
        self.stop_mount(m)  # frees its memory before dfs runs

    def start_cluster(self) -> ProcCluster:
        self.phase = "starting the cluster"
        root = self.scratch / "cluster"
        root.mkdir()
        self.http_port = free_port()
        cluster = ProcCluster(
            root,
            REPLICATION,
            CHUNK_SIZE,
            HEARTBEAT_S,
            DEAD_AFTER_S,
            tracker_args=["--http", f"127.0.0.1:{self.http_port}"],
        )
        self.cluster = cluster
        self.on_cleanup("stop the cluster", cluster.stop)
        # The daemons start with SIGINT blocked (the mask survives exec), so that a Ctrl-C at
        # the terminal reaches only this process: stopping the tracker before dfs-mount has
        # unmounted would make the mount's last calls retry for retry_window_s.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            cluster.start_tracker()
            for _ in range(KEEPERS):
                cluster.add_keeper()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        cluster.wait_alive(KEEPERS)
        return cluster

    def run_dfs(self, cluster: ProcCluster) -> None:
        path = self.scratch / "mnt-dfs"
        argv = [str(BIN / "dfs-mount"), str(path), "--tracker", cluster.tracker_addr]
        argv.append("--foreground")
        m = self.mount("dfs-mount", path, argv, cluster.env)

        def before_cp() -> None:
            if not reset_peak_rss(m.pid):
                self.say("cannot reset dfs-mount's peak RSS: it includes start-up")

        def before_cat() -> None:
            # dfs-mount keeps the chunks it uploaded in its read cache (up to cache_mb); a
            # fresh mount makes the read as cold as the kernel's side after drop_caches.
            self.rss["mount_cp"] = peak_rss_mib(m.pid)
            self.stop_mount(m)
            self.phase = "remounting dfs"
            m.start()

        def after_cat() -> None:
            self.rss["mount_cat"] = peak_rss_mib(m.pid)
            self.rss["mount"] = max(self.rss["mount_cp"], self.rss["mount_cat"])

        def disk_bytes() -> int:
            return sum(write_bytes(k.pid) for k in cluster.keepers)

        hooks = Hooks(before_cp, before_cat, after_cat, disk_bytes)
        self.results["dfs"] = self.run_target("dfs", m.path, hooks)
        self.phase = "unmounting dfs"
        self.stop_mount(m)

    def stop_mount(self, m: FuseMount) -> None:
        """Unmount; the process must exit 0 (it flushed everything) without a traceback."""
        m.stop()
        if m.proc is not None and m.proc.returncode != 0:
            raise BenchError(f"{m.name} exited with {m.proc.returncode}:\n{m.log_tail()}")
        if "Traceback" in m.log.read_text(errors="replace"):
            raise BenchError(f"{m.name} logged a traceback:\n{m.log_tail(60)}")

    def run_cli(self, cluster: ProcCluster) -> None:
        s = self.sizes
        dfs = [str(BIN / "dfs"), "--tracker", cluster.tracker_addr]
        back = self.scratch / "back"
        self.phase = "dfs put"
        self.say("dfs put / dfs get")
        self.warm(self.source)
        put, _ = run_bounded(
            [*dfs, "put", str(self.source), "/cli-big"],
            self.deadline(s.big_bytes),
            env=cluster.env,
            what=self.phase,
        )
        self.phase = "dfs get"
        self.cold()
        get, _ = run_bounded(
            [*dfs, "get", "/cli-big", str(back)],
            self.deadline(s.big_bytes),
            env=cluster.env,
            what=self.phase,
        )
        self.phase = "checking dfs get"
        run_bounded(["cmp", str(self.source), str(back)], self.deadline(s.big_bytes), what="cmp")
        back.unlink()
        run_bounded([*dfs, "rm", "/cli-big"], self.deadline(), env=cluster.env, what="dfs rm")
        self.results["cli"] = {
            "cli_put_mbs": s.big_bytes / MB / put,
            "cli_get_mbs": s.big_bytes / MB / get,
        }

    def run_namespace(self, cluster: ProcCluster) -> dict[str, float]:
        n = self.args.namespace_files
        self.phase = f"namespace of {n} files"
        self.say(self.phase)
        _, out = run_bounded(
            [sys.executable, "-m", "bench.namespace", "--files", str(n)],
            self.deadline(ops=n) if self.args.phase_timeout else 120 + n / 200,
            env=cluster.env,
            what=self.phase,
        )
        figures: dict[str, float] = json.loads(out)
        return figures

    def run_postgres(self) -> None:
        """The tracker on PostgreSQL (a server started for the run, as the tests do): the
        same namespace figures as on SQLite, then the takeover time when the active tracker
        of two is SIGKILLed (until the standby answers a request)."""
        self.phase = "starting PostgreSQL"
        self.say(self.phase)
        server = PgServer()
        self.on_cleanup("stop PostgreSQL", server.stop)
        server.start()
        uri = server.uri(server.new_database())
        root = self.scratch / "cluster-pg"
        root.mkdir()
        cluster = ProcCluster(
            root,
            REPLICATION,
            CHUNK_SIZE,
            HEARTBEAT_S,
            DEAD_AFTER_S,
            tracker_args=["--store", uri, "--lease-s", str(PG_LEASE_S)],
        )
        self.on_cleanup("stop the PostgreSQL cluster", cluster.stop)
        cluster.start_tracker()
        self.namespace_pg = self.run_namespace(cluster)
        self.phase = "takeover after SIGKILL of the active tracker"
        self.say(self.phase)
        standby = cluster.add_tracker()
        assert cluster.tracker is not None
        credentials = Credentials.from_settings({"secret_file": str(cluster.secret_file)})
        self.takeover_s = trio.run(_takeover, cluster.tracker, standby.addr, credentials)

    def screenshot_status_page(self) -> None:
        """The tracker's status page after the run, as a PNG beside the JSON (headless
        Chromium); a failure is reported, not fatal: the figures are the point."""
        self.phase = "screenshot of the status page"
        shot = Path(self.args.json).with_suffix(".status.png")
        shot.parent.mkdir(parents=True, exist_ok=True)
        argv = [
            "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={self.scratch / 'chromium'}", "--virtual-time-budget=2000",
            f"--screenshot={shot}", "--window-size=1200,1500",
            f"http://127.0.0.1:{self.http_port}/",
        ]  # fmt: skip
        try:
            run_bounded(argv, 120, what=self.phase)
            self.say(f"status page after the run: {shot}")
        except (BenchError, OSError) as exc:
            self.say(f"no screenshot of the status page: {exc}")

    def run(self) -> None:
        self.phase = "making the source files"
        self.say(f"scratch directory {self.scratch}; sizes {self.sizes}")
        if self.args.only in ("", "big"):
            self.make_sources()
        if self.args.only in ("", "src"):
            (self.scratch / "src").mkdir(exist_ok=True)
            self.make_source_archive()
        self.run_ext4()
        self.run_memfs()
        cluster = self.start_cluster()
        self.run_dfs(cluster)
        if self.args.only in ("", "big"):
            self.run_cli(cluster)
        if self.args.only in ("", "big") and not self.args.no_hops:
            self.results["hops"] = run_hops(self, HEARTBEAT_S, DEAD_AFTER_S)
        if self.args.namespace_files:
            self.namespace = self.run_namespace(cluster)
        self.screenshot_status_page()
        if self.args.namespace_files:
            self.run_postgres()
        assert cluster.tracker is not None
        self.rss["tracker"] = peak_rss_mib(cluster.tracker.pid)
        for i, keeper in enumerate(cluster.keepers):
            self.rss[f"keeper{i}"] = peak_rss_mib(keeper.pid)

    def cleanup(self) -> list[str]:
        """Undo everything, newest first; returns what failed (never raises)."""
        failed = []
        while self.cleanups:
            what, fn = self.cleanups.pop()
            try:
                fn()
            except Exception as exc:
                failed.append(f"{what}: {exc}")
        return failed

    def logs(self) -> str:
        parts = [f"--- {m.name} log (end)\n{m.log_tail()}" for m in self.mounts]
        if self.cluster is not None:
            for daemon in [self.cluster.tracker, *self.cluster.keepers]:
                if daemon is not None:
                    tail = "\n".join(daemon.logs().splitlines()[-10:])
                    parts.append(f"--- {daemon.name} log (end)\n{tail}")
        return "\n".join(parts)

    # --- report ---------------------------------------------------------------------------

    def rows(self) -> list[Row]:
        s = self.sizes
        dfs, mem, ext = self.results["dfs"], self.results["memfs"], self.results["ext4"]
        n, c = s.files, s.creates

        def both(key: str, label: str, unit: str, higher: bool = True) -> Row:
            return Row(key, label, unit, higher, dfs[key], mem[key], ext[key])

        rows: list[Row] = []
        if "big_cp_mbs" in dfs:
            rows += [
                both("big_cp_mbs", f"cp {s.big_label} file + sync", "MB/s"),
                both("big_cat_mbs", f"cat {s.big_label} file, cold", "MB/s"),
                both("tree_cp_files_s", f"cp -r {n} x 4 KiB + sync", "files/s"),
                both("tree_ls_s", f"ls -lR {n}-file tree, cold", "s", higher=False),
                both("tree_tar_s", f"tar c {n}-file tree, cold", "s", higher=False),
                both("tree_rm_s", f"rm -rf {n}-file tree, cold", "s", higher=False),
                both("create_ops", f"create {c} empty, one dir", "ops/s"),
                both("stat_ops", f"stat {c}, cold", "ops/s"),
                both("unlink_ops", f"unlink {c}, cold", "ops/s"),
            ]
        if "src_untar_s" in dfs:
            m = s.src_files
            rows += [
                both("src_untar_s", f"tar x {m} source files + sync", "s", higher=False),
                both("src_rm_s", f"rm -rf {m} source files, cold", "s", higher=False),
                both("git_clone_s", "git clone of this repository + sync", "s", higher=False),
            ]
        if "small_append_s" in dfs:
            rows += [
                both("small_append_s", f"{s.appends} x 4 KiB O_DSYNC appends", "s", False),
                both(
                    "small_random_s", f"{s.random_writes} x 4 KiB write+fsync in 64 MiB", "s", False
                ),
                both("small_sqlite_s", f"SQLite WAL, {s.sqlite_txns} x 50-row txns", "s", False),
                Row(
                    "small_random_disk_bytes",
                    "keeper disk bytes per synced 4 KiB write",
                    "B/copy",
                    False,
                    dfs["small_random_disk_bytes"],
                    note="/proc/PID/io write_bytes",
                ),
            ]
        cli = self.results.get("cli")
        if cli is not None:
            rows += [
                Row(
                    "cli_put_mbs",
                    f"dfs put {s.big_label}",
                    "MB/s",
                    True,
                    cli["cli_put_mbs"],
                    mem["big_cp_mbs"],
                    ext["big_cp_mbs"],
                    "memfs, ext4: cp + sync",
                ),
                Row(
                    "cli_get_mbs",
                    f"dfs get {s.big_label}",
                    "MB/s",
                    True,
                    cli["cli_get_mbs"],
                    mem["big_cat_mbs"],
                    ext["big_cat_mbs"],
                    "memfs, ext4: cat, cold",
                ),
            ]
        hops = self.results.get("hops")
        if hops is not None:
            size = f"{s.hops_bytes // MiB} MiB"
            ops = [("cp", " + sync", "big_cp_mbs"), ("cat", "", "big_cat_mbs")]
            for setting, label in [("bare", "bare wire"), ("lossy", "1 ms, 0.5% loss")]:
                for op, extra, loopback in ops:
                    rows.append(
                        Row(
                            f"hops_{setting}_{op}_mbs",
                            f"{op} {size}{extra}, hops: {label}",
                            "MB/s",
                            True,
                            hops[f"hops_{setting}_{op}_mbs"],
                            note=f"loopback {_num(dfs.get(loopback))} MB/s ({op} {s.big_label})",
                        )
                    )
        if "mount" in self.rss:
            rows.append(
                Row(
                    "mount_rss_mib",
                    "dfs-mount peak RSS, big cp / cat",
                    "MiB",
                    False,
                    self.rss["mount"],
                    note="VmHWM",
                )
            )
        rows.append(
            Row("tracker_rss_mib", "tracker peak RSS, whole run", "MiB", False, self.rss["tracker"])
        )
        for i in range(KEEPERS):
            rows.append(
                Row(
                    f"keeper{i}_rss_mib",
                    f"keeper{i} peak RSS, whole run",
                    "MiB",
                    False,
                    self.rss[f"keeper{i}"],
                )
            )
        for prefix, store, ns in [
            ("ns", "", self.namespace),
            ("ns_pg", " (PG)", self.namespace_pg),
        ]:
            if ns is None:
                continue
            files = int(ns["files"])
            inflight = int(ns["concurrency"])
            for key, label in [
                (
                    "fill_creates_per_s",
                    f"tracker{store}: fill to {files} files, {inflight} in flight",
                ),
                ("creates_per_s", f"tracker{store} create at {files}, {inflight} in flight"),
                ("serial_creates_per_s", f"tracker{store} create at {files}, 1 in flight"),
                ("lookups_per_s", f"tracker{store} lookup at {files}, {inflight} in flight"),
                ("serial_lookups_per_s", f"tracker{store} lookup at {files}, 1 in flight"),
            ]:
                rows.append(Row(f"{prefix}_{key}", label, "ops/s", True, ns[key]))
        if self.takeover_s is not None:
            rows.append(
                Row(
                    "pg_takeover_s",
                    f"takeover after SIGKILL, lease {PG_LEASE_S:g} s",
                    "s",
                    False,
                    self.takeover_s,
                    note="until the standby answers",
                )
            )
        return rows


def _num(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _frac(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def table(rows: list[Row]) -> str:
    head = (
        f"{'workload':<46} {'unit':<7} {'dfs':>8} {'memfs':>8} {'ext4':>8}"
        f" {'dfs/memfs':>9} {'dfs/ext4':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        line = (
            f"{r.workload:<46} {r.unit:<7} {_num(r.dfs):>8} {_num(r.memfs):>8} {_num(r.ext4):>8}"
            f" {_frac(r.fraction(r.memfs)):>9} {_frac(r.fraction(r.ext4)):>8}"
        )
        lines.append(line + (f"  ({r.note})" if r.note else ""))
    return "\n".join(lines)


def _git_revision() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description="dfs against an in-memory FUSE ceiling and ext4, in one run.",
    )
    parser.add_argument("--quick", action="store_true", help=f"--scale {QUICK_SCALE}")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every size")
    parser.add_argument("--size-mb", type=int, help="big file in MiB (default 1024, scaled)")
    parser.add_argument("--hops-mb", type=int, help="file across hops in MiB (default 256, scaled)")
    parser.add_argument("--files", type=int, help="files in the tree (default 2000, scaled)")
    parser.add_argument("--creates", type=int, help="empty creates (default 5000, scaled)")
    parser.add_argument(
        "--namespace-files",
        type=int,
        default=0,
        help="tracker create/lookup rates with this many files (default 0: skip; goal 1000000)",
    )
    parser.add_argument(
        "--memfs-writeback",
        action="store_true",
        help="mount memfs with the writeback cache (dfs-mount has it off)",
    )
    parser.add_argument("--json", default="bench/results/last.json", help="where to write JSON")
    parser.add_argument("--scratch-dir", default="/var/tmp", help="on the disk to compare with")
    parser.add_argument(
        "--phase-timeout", type=float, default=0, help="seconds per phase (default: by size)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    parser.add_argument(
        "--no-hops",
        action="store_true",
        help="skip cp/cat across network namespaces and the lossy userspace wire (needs root)",
    )
    parser.add_argument(
        "--only",
        choices=["big", "src", "small"],
        default="",
        help="only the big-file, tree and metadata phases, the source trees (tar x, rm -rf,"
        " git clone), or the small synced writes",
    )
    args = parser.parse_args(argv)
    if args.scale <= 0:
        parser.error("--scale must be positive")
    return args


async def _takeover(active: Daemon, standby: str, credentials: Credentials) -> float:
    """SIGKILL `active`; seconds until `standby` answers a request as the active tracker."""
    pool = ConnectionPool("client", credentials)
    try:
        deadline = time.monotonic() + 10
        while True:  # the standby is up and standing by
            try:
                await pool.call(standby, m.GetAttr(ino=1), m.AttrReply)
                raise BenchError("the second tracker answered while the first was active")
            except NotActive:
                break
            except DfsError:
                if time.monotonic() > deadline:
                    raise
                await trio.sleep(0.05)
        started = time.monotonic()
        active.kill()
        while True:
            try:
                await pool.call(standby, m.GetAttr(ino=1), m.AttrReply)
                return time.monotonic() - started
            except DfsError:
                if time.monotonic() - started > 60:
                    raise BenchError("no takeover within 60 s") from None
                await trio.sleep(0.02)
    finally:
        await pool.aclose()


def sizes_from(args: argparse.Namespace) -> Sizes:
    sizes = Sizes().scaled(QUICK_SCALE if args.quick else args.scale)
    if args.size_mb:
        sizes = dataclasses.replace(sizes, big_bytes=args.size_mb * MiB)
    if args.hops_mb:
        sizes = dataclasses.replace(sizes, hops_bytes=args.hops_mb * MiB)
    if args.files:
        sizes = dataclasses.replace(sizes, files=args.files)
    if args.creates:
        sizes = dataclasses.replace(sizes, creates=args.creates)
    return sizes


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = sizes_from(args)
    started = time.time()
    signal.signal(signal.SIGTERM, _terminate)
    scratch = Path(tempfile.mkdtemp(prefix="dfs-bench-", dir=args.scratch_dir))
    bench = Bench(args, sizes, scratch)
    error = ""
    try:
        bench.run()
    except KeyboardInterrupt:
        error = f"interrupted during {bench.phase}"
    except BenchError as exc:
        error = f"failed during {bench.phase}: {exc}"
    except Exception as exc:  # a bug here or in the cluster: say where, with the traceback
        error = f"failed during {bench.phase}: {exc!r}\n{traceback.format_exc()}"
    finally:
        # Cleaning up must not be cut short by a second Ctrl-C.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            if error:
                print(bench.logs(), file=sys.stderr)
            problems = bench.cleanup()
            left = mounts_under(scratch)
            if left:
                problems.append(f"still mounted: {', '.join(left)}; {scratch} kept")
            elif not args.keep:
                shutil.rmtree(scratch, ignore_errors=True)
            for problem in problems:
                print(f"bench: cleanup: {problem}", file=sys.stderr)
        finally:
            signal.signal(signal.SIGINT, previous)
    if error:
        print(f"bench: {error}", file=sys.stderr)
        return 130 if error.startswith("interrupted") else 1

    rows = bench.rows()
    report = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "seconds": round(time.time() - started, 1),
        "revision": _git_revision(),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "sizes": asdict(sizes),
        "cold_cache": bench.cold_cache,
        "reference_dir": args.scratch_dir,
        "reference_fstype": fstype(Path(args.scratch_dir)),
        "memfs_writeback": args.memfs_writeback,
        "cluster": {"keepers": KEEPERS, "replication": REPLICATION, "chunk_size": CHUNK_SIZE},
        "peak_rss_mib": bench.rss,
        "namespace": bench.namespace,
        "namespace_postgresql": bench.namespace_pg,
        "takeover_s": bench.takeover_s,
        "hops": bench.results.get("hops"),
        "rows": [r.as_dict() for r in rows],
    }
    print(table(rows))
    notes = [
        "dfs/x: dfs as a fraction of x, below 1 when dfs is slower (or bigger, or takes longer)",
        f"ext4: a directory in {args.scratch_dir} ({report['reference_fstype']})",
    ]
    if not bench.cold_cache:
        notes.append("page cache NOT dropped (not root): read figures are warm")
    if args.memfs_writeback:
        notes.append("memfs with the writeback cache")
    if (hops := bench.results.get("hops")) is not None:
        notes.append(
            "across hops: client, tracker and keepers in network namespaces joined by a userspace"
            f" wire (tests/wire.py); measured RTT {hops['hops_rtt_ms']:.2f} ms,"
            f" {hops['hops_loss']:.2%} of frames dropped"
        )
    notes.append(f"the run took {report['seconds']:.0f} s")
    print("\n".join(notes))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
