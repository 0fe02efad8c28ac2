"""Lifecycle conformance (issue 13), run against every turn store backend: delete_context, erase_turns,
prune_context, refs."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import msgspec
import pytest

from pforge_async import (
    ContextNotFound,
    IdempotencyConflict,
    IntegrityError,
    InvalidInput,
    NewTurn,
    ObjectNotFound,
    TurnNotFound,
    TurnRecord,
    open_store,
)
from pforge_async.cas import Cas
from pforge_async.turnstore import MemoryTurnStore
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


class TestErase:
    async def test_erased_payloads_are_gone_and_chains_hold(self, store: TurnStoreBase) -> None:
        ctx = await store.create_context()
        turns = [
            await store.append_turn(ctx.context_id, "msg", b"secret %d" % i, idempotency_key=f"k{i}", type_version=2)
            for i in range(6)
        ]
        assert await store.erase_turns(ctx.context_id, before_turn_id=turns[4].turn_id) == 4
        records = await store.list_turns(ctx.context_id)
        assert [r.turn_id for r in records] == [t.turn_id for t in turns]
        for old, new in zip(turns, records, strict=True):
            erased = old.turn_id < turns[4].turn_id
            assert new.erased is erased
            if erased:
                assert new.payload == b"" and new.payload_hash == ""
                assert new == erased_copy(old)  # everything but the payload is as it was
            else:
                assert new == old
        got = await store.get_turn(turns[0].turn_id)
        assert got.erased and got.payload == b""
        assert await store.get_turn_by_key(ctx.context_id, "k1") == erased_copy(turns[1])
        assert [t.erased async for t in store.iter_turns(ctx.context_id, page_size=2)] == [True] * 4 + [False] * 2
        assert [t.depth async for t in store.iter_turns(ctx.context_id, newest_first=True)] == [6, 5, 4, 3, 2, 1]
        # Erasing again erases only what is left; everything: the head too.
        assert await store.erase_turns(ctx.context_id, before_turn_id=turns[4].turn_id) == 0
        assert await store.erase_turns(ctx.context_id) == 2
        assert await store.erase_turns(ctx.context_id) == 0
        assert all(r.erased for r in await store.list_turns(ctx.context_id))
        # The chain still grows, forks and moves.
        more = await store.append_turn(ctx.context_id, "msg", b"after")
        assert more.depth == 7 and not (await store.get_turn(more.turn_id)).erased
        fork = await store.fork_context(turns[2].turn_id)
        assert (await store.get_head(fork.context_id)).head_depth == 3
        assert await store.check() == []

    async def test_a_retry_of_an_erased_turn_gets_it_back(self, store: TurnStoreBase) -> None:
        ctx = await store.create_context()
        first = await store.append_turn(ctx.context_id, "t", b"personal", idempotency_key="step")
        await store.erase_turns(ctx.context_id)
        again = await store.append_turn(ctx.context_id, "t", b"personal", idempotency_key="step")
        assert again.turn_id == first.turn_id and again.erased and again.payload == b""
        batch = await store.append_turns([NewTurn(ctx.context_id, "t", b"other", idempotency_key="step")])
        assert batch[0].turn_id == first.turn_id
        with pytest.raises(IdempotencyConflict):
            await store.append_turn(ctx.context_id, "u", b"personal", idempotency_key="step")

    async def test_shared_turns_are_erased_for_every_context(self, store: TurnStoreBase) -> None:
        ctx = await store.create_context()
        ids = [(await store.append_turn(ctx.context_id, "t", b"%d" % i)).turn_id for i in range(4)]
        fork = await store.fork_context(ids[1])
        own = await store.append_turn(fork.context_id, "t", b"fork")
        assert await store.erase_turns(fork.context_id) == 3
        assert [r.erased for r in await store.list_turns(ctx.context_id)] == [True, True, False, False]
        assert (await store.get_turn(own.turn_id)).erased  # the fork's head
        # Erasing the main line stops at the turns the fork already erased.
        assert await store.erase_turns(ctx.context_id) == 2
        assert await store.check() == []

    async def test_prune_keeps_the_last_n(self, store: TurnStoreBase) -> None:
        ctx = await store.create_context()
        ids = [(await store.append_turn(ctx.context_id, "t", b"p%d" % i)).turn_id for i in range(10)]
        assert await store.prune_context(ctx.context_id, keep_last=20) == 0
        assert await store.prune_context(ctx.context_id, keep_last=10) == 0
        assert await store.prune_context(ctx.context_id, keep_last=3) == 7
        flags = [r.erased for r in await store.list_turns(ctx.context_id)]
        assert flags == [True] * 7 + [False] * 3
        assert [r.payload for r in await store.list_turns(ctx.context_id, limit=3)] == [b"p7", b"p8", b"p9"]
        assert await store.prune_context(ctx.context_id, keep_last=3) == 0
        await store.append_turn(ctx.context_id, "t", b"p10")
        assert await store.prune_context(ctx.context_id, keep_last=3) == 1
        assert await store.prune_context(ctx.context_id, keep_last=0) == 3
        assert all(r.erased for r in await store.list_turns(ctx.context_id))
        empty = await store.create_context()
        assert await store.prune_context(empty.context_id, keep_last=0) == 0
        assert await store.erase_turns(empty.context_id) == 0
        assert ids and await store.check() == []

    async def test_bad_arguments(self, store: TurnStoreBase) -> None:
        ctx = await store.create_context()
        t = await store.append_turn(ctx.context_id, "t", b"x")
        other = await store.create_context()
        off = await store.append_turn(other.context_id, "t", b"y")
        with pytest.raises(InvalidInput, match="not on the chain"):
            await store.erase_turns(ctx.context_id, before_turn_id=off.turn_id)
        with pytest.raises(InvalidInput, match="not on the chain"):
            await store.erase_turns(ctx.context_id, before_turn_id=999_999)
        for bad in (-1, None, 1.5, True):
            with pytest.raises(InvalidInput, match="keep_last"):
                await store.prune_context(ctx.context_id, keep_last=bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidInput, match="before_turn_id"):
            await store.erase_turns(ctx.context_id, before_turn_id=0)
        with pytest.raises(ContextNotFound):
            await store.erase_turns(999_999)
        await store.delete_context(other.context_id)
        with pytest.raises(ContextNotFound):
            await store.prune_context(other.context_id, keep_last=0)
        assert (await store.get_turn(t.turn_id)).payload == b"x"  # nothing erased by the failures
        assert (await store.get_turn(off.turn_id)).payload == b"y"


@pytest.mark.parametrize("kind", ["fs", "sqlite"])
async def test_erasure_survives_reopening_and_check_tells_erased_from_damaged(kind: str, tmp_path: Path) -> None:
    async with open_backend(kind, tmp_path) as store:
        ctx = await store.create_context()
        ids = [(await store.append_turn(ctx.context_id, "t", b"secret-%d" % i)).turn_id for i in range(5)]
        assert await store.prune_context(ctx.context_id, keep_last=2) == 3
    async with open_backend(kind, tmp_path) as store:
        assert [r.erased for r in await store.list_turns(ctx.context_id)] == [True] * 3 + [False] * 2
        assert (await store.get_turn(ids[0])).payload == b""
        assert await store.check() == []
        path = store.path  # type: ignore[attr-defined]
    if kind == "sqlite":
        conn = sqlite3.connect(path)
        try:
            # A row marked erased that still holds bytes is damage, never served.
            conn.execute("UPDATE turns SET payload = X'00' WHERE turn_id = ?", (ids[1],))
            conn.commit()
        finally:
            conn.close()
        async with open_backend(kind, tmp_path) as store:
            problems = await store.check()
            assert any("erased turns that still hold a payload" in p for p in problems), problems
            with pytest.raises(IntegrityError, match=f"turn {ids[1]} .*marked erased"):
                await store.get_turn(ids[1])
            assert (await store.get_turn(ids[0])).erased


def erased_copy(record: TurnRecord) -> TurnRecord:
    return msgspec.structs.replace(record, payload=b"", payload_hash="", erased=True)


@pytest.fixture(params=BACKENDS)
async def with_cas(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[TurnStoreBase, Cas]]:
    """A backend whose refs are checked against a real CAS (the SQLite store's own)."""
    async with open_store(tmp_path / "cas-store", watch_workspaces=False) as cas_store:
        if request.param == "sqlite":
            async with open_backend("sqlite", tmp_path) as turns:
                yield turns, turns._cas  # type: ignore[attr-defined]  # the store's own CAS
        else:
            async with open_backend(request.param, tmp_path, trees=cas_store.cas) as turns:
                yield turns, cas_store.cas


class TestRefs:
    async def test_refs_are_checked_stored_and_read_back(self, with_cas: tuple[TurnStoreBase, Cas]) -> None:
        store, cas = with_cas
        blob = await cas.write_blob(b"a tool output")
        other = await cas.write_blob(b"another")
        tree = await cas.write_tree([("f", "100644", blob)])
        own = await store.put_blob(b"stored through the turn store")
        ctx = await store.create_context()
        record = await store.append_turn(
            ctx.context_id, "t", b"names them", refs=[other, blob, tree, blob, own], idempotency_key="k"
        )
        assert record.refs == tuple(sorted({blob, other, tree, own}))
        assert (await store.get_turn(record.turn_id)).refs == record.refs
        assert (await store.list_turns(ctx.context_id))[0].refs == record.refs
        plain = await store.append_turn(ctx.context_id, "t", b"none")
        assert plain.refs == () and (await store.get_turn(plain.turn_id)).refs == ()
        batch = await store.append_turns([NewTurn(ctx.context_id, "t", b"b", refs=(tree,))])
        assert batch[0].refs == (tree,) and (await store.get_turn(batch[0].turn_id)).refs == (tree,)

        # A retry: the same refs (in any order) or none get the turn back; other refs conflict.
        again = await store.append_turn(
            ctx.context_id, "t", b"names them", refs=[own, tree, other, blob], idempotency_key="k"
        )
        assert again == record
        assert (await store.append_turn(ctx.context_id, "t", b"names them", idempotency_key="k")) == record
        with pytest.raises(IdempotencyConflict, match="refs"):
            await store.append_turn(ctx.context_id, "t", b"names them", refs=[blob], idempotency_key="k")

        # Erasure drops them with the payload.
        await store.erase_turns(ctx.context_id, before_turn_id=plain.turn_id)
        assert (await store.get_turn(record.turn_id)).refs == ()
        assert (await store.get_turn(batch[0].turn_id)).refs == (tree,)
        assert await store.check() == []

    async def test_bad_refs_store_nothing(self, with_cas: tuple[TurnStoreBase, Cas]) -> None:
        store, _ = with_cas
        ctx = await store.create_context()
        missing = "ab" * 32
        with pytest.raises(ObjectNotFound, match=f"ref {missing}"):
            await store.append_turn(ctx.context_id, "t", b"x", refs=[missing])
        with pytest.raises(ObjectNotFound, match=f"ref {missing}"):
            await store.append_turns(
                [NewTurn(ctx.context_id, "t", b"x"), NewTurn(ctx.context_id, "t", b"y", refs=(missing,))]
            )
        for bad in (["nothex"], "ab" * 32, [1], None, [missing.upper()]):
            with pytest.raises(InvalidInput, match="ref"):
                await store.append_turn(ctx.context_id, "t", b"x", refs=bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidInput, match=r"turns\[0\].*ref"):
            await store.append_turns([NewTurn(ctx.context_id, "t", b"x", refs=("zz",))])
        with pytest.raises(InvalidInput, match="over the maximum"):
            await store.append_turn(ctx.context_id, "t", b"x", refs=[f"{i:064x}" for i in range(4097)])
        assert (await store.get_head(ctx.context_id)).head_turn_id == 0


async def test_refs_without_a_cas_are_the_stores_own_blobs() -> None:
    store = MemoryTurnStore()
    ctx = await store.create_context()
    own = await store.put_blob(b"mine")
    assert (await store.append_turn(ctx.context_id, "t", b"x", refs=[own])).refs == (own,)
    with pytest.raises(ObjectNotFound, match="no CAS"):
        await store.append_turn(ctx.context_id, "t", b"x", refs=["cd" * 32])


@pytest.mark.parametrize("kind", ["fs", "sqlite"])
async def test_refs_survive_reopening(kind: str, tmp_path: Path) -> None:
    async with open_store(tmp_path / "cas-store", watch_workspaces=False) as cas_store:
        trees = None if kind == "sqlite" else cas_store.cas
        async with open_backend(kind, tmp_path, trees=trees) as store:
            blob = await store.put_blob(b"kept")
            ctx = await store.create_context()
            record = await store.append_turn(ctx.context_id, "t", b"x", refs=[blob])
        async with open_backend(kind, tmp_path, trees=trees) as store:
            assert (await store.get_turn(record.turn_id)).refs == (blob,)
            assert await store.check() == []
