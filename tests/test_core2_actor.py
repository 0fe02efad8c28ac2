"""The actor's callers: Actor.send's contract when the mailbox is full, and calls from an event loop
that is not the store's."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Sequence
from typing import Any

import anyio
import msgspec
import pytest

from pforge_async import Actor, InvalidInput, Store

from ._ledger_backends import store, target

pytestmark = pytest.mark.anyio
__all__ = ["store", "target"]  # the fixtures, imported for pytest


class Hold(msgspec.Struct, frozen=True, tag=True):
    pass


class Echo(msgspec.Struct, frozen=True, tag=True):
    value: int


class GatedActor(Actor[Hold | Echo]):
    """Holds its batch on ``Hold`` until the test opens the gate: the mailbox fills without a clock."""

    command_type = Hold | Echo
    name = "gated"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.entered = anyio.Event()
        self.gate = anyio.Event()
        self.executed: list[int] = []

    async def handle_batch(self, commands: Sequence[Hold | Echo]) -> list[Any]:
        outcomes: list[Any] = []
        for command in commands:
            if isinstance(command, Hold):
                self.entered.set()
                await self.gate.wait()
                outcomes.append(None)
            else:
                self.executed.append(command.value)
                outcomes.append(command.value)
        return outcomes


async def test_send_into_a_full_mailbox_must_be_awaited_and_says_so_if_not() -> None:
    actor = GatedActor(mailbox_size=1, max_batch=1)
    async with anyio.create_task_group() as tg:
        await tg.start(actor.run)
        tg.start_soon(actor.call, Hold())
        await actor.entered.wait()  # the actor is inside its batch: the mailbox is empty, then full
        try:
            first = actor.send(Echo(1))  # room: mailed at once, before anything awaits it
            assert actor.queued == 1
            dropped = actor.send(Echo(2))  # full: mailed only once awaited; this one never is
            kept = actor.send(Echo(3))
            with pytest.warns(RuntimeWarning, match="Echo was sent while the mailbox was full and never awaited"):
                del dropped
                gc.collect()
        finally:
            actor.gate.set()  # a batch runs shielded: a failed test must still let it end
        assert await first == 1
        assert await kept == 3
        await actor.aclose()
    assert actor.executed == [1, 3]  # what was dropped unawaited was never mailed: nothing ran for it


async def test_what_send_returns_when_full_is_awaited_once() -> None:
    actor = GatedActor(mailbox_size=1, max_batch=1)
    async with anyio.create_task_group() as tg:
        await tg.start(actor.run)
        tg.start_soon(actor.call, Hold())
        await actor.entered.wait()
        try:
            await_me = actor.send(Echo(1))
            waiting = actor.send(Echo(2))
        finally:
            actor.gate.set()
        assert (await await_me, await waiting) == (1, 2)
        with pytest.raises(RuntimeError, match="awaited already"):
            await waiting
        await actor.aclose()
    assert actor.executed == [1, 2]


async def test_a_call_from_another_threads_event_loop_is_a_named_error(store: Store, target: str) -> None:
    ctx = await store.turns.create_context()
    await store.budget.set_budget("v", tokens=10)
    outcomes: dict[str, object] = {}

    async def elsewhere() -> None:
        calls = {
            "append_turn": lambda: store.turns.append_turn(ctx.context_id, "t", b"x"),
            "write_blob": lambda: store.cas.write_blob(b"x"),
            "record_spend": lambda: store.budget.record_spend("v", "m", input_tokens=1, output_tokens=0, cost=0),
            "issue": lambda: store.nonces.issue("s", 60),
            "record_transition": lambda: store.memory.record_transition("s", "a", "t", 1.0, True),
        }
        if target.startswith("postgresql://"):  # reads go through a pool bound to the store's loop
            calls["totals"] = lambda: store.budget.totals("v")
        for name, call in calls.items():
            try:
                # Answered at once; the bound only turns a regression (a wait without end) into a failure.
                outcomes[name] = await asyncio.wait_for(call(), 30)
            except Exception as exc:
                outcomes[name] = exc

    await anyio.to_thread.run_sync(lambda: asyncio.run(elsewhere()))
    for name, outcome in outcomes.items():
        assert isinstance(outcome, InvalidInput), (name, outcome)
        assert "event loop" in str(outcome)
    # Nothing of it was stored, and the store serves its own loop on.
    assert await store.turns.list_turns(ctx.context_id) == []
    assert (await store.budget.totals("v")).tokens == 0
    assert (await store.turns.append_turn(ctx.context_id, "t", b"y")).depth == 1
    report = await store.check()
    assert report.ok, report.problems
