"""SessionRecorder and load_session_tree against the memory, filesystem and SQLite backends: the tree
rebuilt from the store equals the trace of what the loop did; modes; resume; subagents; tool output."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import msgspec
import pytest

from pforge_async import (
    ActorClosed,
    Conflict,
    ContextNotFound,
    IdempotencyConflict,
    IntegrityError,
    InvalidInput,
    MemoryTurnStore,
    PersistenceError,
    StorageError,
    Usage,
    open_store,
)
from pforge_async.agent import (
    BUNDLE_ID,
    AssistantTurn,
    SessionRecorder,
    SubagentSpawn,
    ToolCallEnd,
    UserTurn,
    load_session_tree,
)
from pforge_async.agent.records import RECORD_TYPES, decode_record
from pforge_async.turnstore import FsTurnStore
from pforge_async.turnstore.rules import MAX_NAME

from ._agent_loop import Loop, Shape, digest, tree_trace

pytestmark = pytest.mark.anyio

BACKENDS = ["memory", "fs", "sqlite"]


@asynccontextmanager
async def backend(kind: str, tmp_path: Path) -> AsyncIterator[Any]:
    """A target of each kind: a turn store, or the SQLite store's ``Store`` (with CAS and budget)."""
    if kind == "memory":
        yield MemoryTurnStore()
    elif kind == "fs":
        async with FsTurnStore(tmp_path / "turns.log") as fs:
            yield fs
    else:
        async with open_store(tmp_path / ".pforge", durability="normal") as store:
            await store.budget.set_budget("test-llm", tokens=10**9)
            yield store


def turns_of(target: Any) -> Any:
    return getattr(target, "turns", target)


async def all_turns(target: Any, prefix: str = "") -> list[Any]:
    """Every turn of every named context under ``prefix``: its own turns (not its parent's)."""
    turns = turns_of(target)
    found = []
    for info in (await turns.list_contexts(prefix=prefix, order="name", limit=10_000)).contexts:
        found += [t async for t in turns.iter_turns(info.context_id) if t.context_id == info.context_id]
    return found


# -- the loop's trace and the tree -----------------------------------------------------------------


@pytest.mark.parametrize("kind", BACKENDS)
async def test_the_tree_rebuilt_from_the_store_equals_what_the_loop_did(kind: str, tmp_path: Path) -> None:
    async with backend(kind, tmp_path) as target:
        store = target if kind == "sqlite" else None
        loop = Loop(store=store, workspaces=tmp_path / "ws")
        recorder = await SessionRecorder.start(target, "run-1", mode="required")
        await loop.run(recorder)
        tree = await load_session_tree(target, "run-1")
        assert tree_trace(tree) == loop.trace
        # Tool calls are paired start to end, each end with its output's size and hash.
        (gamma,) = [t for _, t in tree.walk() if t.name == "run-1/beta/gamma"]
        assert [(c.call_id, c.name) for c in gamma.tool_calls] == [
            ("run-1/beta/gamma#0", "grep"),
            ("run-1/beta/gamma#1", "edit"),
        ]
        assert all(c.start is not None and c.end is not None for _, t in tree.walk() for c in t.tool_calls)
        depths = {t.name: depth for depth, t in tree.walk()}
        assert depths["run-1/beta/gamma/delta"] == 3
        # Lineage: every subagent's context is forked from its parent's, at the turn the link names.
        for _, session in tree.walk():
            for branch in session.subagents:
                link = branch.spawn.record
                assert isinstance(link, SubagentSpawn)
                child = branch.session.context
                assert (link.session_name, link.child_session_name) == (session.name, branch.session.name)
                assert child.parent_context_id == session.context.context_id == branch.spawn.turn.context_id
                assert link.child_context_id == child.context_id and link.parent_turn_id == child.base_turn_id
                assert branch.close is not None and branch.session.closed is not None
                assert branch.close.turn.payload == branch.session.closed.turn.payload
        assert tree.end is not None and tree.start is not None and tree.start.session_name == "run-1"
        if store is not None:  # workspace snapshots, attached in the same write as the tool call's end
            for _, session in tree.walk():
                for call in session.tool_calls:
                    assert call.fs_root is not None
                    files = {e.name for e in await store.cas.read_tree(call.fs_root, recursive=True)}
                    step = int(call.call_id.rsplit("#", 1)[1])
                    assert files == {f"step{i}.txt" for i in range(step + 1)}


