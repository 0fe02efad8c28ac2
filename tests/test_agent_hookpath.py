"""What the hook path's shortcuts must keep: the records a recorder holds are its own decoded copies
(untracked by the garbage collector, independent of the caller's objects, normalized for comparison),
and every hook's write, alone or in a batch, lands as the store reads it back."""

from __future__ import annotations

import gc
from typing import Any

import anyio
import msgspec
import pytest

from pforge_async import IdempotencyConflict, InvalidInput, MemoryTurnStore, PersistenceError, Usage
from pforge_async.agent import AssistantTurn, Event, Recorded, SessionRecorder, ToolCall, ToolCallStart
from pforge_async.agent.records import decode_record

pytestmark = pytest.mark.anyio


async def step(rec: SessionRecorder, n: int, arguments: dict[str, Any]) -> None:
    call = ToolCall(f"c{n}", "grep", arguments)
    await rec.assistant_turn(f"step {n}", tool_calls=[call], usage=Usage(9, 1, 5))
    await rec.tool_call_start(call.call_id, call.name, call.arguments)
    await rec.tool_call_end(call.call_id, f"{n} matches")
    await rec.tool_results([(call.call_id, f"{n} matches")])


async def test_a_recorders_records_are_not_tracked_by_the_garbage_collector() -> None:
    target = MemoryTurnStore()
    rec = await SessionRecorder.start(target, "long")
    for n in range(3):
        await step(rec, n, {"n": n})
    async with rec.batch():
        await step(rec, 3, {"n": 3})
    reloaded = await SessionRecorder.start(target, "long")
    for records in (rec.records, reloaded.records):
        assert len(records) == 16
        assert not any(gc.is_tracked(recorded) for recorded in records)
    assert list(reloaded.records) == list(rec.records)
    first = rec.records[0]
    assert first == Recorded(first.record, first.turn)
    assert first.type_id == first.turn.type_id and first.seq == 0


async def test_a_kept_record_is_the_stored_one_not_the_callers_objects() -> None:
    target = MemoryTurnStore()
    rec = await SessionRecorder.start(target, "copy")
    arguments: dict[str, Any] = {"pattern": "TODO", "paths": ["src"]}
    metadata: dict[str, Any] = {"tags": ["a"]}
    recorded = await rec.tool_call_start("c1", "grep", arguments, metadata=metadata)
    arguments["paths"].append("tests")
    metadata["tags"].append("b")
    assert recorded is not None
    record = recorded.record
    assert isinstance(record, ToolCallStart)
    assert record.arguments == {"pattern": "TODO", "paths": ["src"]} and record.metadata == {"tags": ["a"]}
    assert record == decode_record(recorded.type_id, recorded.turn.payload)


async def test_a_replayed_call_with_tuples_matches_the_record_its_lists_made() -> None:
    target = MemoryTurnStore()
    rec = await SessionRecorder.start(target, "replay", mode="required")
    call = ToolCall("c1", "grep", {"paths": ["src"]})
    first = await rec.assistant_turn("hi", tool_calls=[call], metadata={"k": [1, 2]})
    again = await SessionRecorder.start(target, "replay", mode="required")
    replayed = await again.assistant_turn(
        "hi", tool_calls=(ToolCall("c1", "grep", {"paths": ("src",)}),), metadata={"k": (1, 2)}
    )
    assert replayed == first and again.failures == []
    assert isinstance(replayed.record, AssistantTurn) and replayed.record.tool_calls == [call]


async def test_a_cancelled_batch_writes_nothing_and_the_next_block_writes_its_own() -> None:
    target = MemoryTurnStore()
    rec = await SessionRecorder.start(target, "cancel", mode="required")
    with anyio.CancelScope() as scope:
        async with rec.batch():
            await rec.event("e", 0)
            scope.cancel()
            await anyio.sleep(1)  # the cancellation lands here, inside the block
    assert scope.cancelled_caught and rec.records == [] and rec.position == 0
    rec.seek(0)
    block = rec.batch()
    async with block:
        await rec.event("e", 1)
        async with rec.batch():  # joins the outer block
            await rec.event("e", 2)
    assert [r.record for r in rec.records] == [Event(0, "e", 1), Event(1, "e", 2)]
    again = await SessionRecorder.start(target, "cancel")
    assert [r.turn for r in again.records] == [r.turn for r in rec.records]


class Name(str):
    """A str subclass, which no record holds: msgspec encodes none."""


