"""Lifecycle conformance (issue 13), run against every turn store backend: delete_context."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from pforge_async import ContextNotFound, InvalidInput, NewTurn, TurnNotFound
from pforge_async.turnstore.base import TurnStoreBase

from .test_turnstore import BACKENDS, open_backend

pytestmark = pytest.mark.anyio


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[TurnStoreBase]:
    async with open_backend(request.param, tmp_path) as opened:
        yield opened


async def ids_of(store: TurnStoreBase, context_id: int) -> list[int]:
    return [t.turn_id for t in await store.list_turns(context_id, limit=10_000)]


async def listed(store: TurnStoreBase, **kwargs: object) -> list[int]:
    out: list[int] = []
    cursor: str | None = None
    while True:
        page = await store.list_contexts(after=cursor, limit=2, **kwargs)  # type: ignore[arg-type]
        out += [c.context_id for c in page.contexts]
        cursor = page.cursor
        if cursor is None:
            return out


class TestDeleteContext:
    async def test_the_context_its_head_and_name_are_gone(self, store: TurnStoreBase) -> None:
        ctx = await store.create_context(name="doomed", metadata={"who": "someone"})
        keep = await store.create_context(name="kept")
        t1 = await store.append_turn(ctx.context_id, "t", b"one", idempotency_key="k1")
        await store.append_turn(keep.context_id, "t", b"kept")
        await store.delete_context(ctx.context_id)

        cid = ctx.context_id
        for call in (
            store.get_context(cid),
            store.get_head(cid),
            store.list_turns(cid),
            store.get_turn_by_key(cid, "k1"),
            store.append_turn(cid, "t", b"more"),
            store.set_head(cid, 0),
            store.set_context_metadata(cid, {}),
            store.delete_context(cid),
            store.append_turns([NewTurn(cid, "t", b"batch")]),
            store.create_context(parent_context_id=cid),
        ):
            with pytest.raises(ContextNotFound):
                await call
        with pytest.raises(ContextNotFound):
            async for _ in store.iter_turns(cid):
                pass
        assert await store.find_context("doomed") is None
        for order in ("updated", "created", "name"):
            assert await listed(store, order=order) == [keep.context_id]
        assert await listed(store, prefix="doo") == []

        # The name is free again, for a new context with a new id; the old id stays gone.
        again = await store.open_context("doomed")
        assert again.context_id > keep.context_id > cid
        assert again.head_turn_id == 0 and again.metadata == {}
        assert (await store.create_context()).context_id > again.context_id
        with pytest.raises(ContextNotFound):
            await store.get_context(cid)
        # Its turns stay readable by id (records keep their context).
        assert (await store.get_turn(t1.turn_id)).payload == b"one"
        assert await store.check() == []

    async def test_a_new_context_never_takes_a_deleted_id(self, store: TurnStoreBase) -> None:
        first = await store.create_context()
        last = await store.create_context(name="last")
        await store.delete_context(last.context_id)  # the highest id, with no turn naming it
        fresh = await store.create_context(name="last")
        assert fresh.context_id > last.context_id
        with pytest.raises(ContextNotFound):
            await store.get_head(last.context_id)
        assert await listed(store, order="created") == [fresh.context_id, first.context_id]

    async def test_shared_turns_stay(self, store: TurnStoreBase) -> None:
        ctx = await store.create_context()
        ids = [(await store.append_turn(ctx.context_id, "t", b"%d" % i)).turn_id for i in range(5)]
        fork = await store.fork_context(ids[2])
        mine = await store.append_turn(fork.context_id, "t", b"fork")
        other = await store.create_context()
        await store.set_head(other.context_id, ids[4])
        await store.delete_context(ctx.context_id)

        assert await ids_of(store, fork.context_id) == [*ids[:3], mine.turn_id]
        assert await ids_of(store, other.context_id) == ids
        assert [t.turn_id async for t in store.iter_turns(other.context_id, page_size=2)] == ids
        assert (await store.get_context(fork.context_id)).parent_context_id == ctx.context_id  # lineage stays
        assert await listed(store, parent_context_id=ctx.context_id) == [fork.context_id]
        # Appends and forks build on the shared turns as before.
        await store.append_turn(other.context_id, "t", b"on")
        again = await store.fork_context(ids[1])
        assert again.parent_context_id == 0  # the turn's context is gone: no lineage to record
        assert await ids_of(store, again.context_id) == ids[:2]
        with pytest.raises(ContextNotFound):
            await store.fork_context(ids[1], parent_context_id=ctx.context_id)
        assert await store.check() == []

    async def test_its_idempotency_keys_go_with_it(self, store: TurnStoreBase) -> None:
        ctx = await store.create_context(idempotency_key="make-1")
        first = await store.append_turn(ctx.context_id, "t", b"x", idempotency_key="step-1")
        await store.append_turns([NewTurn(ctx.context_id, "t", b"y", idempotency_key="step-2")])
        forked = await store.fork_context(first.turn_id, idempotency_key="fork-1")
        await store.delete_context(ctx.context_id)
        # A creation key that made a deleted context makes a new one (the old one is gone for good);
        # one that made a live context still returns it.
        made = await store.create_context(idempotency_key="make-1")
        assert made.context_id > forked.context_id
        assert (await store.create_context(idempotency_key="make-1")).context_id == made.context_id
        assert (await store.fork_context(first.turn_id, idempotency_key="fork-1")).context_id == forked.context_id
        # The same turn keys in the new context are new turns.
        again = await store.append_turn(made.context_id, "t", b"x", idempotency_key="step-1")
        assert again.turn_id != first.turn_id
        assert await store.get_turn_by_key(made.context_id, "step-2") is None
        # Deleting the fork frees its creation key too.
        await store.delete_context(forked.context_id)
        refork = await store.fork_context(first.turn_id, idempotency_key="fork-1")
        assert refork.context_id > made.context_id
        assert await store.check() == []

    async def test_delete_within_a_batch_of_writes(self, store: TurnStoreBase) -> None:
        """Writers racing a delete: each write lands before it or fails with ContextNotFound."""
        ctx = await store.create_context(name="busy")
        outcomes: list[str] = []

        async def writer(i: int) -> None:
            try:
                await store.append_turn(ctx.context_id, "t", b"%d" % i)
                outcomes.append("ok")
            except ContextNotFound:
                outcomes.append("gone")

        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(writer, i)
            tg.start_soon(store.delete_context, ctx.context_id)
            for i in range(20, 40):
                tg.start_soon(writer, i)
        assert len(outcomes) == 40 and set(outcomes) <= {"ok", "gone"}
        with pytest.raises(ContextNotFound):
            await store.get_head(ctx.context_id)
        assert await store.find_context("busy") is None
        assert await store.check() == []

    async def test_bad_ids(self, store: TurnStoreBase) -> None:
        for bad in (0, -1, 2**63, "1", None, 1.0):
            with pytest.raises(InvalidInput, match="context_id"):
                await store.delete_context(bad)  # type: ignore[arg-type]
        with pytest.raises(ContextNotFound):
            await store.delete_context(12345)
        with pytest.raises(TurnNotFound):
            await store.get_turn(1)


@pytest.mark.parametrize("kind", ["fs", "sqlite"])
async def test_a_delete_survives_reopening(kind: str, tmp_path: Path) -> None:
    async with open_backend(kind, tmp_path) as store:
        gone = await store.create_context(name="gone", idempotency_key="g")
        turn = await store.append_turn(gone.context_id, "t", b"a", idempotency_key="k")
        kept = await store.fork_context(turn.turn_id, name="kept")
        await store.delete_context(gone.context_id)
    async with open_backend(kind, tmp_path) as store:
        with pytest.raises(ContextNotFound):
            await store.get_context(gone.context_id)
        assert await store.find_context("gone") is None
        assert (await store.get_context(kept.context_id)).head_turn_id == turn.turn_id
        fresh = await store.create_context(name="gone", idempotency_key="g")
        assert fresh.context_id > kept.context_id
        assert await store.check() == []


async def test_sqlite_keeps_a_deleted_row_without_name_metadata_or_key(tmp_path: Path) -> None:
    """SQLite: the row stays (its turns name it through a foreign key) but holds nothing of the
    context besides its id, times and head; check() says so if a name were left on it."""
    async with open_backend("sqlite", tmp_path) as store:
        ctx = await store.create_context(name="private-name", metadata={"email": "a@b.c"}, idempotency_key="ck")
        await store.append_turn(ctx.context_id, "t", b"x")
        await store.delete_context(ctx.context_id)
        path = store.path  # type: ignore[attr-defined]
    conn = sqlite3.connect(path)
    try:
        row = conn.execute(
            "SELECT name, metadata, deleted_at_ms FROM contexts WHERE context_id = ?", (ctx.context_id,)
        ).fetchone()
        assert row[0] is None and bytes(row[1]) == b"{}" and row[2] > 0
        assert conn.execute("SELECT count(*) FROM context_keys").fetchone()[0] == 0
        conn.execute("UPDATE contexts SET name = 'left' WHERE context_id = ?", (ctx.context_id,))
        conn.commit()
    finally:
        conn.close()
    async with open_backend("sqlite", tmp_path) as store:
        problems = await store.check()
        assert any("deleted contexts that still hold a name" in p for p in problems), problems