async def test_off_mode_needs_no_store_writes_nothing_and_changes_nothing() -> None:
    quiet = Loop()
    await quiet.run(await SessionRecorder.start(None, "off-run", mode="off"))
    recorded = Loop()
    target = MemoryTurnStore()
    await recorded.run(await SessionRecorder.start(target, "off-run"))
    assert sorted(quiet.outputs) == sorted(recorded.outputs) and quiet.outputs  # (subagents interleave)
    assert quiet.trace == recorded.trace  # the same calls, in the same order
    off = await SessionRecorder.start(target, "off-run", mode="off")  # a store given is not touched
    assert (off.position, off.cursor, list(off.records), off.failures) == (0, 0, [], [])
    assert await off.user_turn("x") is None and await off.tool_call_end("c", "y" * 10**6) is None
    child = await off.spawn_subagent("kid")
    assert child.mode == "off" and await child.close() is None and child.context_id is None
    assert await off.reserve_budget("v", tokens=1) is None
    before = len(await all_turns(target))
    await off.session_end()
    assert len(await all_turns(target)) == before
    with pytest.raises(InvalidInput, match="needs a Store"):
        await SessionRecorder.start(None, "x")
    with pytest.raises(InvalidInput, match="mode"):
        await SessionRecorder.start(None, "x", mode="sometimes")  # type: ignore[arg-type]


# -- resume ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", BACKENDS)
async def test_a_rerun_writes_nothing_and_a_differing_call_is_a_conflict(kind: str, tmp_path: Path) -> None:
    async with backend(kind, tmp_path) as target:
        store = target if kind == "sqlite" else None
        first = Loop(store=store, workspaces=tmp_path / "ws")
        await first.run(await SessionRecorder.start(target, "again", mode="required"))
        written = await all_turns(target)
        spent = (await store.budget.totals("test-llm")) if store else None
        resumed = await SessionRecorder.start(target, "again", mode="required")
        assert resumed.position == len(
            [t for t in written if t.context_id == resumed.context_id and "link" not in t.type_id]
        )
        assert resumed.cursor == 0 and resumed.replaying and isinstance(resumed.peek(), type(resumed.records[0].record))
        second = Loop(store=store, workspaces=tmp_path / "ws")
        await second.run(resumed)
        assert await all_turns(target) == written  # nothing new, nothing changed
        assert second.trace == first.trace
        if store is not None:
            assert await store.budget.totals("test-llm") == spent  # charged once
            assert await store.budget.list_reservations() == []
        # A call that differs from what is recorded at its position.
        third = await SessionRecorder.start(target, "again", mode="required")
        await third.session_start(model="m1")
        with pytest.raises(PersistenceError) as info:
            await third.system_turn("be verbose")
        assert isinstance(info.value.__cause__, IdempotencyConflict)
        assert "position 1" in str(info.value) and "system_turn" in str(info.value)
        lenient = await SessionRecorder.start(target, "again")
        assert await lenient.user_turn("not what was recorded") is None
        (failure,) = lenient.failures
        assert (failure.hook, failure.seq, type(failure.error)) == ("user_turn", 0, IdempotencyConflict)
        assert await all_turns(target) == written


async def test_a_loop_may_rebuild_from_the_records_and_continue(tmp_path: Path) -> None:
    target = MemoryTurnStore()
    rec = await SessionRecorder.start(target, "chat")
    await rec.user_turn("hello")
    await rec.assistant_turn("hi there")
    again = await SessionRecorder.start(target, "chat")
    history = [r.record for r in again.records]
    assert [type(r) for r in history] == [UserTurn, AssistantTurn] and again.position == 2
    again.seek(again.position)
    assert not again.replaying and again.peek() is None
    third = await again.user_turn("and now?")
    assert third is not None and third.seq == 2 and third.turn.parent_turn_id == again.records[1].turn.turn_id
    with pytest.raises(InvalidInput):
        again.seek(-1)


# -- modes against failing stores ------------------------------------------------------------------


