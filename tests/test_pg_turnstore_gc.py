"""Garbage collection of the PostgreSQL turn store: reachability, grace, slices re-checked against
writers (and skipping the turns a writer holds), erased and deleted payloads gone from the table, and
gc run again and again while 4 processes write."""

from __future__ import annotations

import json
import os
import random
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from pforge_async import InvalidInput, NewTurn, TurnNotFound
from pforge_async.postgres.cas import open_pg_cas
from pforge_async.postgres.turns import PgTurnActor, PgTurnStore
from pforge_async.turnstore.gc import unreachable

from ._procs import run_all, spawn, wait_for_line
from .test_pg_turnstore import open_pg_turns, raw
from .test_pg_turnstore_procs import PRELUDE

pytestmark = pytest.mark.anyio


@pytest.fixture
async def turns(pg_dsn: str, pg_schema: str) -> AsyncIterator[PgTurnStore]:
    async with open_pg_turns(pg_dsn, pg_schema, None, max_payload_bytes=1 << 20) as store:  # type: ignore[arg-type]
        yield store


async def test_unreachable_turns_go_and_reachable_ones_stay(turns: PgTurnStore) -> None:
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
    assert report.turns_reclaimed == len(gone) and report.slices >= 1
    assert report.payload_bytes_reclaimed == sum(len(b"a%d" % i) for i in range(5, 10)) + len(b"side")
    assert report.bytes_before > 0 and report.bytes_after > 0
    for turn_id in gone:
        with pytest.raises(TurnNotFound):
            await turns.get_turn(turn_id)
    assert [t.turn_id for t in await turns.list_turns(b.context_id)] == [*a_ids[:5], *b_ids]
    assert (await turns.get_context(c.context_id)).head_turn_id == a_ids[2]
    assert (await turns.get_turn(top.turn_id)).payload == b"top"
    assert await turns.check() == []
    # Nothing more to do; a's row stays while its first turns (b's history) name it.
    again = await turns.gc(grace_s=0, drop_deleted_rows=True)
    assert (again.turns_reclaimed, again.contexts_reclaimed) == (0, 0)
    assert (await turns.append_turn(b.context_id, "t", b"new")).turn_id > top.turn_id
    assert (await turns.create_context()).context_id > last.context_id


async def test_deleted_contexts_rows_go_when_nothing_names_them(turns: PgTurnStore) -> None:
    doomed = [await turns.create_context(name=f"d{i}") for i in range(5)]
    for ctx in doomed:
        await turns.append_turn(ctx.context_id, "t", b"x")
    child = await turns.create_context(parent_context_id=doomed[0].context_id)
    keep = await turns.create_context(name="keep")
    await turns.append_turn(keep.context_id, "t", b"kept")
    for ctx in doomed:
        await turns.delete_context(ctx.context_id)
    report = await turns.gc(grace_s=0)
    assert report.turns_reclaimed == 5 and report.contexts_reclaimed == 0  # rows stay by default
    report = await turns.gc(grace_s=0, drop_deleted_rows=True)
    assert report.turns_reclaimed == 0 and report.contexts_reclaimed == 4  # d0 is named as a parent
    assert sorted(c.context_id for c in (await turns.list_contexts()).contexts) == [child.context_id, keep.context_id]
    assert await turns.check() == []
    assert (await turns.create_context(name="d0")).context_id > keep.context_id


async def test_the_grace_period_keeps_young_turns(turns: PgTurnStore) -> None:
    ctx = await turns.create_context()
    ids = [(await turns.append_turn(ctx.context_id, "t", b"%d" % i)).turn_id for i in range(5)]
    await turns.set_head(ctx.context_id, ids[1])
    await turns.append_turn((await turns.create_context()).context_id, "t", b"the highest id, always kept")
    report = await turns.gc(grace_s=3600)
    assert report.turns_reclaimed == 0
    assert (await turns.get_turn(ids[3])).payload == b"3"
    for bad in (-1, "1", True, float("nan")):
        with pytest.raises(InvalidInput, match="grace_s"):
            await turns.gc(grace_s=bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="drop_deleted_rows"):
        await turns.gc(drop_deleted_rows=1)  # type: ignore[arg-type]
    report = await turns.gc(grace_s=0)
    assert report.turns_reclaimed == 3


