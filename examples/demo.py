"""An orchestrator and 16 concurrent subagents (two of them with a helper of their own) persisting
their loops through ``SessionRecorder`` on the embedded store in ./.pforge.

Each subagent does several tool steps with a scripted fake model (no network). At every step it
reserves token budget for the model call, records the model's answer (which commits the spend), takes
a capability nonce for the tool and consumes it, runs the tool in its own workspace, records the call
with a snapshot of that workspace attached, and records what it learned in constellation memory.
Then the session tree is rebuilt from the store alone and printed.

The session name is fixed ("demo"), so running it again resumes the recorded session: a complete one
is left as it is (nothing is run, nothing is added to any database, and the demo checks and says so);
one that was interrupted continues where it stopped. ``--session NAME`` runs another session.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shlex
import sqlite3
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import anyio

from pforge_async import Store, Usage, agent_key, open_store
from pforge_async.agent import (
    AssistantTurn,
    SessionEnd,
    SessionRecorder,
    ToolCall,
    ToolCallEnd,
    load_session_tree,
)

SESSION = "demo"
SUBAGENTS = 16
STEPS = 6
#: the subagents that spawn a helper of their own
HELPERS = (3, 11)
VENDOR = "demo-llm"
MODEL = "scripted-1"
TOOLS = ("grep", "edit", "test")


@dataclass
class Workload:
    """What a run of the demo's loop does; the benchmark runs it too."""

    subagents: int = SUBAGENTS
    steps: int = STEPS
    helpers: tuple[int, ...] = HELPERS
    #: how long the fake model "thinks", in seconds (0: answers at once)
    think_s: float = 0.002
    #: what the benchmark uses to time each hook; the demo leaves recorders as they are
    wrap: Callable[[SessionRecorder], SessionRecorder] = lambda recorder: recorder
    #: how many tool steps this run did (a resumed run does fewer)
    steps_run: int = 0
    steps_skipped: int = 0
    sessions: list[str] = field(default_factory=list)


# -- the scripted model ---------------------------------------------------------------------------


def scripted_reply(agent: str, step: int, steps: int) -> AssistantTurn:
    """What the fake model answers at ``step`` of ``agent``: a tool call, or at the end a summary.
    The same agent and step always give the same answer (and usage), as a replayed model would."""
    rng = random.Random(f"{agent}/{step}")
    usage = Usage(
        input_tokens=rng.randint(500, 2000), output_tokens=rng.randint(50, 800), cost=rng.randint(2, 9) * 1000
    )
    if step == steps:
        return AssistantTurn(0, f"{agent}: done, all tests pass.", [], usage, MODEL, VENDOR)
    tool = TOOLS[(len(agent) + step) % len(TOOLS)]
    call = ToolCall(f"call-{step}", tool, {"path": f"src/mod{step}.py", "step": step})
    return AssistantTurn(0, f"{agent}: step {step}, calling {tool}", [call], usage, MODEL, VENDOR)


async def think(recorder: SessionRecorder, agent: str, step: int, workload: Workload) -> AssistantTurn:
    """One model call, persisted: the recorded answer if this turn is recorded (a resumed run asks
    the model nothing), else reserve budget, ask the scripted model and record the answer."""
    recorded = recorder.peek()
    if isinstance(recorded, AssistantTurn):
        reply = recorded
    else:
        await recorder.reserve_budget(VENDOR, tokens=4000, cost=20_000, model=MODEL)
        if workload.think_s:
            await anyio.sleep(workload.think_s)
        reply = scripted_reply(agent, step, workload.steps)
    await recorder.assistant_turn(
        reply.text, tool_calls=reply.tool_calls, usage=reply.usage, model=reply.model, vendor=reply.vendor
    )
    return reply


# -- the tool -------------------------------------------------------------------------------------


async def run_tool(store: Store, agent: str, call: ToolCall, workspace: Path) -> str:
    """The tool's work: a capability nonce taken and consumed, a file written in the workspace."""
    subject = f"tool:{call.name}:{agent}"
    nonce = await store.nonces.issue(subject, ttl_s=60)
    await store.nonces.consume(nonce, subject)  # a second consume of this nonce: NonceReplayed
    step = call.arguments["step"]
    target = workspace / call.arguments["path"]
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(f"# {call.name} by {agent}\nresult = {step}\n")
    if call.name == "grep":  # a big output: the record keeps 16 KiB of it, the CAS all of it
        return "".join(f"src/mod{i}.py:{i}: match {agent}\n" for i in range(2000))
    return f"{call.name} ok at step {step}"


