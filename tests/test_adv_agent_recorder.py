"""Adversarial review of SessionRecorder: hostile hook arguments store nothing, a resumed loop replays
what it recorded (NaN included), and a batch that fails in its after-hooks still keeps and charges
every record it wrote."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import anyio
import pytest

from pforge_async import InvalidInput, PersistenceError, Usage, open_store
from pforge_async.agent import AssistantTurn, SessionRecorder, load_session_tree

pytestmark = pytest.mark.anyio

MAX_INT = 2**63 - 1


async def test_an_assistant_turn_whose_usage_cannot_be_charged_is_refused_and_stores_nothing(tmp_path: Path) -> None:
    """Usage or a vendor the budget ledger refuses used to be written first and refused by the charge
    after it: the turn stayed in the store, the loop got PersistenceError, and every retry (or the same
    turn with its usage corrected) then met that record as a replay or a conflict."""
    bad: list[dict[str, Any]] = [
        dict(usage=Usage(-1, 2, 3), vendor="v"),
        dict(usage=Usage(1, 2, -3), vendor="v"),
        dict(usage=Usage(2**63, 0, 0), vendor="v"),
        dict(usage=Usage(2**62, 2**62, 0), vendor="v"),  # tokens past what the ledger counts
        dict(usage={"input_tokens": 1, "output_tokens": 2, "cost": 3}, vendor="v"),
        dict(usage=Usage(1, 2, 3), vendor=""),
        dict(usage=Usage(1, 2, 3), vendor="v" * 2000),
        dict(usage=Usage(1, 2, 3), vendor="v", model="m" * 2000),
    ]
    async with open_store(tmp_path / ".pforge", durability="normal") as store:
        await store.budget.set_budget("v", tokens=10**9)
        strict = await SessionRecorder.start(store, "strict", mode="required")
        for kwargs in bad:
            with pytest.raises(PersistenceError) as info:
                await strict.assistant_turn("a", **kwargs)
            assert isinstance(info.value.__cause__, InvalidInput), kwargs
            assert strict.cursor == 0 and strict.position == 0, kwargs
        loose = await SessionRecorder.start(store, "loose")
        for kwargs in bad:
            assert await loose.assistant_turn("a", **kwargs) is None
        assert [type(f.error) for f in loose.failures] == [InvalidInput] * len(bad)
        for name in ("strict", "loose"):
            assert (await load_session_tree(store, name)).records == []
        # The turn with its usage put right lands where the refused one would have, and is charged.
        recorded = await strict.assistant_turn("a", usage=Usage(1, 2, 3), vendor="v")
        assert recorded is not None and recorded.seq == 0
        assert (await store.budget.totals("v")).tokens == 3


async def test_a_spawn_refused_for_its_thread_key_or_metadata_makes_no_child_context(tmp_path: Path) -> None:
    """The child's context used to be forked before its link record was checked: a thread key of the
    wrong type (or metadata the record cannot encode) left a context behind, whose lineage a corrected
    spawn then adopted, still naming the refused thread key."""
    async with open_store(tmp_path / ".pforge", durability="normal") as store:
        rec = await SessionRecorder.start(store, "p", mode="required")
        await rec.user_turn("hi")
        for kwargs in (dict(thread_key=5), dict(metadata={"k": 2**70})):
            with pytest.raises(PersistenceError) as info:
                await rec.spawn_subagent("a", **kwargs)  # type: ignore[arg-type]
            assert isinstance(info.value.__cause__, InvalidInput), kwargs
            assert await store.turns.find_context("p/a") is None, kwargs
        child = await rec.spawn_subagent("a", thread_key="t-1")
        info_a = await store.turns.find_context("p/a")
        assert info_a is not None and info_a.metadata["pforge.agent"]["thread_key"] == "t-1"
        await child.close()
        tree = await load_session_tree(store, "p")
        (branch,) = tree.subagents
        assert branch.spawn.record.thread_key == "t-1"  # type: ignore[union-attr]


async def test_a_close_holding_nan_replays_after_a_restart(tmp_path: Path) -> None:
    """A close record is compared with the one recorded as values, then as bytes (as positional records
    are): NaN is unequal to itself, so a resumed loop closing its subagent again was a conflict."""
    async with open_store(tmp_path / ".pforge", durability="normal") as store:
        rec = await SessionRecorder.start(store, "n", mode="required")
        child = await rec.spawn_subagent("a")
        metadata = {"score": math.nan}
        first = await child.close("done", metadata=metadata)
        assert first is not None
        again = await child.close("done", metadata=metadata)
        assert again is not None and again.turn.turn_id == first.turn.turn_id
        resumed = await SessionRecorder.start(store, "n", mode="required")
        kid = await resumed.spawn_subagent("a")
        replayed = await kid.close("done", metadata=metadata)
        assert replayed is not None and replayed.turn.turn_id == first.turn.turn_id
        with pytest.raises(PersistenceError):
            await kid.close("done", metadata={"score": 1.0})  # a differing close is still a conflict


async def test_a_batch_whose_first_charge_fails_keeps_and_charges_every_record(tmp_path: Path) -> None:
    """The after-hooks of a batch (budget charges) ran in a row with the records' remembering: the first
    that failed left the later records written but out of ``records`` and ``position``, and their
    spend never charged."""
    async with open_store(tmp_path / ".pforge", durability="normal") as store:
        budget = store.budget
        await budget.set_budget("v", tokens=10**9)
        await budget.set_budget("full")  # no limit: only what the ledger counts bounds it
        # "full" has spent all the ledger counts: any more is refused by the charge, after the write.
        await budget.record_spend("full", "m", input_tokens=0, output_tokens=0, cost=MAX_INT)
        rec = await SessionRecorder.start(store, "b")
        async with rec.batch():
            await rec.assistant_turn("first", usage=Usage(1, 1, 1), vendor="full")
            await rec.assistant_turn("second", usage=Usage(10, 20, 0), vendor="v")
            await rec.user_turn("third")
        assert len(rec.failures) == 1 and isinstance(rec.failures[0].error, InvalidInput)
        assert rec.position == 3
        assert [r.seq for r in rec.records] == [0, 1, 2]
        assert (await budget.totals("v")).tokens == 30
        stored = await load_session_tree(store, "b")
        assert [r.record for r in stored.records] == [r.record for r in rec.records]
        assert isinstance(stored.records[1].record, AssistantTurn)


async def test_a_subagent_closed_by_several_tasks_at_once_is_one_record_in_its_parent(tmp_path: Path) -> None:
    """Concurrent closes of one subagent land once in the store (one key), but each was appended to the
    parent's ``records``: the recorder then said the parent held more records than the store has."""
    async with open_store(tmp_path / ".pforge", durability="normal") as store:
        parent = await SessionRecorder.start(store, "p", mode="required")
        child = await parent.spawn_subagent("k")
        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(child.close, "done")
        stored = await load_session_tree(store, "p")
        assert [r.turn.turn_id for r in parent.records] == [r.turn.turn_id for r in stored.records]
        assert [r.turn.turn_id for r in child.records] == [r.turn.turn_id for r in stored.subagents[0].session.records]


