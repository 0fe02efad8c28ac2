"""Pipeline storage (``pforge_async.attractor``) against the memory, filesystem and SQLite backends: the
example pipeline interrupted after a stage and resumed ends as an uninterrupted run does; retried
stages keep both attempts and their agent sessions; checkpoint state goes through the CAS byte-exact;
every write is idempotent; the latest checkpoint is found at a cost independent of the count; bad
input is refused naming what is wrong."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import msgspec
import pytest

from pforge_async import (
    Conflict,
    ContextNotFound,
    IdempotencyConflict,
    IntegrityError,
    InvalidInput,
    MemoryTurnStore,
    NewTurn,
    NotFound,
    ObjectNotFound,
    Store,
    open_store,
)
from pforge_async.agent import SessionRecorder, SessionTree, SubagentSpawn
from pforge_async.attractor import (
    BUNDLE_ID,
    CHECKPOINT,
    AttractorCorrelation,
    AttractorStorageWriter,
    AttractorWriter,
    CheckpointEvent,
    CheckpointRecord,
    RunEvent,
    RunView,
    StageAgentLink,
    StageEvent,
    StateRef,
    checkpoints_context_name,
    load_checkpoint,
    load_latest_checkpoint,
    load_run,
    registry_bundle,
    run_context_name,
)
from pforge_async.attractor.checkpoints import state_oid
from pforge_async.attractor.keys import checkpoint_key
from pforge_async.attractor.records import encode_record
from pforge_async.turnstore import FsTurnStore

pytestmark = pytest.mark.anyio

BACKENDS = ["memory", "fs", "sqlite"]
ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20


def load_example() -> ModuleType:
    """``examples/pipeline.py`` as a module (the examples are scripts, not a package)."""
    name = "pforge_example_pipeline"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / "pipeline.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


class Backend:
    """Opens a target of one kind, again and again on the same data (a restart), or a fresh one."""

    def __init__(self, kind: str, where: Path) -> None:
        self.kind = kind
        self.where = where
        self._memory = MemoryTurnStore()

    @asynccontextmanager
    async def open(self) -> AsyncIterator[Any]:
        if self.kind == "memory":
            yield self._memory  # a "restart" finds what was written, as a reopened store would
        elif self.kind == "fs":
            async with FsTurnStore(self.where, durability="normal") as fs:
                yield fs
        else:
            async with open_store(self.where, durability="normal", watch_workspaces=False) as store:
                yield store


async def problems(target: Any) -> list[str]:
    if isinstance(target, Store):
        return (await target.check()).problems
    return list(await target.check())


# -- what two runs are compared on ----------------------------------------------------------------


def _plain(record: Any) -> Any:
    """A record as builtins, without the ids the store allocated (they differ between two stores, and
    a resume's own events shift the turn ids after them)."""
    data = msgspec.to_builtins(record)
    for holder in (data, data.get("correlation", {})):
        for key in ("pipeline_context_id", "agent_context_id", "agent_head_turn_id", "child_context_id"):
            holder.pop(key, None)
        if isinstance(record, SubagentSpawn):
            holder.pop("parent_turn_id", None)
    return data


def session_outline(tree: SessionTree) -> list[Any]:
    """Every session of the tree: its name, its positional records in order and its link records."""
    sessions = []
    for _, session in tree.walk():
        positional = [(r.type_id, _plain(r.record)) for r in session.positional()]
        links = sorted(repr((r.type_id, _plain(r.record))) for r in session.records if r.seq is None)
        sessions.append((session.name, positional, links))
    return sessions


def outline(view: RunView, *, resumes: bool = False) -> list[Any]:
    """The run as stored, without store ids and (unless ``resumes``) without the resume's own events."""
    items: list[Any] = []
    for recorded in view.records:
        record = recorded.record
        if isinstance(record, RunEvent) and record.kind == "run_resumed" and not resumes:
            continue
        items.append((recorded.type_id, _plain(record)))
    for stage in view.stages:
        for attempt in stage.attempts:
            for agent in attempt.agents:
                items.append(("session", agent.link.agent_session_name, session_outline(agent.session)))
    return items


async def own_turn_keys(target: Any) -> dict[str, list[str]]:
    """For every named context: the keys of the turns appended in it (not those it shares by a fork)."""
    turns = target.turns if isinstance(target, Store) else target
    found: dict[str, list[str]] = {}
    page = await turns.list_contexts(prefix="", order="name", limit=10_000)
    for info in page.contexts:
        keys = [
            t.idempotency_key or "" async for t in turns.iter_turns(info.context_id) if t.context_id == info.context_id
        ]
        found[info.name or ""] = keys
    return found


def no_key_twice(keys: dict[str, list[str]]) -> None:
    for name, context_keys in keys.items():
        assert all(context_keys), f"{name}: a turn without a key"
        assert len(set(context_keys)) == len(context_keys), f"{name}: a record written twice"


class Crash(Exception):
    """What an in-process "kill" raises: the pipeline stops where it is, its store is closed."""


def crash_after(stage: int) -> Callable[[int], None]:
    def hook(done: int) -> None:
        if done == stage:
            raise Crash(stage)

    return hook


# -- the example pipeline: interrupted and resumed ------------------------------------------------


@pytest.mark.parametrize("kind", BACKENDS)
@pytest.mark.parametrize("crashes", [(2,), (1, 2, 3)])
async def test_resumed_run_skips_completed_stages_and_ends_as_an_uninterrupted_one(
    kind: str, crashes: tuple[int, ...], tmp_path: Path
) -> None:
    example = load_example()
    quiet: Callable[[str], None] = lambda line: None  # noqa: E731
    reference = Backend(kind, tmp_path / "reference")
    async with reference.open() as target:
        done = await example.run_pipeline(target, "run-1", say=quiet)
        assert done.resumed_from is None and done.skipped == []
        assert done.ran == ["plan#1", "implement#1", "implement#2", "review#1"]
        expected_view = await load_run(target, "run-1")
        expected_keys = await own_turn_keys(target)
        expected = done.result
    assert expected_view.event("run_resumed", "checkpoint-2") is None

    crashed = Backend(kind, tmp_path / "crashed")
    for stage in crashes:
        async with crashed.open() as target:
            with pytest.raises(Crash):
                await example.run_pipeline(target, "run-1", after_checkpoint=crash_after(stage), say=quiet)
    lines: list[str] = []
    async with crashed.open() as target:
        resumed = await example.run_pipeline(target, "run-1", say=lines.append)
        view = await load_run(target, "run-1")
        keys = await own_turn_keys(target)
        assert await problems(target) == []
    last = crashes[-1]
    done_stages = ["plan", "implement", "review"][:last]
    assert resumed.resumed_from == last
    assert resumed.skipped == done_stages
    assert resumed.ran == ["review#1"][: 3 - last]
    assert f"skipping {', '.join(done_stages)}" in lines[0], lines
    assert resumed.result == expected

    # The same view as the uninterrupted run, apart from the resumes' own events, which are there.
    assert outline(view) == outline(expected_view)
    resumes = [r.record for r in view.events if isinstance(r.record, RunEvent) and r.record.kind == "run_resumed"]
    assert [event.event_id for event in resumes] == [f"checkpoint-{stage}" for stage in crashes]
    no_key_twice(keys)
    resume_keys = {name: [k for k in ks if "run_resumed" not in k] for name, ks in keys.items()}
    assert resume_keys == {name: [k for k in ks if "run_resumed" not in k] for name, ks in expected_keys.items()}


@pytest.mark.parametrize("kind", BACKENDS)
async def test_a_retried_stage_keeps_both_attempts_each_linked_to_its_agent_session(kind: str, tmp_path: Path) -> None:
    example = load_example()
    async with Backend(kind, tmp_path / "store").open() as target:
        await example.run_pipeline(target, "retry", say=lambda line: None)
        view = await load_run(target, "retry")
        assert [stage.node_id for stage in view.stages] == ["plan", "implement", "review"]
        implement = view.stage("implement")
        first, second = implement.attempts
        assert (first.attempt, first.status, second.attempt, second.status) == (1, "failed", 2, "finished")
        assert first.error is not None and "3 failed" in first.error
        assert second.outcome == "12 tests, 12 passed"
        statuses = [[e.record.status for e in a.events] for a in implement.attempts]  # type: ignore[union-attr]
        assert statuses == [["started", "failed"], ["retried", "started", "finished"]]
        for attempt in implement.attempts:
            (agent,) = attempt.agents
            assert agent.link.agent_session_name == f"retry/implement/{attempt.attempt}"
            assert agent.session.name == agent.link.agent_session_name
            assert agent.session.context.context_id == agent.link.agent_context_id
            assert agent.link.agent_head_turn_id == agent.session.records[-1].turn.turn_id
            assert agent.session.end is not None
            assert agent.session.end.outcome == ("failed" if attempt.attempt == 1 else "completed")
        # The review's agent spawned a subagent: its tree comes with the link.
        (review,) = view.stage("review").attempts[0].agents
        assert [branch.subagent_id for branch in review.session.subagents] == ["linter"]
        checkpoint = await load_checkpoint(target, "retry", 2)
        assert checkpoint.node_retries == {"implement": 1}
        assert checkpoint.completed_nodes == ["plan", "implement"] and checkpoint.next_node == "review"
        # Every record carries its correlation.
        for recorded in view.records:
            correlation = recorded.record.correlation
            assert correlation.run_id == "retry"
            assert correlation.pipeline_context_id == view.context.context_id
            if isinstance(recorded.record, (StageEvent, StageAgentLink)):
                node, number = recorded.record.node_id, recorded.record.attempt
                assert correlation.stage_attempt_id == f"{node}#{number}" and correlation.attempt == number
            if isinstance(recorded.record, StageAgentLink):
                assert correlation.agent_session_id == recorded.record.agent_session_name
                assert correlation.agent_context_id == recorded.record.agent_context_id
                shared = correlation.to_correlation()
                assert shared.agent_session_id == recorded.record.agent_session_name
            if isinstance(recorded.record, CheckpointEvent):
                assert correlation.sequence_no == recorded.record.sequence_no
        turns = target.turns if isinstance(target, Store) else target
        assert await turns.get_registry_bundle(BUNDLE_ID) == registry_bundle()


# -- checkpoints ----------------------------------------------------------------------------------


def checkpoint(run_id: str, seq: int, context: dict[str, Any] | None = None, **changes: Any) -> CheckpointRecord:
    made = CheckpointRecord(run_id, f"cp-{seq}", seq, f"n{seq}", [f"n{i}" for i in range(1, seq + 1)], {}, {}, None)
    return msgspec.structs.replace(made, context=context or {"seq": seq}, **changes)


@pytest.mark.parametrize("kind", BACKENDS)
async def test_ten_mib_of_state_goes_through_the_cas_byte_exact(kind: str, tmp_path: Path) -> None:
    data = os.urandom(10 * MiB)
    async with Backend(kind, tmp_path / "store").open() as target:
        writer = AttractorWriter(target)
        await writer.create_run_context("big")
        small = await writer.append_checkpoint_event(checkpoint("big", 1))
        assert isinstance(small.record, CheckpointEvent) and small.record.state.oid is None
        recorded = await writer.append_checkpoint_event(checkpoint("big", 2, {"blob": data, "note": "ten"}))
        record = recorded.record
        assert isinstance(record, CheckpointEvent)
        oid = record.state.oid
        assert oid is not None and record.state.size > 10 * MiB
        assert len(recorded.turn.payload) < 2048  # a reference, not the state
        turns = target.turns if isinstance(target, Store) else target
        log = await turns.find_context(checkpoints_context_name("big"))
        assert log is not None
        head = await turns.get_turn(log.head_turn_id)
        assert len(head.payload) < 2048 and head.type_id == CHECKPOINT
        if isinstance(target, Store):
            assert await target.cas.has(oid)
        else:
            assert len(await turns.get_blob(oid)) == record.state.size
        loaded = await load_latest_checkpoint(target, "big")
        assert loaded is not None and loaded.sequence_no == 2
        assert loaded.context["blob"] == data and loaded.context["note"] == "ten"
        assert loaded == checkpoint("big", 2, {"blob": data, "note": "ten"})
        # The same checkpoint again: the stored one, nothing written.
        again = await writer.append_checkpoint_event(checkpoint("big", 2, {"blob": data, "note": "ten"}))
        assert again.turn == recorded.turn
        # A writer that would keep it inline sees the same checkpoint, not a conflict.
        inline = AttractorWriter(target, inline_state_max=64 * MiB)
        assert (await inline.append_checkpoint_event(checkpoint("big", 2, {"blob": data, "note": "ten"}))).turn == (
            recorded.turn
        )
        assert (await turns.get_head(log.context_id)).head_turn_id == head.turn_id
        assert await problems(target) == []
    async with Backend(kind, tmp_path / "store").open() as target:
        if kind != "memory":  # reopened from disk
            loaded = await load_latest_checkpoint(target, "big")
            assert loaded is not None and loaded.context["blob"] == data


@pytest.mark.parametrize("kind", BACKENDS)
async def test_every_write_again_returns_the_stored_record_and_writes_nothing(kind: str, tmp_path: Path) -> None:
    async with Backend(kind, tmp_path / "store").open() as target:
        writer: AttractorStorageWriter = AttractorWriter(target, inline_state_max=16)
        assert isinstance(writer, AttractorStorageWriter)
        run = await writer.create_run_context("idem", metadata={"team": "a"})
        assert run.context.metadata["team"] == "a" and run.checkpoints.parent_context_id == run.context_id
        recorder = await SessionRecorder.start(target, "idem-agent", mode="required")
        await recorder.session_start()
        await recorder.user_turn("go")

        async def write_all() -> list[Any]:
            return [
                await writer.append_run_event("idem", "run_started", data={"n": 1}),
                await writer.append_stage_event("idem", "a", 1, "started"),
                await writer.append_stage_to_agent_link("idem", "a", 1, agent_session_name="idem-agent"),
                await writer.append_stage_event("idem", "a", 1, "finished", outcome="ok", data=[1, 2]),
                await writer.append_checkpoint_event(checkpoint("idem", 1, {"x": "y" * 100})),
                await writer.append_run_event("idem", "run_finished"),
            ]

        first = await write_all()
        turns = target.turns if isinstance(target, Store) else target
        head = await turns.get_head(run.context_id)
        # Another writer (a restarted process) re-issuing every call, even after the agent moved on.
        await recorder.user_turn("more")
        writer = AttractorWriter(target, inline_state_max=16)
        assert (await writer.create_run_context("idem", metadata={"team": "b"})).context.metadata["team"] == "a"
        second = await write_all()
        assert [r.turn for r in second] == [r.turn for r in first]
        assert [r.record for r in second] == [r.record for r in first]
        assert await turns.get_head(run.context_id) == head
        # The same identity with other content is a conflict naming it.
        with pytest.raises(IdempotencyConflict, match=r"stage a#1 finished"):
            await writer.append_stage_event("idem", "a", 1, "finished", outcome="other")
        with pytest.raises(IdempotencyConflict, match=r"checkpoint 1"):
            await writer.append_checkpoint_event(checkpoint("idem", 1, {"x": "z"}))
        with pytest.raises(IdempotencyConflict, match=r"thread key"):
            await writer.append_stage_to_agent_link("idem", "a", 1, agent_session_name="idem-agent", thread_key="t")
        assert await turns.get_head(run.context_id) == head
        assert await problems(target) == []


@pytest.mark.parametrize("kind", BACKENDS)
async def test_sequence_numbers_never_go_backwards_even_between_concurrent_writers(kind: str, tmp_path: Path) -> None:
    async with Backend(kind, tmp_path / "store").open() as target:
        writer = AttractorWriter(target)
        await writer.create_run_context("seq")
        await writer.append_checkpoint_event(checkpoint("seq", 5))
        turns = target.turns if isinstance(target, Store) else target
        log = await turns.find_context(checkpoints_context_name("seq"))
        assert log is not None
        before = (await turns.get_head(log.context_id), await turns.get_head(log.parent_context_id))
        with pytest.raises(Conflict, match=r"run 'seq' checkpoint 3 .*never go backwards.* latest checkpoint is 5"):
            await writer.append_checkpoint_event(checkpoint("seq", 3))
        assert (await turns.get_head(log.context_id), await turns.get_head(log.parent_context_id)) == before
        # 24 tasks with two writers append sequence numbers 6..29 in a shuffled order: whatever lands,
        # the log only ever goes forward, and each refused one names the latest it lost to.
        others = [AttractorWriter(target), AttractorWriter(target)]
        order = list(range(6, 30))
        order.reverse()
        order[::3] = sorted(order[::3])
        landed: list[int] = []
        refused: list[int] = []

        async def append(seq: int) -> None:
            try:
                await others[seq % 2].append_checkpoint_event(checkpoint("seq", seq))
                landed.append(seq)
            except Conflict as exc:
                assert "never go backwards" in str(exc)
                refused.append(seq)

        async with anyio.create_task_group() as tg:
            for seq in order:
                tg.start_soon(append, seq)
        assert sorted(landed + refused) == list(range(6, 30)) and landed
        chain = [
            msgspec.msgpack.decode(t.payload, type=CheckpointEvent).sequence_no
            async for t in turns.iter_turns(log.context_id)
        ]
        assert chain == sorted(chain) and len(set(chain)) == len(chain)
        assert sorted(chain) == sorted([5, *landed])
        latest = await load_latest_checkpoint(target, "seq")
        assert latest is not None and latest.sequence_no == max(landed)
        view = await load_run(target, "seq")
        assert [c.record.sequence_no for c in view.checkpoints] == chain  # type: ignore[union-attr]


async def test_the_latest_checkpoint_costs_the_same_reads_at_ten_and_at_two_thousand_checkpoints() -> None:
    store = MemoryTurnStore()
    reads: list[str] = []
    hooks = ("_get_head", "_get_turn", "_list_turns", "_get_context", "_find_context", "_get_turn_by_key")
    for hook in (*hooks, "_chain", "_ancestor_at", "_get_blob"):
        original = getattr(store, hook)

        def counted(*args: Any, _original: Any = original, _hook: str = hook) -> Any:
            reads.append(_hook)
            return _original(*args)

        setattr(store, hook, counted)
    writer = AttractorWriter(store, inline_state_max=512)
    await writer.create_run_context("many")
    costs: dict[int, list[list[str]]] = {}
    seq = 0
    for count in (10, 2000):
        while seq < count:
            seq += 1
            await writer.append_checkpoint_event(checkpoint("many", seq, {"state": b"s" * (1024 if seq % 2 else 16)}))
        for _ in range(2):  # large state (in the blob store), then small (inline)
            reads.clear()
            latest = await load_latest_checkpoint(store, "many")
            assert latest is not None and latest.sequence_no == seq
            costs.setdefault(count, []).append(sorted(reads))
            seq += 1
            await writer.append_checkpoint_event(checkpoint("many", seq, {"state": b"s" * 16}))
    assert costs[10] == costs[2000], costs
    assert len(costs[10][0]) <= 3


# -- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", BACKENDS)
async def test_an_unknown_run_is_a_clear_not_found(kind: str, tmp_path: Path) -> None:
    async with Backend(kind, tmp_path / "store").open() as target:
        writer = AttractorWriter(target)
        for call in (
            lambda: load_run(target, "nope"),
            lambda: load_latest_checkpoint(target, "nope"),
            lambda: load_checkpoint(target, "nope", 1),
            lambda: writer.append_run_event("nope", "run_started"),
            lambda: writer.append_stage_event("nope", "a", 1, "started"),
            lambda: writer.append_checkpoint_event(checkpoint("nope", 1)),
        ):
            with pytest.raises(ContextNotFound, match=r"no pipeline run 'nope'"):
                await call()
        await writer.create_run_context("known")
        assert await load_latest_checkpoint(target, "known") is None
        with pytest.raises(NotFound, match=r"run 'known' has no checkpoint 4"):
            await load_checkpoint(target, "known", 4)
        with pytest.raises(ContextNotFound, match=r"no agent session 'ghost'"):
            await writer.append_stage_to_agent_link("known", "a", 1, agent_session_name="ghost")
        view = await load_run(target, "known")
        assert view.records == [] and view.stages == [] and view.latest_checkpoint is None


@pytest.mark.parametrize("kind", BACKENDS)
async def test_a_checkpoint_whose_state_object_is_missing_is_object_not_found_naming_it(
    kind: str, tmp_path: Path
) -> None:
    async with Backend(kind, tmp_path / "store").open() as target:
        writer = AttractorWriter(target)
        run = await writer.create_run_context("lost")
        turns = target.turns if isinstance(target, Store) else target
        oid = state_oid(b"never stored")
        state = StateRef(12, oid)
        lost = CheckpointEvent(
            "lost", "cp-1", 1, "a", ["a"], {}, state, AttractorCorrelation("lost", run.context_id), "b"
        )
        type_id, payload = encode_record(lost)
        key = checkpoint_key("lost", 1)
        await turns.append_turns(
            [
                NewTurn(run.checkpoints.context_id, type_id, payload, idempotency_key=key),
                NewTurn(run.context_id, type_id, payload, idempotency_key=key),
            ]
        )
        with pytest.raises(ObjectNotFound, match=rf"run 'lost' checkpoint 1 \('cp-1'\): its state object {oid}"):
            await load_latest_checkpoint(target, "lost")
        with pytest.raises(ObjectNotFound, match=rf"its state object {oid} is missing from the CAS"):
            await load_checkpoint(target, "lost", 1)
        assert (await load_run(target, "lost")).latest_checkpoint == lost


async def test_a_state_object_deleted_from_the_cas_on_disk_is_object_not_found_naming_it(tmp_path: Path) -> None:
    backend = Backend("sqlite", tmp_path / "store")
    packs = tmp_path / "store" / "cas" / "objects" / "pack"
    async with backend.open() as target:
        writer = AttractorWriter(target)
        await writer.create_run_context("gone")
        before = set(packs.iterdir())
        recorded = await writer.append_checkpoint_event(checkpoint("gone", 1, {"blob": os.urandom(MiB)}))
        oid = recorded.record.state.oid  # type: ignore[union-attr]
        assert oid is not None
        written = set(packs.iterdir()) - before
    assert {path.suffix for path in written} == {".pack", ".idx"}
    for path in written:
        path.unlink()
    async with backend.open() as target:
        with pytest.raises(
            ObjectNotFound, match=rf"run 'gone' checkpoint 1 \('cp-1'\): its state object {oid} is missing"
        ):
            await load_latest_checkpoint(target, "gone")


NOT_A_DICT: Any = [1]
INT_KEYS: Any = {1: "a"}


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda w: w.create_run_context(""), "run_id must be a non-empty str"),
        (lambda w: w.create_run_context(7), "run_id must be a non-empty str"),
        (lambda w: w.create_run_context("x" * 513), "run_id is over 512"),
        (lambda w: w.create_run_context("a\ud800"), "lone surrogate"),
        (lambda w: w.create_run_context("ok", metadata={"pforge.attractor": 1}), "writer's own"),
        (lambda w: w.append_stage_event("ok", "a", 0, "started"), "attempt must be an int from 1"),
        (lambda w: w.append_stage_event("ok", "a", True, "started"), "attempt must be an int from 1"),
        (lambda w: w.append_stage_event("ok", "a", 1, "done"), "status must be one of"),
        (lambda w: w.append_stage_event("ok", "", 1, "started"), "node_id must be a non-empty str"),
        (lambda w: w.append_stage_event("ok", "a", 1, "failed", error=3), "error must be a str"),
        (lambda w: w.append_stage_event("ok", "a", 1, "started", data=object()), "StageEvent record"),
        (lambda w: w.append_run_event("ok", "k", event_id=None), "event_id must be a str"),
        (lambda w: w.append_checkpoint_event({"run_id": "ok"}), "must be a CheckpointRecord"),
        (lambda w: w.append_checkpoint_event(checkpoint("ok", -1)), "sequence_no must be an int"),
        (lambda w: w.append_checkpoint_event(checkpoint("ok", 1, context=NOT_A_DICT)), "context must be a dict"),
        (lambda w: w.append_checkpoint_event(checkpoint("ok", 1, INT_KEYS)), "context keys must be str"),
        (lambda w: w.append_checkpoint_event(checkpoint("ok", 1, {"a": object()})), "cannot be encoded"),
        (lambda w: w.append_checkpoint_event(checkpoint("ok", 1, node_retries={"a": -1})), r"node_retries\['a'\]"),
        (lambda w: w.append_checkpoint_event(checkpoint("ok", 1, completed_nodes="ab")), "must be a list"),
        (lambda w: w.append_checkpoint_event(checkpoint("ok", 1, next_node="")), "next_node must be"),
        (lambda w: w.append_stage_to_agent_link("ok", "a", 1, agent_session_name=""), "agent_session_name"),
    ],
)
async def test_bad_arguments_are_refused_naming_what_is_wrong_and_nothing_is_written(
    call: Callable[[AttractorWriter], Any], message: str
) -> None:
    store = MemoryTurnStore()
    writer = AttractorWriter(store)
    run = await writer.create_run_context("ok")
    with pytest.raises(InvalidInput, match=message):
        await call(writer)
    assert (await store.get_head(run.context_id)).head_turn_id == 0
    assert len((await store.list_contexts()).contexts) == 2
    assert AttractorWriter(store, inline_state_max=0).inline_state_max == 0
    with pytest.raises(InvalidInput, match="inline_state_max"):
        AttractorWriter(store, inline_state_max=-1)
    with pytest.raises(InvalidInput, match="target must be a Store or a turn store"):
        AttractorWriter(object())  # type: ignore[arg-type]


async def test_a_run_id_cannot_reach_another_runs_contexts() -> None:
    store = MemoryTurnStore()
    writer = AttractorWriter(store)
    a = await writer.create_run_context("a")
    b = await writer.create_run_context("a/checkpoints")
    names = {a.context.name, a.checkpoints.name, b.context.name, b.checkpoints.name}
    assert len(names) == 4
    assert run_context_name("a") == "pforge.attractor.run/a"
    # A foreign context squatting a run's checkpoint-log name is refused, not written into.
    await store.open_context(checkpoints_context_name("squat"))
    with pytest.raises(IntegrityError, match="is not the checkpoint log"):
        await writer.create_run_context("squat")
