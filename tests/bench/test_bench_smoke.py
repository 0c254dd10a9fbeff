"""The benchmark's smoke test: `python -m bench.run --quick` completes and reports every row.

This is the only place CI runs the benchmark. It asserts completion, clean-up and the format
of the JSON report, never speed: figures on a shared CI machine mean nothing, and the full
run (`make bench`) is for people comparing ratios between runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.procs import mounts_under

ROOT = Path(__file__).resolve().parents[2]
# The quick run takes well under a minute on 2 cores; this only stops a hung run.
TIMEOUT_S = 300
NAMESPACE_FILES = 100
# Rows measured on all three targets.
COMPARED = [
    "big_cp_mbs",
    "big_cat_mbs",
    "tree_cp_files_s",
    "tree_ls_s",
    "tree_tar_s",
    "tree_rm_s",
    "create_ops",
    "stat_ops",
    "unlink_ops",
    "src_untar_s",
    "src_rm_s",
    "git_clone_s",
    "small_append_s",
    "small_random_s",
    "small_sqlite_s",
    "cli_put_mbs",
    "cli_get_mbs",
]
DFS_ONLY = [
    "small_random_disk_bytes",
    "mount_rss_mib",
    "tracker_rss_mib",
    "keeper0_rss_mib",
    "keeper1_rss_mib",
    "keeper2_rss_mib",
    "ns_fill_creates_per_s",
    "ns_creates_per_s",
    "ns_serial_creates_per_s",
    "ns_lookups_per_s",
    "ns_serial_lookups_per_s",
    "ns_pg_fill_creates_per_s",
    "ns_pg_creates_per_s",
    "ns_pg_serial_creates_per_s",
    "ns_pg_lookups_per_s",
    "ns_pg_serial_lookups_per_s",
    "pg_takeover_s",
    "hops_bare_cp_mbs",
    "hops_bare_cat_mbs",
    "hops_lossy_cp_mbs",
    "hops_lossy_cat_mbs",
]


def positive(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


@pytest.mark.mount
def test_quick_run_reports_every_row(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.run",
            "--quick",
            "--hops-mb",
            "16",
            "--namespace-files",
            str(NAMESPACE_FILES),
            "--scratch-dir",
            str(scratch),
            "--json",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    # Everything unmounted and removed.
    assert mounts_under(tmp_path) == []
    assert list(scratch.iterdir()) == []

    report = json.loads(out.read_text())
    assert report["sizes"]["big_bytes"] == 64 << 20
    assert positive(report["seconds"])
    rows = {row["key"]: row for row in report["rows"]}
    assert sorted(rows) == sorted(COMPARED + DFS_ONLY)
    for key in COMPARED:
        row = rows[key]
        for column in ("dfs", "memfs", "ext4", "dfs_vs_memfs", "dfs_vs_ext4"):
            assert positive(row[column]), (key, column, row)
    for key in DFS_ONLY:
        row = rows[key]
        assert positive(row["dfs"]), (key, row)
        assert (row["memfs"], row["ext4"]) == (None, None), (key, row)
    for row in report["rows"]:
        assert row["unit"] in {"MB/s", "files/s", "ops/s", "s", "MiB", "B/copy"}, row
        assert row["workload"] in result.stdout  # the table has every row
    assert report["namespace"]["files"] == NAMESPACE_FILES


def test_du_bench_counts_its_tree(tmp_path: Path) -> None:
    """`python -m bench.du` on a small tree: it builds, starts a tracker, checks `dfs du`'s
    answer against what it built (it exits non-zero otherwise) and reports its figures."""
    result = subprocess.run(
        [sys.executable, "-m", "bench.du", "--files", "3000", "--per-dir", "100",
         "--repeat", "1", "--keep", str(tmp_path)],
        capture_output=True, text=True, timeout=TIMEOUT_S, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["files"] == 3000
    assert report["dirs"] == 1 + 1 + 30  # /bench, one group, 30 leaves
    for key in ("build_s", "dfs_du_cli_s", "du_request_ms", "count_from_scratch_s"):
        assert positive(report[key]), (key, report)
