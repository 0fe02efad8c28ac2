"""Read-only SQL on a store's databases, for what the library has no call for: the vendors the
budget ledger knows, spend grouped by tag, row counts, the registry bundles a store holds.

Each query opens its own read-only connection (``mode=ro``; ``immutable`` where the directory cannot
be written and no writer is live, as the store's own read-only open does), in a worker thread, and
closes it. Failures come out as the store's errors (``translate``), naming the file.
"""

from __future__ import annotations

import sqlite3
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio

from ..sqlite.actor import translate

__all__ = ["SqlReader"]


class SqlReader:
    def __init__(self, root: Path) -> None:
        self.root = root

    async def rows(self, db: str, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        path = self.root / db
        return await anyio.to_thread.run_sync(_query, path, sql, tuple(params))


def _run(uri: str, sql: str, params: tuple[Any, ...]) -> list[Any]:
    conn = sqlite3.connect(uri, uri=True, timeout=10)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def _query(path: Path, sql: str, params: tuple[Any, ...]) -> list[Any]:
    uri = "file:" + urllib.parse.quote(str(path.absolute()))
    try:
        if not path.exists():  # sqlite3 would say "unable to open": name what is wrong
            raise FileNotFoundError(2, "no such file", str(path))
        try:
            return _run(uri + "?mode=ro", sql, params)
        except sqlite3.OperationalError:
            # mode=ro needs the -shm file; with no writer live and a directory we cannot write,
            # read the file as it is
            if path.with_name(path.name + "-wal").exists():
                raise
            return _run(uri + "?mode=ro&immutable=1", sql, params)
    except (sqlite3.Error, OSError) as exc:
        raise translate(path, exc) from exc
