"""The turn store's gc (issue 13): a store of 100,000 turns of ~1 KiB, 90% unreachable (900 of 1,000
contexts deleted), collected while 16 writers append; their p99 append latency against 16 writers on
the same store without a gc running.

Run: ``python benchmarks/gc.py [--turns 100000] [--writers 16]``. The CAS half of the issue's benchmark
(100,000 objects) waits for a CAS gc: ``SqliteTurnStore.gc`` collects ``turns.db`` only.
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
from pforge_async.turnstore.gc import TurnGcReport

PAYLOAD = os.urandom(1024)


def p99(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000


async def main(total: int, writers: int) -> None:
    print(describe())
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / ".pforge"
        async with open_store(root, watch_workspaces=False) as store:
            turns = store.turns
            contexts = 1000
            per = total // contexts
            ids = []
            start = time.perf_counter()
            for c in range(contexts):
                ctx = await turns.create_context(name=f"c{c}")
                await turns.append_turns([NewTurn(ctx.context_id, "t", PAYLOAD + b"%d" % i) for i in range(per)])
                ids.append(ctx.context_id)
            print(f"filled {contexts * per:,} turns in {time.perf_counter() - start:.1f} s")
            for context_id in ids[: contexts * 9 // 10]:
                await turns.delete_context(context_id)
            own = [(await turns.create_context(name=f"writer-{w}")).context_id for w in range(writers)]

            async def append_while(flag: list[bool], latencies: list[float], w: int) -> None:
                while flag[0]:
                    t0 = time.perf_counter()
                    await turns.append_turn(own[w], "t", PAYLOAD)
                    latencies.append(time.perf_counter() - t0)

            async def measure(seconds: float | None) -> tuple[list[float], TurnGcReport | None]:
                latencies: list[float] = []
                flag = [True]
                report: TurnGcReport | None = None
                async with anyio.create_task_group() as tg:
                    for w in range(writers):
                        tg.start_soon(append_while, flag, latencies, w)
                    await anyio.sleep(0.5)  # writers under way
                    latencies.clear()
                    if seconds is None:
                        report = await turns.gc(grace_s=0)
                    else:
                        await anyio.sleep(seconds)
                    flag[0] = False
                return latencies, report

            quiet, _ = await measure(3.0)
            busy, report = await measure(None)
            assert report is not None
            print(
                f"gc: {report.seconds:.2f} s, {report.turns_reclaimed:,} turns and "
                f"{report.payload_bytes_reclaimed / 2**20:.1f} MiB of payload reclaimed in {report.slices} slices; "
                f"turns.db + WAL {report.bytes_before / 2**20:.1f} MiB -> {report.bytes_after / 2**20:.1f} MiB "
                f"(free pages stay in the file for later writes); WAL truncated: {report.wal_truncated}"
            )
            print(
                f"append p99 with {writers} writers: {p99(quiet):.1f} ms without gc ({len(quiet)} appends), "
                f"{p99(busy):.1f} ms during gc ({len(busy)} appends): {p99(busy) / p99(quiet):.2f}x"
            )
            assert await turns.check() == []


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=100_000)
    parser.add_argument("--writers", type=int, default=16)
    args = parser.parse_args()
    anyio.run(main, args.turns, args.writers)
