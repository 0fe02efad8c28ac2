"""A three-stage pipeline (plan -> implement -> review) that survives being killed.

Each stage is run by a scripted agent (no network) whose session is recorded through
``SessionRecorder``; the run itself is recorded through ``AttractorWriter``: run and stage events, a
link from each stage attempt to its agent session, and a checkpoint after each stage (the
implementation's patch makes the second checkpoint's state large enough to go into the CAS). The first
attempt of ``implement`` fails its tests and is retried.

    python examples/pipeline.py                          # run (or resume) the run "pipeline-demo"
    python examples/pipeline.py --kill-after-stage 2     # SIGKILL itself after stage 2's checkpoint
    python examples/pipeline.py                          # resumes from that checkpoint

A run started again with the same ``--run-id`` loads its latest checkpoint and skips the stages it
completed (and says so); a stage that was cut short is run again, and its agent's calls that were
recorded already are found, not written twice. Finally the run is read back from the store alone
(``load_run``) and its result printed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from pforge_async import SessionRecorder, ToolCall, connect
from pforge_async.agent import ToolCallEnd
from pforge_async.attractor import (
    AttractorWriter,
    CheckpointEvent,
    CheckpointRecord,
    Target,
    load_latest_checkpoint,
    load_run,
)

RUN_ID = "pipeline-demo"
NODES = ("plan", "implement", "review")
TOOLS = {"plan": "read_issue", "implement": "run_tests", "review": "diff"}
TASK = "Add retry with backoff to the HTTP client."
MAX_ATTEMPTS = 2
MODEL = "scripted-1"


class PipelineFailed(Exception):
    """A stage failed on its last attempt."""


@dataclass
class PipelineResult:
    """What a call of :func:`run_pipeline` did: the run's result, the checkpoint it resumed from (None
    for a fresh run), the stages it skipped because a checkpoint had them done, and the stage attempts
    it ran (a resumed attempt counts)."""

    result: dict[str, Any]
    resumed_from: int | None = None
    skipped: list[str] = field(default_factory=list)
    ran: list[str] = field(default_factory=list)


# -- the scripted agent ---------------------------------------------------------------------------


def tool_output(node: str, attempt: int, context: dict[str, Any], fail_once: tuple[str, ...]) -> tuple[str, bool]:
    """What the stage's tool prints, and whether the stage failed: the same inputs always give the
    same output, as a replayed tool would."""
    if node == "plan":
        return "3 steps: wrap send() in a retry loop; exponential backoff with jitter; tests", False
    if node == "implement":
        if node in fail_once and attempt == 1:
            return "12 tests, 3 failed: test_backoff_caps, test_jitter, test_retry_on_503", True
        return "12 tests, 12 passed", False
    patch = context["implement"]["patch"]
    return f"approved: {len(patch)} bytes of diff (sha256 {hashlib.sha256(patch).hexdigest()[:16]}), lint clean", False


def make_patch(attempt: int) -> bytes:
    """The implementation's patch: ~200 KiB, deterministic (so a checkpoint of it goes to the CAS)."""
    lines = [f"+    delay = min(cap, base * 2 ** {i % 12})  # attempt {attempt}, line {i}\n" for i in range(3000)]
    return "".join(lines).encode()


async def run_agent(
    target: Target,
    run_id: str,
    node: str,
    attempt: int,
    context: dict[str, Any],
    fail_once: tuple[str, ...],
    step: Callable[[], None],
    say: Callable[[str], None],
) -> tuple[SessionRecorder, str, bool]:
    """One stage attempt done by a scripted agent, its session recorded. Returns the recorder, the
    tool's output and whether the attempt failed."""
    recorder = await SessionRecorder.start(
        target, f"{run_id}/{node}/{attempt}", mode="required", metadata={"run_id": run_id, "node": node}
    )
    if recorder.position:
        say(f"  agent session {recorder.name!r}: {recorder.position} calls recorded before, found not repeated")
    tool = TOOLS[node]
    await recorder.session_start(model=MODEL)
    step()
    await recorder.user_turn(f"{node}: {TASK}")
    step()
    call = ToolCall("call-1", tool, {"node": node, "attempt": attempt})
    await recorder.assistant_turn(f"Running {tool}.", tool_calls=[call], model=MODEL)
    step()
    await recorder.tool_call_start(call.call_id, call.name, call.arguments)
    step()
    if isinstance(recorder.peek(), ToolCallEnd):
        say(f"  tool {tool} ran before the interruption: its recorded output is used")
    output, failed = tool_output(node, attempt, context, fail_once)
    await recorder.tool_call_end(call.call_id, output, error="tests failed" if failed else None)
    step()
    await recorder.tool_results([(call.call_id, output, failed)])
    step()
    if node == "review":
        linter = await recorder.spawn_subagent("linter", thread_key="lint")
        step()
        await linter.session_start(model=MODEL)
        await linter.user_turn("Lint the diff.")
        await linter.assistant_turn("No findings.", model=MODEL)
        await linter.close("clean")
        step()
    answer = "Tests fail; needs another attempt." if failed else f"{node} done."
    await recorder.assistant_turn(answer, model=MODEL)
    step()
    await recorder.session_end("failed" if failed else "completed")
    step()
    return recorder, output, failed


# -- the pipeline ---------------------------------------------------------------------------------


def final_result(context: dict[str, Any]) -> dict[str, Any]:
    patch = context["implement"]["patch"]
    return {
        "task": context["task"],
        "plan": context["plan"]["text"],
        "tests": context["implement"]["tests"],
        "patch_sha256": hashlib.sha256(patch).hexdigest(),
        "review": context["review"]["text"],
    }


