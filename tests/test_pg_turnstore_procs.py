"""The PostgreSQL turn store across processes, as on many machines: each process has its own actor and
connections on one server. Appends to shared and distinct contexts (single and atomic batches across
two contexts) never deadlock and lose nothing; names raced by 8 processes give one context each;
compare-and-set heads hold across processes; a SIGKILL in the middle of batches and keyed forks
leaves every batch whole or absent, and a rerun makes nothing twice."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import pytest

from pforge_async.postgres.turns import PgTurnStore

from ._procs import next_line, run_all, spawn, wait_for_line, whole_lines
from .test_pg_turnstore import open_pg_turns

pytestmark = pytest.mark.anyio

#: every child opens the store the same way: its own actor, no CAS (these tests name no objects)
PRELUDE = """
import json, random, sys, anyio
from contextlib import asynccontextmanager
from pforge_async import HeadConflict, NewTurn
from pforge_async.postgres.turns import PgTurnActor, PgTurnStore

@asynccontextmanager
async def pg_turns(dsn, schema):
    actor = PgTurnActor(dsn, schema=schema)
    async with anyio.create_task_group() as tg:
        await tg.start(actor.run)
        try:
            yield PgTurnStore(actor, None)
        finally:
            await actor.aclose()

dsn, schema = sys.argv[1], sys.argv[2]
"""


def spawn_ready(code: str, *args: object) -> subprocess.Popen[str]:
    return spawn(PRELUDE + code, *args, stdin=subprocess.PIPE)


def go(procs: list[subprocess.Popen[str]]) -> None:
    """Wait until every child is ready, then release them together."""
    for proc in procs:
        wait_for_line(proc, "ready", timeout=120)
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()


@asynccontextmanager
async def opened(dsn: str, schema: str) -> AsyncIterator[PgTurnStore]:
    async with open_pg_turns(dsn, schema, None) as store:  # type: ignore[arg-type]
        yield store


async def sql(dsn: str, schema: str, query: str, *args: Any) -> list[Any]:
    conn = await asyncpg.connect(dsn, server_settings={"search_path": schema})
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


# -- appends to shared and distinct contexts ---------------------------------------------------------

TASKS = 16
STEPS = 12

APPENDS = """
me = int(sys.argv[3])
async def main():
    async with pg_turns(dsn, schema) as turns:
        shared = [await turns.open_context(f"shared/{s}") for s in range(2)]
        acked = []
        async def task(n):
            own = await turns.open_context(f"own/{me}/{n}")
            rng = random.Random(me * 1000 + n)
            for i in range(STEPS):
                key = f"{me}-{n}-{i}"
                pick = shared[rng.randrange(2)]
                kind = rng.randrange(3)
                if kind == 0:
                    r = await turns.append_turn(own.context_id, "t", key.encode(), idempotency_key=key)
                    acked.append([own.context_id, key, r.turn_id])
                elif kind == 1:
                    r = await turns.append_turn(pick.context_id, "t", key.encode(), idempotency_key=key)
                    acked.append([pick.context_id, key, r.turn_id])
                else:  # one atomic batch over both shared contexts and its own, in a random order
                    targets = [own, *shared]
                    rng.shuffle(targets)
                    batch = [NewTurn(c.context_id, "t", f"{key}/{c.context_id}".encode(), idempotency_key=key)
                             for c in targets]
                    for c, r in zip(targets, await turns.append_turns(batch)):
                        acked.append([c.context_id, key, r.turn_id])
        print("ready", flush=True)
        sys.stdin.readline()
        async with anyio.create_task_group() as tg:
            for n in range(TASKS):
                tg.start_soon(task, n)
        print(json.dumps({"acked": acked, "largest_batch": turns.actor.largest_batch}), flush=True)
