"""The turn store on PostgreSQL: the conformance classes of every backend (test_turnstore.py,
test_lifecycle.py) run against ``PgTurnStore`` on a real server, plus what only a shared server
shows: compare-and-set races, processes appending to shared and distinct contexts, names raced across
processes, a SIGKILL in the middle of batches, gc beside writers, and damage found by check()."""

from __future__ import annotations

import itertools
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import asyncpg
import pytest

from pforge_async import ContextNotFound, HeadConflict, IntegrityError, NewTurn, StorageError
from pforge_async.cas import Cas
from pforge_async.postgres.cas import open_pg_cas
from pforge_async.postgres.turns import PgTurnActor, PgTurnStore

from . import test_lifecycle as lifecycle
from . import test_turnstore as conformance
from ._pg import PgCluster
from .test_turnstore import MAX_PAYLOAD

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def open_pg_turns(
    dsn: str, schema: str, cas: Cas, *, max_payload_bytes: int = MAX_PAYLOAD
) -> AsyncIterator[PgTurnStore]:
    """A ``PgTurnStore`` with its actor running, closed on exit."""
    actor = PgTurnActor(dsn, schema=schema)
    async with anyio.create_task_group() as tg:
        await tg.start(actor.run)
        try:
            yield PgTurnStore(actor, cas, max_payload_bytes=max_payload_bytes)
        finally:
            await actor.aclose()


@pytest.fixture
async def cas(pg_dsn: str, pg_schema: str) -> AsyncIterator[Cas]:
    """The CAS the turn store checks fs_root and refs in, and keeps its blobs in: the PostgreSQL one,
    in the same schema, as a PostgreSQL store has it."""
    async with open_pg_cas(pg_dsn, schema=pg_schema) as pg_cas:
        yield pg_cas  # type: ignore[misc]  # Cas's API (the conformance classes are typed for Cas)


@pytest.fixture
async def store(pg_dsn: str, pg_schema: str, cas: Cas) -> AsyncIterator[PgTurnStore]:
    async with open_pg_turns(pg_dsn, pg_schema, cas) as opened:
        yield opened


@pytest.fixture
async def with_cas(store: PgTurnStore, cas: Cas) -> AsyncIterator[tuple[PgTurnStore, Cas]]:
    yield store, cas


class TestPgConformance(conformance.TestTurnStoreConformance):
    """test_turnstore.py's conformance suite on PostgreSQL."""


class TestPgSessions(conformance.TestSessions):
    """Names, lineage, listing, heads, batches: test_turnstore.py's session suite on PostgreSQL."""


class TestPgDeleteContext(lifecycle.TestDeleteContext):
    """test_lifecycle.py's delete suite on PostgreSQL."""


class TestPgErase(lifecycle.TestErase):
    """test_lifecycle.py's erase and prune suite on PostgreSQL."""


class TestPgRefs(lifecycle.TestRefs):
    """test_lifecycle.py's refs suite on PostgreSQL."""


# -- what only PostgreSQL shows ------------------------------------------------------------------------


@asynccontextmanager
async def raw(dsn: str, schema: str) -> AsyncIterator[Any]:
    """A plain asyncpg connection to the store's schema, to look at or damage its rows."""
    conn = await asyncpg.connect(dsn, server_settings={"search_path": schema})
    try:
        yield conn
    finally:
        await conn.close()


async def test_a_reopened_store_has_everything(pg_dsn: str, pg_schema: str, cas: Cas) -> None:
    """Deletes, erasures, refs, names and keys are in the server, not in a process: a new actor (as
    another process would) finds them all."""
    async with open_pg_turns(pg_dsn, pg_schema, cas) as store:
        blob = await store.put_blob(b"kept")
        gone = await store.create_context(name="gone", idempotency_key="g")
        turn = await store.append_turn(gone.context_id, "t", b"a", idempotency_key="k", refs=[blob])
        kept = await store.fork_context(turn.turn_id, name="kept", metadata={"m": 1})
        secrets = [(await store.append_turn(kept.context_id, "t", b"secret-%d" % i)).turn_id for i in range(4)]
        assert await store.prune_context(kept.context_id, keep_last=2) == 3
        await store.delete_context(gone.context_id)
    async with open_pg_turns(pg_dsn, pg_schema, cas) as store:
        with pytest.raises(ContextNotFound):
            await store.get_context(gone.context_id)
        assert await store.find_context("gone") is None
        info = await store.get_context(kept.context_id)
        assert (info.head_turn_id, info.metadata, info.name) == (secrets[-1], {"m": 1}, "kept")
        assert [r.erased for r in await store.list_turns(kept.context_id)] == [True] * 3 + [False] * 2
        assert (await store.get_turn(turn.turn_id)).refs == ()  # erased with the payload
        assert (await store.open_context("kept")).context_id == kept.context_id
        fresh = await store.create_context(name="gone", idempotency_key="g")
        assert fresh.context_id > kept.context_id
        assert await store.create_context(name="gone", idempotency_key="g") == fresh
        assert await store.check() == []


