"""Logging for the daemons and commands: stderr, one line per record, journald-friendly.

Under systemd (JOURNAL_STREAM set) each line starts with the `<N>` syslog priority so the journal
keeps the level; elsewhere a timestamp is printed instead.
"""

from __future__ import annotations

import logging
import os
import sys

from cluster import trace

_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


class JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"<{_PRIORITY.get(record.levelno, 6)}>{super().format(record)}"


def setup_logging(level: str, role: str) -> None:
    """Log to stderr at `level`; also start tracing if DFS_TRACE asks for it (trace.py)."""
    trace.start(role)
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(JournalFormatter(f"{role}: %(name)s: %(message)s"))
    else:
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s {role} %(levelname)s %(name)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    try:
        root.setLevel(level.upper())
    except ValueError:
        root.setLevel(logging.INFO)
        root.warning("unknown log level %r, using INFO", level)
