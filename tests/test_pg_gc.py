"""``PgStore.gc`` (issues 13 and 16): the whole PostgreSQL store collected in one call, as ``Store.gc``
collects the embedded one. Deleted contexts' turns and the snapshot objects and blobs only they named
go; everything live (shared files, refs, pipeline checkpoints' blobs, CAS refs) stays and reads back;
expired nonces and reservations go; a dry run counts the same and changes nothing; gc loops beside
writers that append, snapshot and delete with zero errors; a read-only store and bad arguments are
refused before anything is done."""

from __future__ import annotations

import hashlib
import json
import random
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest

from pforge_async import InvalidInput, TurnNotFound
from pforge_async.attractor import AttractorWriter, load_latest_checkpoint
from pforge_async.attractor.records import CheckpointRecord
from pforge_async.ledgers import Usage
from pforge_async.lifecycle import GcReport
from pforge_async.postgres.store import PgStore, connect_pg

from ._procs import run_all, spawn, wait_for_line

pytestmark = pytest.mark.anyio

DAY_MS = 86_400_000


@pytest.fixture
async def store(pg_dsn: str, pg_schema: str) -> AsyncIterator[PgStore]:
    # freshen_s=0: every has() stamps the object, so gc may run with a grace of a fraction of a second.
    async with await connect_pg(pg_dsn, schema=pg_schema, durability="normal", freshen_s=0) as opened:
        yield opened


def blob_id(data: bytes) -> str:
    """The SHA-256 git id of a blob (what the CAS names ``data`` without being asked to store it)."""
    return hashlib.sha256(b"blob %d\0" % len(data) + data).hexdigest()


async def rows(dsn: str, schema: str, sql: str, *args: Any) -> list[Any]:
    conn = await asyncpg.connect(dsn, server_settings={"search_path": f'"{schema}"'})
    try:
        return [tuple(r) for r in await conn.fetch(sql, *args)]
    finally:
        await conn.close()


async def table_counts(dsn: str, schema: str) -> dict[str, int]:
    tables = ("turns", "contexts", "cas_objects", "cas_refs", "nonces", "reservations")
    return {t: (await rows(dsn, schema, f"SELECT count(*) FROM {t}"))[0][0] for t in tables}


def fill(workspace: Path, c: int) -> bytes:
    """A workspace: a file every context shares, one of its own, a subdirectory of its own."""
    (workspace / "sub").mkdir(parents=True, exist_ok=True)
    (workspace / "README.md").write_text("the same in every workspace\n" * 20)
    own = c.to_bytes(4, "big") * 256
    (workspace / "state.bin").write_bytes(own)
    (workspace / "sub" / "notes.txt").write_text(f"notes of context {c}\n" * 10)
    return own


async def add_context(store: PgStore, workspace: Path, c: int) -> dict[str, Any]:
    """A context with 3 turns: the last names a snapshot (``fs_root``) and a blob of its own (``refs``)."""
    own = fill(workspace, c)
    tree = await store.cas.snapshot(workspace)
    blob = await store.cas.write_blob(b"blob of context %d" % c)
    ctx = await store.turns.create_context(name=f"ctx-{c}")
    payloads = [b"context %d turn %d " % (c, i) + bytes(100) for i in range(3)]
    turn_ids = []
    for i, payload in enumerate(payloads):
        last = i == len(payloads) - 1
        turn = await store.turns.append_turn(
            ctx.context_id, "t", payload, fs_root=tree if last else None, refs=[blob] if last else ()
        )
        turn_ids.append(turn.turn_id)
    return {"id": ctx.context_id, "tree": tree, "blob": blob, "own": own, "payloads": payloads, "turns": turn_ids}


