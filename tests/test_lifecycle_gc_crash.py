"""SIGKILL of a process running gc at random points (issue 13), the turn store's and the whole store's:
every run is followed by a reopen, check(), a comparison of everything reachable with what was written
(with the store's: workspace snapshots and blobs too, and ``git fsck --strict``), and another gc."""

from __future__ import annotations

import random
import signal
import subprocess
import time
from pathlib import Path

import anyio
import pytest

from pforge_async import NewTurn, open_store
from pforge_async.store import Store
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


#: The child makes garbage in every part gc collects (deleted contexts whose turns name workspace
#: snapshots and blobs, orphan blobs, expired nonces), says "ready", and runs Store.gc until killed.
STORE_CHILD = r"""
import os, sys, anyio
from pathlib import Path
from pforge_async import NewTurn, open_store

async def main(root, seed, work):
    ws = Path(work)
    async with open_store(root, durability="normal", watch_workspaces=False) as store:
        turns = store.turns
        doomed = []
        for c in range(6):
            (ws / f"g{c}").mkdir(parents=True, exist_ok=True)
            (ws / f"g{c}" / "f.bin").write_bytes(os.urandom(2000))
            tree = await store.cas.snapshot(ws)
            blob = await turns.put_blob(os.urandom(500))
            ctx = await turns.create_context(name=f"garbage-{seed}-{c}")
            await turns.append_turns([NewTurn(ctx.context_id, "t", b"g%d" % i) for i in range(60)])
            await turns.append_turn(ctx.context_id, "t", b"snap", fs_root=tree, refs=[blob])
            doomed.append(ctx.context_id)
        for _ in range(20):
            await store.cas.write_blob(os.urandom(300))
        await store.nonces.issue("s", 0.001)
        for context_id in doomed:
            await turns.delete_context(context_id)
        await anyio.sleep(0.1)
        print("ready", flush=True)
        while True:
            await store.gc(grace_s=0)

anyio.run(main, sys.argv[1], int(sys.argv[2]), sys.argv[3])
"""


def git_fsck(root: Path) -> None:
    result = subprocess.run(
        ["git", "--git-dir", str(root / "cas"), "fsck", "--strict"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0 and "error" not in result.stderr.lower(), result.stdout + result.stderr


async def snapshot_state(store: Store, names: list[str]) -> dict[str, list[tuple[int, bytes, str | None, bytes]]]:
    """Every kept chain with, per turn, its payload, its snapshot's files and its ref'd blob."""
    out = {}
    for name in names:
        info = await store.turns.find_context(name)
        assert info is not None, name
        chain = []
        async for t in store.turns.iter_turns(info.context_id):
            files = b""
            if t.fs_root is not None:
                for entry in await store.cas.read_tree(t.fs_root, recursive=True):
                    files += entry.name.encode() + await store.cas.read_blob(entry.oid)
            blob = b"".join([await store.cas.read_blob(oid) for oid in t.refs])
            chain.append((t.turn_id, t.payload, t.fs_root, files + blob))
        out[name] = chain
    return out


async def test_store_gc_killed_at_random_points(tmp_path: Path) -> None:
    root = tmp_path / ".pforge"
    names = [f"kept-{i}" for i in range(4)]
    async with open_store(root, watch_workspaces=False) as store:
        for i, name in enumerate(names):
            ws = tmp_path / "kept-ws" / name
            ws.mkdir(parents=True)
            (ws / "a.txt").write_text(f"kept {i}\n" * 100)
            tree = await store.cas.snapshot(ws)
            blob = await store.turns.put_blob(b"kept blob %d" % i)
            ctx = await store.turns.create_context(name=name)
            await store.turns.append_turns(
                [NewTurn(ctx.context_id, "t", b"%s-%d" % (name.encode(), j)) for j in range(10)]
            )
            await store.turns.append_turn(ctx.context_id, "t", b"with snapshot", fs_root=tree, refs=[blob])
        expected = await snapshot_state(store, names)

    rng = random.Random(1313)
    journals = 0
    for run in range(RUNS):
        child = spawn(STORE_CHILD, root, run, tmp_path / f"work-{run}")
        wait_for_line(child, "ready", timeout=120)
        time.sleep(rng.uniform(0, 0.4))
        child.send_signal(signal.SIGKILL)
        child.communicate(timeout=30)
        journals += (root / "cas" / "gc-retired").exists()
        async with open_store(root, watch_workspaces=False) as store:
            assert (await store.check()).problems == [], f"run {run}"
            assert await snapshot_state(store, names) == expected, f"run {run}"
        git_fsck(root)
        async with open_store(root, watch_workspaces=False) as store:
            await store.gc(grace_s=0)
            assert (await store.check()).problems == [], f"run {run}"
    print(f"{journals} of {RUNS} kills left the CAS gc's journal of retired files to finish")
    await anyio.sleep(0.1)
    async with open_store(root, watch_workspaces=False) as store:
        report = await store.gc(grace_s=0)
        assert report.cas.missing == []
        assert await snapshot_state(store, names) == expected
        assert (await store.check()).problems == []
    git_fsck(root)
