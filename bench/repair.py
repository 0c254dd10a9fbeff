"""Time from a keeper's death to a healthy fsck, and the re-replication throughput.

Four keepers, replication 3, `--size-mb` of data in 16 MiB files; one keeper is SIGKILLed and
the clock runs until `dfs fsck` exits 0 again. The tracker declares the keeper dead after
`--dead-after-s`, so the figure is that silence plus the copying; the copying alone is
reported as MB/s of chunk data re-replicated (from the tracker's repair counters).

    python -m bench.repair [--size-mb 1024] [--dead-after-s 5]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from tests.cluster_procs import ProcCluster, wait_until
from tests.conftest import random_file

MiB = 1 << 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--dead-after-s", type=float, default=5.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dfs-repair-", dir="/var/tmp") as tmp:
        scratch = Path(tmp)
        (scratch / "cluster").mkdir()
        cluster = ProcCluster(scratch / "cluster", 3, 8 * MiB, 0.5, args.dead_after_s)
        try:
            cluster.start_tracker()
            for _ in range(4):
                cluster.add_keeper()
            cluster.wait_alive(4)
            files = max(1, args.size_mb // 16)
            source = random_file(scratch / "source", 16 * MiB)
            for i in range(files):
                cluster.dfs("put", str(source), f"/f{i}")
            wait_until(cluster.healthy, 60, "a healthy start")
            killed = time.monotonic()
            cluster.keepers[0].kill()
            wait_until(lambda: cluster.fsck()[0] != 0, 120, "fsck to notice the death")
            noticed = time.monotonic()
            wait_until(cluster.healthy, 3600, "repair")
            healed = time.monotonic()
            health = cluster.status()["health"]
        finally:
            cluster.stop()
    copied = health["bytes_copied"] / 1e6
    print(f"data: {files * 16} MiB in {files} files, replication 3, 4 keepers, one SIGKILLed")
    print(f"declared dead after {noticed - killed:.1f} s (dead_after_s = {args.dead_after_s})")
    print(f"healthy fsck {healed - killed:.1f} s after the kill")
    print(
        f"re-replicated {copied:.0f} MB in {healed - noticed:.1f} s:"
        f" {copied / max(healed - noticed, 1e-9):.0f} MB/s"
    )


if __name__ == "__main__":
    main()
