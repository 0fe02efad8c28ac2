"""Lifecycle: two quick Ctrl-C during heavy writes always end the process within seconds (under
``anyio.run`` and ``asyncio.run``), the store then reopens sound, and a call after close raises
``ActorClosed``."""

from __future__ import annotations

import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import anyio
import pytest

from pforge_async import ActorClosed, LockTimeout, open_store
from pforge_async.fslock import FsLock
from pforge_async.ledgers.nonces import NonceActor

from ._procs import spawn, wait_for_line

#: runs of the two-Ctrl-C child; each must end within EXIT_WITHIN seconds of the second signal (a
#: bound that catches a child that never ends, with room for a loaded 2-core CI machine; a run that
#: passes ends in well under a second and waits for none of it).
RUNS = 20
EXIT_WITHIN = 60.0

_WRITER = """
import signal, sys
# Ctrl-C as a terminal's foreground process has it: a suite started in the background by a shell
# without job control (`cmd &` in a script) passes SIGINT on ignored, and a store respects that.
signal.signal(signal.SIGINT, signal.default_int_handler)
root, runner = sys.argv[1], sys.argv[2]
import anyio, asyncio
from pforge_async import open_store

async def main():
    async with open_store(root) as store:
        async def writer(i):
            ctx = await store.turns.create_context()
            n = 0
            while True:
                await store.turns.append_turn(ctx.context_id, "t", b"x" * 1024)
                n += 1
                if n % 50 == 0:
                    await store.turns.list_turns(ctx.context_id, limit=16)
                if i % 8 == 0 and n % 20 == 0:
                    await store.cas.write_blob(b"blob %d %d" % (i, n))
                    await store.memory.record_transition("s", "a%d" % (n % 5), "t", 0.5, True)
                    await store.nonces.issue("s", 60)
        async with anyio.create_task_group() as tg:
            for i in range(32):
                tg.start_soon(writer, i)
            await anyio.sleep(0.2)
            print("writing", flush=True)

if runner == "anyio":
    anyio.run(main)
else:
    asyncio.run(main())
"""


def _interrupt_twice(root: Path, runner: str, rng: random.Random) -> float:
    """Start a heavy writer, Ctrl-C it twice at random moments; seconds it took to end after the
    second one (it must end on its own)."""
    child = spawn(_WRITER, root, runner)
    try:
        wait_for_line(child, "writing", timeout=60)
        time.sleep(rng.uniform(0.0, 1.0))
        child.send_signal(signal.SIGINT)
        time.sleep(rng.choice([0.0, 0.001, 0.01, 0.05, 0.2]) * rng.random())
        child.send_signal(signal.SIGINT)
        sent = time.monotonic()
        try:
            _, err = child.communicate(timeout=EXIT_WITHIN)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{runner}: still running {EXIT_WITHIN}s after the second Ctrl-C") from None
        took = time.monotonic() - sent
        # Ended by the interrupt (or by an error the interrupt caused), never by a crash of ours.
        assert child.returncode in (-signal.SIGINT, 1, 130), err[-3000:]
        assert "Fatal Python error" not in err, err[-3000:]
        return took
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()


@pytest.mark.anyio
async def test_two_quick_ctrl_c_during_heavy_writes_always_end_the_process(tmp_path: Path) -> None:
    # Two children at a time, each on a store of its own, half of the runs under each runner.
    roots = [tmp_path / "a" / ".pforge", tmp_path / "b" / ".pforge"]
    runs = iter(range(RUNS))
    took: list[float] = []

    async def interrupter(root: Path) -> None:
        rng = random.Random()
        for run in runs:
            runner = ("anyio", "asyncio")[run % 2]
            took.append(await anyio.to_thread.run_sync(_interrupt_twice, root, runner, rng))

    async with anyio.create_task_group() as tg:
        for root in roots:
            tg.start_soon(interrupter, root)
    assert len(took) == RUNS
    print(f"{RUNS} runs, the slowest ended {max(took):.2f}s after the second Ctrl-C")
    for root in roots:
        async with open_store(root) as store:
            check = await store.check()
            assert check.ok, check.problems
            assert await store.turns.create_context()


_LOCK_HOLDER = """
import fcntl, sys, time
lock = open(sys.argv[1], "a")
fcntl.flock(lock, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(600)
"""