anyio.run(main)
""".replace("TASKS", str(TASKS)).replace("STEPS", str(STEPS))


async def test_four_processes_append_to_shared_and_distinct_contexts(pg_dsn: str, pg_schema: str) -> None:
    async with opened(pg_dsn, pg_schema):
        pass  # the schema exists before the race
    procs = [spawn_ready(APPENDS, pg_dsn, pg_schema, me) for me in range(4)]
    go(procs)
    outs = [json.loads(out) for out in run_all(procs, timeout=300)]
    acked = [tuple(a) for out in outs for a in out["acked"]]
    assert max(out["largest_batch"] for out in outs) > 1  # group commits did hold several callers
    async with opened(pg_dsn, pg_schema) as store:
        listed = await store.list_contexts(order="name", limit=1000)
        names = [c.name or "" for c in listed.contexts]
        assert sorted(names) == sorted(
            [f"shared/{s}" for s in range(2)] + [f"own/{m}/{n}" for m in range(4) for n in range(TASKS)]
        )
        by_context: dict[int, list[tuple[str, int]]] = {}
        for context_id, key, turn_id in acked:
            by_context.setdefault(context_id, []).append((key, turn_id))
        for info in listed.contexts:
            chain = [t async for t in store.iter_turns(info.context_id, page_size=100)]
            # Every acknowledged turn is in its context's chain exactly once, and nothing else is.
            assert sorted((t.idempotency_key or "", t.turn_id) for t in chain) == sorted(
                by_context.get(info.context_id, [])
            )
            assert [t.parent_turn_id for t in chain] == [0] + [t.turn_id for t in chain[:-1]]
        assert await store.check() == []
    count = await sql(pg_dsn, pg_schema, "SELECT count(*) FROM turns")
    assert count[0][0] == len(acked)  # nothing written twice, nothing unacknowledged


# -- names raced across processes ---------------------------------------------------------------------

NAMES = 100

RACE_OPEN = """
seed = int(sys.argv[3])
async def main():
    async with pg_turns(dsn, schema) as turns:
        names = [f"race/{i:03d}" for i in range(NAMES)]
        random.Random(seed).shuffle(names)
        got = {}
        async def walk(share):
            for name in share:
                got[name] = (await turns.open_context(name, metadata={"by": seed})).context_id
        print("ready", flush=True)
        sys.stdin.readline()
        async with anyio.create_task_group() as tg:
            for k in range(4):
                tg.start_soon(walk, names[k::4])
        print(json.dumps(got), flush=True)
anyio.run(main)
""".replace("NAMES", str(NAMES))


async def test_eight_processes_race_open_context_on_the_same_names(pg_dsn: str, pg_schema: str) -> None:
    async with opened(pg_dsn, pg_schema):
        pass
    procs = [spawn_ready(RACE_OPEN, pg_dsn, pg_schema, seed) for seed in range(8)]
    go(procs)
    maps = [json.loads(out) for out in run_all(procs, timeout=300)]
    assert all(got == maps[0] for got in maps) and len(maps[0]) == NAMES
    async with opened(pg_dsn, pg_schema) as store:
        listed, after = [], None
        while True:
            page = await store.list_contexts(order="name", prefix="race/", after=after, limit=7)
            listed += page.contexts
            if (after := page.cursor) is None:
                break
        assert {c.name: c.context_id for c in listed} == maps[0]
        assert len((await store.list_contexts(order="created", limit=1000)).contexts) == NAMES
        assert await store.check() == []
    rows = await sql(pg_dsn, pg_schema, "SELECT count(*), count(DISTINCT name) FROM contexts")
    assert tuple(rows[0]) == (NAMES, NAMES)


# -- compare-and-set heads across processes ---------------------------------------------------------------

ROUNDS = 1000

STALE_HEADS = """
me, rounds = int(sys.argv[3]), int(sys.argv[4])
async def main():
    async with pg_turns(dsn, schema) as turns:
        ctx = await turns.open_context("contended")
        print("ready", flush=True)
        sys.stdin.readline()
        attempts = []
        async def attempt(head, writer):
            try:
                won = await turns.append_turn(ctx.context_id, "t", b"%d/%d/%d" % (me, writer, head), expected_head=head)
                attempts.append([head, won.turn_id, won.parent_turn_id])
            except HeadConflict as exc:
                assert exc.expected == head and exc.actual != head, exc
                attempts.append([head, 0, exc.actual])
        while True:
            head = await turns.get_head(ctx.context_id)
            if head.head_depth >= rounds:
                break
            async with anyio.create_task_group() as tg:  # two writers, one stale head
                tg.start_soon(attempt, head.head_turn_id, 0)
                tg.start_soon(attempt, head.head_turn_id, 1)
        print(json.dumps(attempts), flush=True)
