"""The PostgreSQL one-statement append (PgTurnActor's fast path) against what moves under it.

The ordinary path begins every batch with BEGIN: a connection found dead there has sent nothing that
could commit, so the batch runs again on a new connection and the caller never knows. The fast path
sends its one statement first; a connection lost under it must not leave a keyless append's outcome
unknown (its caller cannot retry it safely): what the statement stored is read back once the old
server process is gone. And the statement's own locking must see heads moved and contexts deleted
by other writers while it waits."""

from __future__ import annotations

import asyncpg
import pytest

from pforge_async.postgres.store import connect_pg

pytestmark = pytest.mark.anyio


async def _kill_turns_writer(dsn: str, schema: str) -> None:
    """pg_terminate_backend of the store's turn writer (as an operator, a pooler or a failover would)."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = $1 AND pid <> pg_backend_pid()",
            f"pforge-turns-{schema}"[:63],
        )
    finally:
        await conn.close()


@pytest.mark.parametrize("path", ["ordinary", "fast"])
async def test_an_idle_writer_killed_costs_the_next_append_nothing(pg_dsn: str, pg_schema: str, path: str) -> None:
    """path=ordinary: each append has an idempotency key (never the fast path); path=fast: plain appends
    on the head the writer knows. The same kill before each of 10 appends: every append must succeed,
    and the chain must hold exactly the acknowledged ones."""
    async with await connect_pg(pg_dsn, schema=pg_schema) as store:
        ctx = await store.turns.create_context(name="c")
        await store.turns.append_turn(ctx.context_id, "t", b"0")
        failures: list[str] = []
        acked = 1
        for i in range(10):
            await _kill_turns_writer(pg_dsn, pg_schema)
            try:
                await store.turns.append_turn(
                    ctx.context_id, "t", f"k{i}".encode(), idempotency_key=f"k{i}" if path == "ordinary" else None
                )
                acked += 1
            except Exception as exc:  # what reached the caller is the finding
                failures.append(f"{type(exc).__name__}: {str(exc)[-160:]}")
        head = await store.turns.get_head(ctx.context_id)
        stored_unacked = head.head_depth - acked
        print(f"{path}: {len(failures)} of 10 appends failed, {stored_unacked} of those stored", *failures, sep="\n")
        # The fast path's "may or may not have been stored" appends were in fact never stored: the
        # server had ended the session before the statement arrived.
        assert not failures
        assert head.head_depth == 11


async def test_a_head_moved_while_the_fast_statement_waits_for_its_lock_is_seen(pg_dsn: str, pg_schema: str) -> None:
    """Another session holds the context's row and moves its head back (a pop, uncommitted) while the
    fast statement waits on the row lock: the statement's snapshot still shows the old head, so only the
    lock's recheck (EvalPlanQual on the join) keeps it from appending on a head that is gone."""
    import anyio

    async with await connect_pg(pg_dsn, schema=pg_schema) as store:
        ctx = await store.turns.create_context(name="c")
        t1 = await store.turns.append_turn(ctx.context_id, "t", b"1")
        t2 = await store.turns.append_turn(ctx.context_id, "t", b"2")
        raw = await asyncpg.connect(pg_dsn)
        try:
            tx = raw.transaction()
            await tx.start()
            await raw.execute(
                f'UPDATE "{pg_schema}".contexts SET head_turn_id = $1, updated_at_ms = updated_at_ms + 1 '
                "WHERE context_id = $2",
                t1.turn_id,
                ctx.context_id,
            )
            done: list[object] = []

            async def append() -> None:
                done.append(await store.turns.append_turn(ctx.context_id, "t", b"3"))

            async with anyio.create_task_group() as tg:
                tg.start_soon(append)
                await anyio.sleep(0.5)  # the fast statement is waiting on the row lock
                assert not done
                await tx.commit()
        finally:
            await raw.close()
        t3 = done[0]
        assert t3.parent_turn_id == t1.turn_id, (t3, t2)  # type: ignore[attr-defined]
        head = await store.turns.get_head(ctx.context_id)
        assert head.head_turn_id == t3.turn_id and head.head_depth == 2  # type: ignore[attr-defined]
        assert (await store.check()).ok


async def test_a_context_deleted_while_the_fast_statement_waits_is_context_not_found(
    pg_dsn: str, pg_schema: str
) -> None:
    import anyio

    from pforge_async import ContextNotFound

    async with await connect_pg(pg_dsn, schema=pg_schema) as store:
        ctx = await store.turns.create_context(name="c")
        await store.turns.append_turn(ctx.context_id, "t", b"1")
        raw = await asyncpg.connect(pg_dsn)
        try:
            tx = raw.transaction()
            await tx.start()
            await raw.execute(
                f'UPDATE "{pg_schema}".contexts SET deleted_at_ms = 1 WHERE context_id = $1', ctx.context_id
            )
            outcome: list[BaseException | object] = []

            async def append() -> None:
                try:
                    outcome.append(await store.turns.append_turn(ctx.context_id, "t", b"2"))
                except Exception as exc:
                    outcome.append(exc)

            async with anyio.create_task_group() as tg:
                tg.start_soon(append)
                await anyio.sleep(0.5)
                await tx.commit()
        finally:
            await raw.close()
        assert isinstance(outcome[0], ContextNotFound), outcome