async def run_pipeline(
    target: Target,
    run_id: str = RUN_ID,
    *,
    fail_once: tuple[str, ...] = ("implement",),
    after_checkpoint: Callable[[int], None] = lambda stage: None,
    step: Callable[[], None] = lambda: None,
    say: Callable[[str], None] = print,
) -> PipelineResult:
    """Run (or resume) the pipeline ``run_id`` in ``target``. ``after_checkpoint(n)`` is called once
    stage ``n``'s checkpoint is written (the CLI's ``--kill-after-stage`` kills the process there);
    ``step()`` after every write to the store."""
    writer = AttractorWriter(target)
    run = await writer.create_run_context(run_id, metadata={"task": TASK, "nodes": list(NODES)})
    step()
    latest = await load_latest_checkpoint(target, run_id)
    outcome = PipelineResult({})
    if latest is None:
        context: dict[str, Any] = {"task": TASK}
        completed: list[str] = []
        retries: dict[str, int] = {}
        seq = 0
        if run.context.head_turn_id:
            say(f"run {run_id!r}: no checkpoint yet, starting over (what was recorded is found, not repeated)")
        else:
            say(f"run {run_id!r}: starting {' -> '.join(NODES)}")
        await writer.append_run_event(run_id, "run_started", data={"nodes": list(NODES)})
        step()
    else:
        # Where the run stood at its latest checkpoint: what a resume needs, state loaded back.
        context, completed, retries = latest.context, latest.completed_nodes, latest.node_retries
        seq = latest.sequence_no
        outcome.resumed_from, outcome.skipped = seq, list(completed)
        if latest.next_node is None and (await load_run(target, run_id)).event("run_finished") is not None:
            say(f"run {run_id!r} finished already: nothing to do")
            outcome.result = final_result(context)
            return outcome
        say(
            f"run {run_id!r}: resuming from checkpoint {seq} (after {latest.current_node}): "
            f"skipping {', '.join(completed)}; next {latest.next_node or 'nothing (only the end is left)'}"
        )
        await writer.append_run_event(
            run_id, "run_resumed", event_id=f"checkpoint-{seq}", data={"from_checkpoint": seq, "skipped": completed}
        )
        step()
    for index, node in enumerate(NODES):
        if node in completed:
            continue
        attempt = retries.get(node, 0) + 1
        while True:
            await writer.append_stage_event(run_id, node, attempt, "started")
            step()
            outcome.ran.append(f"{node}#{attempt}")
            recorder, output, failed = await run_agent(target, run_id, node, attempt, context, fail_once, step, say)
            await writer.append_stage_to_agent_link(
                run_id, node, attempt, agent_session_name=recorder.name, agent_context_id=recorder.context_id
            )
            step()
            if not failed:
                await writer.append_stage_event(run_id, node, attempt, "finished", outcome=output)
                step()
                say(f"stage {index + 1} {node} (attempt {attempt}): finished: {output}")
                break
            await writer.append_stage_event(run_id, node, attempt, "failed", error=output)
            step()
            say(f"stage {index + 1} {node} (attempt {attempt}): failed: {output}")
            if attempt >= MAX_ATTEMPTS:
                await writer.append_run_event(run_id, "run_failed", data={"node": node, "attempt": attempt})
                raise PipelineFailed(f"stage {node} failed {attempt} times")
            attempt += 1
            retries[node] = attempt - 1
            await writer.append_stage_event(run_id, node, attempt, "retried", data={"after": output})
            step()
        if node == "implement":
            context[node] = {"tests": output, "patch": make_patch(attempt)}
        else:
            context[node] = {"text": output}
        completed.append(node)
        seq += 1
        next_node = NODES[index + 1] if index + 1 < len(NODES) else None
        recorded = await writer.append_checkpoint_event(
            CheckpointRecord(run_id, f"after-{node}", seq, node, list(completed), dict(retries), context, next_node)
        )
        step()
        assert isinstance(recorded.record, CheckpointEvent)
        state = recorded.record.state
        where = f"in the CAS as {state.oid[:16]}..." if state.oid else "inline"
        say(f"checkpoint {seq} (after {node}): state {state.size} bytes {where}")
        after_checkpoint(index + 1)
    outcome.result = final_result(context)
    await writer.append_run_event(run_id, "run_finished", data=outcome.result)
    step()
    return outcome


# -- the command ----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=".pforge", help="the store (default ./.pforge)")
    parser.add_argument("--run-id", default=RUN_ID)
    parser.add_argument(
        "--kill-after-stage", type=int, metavar="N", help="SIGKILL this process after stage N's checkpoint"
    )
    parser.add_argument("--durability", choices=("full", "normal"), default="full")
    parser.add_argument("--fail-once", default="implement", help="stages whose first attempt fails (comma-separated)")
    parser.add_argument("--progress", action="store_true", help="print 'write' after every write (for tests)")
    args = parser.parse_args()
    fail_once = tuple(name for name in args.fail_once.split(",") if name)

    def after_checkpoint(stage: int) -> None:
        if stage == args.kill_after_stage:
            print(f"stage {stage}'s checkpoint is written: killing this process (SIGKILL)", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    def step() -> None:
        if args.progress:
            print("write", flush=True)

    def say(line: str) -> None:
        print(line, flush=True)

    async def go() -> None:
        async with connect(Path(args.root), durability=args.durability) as store:
            done = await run_pipeline(
                store, args.run_id, fail_once=fail_once, after_checkpoint=after_checkpoint, step=step, say=say
            )
            view = await load_run(store, args.run_id)
            say(view.summary())
            say("result: " + json.dumps(done.result, sort_keys=True))

    try:
        anyio.run(go)
    except PipelineFailed as exc:
        print(f"pipeline failed: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
