"""`dfs-keeper`: serve chunks from a data directory and report to the tracker."""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from cluster import config, metrics
from cluster.auth import Credentials, SecretError
from cluster.keeper.chunkstore import ChunkStore
from cluster.keeper.heartbeat import Heartbeat
from cluster.keeper.replicator import Replicator
from cluster.keeper.scrubber import Scrubber
from cluster.keeper.server import KeeperServer
from cluster.logs import setup_logging
from cluster.notify import notify
from cluster.rpc import split_addr
from cluster.serve import ServeOptions, Server

log = logging.getLogger("cluster.keeper")
GOODBYE_TIMEOUT_S = 2.0
SHUTDOWN_GRACE_S = 30.0  # long enough to finish a chunk transfer in flight


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def return_big_buffers_to_the_os() -> None:
    """Fix glibc's mmap threshold at 1 MiB.

    Chunk buffers are megabytes. glibc raises its mmap threshold each time such a buffer is
    freed, so later ones come from the heap, which never shrinks: a loaded keeper then held
    about 200 MiB. With a fixed threshold they are mapped and unmapped (the payload pool keeps
    the hot ones): measured under `make bench`, peak RSS 200 -> 130 MiB at the same MB/s.
    """
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):
        log.info("not glibc: leaving malloc as it is")


def keeper_id(data_dir: Path) -> str:
    """A keeper's identity lives with its data: a new disk is a new keeper."""
    path = data_dir / "keeper_id"
    if path.exists():
        return path.read_text().strip()
    value = uuid.uuid4().hex
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as out:
        out.write(value + "\n")
        out.flush()
        os.fsync(out.fileno())
    tmp.rename(path)
    # On the disk before any chunk is: after a power cut the keeper must come back as itself.
    fd = os.open(data_dir, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return value


async def _run(settings: dict[str, Any], credentials: Credentials) -> None:
    data_dir = Path(settings["data"])
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    store = ChunkStore(data_dir, settings["capacity"])
    await trio.to_thread.run_sync(store.scan)
    host, port = split_addr(settings["listen"])
    keeper = KeeperServer(store, credentials, io_timeout_s=settings["io_timeout_s"])
    server = Server(keeper, ServeOptions(role="keeper", credentials=credentials))
    replicator = Replicator(keeper, settings["replicate_rate_mb_s"])
    scrubber = Scrubber(keeper, settings["scrub_rate_mb_s"])
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(server.run, host, port)
            keeper.addr = f"{host}:{bound}"
            heartbeat = Heartbeat(
                keeper,
                replicator,
                settings["tracker"],
                keeper_id(data_dir),
                settings["zone"],
                settings["heartbeat_s"],
            )
            nursery.start_soon(heartbeat.run, name="heartbeat")
            nursery.start_soon(replicator.run, name="replicator")
            nursery.start_soon(scrubber.run, name="scrubber")
            nursery.start_soon(store.write_back, name="write-back")
            nursery.start_soon(store.compact_loop, name="compaction")
            if settings["metrics"]:
                _register_gauges(store, scrubber, server)
                metrics.start(settings["metrics"])
            print(f"dfs-keeper: serving on {keeper.addr}", file=sys.stderr, flush=True)
            notify("READY=1")
            async for signum in signals:
                log.info(
                    "%s: finishing transfers in flight (%s), then stopping",
                    signal.Signals(signum).name,
                    server.in_flight_summary(),
                )
                notify("STOPPING=1")
                # Goodbye first, so that no new chunk is placed here while we drain.
                with trio.move_on_after(GOODBYE_TIMEOUT_S):
                    await heartbeat.goodbye()
                server.shutdown()
                with trio.move_on_after(SHUTDOWN_GRACE_S):
                    await server.finished.wait()
                with trio.move_on_after(SHUTDOWN_GRACE_S):
                    await store.sync()  # a clean stop leaves every chunk on the disk
                nursery.cancel_scope.cancel()
                break


def _register_gauges(store: ChunkStore, scrubber: Scrubber, server: Server) -> None:
    metrics.gauge("dfs_keeper_chunks", "Chunk versions held", lambda: len(store.chunks))
    metrics.gauge(
        "dfs_keeper_unsynced_chunks",
        "Chunk versions written and not yet fsynced",
        lambda: len(store.unsynced),
    )
    metrics.gauge("dfs_keeper_used_bytes", "Bytes used by chunk files", lambda: store.used_bytes)
    metrics.gauge(
        "dfs_keeper_capacity_bytes", "Bytes this keeper may use", lambda: store.capacity_bytes
    )
    metrics.gauge(
        "dfs_keeper_free_bytes",
        "Bytes left",
        lambda: max(0, store.capacity_bytes - store.used_bytes),
    )
    metrics.gauge(
        "dfs_keeper_scrubbed_chunks", "Chunks checked by the scrubber", lambda: scrubber.checked
    )
    metrics.gauge(
        "dfs_keeper_corrupt_chunks", "Corrupt copies found by the scrubber", lambda: scrubber.bad
    )
    # Chunk requests from decoding to the reply sent (a read's bytes included), by type.
    transfers = ("PutChunk", "ReadChunk", "SyncChunks")
    metrics.labelled_gauge(
        "dfs_keeper_transfers_in_flight",
        "Chunk requests being answered",
        "type",
        transfers,
        lambda t: server.in_flight.get(t, 0),
    )
    metrics.labelled_gauge(
        "dfs_keeper_transfers_in_flight_peak",
        "The most chunk requests answered at once since the keeper started",
        "type",
        transfers,
        lambda t: server.peak_in_flight.get(t, 0),
    )


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
    return_big_buffers_to_the_os()
    try:
        trio.run(_run, settings, credentials)
    except OSError as exc:
        parser.exit(1, f"dfs-keeper: {exc}\n")


if __name__ == "__main__":
    main()
