"""Issue 17: the tracker's history (the last hour at 5 s, the last day at 1 min) as charts on
the status page and as JSON at /api/history, after a real workload, in headless Chromium."""

from __future__ import annotations

import json
import re
import subprocess
import threading
import urllib.request
from pathlib import Path
from typing import Any

import trio

from tests.cluster_procs import free_port, wait_until
from tests.conftest import MakeCluster, random_file

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"


def _get(port: int, path: str) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as reply:
        body: bytes = reply.read()
        return body


def _history(port: int, span: str = "hour") -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(
        _get(port, f"/api/history?span={span}" if span else "/api/history")
    )
    return doc


def _peak(values: list[float | None]) -> float:
    return max((v for v in values if v is not None), default=0.0)


def test_history_charts_after_a_workload_in_headless_chromium(
    make_cluster: MakeCluster, tmp_path: Path
) -> None:
    port = free_port()
    cluster = make_cluster(
        keepers=3, replication=2, chunk_size=1 << 20, tracker_args=["--http", f"127.0.0.1:{port}"]
    )
    addrs = sorted(k.addr for k in cluster.keepers)
    # A keeper's rates start at the sample after the one that first sees it.
    wait_until(lambda: sorted(_history(port)["hour"]["keepers"]) == addrs, 20, "the keepers")
    # A workload: writes (put), reads (get), creates, lookups and commits.
    data = random_file(tmp_path / "data", 24 << 20)
    cluster.dfs("mkdir", "/w")
    for i in range(3):
        cluster.dfs("put", str(data), f"/w/f{i}")
    cluster.dfs("get", "/w/f0", str(tmp_path / "back"))
    cluster.dfs("ls", "/w")
    cluster.dfs("rm", "/w/f2")
    # A client that stays connected while samples are taken.
    stop = threading.Event()

    async def stay_connected() -> None:
        async with cluster.client() as client:
            await client.statfs()
            await trio.to_thread.run_sync(stop.wait)

    holder = threading.Thread(target=trio.run, args=(stay_connected,))
    holder.start()

    def drawn() -> bool:
        ring = _history(port)["hour"]
        cluster_series = ring["cluster"]
        keepers = ring["keepers"]
        return (
            len(ring["t"]) >= 3
            and _peak(cluster_series.get("write_mb_s", [])) > 0
            and _peak(cluster_series.get("read_mb_s", [])) > 0
            and _peak(cluster_series.get("commit_per_s", [])) > 0
            and _peak(cluster_series.get("create_per_s", [])) > 0
            and _peak(cluster_series.get("lookup_per_s", [])) > 0
            and sorted(keepers) == addrs
            and all(_peak(k.get("chunks", [])) > 0 for k in keepers.values())
            and _peak(cluster_series.get("clients", [])) >= 1
        )

    # Samples come every 5 s; the rates of the workload land in the one after it.
    try:
        wait_until(drawn, 40, "the workload in the history")
    finally:
        stop.set()
        holder.join(timeout=30)
    doc = _history(port)
    ring = doc["hour"]
    assert ring["step_s"] == 5
    assert ring["points"] == 720
    assert set(ring["cluster"]) >= {
        "read_mb_s", "write_mb_s", "create_per_s", "lookup_per_s", "unlink_per_s",
        "commit_per_s", "under_goal", "lost", "repair_mb_s", "repair_queue", "clients",
    }  # fmt: skip
    for series in ring["keepers"].values():
        assert set(series) == {"read_mb_s", "write_mb_s", "free_bytes", "chunks"}
        assert all(len(values) == len(ring["t"]) for values in series.values())
    # Three puts of 24 MiB with 2 copies each: at least that many bytes went to the keepers.
    times = ring["t"]
    written = sum(
        v * (times[i] - times[i - 1]) * 1e6
        for i, v in enumerate(ring["cluster"]["write_mb_s"])
        if v is not None and i > 0
    )
    assert written >= 2 * 3 * (24 << 20) * 0.99
    assert 0 < doc["memory_bytes"] < 1 << 20
    both = _history(port, "")  # no span: both rings
    assert "hour" in both
    assert "day" in both
    assert both["day"]["step_s"] == 60

    # The page: everything drawn on the tracker, nothing to fetch, charts with points.
    html = _get(port, "/").decode()
    assert "<script" not in html
    assert "<link" not in html
    assert "src=" not in html
    assert '<meta http-equiv="refresh"' in html
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "status-page-history.png"
    shot.unlink(missing_ok=True)
    chromium = [
        "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={tmp_path / 'chromium'}", "--virtual-time-budget=2000",
    ]  # fmt: skip
    dom = subprocess.run(
        [*chromium, "--dump-dom", f"http://127.0.0.1:{port}/"],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    charts = re.findall(r'<svg class="chart" data-points="(\d+)"[^>]*aria-label="([^"]+)"', dom)
    titles = {title: int(points) for points, title in charts}
    assert set(titles) >= {
        "Cluster throughput", "Metadata operations", "Chunk health", "Repair", "Clients",
        "Keeper reads", "Keeper writes", "Keeper free space", "Chunks held",
    }, titles  # fmt: skip
    for title in ("Cluster throughput", "Metadata operations", "Keeper writes", "Chunks held"):
        assert titles[title] >= 3, f"{title}: {titles[title]} points"
    drawn_paths = re.findall(r'<path class="series" data-series="([^"]+)" data-points="(\d+)"', dom)
    for addr in addrs:
        assert addr in dom
        assert any(label == addr and int(n) >= 2 for label, n in drawn_paths), addr
    subprocess.run(
        [*chromium, f"--screenshot={shot}", "--window-size=1200,1500", f"http://127.0.0.1:{port}/"],
        capture_output=True, timeout=120, check=True,
    )  # fmt: skip
    assert shot.stat().st_size > 10000
    day = _get(port, "/?span=day").decode()
    assert "last day" in day
    assert 'class="chart"' in day
