"""Helpers for tests that run against either metadata store backend."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cluster.tracker.pgstore import PostgresStore
from cluster.tracker.store import MetadataStore, SqliteStore


def crash(store: MetadataStore) -> None:
    """Stop the way SIGKILL or a power loss does: drop the connection without `close`."""
    if isinstance(store, SqliteStore):
        store.db.close()
    elif isinstance(store, PostgresStore):
        if store.db is not None:
            store.db.close()
    else:
        raise TypeError(f"unknown store {store!r}")


def sql_rows(store: MetadataStore, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """The rows of one query written with `?` placeholders, on either backend (tests look at
    tables directly to check what the store's interface does not show)."""
    if isinstance(store, SqliteStore):
        return store.db.execute(sql, params).fetchall()
    if isinstance(store, PostgresStore):
        return store._exec(sql, params).fetchall()
    raise TypeError(f"unknown store {store!r}")
