"""One conformance suite, run against every turn store backend."""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import msgspec
import pytest

from pforge_async import (
    Conflict,
    ContextNotFound,
    HeadConflict,
    IdempotencyConflict,
    IntegrityError,
    InvalidInput,
    NewTurn,
    ObjectNotFound,
    TurnNotFound,
    open_store,
)
from pforge_async.cas import Cas
from pforge_async.turnstore import (
    ArtifactStore,
    FsTurnStore,
    MemoryTurnStore,
    SessionStore,
    TurnStore,
    TypedTurnStore,
)
from pforge_async.turnstore.base import TurnStoreBase
from pforge_async.turnstore.fs import MAGIC

pytestmark = pytest.mark.anyio

MAX_PAYLOAD = 4096
BACKENDS = ["memory", "fs", "sqlite"]


@asynccontextmanager
async def open_backend(kind: str, tmp_path: Path, *, trees: Cas | None = None) -> AsyncIterator[TurnStoreBase]:
    if kind == "memory":
        yield MemoryTurnStore(max_payload_bytes=MAX_PAYLOAD, trees=trees)
    elif kind == "fs":
        async with FsTurnStore(tmp_path / "fs", max_payload_bytes=MAX_PAYLOAD, trees=trees) as fs:
            yield fs
    else:
        async with open_store(tmp_path / ".pforge", max_payload_bytes=MAX_PAYLOAD, watch_workspaces=False) as opened:
            yield opened.turns


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[TurnStoreBase]:
    async with open_backend(request.param, tmp_path) as opened:
        yield opened


@pytest.fixture(params=BACKENDS)
async def with_cas(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[TurnStoreBase, Cas]]:
    """A backend whose ``fs_root`` oids are checked against a real CAS (the SQLite store's own)."""
    async with open_store(tmp_path / "cas-store", watch_workspaces=False) as cas_store:
        if request.param == "sqlite":
            async with open_backend("sqlite", tmp_path) as turns:
                yield turns, turns._cas  # type: ignore[attr-defined]  # the store's own CAS
        else:
            async with open_backend(request.param, tmp_path, trees=cas_store.cas) as turns:
                yield turns, cas_store.cas


async def chain(store: TurnStoreBase, context_id: int) -> list[int]:
    return [t.turn_id for t in await store.list_turns(context_id, limit=10_000)]