async def assert_intact(store: PgStore, kept: list[dict[str, Any]], where: Path) -> None:
    for i, made in enumerate(kept):
        chain = await store.turns.list_turns(made["id"], limit=10)
        assert [t.payload for t in chain] == made["payloads"]
        assert chain[-1].fs_root == made["tree"]
        assert await store.cas.read_blob(made["blob"]) == b"blob of context %d" % (made["c"])
        out = where / f"restored-{i}-{time.monotonic_ns()}"
        await store.cas.restore(made["tree"], out)
        assert (out / "state.bin").read_bytes() == made["own"]
        assert (out / "README.md").read_text() == "the same in every workspace\n" * 20
        assert (out / "sub" / "notes.txt").read_text() == f"notes of context {made['c']}\n" * 10


async def test_gc_reclaims_deleted_contexts_and_expired_ledger_rows_and_keeps_the_rest(
    store: PgStore, pg_dsn: str, pg_schema: str, tmp_path: Path
) -> None:
    made = []
    for c in range(12):
        entry = await add_context(store, tmp_path / "ws", c)
        entry["c"] = c
        made.append(entry)
    kept, doomed = made[:4], made[4:]
    for entry in doomed:
        await store.turns.delete_context(entry["id"])
    # A blob named by nothing but a CAS ref, and one named only inside a pipeline checkpoint's payload.
    ref_blob = await store.cas.write_blob(b"kept by a ref")
    await store.cas.update_ref("refs/heads/keep", ref_blob)
    orphan = await store.cas.write_blob(b"named by nothing")
    big_state = {"blob": bytes(range(256)) * 256}
    writer = AttractorWriter(store, inline_state_max=1024)
    await writer.create_run_context("run-1")
    await writer.append_checkpoint_event(CheckpointRecord("run-1", "cp-1", 1, "n1", ["n1"], {}, big_state, "n2"))
    # Nonces and reservations: expired ones (a reservation only counts once expired over a day:
    # moved back in time on the server), live ones.
    live_nonce = await store.nonces.issue("s", 3600)
    expired_nonces = [await store.nonces.issue("s", 3600) for _ in range(3)]
    await store.budget.set_budget("v", tokens=1000)
    old = await store.budget.reserve("v", tokens=5, ttl_s=60)
    fresh_expired = await store.budget.reserve("v", tokens=5, ttl_s=60)
    held = await store.budget.reserve("v", tokens=5, ttl_s=3600)
    await rows(pg_dsn, pg_schema, "UPDATE nonces SET expires_at_ms = 1 WHERE nonce = ANY($1::text[])", expired_nonces)
    now_ms = int(time.time() * 1000)
    await rows(
        pg_dsn,
        pg_schema,
        "UPDATE reservations SET expires_at_ms = $1 WHERE reservation_id = $2",
        now_ms - 2 * DAY_MS,
        old.reservation_id,
    )
    await rows(
        pg_dsn,
        pg_schema,
        "UPDATE reservations SET expires_at_ms = $1 WHERE reservation_id = $2",
        now_ms - 1000,
        fresh_expired.reservation_id,
    )
    own_ids = [blob_id(entry["own"]) for entry in made]
    for oid in own_ids:  # the snapshot really stored each context's own file under this id
        assert await store.cas.has(oid)
    await anyio.sleep(0.05)

    counts = await table_counts(pg_dsn, pg_schema)
    dry = await store.gc(grace_s=0, dry_run=True)
    assert await table_counts(pg_dsn, pg_schema) == counts
    assert dry.dry_run and dry.turns_reclaimed == 3 * len(doomed)
    # per doomed context: its tree, its subdirectory's tree, its own file, its notes, its blob
    assert dry.objects_reclaimed == 5 * len(doomed) + 1
    assert dry.nonces_purged == 3 and dry.reservations_purged == 1
    assert dry.bytes_freed > 0 and dry.bytes_after == dry.bytes_before - dry.bytes_freed

    report = await store.gc(grace_s=0)
    assert isinstance(report, GcReport) and not report.dry_run
    assert report.turns_reclaimed == dry.turns_reclaimed
    assert (report.nonces_purged, report.reservations_purged) == (3, 1)
    assert report.roots == dry.roots == 2 * len(kept) + 1  # trees and blobs of the kept, the checkpoint's
    assert report.turns.slices >= 1 and report.cas.objects_reclaimed == report.objects_reclaimed
    assert report.bytes_before > 0 and report.bytes_after > 0 and report.seconds > 0
    # The CAS's sweep keeps what trees touched in its last minutes reach (a tree committed just after
    # the mark would be one): a doomed snapshot written minutes ago goes a level per gc. What the dry
    # run counted is what goes in all.
    assert report.objects_reclaimed + report.cas.objects_rescued == dry.objects_reclaimed
    objects = report.objects_reclaimed
    for _ in range(5):
        more = await store.gc(grace_s=0)
        assert (more.turns_reclaimed, more.nonces_purged, more.reservations_purged) == (0, 0, 0)
        objects += more.objects_reclaimed
        if not more.objects_reclaimed:
            break
    assert objects == dry.objects_reclaimed
    after = await table_counts(pg_dsn, pg_schema)
    assert after["turns"] == counts["turns"] - 3 * len(doomed)
    assert after["cas_objects"] == counts["cas_objects"] - dry.objects_reclaimed
    assert after["nonces"] == counts["nonces"] - 3 and after["reservations"] == counts["reservations"] - 1

    for entry in doomed:
        for turn_id in entry["turns"]:
            with pytest.raises(TurnNotFound):
                await store.turns.get_turn(turn_id)
        assert not await store.cas.has(entry["tree"]) and not await store.cas.has(entry["blob"])
        assert not await store.cas.has(blob_id(entry["own"]))
    assert not await store.cas.has(orphan)
    await assert_intact(store, kept, tmp_path)
    assert await store.cas.read_blob(ref_blob) == b"kept by a ref"
    latest = await load_latest_checkpoint(store, "run-1")
    assert latest is not None and latest.context == big_state
    await store.nonces.consume(live_nonce, "s")
    await store.budget.commit(held, Usage(5, 0, 0))
    await store.budget.commit(fresh_expired, Usage(5, 0, 0))  # expired a second ago: still known
    check = await store.check()
    assert check.ok, check.problems

    await assert_intact(store, kept, tmp_path)