class FullDisk(MemoryTurnStore):
    """A store whose disk fills after ``room`` writes: ENOSPC, as the SQLite and fs backends report it."""

    def __init__(self, room: int) -> None:
        super().__init__()
        self.room = room

    async def _write(self, command: Any) -> object:
        if self.room <= 0:
            raise StorageError("turns: no space left on device") from OSError(errno.ENOSPC, "No space left on device")
        self.room -= 1
        return await super()._write(command)


class Flaky(MemoryTurnStore):
    """A store that fails every ``every``-th write with an error no store would raise."""

    def __init__(self, every: int) -> None:
        super().__init__()
        self.every, self.calls = every, 0

    async def _write(self, command: Any) -> object:
        self.calls += 1
        if self.calls % self.every == 0:
            raise RuntimeError(f"flaky write {self.calls}")
        return await super()._write(command)


@pytest.mark.parametrize("failing", ["closed", "full", "flaky"])
async def test_best_effort_finishes_the_loop_and_keeps_every_failure(
    failing: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="pforge_async.agent")
    baseline = Loop()
    await baseline.run(await SessionRecorder.start(None, "b", mode="off"))
    target: Any
    if failing == "closed":
        async with open_store(tmp_path / ".pforge", durability="normal") as target:
            pass  # closed: every call raises ActorClosed
    else:
        target = FullDisk(room=12) if failing == "full" else Flaky(every=3)
    rec = await SessionRecorder.start(target, "b")
    loop = Loop()
    await loop.run(rec)
    assert sorted(loop.outputs) == sorted(baseline.outputs)  # the loop went on, unchanged
    assert rec.failures and len(caplog.records) == len(rec.failures)
    assert all(r.levelno == logging.WARNING and "was not recorded" in r.getMessage() for r in caplog.records)
    names = {f.session_name for f in rec.failures}
    assert "b" in names and any(name.startswith("b/") for name in names)  # subagents share the list
    expected = {"closed": ActorClosed, "full": StorageError, "flaky": RuntimeError}[failing]
    assert any(isinstance(f.error, expected) for f in rec.failures)
    if failing != "closed":
        # The store recovers: a re-run fills every gap the failures left, and the tree is whole.
        if isinstance(target, FullDisk):
            target.room = 10**6
        else:
            target.every = 10**6
        again = await SessionRecorder.start(target, "b")
        rerun = Loop()
        await rerun.run(again)
        assert again.failures == []
        assert tree_trace(await load_session_tree(target, "b")) == rerun.trace == loop.trace


@pytest.mark.parametrize("failing", ["closed", "full", "flaky"])
async def test_required_raises_persistence_error_at_the_first_failure(failing: str, tmp_path: Path) -> None:
    target: Any
    if failing == "closed":
        async with open_store(tmp_path / ".pforge", durability="normal") as target:
            rec = await SessionRecorder.start(target, "r", mode="required")
            await rec.session_start()
        with pytest.raises(PersistenceError) as info:
            await rec.user_turn("after close")
        assert isinstance(info.value.__cause__, ActorClosed)
        return
    target = FullDisk(room=6) if failing == "full" else Flaky(every=7)
    rec = await SessionRecorder.start(target, "r", mode="required")
    with pytest.raises(PersistenceError) as info:
        await Loop().run(rec)
    cause = info.value.__cause__
    assert isinstance(cause, StorageError if failing == "full" else RuntimeError)
    assert len(rec.failures) == 1 and str(rec.failures[0]) == str(info.value)
    # The failed call keeps its position: retried once the store works, it lands there.
    seq = rec.failures[0].seq
    assert seq is not None and rec.cursor == seq and seq not in {r.seq for r in rec.records}


async def test_required_start_fails_and_best_effort_start_retries_at_the_next_write() -> None:
    target = FullDisk(room=0)
    with pytest.raises(PersistenceError, match="start"):
        await SessionRecorder.start(target, "s", mode="required")
    rec = await SessionRecorder.start(target, "s")
    assert rec.context_id is None and [f.hook for f in rec.failures] == ["start"]
    target.room = 100
    recorded = await rec.user_turn("now it works")
    assert recorded is not None and rec.context_id is not None and recorded.seq == 0