class _Hostile:
    """A value whose repr and comparison raise, as a tool's own object may."""

    def __repr__(self) -> str:
        raise RuntimeError("repr of a hostile value")

    def __eq__(self, other: object) -> bool:
        raise RuntimeError("comparison of a hostile value")

    __hash__ = object.__hash__


async def test_hostile_argument_types_are_invalid_input_and_store_nothing(tmp_path: Path) -> None:
    """A non-iterable ``tool_calls`` or ``results`` failed as a bare TypeError (the failure's error,
    the PersistenceError's cause), and a value whose repr or ``==`` raises escaped as that error from
    the message naming it."""
    async with open_store(tmp_path / ".pforge", durability="normal") as store:
        loose = await SessionRecorder.start(store, "loose")
        strict = await SessionRecorder.start(store, "strict", mode="required")
        calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = [
            ("assistant_turn", ("a",), dict(tool_calls=None)),
            ("assistant_turn", ("a",), dict(tool_calls=5)),
            ("tool_results", (None,), {}),
            ("tool_results", (7,), {}),
            ("tool_results", ([_Hostile()],), {}),
        ]
        for hook, args, kwargs in calls:
            assert await getattr(loose, hook)(*args, **kwargs) is None
            with pytest.raises(PersistenceError) as info:
                await getattr(strict, hook)(*args, **kwargs)
            assert isinstance(info.value.__cause__, InvalidInput), (hook, kwargs)
        assert [type(f.error) for f in loose.failures] == [InvalidInput] * len(calls)
        with pytest.raises(InvalidInput):
            await loose.spawn_subagent(_Hostile())  # type: ignore[arg-type]
        with pytest.raises(InvalidInput):
            loose.seek(_Hostile())  # type: ignore[arg-type]
        with pytest.raises(InvalidInput):
            await SessionRecorder.start(store, "mode", mode=_Hostile())  # type: ignore[arg-type]
        for name in ("loose", "strict"):
            assert (await load_session_tree(store, name)).records == []
