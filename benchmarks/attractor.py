"""Pipeline checkpoints: ``append_checkpoint_event`` and ``load_latest_checkpoint`` latency with 1 KiB and
10 MiB of state, in a run holding 10 and 10,000 checkpoints, on the memory, filesystem and SQLite
backends.

Run: ``python benchmarks/attractor.py``. For each backend and count, a run is filled with that many
1 KiB checkpoints (the fill writes the writer's records in batches of 500, to keep the setup short;
every timed append goes through ``AttractorWriter``), then: appends of 1 KiB checkpoints, loads of
the latest (1 KiB, inline), appends of 10 MiB checkpoints (state in the CAS: the SQLite store's git
object store, the other backends' blob store), loads of the latest (10 MiB read back from there).
The load reads the head of the run's checkpoint log, so its cost should not grow with the count:
the last lines print the ratio at 10,000 over 10. Durability is ``"full"`` (fsync per write) unless
``--durability normal``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import describe, peak_rss_mib

from pforge_async import MemoryTurnStore, NewTurn, Store, open_store
from pforge_async.attractor import AttractorWriter, CheckpointRecord, load_latest_checkpoint
from pforge_async.attractor.checkpoints import encode_state
from pforge_async.attractor.keys import checkpoint_key
from pforge_async.attractor.records import AttractorCorrelation, CheckpointEvent, StateRef, encode_record
from pforge_async.turnstore import FsTurnStore

KiB, MiB = 1 << 10, 1 << 20
RUN = "bench"
FILL_BATCH = 500


def checkpoint(seq: int, state: bytes) -> CheckpointRecord:
    return CheckpointRecord(RUN, f"cp-{seq}", seq, f"node{seq % 7}", ["node0"], {"node3": 1}, {"state": state}, "n")


@asynccontextmanager
async def target(kind: str, where: Path, durability: str) -> AsyncIterator[Any]:
    if kind == "memory":
        yield MemoryTurnStore()
    elif kind == "fs":
        async with FsTurnStore(where, durability=durability) as fs:
            yield fs
    else:
        async with open_store(where, durability=durability, watch_workspaces=False) as store:  # type: ignore[arg-type]
            yield store


async def fill(store: Any, writer: AttractorWriter, count: int, state: bytes) -> None:
    """``count`` 1 KiB checkpoints, as the writer would write them, in batches (setup, not timed)."""
    run = await writer.create_run_context(RUN)
    turns = store.turns if isinstance(store, Store) else store
    for start in range(1, count + 1, FILL_BATCH):
        batch = []
        for seq in range(start, min(start + FILL_BATCH, count + 1)):
            record = checkpoint(seq, state)
            data = encode_state(record)
            correlation = AttractorCorrelation(RUN, run.context_id, record.current_node, sequence_no=seq)
            full = CheckpointEvent(
                RUN,
                record.checkpoint_id,
                seq,
                record.current_node,
                record.completed_nodes,
                record.node_retries,
                StateRef(len(data), None, data),
                correlation,
                record.next_node,
            )
            summary = CheckpointEvent(
                RUN,
                record.checkpoint_id,
                seq,
                record.current_node,
                record.completed_nodes,
                record.node_retries,
                StateRef(len(data)),
                correlation,
                record.next_node,
            )
            key = checkpoint_key(RUN, seq)
            type_id, log_payload = encode_record(full)
            _, run_payload = encode_record(summary)
            batch.append(NewTurn(run.checkpoints.context_id, type_id, log_payload, idempotency_key=key))
            batch.append(NewTurn(run.context_id, type_id, run_payload, idempotency_key=key))
        await turns.append_turns(batch)


async def timed(n: int, call: Callable[[int], Awaitable[Any]]) -> list[float]:
    samples = []
    for i in range(n):
        start = time.perf_counter()
        await call(i)
        samples.append(time.perf_counter() - start)
    return samples


def row(kind: str, count: int, what: str, samples: list[float]) -> tuple[str, float]:
    ordered = sorted(samples)
    p50 = statistics.median(ordered) * 1000
    p95 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))] * 1000
    print(f"{kind:7} {count:>6} {what:28} {p50:9.3f} {p95:9.3f} {len(samples):5}", flush=True)
    return what, p50


async def one(kind: str, count: int, base: Path, args: argparse.Namespace) -> dict[str, float]:
    small = os.urandom(KiB - 16)
    large = os.urandom(10 * MiB)
    results: dict[str, float] = {}
    async with target(kind, base / f"{kind}-{count}", args.durability) as store:
        writer = AttractorWriter(store)
        await fill(store, writer, count, small)
        seq = count

        async def append(state: bytes) -> Callable[[int], Awaitable[Any]]:
            async def call(i: int) -> None:
                nonlocal seq
                seq += 1
                await writer.append_checkpoint_event(checkpoint(seq, state))

            return call

        async def load(i: int) -> None:
            latest = await load_latest_checkpoint(store, RUN)
            assert latest is not None and latest.sequence_no == seq

        for what, samples in (
            ("append 1 KiB", await timed(args.small, await append(small))),
            ("load_latest 1 KiB", await timed(args.loads, load)),
            ("append 10 MiB (CAS)", await timed(args.large, await append(large))),
            ("load_latest 10 MiB (CAS)", await timed(args.large, load)),
        ):
            name, p50 = row(kind, count, what, samples)
            results[name] = p50
    return results


async def main_async(args: argparse.Namespace) -> None:
    print(describe())
    print(f"# durability {args.durability}; latencies in ms")
    print(f"{'backend':7} {'ckpts':>6} {'operation':28} {'p50':>9} {'p95':>9} {'n':>5}")
    with tempfile.TemporaryDirectory(prefix="pforge-bench-attractor-", dir=args.dir) as tmp:
        base = Path(tmp)
        ratios = []
        for kind in args.backends:
            by_count = {count: await one(kind, count, base, args) for count in args.counts}
            low, high = min(args.counts), max(args.counts)
            for what in ("load_latest 1 KiB", "load_latest 10 MiB (CAS)"):
                ratios.append(f"{kind} {what}: {by_count[high][what] / by_count[low][what]:.2f}x")
    print(f"# load_latest p50 at {max(args.counts)} checkpoints over {min(args.counts)}:")
    for line in ratios:
        print(f"#   {line}")
    print(f"# peak RSS {peak_rss_mib():.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", nargs="+", default=["memory", "fs", "sqlite"])
    parser.add_argument("--counts", type=int, nargs="+", default=[10, 10_000])
    parser.add_argument("--small", type=int, default=200, help="1 KiB appends timed")
    parser.add_argument("--loads", type=int, default=500, help="1 KiB loads timed")
    parser.add_argument("--large", type=int, default=8, help="10 MiB appends (and loads) timed")
    parser.add_argument("--durability", choices=("full", "normal"), default="full")
    parser.add_argument("--dir", default=None, help="where the stores go (default: the system's temp dir)")
    anyio.run(main_async, parser.parse_args())


if __name__ == "__main__":
    main()
