"""What only the PostgreSQL ledgers have: the server's row locks.

The ledgers' contract (every test on both backends, in one process and across processes) is
tests/test_ledgers.py and tests/test_ledgers_purge.py; the server restarted and writer connections
killed under ledger load are in tests/test_pg_store.py. Here, another transaction on the server holds
a row the ledger needs: a purge passes it by and takes it next time, never waiting; a reservation
waits for its vendor's lock row, so no check runs beside another process's.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import asyncpg
import pytest

from pforge_async import NonceUnknown, NotFound
from pforge_async.ledgers import Usage
from pforge_async.postgres.store import PgStore, connect_pg

pytestmark = pytest.mark.anyio


@pytest.fixture
async def store(pg_dsn: str, pg_schema: str) -> AsyncIterator[PgStore]:
    async with await connect_pg(pg_dsn, schema=pg_schema, durability="normal") as opened:
        yield opened


@pytest.fixture
async def other(pg_dsn: str, pg_schema: str) -> AsyncIterator[Any]:
    """A connection of another client, in a transaction of its own (rolled back at the end)."""
    conn = await asyncpg.connect(pg_dsn)
    await conn.execute(f'SET search_path TO "{pg_schema}"')
    await conn.execute("BEGIN")
    try:
        yield conn
    finally:
        if conn.is_in_transaction():
            await conn.execute("ROLLBACK")
        await conn.close()


async def test_a_purge_passes_by_the_nonce_a_consumer_holds(store: PgStore, other: Any) -> None:
    held, free = await store.nonces.issue("s", 0.001), await store.nonces.issue("s", 0.001)
    await anyio.sleep(0.01)
    await other.execute("SELECT 1 FROM nonces WHERE nonce = $1 FOR UPDATE", held)
    with anyio.fail_after(30):  # it never waits for the lock: a hang here is the failure
        assert await store.nonces.purge_expired() == 1
    await other.execute("ROLLBACK")
    assert await store.nonces.purge_expired() == 1  # the next purge takes it
    for nonce in (held, free):
        with pytest.raises(NonceUnknown):
            await store.nonces.consume(nonce, "s")


async def test_a_purge_passes_by_the_reservation_a_commit_holds(store: PgStore, other: Any) -> None:
    await store.budget.set_budget("v", tokens=100)
    held = await store.budget.reserve("v", tokens=5, ttl_s=0.001)
    free = await store.budget.reserve("v", tokens=5, ttl_s=0.001)
    await anyio.sleep(0.01)
    await other.execute("SELECT 1 FROM reservations WHERE reservation_id = $1 FOR UPDATE", held.reservation_id)
    with anyio.fail_after(30):
        assert await store.budget.purge_expired() == 1
    await other.execute("ROLLBACK")
    # The commit that held it lands (late): a purge never takes a reservation from under a commit.
    spent = await store.budget.commit(held, Usage(1, 1, 0))
    assert spent.late
    assert await store.budget.purge_expired() == 0
    with pytest.raises(NotFound):
        await store.budget.commit(free, Usage(1, 1, 0))
    report = await store.check()
    assert report.ok, report.problems


async def test_a_reservation_waits_for_its_vendors_lock_row(store: PgStore, other: Any) -> None:
    await store.budget.set_budget("v", tokens=10)
    await other.execute("SELECT 1 FROM budget_vendors WHERE vendor = 'v' FOR UPDATE")
    done = anyio.Event()

    async def reserve() -> None:
        await store.budget.reserve("v", tokens=10)
        done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(reserve)
        await anyio.sleep(0.3)
        assert not done.is_set()  # held while another transaction holds the vendor's row
        await other.execute("ROLLBACK")
        with anyio.fail_after(30):
            await done.wait()
    assert (await store.budget.totals("v")).reserved_tokens == 10