# -- the loops ------------------------------------------------------------------------------------


async def agent_loop(store: Store, recorder: SessionRecorder, task: str, steps: int, workload: Workload) -> None:
    """A subagent's loop. Re-run on a recorded session, it re-issues its hook calls (which write
    nothing) and skips the work they say was done."""
    agent = recorder.name
    workload.sessions.append(agent)
    await recorder.session_start(model=MODEL)
    await recorder.user_turn(task)
    with tempfile.TemporaryDirectory(prefix="pforge-demo-") as tmp:
        workspace = Path(tmp) / "ws"
        done = [r for r in recorder.records if isinstance(r.record, ToolCallEnd) and r.turn.fs_root]
        if done:  # a resumed run: the workspace as the last recorded step left it
            await store.cas.restore(done[-1].turn.fs_root or "", workspace)
        else:
            workspace.mkdir()
        for step in range(steps):
            reply = await think(recorder, agent, step, workload)
            (call,) = reply.tool_calls
            await recorder.tool_call_start(call.call_id, call.name, call.arguments)
            recorded = recorder.peek()
            if isinstance(recorded, ToolCallEnd):  # done before: not run again
                kept = recorded.output
                output = (await store.cas.read_blob(kept.oid)).decode() if kept.oid else kept.text
                workload.steps_skipped += 1
            else:
                output = await run_tool(store, agent, call, workspace)
                await store.memory.record_transition(
                    f"step{step}",
                    call.name,
                    f"step{step + 1}",
                    reward=random.Random(f"{agent}/{step}/reward").random(),
                    success=True,
                    idempotency_key=agent_key(agent, step, "learn"),
                )
                workload.steps_run += 1
            await recorder.tool_call_end(call.call_id, output, workspace=workspace)
            await recorder.tool_results([(call.call_id, output)])
    await think(recorder, agent, steps, workload)


async def subagent(store: Store, parent: SessionRecorder, n: int, workload: Workload) -> None:
    recorder = workload.wrap(await parent.spawn_subagent(f"agent{n:02d}", thread_key=f"pkg{n:02d}"))
    task = f"Fix the failing tests of package pkg{n:02d}."
    await agent_loop(store, recorder, task, workload.steps, workload)
    if n in workload.helpers:
        helper = workload.wrap(await recorder.spawn_subagent("helper", thread_key=f"pkg{n:02d}/docs"))
        await agent_loop(store, helper, f"Update the docs of pkg{n:02d}.", 2, workload)
        await helper.close("docs updated")
    await recorder.close("tests pass")


async def orchestrate(store: Store, session: str, workload: Workload) -> SessionRecorder:
    """The orchestrator's loop: plan, run every subagent concurrently, sum up."""
    orchestrator = workload.wrap(await SessionRecorder.start(store, session, metadata={"example": "demo"}))
    workload.sessions.append(session)
    await orchestrator.session_start(model=MODEL)
    await orchestrator.system_turn(f"You coordinate {workload.subagents} subagents, one per package.")
    await orchestrator.user_turn("Fix the failing tests in every package.")
    await think(orchestrator, session, workload.steps, workload)
    async with anyio.create_task_group() as tg:
        for n in range(workload.subagents):
            tg.start_soon(subagent, store, orchestrator, n, workload)
    await orchestrator.event("all subagents closed", {"subagents": workload.subagents})
    await orchestrator.session_end("completed")
    return orchestrator


# -- what the demo prints -------------------------------------------------------------------------


def fingerprint(root: Path) -> dict[str, str]:
    """A digest of every table of every database of the store, and the list of CAS objects and refs:
    read from the files (the store is closed), to show what a run changed."""
    digests: dict[str, str] = {}
    for db in sorted(root.glob("*.db")):
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            digest = hashlib.sha256()
            tables = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name").fetchall()
            for (table,) in tables:
                rows = sorted(repr(row) for row in conn.execute(f'SELECT * FROM "{table}"'))
                digest.update(f"{table}:{len(rows)}:{rows}".encode())
            digests[db.name] = digest.hexdigest()
        finally:
            conn.close()
    names = []
    for sub in ("objects", "refs"):
        for dirpath, _, files in os.walk(root / "cas" / sub):
            names += [os.path.join(dirpath, f) for f in files]
    digests["cas"] = hashlib.sha256("\n".join(sorted(names)).encode()).hexdigest()
    return digests


