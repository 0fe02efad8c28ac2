"""Adversarial review of the recorder's budget charges: a loop killed between an assistant turn's
write and its charge, then resumed by ``seek`` (rebuilding its state from ``records`` instead of
re-issuing its calls), still has that turn's spend charged, once."""

from __future__ import annotations

import random
from contextlib import nullcontext
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from pforge_async import PersistenceError, StorageError, Usage, open_store
from pforge_async.agent import AssistantTurn, SessionRecorder, load_session_tree
from pforge_async.agent.keys import budget_key

pytestmark = pytest.mark.anyio


async def test_a_turn_written_but_not_charged_is_charged_when_a_seeked_session_ends(tmp_path: Path) -> None:
    """The session's end released the reservation of a turn recorded before the kill (as unused), and
    a turn charged unreserved was never charged: the spend in the records was missing from the
    ledger."""
    async with open_store(tmp_path / ".pforge", durability="normal") as store:
        budget = store.budget
        await budget.set_budget("v", tokens=10_000)
        for name, reserved in (("reserved", True), ("unreserved", False)):
            first = await SessionRecorder.start(store, name, mode="required")
            await first.user_turn("go")
            if reserved:
                await first.reserve_budget("v", tokens=1000, cost=10)
            # The turn is written and the run killed before its charge: made by writing it through a
            # recorder on the turn store alone, which charges no budget.
            partial = await SessionRecorder.start(store.turns, name, mode="required")
            partial.seek(1)
            await partial.assistant_turn("a", usage=Usage(10, 20, 5), vendor="v")
            resumed = await SessionRecorder.start(store, name, mode="required")
            resumed.seek(resumed.position)  # rebuilt from records: nothing re-issued
            await resumed.assistant_turn("b", usage=Usage(1, 2, 0), vendor="v")
            await resumed.session_end()
            tagged = await budget.totals("v", tags={"session": name})
            assert (tagged.tokens, tagged.cost, tagged.reserved_tokens) == (33, 5, 0), name
            assert await budget.list_reservations(tags={"session": name}) == []
            # Ending it again (a loop re-run once more) charges nothing twice.
            again = await SessionRecorder.start(store, name, mode="required")
            again.seek(again.position - 1)
            await again.session_end()
            assert (await budget.totals("v", tags={"session": name})).tokens == 33, name
        report = await store.check()
        assert report.ok, report.problems


async def test_a_turn_that_used_more_than_its_reservation_is_charged_in_full(tmp_path: Path) -> None:
    """A model call used more than was reserved for it: the ledger refuses such a commit, and the
    recorder let that refusal through after the turn was written, so the spend (which happened) was
    never charged, the loop got PersistenceError in required mode, and every retry met the same."""
    async with open_store(tmp_path / ".pforge", durability="normal") as store:
        budget = store.budget
        await budget.set_budget("v", tokens=10_000, cost=10_000)
        rec = await SessionRecorder.start(store, "over", mode="required")
        held = await rec.reserve_budget("v", tokens=100, cost=10, model="m")
        assert held is not None
        recorded = await rec.assistant_turn("a", usage=Usage(100, 50, 5), vendor="v")
        assert recorded is not None and recorded.seq == 0 and rec.failures == []
        totals = await budget.totals("v", tags={"agent": "over"})
        assert (totals.tokens, totals.cost, totals.reserved_tokens) == (150, 5, 0)
        assert await budget.list_reservations() == []
        # A resumed loop re-issuing the turn charges nothing twice.
        resumed = await SessionRecorder.start(store, "over", mode="required")
        assert await resumed.reserve_budget("v", tokens=100, cost=10, model="m") is not None
        await resumed.assistant_turn("a", usage=Usage(100, 50, 5), vendor="v")
        await resumed.session_end()
        assert (await budget.totals("v")).tokens == 150
        report = await store.check()
        assert report.ok, report.problems


