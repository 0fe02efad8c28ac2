"""The ledgers' contract, run against every backend: the embedded SQLite store and PostgreSQL.

tests/test_ledgers.py has no class to subclass (its tests open SQLite stores themselves and read the
database files), so the contract lives here as :class:`LedgerContract`, whose ``store`` fixture is
parametrized over the backends: each test runs once per backend, through the public API only. The
multi-process tests say the same across processes (each process its own store on the one server or
directory): every nonce consumed once, no budget overdrawn, one transition per idempotency key.
"""

from __future__ import annotations

import datetime as dt
import enum
import json
import math
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from pforge_async import (
    BudgetExceeded,
    Conflict,
    IdempotencyConflict,
    InvalidInput,
    NonceExpired,
    NonceReplayed,
    NonceUnknown,
    NotFound,
    Store,
)
from pforge_async.actor import Failed
from pforge_async.ledgers import Usage
from pforge_async.ledgers.budget import SetBudget
from pforge_async.ledgers.constellation import RecordTransition
from pforge_async.postgres.store import connect_pg

from ._procs import run_all, spawn

pytestmark = pytest.mark.anyio

BACKENDS = ["sqlite", "postgres"]


def _target(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where a test's store lives, as the child processes below take it: a directory, or dsn#schema."""
    if request.param == "sqlite":
        return str(tmp_path / ".pforge")
    dsn = request.getfixturevalue("pg_dsn")
    schema = request.getfixturevalue("pg_schema")
    return f"{dsn}#{schema}"


async def open_target(target: str) -> Store:
    if target.startswith("postgresql://"):
        dsn, schema = target.split("#")
        return await connect_pg(dsn, schema=schema, durability="normal")
    from pforge_async import connect

    return await connect(target, durability="normal", watch_workspaces=False)


@pytest.fixture(params=BACKENDS)
def target(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return _target(request, tmp_path)


@pytest.fixture
async def store(target: str) -> AsyncIterator[Store]:
    opened = await open_target(target)
    async with opened:
        yield opened


# The children open their store the way open_target does.
OPEN = """
import sys, anyio
from pforge_async import connect
from pforge_async.postgres.store import connect_pg
async def open_target(target):
    if target.startswith("postgresql://"):
        dsn, schema = target.split("#")
        return await connect_pg(dsn, schema=schema)
    return await connect(target, watch_workspaces=False)
"""


class Vendor(str, enum.Enum):
    ACME = "acme"


class Tokens(enum.IntEnum):
    FEW = 3


class LedgerContract:
    """Every test takes ``store``: an open store of one backend (a subclass may override the fixture)."""

    # -- constellation memory -----------------------------------------------------------------------

    async def test_action_stats_always_equal_the_aggregate_of_transitions(self, store: Store) -> None:
        rng = random.Random(7)
        first_use: dict[str, tuple[str, str, float, bool]] = {}
        expected: dict[tuple[str, str], list[float]] = {}

        async def record(i: int) -> None:
            state, action = rng.choice(["s0", "s1\x00"]), rng.choice(["left", "right", "wait"])
            reward, success = rng.uniform(-10, 10), rng.random() < 0.5
            key = rng.choice([None, None, "k1", "k2", "k3"])
            values = (state, action, reward, success)
            if key is not None and key in first_use and first_use[key] != values:
                with pytest.raises(IdempotencyConflict):
                    await store.memory.record_transition(state, action, "n", reward, success, idempotency_key=key)
                return
            if key is not None and key in first_use:
                await store.memory.record_transition(state, action, "n", reward, success, idempotency_key=key)
                return
            if key is not None:
                first_use[key] = values
            await store.memory.record_transition(state, action, "n", reward, success, idempotency_key=key)
            sums = expected.setdefault((state, action), [0, 0, 0.0])
            sums[0] += 1
            sums[1] += success
            sums[2] += reward

        # Concurrent callers: their commands share batches (one transaction each).
        for start in range(0, 120, 40):
            async with anyio.create_task_group() as tg:
                for i in range(start, start + 40):
                    tg.start_soon(record, i)
        for (state, action), (count, successes, reward_sum) in expected.items():
            (found,) = [s for s in await store.memory.stats(state) if s.action == action]
            assert (found.count, found.successes) == (count, successes)
            assert math.isclose(found.reward_sum, reward_sum, rel_tol=1e-9, abs_tol=1e-9)
        assert len(await store.memory.stats("s0")) + len(await store.memory.stats("s1\x00")) == len(expected)
        report = await store.check()
        assert report.ok, report.problems

    async def test_best_action_tries_everything_then_converges(self, store: Store) -> None:
        rng = random.Random(3)
        odds = {"a": 0.2, "b": 0.5, "c": 0.8}
        chosen: list[str] = []
        assert await store.memory.best_action("start") is None
        for _ in range(300):
            action = await store.memory.best_action("start", ["a", "b", "c"])
            assert action is not None
            chosen.append(action)
            win = rng.random() < odds[action]
            await store.memory.record_transition("start", action, "end", 1.0 if win else 0.0, win)
        stats = {s.action: s for s in await store.memory.stats("start")}
        assert chosen[:3] == ["a", "b", "c"]
        assert stats["c"].count > stats["a"].count
        assert sum(s.count for s in stats.values()) == 300

    async def test_constellation_bad_input(self, store: Store) -> None:
        memory = store.memory
        first = await memory.record_transition("s", "a", "t", 0.5, True, context={"turn": 3}, idempotency_key="k")
        assert (
            await memory.record_transition("s", "a", "t", 0.5, True, context={"turn": 3}, idempotency_key="k") == first
        )
        for bad in (dict(reward=float("nan")), dict(reward="1"), dict(success=1), dict(state=""), dict(action=3)):
            args = {"state": "s", "action": "a", "next_state": "t", "reward": 0.5, "success": True} | bad
            with pytest.raises(InvalidInput):
                await memory.record_transition(**args)  # type: ignore[arg-type]
        with pytest.raises(IdempotencyConflict):
            await memory.record_transition("s", "a", "t", 0.7, True, idempotency_key="k")
        with pytest.raises(InvalidInput, match="candidates"):
            await memory.best_action("s", "a")
        (only,) = await memory.stats("s")
        assert (only.count, only.reward_sum) == (1, 0.5)

    async def test_stats_are_in_code_point_order(self, store: Store) -> None:
        actions = ["b", "a\x00", "a", "A", "é", "a\x01", "z", "\x00"]
        for action in actions:
            await store.memory.record_transition("s", action, "t", 0.0, False)
        assert [s.action for s in await store.memory.stats("s")] == sorted(actions)

    # -- nonces -------------------------------------------------------------------------------------

    async def test_nonces_are_honoured_once(self, store: Store) -> None:
        nonces = store.nonces
        first, second = await nonces.issue("tool:shell", 60), await nonces.issue("tool:shell", 60)
        assert first != second and len(first) == 43
        with pytest.raises(InvalidInput, match="subject"):
            await nonces.consume(first, "tool:other")
        await nonces.consume(first, "tool:shell")  # a wrong subject did not burn it
        with pytest.raises(NonceReplayed):
            await nonces.consume(first, "tool:shell")
        with pytest.raises(NonceUnknown):
            await nonces.consume("A" * 43, "tool:shell")
        for malformed in ("short", "../../etc/passwd" + "x" * 27, 42, "A" * 44):
            with pytest.raises(InvalidInput, match="malformed"):
                await nonces.consume(malformed, "tool:shell")  # type: ignore[arg-type]
        for bad_ttl in (0, -1, float("inf"), "10"):
            with pytest.raises(InvalidInput, match="ttl_s"):
                await nonces.issue("tool:shell", bad_ttl)  # type: ignore[arg-type]
        short = await nonces.issue("tool:shell", 0.05)
        await anyio.sleep(0.1)
        with pytest.raises(NonceExpired):
            await nonces.consume(short, "tool:shell")
        used = await nonces.issue("tool:shell", 0.05)
        await nonces.consume(used, "tool:shell")
        await anyio.sleep(0.1)
        assert await nonces.purge_expired() == 2
        for purged in (short, used):
            with pytest.raises(NonceUnknown):
                await nonces.consume(purged, "tool:shell")
        await nonces.consume(second, "tool:shell")

    async def test_64_tasks_race_for_each_nonce(self, store: Store) -> None:
        issued = [await store.nonces.issue("s", 600) for _ in range(50)]
        wins: list[str] = []

        async def consumer(offset: int) -> None:
            for i in range(len(issued)):
                nonce = issued[(i + offset) % len(issued)]
                try:
                    await store.nonces.consume(nonce, "s")
                    wins.append(nonce)
                except NonceReplayed:
                    pass

        async with anyio.create_task_group() as tg:
            for t in range(64):
                tg.start_soon(consumer, t * 7)
        assert sorted(wins) == sorted(issued)

    # -- budget -------------------------------------------------------------------------------------

    async def test_reserve_commit_release_and_totals(self, store: Store) -> None:
        budget = store.budget
        await budget.set_budget("anthropic", tokens=1000, cost=2_000_000)
        held = await budget.reserve("anthropic", tokens=700, cost=1_000_000, model="claude")
        with pytest.raises(BudgetExceeded) as info:
            await budget.reserve("anthropic", tokens=400)
        message = str(info.value)
        assert "limit 1000" in message and "reserved 700" in message and "asked 400" in message
        spent = await budget.commit(held, Usage(input_tokens=300, output_tokens=200, cost=600_000))
        assert await budget.commit(held, Usage(300, 200, 600_000)) == spent  # idempotent
        with pytest.raises(Conflict):
            await budget.commit(held, Usage(300, 201, 600_000))
        totals = await budget.totals("anthropic")
        assert (totals.input_tokens, totals.output_tokens, totals.cost, totals.reserved_tokens) == (
            300,
            200,
            600_000,
            0,
        )
        assert all(type(v) is int for v in (totals.input_tokens, totals.cost, totals.reserved_cost))
        again = await budget.reserve("anthropic", tokens=500)  # 500 spent + 500 held = the limit
        with pytest.raises(BudgetExceeded):
            await budget.reserve("anthropic", tokens=1)
        await budget.release(again)
        with pytest.raises(Conflict):
            await budget.commit(again, Usage(1, 0, 0))
        await budget.reserve("anthropic", tokens=500)
        with pytest.raises(BudgetExceeded, match="cost"):
            await budget.record_spend("anthropic", "claude", input_tokens=0, output_tokens=0, cost=1_500_000)
        assert (await budget.totals("anthropic", since=time.time() + 60)).cost == 0
        report = await store.check()
        assert report.ok, report.problems

    async def test_idempotent_reserve_tags_extend_and_listing(self, store: Store) -> None:
        budget = store.budget
        await budget.set_budget("v", tokens=100, window="day")
        tags = {"session": "s1", "agent": "a\x00"}
        first = await budget.reserve("v", tokens=40, ttl_s=60, idempotency_key="step-1", tags=tags)
        assert await budget.reserve("v", tokens=40, ttl_s=60, idempotency_key="step-1", tags=tags) == first
        with pytest.raises(IdempotencyConflict):
            await budget.reserve("v", tokens=41, idempotency_key="step-1", tags=tags)
        assert await budget.find_reservation("step-1") == first
        assert await budget.find_reservation("step-2") is None
        other = await budget.reserve("v", tokens=10, tags={"session": "s2"})
        assert [r.reservation_id for r in await budget.list_reservations("v", tags={"session": "s1"})] == [
            first.reservation_id
        ]
        assert {r.reservation_id for r in await budget.list_reservations()} == {
            first.reservation_id,
            other.reservation_id,
        }
        extended = await budget.extend(first, 600)
        assert extended.expires_at_ms > first.expires_at_ms and extended.state == "held"
        spent = await budget.commit(first, Usage(10, 5, 0))
        assert (await budget.totals("v", tags={"agent": "a\x00"})).tokens == 15
        assert (await budget.totals("v", tags={"session": "s2"})).reserved_tokens == 10
        assert not spent.late
        with pytest.raises(Conflict):
            await budget.extend(first, 60)
        report = await store.check()
        assert report.ok, report.problems

    async def test_expired_reservations_stop_counting_and_are_purged(self, store: Store) -> None:
        budget = store.budget
        await budget.set_budget("v", tokens=100, window="day")
        short = await budget.reserve("v", tokens=100, ttl_s=0.05)
        gone = await budget.reserve("v", tokens=0, ttl_s=0.05)
        await anyio.sleep(0.1)
        await budget.reserve("v", tokens=100)
        # The spend happened: it is recorded (never refused), and reported as over the limit.
        spent = await budget.commit(short, Usage(1, 1, 0))
        assert spent.late and (spent.over_tokens, spent.over_cost) == (2, 0)
        assert (await budget.totals("v")).over_tokens == 2
        assert await budget.purge_expired() == 1  # the committed one stays with its spend
        with pytest.raises(NotFound):
            await budget.release(gone)
        assert await budget.commit(short, Usage(1, 1, 0)) == spent
        report = await store.check()
        assert report.ok, report.problems

    async def test_budget_bad_input_stores_nothing(self, store: Store) -> None:
        budget = store.budget
        with pytest.raises(NotFound, match="no budget"):
            await budget.reserve("unknown-vendor", tokens=1)
        await budget.set_budget("v", tokens=100, cost=100)
        for kwargs in (dict(tokens=-1), dict(cost=-5), dict(cost=1.5), dict(tokens=True), dict(tokens="3")):
            with pytest.raises(InvalidInput):
                await budget.reserve("v", **kwargs)  # type: ignore[arg-type]
            with pytest.raises(InvalidInput):
                await budget.set_budget("v", **kwargs)  # type: ignore[arg-type]
        with pytest.raises(InvalidInput, match="window"):
            await budget.set_budget("v", tokens=1, window="week")  # type: ignore[arg-type]
        held = await budget.reserve("v", tokens=10, cost=10)
        with pytest.raises(InvalidInput, match="over reservation"):
            await budget.commit(held, Usage(8, 8, 1))
        with pytest.raises(InvalidInput, match="malformed reservation"):
            await budget.commit("../x", Usage(1, 1, 1))
        with pytest.raises(InvalidInput):
            await budget.commit(held, Usage(1, 1, 0.5))  # type: ignore[arg-type]
        with pytest.raises(NotFound):
            await budget.release("0" * 32)
        totals = await budget.totals("v")
        assert (totals.tokens, totals.cost, totals.reserved_tokens, totals.reserved_cost) == (0, 0, 10, 10)

    async def test_64_tasks_never_overdraw_a_budget(self, store: Store) -> None:
        budget = store.budget
        await budget.set_budget("shared", tokens=5_000, cost=100_000)
        rng = random.Random(11)
        committed = [0, 0]
        refused = 0

        async def task() -> None:
            nonlocal refused
            for _ in range(10):
                tokens, cost = rng.randint(50, 300), rng.randint(1, 5000)
                try:
                    held = await budget.reserve("shared", tokens=tokens, cost=cost)
                except BudgetExceeded:
                    refused += 1
                    continue
                used = Usage(rng.randint(0, tokens // 2), rng.randint(0, tokens // 2), rng.randint(0, cost))
                await budget.commit(held, used)
                committed[0] += used.tokens
                committed[1] += used.cost

        async with anyio.create_task_group() as tg:
            for _ in range(64):
                tg.start_soon(task)
        totals = await budget.totals("shared")
        assert refused > 0
        assert (totals.tokens, totals.cost) == tuple(committed)
        assert totals.tokens <= 5_000 and totals.cost <= 100_000

    # -- hostile arguments --------------------------------------------------------------------------

    async def test_ledger_arguments_out_of_range_are_invalid_input(self, store: Store) -> None:
        memory, nonces, budget = store.memory, store.nonces, store.budget
        await budget.set_budget("v")
        held = await budget.reserve("v", tokens=1)
        lone = "ok\ud800"
        calls: list[Any] = [
            lambda: memory.record_transition("s", "a", "t", 1e200, True),
            lambda: memory.record_transition("s", "a", "t", math.inf, True),
            lambda: memory.best_action("s", exploration=math.nan),
            lambda: nonces.issue("subj", 1e16),
            lambda: budget.set_budget("v", tokens=2**63),
            lambda: budget.reserve("v", cost=2**63),
            lambda: budget.reserve("v", ttl_s=math.inf),
            lambda: budget.record_spend("v", "m", input_tokens=2**63, output_tokens=0, cost=0),
            lambda: budget.commit(held, Usage(0, 0, 2**63)),
            lambda: budget.totals("v", since=math.nan),
            lambda: budget.totals("v", since=dt.datetime.min),
            lambda: memory.record_transition(lone, "a", "t", 0.5, True),
            lambda: memory.stats(lone),
            lambda: nonces.issue(lone, 60),
            lambda: nonces.consume("A" * 43, lone),
            lambda: budget.reserve(lone),
            lambda: budget.record_spend("v", lone, input_tokens=1, output_tokens=1, cost=1),
            lambda: budget.totals(lone),
        ]
        for call in calls:
            with pytest.raises(InvalidInput):
                await call()
        assert await memory.stats("s") == []
        assert (await budget.totals("v")).cost == 0
        await memory.record_transition("s", "a", "t", -1e100, True)  # the bounds themselves are accepted
        await budget.reserve("v", ttl_s=1e15)
        report = await store.check()
        assert report.ok, report.problems

    async def test_spent_and_held_never_pass_64_bits(self, store: Store) -> None:
        budget = store.budget
        await budget.set_budget("v")
        await budget.record_spend("v", "m", input_tokens=2**62, output_tokens=0, cost=2**62)
        held = await budget.reserve("v", tokens=2**62 - 1)  # spent + held = 2**63 - 1: the most
        with pytest.raises(InvalidInput, match=r"2\*\*63-1"):
            await budget.reserve("v", tokens=1)
        with pytest.raises(InvalidInput, match="cost"):
            await budget.record_spend("v", "m", input_tokens=0, output_tokens=0, cost=2**62)
        await budget.commit(held, Usage(2**62 - 2, 1, 0))
        totals = await budget.totals("v")
        assert (totals.tokens, totals.cost, totals.reserved_tokens) == (2**63 - 1, 2**62, 0)
        report = await store.check()
        assert report.ok, report.problems

    async def test_a_command_past_the_facade_fails_only_its_caller(self, store: Store) -> None:
        memory_actor: Any = store.memory._actor
        budget_actor: Any = store.budget._actor
        with pytest.raises(InvalidInput):
            await memory_actor.call(RecordTransition("s", "a", "t", 1e200, True))
        with pytest.raises(InvalidInput):
            await budget_actor.call(SetBudget("v", "total", 2**63, None))
        with pytest.raises(InvalidInput):
            await budget_actor.call_raw(b"\xc1 not msgpack")
        # Straight into the batch handler, past the decoder: the bad command fails alone, and the
        # good one beside it in the same transaction is committed.
        outcomes = await budget_actor.handle_batch(
            [SetBudget("v", "total", 2**64 + 5, None), SetBudget("w", "total", 5, None)]
        )
        assert isinstance(outcomes[0], Failed) and isinstance(outcomes[0].error, InvalidInput)
        assert outcomes[1] is None
        await store.budget.reserve("w", tokens=5)
        with pytest.raises(BudgetExceeded):
            await store.budget.reserve("w", tokens=1)
        assert not budget_actor.closed and not memory_actor.closed
        report = await store.check()
        assert report.ok, report.problems

    async def test_ledger_strings_take_nul_and_enum_members(self, store: Store) -> None:
        await store.memory.record_transition("s\x00x", "a\x00", "t", 0.5, True)
        assert [s.action for s in await store.memory.stats("s\x00x")] == ["a\x00"]
        assert await store.memory.stats("s") == []
        await store.budget.set_budget(Vendor.ACME, tokens=Tokens.FEW)
        await store.budget.record_spend("acme", "m", input_tokens=Tokens.FEW, output_tokens=0, cost=0)
        with pytest.raises(BudgetExceeded):
            await store.budget.reserve(Vendor.ACME, tokens=1)
        nonce = await store.nonces.issue("sub\x00ject", 60)
        with pytest.raises(InvalidInput, match="another subject"):
            await store.nonces.consume(nonce, "sub")
        await store.nonces.consume(nonce, "sub\x00ject")


class TestLedgers(LedgerContract):
    """The contract on each backend (the ``store`` fixture above: sqlite, postgres)."""


# -- across processes -------------------------------------------------------------------------------

CONSUMER = (
    OPEN
    + """
import json
from pforge_async import NonceReplayed
async def main():
    nonces = json.loads(open(sys.argv[2]).read())
    won = []
    async with await open_target(sys.argv[1]) as store:
        async def task(offset):
            for i in range(len(nonces)):
                nonce = nonces[(i + offset) % len(nonces)]
                try:
                    await store.nonces.consume(nonce, "subject")
                    won.append(nonce)
                except NonceReplayed:
                    pass
        async with anyio.create_task_group() as tg:
            for t in range(8):
                tg.start_soon(task, t * 25)
    print(json.dumps(won))
anyio.run(main)
"""
)


async def test_eight_processes_consume_each_nonce_exactly_once(target: str, tmp_path: Path) -> None:
    async with await open_target(target) as store:
        nonces = [await store.nonces.issue("subject", 600) for _ in range(200)]
    (tmp_path / "nonces.json").write_text(json.dumps(nonces))
    outs = run_all([spawn(CONSUMER, target, tmp_path / "nonces.json") for _ in range(8)], timeout=300)
    wins = [n for out in outs for n in json.loads(out)]
    assert sorted(wins) == sorted(nonces)  # every nonce once, none twice


SPENDER = (
    OPEN
    + """
import json, random
from pforge_async import BudgetExceeded
from pforge_async.ledgers import Usage
async def main():
    rng = random.Random(int(sys.argv[2]))
    committed = [0, 0]
    refused = 0
    async with await open_target(sys.argv[1]) as store:
        async def task():
            nonlocal refused
            for _ in range(30):
                vendor = rng.choice(["shared", "other"])
                tokens, cost = rng.randint(50, 300), rng.randint(1, 5000)
                try:
                    held = await store.budget.reserve(vendor, tokens=tokens, cost=cost)
                except BudgetExceeded:
                    refused += 1
                    continue
                used = Usage(rng.randint(0, tokens // 2), rng.randint(0, tokens // 2), rng.randint(0, cost))
                await store.budget.commit(held, used)
                if vendor == "shared":
                    committed[0] += used.tokens
                    committed[1] += used.cost
        async with anyio.create_task_group() as tg:
            for _ in range(8):
                tg.start_soon(task)
    print(json.dumps({"tokens": committed[0], "cost": committed[1], "refused": refused}))
anyio.run(main)
"""
)


async def test_four_processes_never_overdraw_a_budget(target: str) -> None:
    async with await open_target(target) as store:
        await store.budget.set_budget("shared", tokens=20_000, cost=400_000)
        await store.budget.set_budget("other", tokens=10**9, window="day")
    outs = [json.loads(o) for o in run_all([spawn(SPENDER, target, seed) for seed in range(4)], timeout=300)]
    assert sum(o["refused"] for o in outs) > 0  # the limit was really reached
    async with await open_target(target) as store:
        totals = await store.budget.totals("shared")
        report = await store.check()
        assert report.ok, report.problems
    assert totals.tokens == sum(o["tokens"] for o in outs)
    assert totals.cost == sum(o["cost"] for o in outs)
    assert totals.tokens <= 20_000 and totals.cost <= 400_000


RECORDER = (
    OPEN
    + """
import json
async def main():
    ids = {}
    async with await open_target(sys.argv[1]) as store:
        async def task(t):
            for i in range(40):
                n = (i * 7 + t) % 40
                key = f"k{n}"
                ids[key] = await store.memory.record_transition("s", f"a{n % 3}", "t", 1.0, True, idempotency_key=key)
        async with anyio.create_task_group() as tg:
            for t in range(4):
                tg.start_soon(task, t)
    print(json.dumps(ids))
anyio.run(main)
"""
)


async def test_four_processes_record_each_keyed_transition_once(target: str) -> None:
    outs = [json.loads(o) for o in run_all([spawn(RECORDER, target) for _ in range(4)], timeout=300)]
    for key in outs[0]:
        assert len({out[key] for out in outs}) == 1  # every process got the one transition the key made
    async with await open_target(target) as store:
        stats = await store.memory.stats("s")
        assert sum(s.count for s in stats) == 40
        report = await store.check()
        assert report.ok, report.problems


RACER = (
    OPEN
    + """
from pforge_async import BudgetExceeded
async def main():
    won = 0
    async with await open_target(sys.argv[1]) as store:
        async def task():
            nonlocal won
            while True:
                try:
                    await store.budget.reserve("scarce", tokens=1, ttl_s=600)
                except BudgetExceeded:
                    return
                won += 1
        async with anyio.create_task_group() as tg:
            for _ in range(8):
                tg.start_soon(task)
    print(won)
anyio.run(main)
"""
)


async def test_processes_racing_for_the_last_tokens_get_exactly_the_limit(target: str) -> None:
    """Every reservation takes one token of 300, from 4 processes x 8 tasks at once, until refused:
    exactly 300 are granted (a check-then-insert without the vendor's lock grants more)."""
    async with await open_target(target) as store:
        await store.budget.set_budget("scarce", tokens=300)
    outs = run_all([spawn(RACER, target) for _ in range(4)], timeout=300)
    assert sum(int(out) for out in outs) == 300
    async with await open_target(target) as store:
        assert (await store.budget.totals("scarce")).reserved_tokens == 300
