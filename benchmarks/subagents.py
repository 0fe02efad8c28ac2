"""Agent loops persisting through ``SessionRecorder``: the demo's workload, and the same plain loop
beside the OpenAI Agents SDK's ``SQLiteSession`` and LangGraph's ``AsyncSqliteSaver``, in one run.

Run: ``python benchmarks/subagents.py`` (``make bench`` installs the peers). The fake model answers
in 0 ms. Three parts:

1. ``off`` mode: what one hook costs a loop that persists nothing (and an empty ``async def`` beside it).
2. The demo's workload (``examples/demo.py`` without printing) at 1, 16 and 64 concurrent subagents x
   20 steps, on a store with durability ``"full"``: each step reserves budget, records the model's
   answer (committing the spend), consumes a capability nonce, writes a file, records the tool call
   with a workspace snapshot, the tool results and a constellation transition. Steps/s, p99 of one
   hook, and the share of a loop's time spent in hooks; then the same workload with the recorder off.
3. The plain loop, beside the peers: per step, the model's answer, the tool call's start and end and
   the tool results (4 records). Two ways, each side making the same number of durable writes: a
   write per record (pforge: 4 awaited hooks; the OpenAI Agents SDK: 4 ``SQLiteSession.add_items``;
   LangGraph: 4 ``AsyncSqliteSaver.aput`` of a checkpoint holding the record), and a write per step
   (pforge: the 4 hooks in one ``recorder.batch()``; the peers: one ``add_items`` of the 4 items, one
   ``aput`` of a checkpoint holding them: the step's messages, not the growing history). Every
   contender's call returns only once its write is committed: pforge with durability ``"full"``,
   the peers with their own defaults (SQLite in WAL mode, ``synchronous=FULL``: each commit syncs
   the WAL, as pforge's do). The difference is how calls share a commit: the peers commit each call
   on its own (one at a time, under a lock); pforge's turn actor commits the calls waiting together
   as one transaction (group commit), so its ``commits`` column is smaller than its ``writes``.
   What is timed is the steps only: the sessions are made before the clock starts (pforge's
   subagent forks and spawn links; the peers' session objects and tables) and pforge's close records
   are written after it, so every contender makes exactly the writes in the ``writes`` column.
   Each C runs ``--runs`` times (contenders alternating, so noise hits all); the throughput ratios
   are given as min / median / max of the runs' own ratios, beside two ceilings measured in the
   same runs: the pforge loop with durability ``"normal"`` (no fsync) and on a ``MemoryTurnStore``
   (no I/O at all); with a write per step, also ``bare sqlite``: no store, only the step's 4 rows
   keyed and group-committed (what any SQLite store in this process could at best reach, so what
   bounds pforge's ratio). ``--parts`` picks what runs.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import os
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import anyio
import msgspec

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "examples"))
import demo  # noqa: E402
from _bench import describe  # noqa: E402

from pforge_async import MemoryTurnStore, Store, ToolCall, Usage, open_store  # noqa: E402
from pforge_async.agent import SessionRecorder  # noqa: E402

HOOKS = {
    "session_start",
    "session_end",
    "user_turn",
    "assistant_turn",
    "tool_results",
    "system_turn",
    "steering_turn",
    "tool_call_start",
    "tool_call_end",
    "event",
    "spawn_subagent",
    "close",
    "reserve_budget",
}


class Timed:
    """A recorder whose every hook call is timed into ``latencies``."""

    def __init__(self, inner: SessionRecorder, latencies: list[float]) -> None:
        self._inner = inner
        self._latencies = latencies

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._inner, name)
        if name not in HOOKS:
            return value
        latencies = self._latencies

        async def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return await value(*args, **kwargs)
            finally:
                latencies.append(time.perf_counter() - start)

        # Kept: the next call finds it without __getattr__ (the peers' loops time their calls
        # inline, so the wrapper should cost pforge as little).
        self.__dict__[name] = timed
        return timed


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else 0.0


# -- 1. off mode -----------------------------------------------------------------------------------


async def off_mode(n: int) -> None:
    print("\n## off mode: one hook, persisting nothing")
    recorder = await SessionRecorder.start(None, "off", mode="off")

    async def nothing(text: str) -> None:
        return None

    rows = []
    for label, call in (
        ("user_turn(text)", lambda: recorder.user_turn("hello")),
        ("tool_call_end(id, output)", lambda: recorder.tool_call_end("c1", "output")),
        ("empty async def, for scale", lambda: nothing("hello")),
    ):
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(n):
                await call()
            best = min(best, (time.perf_counter() - start) / n)
        rows.append((label, best))
    for label, seconds in rows:
        print(f"  {label:<30} {seconds * 1e9:8.0f} ns per call (best of 5 x {n}, lambda and loop included)")


# -- 2. the demo's workload ------------------------------------------------------------------------


async def demo_workload(base: Path, subagents: int, steps: int, mode: str, durability: str) -> dict[str, float]:
    latencies: list[float] = []
    loops: list[float] = []
    workload = demo.Workload(subagents=subagents, steps=steps, helpers=(), think_s=0)
    if mode == "off":
        workload.wrap = lambda recorder: recorder
    else:
        workload.wrap = lambda recorder: cast(SessionRecorder, Timed(recorder, latencies))
    work = Path(tempfile.mkdtemp(dir=base))
    os.sync()
    async with open_store(work / ".pforge", durability=durability) as store:  # type: ignore[arg-type]
        await store.budget.set_budget(demo.VENDOR, tokens=10**12, cost=10**12)
        original = demo.agent_loop

        async def timed_loop(*args: Any) -> None:
            start = time.perf_counter()
            await original(*args)
            loops.append(time.perf_counter() - start)

        demo.agent_loop = timed_loop  # type: ignore[assignment]
        try:
            if mode == "off":
                recorder = await SessionRecorder.start(None, "bench", mode="off")
                start = time.perf_counter()
                await off_orchestrate(store, recorder, workload)
            else:
                start = time.perf_counter()
                await demo.orchestrate(store, "bench", workload)
            elapsed = time.perf_counter() - start
        finally:
            demo.agent_loop = original  # type: ignore[assignment]
        if mode != "off":
            assert (await store.budget.list_reservations()) == []
    done = subagents * steps
    return {
        "steps_s": done / elapsed,
        "elapsed": elapsed,
        "hooks": len(latencies),
        "p50": pct(latencies, 0.5),
        "p99": pct(latencies, 0.99),
        # a subagent loop's own time spent awaiting hooks, over the loop's time
        "share": sum(latencies) / sum(loops) if loops and latencies else 0.0,
    }


async def off_orchestrate(store: Store, orchestrator: SessionRecorder, workload: demo.Workload) -> None:
    """``demo.orchestrate`` with an ``off`` recorder (it starts its own on the store otherwise)."""
    async with anyio.create_task_group() as tg:
        for n in range(workload.subagents):
            tg.start_soon(demo.subagent, store, orchestrator, n, workload)


# -- 3. the plain loop beside the peers ------------------------------------------------------------


def step_items(agent: int, step: int) -> tuple[str, ToolCall, str, Usage]:
    call = ToolCall(f"call-{agent}-{step}", "grep", {"pattern": "TODO", "step": step})
    return f"agent {agent} step {step}: calling grep", call, f"{step} matches in src/", Usage(900, 120, 4000)


async def drive(subagents: int, loop: Callable[[int], Awaitable[None]]) -> float:
    """Run ``loop`` for every subagent at once; the seconds it took (its CPU time, every thread's,
    goes to ``DRIVE_CPU``: the timed steps', without opening and closing stores and sessions)."""
    cpu = time.process_time()
    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for agent in range(subagents):
            tg.start_soon(loop, agent)
    elapsed = time.perf_counter() - start
    DRIVE_CPU[:] = [time.process_time() - cpu]
    return elapsed


#: the CPU time of the last ``drive``
DRIVE_CPU: list[float] = []


async def plain_pforge(
    work: Path,
    subagents: int,
    steps: int,
    latencies: list[float],
    *,
    batched: bool = False,
    durability: str = "full",
    memory: bool = False,
) -> float:
    """Each subagent a forked session; its 4 hooks per step awaited one by one, or (``batched``)
    written as one ``recorder.batch()``: one durable write per step, as the peers make. The
    ceilings: ``durability="normal"`` (no fsync: what the loop reaches when the disk's sync costs
    nothing) and ``memory`` (a ``MemoryTurnStore``: no I/O at all, only the recorder's and the turn
    store's own work)."""
    COMMITS.clear()
    if memory:
        return await plain_pforge_on(MemoryTurnStore(), subagents, steps, latencies, batched)
    async with open_store(work / ".pforge", durability=durability) as store:  # type: ignore[arg-type]
        return await plain_pforge_on(store, subagents, steps, latencies, batched)


#: the commits pforge's turn actor made in the last timed loop (a statistic the actor keeps; the
#: peers commit once per call), or nothing when it is not known
COMMITS: list[int] = []


def turn_commits(target: Store | MemoryTurnStore) -> int | None:
    actor = getattr(getattr(target, "turns", None), "_actor", None)  # the benchmark peeks; no API
    batches = getattr(actor, "batches", None)
    return batches if isinstance(batches, int) else None


async def plain_pforge_on(
    target: Store | MemoryTurnStore, subagents: int, steps: int, latencies: list[float], batched: bool
) -> float:
    orchestrator = await SessionRecorder.start(target, "plain")
    await orchestrator.session_start()
    # Set up before the clock starts, as the peers' sessions are: the subagents' forks and link
    # records (and their close records, after it) are writes the peers make none of.
    children: list[SessionRecorder] = [None] * subagents  # type: ignore[list-item]

    async def spawn(agent: int) -> None:
        children[agent] = await orchestrator.spawn_subagent(f"a{agent}")

    await drive(subagents, spawn)
    before = turn_commits(target)

    async def loop(agent: int) -> None:
        child = children[agent]
        clock = time.perf_counter
        for step in range(steps):
            text, call, output, usage = step_items(agent, step)
            start = clock()
            if batched:
                async with child.batch():
                    await child.assistant_turn(text, tool_calls=[call], usage=usage)
                    await child.tool_call_start(call.call_id, call.name, call.arguments)
                    await child.tool_call_end(call.call_id, output)
                    await child.tool_results([(call.call_id, output)])
                latencies.append(clock() - start)
                continue
            # Each hook timed inline, as the peers' calls are (no wrapper between the loop and it).
            start = clock()
            await child.assistant_turn(text, tool_calls=[call], usage=usage)
            latencies.append(clock() - start)
            start = clock()
            await child.tool_call_start(call.call_id, call.name, call.arguments)
            latencies.append(clock() - start)
            start = clock()
            await child.tool_call_end(call.call_id, output)
            latencies.append(clock() - start)
            start = clock()
            await child.tool_results([(call.call_id, output)])
            latencies.append(clock() - start)

    elapsed = await drive(subagents, loop)
    after = turn_commits(target)
    if before is not None and after is not None:
        COMMITS.append(after - before)
    for child in children:
        await child.close()
    assert not orchestrator.failures, orchestrator.failures[:1]
    return elapsed


def items_of(agent: int, step: int) -> list[Any]:
    """The step's 4 records as the peers hold them."""
    text, call, output, _ = step_items(agent, step)
    return [
        {"role": "assistant", "content": text},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": repr(call.arguments)},
        {"type": "function_call_output", "call_id": call.call_id, "output": output},
        {"role": "user", "content": f"tool results: {output}"},
    ]


async def plain_openai(
    work: Path, subagents: int, steps: int, latencies: list[float], *, per_step: bool = False
) -> float:
    """One ``add_items`` per record (4 per step), or (``per_step``) one of the step's 4 items."""
    from agents import SQLiteSession

    sessions = [SQLiteSession(f"a{agent}", work / "agents.db") for agent in range(subagents)]

    async def loop(agent: int) -> None:
        for step in range(steps):
            items = items_of(agent, step)
            for group in [items] if per_step else [[item] for item in items]:
                start = time.perf_counter()
                await sessions[agent].add_items(group)
                latencies.append(time.perf_counter() - start)

    try:
        return await drive(subagents, loop)
    finally:
        for session in sessions:
            session.close()


async def plain_langgraph(
    work: Path, subagents: int, steps: int, latencies: list[float], *, per_step: bool = False
) -> float:
    """One ``aput`` of a checkpoint per record (4 per step), or (``per_step``) one holding the step's
    4 records (the step's messages, not the growing history)."""
    from langgraph.checkpoint.base import empty_checkpoint
    from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

    async with AsyncSqliteSaver.from_conn_string(str(work / "langgraph.db")) as saver:
        await saver.setup()

        async def loop(agent: int) -> None:
            config: Any = {"configurable": {"thread_id": f"a{agent}", "checkpoint_ns": ""}}
            for step in range(steps):
                items = items_of(agent, step)
                for group in [items] if per_step else [[item] for item in items]:
                    checkpoint = empty_checkpoint()
                    checkpoint["id"] = str(uuid.uuid6()) if hasattr(uuid, "uuid6") else str(uuid.uuid4())
                    checkpoint["channel_values"] = {"messages": group}
                    start = time.perf_counter()
                    config = await saver.aput(config, checkpoint, {"step": step}, {})
                    latencies.append(time.perf_counter() - start)

        return await drive(subagents, loop)


#: the floor's table: the columns of a turn that a store of any design writes (no DAG links, no
#: refs), and the same unique (context, key) index as pforge's turns table
_FLOOR_SCHEMA = """
CREATE TABLE turns (
    turn_id INTEGER PRIMARY KEY, context_id INTEGER NOT NULL, parent_turn_id INTEGER NOT NULL,
    type_id TEXT NOT NULL, payload BLOB NOT NULL, payload_hash TEXT NOT NULL, idempotency_key TEXT,
    created_at_ms INTEGER NOT NULL
);
CREATE UNIQUE INDEX turns_idempotency ON turns (context_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
"""
_FLOOR_KINDS = ("assistant_turn", "tool_call_start", "tool_call_end", "tool_results")


async def plain_bare(work: Path, subagents: int, steps: int, latencies: list[float]) -> float:
    """Not a contender: the least any store could do for a durable, keyed write per step in this
    process. Each step's 4 records (the peers' items, msgpack-encoded, each hashed and keyed) go to
    one writer that commits every waiting step in one transaction (group commit, as pforge's turn
    actor does) on a thread, in WAL mode with ``synchronous=FULL``: no validation, no idempotency
    lookups, no turn DAG, no recorder, no replies but a future. pforge's per-step write does all of
    those on top; its ratio over a peer can only approach this one's."""
    conn = sqlite3.connect(work / "floor.db", isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.executescript(_FLOOR_SCHEMA)
    encoder = msgspec.msgpack.Encoder()
    waiting: list[tuple[list[tuple[Any, ...]], asyncio.Future[None]]] = []
    commits = 0
    wake = asyncio.Event()
    heads = [0] * subagents
    next_id = 1

    def commit(rows: list[tuple[Any, ...]]) -> None:
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT INTO turns VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
        conn.execute("COMMIT")

    async def writer() -> None:
        nonlocal commits
        while True:
            await wake.wait()
            wake.clear()
            batch = waiting[:]
            del waiting[:]
            await anyio.to_thread.run_sync(commit, [row for rows, _ in batch for row in rows])
            commits += 1
            for _, done in batch:
                done.set_result(None)

    async def loop(agent: int) -> None:
        nonlocal next_id
        loop_ = asyncio.get_running_loop()
        for step in range(steps):
            start = time.perf_counter()
            now = int(time.time() * 1000)
            rows = []
            for n, (item, kind) in enumerate(zip(items_of(agent, step), _FLOOR_KINDS, strict=True)):
                payload = encoder.encode(item)
                key = f"plain/a{agent}|{step * 4 + n}|{kind}"
                rows.append(
                    (next_id, agent, heads[agent], kind, payload, hashlib.sha256(payload).hexdigest(), key, now)
                )
                heads[agent] = next_id
                next_id += 1
            done: asyncio.Future[None] = loop_.create_future()
            waiting.append((rows, done))
            wake.set()
            await done
            latencies.append(time.perf_counter() - start)

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(writer)
            elapsed = await drive(subagents, loop)
            tg.cancel_scope.cancel()
        COMMITS[:] = [commits]
        return elapsed
    finally:
        conn.close()


Run = Callable[[Path, int, int, list[float]], Awaitable[float]]
#: contenders that make a durable write per record, and those that make one per step; the rows
#: after the peers are ceilings (no fsync; no I/O at all; no store at all), not contenders
PER_RECORD: dict[str, Run] = {
    "pforge": plain_pforge,
    "openai-agents": plain_openai,
    "langgraph": plain_langgraph,
    "pforge no-fsync": lambda *args: plain_pforge(*args, durability="normal"),
    "pforge memory": lambda *args: plain_pforge(*args, memory=True),
}
PER_STEP: dict[str, Run] = {
    "pforge": lambda *args: plain_pforge(*args, batched=True),
    "openai-agents": lambda *args: plain_openai(*args, per_step=True),
    "langgraph": lambda *args: plain_langgraph(*args, per_step=True),
    "pforge no-fsync": lambda *args: plain_pforge(*args, batched=True, durability="normal"),
    "pforge memory": lambda *args: plain_pforge(*args, batched=True, memory=True),
    "bare sqlite": plain_bare,
}
PEERS = ("openai-agents", "langgraph")
CEILINGS = ("pforge no-fsync", "pforge memory", "bare sqlite")
#: issue 11's target at 64 subagents: pforge's steps/s over each peer's
TARGET = 10


def spread(values: list[float]) -> str:
    """min / median / max of the runs' values."""
    return f"{min(values):5.1f}x / {statistics.median(values):5.1f}x / {max(values):5.1f}x"


async def demo_part(base: Path, args: argparse.Namespace) -> None:
    print(f"\n## the demo's workload: C subagents x {args.steps} steps, durability {args.durability!r}, model 0 ms")
    print(f"{'C':>3} {'recorder':>9} {'steps/s':>8} {'hooks':>6} {'p50 ms':>7} {'p99 ms':>7} {'in hooks':>9}")
    for subagents in args.subagents:
        gc.collect()
        on = await demo_workload(base, subagents, args.steps, "best_effort", args.durability)
        gc.collect()
        off = await demo_workload(base, subagents, args.steps, "off", args.durability)
        for label, row in (("on", on), ("off", off)):
            print(
                f"{subagents:>3} {label:>9} {row['steps_s']:>8.0f} {row['hooks']:>6.0f} {row['p50']:>7.2f} "
                f"{row['p99']:>7.2f} {row['share']:>8.0%}"
            )
        print(f"    C={subagents}: the recorder on takes {on['elapsed'] / off['elapsed']:.2f}x the loop's time off")


async def plain_part(base: Path, args: argparse.Namespace) -> None:
    for label, contenders in (("a write per record (4 per step)", PER_RECORD), ("a write per step", PER_STEP)):
        print(f"\n## the plain loop, {label}: C subagents x {args.steps} steps of 4 records, {args.runs} runs")
        print(
            f"{'C':>3} {'run':>3} {'contender':>16} {'steps/s':>8} {'cpu ms':>7} {'writes':>7} {'commits':>7} "
            f"{'p50 ms':>7} {'p99 ms':>7}"
        )
        for subagents in args.subagents:
            runs: list[dict[str, float]] = []
            cpus: dict[str, list[float]] = {}
            for run_no in range(args.runs):
                rates: dict[str, float] = {}
                for name, run in contenders.items():
                    work = Path(tempfile.mkdtemp(dir=base))
                    os.sync()
                    gc.collect()  # the garbage of the runs before is collected now, not during this one
                    latencies: list[float] = []
                    elapsed = await run(work, subagents, args.steps, latencies)
                    cpu = DRIVE_CPU[0]
                    rates[name] = subagents * args.steps / elapsed
                    cpus.setdefault(name, []).append(cpu / (subagents * args.steps))
                    # a peer's call commits on its own; the others count their group commits
                    commits = str(len(latencies)) if name in PEERS else str(COMMITS[-1]) if COMMITS else "-"
                    print(
                        f"{subagents:>3} {run_no + 1:>3} {name:>16} {rates[name]:>8.0f} "
                        f"{cpu / (subagents * args.steps) * 1e3:>7.2f} {len(latencies):>7} {commits:>7} "
                        f"{pct(latencies, 0.5):>7.2f} {pct(latencies, 0.99):>7.2f}"
                    )
                runs.append(rates)
            print(f"    C={subagents}: steps/s over each peer's, min / median / max of the runs' ratios:")
            for peer in PEERS:
                ours = [rates["pforge"] / rates[peer] for rates in runs]
                line = f"      over {peer:<14} pforge {spread(ours)}"
                for ceiling in (name for name in CEILINGS if name in contenders):
                    line += f"; ceiling ({ceiling}) {spread([rates[ceiling] / rates[peer] for rates in runs])}"
                print(line + (f"   (target {TARGET}x)" if subagents == 64 else ""))
            # pforge is bound by its CPU, the peers by their one-at-a-time commits: where other work
            # takes the cores, the throughput ratio falls toward the ratio of CPU per step.
            mine = statistics.median(cpus["pforge"])
            line = f"      CPU per step (median): pforge {mine * 1e3:.2f} ms"
            for peer in PEERS:
                theirs = statistics.median(cpus[peer])
                line += f"; {peer} {theirs * 1e3:.2f} ms ({theirs / mine:.1f}x pforge's)"
            print(line)
    print("(cpu ms: CPU time of the whole process, every thread, per timed step; pforge no-fsync and pforge memory are")
    print(" ceilings: the same loop with durability 'normal', and on a MemoryTurnStore, with no I/O at all; bare")
    print(" sqlite (a write per step only) is no store: the step's 4 rows, keyed, group-committed with nothing else,")
    print(" what any SQLite store in this process could at best reach)")
    print(" pforge's throughput is bound by its CPU (the event loop's thread above all), the peers' by their")
    print(" commits, made one at a time: where other processes take the cores, pforge's ratio over a peer")
    print(" falls toward the ratio of their CPU per step)")


async def main(args: argparse.Namespace) -> None:
    print(describe("openai-agents", "langgraph-checkpoint", "langgraph-checkpoint-sqlite"))
    if "off" in args.parts:
        await off_mode(args.off_calls)
    with tempfile.TemporaryDirectory(prefix="pforge-bench-", dir=args.dir) as tmp:
        base = Path(tmp)
        if "demo" in args.parts:
            await demo_part(base, args)
        if "plain" in args.parts:
            await plain_part(base, args)
    print("\n(the machine is shared and noisy: the spread between runs is part of the figure)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--subagents", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3, help="of the plain loop (each contender, alternating)")
    parser.add_argument("--off-calls", type=int, default=200_000)
    parser.add_argument("--durability", choices=["full", "normal"], default="full", help="of the demo's workload")
    parser.add_argument("--dir", default=None, help="where the stores go (default: the system temp dir)")
    parser.add_argument(
        "--parts", nargs="+", choices=["off", "demo", "plain"], default=["off", "demo", "plain"], help="what to run"
    )
    anyio.run(main, parser.parse_args())