async def test_bad_arguments_are_failures_of_the_mode_and_store_nothing() -> None:
    target = MemoryTurnStore()
    rec = await SessionRecorder.start(target, "bad")
    assert await rec.user_turn(42) is None  # type: ignore[arg-type]
    assert await rec.event("e", object()) is None  # not JSON-compatible
    assert await rec.tool_results([("c",)]) is None  # type: ignore[list-item]
    assert [type(f.error) for f in rec.failures] == [InvalidInput] * 3
    strict = await SessionRecorder.start(target, "bad2", mode="required")
    with pytest.raises(PersistenceError):
        await strict.tool_call_end("c", 3.5)  # type: ignore[arg-type]
    assert await all_turns(target) == []
    with pytest.raises(InvalidInput, match="subagent_id"):
        await rec.spawn_subagent("a/b")
    with pytest.raises(InvalidInput, match="session_end"):
        await rec.close()


# -- subagents -------------------------------------------------------------------------------------


async def test_spawn_is_idempotent_and_finds_a_child_a_crash_left_without_its_link() -> None:
    target = MemoryTurnStore()
    parent = await SessionRecorder.start(target, "p", mode="required")
    await parent.user_turn("go")
    first = await parent.spawn_subagent("kid", thread_key="t1", metadata={"role": "tester"})
    info = await target.get_context(first.context_id or 0)
    assert info.name == "p/kid" and info.metadata["role"] == "tester"
    assert info.metadata["pforge.agent"] == {"parent_session": "p", "subagent_id": "kid", "thread_key": "t1"}
    again = await parent.spawn_subagent("kid", thread_key="t1", metadata={"role": "tester"})
    assert again.context_id == first.context_id
    with pytest.raises(PersistenceError) as conflict:
        await parent.spawn_subagent("kid", thread_key="t2")
    assert isinstance(conflict.value.__cause__, IdempotencyConflict)
    # A crash after the fork and before the link: the re-run finds the child by name, links it once.
    head = (await target.get_head(parent.context_id or 0)).head_turn_id
    orphan = await target.fork_context(head, name="p/orphan", parent_context_id=parent.context_id)
    resumed = await SessionRecorder.start(target, "p", mode="required")
    child = await resumed.spawn_subagent("orphan")
    assert child.context_id == orphan.context_id
    links = [r for r in resumed.records if isinstance(r.record, SubagentSpawn)]
    assert [r.record.subagent_id for r in links] == ["kid", "orphan"]  # type: ignore[union-attr]
    # A context of that name that is not this session's child is refused.
    await target.open_context("p/stranger")
    with pytest.raises(PersistenceError) as stranger:
        await resumed.spawn_subagent("stranger")
    assert isinstance(stranger.value.__cause__, Conflict)


async def test_subagents_nest_to_any_depth_past_the_longest_name() -> None:
    target = MemoryTurnStore()
    root = await SessionRecorder.start(target, "deep", mode="required")
    rec = root
    chain = [rec]
    segment = "s" * 100
    for level in range(40):  # names pass MAX_NAME after ~10 levels and are shortened with a hash
        rec = await rec.spawn_subagent(f"{segment}{level}")
        await rec.event("level", level)
        chain.append(rec)
    for rec in reversed(chain[1:]):
        await rec.close("ok")
    assert len(chain[-1].name.encode()) <= MAX_NAME < len("/".join(["deep"] + [segment] * 40).encode())
    assert len({r.name for r in chain}) == len(chain)
    tree = await load_session_tree(target, "deep")
    walked = list(tree.walk())
    assert [depth for depth, _ in walked] == list(range(41))
    assert [t.name for _, t in walked] == [r.name for r in chain]
    assert all(t.records[-1].record.outcome == "ok" for _, t in walked[1:])  # type: ignore[union-attr]


async def test_load_session_tree_reports_a_missing_session_and_a_broken_link() -> None:
    target = MemoryTurnStore()
    with pytest.raises(ContextNotFound):
        await load_session_tree(target, "nobody")
    rec = await SessionRecorder.start(target, "broken", mode="required")
    await rec.user_turn("x")
    bogus = SubagentSpawn("broken", "ghost", "broken/ghost", 999, 1)
    await target.append_turn(rec.context_id or 0, "pforge.link.subagent_spawn", msgspec.msgpack.encode(bogus))
    with pytest.raises(IntegrityError, match="ghost"):
        await load_session_tree(target, "broken")
    with pytest.raises(InvalidInput):
        await load_session_tree(object(), "broken")  # type: ignore[arg-type]


