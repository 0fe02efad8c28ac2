"""Turn appends under concurrent agent loops: pforge_async beside LangGraph's and the OpenAI Agents SDK's
SQLite persistence, and beside the bound (plain sqlite3 executemany in one transaction), in one run.

Run: ``python benchmarks/turns.py`` (``make bench`` installs the peers). Each of C writers appends ~1 KiB
turns and awaits each append, as an agent loop does. pforge uses durability ``"full"``; the peers
run with their own defaults. Then: ``list_turns(limit=64)`` and ``fork_context`` at depth against a
shallow context, and the peak memory of a process appending one million turns.
"""

from __future__ import annotations

import argparse
import os
import random
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import describe, run_callers

from pforge_async import open_store

Append = Callable[[int, int, bytes], Awaitable[Any]]


def payloads(count: int) -> list[bytes]:
    rng = random.Random(11)
    alphabet = b"abcdefghijklmnopqrstuvwxyz      \n"
    return [bytes(rng.choice(alphabet) for _ in range(1024)) for _ in range(count)]


async def drive(writers: int, per_writer: int, data: list[bytes], append: Append) -> tuple[float, list[float]]:
    latencies: list[float] = []

    async def timed(n: int) -> None:
        start = time.perf_counter()
        await append(n // per_writer, n % per_writer, data[n % len(data)])
        latencies.append(time.perf_counter() - start)

    return await run_callers(writers, per_writer, timed), latencies


# -- contenders -------------------------------------------------------------------------------------


async def run_pforge(work: Path, writers: int, per_writer: int, data: list[bytes]) -> tuple[float, list[float]]:
    async with open_store(work / ".pforge", durability="full") as store:
        contexts = [(await store.turns.create_context()).context_id for _ in range(writers)]

        async def append(w: int, i: int, payload: bytes) -> Any:
            return await store.turns.append_turn(contexts[w], "user", payload)

        return await drive(writers, per_writer, data, append)


async def run_langgraph(work: Path, writers: int, per_writer: int, data: list[bytes]) -> tuple[float, list[float]]:
    from langgraph.checkpoint.base import empty_checkpoint
    from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

    async with AsyncSqliteSaver.from_conn_string(str(work / "langgraph.db")) as saver:
        await saver.setup()
        configs: dict[int, dict[str, Any]] = {
            w: {"configurable": {"thread_id": f"t{w}", "checkpoint_ns": ""}} for w in range(writers)
        }

        async def append(w: int, i: int, payload: bytes) -> Any:
            checkpoint = empty_checkpoint()
            checkpoint["id"] = str(uuid.uuid6()) if hasattr(uuid, "uuid6") else str(uuid.uuid4())
            checkpoint["channel_values"] = {"messages": payload.decode()}
            configs[w] = await saver.aput(configs[w], checkpoint, {"step": i}, {})

        return await drive(writers, per_writer, data, append)


async def run_openai_agents(work: Path, writers: int, per_writer: int, data: list[bytes]) -> tuple[float, list[float]]:
    from agents import SQLiteSession

    sessions = [SQLiteSession(f"s{w}", work / "agents.db") for w in range(writers)]

    async def append(w: int, i: int, payload: bytes) -> Any:
        await sessions[w].add_items([{"role": "user", "content": payload.decode()}])

    try:
        return await drive(writers, per_writer, data, append)
    finally:
        for session in sessions:
            session.close()


def run_bound(work: Path, writers: int, per_writer: int, data: list[bytes], per_commit: int = 0) -> float:
    """The same rows as pforge's turns table, inserted by executemany in one FULL-sync transaction
    (or, with ``per_commit``, in transactions of that many rows)."""
    conn = sqlite3.connect(work / f"bound{per_commit}.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute(
        "CREATE TABLE turns (turn_id INTEGER PRIMARY KEY, context_id INTEGER, parent_turn_id INTEGER, "
        "depth INTEGER, jump_turn_id INTEGER, jump_depth INTEGER, type_id TEXT, type_version INTEGER, "
        "payload BLOB, payload_hash TEXT, idempotency_key TEXT, created_at_ms INTEGER, fs_root TEXT)"
    )
    import hashlib

    rows = []
    for w in range(writers):
        for i in range(per_writer):
            payload = data[(w * per_writer + i) % len(data)]
            rows.append((w, i, i + 1, 0, 0, "user", 1, payload, hashlib.sha256(payload).hexdigest(), None, 0))
    step = per_commit or len(rows)
    start = time.perf_counter()
    for at in range(0, len(rows), step):
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO turns (context_id, parent_turn_id, depth, jump_turn_id, jump_depth, type_id, "
            "type_version, payload, payload_hash, idempotency_key, created_at_ms) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            rows[at : at + step],
        )
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - start
    conn.close()
    return elapsed


CONTENDERS = {"pforge": run_pforge, "langgraph": run_langgraph, "openai-agents": run_openai_agents}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def throughput(args: argparse.Namespace, base: Path, data: list[bytes]) -> None:
    print("\n## appends: C writers, each awaiting every ~1 KiB append")
    print(f"{'C':>3} {'contender':>14} {'appends':>8} {'appends/s':>10} {'p50 ms':>8} {'p99 ms':>8}")
    for writers in args.writers:
        total = args.appends if writers > 1 else args.appends_c1
        per_writer = max(1, total // writers)
        rates: dict[str, float] = {}
        p99: dict[str, float] = {}
        for name, run in CONTENDERS.items():
            work = Path(tempfile.mkdtemp(dir=base))
            os.sync()
            elapsed, latencies = await run(work, writers, per_writer, data)
            rates[name] = len(latencies) / elapsed
            p99[name] = pct(latencies, 0.99)
            print(
                f"{writers:>3} {name:>14} {len(latencies):>8} {rates[name]:>10.0f} "
                f"{pct(latencies, 0.5):>8.2f} {p99[name]:>8.2f}"
            )
        work = Path(tempfile.mkdtemp(dir=base))
        os.sync()
        bound = writers * per_writer / run_bound(work, writers, per_writer, data)
        print(f"{writers:>3} {'bound':>14} {writers * per_writer:>8} {bound:>10.0f}")
        # C writers that each await their append leave at most C rows to a commit: this is what plain
        # sqlite3 itself does under that limit, with no Python around it.
        work = Path(tempfile.mkdtemp(dir=base))
        os.sync()
        ceiling = writers * per_writer / run_bound(work, writers, per_writer, data, per_commit=writers)
        print(f"{writers:>3} {'C-row commits':>14} {writers * per_writer:>8} {ceiling:>10.0f}")
        peer = max(rates["langgraph"], rates["openai-agents"])
        print(
            f"    C={writers}: pforge {rates['pforge'] / rates['langgraph']:.1f}x langgraph, "
            f"{rates['pforge'] / rates['openai-agents']:.1f}x openai-agents, "
            f"{rates['pforge'] / peer:.2f}x the faster peer, {rates['pforge'] / bound:.2f} of the bound "
            f"(plain sqlite3 in {writers}-row commits: {ceiling / bound:.2f}), p99 {p99['pforge']:.2f} ms"
        )


async def depth_costs(base: Path) -> None:
    print("\n## cost at depth (durability 'normal' to build the chains; reads and forks timed)")
    async with open_store(base / "depth" / ".pforge", durability="normal") as store:
        turns = store.turns
        shallow = await turns.create_context()
        for _ in range(100):
            await turns.append_turn(shallow.context_id, "t", b"x" * 64)
        deep = await turns.create_context()
        depth = 100_000

        async def grow(n: int) -> None:
            for _ in range(n):
                await turns.append_turn(deep.context_id, "t", b"x" * 64)

        async with anyio.create_task_group() as tg:
            for _ in range(50):
                tg.start_soon(grow, depth // 50)
        head = await turns.get_head(deep.context_id)
        assert head.head_depth == depth, head
        ten = (await turns.list_turns(shallow.context_id, limit=64))[9]

        async def paired(*calls: Callable[[], Awaitable[Any]], n: int = 300) -> list[float]:
            """Mean microseconds of each call, the calls taken in turn so that background work (a
            WAL checkpoint, another tenant's disk) falls on all of them alike."""
            spent = [0.0] * len(calls)
            for round_ in range(20 + n):
                for k, call in enumerate(calls):
                    start = time.perf_counter()
                    await call()
                    if round_ >= 20:
                        spent[k] += time.perf_counter() - start
            return [total / n * 1e6 for total in spent]

        page = await turns.list_turns(deep.context_id, limit=64)
        list_shallow, list_deep, cursor_deep = await paired(
            lambda: turns.list_turns(shallow.context_id, limit=64),
            lambda: turns.list_turns(deep.context_id, limit=64),
            lambda: turns.list_turns(deep.context_id, before_turn_id=page[0].turn_id, limit=64),
        )
        fork_shallow, fork_deep = await paired(
            lambda: turns.fork_context(ten.turn_id), lambda: turns.fork_context(head.head_turn_id), n=200
        )
    print(
        f"list_turns(limit=64): depth 100 {list_shallow:.0f} us, depth {depth} {list_deep:.0f} us, "
        f"ratio {list_deep / list_shallow:.2f} (target <= 2); "
        f"with a cursor at depth {depth}: {cursor_deep:.0f} us"
    )
    print(
        f"fork_context: depth 10 {fork_shallow:.0f} us, depth {depth} {fork_deep:.0f} us, "
        f"ratio {fork_deep / fork_shallow:.2f} (target <= 2)"
    )


MILLION = """
import resource, sys, anyio
from pforge_async import open_store
async def main():
    total, writers = int(sys.argv[2]), 64
    async with open_store(sys.argv[1], durability="normal") as store:
        contexts = [(await store.turns.create_context()).context_id for _ in range(writers)]
        payload = b"m" * 1024
        async def writer(w):
            for _ in range(total // writers):
                await store.turns.append_turn(contexts[w], "t", payload)
        async with anyio.create_task_group() as tg:
            for w in range(writers):
                tg.start_soon(writer, w)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
anyio.run(main)
"""


def million(base: Path, total: int) -> None:
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", MILLION, str(base / "million" / ".pforge"), str(total)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    elapsed = time.perf_counter() - start
    print(f"\n## {total} turns of 1 KiB appended by 64 writers in one process (durability 'normal')")
    print(f"peak RSS {int(out) / 1024:.0f} MiB (target < 200), {total / elapsed:.0f} appends/s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--writers", type=int, nargs="+", default=[1, 16, 64])
    # 4096 appends at C=64 are 64 commits: their p99 would be the slowest commit of the run.
    parser.add_argument("--appends", type=int, default=16384, help="appends per run at C > 1")
    parser.add_argument("--appends-c1", type=int, default=500, help="appends per run at C = 1")
    parser.add_argument("--million", type=int, default=1_000_000, help="turns for the memory run (0: skip)")
    parser.add_argument("--skip-depth", action="store_true")
    args = parser.parse_args()
    print(describe("langgraph-checkpoint-sqlite", "openai-agents"))
    print(f"# sqlite {sqlite3.sqlite_version}")
    data = payloads(512)
    with tempfile.TemporaryDirectory(prefix="pforge-bench-turns-", dir=os.environ.get("BENCH_DIR")) as tmp:
        base = Path(tmp)
        anyio.run(throughput, args, base, data)
        if not args.skip_depth:
            anyio.run(depth_costs, base)
        if args.million:
            million(base, args.million)


if __name__ == "__main__":
    main()
