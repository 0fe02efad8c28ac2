"""Adversarial review of Store.gc (issue 13): a writer that names an object in the window between
the roots being gathered and the CAS deciding. Store.gc's own docstring promises that such a turn's
objects were "freshened (written, or checked with has, by its writer)" so the CAS keeps them whatever
the grace. These tests put a writer exactly in that window (the CAS gc is wrapped so the other
writer's call lands just before it, after turn_roots ran), with the objects it names old and unnamed
by any other turn, the grace the default hour."""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from pforge_async import open_store
from pforge_async.cas import odb as odb_module
from pforge_async.errors import ObjectNotFound
from pforge_async.store import Store

pytestmark = pytest.mark.anyio

HOUR = 3600.0


def age_cas(root: Path, seconds: float) -> None:
    """Every CAS object file made ``seconds`` old (as waiting that long would)."""
    then = time.time() - seconds
    for directory, _dirs, files in os.walk(root / "cas" / "objects"):
        for name in files:
            os.utime(Path(directory) / name, (then, then))


def in_window(store: Store, writer: Callable[[], Awaitable[None]]) -> None:
    """Run ``writer`` after Store.gc gathered its roots and before the CAS gc starts."""
    real = store.cas.gc

    async def gc(*args: Any, **kwargs: Any) -> Any:
        await writer()
        return await real(*args, **kwargs)

    store.cas.gc = gc  # type: ignore[method-assign]


async def old_tree(store: Store, workspace: Path) -> str:
    (workspace / "sub").mkdir(parents=True)
    (workspace / "a.txt").write_text("kept workspace file\n" * 10)
    (workspace / "sub" / "b.txt").write_text("kept nested file\n" * 10)
    return await store.cas.snapshot(workspace)


async def test_fs_root_of_an_old_tree_appended_during_gc_is_kept(tmp_path: Path) -> None:
    """Found by this review (fixed in 38de2b2): _check_tree only read the tree, which does not freshen."""
    root = tmp_path / "s"
    async with open_store(root, watch_workspaces=False) as store:
        tree = await old_tree(store, tmp_path / "ws")  # e.g. a workspace an agent goes back to
        ctx = await store.turns.create_context(name="c")
        await store.turns.append_turn(ctx.context_id, "t", b"first")
        age_cas(root, 2 * HOUR)
        appended: list[int] = []

        async def writer() -> None:
            turn = await store.turns.append_turn(ctx.context_id, "t", b"restored", fs_root=tree)
            appended.append(turn.turn_id)

        in_window(store, writer)
        await store.gc(grace_s=HOUR)
        assert appended
    # A fresh open (this process's own view still serves the reclaimed pack from its old map).
    async with open_store(root, watch_workspaces=False) as store:
        turn = await store.turns.get_turn(appended[0])
        assert turn.fs_root == tree
        # The live turn's workspace must still restore.
        await store.cas.restore(tree, tmp_path / "restored")
        assert (tmp_path / "restored" / "sub" / "b.txt").read_text() == "kept nested file\n" * 10


async def test_attach_fs_of_an_old_tree_during_gc_is_kept(tmp_path: Path) -> None:
    root = tmp_path / "s"
    async with open_store(root, watch_workspaces=False) as store:
        tree = await old_tree(store, tmp_path / "ws")
        ctx = await store.turns.create_context(name="c")
        turn = await store.turns.append_turn(ctx.context_id, "t", b"first")
        age_cas(root, 2 * HOUR)

        async def writer() -> None:
            await store.turns.attach_fs(turn.turn_id, tree)

        in_window(store, writer)
        await store.gc(grace_s=HOUR)
    async with open_store(root, watch_workspaces=False) as store:
        assert (await store.turns.get_turn(turn.turn_id)).fs_root == tree
        await store.cas.restore(tree, tmp_path / "restored")


async def test_refs_of_old_blobs_appended_during_gc_are_kept(tmp_path: Path) -> None:
    """The defended twin of the fs_root case: refs are checked with has_many, which freshens."""
    root = tmp_path / "s"
    async with open_store(root, watch_workspaces=False) as store:
        one = await store.cas.write_blob(b"an attachment written long ago")
        two = await store.cas.write_blob(b"another one")
        ctx = await store.turns.create_context(name="c")
        await store.turns.append_turn(ctx.context_id, "t", b"first")
        age_cas(root, 2 * HOUR)
        appended: list[int] = []

        async def writer() -> None:
            turn = await store.turns.append_turn(ctx.context_id, "t", b"names them", refs=[one, two])
            appended.append(turn.turn_id)
            single = await store.turns.append_turn(ctx.context_id, "t", b"names one", refs=[one])
            appended.append(single.turn_id)

        in_window(store, writer)
        await store.gc(grace_s=HOUR)
        assert len(appended) == 2
    async with open_store(root, watch_workspaces=False) as store:
        assert await store.cas.read_blob(one) == b"an attachment written long ago"
        assert await store.cas.read_blob(two) == b"another one"
        assert (await store.check()).problems == []


