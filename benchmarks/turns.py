"""Turn appends under concurrent agent loops: pforge_async beside LangGraph's and the OpenAI Agents SDK's
SQLite persistence, and beside the bound (plain sqlite3 executemany in one transaction), in one run.

Run: ``python benchmarks/turns.py`` (``make bench`` installs the peers). Each of C writers appends ~1 KiB
turns and awaits each append, as an agent loop does. pforge uses durability ``"full"``; the peers
run with their own defaults. With ``--baseline REV`` the same appends also run on the pforge_async of
that git revision and on this tree, each in a child process of its own, in turn, so a regression shows
as a ratio taken in one run. Then: ``list_turns(limit=64)`` and ``fork_context`` at depth against a
shallow context; sessions (``open_context`` and ``get_context`` against ``get_head``, ``list_contexts``
over 1,000 and 1,000,000 contexts, ``append_turn`` with ``expected_head`` against without at C=64,
``iter_turns`` over 100,000 turns); and the peak memory of a process appending one million turns.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import sqlite3
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import tracemalloc
import uuid
from collections.abc import Awaitable, Callable
from functools import partial
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
        configs: dict[int, Any] = {  # RunnableConfig dicts
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

#: ``run_pforge`` in a child process, on whichever pforge_async its PYTHONPATH holds.
CHILD_APPENDS = """
import json, sys, time, anyio
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import turns as bench
import pforge_async
work, writers, per_writer = Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
cpu = []
run_callers = bench.run_callers
async def counted(*args):  # the CPU time of the appends alone (every thread of the process)
    start = time.process_time()
    elapsed = await run_callers(*args)
    cpu.append(time.process_time() - start)
    return elapsed
bench.run_callers = counted
elapsed, latencies = anyio.run(bench.run_pforge, work, writers, per_writer, bench.payloads(512))
print(json.dumps({"elapsed": elapsed, "latencies": latencies, "cpu": cpu[0], "package": pforge_async.__file__}))
"""


def checkout(rev: str, into: Path) -> Path:
    """The ``pforge_async`` package of git revision ``rev``, extracted under ``into``."""
    root = Path(__file__).resolve().parent.parent
    archive = subprocess.run(
        ["git", "-C", str(root), "archive", "--format=tar", rev, "pforge_async"], capture_output=True, check=True
    ).stdout
    dest = into / f"pforge-{rev}"
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        if hasattr(tarfile, "data_filter"):  # Python 3.10.12+, 3.11.4+
            tar.extractall(dest, filter="data")
        else:
            tar.extractall(dest)  # our own repository's archive
    return dest


def run_pforge_in_child(tree: Path, work: Path, writers: int, per_writer: int) -> tuple[float, list[float], float]:
    """Seconds, latencies and CPU seconds of ``run_pforge`` on the package in ``tree``."""
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            CHILD_APPENDS,
            str(Path(__file__).resolve().parent),
            str(work),
            str(writers),
            str(per_writer),
        ],
        env=dict(os.environ, PYTHONPATH=str(tree)),
        cwd=work,  # not the checkout: ``python -c`` looks in the working directory first
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    result = json.loads(out)
    assert Path(result["package"]).resolve().is_relative_to(tree.resolve()), result["package"]
    return result["elapsed"], result["latencies"], result["cpu"]


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
        if args.baseline_tree is not None:
            await against_baseline(args, base, writers, per_writer)


async def against_baseline(args: argparse.Namespace, base: Path, writers: int, per_writer: int) -> None:
    """This tree and the baseline revision, each in a child process, taken in turn ``--repeat`` times
    (in alternating order):
    a regression is their ratio, measured in one stretch of the run. Printed as the best of each and as
    the median of the pairs' ratios (each pair ran back to back, so a disk or a neighbour that slows a
    stretch of the run falls on both of its runs); the pairs' spread says how far either can be trusted."""
    trees = {"this tree": Path(__file__).resolve().parent.parent, args.baseline: args.baseline_tree}
    rates: dict[str, list[float]] = {label: [] for label in trees}
    cpus: dict[str, list[float]] = {label: [] for label in trees}
    for turn in range(args.repeat):
        # Each goes first in every other pair: the first run of a pair meets what the run before left
        # (dirty pages being written back, a colder cache), and that must not fall on one side only.
        for label, tree in list(trees.items())[:: 1 if turn % 2 == 0 else -1]:
            work = Path(tempfile.mkdtemp(dir=base))
            os.sync()
            elapsed, latencies, cpu = run_pforge_in_child(tree, work, writers, per_writer)
            rate = len(latencies) / elapsed
            per_append = cpu / len(latencies) * 1e6
            rates[label].append(rate)
            cpus[label].append(per_append)
            print(
                f"{writers:>3} {'pforge@' + label[:7]:>14} {len(latencies):>8} {rate:>10.0f} "
                f"{pct(latencies, 0.5):>8.2f} {pct(latencies, 0.99):>8.2f}  CPU {per_append:.1f} us/append"
            )
    mine, theirs = rates["this tree"], rates[args.baseline]
    pairs = sorted(a / b for a, b in zip(mine, theirs, strict=True))
    cpu_pairs = sorted(a / b for a, b in zip(cpus["this tree"], cpus[args.baseline], strict=True))
    print(
        f"    C={writers}: this tree / {args.baseline}: appends/s {max(mine) / max(theirs):.2f}, CPU per append "
        f"{min(cpus['this tree']) / min(cpus[args.baseline]):.2f} (best of {args.repeat} each); "
        f"median of the pairs: appends/s {statistics.median(pairs):.2f} (pairs {pairs[0]:.2f} to {pairs[-1]:.2f}), "
        f"CPU per append {statistics.median(cpu_pairs):.2f}"
    )


