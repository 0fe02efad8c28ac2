"""The framework adapters against the frameworks' own SQLite persistence, in one run.

1. LangGraph: a graph of 5 nodes in a row, each appending a message to a ``messages`` channel (the
   input adds one too, so the channel grows by 6 messages a step), run on 64 concurrent threads for
   20 steps each (a step is one ``ainvoke``: 7 checkpoints and 6 pending-write batches), with
   ``PforgeSaver`` (on a fresh store) against ``AsyncSqliteSaver`` (a fresh file, its WAL setup), and
   ``InMemorySaver`` for reference: it stores nothing anywhere, so its rate is what LangGraph itself
   allows in one process, the ceiling of any checkpointer. Steps per second, p50/p99 step latency,
   and bytes on disk afterwards (the store closed first): allocated (``du``), apparent (file sizes),
   and of those what the ``-wal`` files hold (pforge keeps a WAL reserve of up to 4 MiB per database
   under durability "full", so a commit's fsync does not grow the file).
2. OpenAI Agents SDK: 64 concurrent sessions, each 20 rounds of ``add_items`` of 2 items then
   ``get_items``, with ``PforgeSession`` against ``SQLiteSession`` (one file, as its docs show), and
   two ceilings: the SDK's own in-memory ``SQLiteSession`` (its default ``":memory:"``: the same
   threads and SQL, no disk) and a session that keeps a list and stores nothing. Rounds per second
   and p50/p99 round latency.

Each comparison runs ``--runs`` times (savers alternating, so noise hits both) and prints medians, and
as min / median / max of the runs' own ratios: ours over the baseline, each ceiling over the
baseline, and ours over each ceiling. When even a ceiling that stores nothing stays below the
target, it says so: the target is then out of reach for any storage, and the CPU per step shows
where the time goes (the framework's own work is the ceiling's). ``cpu ms`` is the process's CPU
time (every thread) per step or round. Both pforge stores use the default durability, ``"full"``
(fsync per group commit); both SQLite baselines sync every commit. Targets (issue 15): at least 5x
the throughput of each, at most half the bytes on disk of ``AsyncSqliteSaver``.

    python benchmarks/adapters.py [--threads 64] [--steps 20] [--sessions 64] [--rounds 20] [--runs 3] [--quick]
                                  [--only langgraph|openai]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypedDict, cast

from langchain_core.messages import AIMessage, AnyMessage, HumanMessage
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._bench import describe

TEXT = (
    "The quarterly figures came in under the forecast, so the team is revisiting the plan: "
    "shipping dates, the hiring freeze and what the customers asked for in the last review. "
)

Row = dict[str, Any]


def disk_bytes(root: Path) -> tuple[int, int, int]:
    """(allocated, apparent, allocated to ``-wal`` files) bytes of every file under ``root``."""
    allocated = apparent = wal = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            allocated += st.st_blocks * 512
            apparent += st.st_size
            if name.endswith("-wal"):
                wal += st.st_blocks * 512
    return allocated, apparent, wal


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def timed_callers(
    callers: int, rounds: int, op: Callable[[int, int], Awaitable[None]]
) -> tuple[float, list[float], float]:
    """Wall seconds, per-call latencies and CPU seconds (the whole process: every thread) of
    ``callers`` tasks each calling ``op(caller, round)``."""
    latencies: list[float] = []

    async def caller(c: int) -> None:
        for r in range(rounds):
            start = time.perf_counter()
            await op(c, r)
            latencies.append(time.perf_counter() - start)

    cpu = time.process_time()
    start = time.perf_counter()
    await asyncio.gather(*(caller(c) for c in range(callers)))
    return time.perf_counter() - start, latencies, time.process_time() - cpu


def row(
    name: str,
    rate: str,
    count: int,
    timed: tuple[float, list[float], float],
    size: tuple[int, int, int],
    note: str = "",
) -> Row:
    """One contender's figures; ``note``: what makes it a ceiling (rows after the baseline)."""
    seconds, latencies, cpu = timed
    return {
        "name": name,
        "note": note,
        rate: count / seconds,
        "cpu ms": cpu / count * 1e3,
        "p50 ms": pct(latencies, 0.5) * 1e3,
        "p99 ms": pct(latencies, 0.99) * 1e3,
        "du": size[0],
        "bytes": size[1],
        "wal": size[2],
    }


# -- LangGraph -----------------------------------------------------------------------------------


class State(TypedDict, total=False):
    messages: Annotated[list[AnyMessage], add_messages]
    step: int


def build_graph(checkpointer: Any) -> Any:
    def node(name: str) -> Callable[[State], State]:
        def run(state: State) -> State:
            n = len(state.get("messages", []))
            return {"messages": [AIMessage(f"{name} at {n}: {TEXT}")], "step": n}

        return run

    builder = StateGraph(State)
    names = [f"n{i}" for i in range(5)]
    for name in names:
        builder.add_node(name, cast(Any, node(name)))
    builder.add_edge(START, names[0])
    for a, b in itertools.pairwise(names):
        builder.add_edge(a, b)
    builder.add_edge(names[-1], END)
    return builder.compile(checkpointer=checkpointer)