anyio.run(main)
"""


async def test_two_writers_with_the_same_stale_head_across_four_processes(pg_dsn: str, pg_schema: str) -> None:
    async with opened(pg_dsn, pg_schema) as store:
        ctx = await store.open_context("contended")
    procs = [spawn_ready(STALE_HEADS, pg_dsn, pg_schema, me, ROUNDS) for me in range(4)]
    go(procs)
    attempts = [a for out in run_all(procs, timeout=300) for a in json.loads(out)]
    wins: dict[int, list[int]] = {}
    tried: dict[int, int] = {}
    for head, won, parent in attempts:
        tried[head] = tried.get(head, 0) + 1
        if won:
            assert parent == head
            wins.setdefault(head, []).append(won)
    # Every head anyone held was won from exactly once, whoever else held it.
    assert sorted(tried) == sorted(wins) and all(len(w) == 1 for w in wins.values())
    assert len(wins) >= ROUNDS and all(n >= 2 for n in tried.values())
    assert sum(n > 2 for n in tried.values()) > 0  # processes did contend with each other
    async with opened(pg_dsn, pg_schema) as store:
        chain = [t async for t in store.iter_turns(ctx.context_id, page_size=256)]
        assert [t.turn_id for t in chain] == sorted(w[0] for w in wins.values())
        assert [t.parent_turn_id for t in chain] == [0] + [t.turn_id for t in chain[:-1]]
        assert await store.check() == []
    depth = {0: 0} | {t.turn_id: t.depth for t in chain}
    assert all(depth[actual] > depth[head] for head, won, actual in attempts if not won)
    rows = await sql(pg_dsn, pg_schema, "SELECT count(*) FROM turns")
    assert rows[0][0] == len(chain)  # no loser left a turn


PER_TASK = 4

CAS_APPENDS = """
me = int(sys.argv[3])
async def main():
    async with pg_turns(dsn, schema) as turns:
        ctx = await turns.open_context("shared")
        acked = []
        async def task(n):
            rng = random.Random(me * 100 + n)
            for i in range(PER_TASK):
                key = f"{me}-{n}-{i}"
                head = (await turns.get_head(ctx.context_id)).head_turn_id
                while True:
                    try:
                        record = await turns.append_turn(
                            ctx.context_id, "t", key.encode(), idempotency_key=key, expected_head=head
                        )
                        break
                    except HeadConflict as exc:
                        head = exc.actual
                        await anyio.sleep(rng.random() * 0.002)
                acked.append([key, record.turn_id])
        print("ready", flush=True)
        sys.stdin.readline()
        async with anyio.create_task_group() as tg:
            for n in range(16):
                tg.start_soon(task, n)
        print(json.dumps(acked), flush=True)
anyio.run(main)
""".replace("PER_TASK", str(PER_TASK))


async def test_64_tasks_in_4_processes_compare_and_set_one_chain(pg_dsn: str, pg_schema: str) -> None:
    async with opened(pg_dsn, pg_schema) as store:
        ctx = await store.open_context("shared")
    procs = [spawn_ready(CAS_APPENDS, pg_dsn, pg_schema, me) for me in range(4)]
    go(procs)
    acked = sorted(tuple(a) for out in run_all(procs, timeout=300) for a in json.loads(out))
    assert len(acked) == 64 * PER_TASK
    async with opened(pg_dsn, pg_schema) as store:
        chain = [t async for t in store.iter_turns(ctx.context_id, page_size=100)]
        assert [t.parent_turn_id for t in chain] == [0] + [t.turn_id for t in chain[:-1]]
        assert sorted((t.idempotency_key, t.turn_id) for t in chain) == acked
        assert await store.check() == []
    rows = await sql(pg_dsn, pg_schema, "SELECT count(*) FROM turns")
    assert rows[0][0] == len(acked)


# -- SIGKILL in the middle of batches and keyed forks -----------------------------------------------------

SESSIONS = 3
BATCH = 40

#: each round appends one batch across three sessions (compare-and-set on their heads), then at once
#: forks a subagent with a key and writes its first turn while a second batch goes to a side session,
#: so a kill lands in group commits holding several of them. Rerun from the first round it did not
#: acknowledge: every step of a round is an idempotent retry.
CRASH_LOOP = """
first = int(sys.argv[3])
payload = lambda *parts: ("/".join(map(str, parts)) + " ").encode() * 100
async def main():
    async with pg_turns(dsn, schema) as t:
        sessions = [await t.open_context(f"s{c}") for c in range(SESSIONS)]
        side = await t.open_context("side")
        heads = {c.context_id: (await t.get_head(c.context_id)).head_turn_id for c in sessions}
        i = first
        while True:
            batch = [NewTurn(c.context_id, "t", payload(i, c.context_id, k), idempotency_key=f"b{i}-{c.context_id}-{k}")
                     for c in sessions for k in range(BATCH)]
            records = await t.append_turns(batch, expected_heads=heads)
            heads = {c.context_id: records[(n + 1) * BATCH - 1].turn_id for n, c in enumerate(sessions)}
            async def fork():
                f = await t.fork_context(records[0].turn_id, idempotency_key=f"fork-{i}", metadata={"round": i})
                await t.append_turn(f.context_id, "t", payload("fork", i), idempotency_key="first")
            async def aside():
                await t.append_turns([NewTurn(side.context_id, "t", payload("side", i, k), idempotency_key=f"s{i}-{k}")
                                      for k in range(BATCH)])
            async with anyio.create_task_group() as tg:
                tg.start_soon(fork)
                tg.start_soon(aside)
            print(f"round {i}", flush=True)
            i += 1
