"""The hypothesis model test of test_turnstore_model.py on PostgreSQL: random operation sequences
(every operation of the turn store, with a reopen halfway) give the memory backend's results.

PostgreSQL draws ids from sequences, which leave gaps (a batch draws an id for every append it holds,
retries included), so ids are compared by rank: the n-th turn (context) the store made has the same
rank in both. Everything else, "updated" order and cursors included, must agree exactly."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any
from unittest import mock

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pforge_async.postgres import turns as pg_turns
from pforge_async.postgres.cas import open_pg_cas
from pforge_async.turnstore import MemoryTurnStore

from .test_pg_turnstore import open_pg_turns
from .test_turnstore_model import SEED, fixed_clock, operation, run

pytestmark = pytest.mark.anyio

_TURN_FIELDS = {"turn_id", "parent_turn_id", "head_turn_id", "base_turn_id"}
_CONTEXT_FIELDS = {"context_id", "parent_context_id"}


def by_rank(
    trace: list[Any], ops: list[tuple[Any, ...]], turn: Callable[[int], int], ctx: Callable[[int], int]
) -> list[Any]:
    """``trace`` with every turn and context id replaced by its rank (0 stays 0)."""

    def cursor(value: str) -> str:
        tag, _, rest = value.partition(".")
        if tag == "c":
            return f"c.{ctx(int(rest))}"
        if tag == "u":
            at, _, context_id = rest.partition(".")
            return f"u.{at}.{ctx(int(context_id))}"
        return value

    def walk(value: Any) -> Any:
        if isinstance(value, list):
            return [walk(v) for v in value]
        if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], dict):
            kind, fields = value
            out: dict[str, Any] = {}
            for key, item in fields.items():
                if key in _TURN_FIELDS:
                    out[key] = turn(item)
                elif key in _CONTEXT_FIELDS:
                    out[key] = ctx(item)
                elif key == "cursor" and item is not None:
                    out[key] = cursor(item)
                else:
                    out[key] = walk(item)
            return (kind, out)
        return value

    result = []
    for op, item in zip(ops, trace, strict=True):
        if op[0] == "iter" and isinstance(item, list):
            result.append([turn(t) for t in item])  # turn ids, oldest or newest first
        else:
            result.append(walk(item))
    return result


def ranks(ids: list[int]) -> Callable[[int], int]:
    rank = {value: n for n, value in enumerate(sorted(ids), start=1)}
    return lambda value: rank.get(value, -value) if value else 0


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(operation, min_size=1, max_size=40))
async def test_postgres_agrees_with_memory_on_random_operations(pg_dsn: str, ops: list[tuple[Any, ...]]) -> None:
    expected = await run(MemoryTurnStore(clock=fixed_clock), ops)
    schema = f"m_{uuid.uuid4().hex[:16]}"
    state: tuple[list[int], list[int]] = ([], [])
    half = len(ops) // 2
    try:
        with mock.patch.object(pg_turns, "now_ms", fixed_clock):
            async with open_pg_cas(pg_dsn, schema=schema) as cas:
                async with open_pg_turns(pg_dsn, schema, cas, max_payload_bytes=1 << 20) as store:  # type: ignore[arg-type]
                    trace = await run(store, ops[:half], state)
                async with open_pg_turns(pg_dsn, schema, cas, max_payload_bytes=1 << 20) as store:  # type: ignore[arg-type]
                    trace += await run(store, ops[half:], state)
                    assert await store.check() == []
        conn = await asyncpg.connect(pg_dsn, server_settings={"search_path": schema})
        try:
            turn = ranks([r[0] for r in await conn.fetch("SELECT turn_id FROM turns")])
            ctx = ranks([r[0] for r in await conn.fetch("SELECT context_id FROM contexts")])
        finally:
            await conn.close()
    finally:
        conn = await asyncpg.connect(pg_dsn)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()
    # The first half ran with the seed in front, the second (on a store with contexts) without.
    ran = SEED + ops
    assert by_rank(trace, ran, turn, ctx) == by_rank(expected, ran, lambda t: t, lambda c: c)