async def langgraph_run(checkpointer: Any, threads: int, steps: int) -> tuple[float, list[float], float]:
    graph = build_graph(checkpointer)

    async def step(thread: int, n: int) -> None:
        cfg = {"configurable": {"thread_id": f"thread-{thread}"}}
        out = await graph.ainvoke({"messages": [HumanMessage(f"question {n}: {TEXT}")]}, cfg)
        assert len(out["messages"]) == 6 * (n + 1), len(out["messages"])

    return await timed_callers(threads, steps, step)


async def bench_langgraph(work: Path, threads: int, steps: int, run: int) -> list[Row]:
    from langgraph.checkpoint.memory import InMemorySaver
    from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

    from pforge_async import open_store
    from pforge_async.integrations.langgraph import PforgeSaver

    count = threads * steps
    rows = []
    root = work / f"pforge-langgraph-{run}"
    async with open_store(root) as store:
        timed = await langgraph_run(PforgeSaver(store), threads, steps)
    rows.append(row("PforgeSaver", "steps/s", count, timed, disk_bytes(root)))
    db = work / f"sqlite-langgraph-{run}"
    db.mkdir()
    async with AsyncSqliteSaver.from_conn_string(str(db / "checkpoints.db")) as saver:
        timed = await langgraph_run(saver, threads, steps)
    rows.append(row("AsyncSqliteSaver", "steps/s", count, timed, disk_bytes(db)))
    timed = await langgraph_run(InMemorySaver(), threads, steps)
    rows.append(row("InMemorySaver (no I/O)", "steps/s", count, timed, (0, 0, 0), "it stores nothing"))
    return rows


# -- OpenAI Agents SDK --------------------------------------------------------------------------


class DictSession:
    """A session that stores nothing but a list: what a session round costs when storage costs
    nothing, the ceiling of any session here."""

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id
        self.items: list[Any] = []

    async def add_items(self, items: list[Any]) -> None:
        self.items.extend(items)

    async def get_items(self, limit: int | None = None) -> list[Any]:
        return list(self.items if limit is None else self.items[-limit:])


async def sessions_run(make: Callable[[int], Any], sessions: int, rounds: int) -> tuple[float, list[float], float]:
    objects = [make(i) for i in range(sessions)]

    async def one_round(s: int, r: int) -> None:
        session = objects[s]
        await session.add_items(
            [{"role": "user", "content": f"q{r} {TEXT}"}, {"role": "assistant", "content": f"a{r} {TEXT}"}]
        )
        items = await session.get_items()
        assert len(items) == 2 * (r + 1)

    return await timed_callers(sessions, rounds, one_round)


async def bench_openai(work: Path, sessions: int, rounds: int, run: int) -> list[Row]:
    from agents import SQLiteSession

    from pforge_async import open_store
    from pforge_async.integrations.openai_agents import PforgeSession

    count = sessions * rounds
    rows = []
    root = work / f"pforge-openai-{run}"
    async with open_store(root) as store:
        timed = await sessions_run(lambda i: PforgeSession(f"s{i}", store), sessions, rounds)
    rows.append(row("PforgeSession", "rounds/s", count, timed, disk_bytes(root)))
    db = work / f"sqlite-openai-{run}"
    db.mkdir()
    for name, path in (("SQLiteSession", db / "sessions.db"), ("SQLiteSession(:memory:)", None)):
        made: list[Any] = []

        def make(i: int, path: Path | None = path, made: list[Any] = made) -> Any:
            # The SDK's own in-memory session (its default db_path): no disk, the same threads and SQL.
            made.append(SQLiteSession(f"s{i}") if path is None else SQLiteSession(f"s{i}", path))
            return made[-1]

        timed = await sessions_run(make, sessions, rounds)
        for session in made:
            session.close()
        size = disk_bytes(db) if path is not None else (0, 0, 0)
        rows.append(row(name, "rounds/s", count, timed, size, "" if path is not None else "the SDK's SQL, no disk"))
    timed = await sessions_run(lambda i: DictSession(f"s{i}"), sessions, rounds)
    rows.append(row("dict session (no storage)", "rounds/s", count, timed, (0, 0, 0), "it stores nothing"))
    return rows


def spread(values: list[float]) -> str:
    """min / median / max of the runs' values."""
    return f"{min(values):.2f}x / {statistics.median(values):.2f}x / {max(values):.2f}x"