async def test_a_slice_keeps_what_writers_made_live_after_the_mark(turns: PgTurnStore) -> None:
    """Between the mark and a slice, a writer moves a head onto a candidate and appends to another
    (with an id the mark never saw): the slice keeps both, and their chains."""
    ctx = await turns.create_context()
    ids = [(await turns.append_turn(ctx.context_id, "t", b"%d" % i)).turn_id for i in range(8)]
    other = await turns.create_context()
    await turns.append_turn(other.context_id, "t", b"other")
    await turns.delete_context(ctx.context_id)
    rows = await turns.actor.fetch("SELECT turn_id, parent_turn_id, created_at_ms, context_id FROM turns")
    roots = [r[0] for r in await turns.actor.fetch("SELECT head_turn_id FROM contexts WHERE deleted_at_ms IS NULL")]
    candidates, _ = unreachable([(r[0], r[1], r[2], r[3]) for r in rows], roots, 2**62)  # no grace: all old
    assert sorted(candidates) == ids

    revived = await turns.create_context()
    await turns.set_head(revived.context_id, ids[3])  # a chain made live again
    forked = await turns.append_turn(other.context_id, "t", b"on a candidate", parent_turn_id=ids[5])
    deleted, _, kept = await turns._collect_turns(candidates, 2**62)
    assert deleted == ids[6:]  # nothing reaches them
    assert kept == ids[:6]
    assert [t.turn_id for t in await turns.list_turns(revived.context_id)] == ids[:4]
    assert [t.turn_id for t in await turns.list_turns(other.context_id)] == [*ids[:6], forked.turn_id]
    assert await turns.check() == []


async def test_a_slice_skips_the_turns_a_writer_holds(pg_dsn: str, pg_schema: str, turns: PgTurnStore) -> None:
    """A writer's batch holds FOR KEY SHARE on the turns it builds on until it commits: gc neither
    waits for it nor deletes them (or what they stand on); the next gc takes them if still garbage."""
    ctx = await turns.create_context()
    ids = [(await turns.append_turn(ctx.context_id, "t", b"%d" % i)).turn_id for i in range(6)]
    await turns.delete_context(ctx.context_id)
    await turns.append_turn((await turns.create_context()).context_id, "t", b"the highest id, always kept")
    async with raw(pg_dsn, pg_schema) as conn:
        async with conn.transaction():
            await conn.execute("SELECT 1 FROM turns WHERE turn_id = $1 FOR KEY SHARE", ids[3])
            with anyio.fail_after(30):  # never waits on the writer
                report = await turns.gc(grace_s=0)
            assert report.turns_reclaimed == 2
            assert [(await turns.get_turn(i)).turn_id for i in ids[:4]] == ids[:4]
        for turn_id in ids[4:]:
            with pytest.raises(TurnNotFound):
                await turns.get_turn(turn_id)
    assert (await turns.gc(grace_s=0)).turns_reclaimed == 4  # released: garbage like the rest
    assert await turns.check() == []


async def test_erased_and_deleted_payloads_leave_the_table(pg_dsn: str, pg_schema: str, turns: PgTurnStore) -> None:
    secret = b"ERASE-ME-7f3a9c2e" * 3
    big_secret = b"BIG-SECRET-" + os.urandom(16).hex().encode() * 400  # past TOAST's threshold
    deleted_secret = b"DELETED-CONTEXT-PAYLOAD-51c0"
    ctx = await turns.create_context(name="person")
    for payload in (secret, big_secret, b"kept"):
        await turns.append_turn(ctx.context_id, "t", payload)
    await turns.erase_turns(ctx.context_id, before_turn_id=(await turns.get_head(ctx.context_id)).head_turn_id)
    gone = await turns.create_context()
    await turns.append_turn(gone.context_id, "t", deleted_secret)
    await turns.delete_context(gone.context_id)
    await turns.append_turn((await turns.create_context()).context_id, "t", b"newest")  # the highest id stays
    report = await turns.gc(grace_s=0)
    assert report.turns_reclaimed == 1 and report.wal_truncated  # the vacuum ran
    async with raw(pg_dsn, pg_schema) as conn:
        for needle in (secret, big_secret, deleted_secret):
            assert (
                await conn.fetchval("SELECT count(*) FROM turns WHERE position($1::bytea in payload) > 0", needle) == 0
            )
    assert [t.payload for t in await turns.list_turns(ctx.context_id)] == [b"", b"", b"kept"]
    assert await turns.check() == []


SECONDS = float(os.environ.get("PFORGE_PG_GC_SECONDS", "15"))

