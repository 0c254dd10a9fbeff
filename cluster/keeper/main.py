"""`dfs-keeper`: serve chunks from a data directory and report to the tracker."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from cluster import config
from cluster.auth import Credentials, SecretError
from cluster.keeper.chunkstore import ChunkStore
from cluster.keeper.heartbeat import Heartbeat
from cluster.keeper.replicator import Replicator
from cluster.keeper.scrubber import Scrubber
from cluster.keeper.server import KeeperServer
from cluster.logs import setup_logging
from cluster.rpc import split_addr
from cluster.serve import ServeOptions, serve

log = logging.getLogger("cluster.keeper")


def keeper_id(data_dir: Path) -> str:
    """A keeper's identity lives with its data: a new disk is a new keeper."""
    path = data_dir / "keeper_id"
    if path.exists():
        return path.read_text().strip()
    value = uuid.uuid4().hex
    tmp = path.with_suffix(".tmp")
    tmp.write_text(value + "\n")
    tmp.rename(path)
    return value


async def _run(settings: dict[str, Any], credentials: Credentials) -> None:
    data_dir = Path(settings["data"])
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    store = ChunkStore(data_dir, settings["capacity"])
    await trio.to_thread.run_sync(store.scan)
    host, port = split_addr(settings["listen"])
    server = KeeperServer(store, credentials)
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(
            serve, server, host, port, ServeOptions(role="keeper", credentials=credentials)
        )
        server.addr = f"{host}:{bound}"
        replicator = Replicator(server, settings["replicate_rate_mb_s"])
        heartbeat = Heartbeat(
            server,
            replicator,
            settings["tracker"],
            keeper_id(data_dir),
            settings["zone"],
            settings["heartbeat_s"],
        )
        nursery.start_soon(heartbeat.run, name="heartbeat")
        nursery.start_soon(replicator.run, name="replicator")
        nursery.start_soon(Scrubber(server, settings["scrub_rate_mb_s"]).run, name="scrubber")
        print(f"dfs-keeper: serving on {server.addr}", file=sys.stderr, flush=True)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                log.info("%s: shutting down", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="dfs-keeper", description="Run a dfs keeper.")
    _, settings = config.parse(parser, "keeper", argv)
    setup_logging(settings["log_level"], "dfs-keeper")
    if not settings["listen"]:
        parser.exit(2, "dfs-keeper: --listen HOST:PORT is required\n")
    if not settings["data"]:
        parser.exit(2, "dfs-keeper: --data DIR is required\n")
    try:
        credentials = Credentials.from_settings(settings, server=True)
    except (SecretError, OSError) as exc:
        parser.exit(2, f"dfs-keeper: {exc}\n")
    try:
        trio.run(_run, settings, credentials)
    except OSError as exc:
        parser.exit(1, f"dfs-keeper: {exc}\n")


if __name__ == "__main__":
    main()