async def test_a_tree_written_again_during_gc_is_kept_with_its_children(tmp_path: Path) -> None:
    """write_tree of an existing old tree (its blobs old too) in the window: the actor freshens each
    entry it links, so the tree and every blob survive."""
    root = tmp_path / "s"
    async with open_store(root, watch_workspaces=False) as store:
        blobs = [await store.cas.write_blob(b"leaf %d" % i) for i in range(5)]
        entries = [(f"d/{i}", "100644", oid) for i, oid in enumerate(blobs)]
        tree = await store.cas.write_tree(entries)
        age_cas(root, 2 * HOUR)
        got: list[str] = []

        async def writer() -> None:
            got.append(await store.cas.write_tree(entries))
            ctx = await store.turns.create_context(name="c")
            await store.turns.append_turn(ctx.context_id, "t", b"x", refs=[tree])

        in_window(store, writer)
        await store.gc(grace_s=HOUR)
        assert got == [tree]
    async with open_store(root, watch_workspaces=False) as store:
        for i, oid in enumerate(blobs):
            assert await store.cas.read_blob(oid) == b"leaf %d" % i
        assert (await store.check()).problems == []


async def test_a_reclaimed_tree_is_refused_as_fs_root_right_after_gc(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The collecting process still maps the deleted pack (see the next test); the fs_root check's
    has() looks again and refuses the tree."""
    monkeypatch.setattr(odb_module, "_STALE_CHECK_S", 600.0)
    root = tmp_path / "s"
    async with open_store(root, watch_workspaces=False) as store:
        tree = await old_tree(store, tmp_path / "ws")
        ctx = await store.turns.create_context(name="c")
        turn = await store.turns.append_turn(ctx.context_id, "t", b"first")
        age_cas(root, 2 * HOUR)
        report = await store.gc(grace_s=HOUR)
        assert report.objects_reclaimed == 4  # the tree, its subtree, two blobs: in no file now
        with pytest.raises(ObjectNotFound):
            await store.turns.append_turn(ctx.context_id, "t", b"names a reclaimed tree", fs_root=tree)
        with pytest.raises(ObjectNotFound):
            await store.turns.attach_fs(turn.turn_id, tree)


async def test_the_collecting_process_reads_no_reclaimed_object(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by this review: Cas.gc's sync_retired did not refresh once the journal was gone, so the
    collecting process served reclaimed objects from the deleted packs' maps until its next look."""
    # The stale view lasts until the next look at the pack directory (every 2 s): widened here so the
    # outcome does not hang on how long this machine takes to run gc.
    monkeypatch.setattr(odb_module, "_STALE_CHECK_S", 600.0)
    root = tmp_path / "s"
    async with open_store(root, watch_workspaces=False) as store:
        tree = await old_tree(store, tmp_path / "ws")
        blob = await store.cas.write_blob(b"unreachable")
        age_cas(root, 2 * HOUR)
        report = await store.cas.gc([], grace_s=HOUR)
        assert report.objects_reclaimed == 5
        # (A has() here would hide it: it looks at the pack directory again.)
        with pytest.raises(ObjectNotFound):
            await store.cas.read_blob(blob)
        with pytest.raises(ObjectNotFound):
            await store.cas.read_tree(tree)


async def test_check_names_a_live_turn_whose_fs_root_is_gone(tmp_path: Path) -> None:
    """Found by this review (closed in e2d4644): check() never looked whether live turns' objects exist."""
    root = tmp_path / "s"
    async with open_store(root, watch_workspaces=False) as store:
        tree = await old_tree(store, tmp_path / "ws")
        blob = await store.cas.write_blob(b"a ref")
        ctx = await store.turns.create_context(name="c")
        await store.turns.append_turn(ctx.context_id, "t", b"x", fs_root=tree, refs=[blob])
        age_cas(root, 2 * HOUR)
        # The CAS alone, told of no root (what a caller that forgot the turns would do).
        await store.cas.gc([], grace_s=HOUR)
    async with open_store(root, watch_workspaces=False) as store:
        with pytest.raises(ObjectNotFound):
            await store.cas.read_tree(tree)
        problems = (await store.check()).problems
        assert any(tree in p for p in problems), problems
        assert any(blob in p for p in problems), problems
