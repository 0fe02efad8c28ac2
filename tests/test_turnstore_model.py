"""Random operation sequences give identical results in every backend; deep chains stay correct."""

from __future__ import annotations

import random
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pforge_async import NewTurn, PforgeError, open_store
from pforge_async.turnstore import FsTurnStore, MemoryTurnStore
from pforge_async.turnstore import sqlite as sqlite_backend
from pforge_async.turnstore.base import TurnStoreBase
from pforge_async.turnstore.sortedkeys import SortedKeys

pytestmark = pytest.mark.anyio

#: Every backend runs on this clock, so updated_at_ms (and so the "updated" order) must agree exactly.
CLOCK_MS = 1_700_000_000_000

index = st.integers(min_value=0, max_value=1000)
maybe_index = st.none() | index
name = st.sampled_from(["a", "a/b", "a/c", "b", "é/x"])
turn_key = st.none() | st.sampled_from(["k1", "k2"])
context_key = st.none() | st.sampled_from(["c1", "c2"])
metadata = st.sampled_from([None, {}, {"n": 1}, {"t": "x", "l": [1, 2.5, None]}])
#: None: no check; "head": the head as read just before; an index: some turn (often stale); 0: empty
expected = st.none() | st.just("head") | st.just(0) | index
operation = st.one_of(
    st.tuples(st.just("create"), maybe_index, st.none() | name, context_key, metadata, maybe_index),
    st.tuples(st.just("fork"), index, st.none() | name, context_key, maybe_index),
    st.tuples(st.just("open"), name, maybe_index, metadata),
    st.tuples(
        st.just("append"),
        index,
        st.sampled_from(["user", "assistant"]),
        st.sampled_from([b"a", b"b", b"c" * 50]),
        turn_key,
        st.none() | st.just(0) | index,
        expected,
    ),
    st.tuples(
        st.just("batch"),
        st.lists(st.tuples(index, st.sampled_from([b"x", b"y"]), turn_key, st.none() | index), max_size=4),
        st.lists(st.tuples(index, expected), max_size=2),
    ),
    st.tuples(st.just("set_head"), index, st.just(0) | index, expected),
    st.tuples(st.just("set_meta"), index, metadata, st.sampled_from([None, "current", "stale"])),
    st.tuples(st.just("list"), index, maybe_index, st.integers(min_value=0, max_value=4)),
    st.tuples(
        st.just("contexts"),
        st.none() | st.sampled_from(["", "a", "a/", "é"]),
        maybe_index,
        st.sampled_from(["updated", "created", "name"]),
        st.integers(min_value=1, max_value=3),
    ),
    st.tuples(st.just("get"), index),
    st.tuples(st.just("find"), name),
    st.tuples(st.just("by_key"), index, st.sampled_from(["k1", "k2"])),
    st.tuples(st.just("iter"), index, st.booleans(), st.integers(min_value=1, max_value=3)),
    st.tuples(st.just("head"), index),
    st.tuples(st.just("delete"), index),
    st.tuples(st.just("erase"), index, maybe_index),
    st.tuples(st.just("prune"), index, st.integers(min_value=0, max_value=4)),
    st.tuples(st.just("refs"), index, st.sampled_from([b"r1", b"r2"]), turn_key),
    st.tuples(st.just("turn"), index),
)


SEED: list[tuple[Any, ...]] = [
    ("create", None, None, None, None, None),
    ("create", None, "a/seed", None, {"seed": True}, None),
    ("append", 0, "user", b"s", None, None, None),
    ("append", 1, "user", b"s", None, None, None),
]


def normal(value: Any) -> Any:
    """Results without creation times (the only thing backends may differ in: a turn's
    ``created_at_ms`` is the clock's, a context's too, and the clock is fixed anyway)."""
    if isinstance(value, list):
        return [normal(v) for v in value]
    if isinstance(value, msgspec.Struct):
        fields = msgspec.structs.asdict(value)
        fields.pop("created_at_ms", None)
        return (type(value).__name__, {k: normal(v) for k, v in fields.items()})
    return value