async def test_damage_is_found_and_never_served(pg_dsn: str, pg_schema: str, store: PgTurnStore) -> None:
    ctx = await store.create_context()
    good = await store.append_turn(ctx.context_id, "t", b"good payload")
    bad = await store.append_turn(ctx.context_id, "t", b"tamper with me", idempotency_key="k")
    erased = await store.append_turn(ctx.context_id, "t", b"to erase")
    after = await store.append_turn(ctx.context_id, "t", b"after")
    other = await store.create_context()
    lone = await store.append_turn(other.context_id, "t", b"lone")
    await store.erase_turns(other.context_id)
    async with raw(pg_dsn, pg_schema) as conn:
        await conn.execute("UPDATE turns SET payload = 'tamper with ME'::bytea WHERE turn_id = $1", bad.turn_id)
        await conn.execute("UPDATE turns SET payload = '\\x00'::bytea WHERE turn_id = $1", lone.turn_id)
        await conn.execute("UPDATE contexts SET metadata = '[1]' WHERE context_id = $1", other.context_id)
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
    with pytest.raises(IntegrityError, match=f"turn {lone.turn_id} .*marked erased"):
        await store.get_turn(lone.turn_id)
    assert await store.get_turn(good.turn_id) == good
    assert [t.turn_id for t in await store.list_turns(ctx.context_id, limit=2)] == [erased.turn_id, after.turn_id]
    problems = await store.check()
    assert any(f"turn {bad.turn_id} does not match" in p for p in problems), problems
    assert any("erased turns that still hold a payload" in p for p in problems), problems
    assert any(f"context {other.context_id}'s metadata" in p for p in problems), problems
    # Still serving every caller.
    assert (await store.append_turn(ctx.context_id, "t", b"later")).parent_turn_id == after.turn_id


async def _drain(iterator: AsyncIterator[object]) -> list[object]:
    return [item async for item in iterator]


async def test_names_and_keys_with_control_characters_round_trip(store: PgTurnStore) -> None:
    """PostgreSQL text holds no NUL and the boundary escapes \\x01: names, keys and type ids with
    control characters come back as given, and list in code point order."""
    names = ["a\x01b", "a\x01", "a", "a\x02", "a\x7f", "a\x00b"[:1] + "\x1fz"]
    made = {name: await store.open_context(name) for name in names}
    assert all(made[name].name == name for name in names)
    page = await store.list_contexts(order="name", limit=100)
    assert [c.name for c in page.contexts] == sorted(names)
    prefixed = await store.list_contexts(order="name", prefix="a\x01", limit=100)
    assert [c.name for c in prefixed.contexts] == ["a\x01", "a\x01b"]
    ctx = made["a\x01b"]
    turn = await store.append_turn(ctx.context_id, "type\x01", b"\x00\x01", idempotency_key="key\x01\x02")
    assert await store.get_turn_by_key(ctx.context_id, "key\x01\x02") == turn
    assert (await store.get_turn(turn.turn_id)).type_id == "type\x01"
    assert await store.find_context("a\x01b") == await store.get_context(ctx.context_id)
    assert await store.check() == []


ROUNDS = 1000


