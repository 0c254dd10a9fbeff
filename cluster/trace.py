"""Spans of time across the processes of a cluster, for `bench/trace.py`.

With `DFS_TRACE=DIR` in its environment, a process writes one JSON line per span to
`DIR/<role>-<pid>.jsonl`: `[name, start_ns, end_ns, thread]`, with `start_ns`/`end_ns` from
CLOCK_REALTIME, which every process on a machine shares, so the files of a mount, a tracker and
its keepers merge into one timeline: where each microsecond of an operation went, per hop and
per process. Without it, `span` costs one attribute test.

Spans nest by time, not by parent ids: a trace is read one operation at a time (the tool runs
one file's `cp` or one synced write with nothing else in flight), so what overlaps is what
that operation waited for.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

ENV = "DFS_TRACE"


class _Sink:
    """The open trace file of this process (None: tracing is off)."""

    out: IO[str] | None = None
    lock = threading.Lock()


def start(role: str) -> None:
    """Open this process's trace file if DFS_TRACE names a directory; call once at start."""
    directory = os.environ.get(ENV)
    if not directory or _Sink.out is not None:
        return
    Path(directory).mkdir(parents=True, exist_ok=True)
    # Line-buffered: a process stopped by SIGKILL loses no span, at one write(2) per span.
    _Sink.out = open(  # noqa: SIM115 (open for the life of the process)
        Path(directory) / f"{role}-{os.getpid()}.jsonl", "a", buffering=1
    )


def enabled() -> bool:
    return _Sink.out is not None


def record(name: str, start_ns: int, end_ns: int) -> None:
    out = _Sink.out
    if out is None:
        return
    line = json.dumps([name, start_ns, end_ns, threading.current_thread().name])
    with _Sink.lock:
        out.write(line + "\n")


@contextmanager
def span(name: str) -> Iterator[None]:
    """Record how long the body took as `name` (in any thread, in or out of trio)."""
    if _Sink.out is None:
        yield
        return
    start_ns = time.time_ns()
    try:
        yield
    finally:
        record(name, start_ns, time.time_ns())
