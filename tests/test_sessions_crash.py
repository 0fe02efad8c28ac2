"""SIGKILL during ``append_turns`` and during a fork with a key, then a rerun of the same steps with the
same keys: every batch is whole or absent, and no fork is left as an orphan or made twice. (The
loop can run on SQLite too; tests/test_sessions_sqlite.py has SQLite's own.)"""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path

import pytest

from pforge_async import open_store
from pforge_async.turnstore import FsTurnStore
from pforge_async.turnstore.base import TurnStoreBase

from ._procs import next_line, spawn, whole_lines

pytestmark = pytest.mark.anyio

PER_CONTEXT = 4

#: One agent loop: each round appends one batch across two sessions, then forks a subagent from it,
#: both keyed by the round, and says so. Started again at the first round it has not finished.
LOOP = """
import sys, anyio
from pforge_async import NewTurn, open_store
from pforge_async.turnstore import FsTurnStore
backend, root, first = sys.argv[1], sys.argv[2], int(sys.argv[3])

def payload(i, j):
    return b"round %d turn %d " % (i, j) * 3000  # ~50 KiB: a batch takes a while to write

async def loop(turns):
    main = await turns.open_context("main")
    side = await turns.open_context("side")
    i = first
    while True:
        batch = [NewTurn(c.context_id, "t", payload(i, j), idempotency_key=f"b{i}-{j}")
                 for c in (main, side) for j in range(PER_CONTEXT)]
        records = await turns.append_turns(batch)
        print(f"batch {i}", flush=True)
        fork = await turns.fork_context(
            records[PER_CONTEXT - 1].turn_id, name=f"fork/{i}", idempotency_key=f"fork-{i}"
        )
        print(f"fork {i} {fork.context_id}", flush=True)
        i += 1

async def main():
    if backend == "fs":
        async with FsTurnStore(root) as turns:
            await loop(turns)
    else:
        async with open_store(root, watch_workspaces=False) as store:
            await loop(store.turns)
anyio.run(main)
""".replace("PER_CONTEXT", str(PER_CONTEXT))


def read_lines_then_kill(args: list[object], rng: random.Random) -> list[str]:
    """Run the loop, let it acknowledge a few steps, SIGKILL it at a random moment, return its lines."""
    child = spawn(LOOP, *args)
    assert child.stdout is not None
    lines: list[str] = []
    wanted = rng.randint(1, 5)
    deadline = time.monotonic() + 60  # generous: a loaded machine starts Python slowly
    while len(lines) < wanted:
        line = next_line(child, max(0.0, deadline - time.monotonic()))
        assert line, child.stderr.read() if child.stderr else "the loop ended"
        lines.append(line.strip())
    time.sleep(rng.uniform(0, 0.05))  # land inside the next batch's or fork's write, or near it
    child.send_signal(signal.SIGKILL)
    child.wait()
    rest = child.stdout.read()  # what it printed before the kill landed
    return lines + [line for line in whole_lines(rest) if line]


async def verify(turns: TurnStoreBase, rounds_begun: int, forks_acked: dict[int, int]) -> None:
    assert await turns.check() == []
    main = await turns.find_context("main")
    side = await turns.find_context("side")
    assert main is not None and side is not None
    for ctx in (main, side):
        chain = [t async for t in turns.iter_turns(ctx.context_id)]
        keys = [t.idempotency_key for t in chain]
        rounds = len(keys) // PER_CONTEXT
        # Whole batches only, in order, each once: no torn batch, no duplicate from a rerun.
        assert keys == [f"b{i}-{j}" for i in range(rounds) for j in range(PER_CONTEXT)]
        assert rounds in (rounds_begun, rounds_begun - 1)
        for n, t in enumerate(chain):
            assert t.payload == b"round %d turn %d " % divmod(n, PER_CONTEXT) * 3000
    page = await turns.list_contexts(order="created", limit=10_000)
    assert page.cursor is None
    names = sorted(c.name or "" for c in page.contexts)
    forks = sorted(n for n in names if n.startswith("fork/"))
    # No orphan: every context is a named session or a fork some round asked for, each made once.
    assert names == sorted(["main", "side", *forks])
    assert [int(n.split("/")[1]) for n in sorted(forks, key=lambda n: int(n.split("/")[1]))] == list(range(len(forks)))
    for i, context_id in forks_acked.items():
        info = await turns.find_context(f"fork/{i}")
        assert info is not None and info.context_id == context_id
        assert info.parent_context_id == main.context_id


@pytest.mark.parametrize("backend", ["fs"])  # SQLite: tests/test_sessions_sqlite.py
async def test_sigkill_during_batches_and_keyed_forks(tmp_path: Path, backend: str) -> None:
    rng = random.Random()
    root = tmp_path / ("fs" if backend == "fs" else ".pforge")
    first = 0
    forks_acked: dict[int, int] = {}
    for _ in range(4):
        lines = read_lines_then_kill([backend, root, first], rng)
        for line in lines:
            kind, i, *rest = line.split()
            if kind == "fork":
                forks_acked[int(i)] = int(rest[0])
        # The rerun starts at the first round whose fork was not acknowledged: it may have landed
        # (batch or fork or both), and the same keys must find what did.
        first = max(forks_acked, default=-1) + 1
    if backend == "fs":
        async with FsTurnStore(root) as turns:
            await verify(turns, first + 1, forks_acked)
    else:
        async with open_store(root, watch_workspaces=False) as store:
            await verify(store.turns, first + 1, forks_acked)