#: A writer keeps, for each context it made and has not deleted, the chain it expects (turn id and
#: payload), checks some as it goes, and writes them all to a file at the end.
WRITER = r"""
import time
seed, seconds, out = int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
async def main():
    rng = random.Random(seed)
    async with pg_turns(dsn, schema) as t:
        live = {}
        print("ready", flush=True)
        deadline = time.monotonic() + seconds
        n = 0
        while time.monotonic() < deadline:
            n += 1
            op = rng.random()
            if len(live) < 2 or op < 0.08:
                ctx = await t.create_context(name=f"w{seed}-{n}")
                live[ctx.context_id] = []
                continue
            cid = rng.choice(sorted(live))
            chain = live[cid]
            if op < 0.5:
                payload = b"%d-%d-" % (seed, n) + bytes(rng.randrange(200))
                record = await t.append_turn(cid, "t", payload, expected_head=chain[-1][0] if chain else 0)
                chain.append((record.turn_id, payload))
            elif op < 0.6 and chain:
                k = rng.randrange(len(chain))
                fork = await t.fork_context(chain[k][0], name=f"w{seed}-{n}")
                live[fork.context_id] = chain[: k + 1]
            elif op < 0.68 and chain:
                k = rng.randrange(len(chain))  # append on an old turn, then move the head there
                payload = b"branch-%d-%d" % (seed, n)
                record = await t.append_turn(cid, "t", payload, parent_turn_id=chain[k][0])
                live[cid] = chain[: k + 1] + [(record.turn_id, payload)]
            elif op < 0.76 and chain:
                k = rng.randrange(len(chain))
                await t.set_head(cid, chain[k][0])  # what was above it is garbage now, unless shared
                live[cid] = chain[: k + 1]
            elif op < 0.84:
                await t.delete_context(cid)
                del live[cid]
            else:
                got = [(r.turn_id, r.payload) async for r in t.iter_turns(cid, page_size=7)]
                assert got == chain, (cid, got[-3:], chain[-3:])
        for cid, chain in live.items():
            got = [(r.turn_id, r.payload) async for r in t.iter_turns(cid)]
            assert got == chain, cid
        with open(out, "w") as f:  # not stdout: a pipe nobody reads yet would block the exit
            json.dump({str(cid): [[i, p.hex()] for i, p in chain] for cid, chain in live.items()}, f)
anyio.run(main)
"""


async def test_gc_beside_four_writing_processes(pg_dsn: str, pg_schema: str, tmp_path: Path) -> None:
    async with open_pg_turns(pg_dsn, pg_schema, None) as store:  # type: ignore[arg-type]
        outs = [tmp_path / f"writer-{seed}.json" for seed in range(4)]
        writers = [spawn(PRELUDE + WRITER, pg_dsn, pg_schema, seed, SECONDS, out) for seed, out in enumerate(outs)]
        for writer in writers:
            wait_for_line(writer, "ready", timeout=120)
        runs = reclaimed = 0
        while any(writer.poll() is None for writer in writers):
            report = await store.gc(grace_s=0)
            runs += 1
            reclaimed += report.turns_reclaimed
            await anyio.sleep(0.05)
        await anyio.to_thread.run_sync(run_all, writers)
        expected = {int(k): v for out in outs for k, v in json.loads(out.read_text()).items()}
        print(f"{runs} gc runs reclaimed {reclaimed} turns; {len(expected)} live contexts")
        assert runs >= 3 and reclaimed > 0
        await store.gc(grace_s=0)
        for context_id, chain in expected.items():
            got = [[r.turn_id, r.payload.hex()] async for r in store.iter_turns(context_id)]
            assert got == chain, context_id
        assert await store.check() == []


async def test_gc_refuses_a_readonly_store(pg_dsn: str, pg_schema: str) -> None:
    async with open_pg_turns(pg_dsn, pg_schema, None):  # type: ignore[arg-type]
        pass
    actor = PgTurnActor(pg_dsn, schema=pg_schema, readonly=True)
    async with anyio.create_task_group() as tg:
        await tg.start(actor.run)
        try:
            store = PgTurnStore(actor, None)
            with pytest.raises(InvalidInput, match="read-only"):
                await store.gc(grace_s=0)
            with pytest.raises(InvalidInput, match="read-only"):
                await store.create_context()
            assert await store.check() == []
        finally:
            await actor.aclose()


RUNS = 12
GARBAGE = 12 * 400

#: The child makes garbage (contexts whose chains it then deletes), says "ready", and collects until
#: it is killed; it says "slice" after each slice of a sweep committed, so a kill can aim inside one.
GC_CHILD = r"""
seed = int(sys.argv[3])
collect = PgTurnStore._collect_turns
async def said(self, *args):
    result = await collect(self, *args)
    print("slice", flush=True)
    return result
PgTurnStore._collect_turns = said
async def main():
    async with pg_turns(dsn, schema) as turns:
        doomed = []
        for c in range(12):
            ctx = await turns.create_context(name=f"garbage-{seed}-{c}")
            for _ in range(4):
                await turns.append_turns([NewTurn(ctx.context_id, "t", b"g%d" % i) for i in range(100)])
            doomed.append(ctx.context_id)
        for context_id in doomed:
            await turns.delete_context(context_id)
        print("ready", flush=True)
        while True:
            await turns.gc(grace_s=0)
anyio.run(main)
"""


async def reachable(turns: PgTurnStore, names: list[str]) -> dict[str, list[tuple[int, bytes]]]:
    out = {}
    for name in names:
        info = await turns.find_context(name)
        assert info is not None, name
        out[name] = [(t.turn_id, t.payload) async for t in turns.iter_turns(info.context_id)]
    return out


