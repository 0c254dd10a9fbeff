"""`dfs-tracker`: run the tracker in the foreground until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from cluster import config
from cluster.auth import Credentials, SecretError
from cluster.logs import setup_logging
from cluster.rpc import split_addr
from cluster.tracker.server import Tracker

log = logging.getLogger("cluster.tracker")


async def _run(settings: dict[str, Any], credentials: Credentials) -> None:
    host, port = split_addr(str(settings["listen"]))
    tracker = Tracker(
        Path(str(settings["data"])),
        replication=int(settings["replication"]),
        chunk_size=int(settings["chunk_size"]),
        heartbeat_s=float(settings["heartbeat_s"]),
        dead_after_s=float(settings["dead_after_s"]),
        gc_grace_s=float(settings["gc_grace_s"]),
        credentials=credentials,
    )
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(tracker.run, host, port)
        # The ready line: tests and scripts read the bound port from it.
        print(f"dfs-tracker: listening on {host}:{bound}", file=sys.stderr, flush=True)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                log.info("%s: shutting down", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="dfs-tracker", description="Run the dfs tracker.")
    _, settings = config.parse(parser, "tracker", argv)
    setup_logging(str(settings["log_level"]), "dfs-tracker")
    if not settings["listen"]:
        settings["listen"] = str(settings["tracker"])
    if not settings["data"]:
        parser.exit(2, "dfs-tracker: --data DIR is required\n")
    try:
        credentials = Credentials.from_settings(settings, server=True)
    except (SecretError, OSError) as exc:
        parser.exit(2, f"dfs-tracker: {exc}\n")
    try:
        trio.run(_run, settings, credentials)
    except ValueError as exc:
        parser.exit(2, f"dfs-tracker: {exc}\n")
    except OSError as exc:
        parser.exit(1, f"dfs-tracker: {exc}\n")


if __name__ == "__main__":
    main()