async def run(
    store: TurnStoreBase, ops: list[tuple[Any, ...]], state: tuple[list[int], list[int]] | None = None
) -> list[Any]:
    """The trace of ``ops``; ``state`` (context ids, turn ids seen) carries over to a reopened store."""
    contexts, turns = state or ([], [])
    trace: list[Any] = []
    if state is None or not contexts:
        ops = SEED + ops  # two contexts with a turn each, so most operations have something to act on

    def pick(items: list[int], i: int) -> int:
        return items[i % len(items)] if items else 999_999

    async def expect(ctx: int, choice: Any) -> int | None:
        if choice is None or choice == 0:
            return choice  # type: ignore[no-any-return]
        if choice == "head":
            try:
                return (await store.get_head(ctx)).head_turn_id
            except PforgeError:
                return 0
        return pick(turns, choice)

    def seen(result: Any) -> None:
        if hasattr(result, "context_id") and hasattr(result, "head_turn_id") and result.context_id not in contexts:
            contexts.append(result.context_id)

    for op in ops:
        try:
            result: Any
            match op:
                case ("create", base, nm, key, meta, parent):
                    result = await store.create_context(
                        None if base is None else pick(turns, base),
                        name=nm,
                        idempotency_key=key,
                        metadata=meta,
                        parent_context_id=None if parent is None else pick(contexts, parent),
                    )
                    seen(result)
                case ("fork", turn, nm, key, parent):
                    result = await store.fork_context(
                        pick(turns, turn),
                        name=nm,
                        idempotency_key=key,
                        parent_context_id=None if parent is None else pick(contexts, parent),
                    )
                    seen(result)
                case ("open", nm, base, meta):
                    result = await store.open_context(
                        nm, base_turn_id=None if base is None else pick(turns, base), metadata=meta
                    )
                    seen(result)
                case ("append", ctx, type_id, payload, key, parent, exp):
                    context_id = pick(contexts, ctx)
                    result = await store.append_turn(
                        context_id,
                        type_id,
                        payload,
                        idempotency_key=key,
                        parent_turn_id=parent if parent in (None, 0) else pick(turns, parent),
                        expected_head=await expect(context_id, exp),
                    )
                    if result.turn_id not in turns:
                        turns.append(result.turn_id)
                case ("batch", items, heads):
                    new = [
                        NewTurn(
                            pick(contexts, ctx),
                            "t",
                            payload,
                            idempotency_key=key,
                            parent_turn_id=None if parent is None else pick(turns, parent),
                        )
                        for ctx, payload, key, parent in items
                    ]
                    expected_heads = {}
                    for ctx, exp in heads:
                        head = await expect(pick(contexts, ctx), exp)
                        if head is not None:
                            expected_heads[pick(contexts, ctx)] = head
                    result = await store.append_turns(new, expected_heads=expected_heads)
                    turns += [r.turn_id for r in result if r.turn_id not in turns]
                case ("set_head", ctx, target, exp):
                    context_id = pick(contexts, ctx)
                    result = await store.set_head(
                        context_id,
                        target if target == 0 else pick(turns, target),
                        expected_head=await expect(context_id, exp),
                    )
                case ("set_meta", ctx, meta, version):
                    context_id = pick(contexts, ctx)
                    since = None
                    if version is not None:
                        current = (await store.get_context(context_id)).updated_at_ms
                        since = current if version == "current" else current - 1
                    result = await store.set_context_metadata(context_id, meta or {}, expected_updated_at_ms=since)
                case ("list", ctx, before, limit):
                    result = await store.list_turns(
                        pick(contexts, ctx),
                        before_turn_id=None if before is None else pick(turns, before),
                        limit=limit,
                    )
                case ("contexts", prefix, parent, order, limit):
                    pages = []
                    after = None
                    while True:
                        page = await store.list_contexts(
                            prefix=prefix,
                            parent_context_id=None if parent is None else pick(contexts, parent),
                            order=order,
                            after=after,
                            limit=limit,
                        )
                        pages.append(page)
                        if page.cursor is None or len(pages) > 50:
                            break
                        after = page.cursor
                    result = pages
                case ("get", ctx):
                    result = await store.get_context(pick(contexts, ctx))
                case ("find", nm):
                    result = await store.find_context(nm)
                case ("by_key", ctx, key):
                    result = await store.get_turn_by_key(pick(contexts, ctx), key)
                case ("iter", ctx, newest_first, page_size):
                    result = [
                        t.turn_id
                        async for t in store.iter_turns(
                            pick(contexts, ctx), newest_first=newest_first, page_size=page_size
                        )
                    ]
                case ("head", ctx):
                    result = await store.get_head(pick(contexts, ctx))
                case ("delete", ctx):
                    await store.delete_context(pick(contexts, ctx))
                    result = None
                case ("erase", ctx, before):
                    result = await store.erase_turns(
                        pick(contexts, ctx), before_turn_id=None if before is None else pick(turns, before)
                    )
                case ("prune", ctx, keep):
                    result = await store.prune_context(pick(contexts, ctx), keep_last=keep)
                case ("refs", ctx, data, key):
                    oid = await store.put_blob(data)
                    result = await store.append_turn(pick(contexts, ctx), "t", b"r", refs=[oid], idempotency_key=key)
                    if result.turn_id not in turns:
                        turns.append(result.turn_id)
                case ("turn", turn):
                    result = await store.get_turn(pick(turns, turn))
            trace.append(normal(result))
        except PforgeError as exc:
            trace.append(type(exc).__name__)
    return trace


