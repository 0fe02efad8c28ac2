"""Random operation sequences give identical results in every backend; deep chains stay correct."""

from __future__ import annotations

import random
import tempfile
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pforge_async import PforgeError, open_store
from pforge_async.turnstore import FsTurnStore, MemoryTurnStore
from pforge_async.turnstore.base import TurnStoreBase

pytestmark = pytest.mark.anyio

index = st.integers(min_value=0, max_value=1000)
operation = st.one_of(
    st.tuples(st.just("create"), st.none() | index),
    st.tuples(
        st.just("append"),
        index,
        st.sampled_from(["user", "assistant"]),
        st.sampled_from([b"a", b"b", b"c" * 50]),
        st.none() | st.sampled_from(["k1", "k2"]),
        st.none() | st.just(0) | index,
    ),
    st.tuples(st.just("list"), index, st.none() | index, st.integers(min_value=0, max_value=4)),
    st.tuples(st.just("head"), index),
)


def normal(value: Any) -> Any:
    """Results without creation times (the only thing backends may differ in)."""
    if isinstance(value, list):
        return [normal(v) for v in value]
    if isinstance(value, msgspec.Struct):
        fields = msgspec.structs.asdict(value)
        fields.pop("created_at_ms", None)
        return (type(value).__name__, fields)
    return value


async def run(store: TurnStoreBase, ops: list[tuple[Any, ...]]) -> list[Any]:
    contexts: list[int] = []
    turns: list[int] = []
    trace: list[Any] = []

    def pick(items: list[int], i: int) -> int:
        return items[i % len(items)] if items else 999_999

    for op in ops:
        try:
            match op:
                case ("create", base):
                    head = await store.create_context(None if base is None else pick(turns, base))
                    contexts.append(head.context_id)
                    result: Any = head
                case ("append", ctx, type_id, payload, key, parent):
                    parent_id = parent if parent in (None, 0) else pick(turns, parent)
                    result = await store.append_turn(
                        pick(contexts, ctx), type_id, payload, idempotency_key=key, parent_turn_id=parent_id
                    )
                    turns.append(result.turn_id)
                case ("list", ctx, before, limit):
                    result = await store.list_turns(
                        pick(contexts, ctx),
                        before_turn_id=None if before is None else pick(turns, before),
                        limit=limit,
                    )
                case ("head", ctx):
                    result = await store.get_head(pick(contexts, ctx))
            trace.append(normal(result))
        except PforgeError as exc:
            trace.append(type(exc).__name__)
    return trace


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(operation, min_size=1, max_size=40))
async def test_backends_agree_on_random_operations(ops: list[tuple[Any, ...]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        expected = await run(MemoryTurnStore(), ops)
        async with FsTurnStore(Path(tmp) / "fs", durability="normal") as fs:
            assert await run(fs, ops) == expected
        async with open_store(Path(tmp) / ".pforge", durability="normal", watch_workspaces=False) as store:
            assert await run(store.turns, ops) == expected


@pytest.mark.parametrize("backend", ["memory", "fs", "sqlite"])
async def test_deep_chains_page_and_check_cursors_correctly(tmp_path: Path, backend: str) -> None:
    rng = random.Random(5)

    async def check(store: TurnStoreBase) -> None:
        ctx = await store.create_context()
        ids = [(await store.append_turn(ctx.context_id, "t", b"%d" % i)).turn_id for i in range(1500)]
        side = await store.fork_context(ids[700])
        side_ids = [(await store.append_turn(side.context_id, "t", b"s%d" % i)).turn_id for i in range(50)]
        for _ in range(40):
            at = rng.randrange(len(ids))
            page = await store.list_turns(ctx.context_id, before_turn_id=ids[at], limit=7)
            assert [t.turn_id for t in page] == ids[max(0, at - 7) : at]
            page = await store.list_turns(side.context_id, before_turn_id=ids[min(at, 700)], limit=3)
            assert [t.turn_id for t in page] == ids[max(0, min(at, 700) - 3) : min(at, 700)]
        for turn_id in (ids[701], ids[-1]):  # on the main line only: not the side context's
            with pytest.raises(PforgeError):
                await store.list_turns(side.context_id, before_turn_id=turn_id)
        with pytest.raises(PforgeError):
            await store.list_turns(ctx.context_id, before_turn_id=side_ids[10])
        assert [t.depth for t in await store.list_turns(side.context_id, limit=2)] == [750, 751]

    if backend == "memory":
        await check(MemoryTurnStore())
    elif backend == "fs":
        async with FsTurnStore(tmp_path / "fs", durability="normal") as fs:
            await check(fs)
    else:
        async with open_store(tmp_path / ".pforge", durability="normal") as store:
            await check(store.turns)