async def test_every_kept_record_equals_its_stored_bytes_decoded_to_the_same_exact_types() -> None:
    target = MemoryTurnStore()
    rec = await SessionRecorder.start(target, "exact")
    await rec.user_turn("hi")
    await rec.user_turn("hi", metadata={"k": ("v",)})
    await rec.system_turn("be brief")
    await rec.steering_turn("stop")
    await rec.tool_call_end("c1", "out")
    await rec.tool_call_end("c2", "out", error="boom")
    await rec.tool_call_end("c3", bytearray(10), error="failed")
    await rec.tool_call_end("c4", "x" * 100_000)  # truncated
    await rec.tool_results([("c1", "out"), ("c2", "out", True)])
    await rec.tool_results([("c3", b"\x00")], metadata={"n": 1})
    assert rec.failures == [] and len(rec.records) == 10

    def shape(value: object) -> object:
        """The value with every str, bytes and container's exact type beside it."""
        if isinstance(value, msgspec.Struct):
            return (type(value), [shape(getattr(value, f)) for f in value.__struct_fields__])
        if isinstance(value, (list, tuple)):
            return (type(value), [shape(v) for v in value])
        if isinstance(value, dict):
            return (type(value), {shape(k): shape(v) for k, v in value.items()})
        return (type(value), value)

    for recorded in rec.records:
        stored = decode_record(recorded.type_id, recorded.turn.payload)
        assert shape(recorded.record) == shape(stored)


async def test_a_record_of_a_wrong_type_is_still_refused_and_stores_nothing() -> None:
    target = MemoryTurnStore()
    rec = await SessionRecorder.start(target, "wrong")
    assert await rec.tool_call_end(7, "out") is None  # type: ignore[arg-type]
    assert await rec.tool_call_end("c", "out", error=3) is None  # type: ignore[arg-type]
    assert await rec.tool_results([(7, "out")]) is None  # type: ignore[list-item]
    assert await rec.system_turn(b"bytes") is None  # type: ignore[arg-type]
    assert await rec.tool_call_end(Name("c"), "out") is None
    assert await rec.user_turn(Name("hi")) is None
    assert [type(f.error) for f in rec.failures] == [InvalidInput] * 6
    assert rec.records == [] and rec.position == 0


async def test_one_batch_block_entered_inside_itself_is_refused_and_the_outer_batch_stays_one_write() -> None:
    target = MemoryTurnStore()
    rec = await SessionRecorder.start(target, "reentered", mode="required")
    block = rec.batch()
    async with block:
        assert await rec.user_turn("first") is None  # queued
        with pytest.raises(InvalidInput, match="already entered"):
            async with block:
                pass
        assert await rec.user_turn("second") is None  # still queued: the batch goes on
        context = await target.find_context("reentered")
        assert context is not None and context.head_turn_id == 0
    assert [r.record.text for r in rec.records] == ["first", "second"]  # type: ignore[attr-defined]


async def test_a_lone_surrogate_is_invalid_input_and_stores_nothing() -> None:
    target = MemoryTurnStore()
    rec = await SessionRecorder.start(target, "surrogate")
    assert await rec.user_turn("bad \ud800 text") is None
    assert await rec.tool_call_start("c\udfff", "grep", {}) is None
    assert [type(f.error) for f in rec.failures] == [InvalidInput] * 2
    assert rec.records == [] and rec.position == 0
    assert await rec.user_turn("fine") is not None


def test_a_tool_output_of_other_types_than_a_reader_decodes_is_not_kept_as_built() -> None:
    from pforge_async.agent import ToolCallEnd
    from pforge_async.agent.output import tool_output
    from pforge_async.agent.records import ToolOutput, decodes_to_itself

    made, _ = tool_output("out", 16, keeps_blobs=False)
    assert decodes_to_itself(ToolCallEnd(0, "c", made))
    for odd in (
        ToolOutput(True, made.sha256, text="out"),  # type: ignore[arg-type]
        ToolOutput(3, made.sha256, text="out", truncated=1),  # type: ignore[arg-type]
        ToolOutput(3, made.sha256, data=bytearray(b"out")),  # type: ignore[arg-type]
    ):
        assert not decodes_to_itself(ToolCallEnd(0, "c", odd))


async def test_a_call_holding_nan_replays_on_resume_and_a_changed_one_still_conflicts() -> None:
    target = MemoryTurnStore()
    first = await SessionRecorder.start(target, "nan", mode="required")
    await first.tool_call_start("c1", "score", {"x": float("nan")}, metadata={"w": float("nan")})
    await first.event("measured", {"v": float("nan")})
    again = await SessionRecorder.start(target, "nan", mode="required")
    assert await again.tool_call_start("c1", "score", {"x": float("nan")}, metadata={"w": float("nan")}) is not None
    assert await again.event("measured", {"v": float("nan")}) is not None
    assert again.position == 2 and len(again.records) == 2  # replayed: nothing new written
    changed = await SessionRecorder.start(target, "nan", mode="required")
    with pytest.raises(PersistenceError) as caught:
        await changed.tool_call_start("c1", "score", {"x": 1.0})
    assert isinstance(caught.value.__cause__, IdempotencyConflict)