async def test_two_reserved_turns_in_one_batch_each_commit_their_own_reservation(tmp_path: Path) -> None:
    """The recorder kept one pending reservation: a batch that reserved for a turn, queued it, then
    reserved for the next turn replaced the first reservation before the batch's charges ran, so the
    first turn committed nothing (no vendor to charge it to) and its reservation stayed held."""
    async with open_store(tmp_path / ".pforge", durability="normal") as store:
        budget = store.budget
        await budget.set_budget("v", tokens=10_000)
        rec = await SessionRecorder.start(store, "two", mode="required")
        async with rec.batch():
            await rec.reserve_budget("v", tokens=100)
            await rec.assistant_turn("a", usage=Usage(10, 20, 0))
            await rec.reserve_budget("v", tokens=100)
            await rec.assistant_turn("b", usage=Usage(1, 2, 0))
        assert rec.failures == []
        totals = await budget.totals("v")
        assert (totals.tokens, totals.reserved_tokens) == (33, 0)
        assert await budget.list_reservations() == []


async def test_a_batch_retried_after_its_write_failed_charges_its_turn_under_the_same_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In required mode a failed batch puts the cursor back so the loop can retry the step; its
    assistant turns' count was not put back, so the retry reserved for the next turn (another key)
    and a run resumed after a kill then committed the first reservation too: charged twice."""
    async with open_store(tmp_path / ".pforge", durability="normal") as store:
        budget = store.budget
        await budget.set_budget("v", tokens=10_000)
        rec = await SessionRecorder.start(store, "retry", mode="required")
        await rec.user_turn("go")
        turns = store.turns
        real = turns.append_turns

        async def fails_once(*args: object, **kwargs: object) -> object:
            monkeypatch.setattr(turns, "append_turns", real)
            raise StorageError("disk full (injected)")

        monkeypatch.setattr(turns, "append_turns", fails_once)
        with pytest.raises(PersistenceError):
            async with rec.batch():
                first = await rec.reserve_budget("v", tokens=100)
                await rec.assistant_turn("a", usage=Usage(10, 20, 0))
        async with rec.batch():  # the loop retries the step
            second = await rec.reserve_budget("v", tokens=100)
            await rec.assistant_turn("a", usage=Usage(10, 20, 0))
        assert first is not None and second is not None
        assert second.reservation_id == first.reservation_id
        # Killed here; the resumed loop re-issues its calls.
        resumed = await SessionRecorder.start(store, "retry", mode="required")
        await resumed.user_turn("go")
        await resumed.reserve_budget("v", tokens=100)
        await resumed.assistant_turn("a", usage=Usage(10, 20, 0))
        await resumed.session_end()
        totals = await budget.totals("v")
        assert (totals.tokens, totals.reserved_tokens) == (30, 0)


async def test_a_session_ending_with_more_than_a_thousand_unused_reservations_releases_them_all(
    tmp_path: Path,
) -> None:
    """The session's end released what one ``list_reservations`` call returned (1,000 at most): a long
    loop whose turns reported no usage left the rest held until they expired."""
    async with open_store(tmp_path / ".pforge", durability="normal") as store:
        budget = store.budget
        await budget.set_budget("v", tokens=10**9)
        rec = await SessionRecorder.start(store, "long", mode="required")
        async with rec.batch():
            for _ in range(1001):
                await rec.reserve_budget("v", tokens=10)
                await rec.assistant_turn("no usage reported")
        assert len(await budget.list_reservations(limit=10_000)) == 1001
        await rec.session_end()
        assert await budget.list_reservations(limit=10_000) == []
        assert (await budget.totals("v")).reserved_tokens == 0


async def test_a_rerun_reserving_for_a_turn_charged_unreserved_does_not_charge_it_again(tmp_path: Path) -> None:
    """A turn charged unreserved (its reserve failed, or its reservation was purged before the commit)
    and replayed by a re-run that reserves for it: the re-run's reserve made a new reservation under
    the turn's key, and the replay committed it, a second spend for the same turn."""
    async with open_store(tmp_path / ".pforge", durability="normal") as store:
        budget = store.budget
        await budget.set_budget("v", tokens=10_000)
        first = await SessionRecorder.start(store, "again", mode="required")
        await first.user_turn("go")
        # No reservation (the reserve failed in best_effort, or it was purged): charged to the vendor.
        await first.assistant_turn("a", usage=Usage(10, 20, 0), vendor="v")
        assert (await budget.totals("v")).tokens == 30
        rerun = await SessionRecorder.start(store, "again", mode="required")
        await rerun.user_turn("go")
        assert await rerun.reserve_budget("v", tokens=100, model="m") is not None  # a model the turn did not name
        await rerun.assistant_turn("a", usage=Usage(10, 20, 0), vendor="v")
        await rerun.session_end()
        totals = await budget.totals("v")
        assert (totals.tokens, totals.reserved_tokens) == (30, 0)
        assert await budget.list_reservations() == []
        report = await store.check()
        assert report.ok, report.problems


