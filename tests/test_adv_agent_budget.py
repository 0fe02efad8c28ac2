"""Adversarial review of the recorder's budget charges: a loop killed between an assistant turn's
write and its charge, then resumed by ``seek`` (rebuilding its state from ``records`` instead of
re-issuing its calls), still has that turn's spend charged, once."""

from __future__ import annotations

from pathlib import Path

import pytest

from pforge_async import PersistenceError, StorageError, Usage, open_store
from pforge_async.agent import SessionRecorder

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
        assert await rerun.reserve_budget("v", tokens=100) is not None
        await rerun.assistant_turn("a", usage=Usage(10, 20, 0), vendor="v")
        await rerun.session_end()
        totals = await budget.totals("v")
        assert (totals.tokens, totals.reserved_tokens) == (30, 0)
        assert await budget.list_reservations() == []
        report = await store.check()
        assert report.ok, report.problems