async def unchecked(read: Awaitable[Any]) -> Any:
    """``read`` with payload verification switched off (a baseline for what verification costs; a
    benchmark's own measurement, never a mode of the store)."""
    from pforge_async.turnstore import base as turnstore_base

    namespace = vars(turnstore_base)  # where TurnStoreBase looks verify_turn up
    verify = namespace["verify_turn"]
    namespace["verify_turn"] = lambda record: record
    try:
        return await read
    finally:
        namespace["verify_turn"] = verify


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
        verified, unverified = await paired(
            lambda: turns.list_turns(shallow.context_id, limit=64),
            lambda: unchecked(turns.list_turns(shallow.context_id, limit=64)),
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
        f"list_turns(limit=64) of 64-byte turns: {verified:.0f} us, {unverified:.0f} us with payload "
        f"verification switched off: verification costs {verified / unverified - 1:+.0%} (target <= +10%)"
    )
    print(
        f"fork_context: depth 10 {fork_shallow:.0f} us, depth {depth} {fork_deep:.0f} us, "
        f"ratio {fork_deep / fork_shallow:.2f} (target <= 2)"
    )


# -- sessions -----------------------------------------------------------------------------------------


async def paired(*calls: Callable[[], Awaitable[Any]], n: int = 300, warmup: int = 20) -> list[float]:
    """Mean microseconds of each call, the calls taken in turn so that background work (a WAL
    checkpoint, another tenant's disk) falls on all of them alike."""
    spent = [0.0] * len(calls)
    for round_ in range(warmup + n):
        for k, call in enumerate(calls):
            start = time.perf_counter()
            await call()
            if round_ >= warmup:
                spent[k] += time.perf_counter() - start
    return [total / n * 1e6 for total in spent]


def session_name(i: int) -> str:
    """100 sessions per user: ``app/u00003/s07``."""
    return f"app/u{i // 100:05d}/s{i % 100:02d}"