# -- records, outputs, snapshots, the registry bundle ----------------------------------------------


async def test_tool_output_is_truncated_with_its_size_and_hash_and_kept_whole(tmp_path: Path) -> None:
    async with open_store(tmp_path / ".pforge", durability="normal") as store:
        rec = await SessionRecorder.start(store, "out", mode="required", max_output_bytes=100)
        text = "é" * 80  # 160 bytes: cut at a character boundary
        end = await rec.tool_call_end("c1", text)
        assert end is not None and isinstance(end.record, ToolCallEnd)
        kept = end.record.output
        assert (kept.text, kept.size, kept.truncated) == ("é" * 50, 160, True)
        assert kept.sha256 == digest(text) and kept.oid is not None
        assert (await store.cas.read_blob(kept.oid)).decode() == text
        data = bytes(range(256)) * 2
        raw = await rec.tool_call_end("c2", data, error="boom")
        assert raw is not None and isinstance(raw.record, ToolCallEnd)
        assert (raw.record.output.data, raw.record.output.size, raw.record.error) == (data[:100], 512, "boom")
        small = await rec.tool_call_end("c3", "fits")
        assert small is not None and small.record.output.oid is None and not small.record.output.truncated  # type: ignore[union-attr]
        # A workspace snapshot is attached to its turn; on a turn store without a CAS it is a failure.
        ws = tmp_path / "ws"
        (ws / "sub").mkdir(parents=True)
        (ws / "sub" / "f.py").write_text("x = 1\n")
        snap = await rec.tool_call_end("c4", "ok", workspace=ws)
        assert snap is not None and snap.turn.fs_root == await store.cas.snapshot(ws)
        await store.cas.restore(snap.turn.fs_root or "", tmp_path / "back")
        assert (tmp_path / "back" / "sub" / "f.py").read_text() == "x = 1\n"
    memory = MemoryTurnStore()
    lone = await SessionRecorder.start(memory, "out", max_output_bytes=10)
    assert await lone.tool_call_end("c", "ok", workspace=tmp_path) is None
    assert "needs a Store" in str(lone.failures[0].error)
    end = await lone.tool_call_end("c", "0123456789abc")
    assert end is not None and end.record.output.oid is not None  # type: ignore[union-attr]
    assert await memory.get_blob(end.record.output.oid) == b"0123456789abc"  # type: ignore[union-attr]


async def test_records_are_msgpack_structs_and_the_bundle_is_published_at_the_first_write() -> None:
    target = MemoryTurnStore()
    rec = await SessionRecorder.start(target, "typed")
    assert await target.get_registry_bundle(BUNDLE_ID) is None  # nothing written yet
    await Loop().run(rec)
    bundle = json.loads(await target.get_registry_bundle(BUNDLE_ID) or b"")
    assert set(bundle["types"]) == set(RECORD_TYPES) and bundle["encoding"] == "msgpack"
    for type_id, entry in bundle["types"].items():
        name = entry["schema"]["$ref"].rsplit("/", 1)[1]
        assert name == RECORD_TYPES[type_id].__name__ and name in bundle["$defs"]
    type_ids = set()
    for turn in await all_turns(target):
        record = decode_record(turn.type_id, turn.payload)
        assert msgspec.msgpack.encode(record) == turn.payload  # the payload is the Struct, nothing else
        required = bundle["$defs"][type(record).__name__].get("required", [])
        assert set(required) <= set(msgspec.to_builtins(record))
        type_ids.add(turn.type_id)
    assert type_ids == set(RECORD_TYPES)  # the loop wrote every kind
    assert all(t.idempotency_key and t.idempotency_key.startswith("pforge-agent:v1|") for t in await all_turns(target))
    assert len({(t.context_id, t.idempotency_key) for t in await all_turns(target)}) == len(await all_turns(target))


async def test_subagents_spawned_and_closed_concurrently_by_sixteen_tasks() -> None:
    target = MemoryTurnStore()
    shape = Shape(1, {f"w{i:02d}": Shape(1) for i in range(16)})
    loop = Loop()
    await loop.run(await SessionRecorder.start(target, "fan", mode="required"), shape)
    tree = await load_session_tree(target, "fan")
    assert tree_trace(tree) == loop.trace
    assert sorted(b.subagent_id for b in tree.subagents) == sorted(shape.children)
    assert "16 subagents" in tree.summary()


