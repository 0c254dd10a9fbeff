"""`dfs-tracker`: run the tracker in the foreground until SIGINT or SIGTERM.

Start-up order: open the store, listen, then (optionally) the status page and metrics, and only
then the ready line on stderr and READY=1 to systemd. On SIGTERM: STOPPING=1, stop accepting,
finish the requests (commits) in flight, exit.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio
from prometheus_client import Gauge

from cluster import config, metrics
from cluster.auth import Credentials, SecretError
from cluster.errors import DfsError
from cluster.logs import setup_logging
from cluster.notify import notify
from cluster.rpc import split_addr
from cluster.tracker.server import Tracker

log = logging.getLogger("cluster.tracker")
SHUTDOWN_GRACE_S = 15.0


async def _export_gauges(tracker: Tracker) -> None:
    """Copy the tracker's state into gauges once a second (scrapes run on another thread,
    which must not touch trio state)."""
    keepers_alive = Gauge("dfs_keepers_alive", "Keepers heard from recently")
    chunks = Gauge("dfs_chunks", "Chunks in the namespace")
    degraded = Gauge("dfs_chunks_under_replicated", "Chunks below their goal")
    lost = Gauge("dfs_chunks_lost", "Chunks without a live copy")
    queue = Gauge("dfs_replication_queue", "Copies ordered and not yet done")
    while True:
        health = tracker.healer.health
        keepers_alive.set(len(tracker.registry.live()))
        chunks.set(health.chunks)
        degraded.set(health.degraded)
        lost.set(health.lost)
        queue.set(len(tracker.healer.in_flight))
        await trio.sleep(1)


async def _run(settings: dict[str, Any], credentials: Credentials) -> None:
    host, port = split_addr(str(settings["listen"]))
    tracker = Tracker(
        Path(str(settings["data"])),
        replication=int(settings["replication"]),
        chunk_size=int(settings["chunk_size"]),
        heartbeat_s=float(settings["heartbeat_s"]),
        dead_after_s=float(settings["dead_after_s"]),
        gc_grace_s=float(settings["gc_grace_s"]),
        store=str(settings["store"]),
        lease_s=float(settings["lease_s"]),
        lock_lease_s=float(settings["lock_lease_s"]),
        peers=config.addr_list(str(settings["tracker"])),
        credentials=credentials,
    )
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(tracker.run, host, port)
            if settings["http"]:
                from cluster.tracker.http import serve_http  # only loaded when asked for

                await nursery.start(serve_http, tracker, settings["http"])
            if settings["metrics"]:
                nursery.start_soon(_export_gauges, tracker, name="metrics")
                metrics.start(settings["metrics"])
            # The ready line: tests and scripts read the bound port from it.
            print(f"dfs-tracker: listening on {host}:{bound}", file=sys.stderr, flush=True)
            notify("READY=1")
            async for signum in signals:
                log.info(
                    "%s: finishing requests in flight (%s), then stopping",
                    signal.Signals(signum).name,
                    tracker.server.in_flight_summary(),
                )
                notify("STOPPING=1")
                tracker.shutdown()
                with trio.move_on_after(SHUTDOWN_GRACE_S):
                    await tracker.server.finished.wait()
                nursery.cancel_scope.cancel()
                break


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="dfs-tracker", description="Run the dfs tracker.")
    _, settings = config.parse(parser, "tracker", argv)
    setup_logging(str(settings["log_level"]), "dfs-tracker")
    if not settings["listen"]:
        trackers = config.addr_list(str(settings["tracker"]))
        if len(trackers) > 1:
            parser.exit(2, "dfs-tracker: --listen HOST:PORT is required with several trackers\n")
        settings["listen"] = trackers[0]
    if float(settings["lock_lease_s"]) < 1:
        parser.exit(2, "dfs-tracker: lock_lease_s must be at least 1\n")
    if float(settings["lease_s"]) < 2:
        parser.exit(2, "dfs-tracker: lease_s must be at least 2 (it is renewed every second)\n")
    if not settings["data"] and settings["store"] == "sqlite":
        parser.exit(2, "dfs-tracker: --data DIR is required (or --store postgresql://...)\n")
    try:
        credentials = Credentials.from_settings(settings, server=True)
    except (SecretError, OSError) as exc:
        parser.exit(2, f"dfs-tracker: {exc}\n")
    try:
        trio.run(_run, settings, credentials)
    except ValueError as exc:
        parser.exit(2, f"dfs-tracker: {exc}\n")
    except DfsError as exc:  # the metadata database is out of reach at the start
        parser.exit(1, f"dfs-tracker: {exc}\n")
    except OSError as exc:
        parser.exit(1, f"dfs-tracker: {exc}\n")
    log.info("stopped")


if __name__ == "__main__":
    main()
