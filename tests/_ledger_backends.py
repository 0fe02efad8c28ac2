"""The backends the ledger contract runs on: the embedded SQLite store and PostgreSQL.

A test module imports the fixtures it needs (``from ._ledger_backends import store, target``):
``target`` is where a test's store lives, as child processes take it (a directory, or ``dsn#schema``),
parametrized over :data:`BACKENDS`; ``store`` is an open store there. ``OPEN`` is the preamble a child
process's script starts with, so it opens its store the way :func:`open_target` does.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from pforge_async import NonceReplayed, Store, connect
from pforge_async.postgres.store import connect_pg

__all__ = ["BACKENDS", "OPEN", "consume_each", "open_target", "store", "target"]

BACKENDS = ["sqlite", "postgres"]


async def open_target(target: str) -> Store:
    if target.startswith("postgresql://"):
        dsn, schema = target.split("#")
        return await connect_pg(dsn, schema=schema, durability="normal")
    return await connect(target, durability="normal", watch_workspaces=False)


@pytest.fixture(params=BACKENDS)
def target(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / ".pforge")
    dsn = request.getfixturevalue("pg_dsn")
    schema = request.getfixturevalue("pg_schema")
    return f"{dsn}#{schema}"


@pytest.fixture
async def store(target: str) -> AsyncIterator[Store]:
    opened = await open_target(target)
    async with opened:
        yield opened


async def consume_each(store: Store, nonces: list[str], subject: str, tasks: int, stride: int) -> list[str]:
    """``tasks`` tasks each try to consume every nonce, task ``t`` starting at ``t * stride``; the
    nonces this store's consumes won (a replay is the loss expected)."""
    won: list[str] = []

    async def consumer(offset: int) -> None:
        for i in range(len(nonces)):
            nonce = nonces[(i + offset) % len(nonces)]
            try:
                await store.nonces.consume(nonce, subject)
                won.append(nonce)
            except NonceReplayed:
                pass

    async with anyio.create_task_group() as tg:
        for t in range(tasks):
            tg.start_soon(consumer, t * stride)
    return won


OPEN = """
import sys, anyio
from pforge_async import connect
from pforge_async.postgres.store import connect_pg
async def open_target(target, durability="full"):
    if target.startswith("postgresql://"):
        dsn, schema = target.split("#")
        return await connect_pg(dsn, schema=schema, durability=durability)
    return await connect(target, durability=durability, watch_workspaces=False)
"""
