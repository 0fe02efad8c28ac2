"""The turn store's gc, run again and again in this process (with no grace at all), while 4 processes
append, fork, rewind, delete and read for 60 s (issue 13): zero errors anywhere, every acknowledged
write still reachable reads back as written, check() clean."""

from __future__ import annotations

import json
import os
from pathlib import Path

import anyio
import pytest

from pforge_async import open_store

from ._procs import run_all, spawn, wait_for_line

pytestmark = pytest.mark.anyio

SECONDS = float(os.environ.get("PFORGE_GC_CONCURRENCY_SECONDS", "60"))
WRITERS = 4

#: A writer keeps, for each context it made and has not deleted, the chain it expects (turn id and
#: payload), checks some of them as it goes, and writes them all to a file at the end.
WRITER = r"""
import json, random, sys, time, anyio
from pforge_async import open_store

async def main(root, seed, seconds, out):
    rng = random.Random(seed)
    async with open_store(root, durability="normal", watch_workspaces=False) as store:
        t = store.turns
        live = {}
        print("ready", flush=True)
        deadline = time.monotonic() + seconds
        n = 0
        while time.monotonic() < deadline:
            n += 1
            op = rng.random()
            if len(live) < 2 or op < 0.08:
                ctx = await t.create_context(name=f"w{seed}-{n}")
                live[ctx.context_id] = []
                continue
            cid = rng.choice(sorted(live))
            chain = live[cid]
            if op < 0.6:
                payload = b"%d-%d-" % (seed, n) + bytes(rng.randrange(200))
                record = await t.append_turn(cid, "t", payload, expected_head=chain[-1][0] if chain else 0)
                chain.append((record.turn_id, payload))
            elif op < 0.68 and chain:
                k = rng.randrange(len(chain))
                fork = await t.fork_context(chain[k][0], name=f"w{seed}-{n}")
                live[fork.context_id] = chain[: k + 1]
            elif op < 0.76 and chain:
                k = rng.randrange(len(chain))
                await t.set_head(cid, chain[k][0])  # what was above it is garbage now, unless shared
                live[cid] = chain[: k + 1]
            elif op < 0.84:
                await t.delete_context(cid)
                del live[cid]
            else:
                got = [(r.turn_id, r.payload) async for r in t.iter_turns(cid, page_size=7)]
                assert got == chain, (cid, got[-3:], chain[-3:])
        for cid, chain in live.items():
            got = [(r.turn_id, r.payload) async for r in t.iter_turns(cid)]
            assert got == chain, cid
        with open(out, "w") as f:  # not stdout: a pipe nobody reads yet would block the exit
            json.dump({str(cid): [[i, p.hex()] for i, p in chain] for cid, chain in live.items()}, f)

anyio.run(main, sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4])
"""


async def test_gc_beside_four_writing_processes(tmp_path: Path) -> None:
    root = tmp_path / ".pforge"
    async with open_store(root, durability="normal", watch_workspaces=False) as store:
        outs = [tmp_path / f"writer-{seed}.json" for seed in range(WRITERS)]
        writers = [spawn(WRITER, root, seed, SECONDS, out) for seed, out in enumerate(outs)]
        for writer in writers:
            wait_for_line(writer, "ready", timeout=120)
        runs = reclaimed = 0
        longest = 0.0
        while any(writer.poll() is None for writer in writers):
            report = await store.turns.gc(grace_s=0)
            runs += 1
            reclaimed += report.turns_reclaimed
            longest = max(longest, report.seconds)
            await anyio.sleep(0.05)
        await anyio.to_thread.run_sync(run_all, writers)
        expected = {int(k): v for out in outs for k, v in json.loads(out.read_text()).items()}
        print(f"{runs} gc runs reclaimed {reclaimed} turns; longest {longest:.3f} s; {len(expected)} live contexts")
        assert runs >= 10 and reclaimed > 0
        await store.turns.gc(grace_s=0)
        for context_id, chain in expected.items():
            got = [[r.turn_id, r.payload.hex()] async for r in store.turns.iter_turns(context_id)]
            assert got == chain, context_id
        assert await store.turns.check() == []
        assert (await store.check()).problems == []
