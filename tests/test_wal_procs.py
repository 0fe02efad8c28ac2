"""The WAL stays bounded with many writer processes: 8 processes x 16 tasks append turns to one
store for 60 s while a sampler measures every ``-wal`` file, and no file passes the bound (see
``SqliteActor._bound_wal``); afterwards every acknowledged append is there and the store checks
clean."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import anyio
import pytest

from pforge_async import open_store
from pforge_async.sqlite.actor import SqliteActor

from ._procs import spawn, wait_for_line

PROCESSES = 8
TASKS = 16
SECONDS = 60.0
PAYLOAD = 1024
#: the bound the README states for turns of a few KiB: ``wal_limit`` plus one batch's pages.
BOUND = SqliteActor.wal_limit + (2 << 20)

_WRITER = """
import json, sys, time
import anyio
from pforge_async import open_store

root, proc, tasks, seconds, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])

async def main():
    acked = {}
    async with open_store(root) as store:
        contexts = [(await store.turns.create_context()).context_id for _ in range(tasks)]
        print("ready", flush=True)
        await anyio.to_thread.run_sync(sys.stdin.readline)
        deadline = time.monotonic() + seconds

        async def writer(ctx):
            ids = acked[ctx] = []
            n = 0
            while time.monotonic() < deadline:
                payload = (b"%d/%d/%d " % (proc, ctx, n)).ljust(size, b".")
                record = await store.turns.append_turn(ctx, "t", payload)
                ids.append(record.turn_id)
                n += 1

        async with anyio.create_task_group() as tg:
            for ctx in contexts:
                tg.start_soon(writer, ctx)
        actor = store.turns._actor
        stats = {"restarts": actor.wal_restarts, "missed": actor.wal_restarts_missed, "batches": actor.batches}
    print(json.dumps({"acked": acked, "stats": stats}), flush=True)

anyio.run(main)
"""


class Sampler(threading.Thread):
    """Measures the size of every ``-wal`` file under ``root`` as often as it can."""

    def __init__(self, root: Path) -> None:
        super().__init__(daemon=True)
        self.root = root
        self.peak: dict[str, int] = {}
        self.samples = 0
        self.halt = threading.Event()

    def run(self) -> None:
        wals = [self.root / f"{name}.db-wal" for name in ("turns", "memory", "nonces", "budget")]
        while not self.halt.is_set():
            for wal in wals:
                try:
                    size = wal.stat().st_size
                except FileNotFoundError:
                    continue
                if size > self.peak.get(wal.name, 0):
                    self.peak[wal.name] = size
            self.samples += 1
            time.sleep(0.002)


def _run_writers(root: Path) -> tuple[list[dict[str, object]], Sampler]:
    children = [spawn(_WRITER, root, proc, TASKS, SECONDS, PAYLOAD, stdin=subprocess.PIPE) for proc in range(PROCESSES)]
    sampler = Sampler(root)
    try:
        for child in children:
            wait_for_line(child, "ready", timeout=120)
        sampler.start()
        for child in children:
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.flush()
        reports = []
        for child in children:
            out, err = child.communicate(timeout=SECONDS + 120)
            assert child.returncode == 0, f"writer failed ({child.returncode}):\n{err[-3000:]}"
            reports.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        sampler.halt.set()
        for child in children:
            if child.poll() is None:
                child.kill()
                child.communicate()
    sampler.join()
    return reports, sampler


@pytest.mark.anyio
async def test_the_wal_stays_bounded_with_eight_writer_processes(tmp_path: Path) -> None:
    root = tmp_path / ".pforge"
    async with open_store(root):
        pass  # created once, so the writers race on appends, not on creating the store
    reports, sampler = await anyio.to_thread.run_sync(_run_writers, root)
    peak = {name: round(size / 2**20, 2) for name, size in sampler.peak.items()}
    stats = [report["stats"] for report in reports]
    acked = {int(ctx): ids for report in reports for ctx, ids in report["acked"].items()}  # type: ignore[attr-defined]
    print(f"peak WAL sizes (MiB): {peak} over {sampler.samples} samples; per process: {stats}")
    print(f"{sum(len(ids) for ids in acked.values())} appends acknowledged")
    assert sampler.samples > 1000
    assert sampler.peak.get("turns.db-wal", 0) > 0
    for name, size in sampler.peak.items():
        assert size < BOUND, f"{name} reached {size / 2**20:.1f} MiB, over the {BOUND / 2**20:.0f} MiB bound"

    async with open_store(root) as store:
        for ctx, ids in acked.items():
            turns = await store.turns.list_turns(ctx, limit=len(ids) + 1)
            assert [t.turn_id for t in turns] == ids, f"context {ctx} lost or gained turns"
        check = await store.check()
        assert check.ok, check.problems