def test_the_key_of_a_record_names_the_session_position_and_kind() -> None:
    from pforge_async.agent.keys import record_key, subagent_session_name

    key = record_key("s", 3, "pforge.agent.user_turn")
    assert key == "pforge-agent:v1|s1:s|i1:3|s9:user_turn|"
    assert record_key("s|i1:3", 0, "x") != record_key("s", 3, "x")
    long = subagent_session_name("p" * MAX_NAME, "kid")
    assert len(long.encode()) <= MAX_NAME and long != subagent_session_name("p" * MAX_NAME, "kid2")
    assert hashlib.sha256(f"{'p' * MAX_NAME}/kid".encode()).hexdigest() in long


@pytest.mark.parametrize("hook", ["user_turn", "event"])
async def test_hook_arguments_do_not_leak_between_calls(hook: str) -> None:
    """A metadata dict changed after the call changes nothing recorded (records are encoded at once)."""
    target = MemoryTurnStore()
    rec = await SessionRecorder.start(target, "m", mode="required")
    data: dict[str, Any] = {"k": [1]}
    call: Callable[..., Any] = getattr(rec, hook)
    first = await (call("t", metadata=data) if hook == "user_turn" else call("t", data))
    data["k"].append(2)
    (turn,) = await all_turns(target)
    assert first is not None and decode_record(turn.type_id, turn.payload) == first.record


async def test_a_missing_blob_store_oid_is_an_integrity_error() -> None:
    class Lying(MemoryTurnStore):
        async def put_blob(self, data: bytes) -> str:
            return "0" * 64

    rec = await SessionRecorder.start(Lying(), "lie", max_output_bytes=1)
    assert await rec.tool_call_end("c", "too long") is None
    assert isinstance(rec.failures[0].error, IntegrityError)


async def test_a_batch_writes_a_step_in_one_atomic_write(tmp_path: Path) -> None:
    async with open_store(tmp_path / ".pforge", durability="normal") as store:
        await store.budget.set_budget("v", tokens=10_000)
        rec = await SessionRecorder.start(store, "b", mode="required")
        await rec.user_turn("go")
        await rec.reserve_budget("v", tokens=100)
        async with rec.batch():
            assert await rec.assistant_turn("call", usage=Usage(10, 5, 0), vendor="v") is None
            assert await rec.tool_call_start("c", "grep") is None
            assert await rec.tool_call_end("c", "found") is None
            async with rec.batch():  # joins the outer batch
                assert await rec.tool_results([("c", "found")]) is None
            assert len(rec.records) == 1 and rec.position == 1 and rec.cursor == 5
            assert len(await all_turns(store)) == 1  # nothing written yet
        assert [r.seq for r in rec.records] == [0, 1, 2, 3, 4] and rec.position == 5
        assert (await store.budget.totals("v")).tokens == 15 and await store.budget.list_reservations() == []
        # A replayed batch writes nothing; an exception in the block writes what was recorded first.
        again = await SessionRecorder.start(store, "b", mode="required")
        await again.user_turn("go")
        async with again.batch():
            assert await again.assistant_turn("call", usage=Usage(10, 5, 0), vendor="v") is not None  # replayed
        before = await all_turns(store)
        again.seek(again.position)
        with pytest.raises(KeyError):
            async with again.batch():
                await again.event("e", 1)
                raise KeyError("the loop's own error")
        assert len(await all_turns(store)) == len(before) + 1
    # A batch that cannot be written stores none of its records: one failure, the positions kept.
    full = FullDisk(room=3)
    lenient = await SessionRecorder.start(full, "f")
    await lenient.user_turn("x")
    async with lenient.batch():
        for i in range(5):
            await lenient.event("e", i)
    assert [(f.hook, f.seq) for f in lenient.failures] == [("batch", 1)]
    assert [t.type_id for t in await all_turns(full)] == ["pforge.agent.user_turn"]
    strict = await SessionRecorder.start(full, "f", mode="required")
    strict.seek(1)
    with pytest.raises(PersistenceError):
        async with strict.batch():
            await strict.event("e", 0)
            await strict.event("e", 1)
    assert strict.cursor == 1  # a retry of the step takes the same positions
    full.room = 100
    async with strict.batch():
        await strict.event("e", 0)
        await strict.event("e", 1)
    assert [r.seq for r in strict.records] == [0, 1, 2]


