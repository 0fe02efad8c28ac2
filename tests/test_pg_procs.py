"""Many machines, simulated: 8 processes, each with its own store on one PostgreSQL server, writing
turns (own and shared contexts, single appends and atomic batches across both), workspace snapshots
attached to turns, nonces (racing for one shared pool) and budget (one shared limit) for 60 s
(``PFORGE_PG_LOAD_SECONDS``), with the server restarted (``pg_ctl restart -m fast``) in the middle
when the tests started it themselves. Afterwards: every acknowledged write present once, no nonce
consumed twice, no budget overdrawn, no deadlock reported by the server, ``check()`` clean."""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import anyio
import asyncpg
import pytest

from pforge_async import NonceReplayed
from pforge_async.postgres.store import connect_pg

from ._pg import MISSING, PgCluster, find_bindir
from ._procs import ROOT, run_all, spawn

pytestmark = pytest.mark.anyio

SECONDS = float(os.environ.get("PFORGE_PG_LOAD_SECONDS", "60"))
PROCESSES = 8
LIMIT_TOKENS = 2_000  # reached early: most reservations then race for what is left

CHILD = """
import json, os, random, sys, tempfile, time, anyio
from pforge_async import BudgetExceeded, NonceReplayed, StorageError
from pforge_async.ledgers import Usage
from pforge_async.postgres.store import connect_pg
from pforge_async.turnstore.types import NewTurn

async def main():
    dsn, schema, n, seconds, pool_file = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
    pool = json.loads(open(pool_file).read())
    rng = random.Random(n)
    acked = {"turns": [], "snapshots": [], "nonces": [], "budget": [0, 0], "refused": 0, "storage_errors": 0,
             "calls": 0}
    stop = time.monotonic() + seconds
    async with await connect_pg(dsn, schema=schema, reconnect_wait=30) as store:
        own = await store.turns.open_context(f"p{n}")
        shared = await store.turns.open_context("shared")
        open(pool_file + f".ready{n}", "w").close()

        async def guarded(step):
            while time.monotonic() < stop:
                try:
                    await step()
                    acked["calls"] += 1
                except StorageError:
                    acked["storage_errors"] += 1
                    await anyio.sleep(0.05)

        counter = [0]

        async def turns():
            counter[0] += 1
            i = counter[0]
            if i % 3 == 0:
                batch = [NewTurn(c.context_id, "t", f"{n}-{i}-{c.context_id}".encode(), idempotency_key=f"{n}-{i}")
                         for c in sorted((own, shared), key=lambda c: rng.random())]
                for t in await store.turns.append_turns(batch):
                    acked["turns"].append([t.context_id, t.turn_id, t.idempotency_key, t.payload.decode()])
            else:
                ctx = own if i % 2 else shared
                payload = f"{n}-{i}".encode()
                t = await store.turns.append_turn(ctx.context_id, "t", payload, idempotency_key=f"{n}-{i}")
                acked["turns"].append([t.context_id, t.turn_id, t.idempotency_key, payload.decode()])

        workspace = tempfile.mkdtemp(prefix=f"pgload-{n}-")
        snap = [0]

        async def snapshots():
            snap[0] += 1
            with open(os.path.join(workspace, f"f{snap[0] % 5}.txt"), "w") as f:
                f.write(f"{n} {snap[0]} " * rng.randint(1, 200))
            tree = await store.cas.snapshot(workspace)
            t = await store.turns.append_turn(own.context_id, "snap", tree.encode(), fs_root=tree,
                                              idempotency_key=f"s{n}-{snap[0]}")
            acked["snapshots"].append([tree, t.turn_id])
            await anyio.sleep(0.05)

        order = pool[:]
        rng.shuffle(order)
        at = [0]

        async def nonces():
            if at[0] < len(order):
                nonce, subject = order[at[0]], "pool"
                at[0] += 1
            else:
                subject = f"p{n}"
                nonce = await store.nonces.issue(subject, 600)
            try:
                await store.nonces.consume(nonce, subject)
                acked["nonces"].append([nonce, subject])
            except NonceReplayed:
                pass

        async def budget():
            tokens = rng.randint(50, 300)
            try:
                held = await store.budget.reserve("shared", tokens=tokens, cost=tokens)
            except BudgetExceeded:
                acked["refused"] += 1
                await anyio.sleep(0.02)
                return
            used = rng.randint(0, tokens)
            await store.budget.commit(held, Usage(used, 0, used))
            acked["budget"][0] += used
            acked["budget"][1] += used

        async with anyio.create_task_group() as tg:
            for step in (turns, turns, snapshots, nonces, budget):
                tg.start_soon(guarded, step)
    print(json.dumps(acked))

anyio.run(main)
"""