async def test_gc_within_the_grace_reclaims_nothing(store: PgStore, tmp_path: Path) -> None:
    entry = await add_context(store, tmp_path / "ws", 1)
    await store.turns.delete_context(entry["id"])
    await add_context(store, tmp_path / "ws", 2)  # the highest turn is always kept: make it a live one
    report = await store.gc(grace_s=3600)
    assert (report.turns_reclaimed, report.objects_reclaimed) == (0, 0)
    # The turns stay (too young), so they still name their snapshots and blobs: every object is a root's.
    assert report.roots == 4 and report.cas.objects_kept == 11
    assert (await store.turns.get_turn(entry["turns"][0])).payload == entry["payloads"][0]
    assert await store.cas.read_blob(entry["blob"]) == b"blob of context 1"


async def test_gc_refuses_bad_arguments_and_a_read_only_store_before_doing_anything(
    store: PgStore, pg_dsn: str, pg_schema: str, tmp_path: Path
) -> None:
    entry = await add_context(store, tmp_path / "ws", 1)
    await store.turns.delete_context(entry["id"])
    await add_context(store, tmp_path / "ws", 2)  # the highest turn is always kept: make it a live one
    counts = await table_counts(pg_dsn, pg_schema)
    for grace in (-1, "1", None, True, float("nan"), 10**10):
        with pytest.raises(InvalidInput, match="grace_s"):
            await store.gc(grace_s=grace)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="dry_run"):
        await store.gc(grace_s=0, dry_run=1)  # type: ignore[arg-type]
    async with await connect_pg(pg_dsn, schema=pg_schema, durability="normal") as default:
        # freshen_s 60 by default: a smaller grace could take an object a writer was just told is there
        with pytest.raises(InvalidInput, match="freshen_s"):
            await default.gc(grace_s=1)
    async with await connect_pg(pg_dsn, schema=pg_schema, readonly=True, freshen_s=0) as readonly:
        with pytest.raises(InvalidInput, match="read-only"):
            await readonly.gc(grace_s=0)
        with pytest.raises(InvalidInput, match="read-only"):
            await readonly.gc(grace_s=0, dry_run=True)
    assert await table_counts(pg_dsn, pg_schema) == counts
    with pytest.raises(InvalidInput, match="freshen_s"):
        await connect_pg(pg_dsn, schema=pg_schema, freshen_s=-1)
    # Still serving, and gc still works.
    assert (await store.turns.get_turn(entry["turns"][0])).payload == entry["payloads"][0]
    report = await store.gc(grace_s=0)
    assert report.turns_reclaimed == 3
    check = await store.check()
    assert check.ok, check.problems