# -- a scripted loop killed and resumed at random: every recorded turn's spend charged once ---------


class _Step(NamedTuple):
    reserve: bool
    reserved_tokens: int
    usage: Usage | None
    vendor: str | None
    batched: bool


def _script(rng: random.Random) -> list[_Step]:
    return [
        _Step(
            rng.random() < 0.6,
            rng.choice([50, 100, 1000]),  # often less than the turn uses
            Usage(rng.randint(0, 60), rng.randint(0, 60), rng.randint(0, 5)) if rng.random() < 0.9 else None,
            "v" if rng.random() < 0.7 else None,
            rng.random() < 0.5,
        )
        for _ in range(rng.randint(2, 8))
    ]


class _Killed(Exception):
    """The run stops here, as a SIGKILL would stop it: nothing after it runs."""


async def _run(rec: SessionRecorder, steps: list[_Step], rng: random.Random, *, last: bool) -> None:
    done = 0
    # Rebuilt from records instead of re-issuing its calls: in required mode, which leaves no
    # unwritten position behind it (a best-effort run's records need not be its steps).
    if rec.mode == "required" and rng.random() < 0.4:
        rec.seek(rec.position)
        done = sum(1 for r in rec.records if isinstance(r.record, AssistantTurn))
    for step in steps[done:]:
        async with rec.batch() if step.batched else nullcontext():
            if step.reserve:
                await rec.reserve_budget("v", tokens=step.reserved_tokens, cost=10)
            await rec.assistant_turn("t", usage=step.usage, vendor=step.vendor)
        if not last and rng.random() < 0.25:
            raise _Killed
    if last or rng.random() < 0.5:
        await rec.session_end()


async def _scenario(seed: int, root: Path) -> str | None:
    """Runs one seed's loop over a store whose turn writes fail at random (but the last run's), each
    run cut short at random; what is wrong at the end, or None."""
    rng = random.Random(seed)
    async with open_store(root, durability="normal") as store:
        budget = store.budget
        await budget.set_budget("v", tokens=10**9, cost=10**12)
        turns: Any = store.turns
        failing = False
        for name in ("append_turn", "append_turns"):
            real = getattr(turns, name)

            async def flaky(*args: Any, _real: Any = real, **kwargs: Any) -> Any:
                if failing and rng.random() < 0.3:
                    raise StorageError("injected write failure")
                return await _real(*args, **kwargs)

            setattr(turns, name, flaky)
        steps = _script(rng)
        runs = rng.randint(1, 4)
        for run in range(runs):
            last = run == runs - 1
            failing = not last
            mode = "best_effort" if not last and rng.random() < 0.5 else "required"
            rec = await SessionRecorder.start(store, "s", mode=mode)  # type: ignore[arg-type]
            try:
                await _run(rec, steps, rng, last=last)
            except (_Killed, PersistenceError):
                if last:
                    raise
        tree = await load_session_tree(store, "s")
        charged = sum(
            r.record.usage.tokens
            for r in tree.records
            if isinstance(r.record, AssistantTurn) and r.record.usage is not None
        )
        never = sum(s.usage.tokens for s in steps if s.usage is not None and s.vendor is None and not s.reserve)
        totals = await budget.totals("v", tags={"session": "s"})
        held = await budget.list_reservations()
        report = await store.check()
        if totals.tokens != charged - never or held or not report.ok:
            return (
                f"seed {seed}: spent {totals.tokens}, recorded {charged - never}, {len(held)} held, {report.problems}"
            )
    return None


