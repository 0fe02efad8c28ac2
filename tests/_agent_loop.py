"""A scripted agent loop for the agent persistence tests: an orchestrator whose subagents run
concurrently (one nests two levels deeper), a deterministic fake model and tools, and the in-memory
trace of every hook call the loop made, in the form ``tree_trace`` gives a ``SessionTree``.

Everything is a function of the session and step, so two runs (one interrupted and resumed, one not)
must leave equal trees, workspace snapshots included (the same files give the same tree id).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from pforge_async import Store, Usage
from pforge_async.agent import (
    AssistantTurn,
    Event,
    SessionEnd,
    SessionRecorder,
    SessionStart,
    SessionTree,
    SteeringTurn,
    SubagentClose,
    SystemTurn,
    ToolCall,
    ToolCallEnd,
    ToolCallStart,
    ToolResultsTurn,
    UserTurn,
)

VENDOR = "test-llm"


@dataclass
class Shape:
    """A session of the script: how many tool steps, and its subagents by id."""

    steps: int = 2
    children: dict[str, Shape] = field(default_factory=dict)


#: the default script: three concurrent subagents, one of which nests two levels deeper
SCRIPT = Shape(
    steps=2,
    children={
        "alpha": Shape(3),
        "beta": Shape(2, {"gamma": Shape(2, {"delta": Shape(1)})}),
        "epsilon": Shape(2),
    },
)


@dataclass
class SessionTrace:
    calls: list[tuple[Any, ...]] = field(default_factory=list)
    spawns: dict[str, str | None] = field(default_factory=dict)
    closes: dict[str, str] = field(default_factory=dict)
    closed: str | None = None
    fs_roots: list[str | None] = field(default_factory=list)


Trace = dict[str, SessionTrace]


def digest(output: str | bytes) -> str:
    return hashlib.sha256(output.encode() if isinstance(output, str) else output).hexdigest()


def model(name: str, step: int, last: bool) -> tuple[str, list[ToolCall], Usage]:
    usage = Usage(100 + 10 * step + len(name), 20 + step, 1000 + step)
    if last:
        return f"{name}: finished", [], usage
    call = ToolCall(f"{name}#{step}", ("grep", "edit", "test")[step % 3], {"step": step, "who": name})
    return f"{name}: step {step}", [call], usage


def tool(name: str, step: int) -> tuple[str | bytes, str | None]:
    """A tool's output and error: step 1 prints a lot (truncated in the record), step 2 returns bytes
    and fails."""
    if step == 1:
        return "".join(f"line {i} of {name}\n" for i in range(3000)), None
    if step == 2:
        return b"\x00\xffbinary " + name.encode(), "exit status 1"
    return f"{name} ok at {step}", None


@dataclass
class Loop:
    """Runs the script; ``store`` (a ``Store``) adds workspaces and budget reservations."""

    store: Store | None = None
    workspaces: Path | None = None
    trace: Trace = field(default_factory=dict)
    #: called after every hook (the crash test prints a line)
    progress: Callable[[], None] = lambda: None
    #: what the loop itself computed (the outputs it saw): unchanged whatever the recorder does
    outputs: list[str] = field(default_factory=list)

    async def run(self, recorder: SessionRecorder, shape: Shape = SCRIPT) -> None:
        await self.session(recorder, shape, root=True)

    async def hook(self, recorder: SessionRecorder, item: tuple[Any, ...], call: Any) -> Any:
        self.trace.setdefault(recorder.name, SessionTrace()).calls.append(item)
        result = await call
        self.progress()
        return result

    async def session(self, rec: SessionRecorder, shape: Shape, *, root: bool = False) -> None:
        name = rec.name
        mine = self.trace.setdefault(name, SessionTrace())
        await self.hook(rec, ("session_start", "m1"), rec.session_start(model="m1"))
        if root:
            await self.hook(rec, ("system_turn", "be brief"), rec.system_turn("be brief"))
        await self.hook(rec, ("user_turn", f"task of {name}"), rec.user_turn(f"task of {name}"))
        workspace = None
        if self.store is not None and self.workspaces is not None:
            workspace = self.workspaces / name.replace("/", "_")
            workspace.mkdir(parents=True, exist_ok=True)
        for step in range(shape.steps + 1):
            last = step == shape.steps
            text, calls, usage = model(name, step, last)
            if not isinstance(rec.peek(), AssistantTurn):  # a resumed run does not reserve again
                await rec.reserve_budget(VENDOR, tokens=1000, cost=10_000)
            item = ("assistant_turn", text, tuple((c.call_id, c.name, repr(c.arguments)) for c in calls), usage)
            await self.hook(
                rec, item, rec.assistant_turn(text, tool_calls=calls, usage=usage, model="m1", vendor=VENDOR)
            )
            if last:
                break
            (call,) = calls
            await self.hook(
                rec,
                ("tool_call_start", call.call_id, call.name, repr(call.arguments)),
                rec.tool_call_start(call.call_id, call.name, call.arguments),
            )
            output, error = tool(name, step)
            self.outputs.append(f"{name}:{step}:{digest(output)}")
            if workspace is not None:
                (workspace / f"step{step}.txt").write_text(f"{name} did step {step}\n")
            end = rec.tool_call_end(call.call_id, output, error=error, workspace=workspace)
            mine.fs_roots.append("snapshot" if workspace is not None else None)
            await self.hook(rec, ("tool_call_end", call.call_id, digest(output), error), end)
            results = rec.tool_results([(call.call_id, output, error is not None)])
            await self.hook(rec, ("tool_results", ((call.call_id, digest(output), error is not None),)), results)
            if step == 0:
                await self.hook(rec, ("event", "progress", repr({"step": 0})), rec.event("progress", {"step": 0}))
            if step == 1:
                await self.hook(rec, ("steering_turn", "hurry"), rec.steering_turn("hurry"))
        async with anyio.create_task_group() as tg:
            for sid, child_shape in shape.children.items():
                tg.start_soon(self.child, rec, sid, child_shape)
        if root:
            await self.hook(rec, ("session_end", "completed"), rec.session_end("completed"))

    async def child(self, parent: SessionRecorder, sid: str, shape: Shape) -> None:
        self.trace.setdefault(parent.name, SessionTrace()).spawns[sid] = f"thread-{sid}"
        child = await parent.spawn_subagent(sid, thread_key=f"thread-{sid}")
        self.progress()
        await self.session(child, shape)
        await child.close(f"{sid} done")
        self.trace[parent.name].closes[sid] = f"{sid} done"
        self.trace[child.name].closed = f"{sid} done"
        self.progress()


def record_item(record: Any) -> tuple[Any, ...]:
    """A positional record in the form the loop's trace has it."""
    match record:
        case SessionStart():
            return ("session_start", record.model)
        case SystemTurn():
            return ("system_turn", record.text)
        case UserTurn():
            return ("user_turn", record.text)
        case SteeringTurn():
            return ("steering_turn", record.text)
        case AssistantTurn():
            calls = tuple((c.call_id, c.name, repr(c.arguments)) for c in record.tool_calls)
            return ("assistant_turn", record.text, calls, record.usage)
        case ToolCallStart():
            return ("tool_call_start", record.call_id, record.name, repr(record.arguments))
        case ToolCallEnd():
            return ("tool_call_end", record.call_id, record.output.sha256, record.error)
        case ToolResultsTurn():
            return ("tool_results", tuple((r.call_id, r.output.sha256, r.is_error) for r in record.results))
        case Event():
            return ("event", record.name, repr(record.data))
        case SessionEnd():
            return ("session_end", record.outcome)
    raise AssertionError(f"not a positional record: {record!r}")


def tree_trace(tree: SessionTree, *, fs_roots: bool = False) -> Trace:
    """The trace a loop would have made to leave ``tree``; with ``fs_roots``, the snapshot tree ids
    themselves instead of whether there was one."""
    trace: Trace = {}
    for _, session in tree.walk():
        mine = SessionTrace()
        mine.calls = [record_item(r.record) for r in session.positional()]
        for branch in session.subagents:
            mine.spawns[branch.subagent_id] = branch.spawn.record.thread_key  # type: ignore[union-attr]
            if branch.close is not None:
                assert isinstance(branch.close.record, SubagentClose)
                mine.closes[branch.subagent_id] = branch.close.record.outcome
        if session.closed is not None:
            assert isinstance(session.closed.record, SubagentClose)
            mine.closed = session.closed.record.outcome
        for call in session.tool_calls:
            root = call.fs_root
            mine.fs_roots.append(root if fs_roots or root is None else "snapshot")
        trace[session.name] = mine
    return trace