def fixed_clock() -> int:
    return CLOCK_MS


@contextmanager
def sqlite_on_fixed_clock() -> Iterator[None]:
    with mock.patch.object(sqlite_backend, "now_ms", fixed_clock):
        yield


@asynccontextmanager
async def backend(kind: str, tmp: Path) -> AsyncIterator[TurnStoreBase]:
    if kind == "fs":
        async with FsTurnStore(tmp / "fs", durability="normal", clock=fixed_clock) as fs:
            yield fs
    else:
        with sqlite_on_fixed_clock():
            async with open_store(tmp / ".pforge", durability="normal", watch_workspaces=False) as store:
                yield store.turns


@pytest.mark.parametrize("kind", ["fs", "sqlite"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(operation, min_size=1, max_size=40))
async def test_backends_agree_on_random_operations(kind: str, ops: list[tuple[Any, ...]]) -> None:
    expected = await run(MemoryTurnStore(clock=fixed_clock), ops)
    # Half the operations, then a reopen (the log replayed, the database read afresh), then the rest.
    state: tuple[list[int], list[int]] = ([], [])
    half = len(ops) // 2
    with tempfile.TemporaryDirectory() as tmp:
        async with backend(kind, Path(tmp)) as store:
            trace = await run(store, ops[:half], state)
        async with backend(kind, Path(tmp)) as store:
            trace += await run(store, ops[half:], state)
    assert trace == expected


@given(ops=st.lists(st.tuples(st.booleans(), st.integers(min_value=0, max_value=3000)), max_size=3000))
@settings(max_examples=30, deadline=None)
def test_sorted_keys_match_a_sorted_list(ops: list[tuple[bool, int]]) -> None:
    keys: SortedKeys[int] = SortedKeys()
    reference: set[int] = set()
    for add, key in ops:
        if add and key not in reference:
            keys.add(key)
            reference.add(key)
        elif not add and key in reference:
            keys.remove(key)
            reference.discard(key)
    ordered = sorted(reference, reverse=True)
    assert list(keys.descending()) == ordered and len(keys) == len(ordered)
    for below in (0, 1, 1500, 2999, 3001):
        assert list(keys.descending(below)) == [k for k in ordered if k < below]


def test_sorted_keys_over_many_buckets() -> None:
    rng = random.Random(3)
    keys: SortedKeys[tuple[int, int]] = SortedKeys()
    live: dict[int, int] = {}
    for step in range(20_000):  # contexts updated at random: the "updated" index's workload
        context_id = rng.randrange(3000)
        if context_id in live:
            keys.remove((live[context_id], context_id))
        live[context_id] = step
        keys.add((step, context_id))
    expected = sorted(((v, k) for k, v in live.items()), reverse=True)
    assert list(keys.descending()) == expected
    assert list(keys.descending(expected[100])) == expected[101:]
    with pytest.raises(KeyError):
        keys.remove((-1, -1))


@pytest.mark.parametrize("backend_kind", ["memory", "fs", "sqlite"])
async def test_deep_chains_page_and_check_cursors_correctly(tmp_path: Path, backend_kind: str) -> None:
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
        # Whole-chain iteration, both ways, at depth: pages found through the skip links.
        assert [t.turn_id async for t in store.iter_turns(side.context_id, page_size=100)] == ids[:701] + side_ids
        newest = [t.turn_id async for t in store.iter_turns(ctx.context_id, newest_first=True, page_size=64)]
        assert newest == ids[::-1]

    if backend_kind == "memory":
        await check(MemoryTurnStore())
    elif backend_kind == "fs":
        async with FsTurnStore(tmp_path / "fs", durability="normal") as fs:
            await check(fs)
    else:
        async with open_store(tmp_path / ".pforge", durability="normal") as store:
            await check(store.turns)