class TestTurnStoreConformance:
    async def test_protocols(self, store: TurnStoreBase) -> None:
        assert isinstance(store, TurnStore)
        assert isinstance(store, SessionStore)
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

    async def test_blobs(self, store: TurnStoreBase) -> None:
        oid = await store.put_blob(b"artifact")
        assert oid == hashlib.sha256(b"blob 8\0artifact").hexdigest()  # git's blob id everywhere
        assert await store.get_blob(oid) == b"artifact"
        ctx = await store.create_context()
        turn = await store.append_turn(ctx.context_id, "tool", b"ran")
        # A blob is not a workspace tree: refused by every backend, whether or not it has a CAS.
        with pytest.raises(InvalidInput, match="tree"):
            await store.attach_fs(turn.turn_id, oid)
        with pytest.raises(InvalidInput, match="tree"):
            await store.append_turn(ctx.context_id, "tool", b"x", fs_root=oid)
        assert (await store.get_turn(turn.turn_id)).fs_root is None
        assert await chain(store, ctx.context_id) == [turn.turn_id]

    async def test_attach_fs_and_fs_root_on_append(self, with_cas: tuple[TurnStoreBase, Cas]) -> None:
        store, cas = with_cas
        blob = await cas.write_blob(b"workspace file")
        tree = await cas.write_tree([("src/main.py", "100644", blob)])
        other = await cas.write_tree([("README", "100644", blob)])
        ctx = await store.create_context()
        turn = await store.append_turn(ctx.context_id, "tool", b"ran")
        await store.attach_fs(turn.turn_id, tree)
        await store.attach_fs(turn.turn_id, tree)  # the same again: fine
        assert (await store.get_turn(turn.turn_id)).fs_root == tree
        with pytest.raises(Conflict, match=str(turn.turn_id)):
            await store.attach_fs(turn.turn_id, other)
        with pytest.raises(TurnNotFound):
            await store.attach_fs(10**9, tree)
        with pytest.raises(InvalidInput, match="fs_root"):
            await store.attach_fs(turn.turn_id, "../../etc")
        # fs_root in the append itself: one write, the tree checked first.
        snap = await store.append_turn(ctx.context_id, "tool", b"snap", fs_root=other, idempotency_key="s")
        assert snap.fs_root == other and (await store.get_turn(snap.turn_id)).fs_root == other
        assert await store.append_turn(ctx.context_id, "tool", b"snap", fs_root=other, idempotency_key="s") == snap
        with pytest.raises(IdempotencyConflict, match="fs_root"):
            await store.append_turn(ctx.context_id, "tool", b"snap", fs_root=tree, idempotency_key="s")
        missing = hashlib.sha256(b"nothing").hexdigest()
        with pytest.raises(ObjectNotFound, match=missing):
            await store.append_turn(ctx.context_id, "tool", b"x", fs_root=missing)
        with pytest.raises(ObjectNotFound, match=missing):
            await store.attach_fs(turn.turn_id, missing)
        with pytest.raises(InvalidInput, match="tree"):
            await store.append_turn(ctx.context_id, "tool", b"x", fs_root=blob)
        with pytest.raises(InvalidInput, match="tree"):
            await store.attach_fs(snap.turn_id, blob)
        with pytest.raises(InvalidInput, match="fs_root"):
            await store.append_turn(ctx.context_id, "tool", b"x", fs_root="F" * 64)
        batch = await store.append_turns([NewTurn(ctx.context_id, "tool", b"b", fs_root=tree)])
        assert batch[0].fs_root == tree
        with pytest.raises(ObjectNotFound):
            await store.append_turns(
                [NewTurn(ctx.context_id, "tool", b"c"), NewTurn(ctx.context_id, "t", b"d", fs_root=missing)]
            )
        assert await chain(store, ctx.context_id) == [turn.turn_id, snap.turn_id, batch[0].turn_id]

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
        for bad_id in (-1, 0, True, "1", 2**63, 2**64):
            with pytest.raises(InvalidInput):
                await store.get_turn(bad_id)  # type: ignore[arg-type]
            with pytest.raises(InvalidInput):
                await store.append_turn(ctx.context_id, "t", b"x", parent_turn_id=bad_id or -1)  # type: ignore[arg-type]
            with pytest.raises(InvalidInput):
                await store.get_context(bad_id)  # type: ignore[arg-type]
        with pytest.raises(InvalidInput, match="type_id"):
            await store.append_turn(ctx.context_id, "t\ud800", b"x")
        with pytest.raises(InvalidInput, match="idempotency_key"):
            await store.append_turn(ctx.context_id, "t", b"x", idempotency_key="k\udfff")
        with pytest.raises(InvalidInput, match="bundle_id"):
            await store.publish_registry_bundle("b\ud800", b"{}")
        with pytest.raises(InvalidInput, match="bundle_id"):
            await store.get_registry_bundle("b\ud800")
        with pytest.raises(InvalidInput, match="key"):
            await store.get_turn_by_key(ctx.context_id, "k\ud800")
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


async def all_contexts(store: TurnStoreBase, **kwargs: object) -> list[int]:
    """Every context of a listing, paged to the end 3 at a time."""
    ids: list[int] = []
    after = None
    while True:
        page = await store.list_contexts(after=after, limit=3, **kwargs)  # type: ignore[arg-type]
        assert len(page.contexts) <= 3
        ids += [c.context_id for c in page.contexts]
        if page.cursor is None:
            return ids
        after = page.cursor