async def test_gc_killed_at_random_points(pg_dsn: str, pg_schema: str) -> None:
    """SIGKILL of a process running gc, at random points: every run is followed by check(), a
    comparison of everything reachable with what was written, and another gc."""
    names = [f"kept-{i}" for i in range(6)]
    async with open_pg_turns(pg_dsn, pg_schema, None) as turns:  # type: ignore[arg-type]
        base = await turns.create_context(name="base-gone")
        batch = await turns.append_turns([NewTurn(base.context_id, "t", b"b%d" % i) for i in range(50)])
        ids = [t.turn_id for t in batch]
        for i, name in enumerate(names):
            ctx = await turns.fork_context(ids[i * 8], name=name)
            await turns.append_turns([NewTurn(ctx.context_id, "t", b"%s-%d" % (name.encode(), j)) for j in range(20)])
        await turns.delete_context(base.context_id)
        expected = await reachable(turns, names)

    async def count() -> int:
        async with raw(pg_dsn, pg_schema) as conn:
            return int(await conn.fetchval("SELECT count(*) FROM turns"))

    rng = random.Random(13)
    before = await count()
    mid_sweep = 0
    for run in range(RUNS):
        child = spawn(PRELUDE + GC_CHILD, pg_dsn, pg_schema, run)
        wait_for_line(child, "ready", timeout=120)
        if run % 2:  # anywhere: in the mark, a slice, the vacuum, or a later gc
            await anyio.sleep(rng.uniform(0, 0.15))
        else:  # after a few slices of the first sweep committed, with more to come
            for _ in range(rng.randint(1, 4)):
                wait_for_line(child, "slice", timeout=120)
        child.send_signal(signal.SIGKILL)
        child.communicate(timeout=30)
        left = await count()
        mid_sweep += before < left < before + GARBAGE
        async with open_pg_turns(pg_dsn, pg_schema, None) as turns:  # type: ignore[arg-type]
            assert await turns.check() == [], f"run {run}"
            assert await reachable(turns, names) == expected, f"run {run}"
            await turns.gc(grace_s=0)  # the next run's garbage is counted from here
        before = await count()
    print(f"{mid_sweep} of {RUNS} kills landed inside a sweep")
    assert mid_sweep >= RUNS // 2, f"only {mid_sweep} of {RUNS} kills landed inside a sweep"
    async with open_pg_turns(pg_dsn, pg_schema, None) as turns:  # type: ignore[arg-type]
        await turns.gc(grace_s=0)
        assert await turns.check() == []
        assert await reachable(turns, names) == expected
    # What is left: the kept chains and the chain of the highest turn id (never reclaimed).
    assert await count() <= len(ids) + 20 * len(names) + 400


async def test_dry_run_candidates_and_cas_roots(pg_dsn: str, pg_schema: str) -> None:
    """What a PostgreSQL store's gc needs of its turn store: a dry run that counts and changes
    nothing, the candidates it would take, and the CAS objects the turns that stay name."""
    async with open_pg_cas(pg_dsn, schema=pg_schema) as cas:
        async with open_pg_turns(pg_dsn, pg_schema, cas) as turns:  # type: ignore[arg-type]
            blob = await cas.write_blob(b"kept blob")
            gone_blob = await cas.write_blob(b"blob of a doomed turn")
            tree = await cas.write_tree([("f", "100644", blob)])
            keep = await turns.create_context(name="keep")
            kept = await turns.append_turn(keep.context_id, "t", b"k", fs_root=tree, refs=[blob])
            doomed = await turns.create_context(name="doomed")
            lost = [
                (await turns.append_turn(doomed.context_id, "t", b"d%d" % i, refs=[gone_blob])).turn_id
                for i in range(3)
            ]
            await turns.delete_context(doomed.context_id)
            await turns.append_turn(keep.context_id, "t", b"the highest id")
            report = await turns.gc(grace_s=0, dry_run=True)
            assert (report.turns_reclaimed, report.payload_bytes_reclaimed, report.slices) == (3, 6, 0)
            assert sorted(await turns.gc_candidates(grace_s=0)) == lost
            assert await turns.gc_candidates(grace_s=3600) == []
            assert await turns.cas_roots() == {tree, blob, gone_blob}
            assert await turns.cas_roots(leave_out=lost) == {tree, blob}
            assert (await turns.get_turn(lost[0])).payload == b"d0"  # the dry run changed nothing
            assert (await turns.gc(grace_s=0)).turns_reclaimed == 3
            assert await turns.cas_roots() == {tree, blob}
            assert (await turns.get_turn(kept.turn_id)).fs_root == tree
            with pytest.raises(InvalidInput, match="dry_run"):
                await turns.gc(dry_run="yes")  # type: ignore[arg-type]
