"""The ledgers' contract, run against every backend: the embedded SQLite store and PostgreSQL.

:class:`TestLedgers` and the tests across processes take their store from tests/_ledger_backends.py,
parametrized over the backends, and go through the public API only (and the actors' own ``call``,
``handle_batch`` and reads, which both backends give with one meaning). The multi-process tests say
the same across processes (each process its own store on the one directory or server): every nonce
consumed once, no budget overdrawn, one transition per idempotency key, nothing acknowledged lost to
a killed process. At the end, what only SQLite has: its database files and their migrations.
PostgreSQL's own (row locks, server restarts) is in tests/test_pg_ledgers.py.
"""

from __future__ import annotations

import datetime as dt
import enum
import itertools
import json
import math
import random
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pforge_async import (
    BudgetExceeded,
    Conflict,
    IdempotencyConflict,
    InvalidInput,
    NonceExpired,
    NonceReplayed,
    NonceUnknown,
    NotFound,
    StorageError,
    Store,
    open_store,
)
from pforge_async.actor import Failed
from pforge_async.ledgers import Usage
from pforge_async.ledgers.budget import SetBudget
from pforge_async.ledgers.constellation import RecordTransition
from pforge_async.ledgers.nonces import IssueNonce, nonce_expiry

from ._ledger_backends import OPEN, consume_each, open_target, store, target
from ._procs import run_all, spawn

__all__ = ["store", "target"]  # the fixtures, imported for pytest to find

pytestmark = pytest.mark.anyio

transition = st.tuples(
    st.sampled_from(["s0", "s1"]),
    st.sampled_from(["left", "right", "wait"]),
    st.floats(min_value=-10, max_value=10, allow_nan=False),
    st.booleans(),
    st.none() | st.sampled_from(["k1", "k2", "k3"]),
)
#: each hypothesis example's own prefix of states and keys: the examples share one store
_EXAMPLES = itertools.count()


class Vendor(str, enum.Enum):
    ACME = "acme"


class Tokens(enum.IntEnum):
    FEW = 3