WRITERS = 4
SECONDS = 8.0
#: must exceed a writer's time from making an object to committing the turn that names it (Store.gc):
#: a second was not always, with four writers and the gc loop in one process on a loaded machine
GRACE = 3.0


async def test_gc_in_a_loop_beside_writers_appending_snapshotting_and_deleting(store: PgStore, tmp_path: Path) -> None:
    """Writers create contexts whose turns name snapshots of their own changing workspace and blobs,
    read their live contexts back, and delete some; gc loops meanwhile with a grace of GRACE seconds.
    Nothing fails, every live context reads back whole, the deleted ones are reclaimed."""
    errors: list[BaseException] = []
    live: dict[int, dict[str, Any]] = {}
    reports: list[GcReport] = []
    deadline = time.monotonic() + SECONDS
    stop = anyio.Event()

    async def writer(w: int) -> None:
        rng = random.Random(w)
        mine: list[int] = []
        n = 0
        try:
            while time.monotonic() < deadline:
                c = w * 100_000 + n
                n += 1
                entry = await add_context(store, tmp_path / f"ws-{w}", c)
                entry["c"] = c
                live[entry["id"]] = entry
                mine.append(entry["id"])
                # Build on an older live context too: a turn naming an object that already existed.
                if len(mine) > 1:
                    older = live[rng.choice(mine[:-1])]
                    assert await store.cas.has(older["blob"])
                    turn = await store.turns.append_turn(older["id"], "t", b"more %d" % c, refs=[older["blob"]])
                    older["payloads"].append(b"more %d" % c)
                    older["turns"].append(turn.turn_id)
                # Read a random live context of this writer back.
                probe = live[rng.choice(mine)]
                chain = await store.turns.list_turns(probe["id"], limit=100)
                assert [t.payload for t in chain] == probe["payloads"]
                assert await store.cas.read_blob(probe["blob"]) == b"blob of context %d" % probe["c"]
                if len(mine) > 3 and rng.random() < 0.5:
                    gone = mine.pop(rng.randrange(len(mine) - 1))
                    del live[gone]
                    await store.turns.delete_context(gone)
        except BaseException as exc:
            errors.append(exc)
            raise

    async def collector() -> None:
        try:
            while not stop.is_set():
                reports.append(await store.gc(grace_s=GRACE))
                await anyio.sleep(0.05)
        except BaseException as exc:
            errors.append(exc)
            raise

    async with anyio.create_task_group() as tg:
        tg.start_soon(collector)
        async with anyio.create_task_group() as writers:
            for w in range(WRITERS):
                writers.start_soon(writer, w)
        stop.set()

    assert not errors, errors
    assert len(reports) >= 2, len(reports)
    await assert_intact_chains(store, list(live.values()), tmp_path)
    await anyio.sleep(GRACE)
    final = await store.gc(grace_s=GRACE)
    reclaimed = sum(r.turns_reclaimed for r in reports) + final.turns_reclaimed
    objects = sum(r.objects_reclaimed for r in reports) + final.objects_reclaimed
    print(
        f"\n{len(reports)} gc runs beside {WRITERS} writers for {SECONDS:.0f} s: {len(live)} live contexts, "
        f"{reclaimed} turns and {objects} objects reclaimed; gc seconds max "
        f"{max(r.seconds for r in reports):.2f}"
    )
    assert reclaimed > 0 and objects > 0
    await assert_intact_chains(store, list(live.values()), tmp_path)
    check = await store.check()
    assert check.ok, check.problems