async def test_two_writers_with_one_stale_head_1000_rounds(store: PgTurnStore) -> None:
    ctx = await store.create_context()
    head = 0
    for round_ in range(ROUNDS):
        won: list[int] = []
        lost: list[HeadConflict] = []

        async def writer(
            n: int, head: int = head, round_: int = round_, won: list[int] = won, lost: list[HeadConflict] = lost
        ) -> None:
            try:
                turn = await store.append_turn(ctx.context_id, "t", b"%d/%d" % (round_, n), expected_head=head)
                won.append(turn.turn_id)
            except HeadConflict as exc:
                lost.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(writer, 1)
            tg.start_soon(writer, 2)
        assert len(won) == 1 and len(lost) == 1, f"round {round_}: {won} {lost}"
        assert (lost[0].expected, lost[0].actual) == (head, won[0])
        head = won[0]
    chain = [t async for t in store.iter_turns(ctx.context_id, page_size=300)]
    assert len(chain) == ROUNDS and chain[-1].turn_id == head
    assert all(b.parent_turn_id == a.turn_id for a, b in itertools.pairwise(chain))


async def test_64_tasks_compare_and_set_one_chain(store: PgTurnStore) -> None:
    ctx = await store.create_context()
    acked: list[int] = []

    async def task(n: int) -> None:
        for i in range(10):
            key = f"{n}-{i}"
            head = (await store.get_head(ctx.context_id)).head_turn_id
            while True:
                try:
                    turn = await store.append_turn(
                        ctx.context_id, "t", key.encode(), idempotency_key=key, expected_head=head
                    )
                    break
                except HeadConflict as exc:
                    head = exc.actual
            acked.append(turn.turn_id)

    async with anyio.create_task_group() as tg:
        for n in range(64):
            tg.start_soon(task, n)
    chain = [t async for t in store.iter_turns(ctx.context_id)]
    assert sorted(t.turn_id for t in chain) == sorted(acked) and len(set(acked)) == 640
    assert all(b.parent_turn_id == a.turn_id for a, b in itertools.pairwise(chain))
    assert store.actor.largest_batch > 1  # the appends were group-committed


async def test_list_contexts_walks_an_index_for_each_order(pg_dsn: str, pg_schema: str, store: PgTurnStore) -> None:
    """Each order's page is a walk down an index from the cursor, stopped by the limit: the plan has
    no sort over the table and no sequential scan, so a page costs the same with many contexts."""
    parent = await store.create_context(name="p")
    async with raw(pg_dsn, pg_schema) as conn:
        await conn.execute(
            "INSERT INTO contexts (context_id, created_at_ms, updated_at_ms, updated_bucket, name, parent_context_id) "
            "SELECT nextval('context_ids'), i, i, i >> 6, 'n/' || lpad(i::text, 6, '0'), "
            "CASE WHEN i % 100 = 0 THEN $1 ELSE 0 END "
            "FROM generate_series(1, 20000) AS i",
            parent.context_id,
        )
        await conn.execute("ANALYZE contexts")
    plans: list[str] = []
    real_fetch = store.actor.fetch

    async def explain(sql: str, *args: Any) -> list[tuple[Any, ...]]:
        if sql.startswith("SELECT c.context_id"):
            plans.append("\n".join(str(r[0]) for r in await real_fetch("EXPLAIN " + sql, *args)))
        return await real_fetch(sql, *args)

    store.actor.fetch = explain  # type: ignore[method-assign]
    try:
        for order in ("updated", "created", "name"):
            first = await store.list_contexts(order=order, limit=50)
            again = await store.list_contexts(order=order, after=first.cursor, limit=50)
            assert len(again.contexts) == 50
        page = await store.list_contexts(order="name", prefix="n/0001", limit=20)
        assert [c.name for c in page.contexts] == [f"n/{i:06d}" for i in range(100, 120)]
        children = await store.list_contexts(parent_context_id=parent.context_id, order="created", limit=500)
        assert len(children.contexts) == 200
    finally:
        del store.actor.fetch
    assert len(plans) == 8
    for plan in plans:
        assert "Seq Scan" not in plan, plan
        assert "Index" in plan, plan
    for plan in plans[:6]:  # the orders' own walks: a page is read in order (by bucket: sorted within each)
        assert not re.search(r"^\s*(->\s*)?Sort\s+\(cost", plan, re.M) and plan.startswith("Limit"), plan
    assert "Incremental Sort" in plans[0]  # "updated": the index holds 64 ms buckets