def show(title: str, runs: list[list[Row]], rate: str, target: float) -> None:
    """The median of each figure over the runs, then the throughput ratios as min / median / max of
    the runs' own ratios: ours (row 0) over the baseline (row 1), each ceiling (rows 2 on) over the
    baseline, and ours over each ceiling. A ceiling stores nothing, so its ratio to the baseline is
    the most any storage could reach: when it is below the target, the target is out of reach for
    every implementation, and ours over the ceiling says how much of the reachable part we get."""
    print(f"\n## {title} (median of {len(runs)} run{'s' if len(runs) > 1 else ''})")
    print(
        f"{'':26} {rate:>10} {'cpu ms':>7} {'p50 ms':>9} {'p99 ms':>9} {'du KiB':>10} {'bytes KiB':>10} {'WAL KiB':>8}"
    )
    rows: list[Row] = []
    for i, first in enumerate(runs[0]):
        median: Row = {"name": first["name"], "note": first.get("note", "")}
        for key in (rate, "cpu ms", "p50 ms", "p99 ms", "du", "bytes", "wal"):
            median[key] = statistics.median(run[i][key] for run in runs)
        rows.append(median)
        print(
            f"{median['name']:26} {median[rate]:10.1f} {median['cpu ms']:7.2f} {median['p50 ms']:9.1f} "
            f"{median['p99 ms']:9.1f} {median['du'] / 1024:10.0f} {median['bytes'] / 1024:10.0f} "
            f"{median['wal'] / 1024:8.0f}"
        )
    unit = rate.split("/")[0][:-1]
    print(f"(cpu ms: CPU time of the whole process, every thread, per {unit})")

    def ratios(a: int, b: int) -> list[float]:
        return [run[a][rate] / run[b][rate] for run in runs]

    ours, theirs = rows[0]["name"], rows[1]["name"]
    print(f"throughput ratios, min / median / max of the runs' own (target: {ours} >= {target:g}x {theirs}):")
    print(f"  {ours + ' / ' + theirs:52} {spread(ratios(0, 1))}")
    for i in range(2, len(rows)):
        ceiling = rows[i]["name"]
        print(f"  {ceiling + ' / ' + theirs:52} {spread(ratios(i, 1))}   (a ceiling: {rows[i]['note']})")
        print(f"  {ours + ' / ' + ceiling:52} {spread(ratios(0, i))}")
    best = max(range(2, len(rows)), key=lambda i: statistics.median(ratios(i, 1)), default=None)
    if best is not None and statistics.median(ratios(best, 1)) < target:
        reach = statistics.median(ratios(best, 1))
        print(
            f"=> {target:g}x is out of reach for any storage here: {rows[best]['name']}, which stores nothing, "
            f"reaches {reach:.2f}x {theirs} (median); {ours} reaches {statistics.median(ratios(0, best)):.0%} of it"
        )
        spent = rows[best]["cpu ms"]
        print(
            f"   CPU per {unit}: {spent:.2f} ms with {rows[best]['name']} (the framework's own work), "
            f"{rows[1]['cpu ms'] - spent:+.2f} ms with {theirs}, {rows[0]['cpu ms'] - spent:+.2f} ms with {ours}"
        )
    print(f"p99 latency: {rows[0]['p99 ms'] / rows[1]['p99 ms']:.2f}x {theirs}'s")
    without_wal = (rows[0]["du"] - rows[0]["wal"]) / max(1, rows[1]["du"] - rows[1]["wal"])
    print(
        f"on disk: {rows[0]['du'] / rows[1]['du']:.2f}x allocated, {rows[0]['bytes'] / rows[1]['bytes']:.2f}x "
        f"apparent; {without_wal:.2f}x allocated without the WAL files"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sessions", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="8 threads x 3 steps, 8 sessions x 3 rounds, 1 run")
    parser.add_argument("--only", choices=("langgraph", "openai"), help="run one of the two comparisons")
    args = parser.parse_args()
    if args.quick:
        args.threads, args.steps, args.sessions, args.rounds, args.runs = 8, 3, 8, 3, 1
    print(describe("langgraph", "langgraph-checkpoint", "langgraph-checkpoint-sqlite", "openai-agents"))
    with tempfile.TemporaryDirectory(prefix="pforge-bench-adapters-") as tmp:
        work = Path(tmp)
        if args.only != "openai":
            graph = [await bench_langgraph(work, args.threads, args.steps, run) for run in range(args.runs)]
            show(f"LangGraph: {args.threads} threads x {args.steps} steps of a 5-node graph", graph, "steps/s", 5)
        if args.only != "langgraph":
            sessions = [await bench_openai(work, args.sessions, args.rounds, run) for run in range(args.runs)]
            title = f"OpenAI Agents sessions: {args.sessions} x {args.rounds} rounds (add 2, get all)"
            show(title, sessions, "rounds/s", 5)
    print("\n(the machine is shared and noisy: the spread between runs is part of the figure)")


if __name__ == "__main__":
    asyncio.run(main())
