"""One conformance suite, run against every turn store backend."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from pforge_async import (
    Conflict,
    ContextNotFound,
    IdempotencyConflict,
    InvalidInput,
    TurnNotFound,
    open_store,
)
from pforge_async.turnstore import ArtifactStore, FsTurnStore, MemoryTurnStore, TurnStore, TypedTurnStore
from pforge_async.turnstore.base import TurnStoreBase

pytestmark = pytest.mark.anyio

MAX_PAYLOAD = 4096
BACKENDS = ["memory", "fs", "sqlite"]


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[TurnStoreBase]:
    kind = request.param
    if kind == "memory":
        yield MemoryTurnStore(max_payload_bytes=MAX_PAYLOAD)
    elif kind == "fs":
        async with FsTurnStore(tmp_path / "fs", max_payload_bytes=MAX_PAYLOAD) as fs:
            yield fs
    else:
        async with open_store(tmp_path / ".pforge", max_payload_bytes=MAX_PAYLOAD) as opened:
            yield opened.turns


async def chain(store: TurnStoreBase, context_id: int) -> list[int]:
    return [t.turn_id for t in await store.list_turns(context_id, limit=10_000)]


class TestTurnStoreConformance:
    async def test_protocols(self, store: TurnStoreBase) -> None:
        assert isinstance(store, TurnStore)
        assert isinstance(store, TypedTurnStore)
        assert isinstance(store, ArtifactStore)

    async def test_first_turn_and_head_movement(self, store: TurnStoreBase) -> None:
        ctx = await store.create_context()
        assert (ctx.head_turn_id, ctx.head_depth) == (0, 0)
        assert await store.list_turns(ctx.context_id) == []
        first = await store.append_turn(ctx.context_id, "user", b"hello")
        assert (first.depth, first.parent_turn_id, first.context_id) == (1, 0, ctx.context_id)
        assert first.payload_hash == hashlib.sha256(b"hello").hexdigest()
        assert first.type_version == 1 and first.idempotency_key is None and first.fs_root is None
        second = await store.append_turn(ctx.context_id, "assistant", b"hi", type_version=3)
        assert (second.parent_turn_id, second.depth, second.type_version) == (first.turn_id, 2, 3)
        assert second.turn_id > first.turn_id
        head = await store.get_head(ctx.context_id)
        assert (head.head_turn_id, head.head_depth) == (second.turn_id, 2)
        assert await store.get_turn(first.turn_id) == first

    async def test_explicit_parent_branches_within_a_context(self, store: TurnStoreBase) -> None:
        ctx = await store.create_context()
        a = await store.append_turn(ctx.context_id, "t", b"a")
        await store.append_turn(ctx.context_id, "t", b"b")
        c = await store.append_turn(ctx.context_id, "t", b"c", parent_turn_id=a.turn_id)
        assert (c.parent_turn_id, c.depth) == (a.turn_id, 2)
        assert await chain(store, ctx.context_id) == [a.turn_id, c.turn_id]
        root = await store.append_turn(ctx.context_id, "t", b"new root", parent_turn_id=0)
        assert (root.parent_turn_id, root.depth) == (0, 1)

    async def test_forks_share_history_without_copying(self, store: TurnStoreBase) -> None:
        ctx = await store.create_context()
        turns = [await store.append_turn(ctx.context_id, "t", b"%d" % i) for i in range(5)]
        fork = await store.fork_context(turns[2].turn_id)
        assert (fork.head_turn_id, fork.head_depth) == (turns[2].turn_id, 3)
        assert fork.context_id != ctx.context_id
        child = await store.append_turn(fork.context_id, "t", b"child")
        assert child.depth == 4 and child.context_id == fork.context_id
        assert await chain(store, fork.context_id) == [t.turn_id for t in turns[:3]] + [child.turn_id]
        shared = await store.get_turn(turns[1].turn_id)
        assert shared.context_id == ctx.context_id  # the same turn, not a copy
        assert await chain(store, ctx.context_id) == [t.turn_id for t in turns]
        based = await store.create_context(base_turn_id=turns[4].turn_id)
        assert await chain(store, based.context_id) == [t.turn_id for t in turns]

    async def test_list_turns_paging(self, store: TurnStoreBase) -> None:
        ctx = await store.create_context()
        ids = [(await store.append_turn(ctx.context_id, "t", b"%d" % i)).turn_id for i in range(10)]
        page = await store.list_turns(ctx.context_id, limit=4)
        assert [t.turn_id for t in page] == ids[6:]
        pages = [ids[6:]]
        while page:
            page = await store.list_turns(ctx.context_id, before_turn_id=page[0].turn_id, limit=4)
            if page:
                pages.append([t.turn_id for t in page])
        assert pages == [ids[6:], ids[2:6], ids[0:2]]
        assert await store.list_turns(ctx.context_id, limit=0) == []
        assert await store.list_turns(ctx.context_id, before_turn_id=ids[0]) == []
        assert [t.turn_id for t in await store.list_turns(ctx.context_id)] == ids  # default 64

    async def test_off_chain_cursor_is_invalid(self, store: TurnStoreBase) -> None:
        ctx = await store.create_context()
        a = await store.append_turn(ctx.context_id, "t", b"a")
        b = await store.append_turn(ctx.context_id, "t", b"b")
        other = await store.fork_context(a.turn_id)
        c = await store.append_turn(other.context_id, "t", b"c")
        with pytest.raises(InvalidInput, match=str(c.turn_id)):
            await store.list_turns(ctx.context_id, before_turn_id=c.turn_id)
        with pytest.raises(InvalidInput):
            await store.list_turns(other.context_id, before_turn_id=b.turn_id)
        with pytest.raises(InvalidInput):
            await store.list_turns(ctx.context_id, before_turn_id=10**9)
        assert [t.turn_id for t in await store.list_turns(other.context_id, before_turn_id=c.turn_id)] == [a.turn_id]

    async def test_idempotent_append(self, store: TurnStoreBase) -> None:
        ctx = await store.create_context()
        first = await store.append_turn(ctx.context_id, "user", b"once", idempotency_key="k")
        again = await store.append_turn(ctx.context_id, "user", b"once", idempotency_key="k")
        assert again == first
        assert await chain(store, ctx.context_id) == [first.turn_id]
        later = await store.append_turn(ctx.context_id, "user", b"later")
        # The head moved on; a retry of the first write still gets the first turn, writes nothing.
        assert await store.append_turn(ctx.context_id, "user", b"once", idempotency_key="k") == first
        assert await store.append_turn(ctx.context_id, "user", b"once", idempotency_key="k", parent_turn_id=0) == first
        assert (await store.get_head(ctx.context_id)).head_turn_id == later.turn_id
        assert await chain(store, ctx.context_id) == [first.turn_id, later.turn_id]

    async def test_idempotency_conflicts(self, store: TurnStoreBase) -> None:
        ctx = await store.create_context()
        first = await store.append_turn(ctx.context_id, "user", b"once", idempotency_key="k")
        with pytest.raises(IdempotencyConflict, match="payload"):
            await store.append_turn(ctx.context_id, "user", b"twice", idempotency_key="k")
        with pytest.raises(IdempotencyConflict, match="type"):
            await store.append_turn(ctx.context_id, "assistant", b"once", idempotency_key="k")
        with pytest.raises(IdempotencyConflict, match="type"):
            await store.append_turn(ctx.context_id, "user", b"once", type_version=2, idempotency_key="k")
        with pytest.raises(IdempotencyConflict, match="parent"):
            await store.append_turn(ctx.context_id, "user", b"once", idempotency_key="k", parent_turn_id=first.turn_id)
        assert await chain(store, ctx.context_id) == [first.turn_id]

    async def test_keys_are_per_context(self, store: TurnStoreBase) -> None:
        one = await store.create_context()
        two = await store.create_context()
        a = await store.append_turn(one.context_id, "t", b"x", idempotency_key="same")
        b = await store.append_turn(two.context_id, "t", b"x", idempotency_key="same")
        assert a.turn_id != b.turn_id and b.context_id == two.context_id

    async def test_registry_bundles(self, store: TurnStoreBase) -> None:
        bundle = b'{"types": {"user": {"version": 1}}}'
        assert await store.get_registry_bundle("b1") is None
        await store.publish_registry_bundle("b1", bundle)
        await store.publish_registry_bundle("b1", bundle)  # the same again: fine
        assert await store.get_registry_bundle("b1") == bundle
        with pytest.raises(Conflict, match="b1"):
            await store.publish_registry_bundle("b1", b'{"types": {}}')
        with pytest.raises(InvalidInput, match="JSON"):
            await store.publish_registry_bundle("b2", b"{not json")
        with pytest.raises(InvalidInput):
            await store.publish_registry_bundle("", bundle)
        assert await store.get_registry_bundle("b1") == bundle
        assert await store.get_registry_bundle("b2") is None

    async def test_blobs_and_attach_fs(self, store: TurnStoreBase) -> None:
        oid = await store.put_blob(b"artifact")
        assert oid == hashlib.sha256(b"blob 8\0artifact").hexdigest()  # git's blob id everywhere
        assert await store.get_blob(oid) == b"artifact"
        ctx = await store.create_context()
        turn = await store.append_turn(ctx.context_id, "tool", b"ran")
        await store.attach_fs(turn.turn_id, oid)
        await store.attach_fs(turn.turn_id, oid)
        assert (await store.get_turn(turn.turn_id)).fs_root == oid
        other = await store.put_blob(b"other")
        with pytest.raises(Conflict, match=str(turn.turn_id)):
            await store.attach_fs(turn.turn_id, other)
        with pytest.raises(TurnNotFound):
            await store.attach_fs(10**9, oid)
        with pytest.raises(InvalidInput, match="fs_root"):
            await store.attach_fs(turn.turn_id, "../../etc")

    async def test_bad_input_leaves_the_store_serving(self, store: TurnStoreBase) -> None:
        ctx = await store.create_context()
        good = await store.append_turn(ctx.context_id, "t", b"good")
        with pytest.raises(ContextNotFound, match="424242"):
            await store.append_turn(424242, "t", b"x")
        with pytest.raises(ContextNotFound):
            await store.get_head(424242)
        for limit in (64, 0):
            with pytest.raises(ContextNotFound, match="424242"):
                await store.list_turns(424242, limit=limit)
        assert await store.list_turns((await store.create_context()).context_id) == []
        with pytest.raises(TurnNotFound, match="777777"):
            await store.append_turn(ctx.context_id, "t", b"x", parent_turn_id=777777)
        with pytest.raises(TurnNotFound):
            await store.fork_context(777777)
        with pytest.raises(TurnNotFound):
            await store.create_context(base_turn_id=777777)
        with pytest.raises(TurnNotFound):
            await store.get_turn(777777)
        with pytest.raises(InvalidInput, match="maximum"):
            await store.append_turn(ctx.context_id, "t", b"x" * (MAX_PAYLOAD + 1))
        for bad_type in ("", 7, None, "x" * 1000):
            with pytest.raises(InvalidInput, match="type_id"):
                await store.append_turn(ctx.context_id, bad_type, b"x")  # type: ignore[arg-type]
        with pytest.raises(InvalidInput, match="payload"):
            await store.append_turn(ctx.context_id, "t", "text")  # type: ignore[arg-type]
        for bad_limit in (-1, 1.5, True):
            with pytest.raises(InvalidInput, match="limit"):
                await store.list_turns(ctx.context_id, limit=bad_limit)  # type: ignore[arg-type]
        for bad_id in (-1, 0, True, "1", 2**64):
            with pytest.raises(InvalidInput):
                await store.get_turn(bad_id)  # type: ignore[arg-type]
        with pytest.raises(InvalidInput, match="idempotency_key"):
            await store.append_turn(ctx.context_id, "t", b"x", idempotency_key="")
        with pytest.raises(InvalidInput, match="type_version"):
            await store.append_turn(ctx.context_id, "t", b"x", type_version=-1)
        # Nothing was written by any of that, and the store still serves.
        assert await chain(store, ctx.context_id) == [good.turn_id]
        assert (await store.append_turn(ctx.context_id, "t", b"after")).parent_turn_id == good.turn_id

    async def test_64_tasks_on_shared_and_own_contexts(self, store: TurnStoreBase) -> None:
        shared = await store.create_context()
        own: dict[int, list[int]] = {}
        shared_ids: list[int] = []

        async def agent(n: int) -> None:
            ctx = await store.create_context()
            own[ctx.context_id] = []
            for i in range(10):
                turn = await store.append_turn(ctx.context_id, "t", b"%d-%d" % (n, i), idempotency_key=f"{i}")
                own[ctx.context_id].append(turn.turn_id)
                turn = await store.append_turn(shared.context_id, "t", b"%d-%d" % (n, i), idempotency_key=f"{n}-{i}")
                shared_ids.append(turn.turn_id)

        async with anyio.create_task_group() as tg:
            for n in range(64):
                tg.start_soon(agent, n)
        for context_id, ids in own.items():
            assert await chain(store, context_id) == ids
        assert sorted(await chain(store, shared.context_id)) == sorted(shared_ids)
        assert len(set(shared_ids)) == 640
        head = await store.get_head(shared.context_id)
        assert head.head_depth == 640
