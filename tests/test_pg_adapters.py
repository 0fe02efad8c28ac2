"""The adapters on PostgreSQL: LangGraph's checkpointer conformance suite against PforgeSaver on a
PgStore (every capability, base and optional), and the OpenAI Agents session contract of
tests/test_integration_openai_session.py and the session cache's tests of
tests/test_integration_openai_cache.py with their ``store`` fixture yielding a PgStore.

The suites are imported, never copied: the session module's tests taking ``store`` are re-collected
here with this module's ``store`` fixture (pytest prefers a module's own fixture over the one where
the test was defined)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from langgraph.checkpoint.conformance import checkpointer_test, validate

from pforge_async import connect
from pforge_async.integrations.langgraph import PforgeSaver
from pforge_async.integrations.openai_agents import PforgeSession, WriterConflict
from pforge_async.postgres.store import PgStore, connect_pg

from .test_integration_langgraph import _check
from .test_integration_openai_cache import (
    test_a_bounded_cache_and_no_cache,
    test_a_stale_cache_never_hides_a_second_writer,
    test_another_writers_appends_pops_and_clears_show,
    test_erased_items_are_never_served_from_the_cache,
    test_items_returned_are_fresh_and_foreign_turns_checked,
    test_the_head_moved_to_another_branch_or_the_session_made_again,
)
from .test_integration_openai_session import (
    test_a_second_writer_is_refused,
    test_add_items_is_one_atomic_batch,
    test_compaction_snapshot_replaces_the_tail_atomically,
    test_the_session_contract,
)

pytestmark = pytest.mark.anyio

__all__ = [
    "test_a_bounded_cache_and_no_cache",
    "test_a_second_writer_is_refused",
    "test_a_stale_cache_never_hides_a_second_writer",
    "test_another_writers_appends_pops_and_clears_show",
    "test_erased_items_are_never_served_from_the_cache",
    "test_items_returned_are_fresh_and_foreign_turns_checked",
    "test_the_head_moved_to_another_branch_or_the_session_made_again",
    "test_add_items_is_one_atomic_batch",
    "test_compaction_snapshot_replaces_the_tail_atomically",
    "test_the_session_contract",
]


@pytest.fixture
async def store(pg_dsn: str, pg_schema: str) -> AsyncIterator[PgStore]:
    """The session tests' backend: a PgStore of this test's own schema (replaces the memory/SQLite
    parametrization of the module the tests come from)."""
    async with await connect_pg(pg_dsn, schema=pg_schema, durability="normal") as opened:
        yield opened


async def test_conformance_postgres_store(pg_dsn: str, pg_schema: str) -> None:
    """All 81 tests of langgraph-checkpoint-conformance, each checkpointer a fresh store on its own
    schema (``connect``'s DSN dispatch, schema named in the DSN), all under this test's schema prefix."""
    count = 0
    schemas: list[str] = []

    @checkpointer_test(name="PforgeSaver[postgres]")
    async def saver() -> AsyncIterator[PforgeSaver]:
        nonlocal count
        count += 1
        schema = f"{pg_schema}_{count}"
        schemas.append(schema)
        opened = await connect(f"{pg_dsn}?schema={schema}", durability="normal")
        assert isinstance(opened, PgStore) and opened.schema == schema
        async with opened:
            yield PforgeSaver(opened)

    try:
        _check(await validate(saver))
    finally:
        await _drop(pg_dsn, schemas)


async def _drop(dsn: str, schemas: list[str]) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        for schema in schemas:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


async def test_a_session_named_by_dsn_lives_on_the_server(
    pg_dsn: str, pg_schema: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # where a DSN taken for a path would land
    dsn = f"{pg_dsn}?schema={pg_schema}"
    async with PforgeSession("by-dsn", dsn) as session:
        await session.add_items([{"role": "user", "content": "on the server"}])
    assert list(tmp_path.iterdir()) == []
    async with await connect_pg(pg_dsn, schema=pg_schema, create=False) as opened:
        assert await PforgeSession("by-dsn", opened).get_items() == [{"role": "user", "content": "on the server"}]


async def test_a_saver_from_path_dsn_lives_on_the_server(
    pg_dsn: str, pg_schema: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    async with PforgeSaver.from_path(f"{pg_dsn}?schema={pg_schema}") as saver:
        await saver.aput(*_one_checkpoint("t-from-path"))
    await _assert_on_server(pg_dsn, pg_schema, tmp_path, "t-from-path")


async def test_a_saver_named_by_dsn_lives_on_the_server(
    pg_dsn: str, pg_schema: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    saver = PforgeSaver(f"{pg_dsn}?schema={pg_schema}")
    try:
        await saver.aput(*_one_checkpoint("t-dsn"))
    finally:
        await saver.aclose()
    await _assert_on_server(pg_dsn, pg_schema, tmp_path, "t-dsn")


async def _assert_on_server(dsn: str, schema: str, cwd: Path, thread: str) -> None:
    assert list(cwd.iterdir()) == []
    async with await connect_pg(dsn, schema=schema, create=False) as opened:
        config = {"configurable": {"thread_id": thread, "checkpoint_ns": ""}}
        assert await PforgeSaver(opened).aget_tuple(config) is not None  # type: ignore[arg-type]


def _one_checkpoint(thread: str) -> tuple[Any, Any, Any, Any]:
    from langgraph.checkpoint.base import empty_checkpoint

    checkpoint = empty_checkpoint()
    config = {"configurable": {"thread_id": thread, "checkpoint_ns": ""}}
    return config, checkpoint, {"source": "input", "step": -1}, {}


async def test_two_stores_on_one_schema_refuse_a_second_writer(pg_dsn: str, pg_schema: str) -> None:
    """Two machines, simulated: two stores (each its own actors and connections) on one schema. A
    second writer of one session or thread gets WriterConflict from the server's heads, never a fork."""
    async with (
        await connect_pg(pg_dsn, schema=pg_schema, durability="normal") as a,
        await connect_pg(pg_dsn, schema=pg_schema, durability="normal") as b,
    ):
        one, two = PforgeSession("shared", a), PforgeSession("shared", b)
        await one.add_items([{"role": "user", "content": "1"}])
        assert await two.get_items() == [{"role": "user", "content": "1"}]
        await one.add_items([{"role": "user", "content": "2"}])
        with pytest.raises(WriterConflict):
            await two.add_items([{"role": "user", "content": "forked"}])
        seen: list[Any] = await two.get_items()
        assert [i["content"] for i in seen] == ["1", "2"]

        first, second = PforgeSaver(a), PforgeSaver(b)
        config, checkpoint, metadata, versions = _one_checkpoint("t-shared")
        stored = await first.aput(config, checkpoint, metadata, versions)
        assert (await second.aget_tuple(config)) is not None
        from langgraph.checkpoint.base import create_checkpoint, empty_checkpoint

        await first.aput(stored, create_checkpoint(empty_checkpoint(), None, 1), {"step": 1}, {})
        with pytest.raises(WriterConflict):
            await second.aput(stored, create_checkpoint(empty_checkpoint(), None, 2), {"step": 2}, {})
        history = [t.metadata.get("step") async for t in first.alist(config)]
        assert history == [1, -1]


async def test_usage_recorded_in_the_servers_budget_ledger(store: PgStore) -> None:
    session = PforgeSession("paid", store, record_usage=True, model="m", price=lambda model, i, o: i + 10 * o)

    class Usage:
        input_tokens, output_tokens = 100, 20

    class Run:
        usage = Usage()

    run = Run()  # one run's usage grows; only what is new since its last write is recorded
    await session.add_items([{"role": "user", "content": "q"}], wrapper=run)  # type: ignore[arg-type]
    await session.add_items([{"role": "user", "content": "again"}], wrapper=run)  # type: ignore[arg-type]
    await session.add_items([{"role": "user", "content": "other run"}], wrapper=Run())  # type: ignore[arg-type]
    totals = await store.budget.totals("openai", tags={"session": "paid"})
    assert (totals.input_tokens, totals.output_tokens, totals.cost) == (200, 40, 600)
