"""gc run again and again in this process while 4 processes write and read (issue 13): zero errors
anywhere, every acknowledged write still reachable reads back as written, check() clean.

- ``Store.gc`` for 60 s beside processes that append, fork, rewind and delete, snapshot workspaces
  into the CAS and attach them, store blobs and name them as refs, and read all of it back;
  ``git fsck --strict`` clean on the CAS at the end.
- The turn store's gc alone (no grace at all) for a shorter run beside the turn operations."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import anyio
import pytest

from pforge_async import open_store

from ._procs import run_all, spawn, wait_for_line

pytestmark = pytest.mark.anyio

SECONDS = float(os.environ.get("PFORGE_GC_CONCURRENCY_SECONDS", "60"))
#: the turns-only run: the store run covers the turn gc too
TURN_SECONDS = min(SECONDS, 15.0)
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
        writers = [spawn(WRITER, root, seed, TURN_SECONDS, out) for seed, out in enumerate(outs)]
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
        assert runs >= 5 and reclaimed > 0
        await store.turns.gc(grace_s=0)
        for context_id, chain in expected.items():
            got = [[r.turn_id, r.payload.hex()] async for r in store.turns.iter_turns(context_id)]
            assert got == chain, context_id
        assert await store.turns.check() == []
        assert (await store.check()).problems == []


#: As WRITER, and each turn may carry a snapshot of the writer's workspace (changed now and then) and
#: a blob of its own as a ref; reads check those too. Ends with the chains and what each turn names.
STORE_WRITER = r"""
import json, os, random, sys, time, anyio
from pathlib import Path
from pforge_async import open_store

async def main(root, seed, seconds, out, work):
    rng = random.Random(seed)
    ws = Path(work); (ws / "d").mkdir(parents=True)
    async with open_store(root, durability="normal", watch_workspaces=False) as store:
        t = store.turns
        live = {}
        print("ready", flush=True)

        async def verify(cid, chain):
            got = [(r.turn_id, r.payload, r.fs_root, list(r.refs)) async for r in t.iter_turns(cid, page_size=7)]
            assert [g[:2] for g in got] == [c[:2] for c in chain], (cid, got[-2:], chain[-2:])
            for (turn_id, payload, fs_root, refs), (_, _, tree, blob, data) in zip(got, chain):
                assert fs_root == tree and refs == ([blob] if blob else []), turn_id
                if tree is not None:
                    entries = await store.cas.read_tree(tree, recursive=True)
                    for entry in entries:
                        await store.cas.read_blob(entry.oid)
                if blob is not None:
                    assert await store.cas.read_blob(blob) == data

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
                tree = blob = data = None
                if rng.random() < 0.3:
                    if rng.random() < 0.5:
                        (ws / "d" / f"f{rng.randrange(8)}").write_bytes(os.urandom(rng.randrange(1, 3000)))
                    tree = await store.cas.snapshot(ws)
                if rng.random() < 0.2:
                    data = b"blob %d %d " % (seed, n) + os.urandom(64)
                    blob = await t.put_blob(data)
                record = await t.append_turn(
                    cid, "t", payload, expected_head=chain[-1][0] if chain else 0, fs_root=tree,
                    refs=[blob] if blob else (),
                )
                chain.append((record.turn_id, payload, tree, blob, data))
            elif op < 0.68 and chain:
                k = rng.randrange(len(chain))
                fork = await t.fork_context(chain[k][0], name=f"w{seed}-{n}")
                live[fork.context_id] = chain[: k + 1]
            elif op < 0.76 and chain:
                k = rng.randrange(len(chain))
                await t.set_head(cid, chain[k][0])
                live[cid] = chain[: k + 1]
            elif op < 0.84:
                await t.delete_context(cid)
                del live[cid]
            else:
                await verify(cid, chain)
        for cid, chain in live.items():
            await verify(cid, chain)
        with open(out, "w") as f:
            json.dump(
                {str(cid): [[i, p.hex(), tree, blob, None if d is None else d.hex()] for i, p, tree, blob, d in chain]
                 for cid, chain in live.items()},
                f,
            )

anyio.run(main, sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4], sys.argv[5])
"""

#: The store's gc leaves what is younger than this: a writer's snapshot or put_blob freshens its
#: objects, then its append commits the turn that names them; the grace covers the time between
#: (see Store.gc). Turns and objects older than it are collected as the run goes.
STORE_GRACE_S = 5.0  # 2 s left too little room for four writer processes on a loaded 2-core machine


async def test_store_gc_beside_four_processes_writing_snapshots_and_refs(tmp_path: Path) -> None:
    root = tmp_path / ".pforge"
    async with open_store(root, durability="normal", watch_workspaces=False) as store:
        outs = [tmp_path / f"writer-{seed}.json" for seed in range(WRITERS)]
        writers = [
            spawn(STORE_WRITER, root, seed, SECONDS, out, tmp_path / f"ws-{seed}") for seed, out in enumerate(outs)
        ]
        for writer in writers:
            wait_for_line(writer, "ready", timeout=120)
        runs = turns = objects = 0
        longest = 0.0
        while any(writer.poll() is None for writer in writers):
            report = await store.gc(grace_s=STORE_GRACE_S)
            runs += 1
            turns += report.turns_reclaimed
            objects += report.objects_reclaimed
            longest = max(longest, report.seconds)
            assert report.cas.missing == [], report.cas.missing
            await anyio.sleep(0.1)
        await anyio.to_thread.run_sync(run_all, writers)
        expected = {int(k): v for out in outs for k, v in json.loads(out.read_text()).items()}
        print(
            f"{runs} store gc runs reclaimed {turns} turns and {objects} objects; longest {longest:.3f} s; "
            f"{len(expected)} live contexts"
        )
        assert runs >= 5 and turns > 0 and objects > 0
        await anyio.sleep(STORE_GRACE_S)
        await store.gc(grace_s=0)
        for context_id, chain in expected.items():
            got = [r async for r in store.turns.iter_turns(context_id)]
            assert [[r.turn_id, r.payload.hex()] for r in got] == [c[:2] for c in chain], context_id
            for record, (_, _, tree, blob, data) in zip(got, chain, strict=True):
                assert record.fs_root == tree
                if tree is not None:
                    for entry in await store.cas.read_tree(tree, recursive=True):
                        await store.cas.read_blob(entry.oid)
                if blob is not None:
                    assert await store.cas.read_blob(blob) == bytes.fromhex(data)
        assert (await store.check()).problems == []
    fsck = subprocess.run(
        ["git", "--git-dir", str(root / "cas"), "fsck", "--strict"], capture_output=True, text=True, check=False
    )
    assert fsck.returncode == 0 and "error" not in fsck.stderr.lower(), fsck.stdout + fsck.stderr