async def main(session: str, root: Path) -> None:
    before = fingerprint(root) if root.exists() else {}
    workload = Workload()
    started = time.perf_counter()
    async with open_store(root) as store:
        existing = await store.turns.find_context(session)
        resumed = existing is not None
        complete = False
        if resumed:
            recorded = await SessionRecorder.start(store, session)
            complete = any(isinstance(r.record, SessionEnd) for r in recorded.records)
        failures = 0
        if not complete:
            await store.budget.set_budget(VENDOR, tokens=10**12, cost=10**12)
            orchestrator = await orchestrate(store, session, workload)
            failures = len(orchestrator.failures)
        elapsed = time.perf_counter() - started
        tree = await load_session_tree(store, session)
        totals = await store.budget.totals(VENDOR, tags={"session": session})
        held = await store.budget.list_reservations(VENDOR, tags={"session": session})
        check = await store.check()
        cas_path = store.cas.path
    after = fingerprint(root)

    sessions = list(tree.walk())
    records = sum(len(t.records) for _, t in sessions)
    calls = [call for _, t in sessions for call in t.tool_calls]
    snapshots = sum(1 for call in calls if call.fs_root)
    ends = [call.end.record for call in calls if call.end is not None]
    truncated = sum(1 for end in ends if isinstance(end, ToolCallEnd) and end.output.truncated)
    print(f"store: {root} (durability {store.durability}); session {session!r}")
    if complete:
        changed = [name for name in after if before.get(name) != after[name]]
        print(f"resumed: session {session!r} was already complete, so nothing was run.")
        if changed:
            print(f"but these parts of the store changed: {', '.join(changed)}")
        else:
            print("nothing was added: every table of every database, and the CAS, is as it was (compared by content)")
        print("(run `python examples/demo.py --session NAME` for a new session)")
    else:
        if resumed:
            print(
                f"resumed an interrupted session: {workload.steps_skipped} tool steps were recorded already and skipped"
            )
        steps = workload.steps_run
        print(
            f"ran {workload.subagents} subagents ({len(workload.helpers)} with a helper of their own) and "
            f"{steps} tool steps in {elapsed:.2f} s, all concurrent on one event loop: {steps / elapsed:.0f} steps/s"
        )
        print(f"persistence failures (best_effort mode): {failures}")
    print("\nsession tree, rebuilt from the store alone:")
    print(tree.summary(max_sessions=6))
    print(
        f"{len(sessions)} sessions, {records} records, {len(calls)} tool calls paired start to end, "
        f"{snapshots} workspace snapshots attached, {truncated} outputs truncated (kept whole in the CAS)"
    )
    print(
        f"\nbudget {VENDOR} for this session: {totals.tokens} tokens, {totals.cost / 1e6:.3f} units spent, "
        f"{len(held)} reservations left held, overdrawn by {totals.over_tokens} tokens"
    )
    verdict = "ok" if check.ok else "; ".join(check.problems)
    print(f"store check (every object re-hashed, every database and invariant verified): {verdict}")
    pforge = f".venv/bin/pforge --root {shlex.quote(str(root))}"
    commands = [(f"{pforge} tree {shlex.quote(session)}", "every session, its tool calls and spend")]
    if tree.subagents:
        first = tree.subagents[0].session
        commands.append((f"{pforge} log {shlex.quote(first.name)}", "a subagent's turns, decoded"))
        ends = [call.end for call in first.tool_calls if call.end is not None and call.fs_root]
        if len(ends) > 1:
            turns = f"{ends[0].turn.turn_id} {ends[-1].turn.turn_id}"
            commands.append((f"{pforge} diff {turns}", "its workspace, from the first step to the last"))
    commands.append((f"{pforge} budget", "spend, held and remaining"))
    commands.append((f"{pforge} check", "every object re-hashed, every database verified"))
    commands.append((f"git --git-dir {shlex.quote(os.path.relpath(cas_path))} fsck --strict --no-dangling", ""))
    width = max(len(command) for command, _ in commands)
    print("\nlook further:")
    for command, why in commands:
        print(f"  {command.ljust(width)}  # {why}" if why else f"  {command}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--session", default=SESSION, help=f"the session name (default {SESSION!r}: resumes)")
    parser.add_argument("--root", default=".pforge", type=Path, help="the store (default ./.pforge)")
    args = parser.parse_args()
    anyio.run(main, args.session, args.root)