def _interrupt_while_another_process_holds_the_lock(root: Path, runner: str) -> float:
    writer = spawn(_WRITER, root, runner)
    holder = None
    try:
        wait_for_line(writer, "writing", timeout=60)
        # A writer of another process that hangs while it holds the turns database's lock: every
        # batch of ours now waits for it.
        holder = spawn(_LOCK_HOLDER, root / "locks" / "turns.lock")
        wait_for_line(holder, "held", timeout=60)
        time.sleep(0.5)
        writer.send_signal(signal.SIGINT)
        time.sleep(0.05)
        writer.send_signal(signal.SIGINT)
        sent = time.monotonic()
        try:
            writer.communicate(timeout=EXIT_WITHIN)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{runner}: waited on the lock {EXIT_WITHIN}s after the second Ctrl-C") from None
        return time.monotonic() - sent
    finally:
        for child in (writer, holder):
            if child is not None and child.poll() is None:
                child.kill()
                child.communicate()


@pytest.mark.anyio
async def test_two_ctrl_c_end_a_writer_whose_batch_waits_on_a_hung_process_lock(tmp_path: Path) -> None:
    root = tmp_path / ".pforge"
    for runner in ("anyio", "asyncio"):
        took = await anyio.to_thread.run_sync(_interrupt_while_another_process_holds_the_lock, root, runner)
        print(f"{runner}: ended {took:.2f}s after the second Ctrl-C")
    async with open_store(root) as store:
        check = await store.check()
        assert check.ok, check.problems


def test_a_thread_waiting_for_a_lock_stops_when_its_wait_is_called_off(tmp_path: Path) -> None:
    holder = spawn(_LOCK_HOLDER, tmp_path / "x.lock")
    try:
        wait_for_line(holder, "held", timeout=60)
        lock = FsLock(tmp_path / "x.lock")
        abandon = threading.Event()
        started = time.monotonic()  # before the timer starts: a pause between the two cannot shorten the wait seen
        threading.Timer(0.3, abandon.set).start()
        with pytest.raises(LockTimeout, match="gave up"):
            lock.acquire(abandon=abandon)
        assert 0.25 < time.monotonic() - started < EXIT_WITHIN
        assert not lock.held
    finally:
        holder.kill()
        holder.communicate()


@pytest.mark.anyio
async def test_every_call_after_close_raises_actor_closed(tmp_path: Path) -> None:
    async with open_store(tmp_path / "s") as store:
        ctx = await store.turns.create_context()
        await store.turns.append_turn(ctx.context_id, "t", b"x")
        actor = store.turns._actor  # reads go straight to its fetchall
    calls = [
        store.turns.get_head(ctx.context_id),
        store.turns.list_turns(ctx.context_id),
        store.turns.append_turn(ctx.context_id, "t", b"y"),
        store.memory.stats("s"),
        store.memory.record_transition("s", "a", "t", 1.0, True),
        store.nonces.issue("s", 1),
        store.budget.totals("v"),
        actor.fetchall("SELECT 1"),
        actor.fetchone("SELECT 1"),
        actor.check(),
    ]
    for call in calls:
        with pytest.raises(ActorClosed):
            await call


@pytest.mark.anyio
async def test_a_read_racing_the_close_gets_its_rows_or_actor_closed(tmp_path: Path) -> None:
    actor = NonceActor(tmp_path / "nonces.db", tmp_path / "nonces.lock")
    outcomes: list[str] = []
    read_once = anyio.Event()

    async def reader() -> None:
        while True:
            try:
                await actor.fetchall("SELECT count(*) FROM nonces")
            except ActorClosed:
                outcomes.append("closed")
                return
            outcomes.append("rows")
            read_once.set()

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            await tg.start(actor.run)
            for _ in range(8):
                tg.start_soon(reader)
            # Close once reads are under way (a fixed pause may pass before any on a loaded machine);
            # the readers go on reading, so the close still races them.
            await read_once.wait()
            await anyio.sleep(0.05)
            await actor.aclose()
    assert outcomes.count("closed") == 8 and "rows" in outcomes
    # Its threads are gone: nothing of the actor outlives the close.
    assert actor._worker is None and actor._reader is None and actor._checkpointer is None