async def _deadlocks(dsn: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"))
    finally:
        await conn.close()


async def _verify(dsn: str, schema: str, outs: list[dict[str, Any]]) -> tuple[int, str]:
    """Every acknowledged write of the children there once, no nonce twice, no budget overdrawn,
    check() clean; returns the budget tokens spent and what was counted."""
    async with await connect_pg(dsn, schema=schema) as store:
        # Every acknowledged turn, once: its id reads back as written, and its key finds that id.
        turns = [t for out in outs for t in out["turns"]]
        assert len({t[1] for t in turns}) == len(turns)
        for context_id, turn_id, key, payload in turns:
            turn = await store.turns.get_turn(turn_id)
            assert (turn.context_id, turn.payload.decode(), turn.idempotency_key) == (context_id, payload, key)
            found = await store.turns.get_turn_by_key(context_id, key)
            assert found is not None and found.turn_id == turn_id
        # Every acknowledged snapshot: its tree is in the CAS and attached to its turn.
        snapshots = [s for out in outs for s in out["snapshots"]]
        for tree, turn_id in snapshots:
            assert (await store.turns.get_turn(turn_id)).fs_root == tree
            await store.cas.read_tree(tree, recursive=True)
        # No nonce consumed twice; every acknowledged one stays consumed.
        won = [nonce for out in outs for nonce in out["nonces"]]
        assert len({nonce for nonce, _ in won}) == len(won)
        for nonce, subject in won[:: max(1, len(won) // 300)]:
            with pytest.raises(NonceReplayed):
                await store.nonces.consume(nonce, subject)
        # No budget overdrawn; every acknowledged commit counted.
        totals = await store.budget.totals("shared")
        assert totals.tokens + totals.reserved_tokens <= LIMIT_TOKENS
        assert totals.tokens >= sum(out["budget"][0] for out in outs)
        assert sum(out["refused"] for out in outs) > 0, totals  # the limit was really reached
        report = await store.check()
        assert report.ok, report.problems
    return totals.tokens, f"{len(turns)} turns, {len(snapshots)} snapshots, {len(won)} nonces"


async def test_eight_processes_for_a_minute(
    pg_cluster: tuple[str, PgCluster | None], pg_schema: str, tmp_path: Any
) -> None:
    dsn, cluster = pg_cluster
    async with await connect_pg(dsn, schema=pg_schema) as store:
        await store.budget.set_budget("shared", tokens=LIMIT_TOKENS)
        pool = [await store.nonces.issue("pool", 3600) for _ in range(400)]
    pool_file = tmp_path / "pool.json"
    pool_file.write_text(json.dumps(pool))
    deadlocks_before = await _deadlocks(dsn)
    started = time.monotonic()
    children = [spawn(CHILD, dsn, pg_schema, n, SECONDS, pool_file) for n in range(PROCESSES)]
    restarted = False
    if cluster is not None:
        # Once every child has opened its store and writes: halfway through the load.
        while not all((tmp_path / f"pool.json.ready{n}").exists() for n in range(PROCESSES)):
            assert all(child.poll() is None for child in children), "a child ended before it opened"
            await anyio.sleep(0.1)
        await anyio.sleep(SECONDS / 2)
        await anyio.to_thread.run_sync(cluster.restart)
        restarted = True
    else:
        print("PFORGE_TEST_PG_DSN names a server these tests did not start: no restart in this run")
    outs = [json.loads(o) for o in await anyio.to_thread.run_sync(lambda: run_all(children, timeout=SECONDS + 240))]
    elapsed = time.monotonic() - started

    totals, counts = await _verify(dsn, pg_schema, outs)
    deadlocks = await _deadlocks(dsn) - deadlocks_before
    if cluster is not None:
        assert deadlocks == 0
    calls = sum(out["calls"] for out in outs)
    errors = sum(out["storage_errors"] for out in outs)
    print(
        f"{PROCESSES} processes, {elapsed:.0f} s{' (server restarted midway)' if restarted else ''}: "
        f"{calls} calls acknowledged ({counts}, {totals} of {LIMIT_TOKENS} budget tokens), "
        f"{errors} StorageError, {deadlocks} deadlocks"
    )


# -- real TCP between network namespaces ----------------------------------------------------------------


def _sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


@contextlib.contextmanager
def _netns() -> Iterator[tuple[str, str, str]]:
    """A network namespace joined to this one by a veth pair: (namespace, host address, its address)."""
    tag = f"{os.getpid() % 10000}{random.randrange(100)}"
    ns, host_if, ns_if = f"pfns{tag}", f"pfh{tag}", f"pfn{tag}"
    octet = random.randrange(1, 250)
    host_ip, ns_ip = f"10.213.{octet}.1", f"10.213.{octet}.2"
    try:
        _sh("ip", "netns", "add", ns)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"this machine does not allow network namespaces ({exc}): real TCP is not exercised")
    try:
        _sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        _sh("ip", "link", "set", ns_if, "netns", ns)
        _sh("ip", "addr", "add", f"{host_ip}/30", "dev", host_if)
        _sh("ip", "link", "set", host_if, "up")
        _sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{ns_ip}/30", "dev", ns_if)
        _sh("ip", "netns", "exec", ns, "ip", "link", "set", ns_if, "up")
        _sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        yield ns, host_ip, ns_ip
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)


async def test_processes_in_their_own_network_namespace(pg_schema: str, tmp_path: Any) -> None:
    """Machines simulated more closely: half the writers in a network namespace of their own, reaching
    the server over a veth pair (real TCP, not loopback), half on the host; the same promises."""
    bindir = find_bindir()
    if bindir is None:
        pytest.fail(MISSING, pytrace=False)
    with _netns() as (ns, host_ip, ns_ip):
        cluster = PgCluster(bindir, settings={"fsync": "off", "listen_addresses": f"127.0.0.1,{host_ip}"})
        cluster.init()
        try:
            with open(os.path.join(cluster.data, "pg_hba.conf"), "a") as hba:
                hba.write(f"host all all {ns_ip}/32 trust\n")
            cluster.start()
            dsn = cluster.dsn
            remote = dsn.replace("127.0.0.1", host_ip)
            async with await connect_pg(dsn, schema=pg_schema) as store:
                await store.budget.set_budget("shared", tokens=LIMIT_TOKENS)
                pool = [await store.nonces.issue("pool", 3600) for _ in range(200)]
            pool_file = tmp_path / "pool.json"
            pool_file.write_text(json.dumps(pool))
            seconds = min(SECONDS, 15)
            env = dict(os.environ, PYTHONPATH=str(ROOT))
            children = []
            for n in range(4):
                prefix = ["ip", "netns", "exec", ns] if n % 2 else []
                target = remote if n % 2 else dsn
                children.append(
                    subprocess.Popen(
                        [*prefix, sys.executable, "-c", CHILD, target, pg_schema, str(n), str(seconds), str(pool_file)],
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                        text=True,
                        env=env,
                    )
                )
            outs = [json.loads(o) for o in await anyio.to_thread.run_sync(lambda: run_all(children, timeout=300))]
            spent, counts = await _verify(dsn, pg_schema, outs)
            conn = await asyncpg.connect(dsn)
            try:
                await conn.execute(f'DROP SCHEMA "{pg_schema}" CASCADE')
            finally:
                await conn.close()
        finally:
            cluster.stop()
    remote_calls = sum(out["calls"] for n, out in enumerate(outs) if n % 2)
    assert remote_calls > 0
    print(
        f"over veth ({ns_ip} -> {host_ip}) and loopback: {counts}, {spent} budget tokens; {remote_calls} remote calls"
    )
