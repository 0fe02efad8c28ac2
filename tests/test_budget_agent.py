"""Budgets that survive crashes: idempotent reserves (across processes), tags and totals by tag,
list_reservations and extend, a commit after expiry recorded as overdrawn, the v1 -> v2 migration,
and the recorder charging each assistant turn exactly once."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import anyio
import pytest

from pforge_async import (
    BudgetExceeded,
    Conflict,
    IdempotencyConflict,
    InvalidInput,
    NotFound,
    PersistenceError,
    Usage,
    open_store,
)
from pforge_async.agent import SessionRecorder

from ._procs import ROOT, run_all, spawn

pytestmark = pytest.mark.anyio

RESERVER = """
import json, sys, anyio
from pforge_async import open_store
async def main():
    async with open_store(sys.argv[1]) as store:
        got = []
        async def one():
            r = await store.budget.reserve("v", tokens=100, cost=7, idempotency_key="step-1", tags={"agent": "a"})
            got.append(r.reservation_id)
        async with anyio.create_task_group() as tg:
            for _ in range(8):
                tg.start_soon(one)
    print(json.dumps(got))
anyio.run(main)
"""


async def test_four_processes_reserving_with_one_key_get_one_reservation(tmp_path: Path) -> None:
    root = tmp_path / ".pforge"
    async with open_store(root) as store:
        await store.budget.set_budget("v", tokens=150)  # room for one reservation, not two
    outs = run_all([spawn(RESERVER, root) for _ in range(4)], timeout=300)
    ids = {rid for out in outs for rid in json.loads(out)}
    assert len(ids) == 1
    async with open_store(root) as store:
        (held,) = await store.budget.list_reservations()
        assert held.reservation_id in ids and held.tags == {"agent": "a"} and held.idempotency_key == "step-1"
        assert (await store.budget.totals("v")).reserved_tokens == 100
        assert (await store.check()).ok


async def test_a_retried_reserve_returns_the_same_reservation_whatever_its_state(tmp_path: Path) -> None:
    async with open_store(tmp_path / ".pforge", durability="normal") as store:
        budget = store.budget
        await budget.set_budget("v", tokens=1000, cost=1000)
        first = await budget.reserve("v", tokens=600, cost=10, model="m", idempotency_key="k", tags={"a": "1"})
        again = await budget.reserve("v", tokens=600, cost=10, model="m", idempotency_key="k", tags={"a": "1"})
        assert again == first  # no second hold: 600 + 600 would not fit
        for other in (dict(tokens=601), dict(cost=11), dict(model="n"), dict(tags={"a": "2"}), dict(tags=None)):
            args = dict(tokens=600, cost=10, model="m", idempotency_key="k", tags={"a": "1"}) | other
            with pytest.raises(IdempotencyConflict, match="'k'"):
                await budget.reserve("v", **args)  # type: ignore[arg-type]
        spent = await budget.commit(first, Usage(100, 50, 5))
        after = await budget.reserve("v", tokens=600, cost=10, model="m", idempotency_key="k", tags={"a": "1"})
        assert after.reservation_id == first.reservation_id and after.state == "committed"
        assert await budget.commit(after, Usage(100, 50, 5)) == spent  # and its commit is the same
        assert not spent.late and not spent.overdrawn


async def test_tags_filter_totals_and_equal_the_sum_of_their_spend_rows(tmp_path: Path) -> None:
    root = tmp_path / ".pforge"
    async with open_store(root, durability="normal") as store:
        budget = store.budget
        await budget.set_budget("v", tokens=10**9)
        expected: dict[tuple[str, str], list[int]] = {}
        for i in range(30):
            tags = {"session": f"s{i % 3}", "agent": f"a{i % 5}"}
            if i % 2:
                held = await budget.reserve("v", tokens=1000, cost=100, tags=tags)
                await budget.commit(held, Usage(i, 2 * i, i))
            else:
                await budget.record_spend("v", "m", input_tokens=i, output_tokens=2 * i, cost=i, tags=tags)
            for tag in tags.items():
                expected.setdefault(tag, []).append(i)
        await budget.reserve("v", tokens=7, cost=3, tags={"session": "s0"})  # held, not spent
        for (tag, value), spends in expected.items():
            totals = await budget.totals("v", tags={tag: value})
            assert (totals.input_tokens, totals.output_tokens, totals.cost) == (
                sum(spends),
                2 * sum(spends),
                sum(spends),
            )
        both = await budget.totals("v", tags={"session": "s1", "agent": "a1"})
        assert both.cost == sum(i for i in range(30) if i % 3 == 1 and i % 5 == 1)
        s0 = await budget.totals("v", tags={"session": "s0"})
        assert (s0.reserved_tokens, s0.reserved_cost) == (7, 3)
        assert (await budget.totals("v", tags={"session": "none"})).cost == 0
        everything = await budget.totals("v")
    # The same sums, straight from the database's spend rows and their tags.
    conn = sqlite3.connect(root / "budget.db")
    try:
        for (tag, value), spends in expected.items():
            (cost,) = conn.execute(
                "SELECT SUM(cost) FROM spend JOIN spend_tags USING (spend_id) WHERE tag = ? AND value = ?",
                (tag, value),
            ).fetchone()
            assert cost == sum(spends)
        assert conn.execute("SELECT SUM(cost) FROM spend").fetchone()[0] == everything.cost
    finally:
        conn.close()


async def test_a_commit_after_expiry_is_recorded_and_reported_over_the_limit(tmp_path: Path) -> None:
    async with open_store(tmp_path / ".pforge", durability="normal") as store:
        budget = store.budget
        await budget.set_budget("v", tokens=100, cost=50)
        late = await budget.reserve("v", tokens=80, cost=40, ttl_s=0.05, tags={"agent": "slow"})
        await anyio.sleep(0.2)
        (expired,) = await budget.list_reservations("v")
        assert expired.state == "expired" and expired.reservation_id == late.reservation_id
        other = await budget.reserve("v", tokens=90, cost=30)  # the room the expired one held
        spent = await budget.commit(late, Usage(50, 20, 35))  # the call did happen: recorded
        assert spent.late and spent.overdrawn
        # spent 0 + held 90 + 70 = 160 tokens against 100: over by 60; cost 0 + 30 + 35 vs 50: 15.
        assert (spent.over_tokens, spent.over_cost) == (60, 15)
        assert await budget.commit(late, Usage(50, 20, 35)) == spent
        totals = await budget.totals("v")
        assert (totals.tokens, totals.cost, totals.over_tokens, totals.over_cost) == (70, 35, 60, 15)
        assert totals.overdrawn and (await budget.totals("v", tags={"agent": "slow"})).over_tokens == 60
        await budget.release(other)
        # Within the limit after expiry: late, not over.
        quiet = await budget.reserve("v", tokens=10, cost=1, ttl_s=0.05)
        await anyio.sleep(0.2)
        within = await budget.commit(quiet, Usage(5, 0, 1))
        assert within.late and not within.overdrawn
        # record_spend refuses past the limit, unless the spend happened already.
        with pytest.raises(BudgetExceeded):
            await budget.record_spend("v", "m", input_tokens=100, output_tokens=0, cost=0)
        await budget.record_spend("v", "m", input_tokens=100, output_tokens=0, cost=0, allow_overdraw=True)
        assert (await budget.totals("v")).over_tokens == 60 + 75  # 75 spent, then 100 more: 75 past 100
        assert (await store.check()).ok


async def test_list_reservations_and_extend(tmp_path: Path) -> None:
    async with open_store(tmp_path / ".pforge", durability="normal") as store:
        budget = store.budget
        await budget.set_budget("v", tokens=100)
        await budget.set_budget("w", tokens=100)
        a = await budget.reserve("v", tokens=60, ttl_s=0.05, tags={"agent": "a"})
        b = await budget.reserve("w", tokens=10, tags={"agent": "b"})
        # Oldest first (two made in the same millisecond come in id order).
        assert {r.reservation_id for r in await budget.list_reservations()} == {a.reservation_id, b.reservation_id}
        assert [r.reservation_id for r in await budget.list_reservations("w")] == [b.reservation_id]
        assert [r.reservation_id for r in await budget.list_reservations(tags={"agent": "a"})] == [a.reservation_id]
        assert await budget.list_reservations(limit=1) == (await budget.list_reservations())[:1]
        await anyio.sleep(0.2)
        taker = await budget.reserve("v", tokens=50)  # a's room, now that it expired
        with pytest.raises(BudgetExceeded):
            await budget.extend(a, 60)  # expired: held again only if there is room
        await budget.release(taker)
        extended = await budget.extend(a, 60)
        assert extended.state == "held" and extended.expires_at_ms > a.expires_at_ms
        assert (await budget.totals("v")).reserved_tokens == 60
        live = await budget.extend(b, 600)  # a live one needs no room check
        assert live.expires_at_ms > b.expires_at_ms
        assert (await budget.extend(b, 1)).expires_at_ms == live.expires_at_ms  # never shortened
        await budget.commit(b, Usage(1, 1, 0))
        with pytest.raises(Conflict, match="committed"):
            await budget.extend(b, 60)
        await budget.release(a)
        with pytest.raises(Conflict, match="released"):
            await budget.extend(a, 60)
        assert await budget.list_reservations() == []
        with pytest.raises(NotFound):
            await budget.extend("0" * 32, 1)
        for bad in (
            dict(tags={"k": 1}),
            dict(tags={"": "v"}),
            dict(tags=[("k", "v")]),
            dict(tags={f"t{i}": "v" for i in range(17)}),
        ):
            with pytest.raises(InvalidInput):
                await budget.reserve("v", tokens=1, **bad)  # type: ignore[arg-type]
            with pytest.raises(InvalidInput):
                await budget.totals("v", **bad)  # type: ignore[arg-type]
        for bad_limit in (0, 10_001, True, 1.5):
            with pytest.raises(InvalidInput):
                await budget.list_reservations(limit=bad_limit)  # type: ignore[arg-type]
        with pytest.raises(InvalidInput):
            await budget.extend(a, 0)
        assert await budget.find_reservation("nope") is None


V1_BUDGET = """
CREATE TABLE budgets (vendor TEXT NOT NULL, window TEXT NOT NULL CHECK (window IN ('total', 'day')),
    token_limit INTEGER CHECK (token_limit >= 0), cost_limit INTEGER CHECK (cost_limit >= 0),
    updated_at_ms INTEGER NOT NULL, PRIMARY KEY (vendor, window)) WITHOUT ROWID;