class TestSessions:
    async def test_open_context_is_get_or_create(self, store: TurnStoreBase) -> None:
        first = await store.open_context("app/alice/s1", metadata={"user": "alice"})
        assert (first.name, first.metadata, first.head_turn_id, first.head_depth) == (
            "app/alice/s1",
            {"user": "alice"},
            0,
            0,
        )
        assert (first.base_turn_id, first.parent_context_id) == (0, 0)
        assert first.created_at_ms == first.updated_at_ms > 0
        again = await store.open_context("app/alice/s1", metadata={"other": 1})  # returned unchanged
        assert again == first
        assert await store.find_context("app/alice/s1") == first
        assert await store.find_context("app/alice/s2") is None
        assert await store.get_context(first.context_id) == first
        turn = await store.append_turn(first.context_id, "user", b"hi")
        reopened = await store.open_context("app/alice/s1")
        assert (reopened.context_id, reopened.head_turn_id, reopened.head_depth) == (first.context_id, turn.turn_id, 1)
        second = await store.open_context("app/alice/s2", base_turn_id=turn.turn_id, parent_context_id=first.context_id)
        assert (second.head_turn_id, second.base_turn_id, second.parent_context_id) == (
            turn.turn_id,
            turn.turn_id,
            first.context_id,
        )
        assert second.context_id != first.context_id
        assert len(await all_contexts(store)) == 2

    async def test_many_tasks_open_one_name(self, store: TurnStoreBase) -> None:
        got: list[int] = []

        async def opener() -> None:
            got.append((await store.open_context("shared")).context_id)

        async with anyio.create_task_group() as tg:
            for _ in range(32):
                tg.start_soon(opener)
        assert len(set(got)) == 1 and len(got) == 32
        assert await all_contexts(store) == got[:1]

    async def test_taken_and_invalid_names(self, store: TurnStoreBase) -> None:
        taken = await store.create_context(name="taken")
        turn = await store.append_turn(taken.context_id, "t", b"x")
        with pytest.raises(Conflict, match="taken"):
            await store.create_context(name="taken")
        with pytest.raises(Conflict, match="taken"):
            await store.fork_context(turn.turn_id, name="taken")
        longest = "é" * 512  # 1,024 UTF-8 bytes: the most a name may have
        assert (await store.open_context(longest)).name == longest
        bad_names: list[object] = ["", "a\0b", "lone \ud800", "é" * 513, "x" * 1025, None, 7, b"bytes"]
        for bad in bad_names:
            with pytest.raises(InvalidInput, match="name"):
                await store.open_context(bad)  # type: ignore[arg-type]
            if bad is not None:
                with pytest.raises(InvalidInput, match="name"):
                    await store.create_context(name=bad)  # type: ignore[arg-type]
                with pytest.raises(InvalidInput, match="name"):
                    await store.fork_context(turn.turn_id, name=bad)  # type: ignore[arg-type]
                with pytest.raises(InvalidInput, match="name"):
                    await store.find_context(bad)  # type: ignore[arg-type]
        with pytest.raises(TurnNotFound):
            await store.open_context("orphan", base_turn_id=999_999)
        with pytest.raises(ContextNotFound):
            await store.open_context("orphan", parent_context_id=999_999)
        assert await store.find_context("orphan") is None
        assert len(await all_contexts(store)) == 2  # nothing else was created

    async def test_lineage(self, store: TurnStoreBase) -> None:
        root = await store.create_context(name="root")
        a = await store.append_turn(root.context_id, "t", b"a")
        b = await store.append_turn(root.context_id, "t", b"b")
        fork = await store.fork_context(a.turn_id, name="root/fork", metadata={"why": "retry"})
        assert (fork.base_turn_id, fork.parent_context_id, fork.head_turn_id, fork.head_depth) == (
            a.turn_id,
            root.context_id,
            a.turn_id,
            1,
        )
        assert fork.metadata == {"why": "retry"} and fork.name == "root/fork"
        # A fork of a fork: by default the parent is the context the turn was appended in...
        c = await store.append_turn(fork.context_id, "t", b"c")
        grandchild = await store.fork_context(c.turn_id)
        assert grandchild.parent_context_id == fork.context_id
        # ... or the one the caller names (a turn shared from the root, forked "from" the fork).
        named = await store.fork_context(a.turn_id, parent_context_id=fork.context_id)
        assert named.parent_context_id == fork.context_id
        plain = await store.create_context(base_turn_id=b.turn_id)
        assert (plain.parent_context_id, plain.base_turn_id) == (0, b.turn_id)
        with pytest.raises(ContextNotFound):
            await store.fork_context(a.turn_id, parent_context_id=999_999)
        assert await all_contexts(store, parent_context_id=root.context_id) == [fork.context_id]
        assert sorted(await all_contexts(store, parent_context_id=fork.context_id)) == sorted(
            [grandchild.context_id, named.context_id]
        )
        assert await all_contexts(store, parent_context_id=grandchild.context_id) == []
        # The parent moving on changes nothing in the fork.
        await store.append_turn(root.context_id, "t", b"later")
        assert (await store.get_context(fork.context_id)).head_turn_id == c.turn_id

    async def test_idempotent_creation_and_forks(self, store: TurnStoreBase) -> None:
        one = await store.create_context(name="s", metadata={"a": 1}, idempotency_key="create-s")
        assert await store.create_context(name="s", metadata={"a": 1}, idempotency_key="create-s") == one
        turn = await store.append_turn(one.context_id, "t", b"x")
        fork = await store.fork_context(turn.turn_id, idempotency_key="fork-1")
        again = await store.fork_context(turn.turn_id, idempotency_key="fork-1")
        assert again == fork
        await store.append_turn(fork.context_id, "t", b"in the fork")
        moved = await store.fork_context(turn.turn_id, idempotency_key="fork-1")
        assert moved.context_id == fork.context_id and moved.head_depth == 2  # the context as it is now
        for differs in (
            store.create_context(name="s", metadata={"a": 2}, idempotency_key="create-s"),
            store.create_context(idempotency_key="create-s"),
            store.fork_context(turn.turn_id, idempotency_key="create-s"),  # keys are scoped to the store
            store.fork_context(turn.turn_id, name="other", idempotency_key="fork-1"),
            store.create_context(idempotency_key="fork-1"),
        ):
            with pytest.raises(IdempotencyConflict):
                await differs
        # A retry of a named create finds its context although the name is now taken (by itself).
        assert (
            await store.create_context(name="s", metadata={"a": 1}, idempotency_key="create-s")
        ).context_id == one.context_id
        assert sorted(await all_contexts(store)) == sorted([one.context_id, fork.context_id])
        with pytest.raises(InvalidInput, match="idempotency_key"):
            await store.create_context(idempotency_key="")
        with pytest.raises(InvalidInput, match="idempotency_key"):
            await store.fork_context(turn.turn_id, idempotency_key="\udc80")

    async def test_list_contexts_orders_prefixes_and_pages(self, store: TurnStoreBase) -> None:
        names = ["app/bob/2", "app/alice/1", "app/bob/1", "app/alice/2", "other/x", "app/carol/1", "app/ålice"]
        created = [await store.create_context(name=name) for name in names]
        unnamed = [await store.create_context() for _ in range(2)]
        every = [c.context_id for c in created + unnamed]
        # Touch some, so "updated" differs from "created".
        for info in (created[1], created[4], unnamed[0]):
            await store.append_turn(info.context_id, "t", b"x")
        infos = [await store.get_context(c) for c in every]
        by_updated = [i.context_id for i in sorted(infos, key=lambda i: (i.updated_at_ms, i.context_id), reverse=True)]
        for touched in (created[1], created[4], unnamed[0]):
            assert (await store.get_context(touched.context_id)).updated_at_ms > touched.updated_at_ms
        assert by_updated.index(created[4].context_id) < by_updated.index(created[1].context_id)
        assert await all_contexts(store) == by_updated
        assert await all_contexts(store, order="updated") == by_updated
        assert await all_contexts(store, order="created") == sorted(every, reverse=True)
        by_name = sorted((c for c in created), key=lambda c: c.name or "")
        assert await all_contexts(store, order="name") == [c.context_id for c in by_name]
        for order in ("updated", "created", "name"):
            bob = await all_contexts(store, prefix="app/bob/", order=order)
            expected = [c.context_id for c in created if (c.name or "").startswith("app/bob/")]
            assert sorted(bob) == sorted(expected)
            assert await all_contexts(store, prefix="nothing/", order=order) == []
            everything_named = await all_contexts(store, prefix="", order=order)
            assert sorted(everything_named) == sorted(c.context_id for c in created)
        assert await all_contexts(store, prefix="app/bob/", order="name") == [
            created[2].context_id,
            created[0].context_id,
        ]
        # "app/ålice" sorts after every ASCII name of the prefix (code point = UTF-8 byte order).
        assert (await all_contexts(store, prefix="app/", order="name"))[-1] == created[6].context_id
        # One page, with its cursor; the last page has none.
        page = await store.list_contexts(order="created", limit=len(every))
        assert page.cursor is None and len(page.contexts) == len(every)
        page = await store.list_contexts(order="created", limit=2)
        assert page.cursor is not None and [c.context_id for c in page.contexts] == sorted(every, reverse=True)[:2]
        assert page.contexts[0] == await store.get_context(page.contexts[0].context_id)
        # Cursors belong to one order; limits, orders and filters are checked.
        with pytest.raises(InvalidInput, match="cursor"):
            await store.list_contexts(order="name", after=page.cursor)
        for bad in ("", "garbage", "c.-1", "c.x", "u.1", "n.", 7):
            with pytest.raises(InvalidInput):
                await store.list_contexts(order="created", after=bad)  # type: ignore[arg-type]
        for bad_limit in (0, -1, 10_001, 1.5, True):
            with pytest.raises(InvalidInput, match="limit"):
                await store.list_contexts(limit=bad_limit)  # type: ignore[arg-type]
        with pytest.raises(InvalidInput, match="order"):
            await store.list_contexts(order="random")  # type: ignore[arg-type]
        with pytest.raises(InvalidInput, match="prefix"):
            await store.list_contexts(prefix="a\0")
        with pytest.raises(InvalidInput, match="parent_context_id"):
            await store.list_contexts(parent_context_id=0)

    async def test_a_cursor_survives_changes_between_pages(self, store: TurnStoreBase) -> None:
        ids = [(await store.create_context(name=f"n{i}")).context_id for i in range(6)]
        page = await store.list_contexts(order="updated", limit=3)
        seen = [c.context_id for c in page.contexts]
        await store.append_turn(seen[0], "t", b"moves to the front")  # already listed: not again
        await store.append_turn(ids[0], "t", b"not yet listed: moves ahead of the cursor")
        rest = await store.list_contexts(order="updated", after=page.cursor, limit=10)
        listed = seen + [c.context_id for c in rest.contexts]
        assert len(listed) == len(set(listed))  # each at most once in a pass
        assert set(listed) | {ids[0]} == set(ids)

    async def test_metadata_and_updated_at(self, store: TurnStoreBase) -> None:
        ctx = await store.create_context(metadata={"title": "chat", "n": [1, 2.5, None, True], "deep": {"x": "é"}})
        assert ctx.metadata == {"title": "chat", "n": [1, 2.5, None, True], "deep": {"x": "é"}}
        ctx.metadata["title"] = "mutated copy"  # a copy: the store is not changed through it
        assert (await store.get_context(ctx.context_id)).metadata["title"] == "chat"
        turn = await store.append_turn(ctx.context_id, "t", b"x", idempotency_key="k")
        appended = await store.get_context(ctx.context_id)
        assert appended.updated_at_ms > ctx.updated_at_ms and appended.created_at_ms == ctx.created_at_ms
        await store.append_turn(ctx.context_id, "t", b"x", idempotency_key="k")  # a retry writes nothing
        assert (await store.get_context(ctx.context_id)).updated_at_ms == appended.updated_at_ms
        changed = await store.set_context_metadata(
            ctx.context_id, {"title": "renamed"}, expected_updated_at_ms=appended.updated_at_ms
        )
        assert changed.metadata == {"title": "renamed"} and changed.updated_at_ms > appended.updated_at_ms
        assert changed.head_turn_id == turn.turn_id
        assert await store.get_context(ctx.context_id) == changed
        with pytest.raises(Conflict, match=str(appended.updated_at_ms)):
            await store.set_context_metadata(
                ctx.context_id, {"title": "stale"}, expected_updated_at_ms=appended.updated_at_ms
            )
        cleared = await store.set_context_metadata(ctx.context_id, {})
        assert cleared.metadata == {} and cleared.updated_at_ms > changed.updated_at_ms
        with pytest.raises(ContextNotFound):
            await store.set_context_metadata(999_999, {})
        bad_metadata: list[object] = [
            {"x": float("nan")},
            {"x": float("inf")},
            {"x": (1, 2)},
            {"x": b"bytes"},
            {1: "int key"},
            {"x": {1, 2}},
            {"x": "\ud800"},
            {"\ud800": 1},
            {"big": "x" * (64 << 10)},
            [1, 2],
            "text",
            None,
        ]
        deep: dict[str, object] = {}
        for _ in range(100):
            deep = {"d": deep}
        bad_metadata.append(deep)
        for bad in bad_metadata:
            with pytest.raises(InvalidInput, match="metadata"):
                await store.set_context_metadata(ctx.context_id, bad)  # type: ignore[arg-type]
            if bad is not None:
                with pytest.raises(InvalidInput, match="metadata"):
                    await store.create_context(metadata=bad)  # type: ignore[arg-type]
        assert await store.get_context(ctx.context_id) == cleared
        assert await all_contexts(store) == [ctx.context_id]

    async def test_set_head_rewinds_clears_and_switches(self, store: TurnStoreBase) -> None:
        ctx = await store.create_context()
        a, b, c = [await store.append_turn(ctx.context_id, "t", x) for x in (b"a", b"b", b"c")]
        popped = await store.set_head(ctx.context_id, b.turn_id)  # "pop the last item"
        assert (popped.head_turn_id, popped.head_depth) == (b.turn_id, 2)
        assert await chain(store, ctx.context_id) == [a.turn_id, b.turn_id]
        assert (await store.get_turn(c.turn_id)).payload == b"c"  # the turn stays
        branch = await store.append_turn(ctx.context_id, "t", b"b2")
        assert branch.parent_turn_id == b.turn_id
        switched = await store.set_head(ctx.context_id, c.turn_id, expected_head=branch.turn_id)  # switch branch
        assert await chain(store, ctx.context_id) == [a.turn_id, b.turn_id, c.turn_id]
        assert switched.updated_at_ms > popped.updated_at_ms
        with pytest.raises(HeadConflict) as caught:
            await store.set_head(ctx.context_id, a.turn_id, expected_head=branch.turn_id)
        assert (caught.value.context_id, caught.value.expected, caught.value.actual) == (
            ctx.context_id,
            branch.turn_id,
            c.turn_id,
        )
        assert (await store.get_head(ctx.context_id)).head_turn_id == c.turn_id
        cleared = await store.set_head(ctx.context_id, 0)
        assert (cleared.head_turn_id, cleared.head_depth) == (0, 0)
        assert await store.list_turns(ctx.context_id) == []
        fresh = await store.append_turn(ctx.context_id, "t", b"fresh start")
        assert (fresh.parent_turn_id, fresh.depth) == (0, 1)
        other = await store.create_context()
        await store.set_head(other.context_id, c.turn_id)  # any existing turn, another context's too
        assert await chain(store, other.context_id) == [a.turn_id, b.turn_id, c.turn_id]
        with pytest.raises(TurnNotFound):
            await store.set_head(ctx.context_id, 999_999)
        with pytest.raises(ContextNotFound):
            await store.set_head(999_999, a.turn_id)
        for bad in (-1, 2**63, "1", None):
            with pytest.raises(InvalidInput):
                await store.set_head(ctx.context_id, bad)  # type: ignore[arg-type]
        assert (await store.get_head(ctx.context_id)).head_turn_id == fresh.turn_id

    async def test_expected_head_on_append(self, store: TurnStoreBase) -> None:
        ctx = await store.create_context()
        first = await store.append_turn(ctx.context_id, "t", b"1", expected_head=0)
        with pytest.raises(HeadConflict, match=f"context {ctx.context_id}"):
            await store.append_turn(ctx.context_id, "t", b"2", expected_head=0)
        second = await store.append_turn(ctx.context_id, "t", b"2", expected_head=first.turn_id, idempotency_key="two")
        # A retry whose first attempt landed: its turn, not a conflict, though the head has moved.
        assert (
            await store.append_turn(ctx.context_id, "t", b"2", expected_head=first.turn_id, idempotency_key="two")
            == second
        )
        with pytest.raises(HeadConflict) as caught:
            await store.append_turn(ctx.context_id, "t", b"3", expected_head=first.turn_id, idempotency_key="three")
        assert (caught.value.expected, caught.value.actual) == (first.turn_id, second.turn_id)
        assert await store.get_turn_by_key(ctx.context_id, "three") is None
        assert await chain(store, ctx.context_id) == [first.turn_id, second.turn_id]
        with pytest.raises(InvalidInput, match="expected_head"):
            await store.append_turn(ctx.context_id, "t", b"x", expected_head=-1)

    async def test_two_writers_with_one_stale_head(self, store: TurnStoreBase) -> None:
        ctx = await store.create_context()
        for round_ in range(50):
            head = (await store.get_head(ctx.context_id)).head_turn_id
            outcomes: list[str] = []

            async def writer(n: int, head: int = head, round_: int = round_, outcomes: list[str] = outcomes) -> None:
                try:
                    await store.append_turn(ctx.context_id, "t", b"%d-%d" % (round_, n), expected_head=head)
                    outcomes.append("won")
                except HeadConflict:
                    outcomes.append("lost")

            async with anyio.create_task_group() as tg:
                tg.start_soon(writer, 1)
                tg.start_soon(writer, 2)
            assert sorted(outcomes) == ["lost", "won"]
        assert (await store.get_head(ctx.context_id)).head_depth == 50

    async def test_append_turns_is_all_or_nothing(self, store: TurnStoreBase) -> None:
        one = await store.create_context()
        two = await store.create_context()
        seed = await store.append_turn(one.context_id, "t", b"seed")
        batch = [
            NewTurn(one.context_id, "user", b"u1", idempotency_key="u1"),
            NewTurn(two.context_id, "user", b"v1"),
            NewTurn(one.context_id, "assistant", b"a1", type_version=2),
            NewTurn(two.context_id, "assistant", b"w1", parent_turn_id=0),
        ]
        records = await store.append_turns(batch, expected_heads={one.context_id: seed.turn_id, two.context_id: 0})
        assert [r.payload for r in records] == [b"u1", b"v1", b"a1", b"w1"]
        assert records[0].parent_turn_id == seed.turn_id and records[2].parent_turn_id == records[0].turn_id
        assert records[2].type_version == 2 and records[3].parent_turn_id == 0
        assert await chain(store, one.context_id) == [seed.turn_id, records[0].turn_id, records[2].turn_id]
        assert await chain(store, two.context_id) == [records[3].turn_id]
        # One bad turn anywhere: nothing of the batch is stored.
        for bad in (
            NewTurn(one.context_id, "t", b"x", parent_turn_id=999_999),
            NewTurn(999_999, "t", b"x"),
            NewTurn(one.context_id, "user", b"different", idempotency_key="u1"),
        ):
            with pytest.raises((TurnNotFound, ContextNotFound, IdempotencyConflict)):
                await store.append_turns([NewTurn(two.context_id, "t", b"ok", idempotency_key="ok"), bad])
        for invalid in (
            NewTurn(one.context_id, "", b"x"),
            NewTurn(one.context_id, "t", "text"),  # type: ignore[arg-type]
            NewTurn(one.context_id, "t", b"x" * (MAX_PAYLOAD + 1)),
            NewTurn(0, "t", b"x"),
            ("not", "a", "NewTurn"),
        ):
            with pytest.raises(InvalidInput, match=r"turns\[1\]"):
                await store.append_turns([NewTurn(two.context_id, "t", b"ok", idempotency_key="ok"), invalid])  # type: ignore[list-item]
        with pytest.raises(HeadConflict):
            await store.append_turns(
                [NewTurn(two.context_id, "t", b"ok", idempotency_key="ok")],
                expected_heads={one.context_id: seed.turn_id},
            )
        assert await store.get_turn_by_key(two.context_id, "ok") is None
        assert await chain(store, one.context_id) == [seed.turn_id, records[0].turn_id, records[2].turn_id]
        assert await chain(store, two.context_id) == [records[3].turn_id]
        # A retried batch that landed gets its turns back, expected heads and all.
        retry = [NewTurn(one.context_id, "user", b"u1", idempotency_key="u1")]
        assert await store.append_turns(retry, expected_heads={one.context_id: seed.turn_id}) == records[:1]
        # Keys repeated within one batch: the second is the first's retry.
        twice = [NewTurn(two.context_id, "t", b"k", idempotency_key="k")] * 2
        got = await store.append_turns(twice)
        assert got[0] == got[1] and await chain(store, two.context_id) == [records[3].turn_id, got[0].turn_id]
        assert await store.append_turns([]) == []
        with pytest.raises(InvalidInput, match="sequence"):
            await store.append_turns(NewTurn(one.context_id, "t", b"x"))  # type: ignore[arg-type]
        with pytest.raises(InvalidInput):
            await store.append_turns([], expected_heads={one.context_id: -1})
        with pytest.raises(InvalidInput, match="maximum"):
            await store.append_turns([NewTurn(one.context_id, "t", b"")] * 4097)

    async def test_get_turn_by_key(self, store: TurnStoreBase) -> None:
        ctx = await store.create_context()
        other = await store.create_context()
        turn = await store.append_turn(ctx.context_id, "t", b"x", idempotency_key="step-1")
        assert await store.get_turn_by_key(ctx.context_id, "step-1") == turn
        assert await store.get_turn_by_key(other.context_id, "step-1") is None  # keys are per context
        assert await store.get_turn_by_key(ctx.context_id, "step-2") is None
        with pytest.raises(ContextNotFound):
            await store.get_turn_by_key(999_999, "step-1")
        for bad in ("", None, 5, "x" * 1025):
            with pytest.raises(InvalidInput, match="key"):
                await store.get_turn_by_key(ctx.context_id, bad)  # type: ignore[arg-type]

    async def test_iter_turns_both_ways_across_pages(self, store: TurnStoreBase) -> None:
        ctx = await store.create_context()
        ids = [(await store.append_turn(ctx.context_id, "t", b"%d" % i)).turn_id for i in range(23)]
        fork = await store.fork_context(ids[9])
        fork_ids = ids[:10] + [(await store.append_turn(fork.context_id, "t", b"f%d" % i)).turn_id for i in range(4)]
        for page_size in (1, 3, 5, 23, 256):
            assert [t.turn_id async for t in store.iter_turns(ctx.context_id, page_size=page_size)] == ids
            newest = [t.turn_id async for t in store.iter_turns(ctx.context_id, newest_first=True, page_size=page_size)]
            assert newest == ids[::-1]
            assert [t.turn_id async for t in store.iter_turns(fork.context_id, page_size=page_size)] == fork_ids
        # The chain is the one at the head when iteration starts.
        iterator = store.iter_turns(ctx.context_id, page_size=4)
        first = await iterator.__anext__()
        await store.append_turn(ctx.context_id, "t", b"later")
        assert [first.turn_id] + [t.turn_id async for t in iterator] == ids
        empty = await store.create_context()
        assert [t async for t in store.iter_turns(empty.context_id)] == []
        with pytest.raises(ContextNotFound):
            async for _ in store.iter_turns(999_999):
                pass
        for bad in (0, -1, 65_537, 1.5):
            with pytest.raises(InvalidInput, match="page_size"):
                store.iter_turns(ctx.context_id, page_size=bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidInput, match="newest_first"):
            store.iter_turns(ctx.context_id, newest_first="yes")  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", BACKENDS)
