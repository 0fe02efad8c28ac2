"""The store's gc (issue 13): a store of 100,000 turns of ~1 KiB and 100,000 CAS objects (each turn names
a blob of its own as a ref), 90% unreachable (900 of 1,000 contexts deleted), collected by
``Store.gc(grace_s=0)`` while 16 writers append; their p99 append latency against the same 16 writers
on the same store without a gc running (the issue's target: within 3x).

Run: ``python benchmarks/gc.py [--turns 100000] [--writers 16] [--rounds 1]``. The fill runs with
``durability="normal"``; the measured store is reopened with the default ``"full"``. Each round
measures quiet, then gc (on a fresh fill), so the two are taken close together on a noisy machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import describe

from pforge_async import NewTurn, open_store
from pforge_async.lifecycle import GcReport, store_bytes

PAYLOAD = os.urandom(1024)
CONTEXTS = 1000


def p99(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


async def fill(root: Path, total: int) -> None:
    per = total // CONTEXTS
    start = time.perf_counter()
    async with open_store(root, durability="normal", watch_workspaces=False) as store:
        turns = store.turns
        for c in range(CONTEXTS):
            blobs: list[str] = []

            async def put(i: int, c: int = c, blobs: list[str] = blobs) -> None:
                blobs.append(await store.cas.write_blob(b"object %d of context %d " % (i, c) + PAYLOAD[:128]))

            async with anyio.create_task_group() as tg:
                for i in range(per):
                    tg.start_soon(put, i)
            ctx = await turns.create_context(name=f"c{c}")
            await turns.append_turns(
                [NewTurn(ctx.context_id, "t", PAYLOAD + b"%d" % i, refs=(blob,)) for i, blob in enumerate(blobs)]
            )
            if c % 10:  # 900 of 1,000 go
                await turns.delete_context(ctx.context_id)
    print(f"filled {CONTEXTS * per:,} turns and {CONTEXTS * per:,} objects in {time.perf_counter() - start:.1f} s")


async def measure(root: Path, writers: int) -> tuple[float, float, int, int, GcReport]:
    async with open_store(root, watch_workspaces=False) as store:
        turns = store.turns
        own = [(await turns.create_context(name=f"writer-{w}")).context_id for w in range(writers)]

        async def append_while(flag: list[bool], latencies: list[float], w: int) -> None:
            while flag[0]:
                t0 = time.perf_counter()
                await turns.append_turn(own[w], "t", PAYLOAD)
                latencies.append(time.perf_counter() - t0)

        async def run(gc: bool) -> tuple[list[float], GcReport | None]:
            latencies: list[float] = []
            flag = [True]
            report: GcReport | None = None
            async with anyio.create_task_group() as tg:
                for w in range(writers):
                    tg.start_soon(append_while, flag, latencies, w)
                await anyio.sleep(0.5)  # writers under way
                latencies.clear()
                if gc:
                    report = await store.gc(grace_s=0)
                else:
                    await anyio.sleep(3.0)
                flag[0] = False
            return latencies, report

        quiet, _ = await run(False)
        busy, report = await run(True)
        assert report is not None
        assert (await store.check()).problems == []
        return p99(quiet), p99(busy), len(quiet), len(busy), report


async def main(total: int, writers: int, rounds: int) -> None:
    print(describe())
    ratios = []
    for r in range(rounds):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp) / ".pforge"
            await fill(root, total)
            on_disk = store_bytes(root)
            quiet, busy, n_quiet, n_busy, report = await measure(root, writers)
            t, c = report.turns, report.cas
            print(
                f"round {r + 1}: Store.gc {report.seconds:.2f} s (turns {t.seconds:.2f} s in {t.slices} slices, "
                f"CAS {c.seconds:.2f} s, gate held at most {c.gate_held_s * 1000:.0f} ms); reclaimed "
                f"{report.turns_reclaimed:,} turns ({mib(t.payload_bytes_reclaimed)} of payload) and "
                f"{report.objects_reclaimed:,} objects ({c.objects_before:,} -> {c.objects_kept + c.objects_young:,}, "
                f"{c.packs_before} packs + {c.loose_before:,} loose -> {c.packs_after} + {c.loose_after:,})"
            )
            print(
                f"  store on disk {mib(on_disk)} after the fill; {mib(report.bytes_before)} -> "
                f"{mib(report.bytes_after)} by gc (freed {mib(report.bytes_freed)}, of which the databases "
                f"compacted {mib(report.compacted_bytes)})"
            )
            ratio = busy / quiet
            ratios.append(ratio)
            print(
                f"  append p99 with {writers} writers: {quiet:.1f} ms without gc ({n_quiet:,} appends in 3 s), "
                f"{busy:.1f} ms during gc ({n_busy:,} appends): {ratio:.2f}x"
            )
    ordered = sorted(ratios)
    median = ordered[len(ordered) // 2]
    print(
        f"p99 during/without gc over {rounds} round(s): min {ordered[0]:.2f}x, median {median:.2f}x, "
        f"max {ordered[-1]:.2f}x (target <= 3x)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--turns", type=int, default=100_000)
    parser.add_argument("--writers", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    anyio.run(main, args.turns, args.writers, args.rounds)