async def test_a_loop_killed_and_resumed_at_random_has_each_turn_charged_once(tmp_path: Path) -> None:
    """Reserved or not, within its reservation or past it, batched or not, best-effort or required,
    resumed by re-issuing its calls or by seek, with writes failing: the spend charged equals the
    usage the records hold (but a turn with neither vendor nor reservation, which has nothing to
    charge), and nothing stays held."""
    wrong = [found for seed in range(40) if (found := await _scenario(seed, tmp_path / str(seed))) is not None]
    assert wrong == []


async def test_a_turn_whose_reservation_a_failed_run_released_is_charged_when_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A best-effort run whose assistant turn was not written ended its session, releasing the turn's
    reservation as unused; the re-run's reserve got that released reservation back, and the turn,
    written now, was taken as given back on purpose: its spend never charged."""
    async with open_store(tmp_path / ".pforge", durability="normal") as store:
        budget = store.budget
        await budget.set_budget("v", tokens=10_000)
        turns = store.turns
        real = turns.append_turn

        async def fails_once(*args: object, **kwargs: object) -> object:
            monkeypatch.setattr(turns, "append_turn", real)
            raise StorageError("disk full (injected)")

        first = await SessionRecorder.start(store, "rel")
        await first.reserve_budget("v", tokens=100)
        monkeypatch.setattr(turns, "append_turn", fails_once)
        assert await first.assistant_turn("a", usage=Usage(10, 20, 0)) is None  # not written
        await first.session_end()
        released = await budget.find_reservation(budget_key("rel", 0))
        assert first.failures and released is not None and released.state == "released"
        rerun = await SessionRecorder.start(store, "rel", mode="required")
        await rerun.reserve_budget("v", tokens=100)
        recorded = await rerun.assistant_turn("a", usage=Usage(10, 20, 0))
        assert recorded is not None and recorded.seq == 0
        await rerun.session_end()
        totals = await budget.totals("v", tags={"session": "rel"})
        assert (totals.tokens, totals.reserved_tokens) == (30, 0)


async def test_a_charge_that_failed_in_best_effort_is_made_when_the_session_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A best-effort turn is written and its charge fails (the ledger busy a moment): the loop goes on,
    and its session's end released the turn's reservation as unused, so the spend was never charged."""
    async with open_store(tmp_path / ".pforge", durability="normal") as store:
        budget = store.budget
        await budget.set_budget("v", tokens=10_000)
        real = budget.commit

        async def fails_once(*args: Any, **kwargs: Any) -> Any:
            monkeypatch.setattr(budget, "commit", real)
            raise StorageError("database is locked (injected)")

        rec = await SessionRecorder.start(store, "busy")
        await rec.reserve_budget("v", tokens=100)
        monkeypatch.setattr(budget, "commit", fails_once)
        assert await rec.assistant_turn("a", usage=Usage(10, 20, 0)) is None  # a failure, though written
        assert len(rec.failures) == 1 and rec.position == 1
        await rec.session_end()
        assert len(rec.failures) == 1
        totals = await budget.totals("v", tags={"session": "busy"})
        assert (totals.tokens, totals.reserved_tokens) == (30, 0)
        assert await budget.list_reservations() == []
