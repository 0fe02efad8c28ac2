"""Compare-and-set heads in the in-process backends: two writers holding the same stale head, over a
thousand rounds, and many tasks appending to one context with retry."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

from pforge_async import HeadConflict
from pforge_async.turnstore import FsTurnStore, MemoryTurnStore
from pforge_async.turnstore.base import TurnStoreBase

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def backend(kind: str, tmp_path: Path) -> AsyncIterator[TurnStoreBase]:
    if kind == "memory":
        yield MemoryTurnStore()
    else:
        async with FsTurnStore(tmp_path, durability="normal") as store:
            yield store


@pytest.mark.parametrize("kind", ["memory", "fs"])
async def test_two_writers_with_the_same_stale_head_1000_rounds(kind: str, tmp_path: Path) -> None:
    async with backend(kind, tmp_path) as store:
        ctx = await store.create_context()
        head = 0
        for round_ in range(1000):
            won: list[int] = []

            async def writer(n: int, head: int = head, round_: int = round_, won: list[int] = won) -> None:
                try:
                    turn = await store.append_turn(ctx.context_id, "t", b"%d/%d" % (round_, n), expected_head=head)
                    won.append(turn.turn_id)
                except HeadConflict as exc:
                    assert exc.expected == head and exc.actual != head

            async with anyio.create_task_group() as tg:
                tg.start_soon(writer, 1)
                tg.start_soon(writer, 2)
            assert len(won) == 1, f"round {round_}: {len(won)} writers won"
            head = won[0]
        chain = [t async for t in store.iter_turns(ctx.context_id)]
        assert len(chain) == 1000 and chain[-1].turn_id == head


@pytest.mark.parametrize("kind", ["memory", "fs"])
async def test_64_tasks_compare_and_set_one_chain(kind: str, tmp_path: Path) -> None:
    async with backend(kind, tmp_path) as store:
        ctx = await store.create_context()
        acked: list[int] = []

        async def task(n: int) -> None:
            for i in range(10):
                key = f"{n}-{i}"
                while True:  # read the head, append on it, retry on a conflict (with the same key)
                    head = (await store.get_head(ctx.context_id)).head_turn_id
                    try:
                        turn = await store.append_turn(
                            ctx.context_id, "t", key.encode(), idempotency_key=key, expected_head=head
                        )
                        break
                    except HeadConflict:
                        await anyio.lowlevel.checkpoint()
                acked.append(turn.turn_id)

        async with anyio.create_task_group() as tg:
            for n in range(64):
                tg.start_soon(task, n)
        chain = [t async for t in store.iter_turns(ctx.context_id)]
        assert sorted(t.turn_id for t in chain) == sorted(acked) and len(set(acked)) == 640
        assert all(b.parent_turn_id == a.turn_id for a, b in itertools.pairwise(chain))