class TestLedgers:
    """Every test takes ``store``: an open store of one backend."""

    # -- constellation memory -----------------------------------------------------------------------

    @settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(steps=st.lists(transition, max_size=30))
    async def test_action_stats_equal_the_aggregate_for_any_steps(
        self, store: Store, steps: list[tuple[str, str, float, bool, str | None]]
    ) -> None:
        run = f"{next(_EXAMPLES)}:"
        first_use: dict[str, tuple[str, str, float, bool]] = {}
        for state, action, reward, success, key in steps:
            state, key = run + state, None if key is None else run + key
            values = (state, action, reward, success)
            if key is not None and key in first_use and first_use[key] != values:
                with pytest.raises(IdempotencyConflict):
                    await store.memory.record_transition(state, action, "next", reward, success, idempotency_key=key)
                continue
            if key is not None:
                first_use.setdefault(key, values)
            await store.memory.record_transition(state, action, "next", reward, success, idempotency_key=key)
        states = (run + "s0", run + "s1")
        stats = {s: {a.action: a for a in await store.memory.stats(s)} for s in states}
        reads: Any = store.memory._actor
        # 0 for a square that underflows (PostgreSQL refuses the product; the stats hold Python's 0.0).
        rows = await reads.fetchall(
            "SELECT state, action, COUNT(*), SUM(success), SUM(reward), "
            "SUM(CASE WHEN abs(reward) < 1e-150 THEN 0.0 ELSE reward * reward END), "
            "MAX(recorded_at_ms) FROM transitions WHERE state IN (?, ?) GROUP BY state, action",
            states,
        )
        (total,) = await reads.fetchone("SELECT COUNT(*) FROM transitions WHERE state IN (?, ?)", states)
        assert total == sum(1 for *_, key in steps if key is None) + len(first_use)
        assert sum(len(v) for v in stats.values()) == len(rows)
        for state, action, count, successes, reward_sum, sq_sum, last_seen in rows:
            s = stats[state][action]
            assert (s.count, s.successes, s.last_seen_ms) == (count, successes, last_seen)
            assert math.isclose(s.reward_sum, reward_sum, rel_tol=1e-9, abs_tol=1e-9)
            assert math.isclose(s.reward_sq_sum, sq_sum, rel_tol=1e-9, abs_tol=1e-9)
        report = await store.check()
        assert report.ok, report.problems

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
        for _ in range(400):
            action = await store.memory.best_action("start", ["a", "b", "c"])
            assert action is not None
            chosen.append(action)
            win = rng.random() < odds[action]
            await store.memory.record_transition("start", action, "end", 1.0 if win else 0.0, win)
        stats = {s.action: s for s in await store.memory.stats("start")}
        assert chosen[:3] == ["a", "b", "c"]  # untried first, in the order given
        assert chosen[-100:].count("c") > 70
        assert stats["c"].count > stats["b"].count > stats["a"].count
        assert sum(s.count for s in stats.values()) == 400
        c = stats["c"]
        assert c.success_rate == c.successes / c.count == c.mean_reward  # rewards were 0 or 1
        assert math.isclose(c.reward_variance, c.mean_reward * (1 - c.mean_reward), rel_tol=1e-9)

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
        # Consumed at once, well inside its second (a 50 ms one could lapse first on a slow machine);
        # then the wait is for the expiry it carries, not a fixed time.
        used = await nonces.issue("tool:shell", 1)
        await nonces.consume(used, "tool:shell")
        await anyio.sleep(max(0.0, nonce_expiry(used) / 1000 - time.time()) + 0.01)
        assert await nonces.purge_expired() == 2
        for purged in (short, used):
            with pytest.raises(NonceUnknown):
                await nonces.consume(purged, "tool:shell")
        await nonces.consume(second, "tool:shell")

    async def test_64_tasks_race_for_each_nonce(self, store: Store) -> None:
        issued = [await store.nonces.issue("s", 600) for _ in range(50)]
        wins = await consume_each(store, issued, "s", tasks=64, stride=7)
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

    async def test_a_clock_stepped_back_between_issue_and_consume_leaves_a_sound_store(
        self, store: Store, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        start, reads = int(time.time() * 1000), [0]

        def stepped() -> int:  # back by 50 ms after the first read (NTP, a VM migration)
            reads[0] += 1
            return start - (50 if reads[0] > 1 else 0)

        for module in ("pforge_async.ledgers.nonces", "pforge_async.postgres.ledgers"):
            monkeypatch.setattr(f"{module}.now_ms", stepped)
        nonce = await store.nonces.issue("agent", 60)
        await store.nonces.consume(nonce, "agent")
        with pytest.raises(NonceReplayed):
            await store.nonces.consume(nonce, "agent")
        report = await store.check()
        assert report.ok, report.problems

    async def test_a_day_window_counts_a_reservation_made_before_the_day(
        self, store: Store, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # A reservation made 25 hours ago and still held is committed today: its room is today's.
        clock = [int(time.time() * 1000)]
        for module in ("pforge_async.ledgers.budget", "pforge_async.postgres.ledgers"):
            monkeypatch.setattr(f"{module}.now_ms", lambda: clock[0])
        budget = store.budget
        await budget.set_budget("v", tokens=100, window="day")
        early = await budget.reserve("v", tokens=100, ttl_s=2 * 86_400)
        clock[0] += 25 * 3_600_000
        with pytest.raises(BudgetExceeded, match="day"):
            await budget.reserve("v", tokens=100)
        with pytest.raises(BudgetExceeded, match="day"):
            await budget.record_spend("v", "m", input_tokens=1, output_tokens=0, cost=0)
        spent = await budget.commit(early, Usage(60, 40, 0))
        assert not spent.late and (spent.over_tokens, spent.over_cost) == (0, 0)
        assert (await budget.totals("v", since=(clock[0] - 86_400_000) / 1000)).tokens == 100
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
        with pytest.raises(InvalidInput):
            await budget.commit(held, {"input_tokens": 1})  # type: ignore[arg-type]
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
        """What once raised OverflowError, ValueError, TypeError, UnicodeEncodeError or a misleading
        ActorClosed is InvalidInput, and nothing of it is stored."""
        memory, nonces, budget = store.memory, store.nonces, store.budget
        await budget.set_budget("v")
        held = await budget.reserve("v", tokens=1)
        out_of_range: list[Any] = [
            lambda: memory.record_transition("s", "a", "t", 1e200, True),
            lambda: memory.record_transition("s", "a", "t", -1e101, True),
            lambda: memory.record_transition("s", "a", "t", 10**400, True),
            lambda: memory.record_transition("s", "a", "t", math.inf, True),
            lambda: memory.record_transition("s", "a", "t", 0.5, True, context={"r": math.nan}),
            lambda: memory.best_action("s", exploration=math.nan),
            lambda: memory.best_action("s", exploration=math.inf),
            lambda: memory.best_action("s", exploration=10**400),
            lambda: memory.best_action("s", 5),  # type: ignore[arg-type]
            lambda: nonces.issue("subj", 1e16),
            lambda: nonces.issue("subj", 2**63),
            lambda: nonces.issue("subj", math.nan),
            lambda: budget.set_budget("v", tokens=2**63),
            lambda: budget.set_budget("v", cost=2**64),
            lambda: budget.reserve("v", cost=2**63),
            lambda: budget.reserve("v", ttl_s=1e16),
            lambda: budget.reserve("v", ttl_s=math.inf),
            lambda: budget.record_spend("v", "m", input_tokens=2**63, output_tokens=0, cost=0),
            lambda: budget.commit(held, Usage(0, 0, 2**63)),
            lambda: budget.totals("v", since=1e300),
            lambda: budget.totals("v", since=-1e300),
            lambda: budget.totals("v", since=2**63),
            lambda: budget.totals("v", since=math.nan),
            lambda: budget.totals("v", since=math.inf),
            lambda: budget.totals("v", since=dt.datetime.min),
        ]
        lone = "ok\ud800"  # a lone surrogate: not Unicode text, cannot be stored as UTF-8
        surrogates: list[Any] = [
            lambda: memory.record_transition(lone, "a", "t", 0.5, True),
            lambda: memory.record_transition("s", lone, "t", 0.5, True),
            lambda: memory.record_transition("s", "a", lone, 0.5, True),
            lambda: memory.record_transition("s", "a", "t", 0.5, True, context=lone),
            lambda: memory.record_transition("s", "a", "t", 0.5, True, idempotency_key=lone),
            lambda: memory.stats(lone),  # was ActorClosed: the reader failed to bind it
            lambda: memory.best_action(lone),
            lambda: memory.best_action("s", ["a", lone]),
            lambda: nonces.issue(lone, 60),
            lambda: nonces.consume("A" * 43, lone),
            lambda: budget.set_budget(lone),
            lambda: budget.reserve(lone),
            lambda: budget.reserve("v", model=lone),
            lambda: budget.record_spend(lone, "m", input_tokens=1, output_tokens=1, cost=1),
            lambda: budget.record_spend("v", lone, input_tokens=1, output_tokens=1, cost=1),
            lambda: budget.record_spend("v", "m", input_tokens=1, output_tokens=1, cost=1, idempotency_key=lone),
            lambda: budget.totals(lone),
        ]
        for call in out_of_range + surrogates:
            with pytest.raises(InvalidInput):
                await call()
        assert await memory.stats("s") == []
        assert (await budget.totals("v")).cost == 0
        await memory.record_transition("s", "a", "t", -1e100, True)  # the bounds themselves are accepted
        await memory.record_transition("s", "tiny", "t", 5e-324, True)  # its square underflows to 0
        await budget.reserve("v", ttl_s=1e15)
        assert (await budget.totals("v", since=dt.datetime.max.replace(tzinfo=dt.timezone.utc))).cost == 0
        report = await store.check()
        assert report.ok, report.problems

    async def test_spent_and_held_never_pass_64_bits(self, store: Store) -> None:
        """With no limit set, the ledger's own sums still fit 64-bit integers: once what a vendor has
        spent plus what it holds would pass 2**63-1, a reserve or record_spend is refused."""
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
        """The mailbox is a wire protocol: commands that skip the facade's checks are refused by the
        decoder, and one that reaches ``apply`` anyway fails only itself; the ledger keeps serving."""
        memory_actor: Any = store.memory._actor
        budget_actor: Any = store.budget._actor
        nonce_actor: Any = store.nonces._actor
        with pytest.raises(InvalidInput):
            await memory_actor.call(RecordTransition("s", "a", "t", 1e200, True))
        with pytest.raises(InvalidInput):
            await memory_actor.call(RecordTransition("", "a", "t", 0.5, True))
        with pytest.raises(InvalidInput):
            await budget_actor.call(SetBudget("v", "total", 2**63, None))
        with pytest.raises(InvalidInput):
            await nonce_actor.call(IssueNonce("short", "s", 1000))
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
        await store.memory.record_transition("s", "a", "t", 0.5, True)
        assert [s.count for s in await store.memory.stats("s")] == [1]
        assert not budget_actor.closed and not memory_actor.closed
        report = await store.check()
        assert report.ok, report.problems

    async def test_ledger_strings_take_nul_and_enum_members(self, store: Store) -> None:
        """NUL is a character like any other in the ledgers' strings; a str or int enum member is taken
        as its value (msgspec and the databases take only plain str and int)."""
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


# -- across processes -------------------------------------------------------------------------------

CONSUMER = (
    OPEN
    + """
import json
from tests._ledger_backends import consume_each
async def main():
    nonces = json.loads(open(sys.argv[2]).read())
    async with await open_target(sys.argv[1]) as store:
        won = await consume_each(store, nonces, "subject", tasks=8, stride=25)
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
            for _ in range(40):
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


CRASH_LEDGERS = (
    OPEN
    + """
async def main():
    async with await open_target(sys.argv[1]) as store:
        await store.budget.set_budget("v", tokens=10**12)
        i = 0
        while True:
            spend = await store.budget.record_spend("v", "m", input_tokens=i, output_tokens=1, cost=i,
                                                    idempotency_key=f"call-{i}")
            nonce = await store.nonces.issue("s", 600)
            await store.nonces.consume(nonce, "s")
            print(i, spend, nonce, flush=True)
            i += 1
anyio.run(main)
"""
)


async def test_sigkill_loses_no_acknowledged_spend_or_consumption(target: str) -> None:
    child = spawn(CRASH_LEDGERS, target)
    assert child.stdout is not None
    acked = []
    deadline = None  # counted from the first acknowledgement: a slow start on a busy machine is no crash
    while deadline is None or time.monotonic() < deadline or len(acked) < 10:
        line = child.stdout.readline()
        if deadline is None:
            deadline = time.monotonic() + random.uniform(0.3, 0.8)
        assert line, child.stderr.read() if child.stderr else ""
        number, spend_id, consumed = line.split()
        acked.append((int(number), int(spend_id), consumed))
    child.send_signal(signal.SIGKILL)
    child.communicate(timeout=30)
    async with await open_target(target) as store:
        before = await store.budget.totals("v")
        for i, spend, nonce in acked:
            again = await store.budget.record_spend(
                "v", "m", input_tokens=i, output_tokens=1, cost=i, idempotency_key=f"call-{i}"
            )
            assert again == spend  # the row is there: the retry found it and wrote nothing
            with pytest.raises(NonceReplayed):
                await store.nonces.consume(nonce, "s")
        assert await store.budget.totals("v") == before
        assert before.cost >= sum(i for i, _, _ in acked)
        report = await store.check()
        assert report.ok, report.problems


# -- SQLite's own: its database files ---------------------------------------------------------------

V1_CONSTELLATION = """
CREATE TABLE transitions (transition_id INTEGER PRIMARY KEY, state TEXT NOT NULL, action TEXT NOT NULL,
    next_state TEXT NOT NULL, reward REAL NOT NULL, success INTEGER NOT NULL CHECK (success IN (0, 1)),
    idempotency_key TEXT UNIQUE, recorded_at_ms INTEGER NOT NULL);
CREATE INDEX transitions_state_action ON transitions (state, action);
CREATE TABLE action_stats (state TEXT NOT NULL, action TEXT NOT NULL, count INTEGER NOT NULL,
    successes INTEGER NOT NULL, reward_sum REAL NOT NULL, reward_sq_sum REAL NOT NULL,
    last_seen_ms INTEGER NOT NULL, PRIMARY KEY (state, action)) WITHOUT ROWID;
INSERT INTO transitions VALUES (1, 's', 'a', 't', 1.0, 1, NULL, 5);
INSERT INTO action_stats VALUES ('s', 'a', 1, 1, 1.0, 1.0, 5);
PRAGMA user_version = 1;
"""


async def test_an_older_database_is_migrated_forward(tmp_path: Path) -> None:
    root = tmp_path / ".pforge"
    async with open_store(root):
        pass  # a whole store (its manifest records every part), whose memory.db is then an old one
    for name in ("memory.db", "memory.db-wal", "memory.db-shm"):
        (root / name).unlink(missing_ok=True)
    with sqlite3.connect(root / "memory.db") as conn:
        conn.executescript(V1_CONSTELLATION)
    conn.close()
    async with open_store(root) as store:
        (stats,) = await store.memory.stats("s")
        assert stats.count == 1
        await store.memory.record_transition("s", "a", "t", 0.0, False, context="since v2")
        assert (await store.memory.stats("s"))[0].count == 2
    with sqlite3.connect(root / "memory.db") as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
        assert conn.execute("SELECT context FROM transitions ORDER BY transition_id").fetchall() == [
            (None,),
            ("since v2",),
        ]
    conn.close()


async def test_a_newer_ledger_database_is_refused_untouched(tmp_path: Path) -> None:
    root = tmp_path / ".pforge"
    async with open_store(root) as store:
        await store.budget.set_budget("v", tokens=1)
    with sqlite3.connect(root / "budget.db") as conn:
        conn.execute("PRAGMA user_version = 7")
    conn.close()
    before = (root / "budget.db").read_bytes()
    with pytest.raises(StorageError, match="newer"):
        async with open_store(root):
            pass
    assert (root / "budget.db").read_bytes() == before
