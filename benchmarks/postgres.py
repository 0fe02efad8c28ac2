"""The store on PostgreSQL against LangGraph's own PostgreSQL checkpointer, in one run on one server.

A private server is started for the run (tests/_pg.py: ``initdb`` + ``pg_ctl`` in a temporary
directory, fsync ON, the server's default settings but for ``max_connections``), or the server named
by ``PFORGE_TEST_PG_DSN``; its version and the settings that decide commit cost are printed first.

1. Checkpoint appends (``aput``) at C=1 and C=64 writers, each on its own thread, each checkpoint
   carrying a ~1 KiB channel value that changes every step: ``PforgeSaver`` on a ``PgStore``
   (durability "full": each group commit waits for the server's WAL flush) against LangGraph's
   ``AsyncPostgresSaver`` (langgraph-checkpoint-postgres with psycopg 3, autocommit, so every
   statement waits for its own flush), twice: on one connection as ``from_conn_string`` makes it, and
   on a pool of 64 connections (its instance lock still lets one call at a time through). The first
   write of each thread is made before the clock starts for both. Appends/s, p50/p99 latency.
2. Scaling: 1, 2, 4 and 8 processes, each opening its own ``PgStore`` on one shared schema (as
   machines sharing one store would) with 64 writers, all started together on a barrier, counted over
   the same ``--window`` seconds: appends/s in all and against one process.
3. CAS objects: 10,000 distinct 4 KiB blobs written (``write_blob``) by 64 tasks, then all read back
   (``read_blob``, each re-hashed) by 64 tasks; objects/s and MiB/s.

Where the time goes: CPU seconds per append of the benchmark process(es) and of the server (every
server process, read from /proc while the connections live; only for a private server) are printed
beside each figure. The machine has 2 cores shared by the client(s) and the server. Figures are
min / median / max over ``--runs`` runs; ratios are each run's own ratio, then min / median / max.
Targets (issue 16): C=64 at least 10x ``AsyncPostgresSaver``; 4 processes at least 2x one.

    python benchmarks/postgres.py [--runs 3] [--window 5] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncpg

from benchmarks._bench import describe
from tests._pg import PgCluster, pg_server

SETTINGS = (
    "fsync",
    "synchronous_commit",
    "wal_sync_method",
    "full_page_writes",
    "commit_delay",
    "shared_buffers",
    "wal_buffers",
    "max_wal_size",
    "checkpoint_timeout",
    "max_connections",
)

Saver = Any  # PforgeSaver or AsyncPostgresSaver: both have LangGraph's aput
Row = dict[str, float]


# -- what runs on the server ---------------------------------------------------------------------


def server_cpu(cluster: PgCluster | None) -> float | None:
    """CPU seconds used so far by every process of the private server (None for an outside one)."""
    if cluster is None:
        return None
    try:
        with open(os.path.join(cluster.data, "postmaster.pid")) as f:
            postmaster = int(f.readline())
    except OSError:
        return None
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            pid, ppid = int(entry), int(fields[1])
            if pid != postmaster and ppid != postmaster:
                continue
            try:
                # Nanoseconds on a CPU: /proc/PID/stat's clock ticks (10 ms) truncate each of the
                # dozens of backends that live through a row, a bias of up to a tick per backend.
                with open(f"/proc/{entry}/schedstat") as f:
                    total += int(f.read().split()[0]) / 1e9
            except (OSError, ValueError, IndexError):
                total += (int(fields[11]) + int(fields[12])) / tick
        except OSError:
            continue  # a process gone meanwhile
    return total


async def server_facts(dsn: str) -> str:
    conn = await asyncpg.connect(dsn)
    try:
        version = await conn.fetchval("SELECT version()")
        rows = await conn.fetch("SELECT name, setting, unit FROM pg_settings WHERE name = ANY($1::text[])", SETTINGS)
    finally:
        await conn.close()
    found = {r["name"]: f"{r['setting']}{'' if not r['unit'] else ' x ' + r['unit']}" for r in rows}
    return f"# server: {version}\n# " + ", ".join(f"{name}={found.get(name, '?')}" for name in SETTINGS)


async def execute(dsn: str, sql: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def with_database(dsn: str, database: str) -> str:
    return dsn.rsplit("/", 1)[0] + "/" + database


# -- checkpoint writers --------------------------------------------------------------------------


def payload(thread: str, step: int) -> str:
    """A ~1 KiB channel value, new every step."""
    head = f"{thread} step {step}: "
    return head + "x" * (1024 - len(head))


async def writers(
    saver: Saver, tag: str, count: int, per_writer: int, deadline: float | None = None
) -> tuple[float, list[float]]:
    """``count`` writers, each appending ``per_writer`` checkpoints to a thread of its own (after one
    untimed first write, which creates the thread), or until ``deadline`` (monotonic). Returns
    (seconds, latency of each timed append)."""
    from langgraph.checkpoint.base import empty_checkpoint

    configs: list[Any] = [{"configurable": {"thread_id": f"{tag}-{w}", "checkpoint_ns": ""}} for w in range(count)]

    async def put(w: int, step: int) -> None:
        checkpoint = empty_checkpoint()
        checkpoint["channel_values"] = {"messages": payload(f"{tag}-{w}", step)}
        checkpoint["channel_versions"] = {"messages": step + 1}
        metadata: Any = {"source": "loop", "step": step, "parents": {}}
        configs[w] = await saver.aput(configs[w], checkpoint, metadata, {"messages": step + 1})

    await asyncio.gather(*(put(w, 0) for w in range(count)))
    latencies: list[float] = []

    async def writer(w: int) -> None:
        for step in range(1, per_writer + 1):
            start = time.perf_counter()
            if deadline is not None and time.monotonic() >= deadline:
                return
            await put(w, step)
            if deadline is None or time.monotonic() <= deadline:
                latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(writer(w) for w in range(count)))
    return time.perf_counter() - start, latencies


async def appenders(
    store: Any, tag: str, count: int, per_writer: int, deadline: float | None = None
) -> tuple[float, list[float]]:
    """The store-level twin of :func:`writers`: ``count`` writers, each appending ``per_writer`` turns
    of the same ~1 KiB payloads to a context of its own with ``store.turns.append_turn``
    (compare-and-set on the head it last wrote, as ``PforgeSaver`` does; no CAS blob, no refs). The
    context is made, and its first turn appended, before the clock starts."""
    turns = store.turns
    contexts = [await turns.create_context(name=f"{tag}-{w}") for w in range(count)]
    heads = [0] * count

    async def put(w: int, step: int) -> None:
        data = payload(f"{tag}-{w}", step).encode()
        heads[w] = (await turns.append_turn(contexts[w].context_id, "bench.turn", data, expected_head=heads[w])).turn_id

    await asyncio.gather(*(put(w, 0) for w in range(count)))
    latencies: list[float] = []

    async def writer(w: int) -> None:
        for step in range(1, per_writer + 1):
            start = time.perf_counter()
            if deadline is not None and time.monotonic() >= deadline:
                return
            await put(w, step)
            if deadline is None or time.monotonic() <= deadline:
                latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(writer(w) for w in range(count)))
    return time.perf_counter() - start, latencies


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else 0.0


async def measure(
    cluster: PgCluster | None, open_saver: Callable[[], AbstractAsyncContextManager[Saver]], tag: str, c: int, n: int
) -> Row:
    async with open_saver() as saver:
        run = appenders if isinstance(saver, _RawStore) else writers
        target = saver.store if isinstance(saver, _RawStore) else saver
        # Untimed: the threads (contexts) and their first writes, then the clock and the CPU counters.
        cpu0, server0 = time.process_time(), server_cpu(cluster)
        seconds, latencies = await run(target, tag, c, n)
        cpu1, server1 = time.process_time(), server_cpu(cluster)
    done = len(latencies)
    row: Row = {
        "rate": done / seconds,
        "p50": pct(latencies, 0.5),
        "p99": pct(latencies, 0.99),
        "cpu": (cpu1 - cpu0) / done * 1e6,
        "cores": (cpu1 - cpu0) / seconds,
    }
    if server0 is not None and server1 is not None:
        row["server"] = (server1 - server0) / done * 1e6
        row["cores"] += (server1 - server0) / seconds
    return row


class _RawStore:
    """The contender "raw append_turn": the store itself, no saver around it."""

    def __init__(self, store: Any) -> None:
        self.store = store


def raw_store(dsn: str, schema: str) -> Callable[[], AbstractAsyncContextManager[Saver]]:
    @asynccontextmanager
    async def opened() -> AsyncIterator[Saver]:
        from pforge_async.postgres.store import connect_pg

        async with await connect_pg(dsn, schema=schema) as store:
            yield _RawStore(store)

    return opened


def pforge_saver(dsn: str, schema: str) -> Callable[[], AbstractAsyncContextManager[Saver]]:
    @asynccontextmanager
    async def opened() -> AsyncIterator[Saver]:
        from pforge_async.integrations.langgraph import PforgeSaver
        from pforge_async.postgres.store import connect_pg

        async with await connect_pg(dsn, schema=schema) as store:
            yield PforgeSaver(store)

    return opened


def langgraph_saver(dsn: str, pool: int) -> Callable[[], AbstractAsyncContextManager[Saver]]:
    @asynccontextmanager
    async def opened() -> AsyncIterator[Saver]:
        from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver

        if pool <= 1:
            async with AsyncPostgresSaver.from_conn_string(dsn) as saver:
                await saver.setup()
                yield saver
            return
        from psycopg.rows import dict_row
        from psycopg_pool import AsyncConnectionPool

        kwargs = {"autocommit": True, "prepare_threshold": 0, "row_factory": dict_row}
        async with AsyncConnectionPool(dsn, min_size=pool, max_size=pool, kwargs=kwargs, open=False) as conns:
            await conns.wait()
            saver = AsyncPostgresSaver(conns)  # type: ignore[arg-type]
            await saver.setup()
            yield saver

    return opened


async def bench_appends(dsn: str, cluster: PgCluster | None, run: int, quick: bool) -> dict[str, Row]:
    """Section 1: one run of every saver at C=1 and C=64 (pforge first, then LangGraph's, alternating
    the order each run so the machine's drift hits both)."""
    database = f"lg_bench_{run}_{uuid.uuid4().hex[:6]}"
    await execute(dsn, f'CREATE DATABASE "{database}"')
    lg_dsn = with_database(dsn, database)
    schema = f"bench_{run}_{uuid.uuid4().hex[:6]}"
    one, many = (50, 8) if quick else (300, 40)
    contenders = {
        "PforgeSaver (PgStore)": pforge_saver(dsn, schema),
        "raw append_turn (PgStore)": raw_store(dsn, schema),
        "AsyncPostgresSaver (1 conn)": langgraph_saver(lg_dsn, 1),
        "AsyncPostgresSaver (pool 64)": langgraph_saver(lg_dsn, 64),
    }
    order = list(contenders) if run % 2 == 0 else list(reversed(contenders))
    rows: dict[str, Row] = {}
    try:
        for c, n in ((1, one), (64, many)):
            for name in order:
                tag = f"r{run}-c{c}-{name.split()[0]}-{len(rows)}"
                rows[f"C={c} {name}"] = await measure(cluster, contenders[name], tag, c, n)
    finally:
        await execute(dsn, f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await execute(dsn, f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
    return rows


# -- processes -----------------------------------------------------------------------------------


def child(dsn: str, schema: str, index: int, barrier: Any, window: float, results: Any) -> None:
    """One process: its own store on the shared schema, 64 writers, counted over ``window`` seconds
    after the barrier every process and the parent wait on."""

    async def main() -> None:
        from pforge_async.integrations.langgraph import PforgeSaver
        from pforge_async.postgres.store import connect_pg

        async with await connect_pg(dsn, schema=schema) as store:
            saver = PforgeSaver(store)
            tag = f"p{index}-{uuid.uuid4().hex[:6]}"
            # Warm-up (threads made, statements prepared) before the barrier: only the window counts.
            await writers(saver, tag + "w", 64, 1)
            await asyncio.to_thread(barrier.wait)
            cpu0 = time.process_time()
            _, latencies = await writers(saver, tag, 64, 1 << 30, deadline=time.monotonic() + window)
            cpu = time.process_time() - cpu0
        results.put((index, len(latencies), cpu, pct(latencies, 0.99)))

    asyncio.run(main())


async def bench_processes(dsn: str, cluster: PgCluster | None, counts: list[int], window: float) -> dict[int, Row]:
    ctx = multiprocessing.get_context("spawn")
    rows: dict[int, Row] = {}
    for procs in counts:
        schema = f"procs_{procs}_{uuid.uuid4().hex[:6]}"
        await execute(dsn, f'CREATE SCHEMA "{schema}"')  # made once here: the children only migrate
        barrier = ctx.Barrier(procs + 1)
        results = ctx.Queue()
        children = [ctx.Process(target=child, args=(dsn, schema, i, barrier, window, results)) for i in range(procs)]
        for p in children:
            p.start()
        await asyncio.to_thread(barrier.wait, 300)
        server0 = server_cpu(cluster)
        await asyncio.sleep(window)
        server1 = server_cpu(cluster)
        got = [await asyncio.to_thread(results.get, True, 300) for _ in children]
        for p in children:
            await asyncio.to_thread(p.join, 60)
            if p.exitcode != 0:
                raise SystemExit(f"a writer process failed (exit {p.exitcode})")
        done = sum(g[1] for g in got)
        row: Row = {
            "rate": done / window,
            "p99": max(g[3] for g in got),
            "cpu": sum(g[2] for g in got) / done * 1e6,
            "cores": sum(g[2] for g in got) / window,
        }
        if server0 is not None and server1 is not None:
            row["server"] = (server1 - server0) / done * 1e6
            row["cores"] += (server1 - server0) / window
        rows[procs] = row
        await execute(dsn, f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    return rows


# -- CAS -----------------------------------------------------------------------------------------


async def bench_cas(dsn: str, cluster: PgCluster | None, run: int, objects: int) -> dict[str, Row]:
    from pforge_async.postgres.store import connect_pg

    schema = f"cas_{run}_{uuid.uuid4().hex[:6]}"
    blobs = [os.urandom(16) + bytes(4096 - 16) for _ in range(objects)]
    rows: dict[str, Row] = {}
    try:
        async with await connect_pg(dsn, schema=schema) as store:
            oids: list[str] = [""] * objects

            async def timed(name: str, op: Callable[[int], Awaitable[None]]) -> None:
                queue = iter(range(objects))

                async def worker() -> None:
                    for i in queue:
                        await op(i)

                cpu0, server0 = time.process_time(), server_cpu(cluster)
                start = time.perf_counter()
                await asyncio.gather(*(worker() for _ in range(64)))
                seconds = time.perf_counter() - start
                cpu1, server1 = time.process_time(), server_cpu(cluster)
                row: Row = {"rate": objects / seconds, "mib": objects * 4096 / seconds / (1 << 20)}
                row["cpu"] = (cpu1 - cpu0) / objects * 1e6
                row["cores"] = (cpu1 - cpu0) / seconds
                if server0 is not None and server1 is not None:
                    row["server"] = (server1 - server0) / objects * 1e6
                    row["cores"] += (server1 - server0) / seconds
                rows[name] = row

            async def write(i: int) -> None:
                oids[i] = await store.cas.write_blob(blobs[i])

            async def read(i: int) -> None:
                if await store.cas.read_blob(oids[i]) != blobs[i]:
                    raise SystemExit(f"object {oids[i]} read back differently")

            await timed(f"write_blob x {objects} (64 tasks)", write)
            await timed(f"read_blob x {objects} (64 tasks)", read)
    finally:
        await execute(dsn, f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    return rows


# -- report --------------------------------------------------------------------------------------


def spread(values: list[float], fmt: str = "{:.0f}") -> str:
    return " / ".join(fmt.format(v) for v in (min(values), statistics.median(values), max(values)))


def show(title: str, runs: list[dict[Any, Row]], unit: str) -> None:
    print(f"\n## {title}  (min / median / max of {len(runs)} run{'s' if len(runs) > 1 else ''})")
    print(
        f"{'':36} {unit:>24} {'p99 ms':>7} {'client':>7} {'server':>7} {'total':>7} {'cores':>6}"
        f"  {'ops/s per core':>14}"
    )
    for key in runs[0]:
        rates = [run[key]["rate"] for run in runs]
        p99 = statistics.median(run[key].get("p99", 0.0) for run in runs)
        cpu = statistics.median(run[key]["cpu"] for run in runs)
        server = [run[key]["server"] for run in runs if "server" in run[key]]
        total = [run[key]["cpu"] + run[key]["server"] for run in runs if "server" in run[key]]
        cores = statistics.median(run[key]["cores"] for run in runs)
        shown = f"{statistics.median(server):7.0f} {statistics.median(total):7.0f}" if server else f"{'-':>7} {'-':>7}"
        per_core = f"{1e6 / statistics.median(total):14.0f}" if total else f"{'-':>14}"
        extra = f"  {spread([run[key]['mib'] for run in runs], '{:.1f}')} MiB/s" if "mib" in runs[0][key] else ""
        print(f"{key!s:36} {spread(rates):>24} {p99:7.1f} {cpu:7.0f} {shown} {cores:6.2f}  {per_core}{extra}")


def ratios(runs: list[dict[Any, Row]], ours: Any, theirs: Any) -> list[float]:
    return [run[ours]["rate"] / run[theirs]["rate"] for run in runs]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--window", type=float, default=5.0, help="seconds each process count runs")
    parser.add_argument("--processes", default="1,2,4,8")
    parser.add_argument("--objects", type=int, default=10_000)
    parser.add_argument("--quick", action="store_true", help="1 run, small counts, 1 and 2 processes for 2 s")
    args = parser.parse_args()
    if args.quick:
        args.runs, args.window, args.processes, args.objects = 1, 2.0, "1,2", 1000
    counts = [int(p) for p in args.processes.split(",")]
    print(describe("asyncpg", "langgraph", "langgraph-checkpoint", "langgraph-checkpoint-postgres", "psycopg"))
    with pg_server() as (dsn, cluster):  # fsync on: the server's defaults
        print(await server_facts(dsn))
        if cluster is None:
            print("# (an outside server: PFORGE_TEST_PG_DSN; server CPU not measured)")
        appends, procs, cas = [], [], []
        for run in range(args.runs):
            print(f"run {run + 1}/{args.runs} ...", flush=True)
            appends.append(await bench_appends(dsn, cluster, run, args.quick))
            procs.append(await bench_processes(dsn, cluster, counts, args.window))
            cas.append(await bench_cas(dsn, cluster, run, args.objects))

    show("1. checkpoint appends (aput, ~1 KiB value, fsync on)", appends, "appends/s")
    lgs = ("AsyncPostgresSaver (1 conn)", "AsyncPostgresSaver (pool 64)")
    for ours in ("PforgeSaver (PgStore)", "raw append_turn (PgStore)"):
        for c in (1, 64):
            for lg in lgs:
                got = ratios(appends, f"C={c} {ours}", f"C={c} {lg}")
                print(f"C={c:<3} {ours} over {lg}: {spread(got, '{:.2f}x')}")
            best = [run[f"C={c} {ours}"]["rate"] / max(run[f"C={c} {lg}"]["rate"] for lg in lgs) for run in appends]
            target = "  (target >= 10x)" if c == 64 else ""
            print(f"C={c:<3} {ours} over the faster AsyncPostgresSaver of each run: {spread(best, '{:.2f}x')}{target}")
    bound(appends, lgs)
    show("2. processes, each its own PgStore on one schema, 64 writers each", procs, "appends/s")
    for p in counts[1:]:
        print(
            f"{p} processes over 1: {spread(ratios(procs, p, counts[0]), '{:.2f}x')}"
            + ("  (target >= 2x)" if p == 4 else "")
        )
    show(f"3. CAS objects ({args.objects} x 4 KiB)", cas, "objects/s")
    print("\n(client / server / total: CPU microseconds per operation of the benchmark process(es), of every")
    print(" server process, and both; cores: CPU seconds per second of both, i.e. the cores the row kept busy;")
    print(f" ops/s per core: 1e6 / total. This machine has {os.cpu_count()} cores, shared by client, server and")
    print(" whatever else runs: a row at ~cores of them is CPU-bound, one well below is waiting on something)")


def bound(appends: list[dict[Any, Row]], lgs: tuple[str, ...]) -> None:
    """What the C=64 rows' CPU per append says about the 10x target on this machine's cores."""
    if "server" not in appends[0]["C=64 PforgeSaver (PgStore)"]:
        return
    cores = os.cpu_count() or 1
    theirs = statistics.median(max(run[f"C=64 {lg}"]["rate"] for lg in lgs) for run in appends)
    need = 1e6 * cores / (10 * theirs)
    print(
        f"10x the faster AsyncPostgresSaver at C=64 ({10 * theirs:.0f}/s) on {cores} cores needs at most "
        f"{need:.0f} us of CPU per append, client and server together, with every core busy:"
    )
    for ours in ("PforgeSaver (PgStore)", "raw append_turn (PgStore)"):
        total = statistics.median(run[f"C=64 {ours}"]["cpu"] + run[f"C=64 {ours}"]["server"] for run in appends)
        print(
            f"  C=64 {ours}: {total:.0f} us per append -> at most {1e6 * cores / total:.0f}/s "
            f"({1e6 * cores / total / theirs:.1f}x) with all {cores} cores"
        )


if __name__ == "__main__":
    asyncio.run(main())