@contextmanager
def small_volume(path: Path, size: str = "1m") -> Iterator[bool]:
    """A tmpfs of ``size`` at ``path`` if this process may mount one (True), else a plain directory."""
    path.mkdir()
    mounted = (
        os.geteuid() == 0
        and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)], capture_output=True
        ).returncode
        == 0
    )
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


async def test_a_really_full_disk_under_a_file_store(tmp_path: Path) -> None:
    """Where a 1 MiB tmpfs can be mounted, the file store fills it for real (else the fake above stands
    in): best_effort finishes the loop with the failures kept; required stops at the first."""
    with small_volume(tmp_path / "vol") as mounted:
        async with FsTurnStore(tmp_path / "vol" / "turns.log") if mounted else nullcontext(FullDisk(40)) as target:
            failures = []
            for i in range(20):  # 20 sessions of the script: far more than 1 MiB of tool output
                baseline, loop = Loop(), Loop()
                await baseline.run(await SessionRecorder.start(None, f"d{i}", mode="off"))
                rec = await SessionRecorder.start(target, f"d{i}")
                await loop.run(rec)
                assert sorted(loop.outputs) == sorted(baseline.outputs)  # the loop went on, unchanged
                failures += rec.failures
            assert any(isinstance(f.error, StorageError) for f in failures)
            with pytest.raises(PersistenceError) as info:  # at start, or at the first write after
                await Loop().run(await SessionRecorder.start(target, "strict", mode="required"))
            assert isinstance(info.value.__cause__, StorageError)


async def test_a_whole_output_is_stored_once_for_the_call_and_its_results() -> None:
    class Counting(MemoryTurnStore):
        puts = 0

        async def put_blob(self, data: bytes) -> str:
            self.puts += 1
            return await super().put_blob(data)

    target = Counting()
    rec = await SessionRecorder.start(target, "once", mode="required", max_output_bytes=8)
    big = "x" * 100
    end = await rec.tool_call_end("c", big)
    results = await rec.tool_results([("c", big)])
    assert end is not None and results is not None and target.puts == 1
    oid = end.record.output.oid  # type: ignore[union-attr]
    assert oid is not None and results.record.results[0].output.oid == oid  # type: ignore[union-attr]
    assert await target.get_blob(oid) == big.encode()


async def test_an_output_repeated_by_the_tool_results_is_recorded_as_a_fresh_one_would_be() -> None:
    """The tool results reuse the tool call's output record when they hand back the same object; a
    new limit, another object, or a mutable buffer is recorded afresh."""
    rec = await SessionRecorder.start(MemoryTurnStore(), "reuse", mode="required", max_output_bytes=8)
    fresh = await SessionRecorder.start(MemoryTurnStore(), "fresh", mode="required", max_output_bytes=8)
    output = "y" * 20
    await rec.tool_call_end("c", output)
    once = await rec.tool_results([("c", output)])
    rec.max_output_bytes = 4
    cut = await rec.tool_results([("c", output)])
    buffer = bytearray(b"0123456789")
    first = await rec.tool_results([("c", buffer)])  # type: ignore[list-item]
    buffer[0:1] = b"X"
    second = await rec.tool_results([("c", buffer)])  # type: ignore[list-item]
    other = await rec.tool_results([("c", "z" * 20)])
    assert once is not None and cut is not None and first is not None and second is not None and other is not None
    expected = await fresh.tool_results([("c", "y" * 20)])
    assert expected is not None
    assert once.record.results == expected.record.results  # type: ignore[union-attr]
    assert cut.record.results[0].output.text == "yyyy"  # type: ignore[union-attr]
    assert first.record.results[0].output.data == b"0123"  # type: ignore[union-attr]
    assert second.record.results[0].output.data == b"X123"  # type: ignore[union-attr]
    assert other.record.results[0].output.sha256 == digest("z" * 20)  # type: ignore[union-attr]