async def test_a_server_restart_mid_load_loses_nothing_acknowledged(
    pg_cluster: tuple[str, PgCluster | None], pg_schema: str
) -> None:
    """``pg_ctl restart -m fast`` while 16 writers append: each call succeeds or fails with a clear
    StorageError, the actor reconnects by itself, a retry with the same key finds what landed, and
    every chain ends up holding each of its writer's turns once, in order."""
    dsn, cluster = pg_cluster
    if cluster is None:
        pytest.skip("PFORGE_TEST_PG_DSN names a server of its own: the tests do not restart it")
    async with open_pg_turns(dsn, pg_schema, None) as store:  # type: ignore[arg-type]
        contexts = [await store.create_context(name=f"w{n}") for n in range(16)]
        restarted = anyio.Event()
        failures: list[StorageError] = []

        async def writer(ctx: Any) -> None:
            i = 0
            while i < 60 or not restarted.is_set():
                try:
                    await store.append_turn(ctx.context_id, "t", b"%d" % i, idempotency_key=f"k{i}")
                except StorageError as exc:
                    failures.append(exc)
                    await anyio.sleep(0.05)
                    continue  # the same key again: a turn that landed is found, not written twice
                i += 1
                await anyio.sleep(0.005)

        async with anyio.create_task_group() as tg:
            for ctx in contexts:
                tg.start_soon(writer, ctx)
            await anyio.sleep(0.3)
            await anyio.to_thread.run_sync(cluster.restart)
            restarted.set()
        print(f"{len(failures)} calls failed with StorageError; the actor connected {store.actor.connects} times")
        assert all("lost" in str(exc) or "server" in str(exc) for exc in failures), failures
        for ctx in contexts:
            chain = [t async for t in store.iter_turns(ctx.context_id)]
            assert [t.idempotency_key for t in chain] == [f"k{i}" for i in range(len(chain))]
            assert [t.payload for t in chain] == [b"%d" % i for i in range(len(chain))]
            assert len(chain) >= 60
        assert await store.check() == []
        assert store.actor.connects >= 2  # it did reconnect


async def test_two_actors_on_one_context_make_one_chain(pg_dsn: str, pg_schema: str) -> None:
    """Two writers of one schema (as two processes have) appending to one context: each batch waits
    for the other's lock and then builds on the head the other left (read after the wait, not from the
    snapshot its locking statement began with), so the turns form one chain, every depth right."""
    async with open_pg_turns(pg_dsn, pg_schema, None) as one, open_pg_turns(pg_dsn, pg_schema, None) as two:  # type: ignore[arg-type]
        ctx = await one.create_context()

        async def writer(store: PgTurnStore, n: int) -> None:
            for i in range(100):
                await store.append_turn(ctx.context_id, "t", b"%d-%d" % (n, i))

        async with anyio.create_task_group() as tg:
            for n in range(8):
                tg.start_soon(writer, one if n % 2 else two, n)
        chain = [t async for t in one.iter_turns(ctx.context_id)]
        assert len(chain) == 800 and [t.depth for t in chain] == list(range(1, 801))
        assert all(b.parent_turn_id == a.turn_id for a, b in itertools.pairwise(chain))
        assert await two.check() == []


async def test_erasures_of_shared_chains_from_two_writers(pg_dsn: str, pg_schema: str) -> None:
    """Two writers erase forks that share most of their history, at once and again and again, while
    appends go on: no deadlock, and every turn is counted by exactly one erasure."""
    async with open_pg_turns(pg_dsn, pg_schema, None) as one, open_pg_turns(pg_dsn, pg_schema, None) as two:  # type: ignore[arg-type]
        main = await one.create_context()
        ids = [
            t.turn_id for t in await one.append_turns([NewTurn(main.context_id, "t", b"%d" % i) for i in range(300)])
        ]
        forks = [await one.fork_context(ids[k]) for k in (299, 250, 200, 150, 100, 50)]
        for fork in forks:
            await one.append_turn(fork.context_id, "t", b"own")
        counts: list[int] = []

        async def erase(store: PgTurnStore, fork: Any) -> None:
            counts.append(await store.erase_turns(fork.context_id))

        async def append(store: PgTurnStore) -> None:
            for i in range(20):
                await store.append_turn(main.context_id, "t", b"more %d" % i)

        async with anyio.create_task_group() as tg:
            for n, fork in enumerate(forks):
                tg.start_soon(erase, one if n % 2 else two, fork)
            tg.start_soon(append, one)
            tg.start_soon(append, two)
        # 300 shared turns and one of each fork's own: each erased once, whoever got there first.
        assert sum(counts) == 300 + len(forks)
        assert all(t.erased for t in await one.list_turns(main.context_id, before_turn_id=ids[-1], limit=300))
        assert await one.check() == []
