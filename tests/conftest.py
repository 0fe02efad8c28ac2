from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from ._pg import PgCluster, pg_server


@pytest.fixture
def anyio_backend() -> str:
    # aiosqlite and aiofiles are asyncio-only.
    return "asyncio"


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[tuple[str, PgCluster | None]]:
    """One PostgreSQL server for the whole run: PFORGE_TEST_PG_DSN's, or a private one the tests start
    and stop (see tests/_pg.py). A machine with neither fails the PostgreSQL tests, saying why."""
    try:
        with pg_server(fsync="off") as server:
            yield server
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def pg_dsn(pg_cluster: tuple[str, PgCluster | None]) -> str:
    return pg_cluster[0]


def _in_thread(coro_fn: Any) -> None:
    """Run an asyncio coroutine function to completion on a thread of its own (the test's loop may exist)."""
    error: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(coro_fn())
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if error:
        raise error[0]


@pytest.fixture
def pg_schema(pg_dsn: str) -> Iterator[str]:
    """A schema name of this test's own on the server; dropped with everything in it afterwards."""
    schema = f"t_{uuid.uuid4().hex[:16]}"
    yield schema

    async def drop() -> None:
        import asyncpg

        conn = await asyncpg.connect(pg_dsn)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()

    _in_thread(drop)
