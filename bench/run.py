"""`make bench`: dfs against a local ext4 directory, measured in the same run.

Starts a local cluster (three keepers, replication as given) in a scratch directory on the
same disk, then times each workload on dfs and on the local reference, and prints one table
with each figure and its ratio to the reference; the same goes to a JSON file. Absolute
figures drift on shared machines; the ratios are what to compare between runs.

    python -m bench.run [--size-mb 1024] [--replication 2] [--json bench/results/last.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from tests.cluster_procs import ProcCluster
from tests.conftest import random_file

MiB = 1 << 20


@dataclass
class Row:
    workload: str
    unit: str
    dfs: float
    reference: float
    reference_name: str

    @property
    def ratio(self) -> float:
        return self.dfs / self.reference if self.reference else 0.0


def drop_caches() -> None:
    subprocess.run(["sync"], check=False)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        pass  # not root: the figures then include a warm cache


def timed(fn: Callable[..., object], *args: object) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def run_cli(cluster: ProcCluster, scratch: Path, size: int) -> list[Row]:
    source = random_file(scratch / "source", size)
    local_dir = scratch / "local"
    local_dir.mkdir()

    def local_copy() -> None:
        shutil.copyfile(source, local_dir / "copy")
        fd = os.open(local_dir / "copy", os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)

    drop_caches()
    ref_write = timed(local_copy)
    drop_caches()
    put = timed(cluster.dfs, "put", str(source), "/bench")
    drop_caches()
    ref_read = timed(_cat, local_dir / "copy")
    drop_caches()
    get = timed(cluster.dfs, "get", "/bench", str(scratch / "back"))
    if not _same(source, scratch / "back"):
        raise SystemExit("dfs get returned different bytes")
    mb = size / MiB
    return [
        Row("dfs put (1 file)", "MB/s", mb / put, mb / ref_write, "cp + fsync to ext4"),
        Row("dfs get (1 file)", "MB/s", mb / get, mb / ref_read, "cat from ext4, cold"),
    ]


def _cat(path: Path) -> None:
    subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)


def _same(a: Path, b: Path) -> bool:
    return subprocess.run(["cmp", "-s", str(a), str(b)], check=False).returncode == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--replication", type=int, default=2)
    parser.add_argument("--json", default="bench/results/last.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dfs-bench-", dir="/var/tmp") as tmp:
        scratch = Path(tmp)
        cluster = ProcCluster(scratch / "cluster", args.replication, 8 * MiB, 1.0, 30.0)
        (scratch / "cluster").mkdir()
        try:
            cluster.start_tracker()
            for _ in range(3):
                cluster.add_keeper()
            cluster.wait_alive(3)
            rows = run_cli(cluster, scratch, args.size_mb * MiB)
        finally:
            cluster.stop()
    print(f"{'workload':<24} {'dfs':>10} {'reference':>10} {'ratio':>6}  reference")
    for row in rows:
        print(
            f"{row.workload:<24} {row.dfs:>8.0f} {row.unit[:2]}"
            f" {row.reference:>8.0f} {row.unit[:2]} {row.ratio:>6.2f}  {row.reference_name}"
        )
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps([asdict(r) | {"ratio": r.ratio} for r in rows], indent=2))


if __name__ == "__main__":
    main()
