"""Crash and resume: the scripted loop (subagents three deep, workspace snapshots, budget
reservations) is SIGKILLed at random points over ten runs, each re-run with the same session name,
then run to its end. The tree it leaves must equal an uninterrupted run's (snapshot tree ids
included), with no record written twice, no context forked twice, the budget charged exactly once
and no reservation left held."""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from pforge_async import open_store
from pforge_async.agent import SessionRecorder, load_session_tree

from ._agent_loop import VENDOR, Loop, tree_trace
from ._procs import spawn

pytestmark = pytest.mark.anyio

SESSION = "crashy"
KILLS = 10

CHILD = """
import sys, anyio
from pathlib import Path
from pforge_async import open_store
from pforge_async.agent import SessionRecorder
from tests._agent_loop import VENDOR, Loop
async def main():
    async with open_store(sys.argv[1], durability="normal") as store:
        await store.budget.set_budget(VENDOR, tokens=10**9)
        loop = Loop(store=store, workspaces=Path(sys.argv[2]), progress=lambda: print("hook", flush=True))
        await loop.run(await SessionRecorder.start(store, sys.argv[3], mode="required"))
    print("done", flush=True)
anyio.run(main)
"""


async def outcome(root: Path) -> dict[str, Any]:
    """Everything the comparison looks at, read from the store alone."""
    async with open_store(root, durability="normal") as store:
        tree = await load_session_tree(store, SESSION)
        contexts = (await store.turns.list_contexts(prefix=SESSION, order="name", limit=1000)).contexts
        own: dict[str, list[Any]] = {}
        for info in contexts:
            turns = [t async for t in store.turns.iter_turns(info.context_id) if t.context_id == info.context_id]
            own[info.name or ""] = turns
        result = {
            "trace": tree_trace(tree, fs_roots=True),
            "contexts": sorted(own),
            "turns": {name: len(turns) for name, turns in own.items()},
            "keys": {name: sorted(t.idempotency_key or "" for t in turns) for name, turns in own.items()},
            "totals": await store.budget.totals(VENDOR),
            "held": await store.budget.list_reservations(),
            "check": (await store.check()).problems,
        }
    for name, keys in result["keys"].items():
        assert len(set(keys)) == len(keys), f"{name}: a key written twice"
    return result


def run_child(root: Path, workspaces: Path, kill_after: int | None) -> bool:
    """Run the loop in a child; SIGKILL it after ``kill_after`` hooks. True if it ran to its end."""
    child = spawn(CHILD, root, workspaces, SESSION)
    assert child.stdout is not None and child.stderr is not None
    hooks = 0
    try:
        while True:
            line = child.stdout.readline()
            if not line:
                child.wait(timeout=60)
                raise AssertionError(f"the child died ({child.returncode}): {child.stderr.read()}")
            if line.strip() == "done":
                child.wait(timeout=60)
                return True
            hooks += 1
            if kill_after is not None and hooks >= kill_after:
                child.send_signal(signal.SIGKILL)  # while it goes on with the next write
                child.wait(timeout=60)
                return False
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
        child.stderr.close()


async def test_sigkill_at_random_points_then_resume_leaves_the_uninterrupted_tree(tmp_path: Path) -> None:
    seed = int(os.environ.get("PFORGE_CRASH_SEED", time.time_ns() % 10**6))
    rng = random.Random(seed)
    reference_root = tmp_path / "reference"
    hooks = 0

    def count() -> None:
        nonlocal hooks
        hooks += 1

    async with open_store(reference_root, durability="normal") as store:
        await store.budget.set_budget(VENDOR, tokens=10**9)
        loop = Loop(store=store, workspaces=tmp_path / "reference-ws", progress=count)
        await loop.run(await SessionRecorder.start(store, SESSION, mode="required"))
    expected = await outcome(reference_root)
    assert expected["check"] == [] and expected["held"] == []

    root, workspaces = tmp_path / "crashed", tmp_path / "crashed-ws"
    kills: list[int] = []
    finished_early = 0
    while len(kills) < KILLS:
        point = rng.randint(1, hooks)
        if run_child(root, workspaces, point):
            finished_early += 1  # the session was done before the kill point: a run of replays
        else:
            kills.append(point)
    assert run_child(root, workspaces, None)
    got = await outcome(root)
    where = f"(seed {seed}, kills after hooks {kills}, {finished_early} runs finished before their kill)"
    assert got["check"] == [], where
    assert got["held"] == [], where
    assert got["trace"] == expected["trace"], where
    assert got["contexts"] == expected["contexts"], where
    assert got["turns"] == expected["turns"], where
    assert got["totals"] == expected["totals"], where
