from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import anyio
import pytest

from pforge_async import FsLock, InvalidInput, LockTimeout, StorageError

from ._procs import run_all, spawn, wait_for_line

COUNTER = """
import os, sys, time
from pforge_async import FsLock
path, lock_path, rounds, use_lock, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1", sys.argv[5]
print("waiting", flush=True)
while not os.path.exists(go):  # start together: on a loaded machine staggered starts never overlap
    time.sleep(0.001)
for _ in range(rounds):
    lock = FsLock(lock_path)
    if use_lock:
        lock.acquire()
    with open(path, "r+") as f:
        value = int(f.read())
        time.sleep(0.0002)  # widen the read-modify-write window so a missing lock shows
        f.seek(0)
        f.write(f"{value + 1:08d}")  # fixed width: an unlocked reader never sees a torn number
    if use_lock:
        lock.release()
"""

HOLD = """
import sys, time
from pforge_async import FsLock
lock = FsLock(sys.argv[1], shared=sys.argv[2] == "shared")
lock.acquire()
print("locked", flush=True)
time.sleep(float(sys.argv[3]))
lock.release()
"""

#: holds the lock until a line comes on its stdin (or it closes)
HOLD_UNTIL_TOLD = """
import sys
from pforge_async import FsLock
lock = FsLock(sys.argv[1])
lock.acquire()
print("locked", flush=True)
sys.stdin.readline()
lock.release()
"""


def _count(tmp_path: Path, use_lock: bool) -> int:
    counter = tmp_path / "counter"
    counter.write_text(f"{0:08d}")
    go = tmp_path / "go"
    procs = [spawn(COUNTER, counter, tmp_path / "counter.lock", 250, int(use_lock), go) for _ in range(4)]
    for proc in procs:  # every interpreter started and waits on the go file (a fixed pause may not do on CI)
        wait_for_line(proc, "waiting")
    go.touch()
    run_all(procs)
    return int(counter.read_text())


def test_four_processes_never_lose_an_update_under_the_lock(tmp_path: Path) -> None:
    assert _count(tmp_path, use_lock=True) == 1000


def test_the_counter_test_can_fail_without_the_lock(tmp_path: Path) -> None:
    assert _count(tmp_path, use_lock=False) < 1000


def test_a_killed_holder_does_not_block_the_next(tmp_path: Path) -> None:
    path = tmp_path / "held.lock"
    holder = spawn(HOLD, path, "exclusive", 60)
    wait_for_line(holder, "locked")
    with pytest.raises(LockTimeout):
        FsLock(path, timeout=0.05).acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with FsLock(path, timeout=5) as lock:
        assert lock.held
    assert path.exists()  # the file is never deleted


@pytest.mark.anyio
async def test_waiting_for_a_lock_does_not_block_the_loop(tmp_path: Path) -> None:
    path = tmp_path / "busy.lock"
    holder = spawn(HOLD_UNTIL_TOLD, path, stdin=subprocess.PIPE)
    wait_for_line(holder, "locked")
    assert holder.stdin is not None
    ticks = 0
    acquired = anyio.Event()

    async def ticker() -> None:
        # The holder lets go only once this task has ticked 15 times while the lock is awaited: a
        # wait that blocked the loop would starve it, and the acquire below would time out.
        nonlocal ticks
        while not acquired.is_set():
            ticks += 1
            if ticks == 15:
                holder.stdin.write("release\n")  # type: ignore[union-attr]
                holder.stdin.flush()  # type: ignore[union-attr]
            await anyio.sleep(0.01)

    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        async with FsLock(path, timeout=60):
            acquired.set()
            ticks_when_acquired = ticks
    run_all([holder])  # closes its stdin: the holder is done either way
    assert ticks_when_acquired >= 15  # the loop ticked on while we waited


@pytest.mark.anyio
async def test_timeout_raises_lock_timeout_naming_path_and_wait(tmp_path: Path) -> None:
    path = tmp_path / "t.lock"
    async with FsLock(path):
        start = time.monotonic()
        with pytest.raises(LockTimeout) as info:
            async with FsLock(path, timeout=0.1):
                pass
        assert time.monotonic() - start >= 0.1
    assert str(path) in str(info.value)
    assert "0.100s" in str(info.value)
    with pytest.raises(LockTimeout):
        with FsLock(path, timeout=0):
            with FsLock(path, timeout=0):
                pass


@pytest.mark.anyio
async def test_two_tasks_of_one_process_exclude_each_other(tmp_path: Path) -> None:
    path = tmp_path / "tasks.lock"
    inside = 0
    most_inside = 0
    entries = 0

    async def worker() -> None:
        nonlocal inside, most_inside, entries
        for _ in range(10):
            async with FsLock(path):
                inside += 1
                entries += 1
                most_inside = max(most_inside, inside)
                await anyio.sleep(0.001)
                inside -= 1

    async with anyio.create_task_group() as tg:
        for _ in range(8):
            tg.start_soon(worker)
    assert entries == 80
    assert most_inside == 1


def test_shared_locks_admit_readers_and_exclude_a_writer(tmp_path: Path) -> None:
    path = tmp_path / "rw.lock"
    reader = spawn(HOLD, path, "shared", 60)
    try:
        wait_for_line(reader, "locked")
        # Another reader in this process, and a second one beside it, get in at once.
        with FsLock(path, shared=True, timeout=30), FsLock(path, shared=True, timeout=30):
            with pytest.raises(LockTimeout):
                FsLock(path, timeout=0.1).acquire()
        with pytest.raises(LockTimeout):  # the other process still reads
            FsLock(path, timeout=0.1).acquire()
    finally:
        reader.kill()
        reader.wait()
    with FsLock(path, timeout=5):
        with pytest.raises(LockTimeout):  # a writer excludes readers too
            FsLock(path, shared=True, timeout=0.05).acquire()


@pytest.mark.anyio
async def test_a_cancelled_wait_leaves_nothing_held(tmp_path: Path) -> None:
    path = tmp_path / "c.lock"
    async with FsLock(path):
        with anyio.move_on_after(0.05):
            await FsLock(path).acquire_async()
    with FsLock(path, timeout=0):  # free: the cancelled waiter took nothing
        pass


def test_bad_input(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="timeout"):
        FsLock(tmp_path / "x.lock", timeout=-1)
    with pytest.raises(StorageError, match="no-such-dir"):
        FsLock(tmp_path / "no-such-dir" / "x.lock").acquire()
    lock = FsLock(tmp_path / "x.lock")
    with pytest.raises(RuntimeError, match="not held"):
        lock.release()


def test_a_forked_child_neither_inherits_nor_releases_the_lock(tmp_path: Path) -> None:
    import os

    path = tmp_path / "fork.lock"
    with FsLock(path):
        pid = os.fork()
        if pid == 0:  # the child: it must not hold the parent's lock, nor drop it on exit
            try:
                FsLock(path, timeout=0).acquire()
                os._exit(3)  # it got the lock: exclusion is broken
            except LockTimeout:
                os._exit(0)
            except BaseException:
                os._exit(4)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        probe = spawn(HOLD, path, "exclusive", 0)  # still held by us after the child is gone
        try:
            with pytest.raises(AssertionError):
                wait_for_line(probe, "locked", timeout=2)
        finally:
            probe.kill()
            probe.wait()
    with FsLock(path, timeout=5):
        pass