async def assert_intact_chains(store: PgStore, kept: list[dict[str, Any]], where: Path) -> None:
    for made in kept:
        chain = await store.turns.list_turns(made["id"], limit=1000)
        assert [t.payload for t in chain] == made["payloads"]
        assert await store.cas.read_blob(made["blob"]) == b"blob of context %d" % made["c"]
        out = where / f"restored-{made['id']}-{time.monotonic_ns()}"
        await store.cas.restore(made["tree"], out)
        assert (out / "state.bin").read_bytes() == made["own"]


# -- other processes ----------------------------------------------------------------------------------

WRITER = """
import json, random, sys, time, anyio
from pathlib import Path
from pforge_async.postgres.store import connect_pg

async def main():
    dsn, schema, n, seconds, workdir = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
    rng = random.Random(n)
    live = {}
    stop = time.monotonic() + seconds
    ws = Path(workdir) / f"ws-{n}"
    (ws / "sub").mkdir(parents=True, exist_ok=True)
    async with await connect_pg(dsn, schema=schema, durability="normal", freshen_s=0) as store:
        i = 0
        while time.monotonic() < stop:
            i += 1
            own = f"{n}-{i}".encode() * 100
            (ws / "state.bin").write_bytes(own)
            (ws / "sub" / "notes.txt").write_text(f"notes {n}-{i}")
            tree = await store.cas.snapshot(ws)
            blob = await store.cas.write_blob(b"blob %d-%d" % (n, i))
            ctx = await store.turns.create_context(name=f"p{n}-{i}")
            payloads = []
            for k in range(2):
                payload = f"{n}-{i}-{k}"
                await store.turns.append_turn(ctx.context_id, "t", payload.encode(), fs_root=tree if k else None,
                                              refs=[blob] if k else ())
                payloads.append(payload)
            live[ctx.context_id] = {"tree": tree, "blob": blob.hex() if isinstance(blob, bytes) else blob,
                                    "own": own.decode(), "payloads": payloads, "i": i}
            if len(live) > 3 and rng.random() < 0.6:
                gone = rng.choice(sorted(live)[:-1])
                del live[gone]
                await store.turns.delete_context(gone)
    print(json.dumps({"n": n, "live": live}))

anyio.run(main)
"""


async def test_gc_in_one_process_beside_writer_processes(pg_dsn: str, pg_schema: str, tmp_path: Path) -> None:
    """Two writer processes, each with its own PgStore on the schema, snapshot, append and delete while
    this process loops gc: every context a writer acknowledged and kept reads back whole."""
    async with await connect_pg(pg_dsn, schema=pg_schema, durability="normal", freshen_s=0) as store:
        children = [spawn(WRITER, pg_dsn, pg_schema, n, SECONDS, tmp_path) for n in range(2)]
        reports: list[GcReport] = []
        outputs: list[str] = []
        drained = anyio.Event()

        async def drain() -> None:
            # Read the children's pipes while they run: a report bigger than a pipe's buffer would
            # otherwise block its writer, and the loop below would wait for it forever.
            outputs.extend(await anyio.to_thread.run_sync(run_all, children))
            drained.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(drain)
            while not drained.is_set():
                reports.append(await store.gc(grace_s=GRACE))
                await anyio.sleep(0.1)
        await anyio.sleep(GRACE)
        reports.append(await store.gc(grace_s=GRACE))
        checked = 0
        for output in outputs:
            result = json.loads(output)
            for context_id, made in result["live"].items():
                chain = await store.turns.list_turns(int(context_id), limit=10)
                assert [t.payload.decode() for t in chain] == made["payloads"]
                assert chain[-1].fs_root == made["tree"]
                assert await store.cas.read_blob(made["blob"]) == b"blob %d-%d" % (result["n"], made["i"])
                out = tmp_path / f"restored-{context_id}"
                await store.cas.restore(made["tree"], out)
                assert (out / "state.bin").read_text() == made["own"]
                checked += 1
        turns = sum(r.turns_reclaimed for r in reports)
        objects = sum(r.objects_reclaimed for r in reports)
        print(
            f"\n{len(reports)} gc runs beside 2 writer processes: {checked} live contexts intact, {turns} turns "
            f"and {objects} objects reclaimed"
        )
        assert checked > 0 and turns > 0 and objects > 0
        check = await store.check()
        assert check.ok, check.problems


