"""The whole store on PostgreSQL: ``connect_pg``, schemas as separate stores, migrations from many
processes at once, the server restarted or a writer's connection killed under load, a writer process
SIGKILLed mid-batch, and bad input at the door."""

from __future__ import annotations

import os
import random
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import asyncpg
import pytest

from pforge_async import (
    ActorClosed,
    BudgetExceeded,
    ContextNotFound,
    HeadConflict,
    InvalidInput,
    NewTurn,
    NonceReplayed,
    NotFound,
    ObjectNotFound,
    StorageError,
    Store,
)
from pforge_async.ledgers import Usage
from pforge_async.postgres.store import PgStore, connect_pg

from ._pg import PgCluster
from ._procs import run_all, spawn

pytestmark = pytest.mark.anyio


@pytest.fixture
async def store(pg_dsn: str, pg_schema: str) -> AsyncIterator[PgStore]:
    async with await connect_pg(pg_dsn, schema=pg_schema, durability="normal") as opened:
        yield opened


async def _raw(dsn: str) -> Any:
    return await asyncpg.connect(dsn)


# -- opening ----------------------------------------------------------------------------------------


async def test_connect_pg_gives_a_store_of_every_part(store: PgStore, pg_schema: str) -> None:
    assert isinstance(store, Store) and store.schema == pg_schema and not store.readonly
    ctx = await store.turns.create_context(name="main")
    blob = await store.cas.write_blob(b"hello")
    turn = await store.turns.append_turn(ctx.context_id, "t", b"payload", refs=[blob])
    assert (await store.turns.get_turn(turn.turn_id)).payload == b"payload"
    await store.memory.record_transition("s", "a", "t", 1.0, True)
    nonce = await store.nonces.issue("subject", 60)
    await store.nonces.consume(nonce, "subject")
    await store.budget.set_budget("v", tokens=10)
    await store.budget.record_spend("v", "m", input_tokens=5, output_tokens=0, cost=0)
    report = await store.check()
    assert report.ok, report.problems
    assert str(store.root).endswith(f"#{pg_schema}") and "@" in store.dsn


