"""Prometheus metrics of the tracker and keepers (prometheus-client, text format over HTTP).

Request counts, latencies and payload bytes are recorded by `serve.py` for every request, per
role and message type; gauges that describe state (chunks held, free space, keepers alive,
chunk health) read their value from the owning object when scraped, so they are never stale.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from functools import partial

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from cluster.rpc import split_addr

log = logging.getLogger(__name__)

REQUEST_SECONDS = Histogram(
    "dfs_request_seconds",
    "Time to answer one request",
    ["role", "type"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
REQUEST_ERRORS = Counter(
    "dfs_request_errors_total", "Requests answered with an error", ["role", "type"]
)
BYTES_RECEIVED = Counter("dfs_payload_bytes_received_total", "Chunk bytes received", ["role"])
BYTES_SENT = Counter("dfs_payload_bytes_sent_total", "Chunk bytes sent", ["role"])
CONNECTIONS_CLOSED = Counter(
    "dfs_connections_refused_total", "Connections closed for bad input or failed auth", ["role"]
)


def payload_bytes(role: str) -> tuple[int, int]:
    """(sent, received): chunk bytes this process's `role` server has sent and received since
    it started (what a keeper's heartbeat reports)."""
    totals = []
    for counter in (BYTES_SENT, BYTES_RECEIVED):
        total = 0.0
        for family in counter.collect():
            for sample in family.samples:
                if sample.name.endswith("_total") and sample.labels.get("role") == role:
                    total += sample.value
        totals.append(int(total))
    return totals[0], totals[1]


def gauge(name: str, documentation: str, read: Callable[[], float]) -> Gauge:
    """A gauge whose value is read from `read` at scrape time."""
    metric = Gauge(name, documentation)
    metric.set_function(read)
    return metric


def labelled_gauge(
    name: str, documentation: str, label: str, values: Sequence[str], read: Callable[[str], float]
) -> Gauge:
    """A gauge with one child per value of `label`, read as `read(value)` at scrape time."""
    metric = Gauge(name, documentation, [label])
    for value in values:
        metric.labels(value).set_function(partial(read, value))
    return metric


def start(addr: str) -> None:
    """Serve /metrics on HOST:PORT from a daemon thread (prometheus-client's own server)."""
    host, port = split_addr(addr)
    start_http_server(port, addr=host)
    log.info("metrics on http://%s:%d/metrics", host, port)