GC_CHILD = """
import sys, anyio
from pforge_async.postgres.store import connect_pg

async def main():
    async with await connect_pg(sys.argv[1], schema=sys.argv[2], freshen_s=0) as store:
        print("ready", flush=True)
        while True:
            await store.gc(grace_s=0)

anyio.run(main)
"""

CRASH_RUNS = 8


async def test_gc_killed_at_random_points_leaves_a_sound_store(pg_dsn: str, pg_schema: str, tmp_path: Path) -> None:
    """SIGKILL of a process looping gc, at random points, between rounds that add garbage: each time
    the store reopens, passes check(), has lost nothing live, and gc runs again."""
    rng = random.Random(13)
    kept: list[dict[str, Any]] = []
    c = 0
    for run in range(CRASH_RUNS):
        async with await connect_pg(pg_dsn, schema=pg_schema, durability="normal", freshen_s=0) as store:
            for _ in range(6):  # garbage in every part, and one more kept context
                c += 1
                entry = await add_context(store, tmp_path / "ws", c)
                entry["c"] = c
                if c % 6:
                    await store.turns.delete_context(entry["id"])
                else:
                    kept.append(entry)
            await store.cas.write_blob(b"orphan %d" % run)
            await store.nonces.issue("s", 0.001)
        child = spawn(GC_CHILD, pg_dsn, pg_schema)
        await anyio.to_thread.run_sync(wait_for_line, child, "ready")
        await anyio.sleep(rng.uniform(0.0, 0.6))
        child.send_signal(signal.SIGKILL)
        await anyio.to_thread.run_sync(child.wait)
        async with await connect_pg(pg_dsn, schema=pg_schema, durability="normal", freshen_s=0) as store:
            check = await store.check()
            assert check.ok, (run, check.problems)
            await assert_intact(store, kept, tmp_path)
            await store.gc(grace_s=0)
            await assert_intact(store, kept, tmp_path)
    print(f"\n{CRASH_RUNS} runs of gc killed at random points: {len(kept)} kept contexts intact")


async def test_space_gc_frees_is_reused_by_new_writes(store: PgStore, tmp_path: Path) -> None:
    """PostgreSQL keeps a table's pages after a delete (plain VACUUM makes them reusable, it does not
    shrink the files), so the space promise on PostgreSQL is reuse: fill, delete 90%, gc, fill the
    same again, and the schema stays near its size after the first fill (a store that only grew
    would be 1.9x)."""
    count = 400
    made = [await add_context(store, tmp_path / "ws", c) for c in range(count)]
    filled = await store._bytes()
    for entry in made[count // 10 :]:
        await store.turns.delete_context(entry["id"])
    reports = [await store.gc(grace_s=0)]
    while reports[-1].objects_reclaimed:  # a young snapshot goes a level per gc (see above)
        reports.append(await store.gc(grace_s=0))
    for c in range(count, count + count * 9 // 10):
        await add_context(store, tmp_path / "ws", c)
    refilled = await store._bytes()
    turns = sum(r.turns_reclaimed for r in reports)
    objects = sum(r.objects_reclaimed for r in reports)
    print(
        f"\n{count} contexts: {filled} bytes; 90% deleted, {len(reports)} gc runs reclaimed {turns} turns and "
        f"{objects} objects; as many again written: {refilled} bytes ({refilled / filled:.2f}x)"
    )
    # the last deleted context holds the highest turn, which gc always keeps (with its snapshot)
    assert turns == 3 * (count * 9 // 10 - 1) and objects == 5 * (count * 9 // 10 - 1)
    assert refilled < 1.3 * filled