async def test_bad_arguments_to_connect_pg_are_invalid_input(pg_dsn: str, pg_schema: str) -> None:
    for dsn in ("", "sqlite:///x", "/tmp/x", 5):
        with pytest.raises(InvalidInput, match="postgresql://"):
            await connect_pg(dsn, schema=pg_schema)  # type: ignore[arg-type]
    for schema in ("", "1abc", "a-b", 'x"; DROP', "pg_catalog", "a" * 64, 5, "é"):
        with pytest.raises(InvalidInput, match="schema"):
            await connect_pg(pg_dsn, schema=schema)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="durability"):
        await connect_pg(pg_dsn, schema=pg_schema, durability="fast")  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="create"):
        await connect_pg(pg_dsn, schema=pg_schema, create=1)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="unknown options"):
        await connect_pg(pg_dsn, schema=pg_schema, pool=3)
    # Nothing of it was created.
    conn = await _raw(pg_dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM pg_namespace WHERE nspname = $1", pg_schema) == 0
    finally:
        await conn.close()


async def test_create_false_and_readonly_need_a_store(pg_dsn: str, pg_schema: str) -> None:
    with pytest.raises(NotFound, match=pg_schema):
        await connect_pg(pg_dsn, schema=pg_schema, create=False)
    with pytest.raises(NotFound, match=pg_schema):
        await connect_pg(pg_dsn, schema=pg_schema, readonly=True)
    async with await connect_pg(pg_dsn, schema=pg_schema) as store:
        await store.budget.set_budget("v", tokens=10)
        ctx = await store.turns.open_context("main")
        await store.turns.append_turn(ctx.context_id, "t", b"x")
    async with await connect_pg(pg_dsn, schema=pg_schema, readonly=True) as reader:
        assert reader.readonly
        assert (await reader.turns.get_head(ctx.context_id)).head_depth == 1
        assert (await reader.budget.totals("v")).tokens == 0
        with pytest.raises(InvalidInput, match="read-only"):
            await reader.budget.set_budget("w", tokens=1)
        with pytest.raises(InvalidInput, match="read-only"):
            await reader.nonces.issue("s", 60)
    async with await connect_pg(pg_dsn, schema=pg_schema, create=False) as again:
        assert (await again.turns.get_head(ctx.context_id)).head_depth == 1


async def test_an_unreachable_server_is_storage_error_naming_it() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    dsn = f"postgresql://nobody:secret@127.0.0.1:{port}/db"
    started = time.monotonic()
    with pytest.raises(StorageError) as info:
        await connect_pg(dsn, schema="pforge", connect_timeout=2, reconnect_wait=0.5)
    assert f"127.0.0.1:{port}" in str(info.value) and "secret" not in str(info.value)
    assert time.monotonic() - started < 30


async def test_a_closed_store_refuses_every_call(pg_dsn: str, pg_schema: str) -> None:
    store = await connect_pg(pg_dsn, schema=pg_schema)
    await store.aclose()
    await store.aclose()  # twice is fine
    with pytest.raises(ActorClosed):
        await store.nonces.issue("s", 60)
    with pytest.raises(ActorClosed):
        await store.memory.stats("s")


# -- schemas ----------------------------------------------------------------------------------------


async def test_open_store_takes_a_dsn_and_its_schema_parameter(pg_dsn: str, pg_schema: str) -> None:
    from pforge_async import open_store

    async with open_store(f"{pg_dsn}?schema={pg_schema}") as store:
        assert isinstance(store, PgStore) and store.schema == pg_schema
        await store.budget.set_budget("v", tokens=3)
    async with await connect_pg(pg_dsn, schema=pg_schema, create=False) as again:
        await again.budget.reserve("v", tokens=3)
    with pytest.raises(InvalidInput, match="name it once"):
        await connect_pg(f"{pg_dsn}?schema=other", schema=pg_schema)
    with pytest.raises(InvalidInput, match="schema"):
        await connect_pg(f"{pg_dsn}?schema=bad-name")


async def test_two_schemas_are_two_stores(pg_dsn: str, pg_schema: str) -> None:
    other = pg_schema + "_b"
    try:
        async with (
            await connect_pg(pg_dsn, schema=pg_schema) as a,
            await connect_pg(pg_dsn, schema=other) as b,
        ):
            ctx_a = await a.turns.open_context("shared-name")
            ctx_b = await b.turns.open_context("shared-name")
            await a.turns.append_turn(ctx_a.context_id, "t", b"from a")
            assert (await b.turns.get_head(ctx_b.context_id)).head_depth == 0
            blob = await a.cas.write_blob(b"only in a")
            assert await a.cas.has(blob) and not await b.cas.has(blob)
            nonce = await a.nonces.issue("s", 60)
            with pytest.raises(Exception, match="never issued"):
                await b.nonces.consume(nonce, "s")
            await a.nonces.consume(nonce, "s")
            await a.budget.set_budget("v", tokens=10)
            with pytest.raises(NotFound, match="no budget"):
                await b.budget.reserve("v", tokens=1)
            await b.budget.set_budget("v", tokens=5)
            await b.budget.reserve("v", tokens=5)
            await a.budget.reserve("v", tokens=10)  # b's reservation holds nothing of a's budget
            await a.memory.record_transition("s", "x", "t", 1.0, True)
            assert await b.memory.stats("s") == []
            for store in (a, b):
                report = await store.check()
                assert report.ok, report.problems
    finally:
        conn = await _raw(pg_dsn)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{other}" CASCADE')
        finally:
            await conn.close()


# -- migrations -------------------------------------------------------------------------------------

OPENER = """
import sys, time, anyio
from pforge_async.postgres.store import connect_pg
async def main():
    dsn, schema, start_at, n = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
    await anyio.sleep(max(0.0, start_at - time.time()))
    async with await connect_pg(dsn, schema=schema) as store:
        ctx = await store.turns.open_context("shared")
        await store.turns.append_turn(ctx.context_id, "t", n.encode(), idempotency_key=n)
        await store.memory.record_transition("s", "a" + n, "t", 1.0, True)
        print(ctx.context_id)
anyio.run(main)
"""


async def test_eight_processes_create_one_schema_at_once(pg_dsn: str, pg_schema: str) -> None:
    start_at = time.time() + 4  # past every child's imports: they open at the same moment
    procs = [spawn(OPENER, pg_dsn, pg_schema, start_at, str(n)) for n in range(8)]
    outs = run_all(procs, timeout=300)
    assert len({int(out) for out in outs}) == 1  # one context for the one name
    async with await connect_pg(pg_dsn, schema=pg_schema) as store:
        ctx = await store.turns.open_context("shared")
        assert (await store.turns.get_head(ctx.context_id)).head_depth == 8
        assert len(await store.memory.stats("s")) == 8
        report = await store.check()
        assert report.ok, report.problems
    conn = await _raw(pg_dsn)
    try:
        versions = dict(await conn.fetch(f'SELECT part, version FROM "{pg_schema}".pforge_versions'))
    finally:
        await conn.close()
    assert set(versions) == {"cas", "turns", "memory", "nonces", "budget"}


async def test_a_newer_schema_is_refused_untouched(pg_dsn: str, pg_schema: str) -> None:
    async with await connect_pg(pg_dsn, schema=pg_schema) as store:
        await store.budget.set_budget("v", tokens=1)
    conn = await _raw(pg_dsn)
    try:
        await conn.execute(f"UPDATE \"{pg_schema}\".pforge_versions SET version = 99 WHERE part = 'budget'")
        with pytest.raises(StorageError, match="newer"):
            await connect_pg(pg_dsn, schema=pg_schema)
        assert await conn.fetchval(f"SELECT version FROM \"{pg_schema}\".pforge_versions WHERE part = 'budget'") == 99
        assert await conn.fetchval(f'SELECT count(*) FROM "{pg_schema}".budgets') == 1
    finally:
        await conn.close()


# -- faults under load ------------------------------------------------------------------------------


class _Load:
    """Tasks writing every part of a store; what each call came to, and what was acknowledged."""

    def __init__(self, store: PgStore) -> None:
        self.store = store
        self.turns: list[tuple[int, int, bytes]] = []  # (context, turn id, payload) acknowledged
        self.spends: list[tuple[str, int]] = []  # (key, spend id)
        self.nonces: list[str] = []  # consumed
        self.transitions: list[tuple[str, int]] = []
        self.reserved: list[str] = []
        self.errors: list[BaseException] = []
        self.ok = 0

    async def writer(self, n: int, stop: anyio.Event) -> None:
        store = self.store
        ctx = await store.turns.open_context(f"ctx-{n}")
        i = 0
        while not stop.is_set():
            i += 1
            key = f"{n}-{i}"
            try:
                match i % 4:
                    case 0:
                        payload = key.encode()
                        turn = await store.turns.append_turn(ctx.context_id, "t", payload, idempotency_key=key)
                        self.turns.append((ctx.context_id, turn.turn_id, payload))
                    case 1:
                        spend = await store.budget.record_spend(
                            "v", "m", input_tokens=1, output_tokens=1, cost=1, idempotency_key=key
                        )
                        self.spends.append((key, spend))
                    case 2:
                        nonce = await store.nonces.issue("s", 600)
                        await store.nonces.consume(nonce, "s")
                        self.nonces.append(nonce)
                    case 3:
                        tid = await store.memory.record_transition("s", "a", "t", 1.0, True, idempotency_key=key)
                        self.transitions.append((key, tid))
                        held = await store.budget.reserve("v", tokens=1, idempotency_key="r" + key)
                        self.reserved.append(held.reservation_id)
                self.ok += 1
            except StorageError as exc:
                self.errors.append(exc)
                await anyio.sleep(0.01)

    async def verify(self, store: PgStore) -> None:
        """Every acknowledged write is there, once."""
        for context_id, turn_id, payload in self.turns:
            turn = await store.turns.get_turn(turn_id)
            assert (turn.context_id, turn.payload) == (context_id, payload)
        for key, spend_id in self.spends:
            again = await store.budget.record_spend(
                "v", "m", input_tokens=1, output_tokens=1, cost=1, idempotency_key=key
            )
            assert again == spend_id
        for nonce in self.nonces:
            with pytest.raises(NonceReplayed):
                await store.nonces.consume(nonce, "s")
        for key, tid in self.transitions:
            assert await store.memory.record_transition("s", "a", "t", 1.0, True, idempotency_key=key) == tid
        report = await store.check()
        assert report.ok, report.problems


async def _run_load(store: PgStore, fault: Any, tasks: int = 16) -> _Load:
    load = _Load(store)
    await store.budget.set_budget("v", tokens=10**15)
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        for n in range(tasks):
            tg.start_soon(load.writer, n, stop)
        await anyio.sleep(1.0)
        await _until(lambda: load.ok > 0, "no write before the fault")
        before = load.ok
        await fault()
        await anyio.sleep(1.5)
        await _until(lambda: load.ok > before, "no write after the fault")
        stop.set()
    assert before > 0 and load.ok > before  # it wrote before the fault, and again after it
    return load


async def _until(done: Callable[[], bool], failure: str, within: float = 120) -> None:
    """Wait for ``done`` rather than a fixed time a loaded CI machine may overrun (``within`` only
    catches a load that never gets there)."""
    deadline = time.monotonic() + within
    while not done():
        assert time.monotonic() < deadline, f"{failure} in {within:.0f} s"
        await anyio.sleep(0.05)


async def test_the_server_restarted_under_load(pg_cluster: tuple[str, PgCluster | None], pg_schema: str) -> None:
    dsn, cluster = pg_cluster
    if cluster is None:
        pytest.skip(
            "PFORGE_TEST_PG_DSN names a server these tests did not start, so they may not restart it "
            "(test_a_killed_connection_under_load covers reconnecting on any server)"
        )
    async with await connect_pg(dsn, schema=pg_schema) as store:
        load = await _run_load(store, lambda: anyio.to_thread.run_sync(cluster.restart))
        # The calls in flight either succeeded or got StorageError (nothing else reached a caller);
        # the store reconnected by itself and serves; nothing acknowledged was lost.
        await load.verify(store)
        actors: list[Any] = store._pg_actors
        assert all(not a.closed for a in actors)
        assert all(a.connects >= 2 for a in actors if a.part in ("turns", "nonces", "budget", "memory"))
    print(f"restart under load: {load.ok} calls acknowledged, {len(load.errors)} StorageError")


async def test_a_killed_connection_under_load(pg_dsn: str, pg_schema: str) -> None:
    """Every writer connection of the store terminated by the server (pg_terminate_backend, as an
    operator or a failover would) while 16 tasks write: the same promises as a restart."""
    async with await connect_pg(pg_dsn, schema=pg_schema) as store:

        async def kill() -> None:
            conn = await _raw(pg_dsn)
            try:
                # This store's sessions only (the server may be shared: PFORGE_TEST_PG_DSN).
                killed = await conn.fetchval(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE application_name LIKE 'pforge-%' AND application_name LIKE '%-' || $1 "
                    "AND pid <> pg_backend_pid()",
                    pg_schema,
                )
                assert killed >= 5
            finally:
                await conn.close()

        load = await _run_load(store, kill)
        await load.verify(store)
    print(f"killed connections under load: {load.ok} calls acknowledged, {len(load.errors)} StorageError")


WRITER = """
import sys, anyio
from pforge_async.postgres.store import connect_pg
from pforge_async.turnstore.types import NewTurn
async def main():
    async with await connect_pg(sys.argv[1], schema=sys.argv[2]) as store:
        await store.budget.set_budget("v", tokens=10**15)
        a = await store.turns.open_context("a")
        b = await store.turns.open_context("b")
        i = 0
        async def side(n):
            j = 0
            while True:
                j += 1
                await store.memory.record_transition("s", "a", "t", 1.0, True, idempotency_key=f"m{n}-{j}")
        async with anyio.create_task_group() as tg:
            for n in range(4):
                tg.start_soon(side, n)
            while True:
                i += 1
                batch = [NewTurn(c.context_id, "t", f"{i}-{k}".encode(), idempotency_key=f"{i}-{k}")
                         for c in (a, b) for k in range(3)]
                turns = await store.turns.append_turns(batch)
                spend = await store.budget.record_spend("v", "m", input_tokens=i, output_tokens=1, cost=i,
                                                        idempotency_key=f"call-{i}")
                nonce = await store.nonces.issue("s", 600)
                await store.nonces.consume(nonce, "s")
                print(i, a.context_id, b.context_id, spend, nonce, ",".join(str(t.turn_id) for t in turns), flush=True)
anyio.run(main)
"""


async def test_sigkill_mid_batch_loses_nothing_acknowledged(pg_dsn: str, pg_schema: str) -> None:
    child = spawn(WRITER, pg_dsn, pg_schema)
    assert child.stdout is not None
    acked: list[tuple[int, int, int, int, str, list[int]]] = []
    deadline = None
    while deadline is None or time.monotonic() < deadline or len(acked) < 10:
        line = child.stdout.readline()
        if deadline is None:
            deadline = time.monotonic() + random.uniform(0.5, 1.5)
        assert line, child.stderr.read() if child.stderr else ""
        fields = line.split()
        ids = [int(t) for t in fields[5].split(",")]
        acked.append((int(fields[0]), int(fields[1]), int(fields[2]), int(fields[3]), fields[4], ids))
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    async with await connect_pg(pg_dsn, schema=pg_schema) as store:
        a, b = acked[0][1], acked[0][2]
        for i, _, _, spend, nonce, turn_ids in acked:
            again = await store.budget.record_spend(
                "v", "m", input_tokens=i, output_tokens=1, cost=i, idempotency_key=f"call-{i}"
            )
            assert again == spend
            with pytest.raises(NonceReplayed):
                await store.nonces.consume(nonce, "s")
            for turn_id in turn_ids:
                await store.turns.get_turn(turn_id)
        # Nothing half-written: every batch the child sent is all there or not at all.
        last = acked[-1][0]
        for i in range(1, last + 3):
            found = [await store.turns.get_turn_by_key(c, f"{i}-{k}") for c in (a, b) for k in range(3)]
            assert all(t is None for t in found) or all(t is not None for t in found), (i, found)
            if i <= last:
                assert all(t is not None for t in found)
        heads = [await store.turns.get_head(c) for c in (a, b)]
        assert heads[0].head_depth == heads[1].head_depth and heads[0].head_depth % 3 == 0
        report = await store.check()
        assert report.ok, report.problems


# -- bad input --------------------------------------------------------------------------------------


async def test_raw_mailbox_garbage_fails_alone_and_every_part_serves(store: PgStore) -> None:
    actors: list[Any] = store._pg_actors
    for actor in actors:
        with pytest.raises(InvalidInput, match="undecodable"):
            await actor.call_raw(b"\xc1 not msgpack")
    with pytest.raises(InvalidInput):
        await store.turns.append_turn(2**64, "t", b"x")
    with pytest.raises(InvalidInput):
        await store.budget.reserve("v\ud800", tokens=1)
    await store.budget.set_budget("v", tokens=1)
    with pytest.raises(BudgetExceeded):
        await store.budget.reserve("v", tokens=2)
    ctx = await store.turns.create_context()
    await store.turns.append_turn(ctx.context_id, "t", b"x")
    await store.budget.reserve("v", tokens=1)
    assert all(not a.closed for a in actors)
    report = await store.check()
    assert report.ok, report.problems
    assert (await store.budget.totals("v")).reserved_tokens == 1


async def test_durability_normal_and_full_both_store(pg_dsn: str, pg_schema: str) -> None:
    for durability in ("full", "normal"):
        async with await connect_pg(pg_dsn, schema=pg_schema, durability=durability) as store:  # type: ignore[arg-type]
            await store.budget.set_budget(durability, tokens=1)
    async with await connect_pg(pg_dsn, schema=pg_schema) as store:
        for durability in ("full", "normal"):
            await store.budget.reserve(durability, tokens=1)
            with pytest.raises(BudgetExceeded):
                await store.budget.reserve(durability, tokens=1)
            await store.budget.commit((await store.budget.list_reservations(durability))[0], Usage(1, 0, 0))


async def test_a_twin_committed_meanwhile_is_found_through_the_unique_index(store: PgStore, pg_dsn: str) -> None:
    """Another process's uncommitted reservation holds the key when ours inserts: our insert waits for
    it, meets the unique index, and the batch runs again and finds the twin: the key was used for
    other values, IdempotencyConflict (not a bare constraint error), and the ledger serves on."""
    await store.budget.set_budget("v", tokens=100)
    conn = await _raw(pg_dsn)
    try:
        await conn.execute(f'SET search_path TO "{store.schema}"')
        await conn.execute("BEGIN")
        await conn.execute(
            "INSERT INTO reservations (reservation_id, vendor, model, tokens, cost, created_at_ms, expires_at_ms, "
            "state, idempotency_key) VALUES ($1, 'x', '', 1, 0, 0, 9000000000000, 'held', 'step-1')",
            "f" * 32,
        )
        outcome: list[BaseException] = []

        async def reserve() -> None:
            try:
                await store.budget.reserve("v", tokens=5, idempotency_key="step-1")
            except BaseException as exc:
                outcome.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(reserve)
            await anyio.sleep(0.5)
            assert not outcome  # waiting on the other transaction's key
            await conn.execute("COMMIT")
    finally:
        await conn.close()
    assert len(outcome) == 1 and type(outcome[0]).__name__ == "IdempotencyConflict", outcome
    assert (await store.budget.totals("v")).reserved_tokens == 0
    await store.budget.reserve("v", tokens=5, idempotency_key="step-2")


# -- what one write costs: statements and round trips ----------------------------------------------


class _Statements:
    """Every statement the store's writer and read connections send, in order (``PgConn`` and
    ``PgActor.fetch`` wrapped), to check how many round trips a write costs."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from pforge_async.postgres import actor

        self.sent: list[str] = []
        for cls, names in ((actor.PgConn, ("execute", "fetch", "fetchrow", "fetchval")), (actor.PgActor, ("fetch",))):
            for name in names:
                monkeypatch.setattr(cls, name, self._wrap(getattr(cls, name)))

    def _wrap(self, method: Any) -> Any:
        sent = self.sent

        async def recorded(self: Any, sql: str, *args: Any) -> Any:
            sent.append(" ".join(sql.split()))
            return await method(self, sql, *args)

        return recorded

    def take(self) -> list[str]:
        taken, self.sent[:] = list(self.sent), []
        return taken


async def test_a_turns_refs_are_checked_in_its_own_write(store: PgStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A store's turn batch checks its turns' refs against the CAS in its first statement: no read of
    the CAS before the write, a missing ref fails only the command naming it (nothing of it stored,
    ObjectNotFound naming the first missing ref), the other appends of the batch land."""
    blobs = [await store.cas.write_blob(f"blob {i}".encode()) for i in range(8)]
    missing = sorted(["0" * 63 + "1", "f" * 64])
    async with await connect_pg(store._dsn, schema=store.schema) as other:
        ctx = await other.turns.create_context(name="refs")  # a context this store's writer never saw
    statements = _Statements(monkeypatch)
    turn = await store.turns.append_turn(ctx.context_id, "t", b"one", refs=blobs[:3])
    assert turn.refs == tuple(sorted(blobs[:3]))
    sent = statements.take()
    assert sent[0] == "BEGIN" and sent[-1] == "COMMIT" and len(sent) == 4, sent
    assert "cas_objects" in sent[1]  # the refs, read in the locking statement: no read before
    # Now its head is known: the next append is one statement, which checks the refs too.
    second = await store.turns.append_turn(ctx.context_id, "t", b"two", refs=blobs[3:5])
    sent = statements.take()
    assert len(sent) == 1 and "cas_objects" in sent[0] and "FOR UPDATE" in sent[0], sent
    assert second.parent_turn_id == turn.turn_id and second.depth == 2
    with pytest.raises(ObjectNotFound, match=missing[0]):
        await store.turns.append_turn(ctx.context_id, "t", b"three", refs=[blobs[0], *missing])
    assert (await store.turns.get_head(ctx.context_id)).head_turn_id == second.turn_id
    turn = second

    contexts = [await store.turns.create_context(name=f"refs-{i}") for i in range(8)]
    outcomes: dict[int, Any] = {}

    async def append(i: int) -> None:
        refs = [blobs[i], *missing] if i == 3 else [blobs[i]]
        try:
            outcomes[i] = await store.turns.append_turn(contexts[i].context_id, "t", b"x", refs=refs)
        except ObjectNotFound as exc:
            outcomes[i] = exc

    async with anyio.create_task_group() as tg:
        for i in range(8):
            tg.start_soon(append, i)
    assert isinstance(outcomes[3], ObjectNotFound) and missing[0] in str(outcomes[3])
    assert (await store.turns.get_head(contexts[3].context_id)).head_turn_id == 0
    for i in set(range(8)) - {3}:
        assert outcomes[i].refs == (blobs[i],)
        assert (await store.turns.get_head(contexts[i].context_id)).head_turn_id == outcomes[i].turn_id

    with pytest.raises(ObjectNotFound, match=missing[0]):
        await store.turns.append_turns(
            [
                NewTurn(ctx.context_id, "t", b"a", refs=(blobs[0],)),
                NewTurn(ctx.context_id, "t", b"b", refs=tuple(missing)),
            ]
        )
    assert (await store.turns.get_head(ctx.context_id)).head_turn_id == turn.turn_id  # nothing of the batch
    assert len(await store.turns.append_turns([NewTurn(ctx.context_id, "t", b"c", refs=tuple(blobs))])) == 1
    assert (await store.check()).ok


async def test_refs_older_than_the_freshen_age_are_freshened_by_the_write(pg_dsn: str, pg_schema: str) -> None:
    """With ``freshen_s=0`` every ref a write names is old: the write stamps it again in its own
    transaction (as ``has`` does), so a CAS gc keeps it; a ref whose row is gone is ObjectNotFound."""
    async with await connect_pg(pg_dsn, schema=pg_schema, durability="normal", freshen_s=0) as store:
        ctx = await store.turns.create_context(name="fresh")
        old, gone = await store.cas.write_blob(b"old"), await store.cas.write_blob(b"gone")
        conn = await _raw(pg_dsn)
        try:
            await conn.execute(f'SET search_path TO "{pg_schema}"')
            await conn.execute("UPDATE cas_objects SET touched_at = now() - interval '1 day'")
            await conn.execute("DELETE FROM cas_objects WHERE oid = $1", bytes.fromhex(gone))
            await store.turns.append_turn(ctx.context_id, "t", b"x", refs=[old])
            with pytest.raises(ObjectNotFound, match=gone):
                await store.turns.append_turn(ctx.context_id, "t", b"y", refs=[old, gone])
            age = await conn.fetchval(
                "SELECT extract(epoch FROM now() - touched_at) FROM cas_objects WHERE oid = $1", bytes.fromhex(old)
            )
        finally:
            await conn.close()
        assert age < 3600, age
        assert len(await store.turns.list_turns(ctx.context_id)) == 1


async def test_a_blob_write_is_one_statement_and_a_linking_write_a_transaction(
    store: PgStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Objects that link to nothing outside their batch (blobs) are one INSERT that commits by itself;
    a tree linking stored objects runs in a transaction that locks them (a gc cannot take them)."""
    statements = _Statements(monkeypatch)
    blob = await store.cas.write_blob(b"alone")
    sent = statements.take()
    assert len(sent) == 1 and sent[0].startswith("INSERT INTO") and "cas_objects" in sent[0], sent
    assert await store.cas.write_blob(b"alone") == blob  # again: the same row, still one statement
    assert len(statements.take()) == 1
    tree = await store.cas.write_tree([("f", 0o100644, blob)])
    sent = statements.take()
    sent = sent[sent.index("BEGIN") :]  # after write_tree's own read of the entries' types
    assert any("FOR KEY SHARE" in s for s in sent) and sent[-1] == "COMMIT", sent
    assert [e.oid for e in await store.cas.read_tree(tree)] == [blob]
    assert await store.cas.read_blob(blob) == b"alone"


async def test_plain_appends_on_known_heads_are_one_statement_and_yield_to_other_writers(
    store: PgStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An append to a context whose head this store's writer knows is one statement; when another
    store (another machine) moved the head, deleted the context or holds a stale expectation, that
    statement changes nothing and the append is decided the ordinary way: on the real head, or
    HeadConflict, or ContextNotFound, never a fork."""
    ctx = await store.turns.create_context(name="fast")
    statements = _Statements(monkeypatch)
    first = await store.turns.append_turn(ctx.context_id, "t", b"1")
    assert len(statements.take()) == 1 and store.turns.actor.fast_batches == 1
    async with await connect_pg(store._dsn, schema=store.schema) as other:
        theirs = await other.turns.append_turn(ctx.context_id, "t", b"2")  # behind our writer's back
        assert theirs.parent_turn_id == first.turn_id
        mine = await store.turns.append_turn(ctx.context_id, "t", b"3")
        assert mine.parent_turn_id == theirs.turn_id and mine.depth == 3
        assert len(statements.take()) > 1  # the fast statement found another head, then the ordinary way
        await other.turns.append_turn(ctx.context_id, "t", b"4")
        with pytest.raises(HeadConflict):
            await store.turns.append_turn(ctx.context_id, "t", b"5", expected_head=mine.turn_id)
        gone = await store.turns.create_context(name="gone")
        await store.turns.append_turn(gone.context_id, "t", b"x")
        await other.turns.delete_context(gone.context_id)
        with pytest.raises(ContextNotFound):
            await store.turns.append_turn(gone.context_id, "t", b"y")
    # 64 writers on contexts of their own: batches of fast appends, each chain whole.
    contexts = [await store.turns.create_context(name=f"w{i}") for i in range(64)]

    async def writer(context_id: int) -> None:
        for step in range(10):
            await store.turns.append_turn(context_id, "t", f"{context_id}-{step}".encode())

    async with anyio.create_task_group() as tg:
        for c in contexts:
            tg.start_soon(writer, c.context_id)
    for c in contexts:
        chain = await store.turns.list_turns(c.context_id, limit=20)
        assert [t.payload for t in chain] == [f"{c.context_id}-{step}".encode() for step in range(10)]
        assert [t.depth for t in chain] == list(range(1, 11))
    assert (await store.check()).ok


async def test_the_fast_path_forgetting_heads_and_nodes_only_costs_the_ordinary_way(
    store: PgStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With room for 3 heads and 5 nodes, appends round-robin over 8 contexts keep missing what the
    fast path needs: each then runs the ordinary way, and every chain is whole, skip links included."""
    from pforge_async.postgres import turns

    monkeypatch.setattr(turns, "_KNOWN_CONTEXTS", 3)
    monkeypatch.setattr(turns, "_KNOWN_NODES", 5)
    contexts = [(await store.turns.create_context(name=f"lru{i}")).context_id for i in range(8)]
    for step in range(12):
        async with anyio.create_task_group() as tg:
            for context_id in contexts[: 1 + step % 8]:
                tg.start_soon(store.turns.append_turn, context_id, "t", f"{context_id}-{step}".encode())
        await store.turns.append_turn(contexts[step % 8], "t", b"alone")  # just learned: known, if not forgotten
    assert 0 < store.turns.actor.fast_batches < store.turns.actor.batches
    for context_id in contexts:
        head = await store.turns.get_head(context_id)
        chain = await store.turns.list_turns(context_id, limit=50)
        assert len(chain) == head.head_depth and [t.depth for t in chain] == list(range(1, head.head_depth + 1))
    assert (await store.check()).ok