anyio.run(main)
""".replace("SESSIONS", str(SESSIONS)).replace("BATCH", str(BATCH))


def run_then_kill(dsn: str, schema: str, first: int, rng: random.Random) -> int:
    """Run the loop from round ``first``, SIGKILL it at a random moment after a few rounds; the
    first round it did not acknowledge."""
    child = spawn(PRELUDE + CRASH_LOOP, dsn, schema, first)
    assert child.stdout is not None
    acked = first - 1
    wanted = first + rng.randint(0, 3)
    deadline = time.monotonic() + 120
    while acked < wanted:
        line = next_line(child, max(0.0, deadline - time.monotonic()))
        assert line, child.stderr.read() if child.stderr else "the loop ended"
        acked = int(line.split()[1])
    time.sleep(rng.uniform(0, 0.08))
    child.send_signal(signal.SIGKILL)
    child.wait()
    for line in whole_lines(child.stdout.read()):
        acked = int(line.split()[1])
    return acked + 1


async def whole_rounds(dsn: str, schema: str) -> int:
    """How many rounds the server holds, having checked each is whole: every batch all there or
    absent, every fork there once with its key and its first turn, no context nobody asked for."""
    sessions = {
        r[0]: r[1] for r in await sql(dsn, schema, "SELECT name, context_id FROM contexts WHERE name IS NOT NULL")
    }
    assert set(sessions) == {f"s{c}" for c in range(SESSIONS)} | {"side"}
    by_key = {
        r[0]: r[1]
        for r in await sql(dsn, schema, "SELECT idempotency_key, count(*) FROM turns GROUP BY idempotency_key")
    }
    rounds = 0
    while any(f"b{rounds}-{c}-0" in by_key for c in sessions.values()):
        rounds += 1
    for i in range(rounds + 1):
        present = [f"b{i}-{sessions[f's{c}']}-{k}" in by_key for c in range(SESSIONS) for k in range(BATCH)]
        assert all(present) or not any(present), f"batch {i} is torn"
        side = [f"s{i}-{k}" in by_key for k in range(BATCH)]
        assert all(side) or not any(side), f"side batch {i} is torn"
    forks = await sql(
        dsn,
        schema,
        "SELECT c.context_id, k.idempotency_key FROM contexts c "
        "LEFT JOIN context_keys k ON k.context_id = c.context_id WHERE c.name IS NULL",
    )
    assert all(key is not None for _, key in forks), f"orphan forks: {forks}"
    assert sorted(int(key.split("-")[1]) for _, key in forks) == list(range(len(forks)))
    assert len(forks) in (rounds - 1, rounds), (len(forks), rounds)
    first_turns = {
        r[0]: r[1]
        for r in await sql(
            dsn, schema, "SELECT context_id, count(*) FROM turns WHERE idempotency_key = 'first' GROUP BY 1"
        )
    }
    assert all(first_turns.get(context_id, 0) <= 1 for context_id, _ in forks)
    assert all(n == 1 for key, n in by_key.items() if key != "first")
    return rounds


async def test_sigkill_in_batches_and_keyed_forks_then_rerun(pg_dsn: str, pg_schema: str) -> None:
    async with opened(pg_dsn, pg_schema):
        pass
    rng = random.Random()
    first = 0
    for _ in range(4):
        first = run_then_kill(pg_dsn, pg_schema, first, rng)
        assert await whole_rounds(pg_dsn, pg_schema) in (first, first + 1)
    # The last rerun finishes the round the kill cut, and one more.
    child = spawn(PRELUDE + CRASH_LOOP, pg_dsn, pg_schema, first)
    wait_for_line(child, f"round {first}", timeout=120)
    wait_for_line(child, f"round {first + 1}", timeout=120)
    child.send_signal(signal.SIGKILL)
    child.wait()
    rounds = await whole_rounds(pg_dsn, pg_schema)
    assert rounds >= first + 2
    async with opened(pg_dsn, pg_schema) as store:
        assert await store.check() == []
        for c in range(SESSIONS):
            info = await store.find_context(f"s{c}")
            assert info is not None
            chain = [t.idempotency_key async for t in store.iter_turns(info.context_id, page_size=64)]
            assert chain == [f"b{i}-{info.context_id}-{k}" for i in range(rounds) for k in range(BATCH)]
        s0 = await store.find_context("s0")
        assert s0 is not None
        forks = (await store.list_contexts(parent_context_id=s0.context_id, order="created", limit=1000)).contexts
        assert sorted(f.metadata["round"] for f in forks) == list(range(len(forks)))
        for f in forks:
            first_turn = await store.get_turn_by_key(f.context_id, "first")
            assert first_turn is None or first_turn.parent_turn_id == f.base_turn_id
