"""SIGKILL of a process running the turn store's gc, at random points (issue 13): every run is followed
by a reopen, check(), a comparison of everything reachable with what was written, and another gc."""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path

import pytest

from pforge_async import NewTurn, open_store
from pforge_async.turnstore.base import TurnStoreBase

from ._procs import spawn, wait_for_line

pytestmark = pytest.mark.anyio

RUNS = 20

#: The child makes garbage (contexts whose chains it then deletes, and branches it abandons), says
#: "ready", and collects until it is killed.
CHILD = r"""
import sys, anyio
from pforge_async import NewTurn, open_store

async def main(root, seed):
    async with open_store(root, durability="normal", watch_workspaces=False) as store:
        turns = store.turns
        doomed = []
        for c in range(12):
            ctx = await turns.create_context(name=f"garbage-{seed}-{c}")
            for _ in range(4):
                await turns.append_turns([NewTurn(ctx.context_id, "t", b"g%d" % i) for i in range(100)])
            doomed.append(ctx.context_id)
        for context_id in doomed:
            await turns.delete_context(context_id)
        print("ready", flush=True)
        while True:
            await turns.gc(grace_s=0)

anyio.run(main, sys.argv[1], int(sys.argv[2]))
"""


GARBAGE = 12 * 400


async def count_turns(root: Path) -> int:
    async with open_store(root, readonly=True, create=False) as store:
        row = await store.turns._actor.fetchone("SELECT COUNT(*) FROM turns")  # type: ignore[attr-defined]
        return int(row[0])


async def reachable(turns: TurnStoreBase, names: list[str]) -> dict[str, list[tuple[int, bytes]]]:
    out = {}
    for name in names:
        info = await turns.find_context(name)
        assert info is not None, name
        out[name] = [(t.turn_id, t.payload) async for t in turns.iter_turns(info.context_id)]
    return out


async def test_gc_killed_at_random_points(tmp_path: Path) -> None:
    root = tmp_path / ".pforge"
    names = [f"kept-{i}" for i in range(6)]
    async with open_store(root, watch_workspaces=False) as store:
        turns = store.turns
        base = await turns.create_context(name="base-gone")
        ids = [
            t.turn_id for t in await turns.append_turns([NewTurn(base.context_id, "t", b"b%d" % i) for i in range(50)])
        ]
        for i, name in enumerate(names):
            ctx = await turns.fork_context(ids[i * 8], name=name)
            await turns.append_turns([NewTurn(ctx.context_id, "t", b"%s-%d" % (name.encode(), j)) for j in range(20)])
        await turns.delete_context(base.context_id)
        expected = await reachable(turns, names)

    rng = random.Random(13)
    before = await count_turns(root)
    mid_sweep = 0
    for run in range(RUNS):
        child = spawn(CHILD, root, run)
        wait_for_line(child, "ready", timeout=120)
        time.sleep(rng.uniform(0, 0.05))  # a sweep of this garbage takes tens of milliseconds
        child.send_signal(signal.SIGKILL)
        child.communicate(timeout=30)
        left = await count_turns(root)
        mid_sweep += before < left < before + GARBAGE
        async with open_store(root, watch_workspaces=False) as store:
            assert await store.turns.check() == [], f"run {run}"
            assert await reachable(store.turns, names) == expected, f"run {run}"
            assert (await store.check()).problems == [], f"run {run}"
            await store.turns.gc(grace_s=0)  # the next run's garbage is counted from here
        before = await count_turns(root)
    print(f"{mid_sweep} of {RUNS} kills landed inside a sweep")
    assert mid_sweep >= 3, f"only {mid_sweep} of {RUNS} kills landed inside a sweep"
    async with open_store(root, watch_workspaces=False) as store:
        await store.turns.gc(grace_s=0)
        assert await store.turns.check() == []
        assert await reachable(store.turns, names) == expected
        left = await store.turns._actor.fetchone("SELECT COUNT(*) FROM turns")  # type: ignore[attr-defined]
        # What is left: the kept chains and the chain of the highest turn id (never reclaimed).
        assert left[0] <= len(ids) + 20 * len(names) + 400