CREATE TABLE reservations (reservation_id TEXT PRIMARY KEY, vendor TEXT NOT NULL, model TEXT NOT NULL,
    tokens INTEGER NOT NULL CHECK (tokens >= 0), cost INTEGER NOT NULL CHECK (cost >= 0),
    created_at_ms INTEGER NOT NULL, expires_at_ms INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('held', 'committed', 'released'))) WITHOUT ROWID;
CREATE INDEX reservations_held ON reservations (vendor, state, expires_at_ms);
CREATE TABLE spend (spend_id INTEGER PRIMARY KEY, vendor TEXT NOT NULL, model TEXT NOT NULL,
    input_tokens INTEGER NOT NULL CHECK (input_tokens >= 0), output_tokens INTEGER NOT NULL CHECK (output_tokens >= 0),
    cost INTEGER NOT NULL CHECK (cost >= 0), idempotency_key TEXT UNIQUE, reservation_id TEXT,
    recorded_at_ms INTEGER NOT NULL);
CREATE INDEX spend_vendor_time ON spend (vendor, recorded_at_ms);
CREATE TABLE spend_totals (vendor TEXT PRIMARY KEY, tokens INTEGER NOT NULL, cost INTEGER NOT NULL) WITHOUT ROWID;
INSERT INTO budgets VALUES ('v', 'total', 1000, NULL, 1);
INSERT INTO reservations VALUES ('aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa', 'v', 'm', 100, 0, 1, 4102444800000, 'held');
INSERT INTO reservations VALUES ('bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb', 'v', 'm', 50, 0, 1, 2, 'committed');
INSERT INTO spend VALUES (1, 'v', 'm', 20, 10, 0, NULL, 'bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb', 2);
INSERT INTO spend_totals VALUES ('v', 30, 0);
PRAGMA user_version = 1;
"""


async def test_a_version_1_budget_database_is_migrated_forward(tmp_path: Path) -> None:
    root = tmp_path / ".pforge"
    async with open_store(root):
        pass  # a whole store, whose budget database is then put back at version 1
    for name in ("budget.db", "budget.db-wal", "budget.db-shm"):
        (root / name).unlink(missing_ok=True)
    conn = sqlite3.connect(root / "budget.db")
    conn.executescript(V1_BUDGET)
    conn.close()
    async with open_store(root) as store:
        budget = store.budget
        totals = await budget.totals("v")
        assert (totals.tokens, totals.reserved_tokens, totals.over_tokens) == (30, 100, 0)
        (old,) = await budget.list_reservations()
        assert (old.reservation_id, old.tags, old.idempotency_key) == ("a" * 32, {}, None)
        spent = await budget.commit(old, Usage(40, 0, 0))
        assert spent.reservation_id == "a" * 32 and not spent.late
        new = await budget.reserve("v", tokens=10, idempotency_key="k", tags={"agent": "x"})
        assert await budget.find_reservation("k") == new
        assert (await store.check()).ok
    conn = sqlite3.connect(root / "budget.db")
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
    finally:
        conn.close()


# -- the recorder's charges ------------------------------------------------------------------------


async def test_the_recorder_charges_each_assistant_turn_once_and_releases_what_it_left(tmp_path: Path) -> None:
    async with open_store(tmp_path / ".pforge", durability="normal") as store:
        budget = store.budget
        await budget.set_budget("v", tokens=10_000)
        rec = await SessionRecorder.start(store, "s", mode="required")
        held = await rec.reserve_budget("v", tokens=1000, model="m")
        assert held is not None and held.tags == {"session": "s", "agent": "s"}
        await rec.event("retrying the model")  # other hooks between: still this turn's reservation
        await rec.assistant_turn("a", usage=Usage(10, 20, 0), vendor="v")
        await rec.assistant_turn("b", usage=Usage(1, 2, 0), vendor="v")  # unreserved: recorded as spend
        child = await rec.spawn_subagent("kid")
        await child.reserve_budget("v", tokens=500)  # never used
        await rec.reserve_budget("v", tokens=300)  # never used
        assert len(await budget.list_reservations()) == 2
        await child.close()
        assert [r.tags["agent"] for r in await budget.list_reservations()] == ["s"]
        await rec.session_end()
        assert await budget.list_reservations() == []
        assert (await budget.totals("v")).tokens == 33
        assert (await budget.totals("v", tags={"agent": "s"})).tokens == 33
        # Over the budget: BudgetExceeded reaches the loop in every mode.
        for mode in ("best_effort", "required"):
            loose = await SessionRecorder.start(store, f"over-{mode}", mode=mode)  # type: ignore[arg-type]
            with pytest.raises(BudgetExceeded):
                await loose.reserve_budget("v", tokens=20_000)
            assert loose.failures == []
        # Other failures follow the mode.
        nobudget = await SessionRecorder.start(store, "nb")
        assert await nobudget.reserve_budget("unknown-vendor", tokens=1) is None
        assert isinstance(nobudget.failures[0].error, NotFound)
        with pytest.raises(PersistenceError):
            await (await SessionRecorder.start(store, "nb2", mode="required")).reserve_budget("unknown", tokens=1)


async def test_a_replayed_turn_commits_a_reservation_an_interrupted_run_left(tmp_path: Path) -> None:
    """The crash windows of one assistant turn, made by hand: after the reserve, and after the turn."""
    async with open_store(tmp_path / ".pforge", durability="normal") as store:
        budget = store.budget
        await budget.set_budget("v", tokens=10_000)
        first = await SessionRecorder.start(store, "w", mode="required")
        await first.reserve_budget("v", tokens=1000)
        # (killed here: reserved, no turn) -- the re-run reserves again and gets the same one
        second = await SessionRecorder.start(store, "w", mode="required")
        again = await second.reserve_budget("v", tokens=1000)
        (held,) = await budget.list_reservations()
        assert again is not None and again.reservation_id == held.reservation_id
        # The turn is written and the run killed before its commit: made by writing the turn through
        # a recorder on the turn store alone, which charges no budget.
        partial = await SessionRecorder.start(store.turns, "w", mode="required")
        await partial.assistant_turn("a", usage=Usage(10, 20, 0), vendor="v")
        assert len(await budget.list_reservations()) == 1
        third = await SessionRecorder.start(store, "w", mode="required")
        assert third.replaying
        await third.assistant_turn("a", usage=Usage(10, 20, 0), vendor="v")  # replayed: commits it
        assert await budget.list_reservations() == []
        fourth = await SessionRecorder.start(store, "w", mode="required")
        await fourth.assistant_turn("a", usage=Usage(10, 20, 0), vendor="v")
        await fourth.session_end()
        totals = await budget.totals("v")
        assert (totals.tokens, totals.reserved_tokens) == (30, 0)


def test_the_budget_schema_files_agree() -> None:
    """A fresh v2 database and a migrated v1 one have the same tables, columns and indexes."""
    sql = ROOT / "pforge_async" / "sqlite"

    def shape(conn: sqlite3.Connection) -> list[tuple[str, str]]:
        out = []
        for kind, name, table in conn.execute("SELECT type, name, tbl_name FROM sqlite_master ORDER BY name"):
            cols = [row[1:3] for row in conn.execute(f"PRAGMA table_info('{table}')")] if kind == "table" else []
            out.append((f"{kind} {name}", repr(cols)))
        return out

    fresh = sqlite3.connect(":memory:")
    fresh.executescript((sql / "budget_ledger_schema.sql").read_text())
    migrated = sqlite3.connect(":memory:")
    migrated.executescript(V1_BUDGET)
    migrated.executescript((sql / "budget_ledger_v2.sql").read_text())
    try:
        assert shape(fresh) == shape(migrated)
    finally:
        fresh.close()
        migrated.close()