async def bulk_contexts(root: Path, count: int) -> None:
    """A store of ``count`` named contexts, written straight into turns.db (the schema the store
    made, one transaction): building a million through the API would take most of the run. Every
    figure below is measured through the API."""
    async with open_store(root, durability="normal", watch_workspaces=False):
        pass
    rng = random.Random(3)
    start = 1_700_000_000_000
    conn = sqlite3.connect(root / "turns.db", isolation_level=None)
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO contexts (context_id, head_turn_id, created_at_ms, name, base_turn_id, parent_context_id, "
        "metadata, updated_at_ms, updated_bucket) VALUES (?, 0, ?, ?, 0, 0, ?, ?, ?)",
        (
            (i + 1, start + i, session_name(i), b'{"user":"u%05d"}' % (i // 100), updated, updated >> 6)
            for i in range(count)
            for updated in (start + i + rng.randrange(count),)
        ),
    )
    conn.execute("COMMIT")
    conn.close()


async def list_costs(base: Path, large: int) -> None:
    small = 1000
    for count in (small, large):
        await bulk_contexts(base / f"contexts-{count}" / ".pforge", count)
    async with (
        open_store(base / f"contexts-{small}" / ".pforge", durability="normal", watch_workspaces=False) as a,
        open_store(base / f"contexts-{large}" / ".pforge", durability="normal", watch_workspaces=False) as b,
    ):
        few, many = a.turns, b.turns

        async def fifth_page(turns: Any, **kwargs: Any) -> Any:
            return await turns.list_contexts(after=cursors[id(turns), kwargs["order"]], limit=100, **kwargs)

        cursors: dict[tuple[int, str], str] = {}
        for turns in (few, many):
            for order in ("updated", "created", "name"):
                cursor: str | None = None
                for _ in range(4):
                    cursor = (await turns.list_contexts(order=order, after=cursor, limit=100)).cursor
                assert cursor is not None
                cursors[id(turns), order] = cursor
        cases: list[tuple[str, Callable[[Any], Awaitable[Any]]]] = [
            ("prefix 'app/', order name", lambda t: t.list_contexts(prefix="app/", order="name", limit=100)),
            (
                "prefix of one user (100), order updated",
                lambda t: t.list_contexts(prefix=session_name(300)[:11], limit=100),
            ),
            ("no filter, order updated", lambda t: t.list_contexts(order="updated", limit=100)),
            ("no filter, order created", lambda t: t.list_contexts(order="created", limit=100)),
            ("5th page by cursor, order updated", lambda t: fifth_page(t, order="updated")),
            ("5th page by cursor, order name", lambda t: fifth_page(t, order="name")),
        ]
        print(f"list_contexts(limit=100), {small:,} contexts against {large:,} (target: within 2x):")
        for label, call in cases:
            assert len((await call(few)).contexts) == 100 and len((await call(many)).contexts) == 100
            t_few, t_many = await paired(partial(call, few), partial(call, many), n=100, warmup=10)
            print(f"  {label:<40} {t_few:>7.0f} us {t_many:>7.0f} us  ratio {t_many / t_few:.2f}")
        # A prefix in a time order reads every context the prefix matches and sorts them (as documented):
        # here the prefix matches them all, so the cost grows with the store.
        t_few, t_many = await paired(
            partial(few.list_contexts, prefix="app/", limit=100),
            partial(many.list_contexts, prefix="app/", limit=100),
            n=3,
            warmup=1,
        )
        label = "prefix 'app/' (all), order updated"
        print(f"  {label:<40} {t_few:>7.0f} us {t_many:>7.0f} us  (grows with the matches: documented)")

        name = session_name(7_007 if large > 7_007 else 7)
        info = await many.find_context(name)
        assert info is not None
        means = [
            await paired(
                lambda: many.open_context(name),
                lambda: many.get_context(info.context_id),
                lambda: many.get_head(info.context_id),
                n=500,
            )
            for _ in range(3)
        ]
        opened, got, head = (min(column) for column in zip(*means, strict=True))  # the best of 3 rounds each
        print(
            f"open_context of an existing name {opened:.0f} us, get_context {got:.0f} us, get_head {head:.0f} us "
            f"(in the {large:,}-context store): ratios {opened / head:.2f} and {got / head:.2f} (target <= 1.5)"
        )


async def expected_head_run(work: Path, data: list[bytes], writers: int, per_writer: int, cas: bool) -> float:
    async with open_store(work / ".pforge", durability="full", watch_workspaces=False) as store:
        turns = store.turns
        contexts = [(await turns.create_context()).context_id for _ in range(writers)]
        heads = [0] * writers

        async def append(w: int, i: int, payload: bytes) -> Any:
            if not cas:
                return await turns.append_turn(contexts[w], "user", payload)
            record = await turns.append_turn(contexts[w], "user", payload, expected_head=heads[w])
            heads[w] = record.turn_id
            return record

        elapsed, latencies = await drive(writers, per_writer, data, append)
    rate = len(latencies) / elapsed
    label = "expected_head" if cas else "without"
    print(f"  C={writers} {label:<14} {rate:>8.0f} appends/s, p99 {pct(latencies, 0.99):.2f} ms")
    return rate


async def expected_head_costs(base: Path, data: list[bytes], writers: int = 64, total: int = 16384) -> None:
    """``append_turn`` with ``expected_head`` (the writer's own last turn) against without, in turn."""
    best = {False: 0.0, True: 0.0}
    for _ in range(3):
        for cas in best:
            work = Path(tempfile.mkdtemp(dir=base))
            os.sync()
            best[cas] = max(best[cas], await expected_head_run(work, data, writers, total // writers, cas))
    print(
        f"append_turn with expected_head / without at C={writers}: {best[True] / best[False]:.2f} "
        "(best of 3 each; target >= 0.90)"
    )


async def iter_costs(base: Path, depth: int = 100_000) -> None:
    from pforge_async import NewTurn

    async with open_store(base / "iter" / ".pforge", durability="normal", watch_workspaces=False) as store:
        turns = store.turns
        deep = await turns.create_context()
        shallow = await turns.create_context()
        payload = b"i" * 1024
        for at in range(0, depth, 4096):
            await turns.append_turns([NewTurn(deep.context_id, "t", payload)] * min(4096, depth - at))
        await turns.append_turns([NewTurn(shallow.context_id, "t", payload)] * 1000)

        async def walk(context_id: int, newest_first: bool, page_size: int = 256) -> int:
            count = 0
            async for _ in turns.iter_turns(context_id, newest_first=newest_first, page_size=page_size):
                count += 1
            return count

        await walk(deep.context_id, False)  # the first pass reads the file into SQLite's and the OS's caches
        elapsed = {False: float("inf"), True: float("inf")}
        for _ in range(3):  # both ways in turn, the best of each
            for newest_first in elapsed:
                start = time.perf_counter()
                assert await walk(deep.context_id, newest_first) == depth
                elapsed[newest_first] = min(elapsed[newest_first], time.perf_counter() - start)
        for newest_first in elapsed:
            peaks = []
            for page_size in (256, 4096):
                tracemalloc.start()
                await walk(deep.context_id, newest_first, page_size)
                peaks.append(tracemalloc.get_traced_memory()[1] / 1024)
                tracemalloc.stop()
            print(
                f"iter_turns over {depth:,} turns of 1 KiB, {'newest' if newest_first else 'oldest'} first: "
                f"{depth / elapsed[newest_first]:,.0f} turns/s (best of 3); peak Python memory {peaks[0]:,.0f} KiB "
                f"at page_size 256, {peaks[1]:,.0f} KiB at 4096 (chain: {depth // 1024:,} MiB)"
            )

        async def first_page(context_id: int) -> None:
            async for _ in turns.iter_turns(context_id, page_size=256):
                break

        t_shallow, t_deep = await paired(lambda: first_page(shallow.context_id), lambda: first_page(deep.context_id))
        print(
            f"iter_turns first page (256, oldest first): depth 1,000 {t_shallow:.0f} us, depth {depth:,} "
            f"{t_deep:.0f} us, ratio {t_deep / t_shallow:.2f}"
        )


async def sessions(base: Path, data: list[bytes], contexts: int) -> None:
    print("\n## sessions (durability 'normal' unless said; timed calls taken in turn)")
    await list_costs(base, contexts)
    await expected_head_costs(base, data)
    await iter_costs(base)


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
    parser.add_argument("--baseline", metavar="REV", help="also run the appends on this git revision's pforge_async")
    parser.add_argument("--repeat", type=int, default=2, help="turns of this tree and the baseline, per C")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-sessions", action="store_true")
    parser.add_argument("--contexts", type=int, default=1_000_000, help="contexts of the large list_contexts store")
    args = parser.parse_args()
    print(describe("langgraph-checkpoint-sqlite", "openai-agents"))
    print(f"# sqlite {sqlite3.sqlite_version}")
    data = payloads(512)
    with tempfile.TemporaryDirectory(prefix="pforge-bench-turns-", dir=os.environ.get("BENCH_DIR")) as tmp:
        base = Path(tmp)
        args.baseline_tree = None if args.baseline is None else checkout(args.baseline, base)
        if not args.skip_throughput:
            anyio.run(throughput, args, base, data)
        if not args.skip_depth:
            anyio.run(depth_costs, base)
        if not args.skip_sessions:
            anyio.run(sessions, base, data, args.contexts)
        if args.million:
            million(base, args.million)


if __name__ == "__main__":
    main()