async def test_a_tampered_payload_is_an_integrity_error(kind: str, tmp_path: Path) -> None:
    """Whatever the backend, a payload that no longer matches its hash is never returned."""
    async with open_backend(kind, tmp_path) as store:
        ctx = await store.create_context()
        good = await store.append_turn(ctx.context_id, "t", b"good payload")
        bad = await store.append_turn(ctx.context_id, "t", b"tamper with me", idempotency_key="k")
        after = await store.append_turn(ctx.context_id, "t", b"after")
    if kind == "memory":
        core = store._core  # type: ignore[attr-defined]
        record, skip, skip_depth = core.turns[bad.turn_id]
        core.turns[bad.turn_id] = (msgspec.structs.replace(record, payload=b"tamper with ME"), skip, skip_depth)
    elif kind == "fs":
        log = tmp_path / "fs" / "turns.log"
        data = bytearray(log.read_bytes())
        data[data.index(b"tamper with me") + 12] ^= 0x20
        log.write_bytes(bytes(data))
    else:
        with sqlite3.connect(tmp_path / ".pforge" / "turns.db") as conn:
            conn.execute("UPDATE turns SET payload = ? WHERE turn_id = ?", (b"tamper with ME", bad.turn_id))
        conn.close()
    async with open_backend(kind, tmp_path) if kind != "memory" else _same(store) as store:
        reads = (
            store.get_turn(bad.turn_id),
            store.list_turns(ctx.context_id),
            store.get_turn_by_key(ctx.context_id, "k"),
            _drain(store.iter_turns(ctx.context_id)),
            _drain(store.iter_turns(ctx.context_id, newest_first=True)),
            store.append_turn(ctx.context_id, "t", b"tamper with me", idempotency_key="k"),
        )
        for read in reads:
            with pytest.raises(IntegrityError, match=f"turn {bad.turn_id}"):
                await read
        assert await store.get_turn(good.turn_id) == good
        assert await store.get_turn(after.turn_id) == after
        assert [t.turn_id for t in await store.list_turns(ctx.context_id, limit=1)] == [after.turn_id]
        problems = await store.check()
        assert any(str(bad.turn_id) in p or (kind == "fs" and "checksum" in p) for p in problems), problems


