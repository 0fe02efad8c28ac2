"""Garbage collection of the SQLite turn store (issue 13): reachability, grace, slices re-checked
against writers, erased and deleted payloads gone from every file."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pforge_async import InvalidInput, NewTurn, TurnNotFound, open_store
from pforge_async.turnstore.gc import CollectTurns, unreachable
from pforge_async.turnstore.sqlite import SqliteTurnStore

pytestmark = pytest.mark.anyio


@pytest.fixture
async def turns(tmp_path: Path) -> AsyncIterator[SqliteTurnStore]:
    async with open_store(tmp_path / ".pforge", watch_workspaces=False) as store:
        yield store.turns


def files_holding(root: Path, needle: bytes) -> list[str]:
    """Every file under ``root`` whose bytes contain ``needle``."""
    found = []
    for directory, _, names in os.walk(root):
        for name in names:
            path = Path(directory) / name
            if needle in path.read_bytes():
                found.append(str(path.relative_to(root)))
    return found


async def test_unreachable_turns_go_and_reachable_ones_stay(turns: SqliteTurnStore) -> None:
    a = await turns.create_context(name="a")
    a_ids = [(await turns.append_turn(a.context_id, "t", b"a%d" % i)).turn_id for i in range(10)]
    b = await turns.fork_context(a_ids[4], name="b")
    b_ids = [(await turns.append_turn(b.context_id, "t", b"b%d" % i)).turn_id for i in range(3)]
    c = await turns.create_context(base_turn_id=a_ids[2])  # a base keeps its turn (and chain) alive
    side = await turns.append_turn(a.context_id, "t", b"side", parent_turn_id=a_ids[6])  # a branch in a
    await turns.set_head(a.context_id, a_ids[-1])
    await turns.delete_context(a.context_id)
    last = await turns.create_context()
    top = await turns.append_turn(last.context_id, "t", b"top")

    report = await turns.gc(grace_s=0, drop_deleted_rows=True)
    gone = [*a_ids[5:], side.turn_id]
    assert report.turns_reclaimed == len(gone) and report.slices >= 2
    assert report.payload_bytes_reclaimed == sum(len(b"a%d" % i) for i in range(5, 10)) + len(b"side")
    for turn_id in gone:
        with pytest.raises(TurnNotFound):
            await turns.get_turn(turn_id)
    assert [t.turn_id for t in await turns.list_turns(b.context_id)] == [*a_ids[:5], *b_ids]
    assert (await turns.get_context(c.context_id)).head_turn_id == a_ids[2]
    assert (await turns.get_turn(top.turn_id)).payload == b"top"
    assert await turns.check() == []
    # Nothing more to do; a's row stays while its first turns (b's history) name it.
    again = await turns.gc(grace_s=0)
    assert (again.turns_reclaimed, again.contexts_reclaimed) == (0, 0)
    # New ids stay above every id ever given.
    assert (await turns.append_turn(b.context_id, "t", b"new")).turn_id > top.turn_id
    assert (await turns.create_context()).context_id > last.context_id


async def test_deleted_contexts_rows_go_when_nothing_names_them(turns: SqliteTurnStore) -> None:
    doomed = [await turns.create_context(name=f"d{i}") for i in range(5)]
    for ctx in doomed:
        await turns.append_turn(ctx.context_id, "t", b"x")
    keep = await turns.create_context(name="keep")
    await turns.append_turn(keep.context_id, "t", b"kept")
    for ctx in doomed:
        await turns.delete_context(ctx.context_id)
    report = await turns.gc(grace_s=0)
    assert report.turns_reclaimed == 5 and report.contexts_reclaimed == 0  # rows stay by default
    report = await turns.gc(grace_s=0, drop_deleted_rows=True)
    assert report.turns_reclaimed == 0 and report.contexts_reclaimed == 5
    assert [c.name for c in (await turns.list_contexts()).contexts] == ["keep"]
    assert await turns.check() == []
    assert (await turns.create_context(name="d0")).context_id > keep.context_id


async def test_the_grace_period_keeps_young_turns(turns: SqliteTurnStore) -> None:
    ctx = await turns.create_context()
    ids = [(await turns.append_turn(ctx.context_id, "t", b"%d" % i)).turn_id for i in range(5)]
    await turns.set_head(ctx.context_id, ids[1])
    await turns.delete_context((await turns.create_context()).context_id)
    report = await turns.gc(grace_s=3600)
    assert (report.turns_reclaimed, report.contexts_reclaimed) == (0, 0)
    assert [t.turn_id for t in await turns.list_turns(ctx.context_id)] == ids[:2]
    assert (await turns.get_turn(ids[3])).payload == b"3"
    with pytest.raises(InvalidInput, match="grace_s"):
        await turns.gc(grace_s=-1)
    with pytest.raises(InvalidInput, match="grace_s"):
        await turns.gc(grace_s="1")  # type: ignore[arg-type]


async def test_a_slice_keeps_what_writers_made_live_after_the_mark(turns: SqliteTurnStore) -> None:
    """Between the mark and a slice, another writer moves a head onto a candidate and appends to
    another: the slice keeps both, and their chains."""
    ctx = await turns.create_context()
    ids = [(await turns.append_turn(ctx.context_id, "t", b"%d" % i)).turn_id for i in range(8)]
    other = await turns.create_context()
    await turns.append_turn(other.context_id, "t", b"other")
    await turns.delete_context(ctx.context_id)
    rows = await turns._actor.fetchall("SELECT turn_id, parent_turn_id, created_at_ms, context_id FROM turns")
    roots = [r[0] for r in await turns._actor.fetchall("SELECT head_turn_id FROM contexts WHERE deleted_at_ms IS NULL")]
    candidates, _ = unreachable([tuple(r) for r in rows], roots, cutoff_ms=2**62)  # no grace: all old
    assert sorted(candidates) == ids

    revived = await turns.create_context()
    await turns.set_head(revived.context_id, ids[3])  # a chain made live again
    forked = await turns.append_turn(other.context_id, "t", b"on a candidate", parent_turn_id=ids[5])
    deleted, _, kept = await turns._actor.call(CollectTurns(candidates, 2**62, max(r[0] for r in rows)))
    assert deleted == ids[6:]  # nothing reaches them
    assert kept == ids[:6]
    assert [t.turn_id for t in await turns.list_turns(revived.context_id)] == ids[:4]
    assert [t.turn_id for t in await turns.list_turns(other.context_id)] == [*ids[:6], forked.turn_id]
    assert await turns.check() == []


async def test_erased_payloads_leave_every_file(tmp_path: Path) -> None:
    root = tmp_path / ".pforge"
    secret = b"ERASE-ME-7f3a9c2e" * 3
    big_secret = b"BIG-SECRET-" + os.urandom(16).hex().encode() * 400  # past a page: overflow pages
    deleted_secret = b"DELETED-CONTEXT-PAYLOAD-51c0"
    async with open_store(root, watch_workspaces=False) as store:
        turns = store.turns
        ctx = await turns.create_context(name="person")
        for i in range(50):
            await turns.append_turn(ctx.context_id, "msg", secret + b"%d" % i)
        await turns.append_turn(ctx.context_id, "msg", big_secret)
        await turns.append_turn(ctx.context_id, "msg", b"kept payload")
        gone = await turns.create_context()
        await turns.append_turn(gone.context_id, "msg", deleted_secret)
        await turns.create_context()  # holds the highest context id, so gone's row can go too
        await turns.append_turn(ctx.context_id, "msg", b"the last turn")

        assert files_holding(root, secret), "the test must find the payload before erasure"
        assert (
            await turns.erase_turns(ctx.context_id, before_turn_id=(await turns.get_head(ctx.context_id)).head_turn_id)
            == 52
        )
        await turns.delete_context(gone.context_id)
        assert files_holding(root, big_secret[:64]), "erasure alone leaves the bytes for gc"
        report = await turns.gc(grace_s=0, drop_deleted_rows=True)
        assert report.wal_truncated and report.turns_reclaimed == 1 and report.contexts_reclaimed == 1
        for needle in (secret, big_secret[:64], big_secret[-64:], deleted_secret):
            assert files_holding(root, needle) == []
        assert (await turns.list_turns(ctx.context_id, limit=1))[0].payload == b"the last turn"
        assert await turns.check() == []
    for needle in (secret, big_secret[:64], deleted_secret):
        assert files_holding(root, needle) == []
    async with open_store(root, watch_workspaces=False) as store:
        assert [t.erased for t in await store.turns.list_turns(ctx.context_id)] == [True] * 52 + [False]


async def test_the_sweep_keeps_a_candidate_a_writer_appends_to_between_slices(
    turns: SqliteTurnStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The driver (``turnstore.gc.collect``) reads the turns appended since the mark as it sweeps:
    a writer that, between two slices, appends to an old turn of a deleted context keeps that turn
    and its ancestors; the rest of the deleted chain goes, in slices, highest first."""
    import types

    import anyio

    from pforge_async.turnstore import gc as turn_gc

    doomed = await turns.create_context()
    ids = [
        t.turn_id for t in await turns.append_turns([NewTurn(doomed.context_id, "t", b"%d" % i) for i in range(600)])
    ]
    other = await turns.create_context()
    await turns.append_turn(other.context_id, "t", b"other")  # holds the highest id
    await turns.delete_context(doomed.context_id)
    written: list[int] = []

    async def sleep_then_append(seconds: float) -> None:
        if not written:  # after the first slice: the top of the deleted chain is gone already
            assert not await turns._actor.fetchall("SELECT 1 FROM turns WHERE turn_id = ?", (ids[-1],))
            record = await turns.append_turn(other.context_id, "t", b"on an old turn", parent_turn_id=ids[99])
            written.append(record.turn_id)
        await anyio.sleep(seconds)

    monkeypatch.setattr(turn_gc, "anyio", types.SimpleNamespace(sleep=sleep_then_append, to_thread=anyio.to_thread))
    report = await turn_gc.collect(turns, grace_s=0)
    monkeypatch.undo()
    assert written and report.turns_reclaimed == 500 and report.slices > 2
    chain = [t.turn_id for t in await turns.list_turns(other.context_id, limit=200)]
    assert chain == [*ids[:100], written[0]]
    assert await turns.check() == []
    assert (await turns.gc(grace_s=0)).turns_reclaimed == 1  # "other", now off the chain