@asynccontextmanager
async def _same(store: TurnStoreBase) -> AsyncIterator[TurnStoreBase]:
    yield store


async def _drain(iterator: AsyncIterator[object]) -> list[object]:
    return [item async for item in iterator]


async def test_fs_damage_stays_local(tmp_path: Path) -> None:
    """A flipped byte inside one record of the fs log: that record's ids are damaged, nothing else."""
    async with FsTurnStore(tmp_path) as store:
        named = await store.open_context("keep/me", metadata={"a": 1})
        kept = await store.append_turn(named.context_id, "t", b"kept")
        victim = await store.create_context(name="victim")
        await store.append_turns([NewTurn(victim.context_id, "t", b"batch %d" % i) for i in range(3)])
        # Not the last frame: a last frame that fails its checksum is a torn write, truncated.
        await store.set_context_metadata(named.context_id, {"a": 2})
    log = tmp_path / "turns.log"
    data = bytearray(log.read_bytes())
    data[data.index(b"batch 1")] ^= 0x01
    log.write_bytes(bytes(data))
    async with FsTurnStore(tmp_path) as store:
        assert (await store.find_context("keep/me")) == await store.get_context(named.context_id)
        assert await store.list_turns(named.context_id) == [kept]
        with pytest.raises(IntegrityError, match=r"turns\.log"):
            await store.get_context(victim.context_id)  # its head is a turn of the damaged batch
        with pytest.raises(IntegrityError):
            await store.open_context("victim")  # the name stays taken: no second "victim"
        listed = await store.list_contexts()
        assert [c.context_id for c in listed.contexts] == [named.context_id]  # damaged ones left out
        assert any("checksum" in p for p in await store.check())
        # The damaged context can be repaired by moving its head to a sound turn (or 0).
        await store.set_head(victim.context_id, 0)
        assert (await store.get_context(victim.context_id)).head_turn_id == 0
        later = await store.append_turn(named.context_id, "t", b"later")
        assert later.parent_turn_id == kept.turn_id
    assert log.read_bytes().startswith(bytes(data))
    assert log.read_bytes()[: len(MAGIC)] == MAGIC
