"""A full disk: writes fail promptly with ``StorageError``, the event loop never stalls, and once
space is freed the same open store (and a reopened one) serves again with every acknowledged write.

The store lives on a 16 MiB volume: a ``tmpfs`` mounted for the test (as root); where mounting
tmpfs is refused, a loop-mounted ext4 image; where both are refused, a tmpfs mounted inside a user
and mount namespace of a child process (``unshare --user --map-root-user --mount``), which the test
runs the same scenario in. The reason for each refusal is printed.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from pathlib import Path
from typing import TypeVar

import anyio
import pytest

from pforge_async import StorageError, open_store

from ._procs import ROOT

T = TypeVar("T")
VOLUME_MIB = 16
#: a write that fails must fail within this many seconds (generous: a loaded 2-core machine).
FAIL_WITHIN = 10.0
#: the event loop must come round at least this often while the disk is full.
MAX_TICK_GAP = 2.0
#: how long the writers keep writing once the disk is full.
FULL_FOR = 3.0


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def _mount_small_volume(mountpoint: Path, scratch: Path) -> tuple[list[str], list[str]]:
    """Mount a small volume at ``mountpoint``: (how to unmount it, why the other ways were refused)."""
    refused = []
    if os.geteuid() != 0:
        refused.append("tmpfs and loop mounts need root")
        return [], refused
    done = _run("mount", "-t", "tmpfs", "-o", f"size={VOLUME_MIB}m,mode=0700", "tmpfs", str(mountpoint))
    if done.returncode == 0:
        return ["umount", str(mountpoint)], refused
    refused.append(f"mount -t tmpfs: {done.stderr.strip()}")
    image = scratch / "volume.img"
    with open(image, "wb") as f:
        f.truncate(VOLUME_MIB << 20)
    made = _run("mkfs.ext4", "-q", "-F", str(image))
    if made.returncode == 0:
        done = _run("mount", "-o", "loop", str(image), str(mountpoint))
        if done.returncode == 0:
            return ["umount", str(mountpoint)], refused
        refused.append(f"mount -o loop: {done.stderr.strip()}")
    else:
        refused.append(f"mkfs.ext4: {made.stderr.strip()}")
    return [], refused


@pytest.fixture
def small_volume(tmp_path: Path) -> Iterator[Path | None]:
    """The mounted volume, or None when this process may not mount one (then the test runs the
    scenario in a namespace of its own)."""
    mountpoint = tmp_path / "volume"
    mountpoint.mkdir()
    unmount, refused = _mount_small_volume(mountpoint, tmp_path)
    for reason in refused:
        print(f"small volume: {reason}")
    if not unmount:
        yield None
        return
    try:
        yield mountpoint
    finally:
        for _ in range(50):
            if _run(*unmount).returncode == 0:
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"could not unmount {mountpoint}")


def _fill(path: Path) -> int:
    """Write zeros to ``path`` until the volume is full; the bytes written."""
    chunk = bytes(256 << 10)
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        while True:
            try:
                written += os.write(fd, chunk if written < (64 << 20) else chunk[:4096])
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                if len(chunk) == 4096:
                    return written
                chunk = chunk[:4096]  # top up the last blocks
    finally:
        os.close(fd)


class Acked:
    """Every write the store acknowledged, to find again afterwards."""

    def __init__(self) -> None:
        self.turns: dict[int, list[bytes]] = {}
        self.blobs: dict[str, bytes] = {}
        self.transitions = 0
        self.spend = 0
        self.nonces: list[str] = []
        self.failures: dict[str, int] = {}
        self.slowest_failure = 0.0
        self.unexpected: list[str] = []


async def scenario(volume: Path) -> dict[str, object]:
    """Write, fill the disk while writing, free it, and check everything; a report of what happened."""
    root = volume / ".pforge"
    filler = volume / "filler"
    acked = Acked()
    gaps = [0.0]
    full = anyio.Event()
    stop = anyio.Event()
    seq = iter(range(1 << 30))

    async def ticker() -> None:
        last = time.monotonic()
        while not stop.is_set():
            await anyio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    async def attempt(kind: str, call: Awaitable[T]) -> T | None:
        """The call's result, or None if it failed with StorageError (counted, and timed)."""
        started = time.monotonic()
        try:
            return await call
        except StorageError:
            acked.slowest_failure = max(acked.slowest_failure, time.monotonic() - started)
            acked.failures[kind] = acked.failures.get(kind, 0) + 1
        except Exception as exc:  # anything but StorageError is a finding
            acked.unexpected.append(f"{kind}: {exc!r}")
        await anyio.sleep(0.005)
        return None

    async def rounds(quota: int) -> AsyncIterator[int]:
        """``quota`` rounds before the disk is full (so the store does not fill it itself), then
        rounds until the test stops."""
        for n in range(quota):
            yield n
        await full.wait()
        n = quota
        while not stop.is_set():
            yield n
            n += 1

    async with open_store(root) as store:
        await store.budget.set_budget("v", tokens=1 << 40)

        async def turn_writer() -> None:
            ctx = (await store.turns.create_context()).context_id
            acked.turns[ctx] = []
            async for _ in rounds(100):
                payload = b"turn %d " % next(seq) + os.urandom(700)
                if await attempt("turn", store.turns.append_turn(ctx, "t", payload)) is not None:
                    acked.turns[ctx].append(payload)

        async def blob_writer() -> None:
            async for _ in rounds(10):
                data = os.urandom(48 << 10)
                oid = await attempt("blob", store.cas.write_blob(data))
                if oid is not None:
                    acked.blobs[oid] = data
                await anyio.sleep(0.01)

        async def ledger_writer() -> None:
            async for n in rounds(20):
                if await attempt("transition", store.memory.record_transition("s", "a", "t", 0.5, True)):
                    acked.transitions += 1
                cost = n + 1
                spend = store.budget.record_spend("v", "m", input_tokens=1, output_tokens=1, cost=cost)
                if await attempt("spend", spend) is not None:
                    acked.spend += cost
                nonce = await attempt("nonce", store.nonces.issue("subject", 3600))
                if nonce is not None:
                    acked.nonces.append(nonce)
                await anyio.sleep(0.005)

        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker)
            for _ in range(4):
                tg.start_soon(turn_writer)
            tg.start_soon(blob_writer)
            tg.start_soon(ledger_writer)
            await anyio.sleep(0.5)
            filled = await anyio.to_thread.run_sync(_fill, filler)
            full.set()
            await anyio.sleep(FULL_FOR)
            stop.set()
        failures_while_full = dict(acked.failures)
        unexpected_while_full = list(acked.unexpected)
        filler.unlink()

        # The same open store serves again, at once.
        ctx = next(iter(acked.turns))
        after = b"after the disk was freed"
        await store.turns.append_turn(ctx, "t", after)
        acked.turns[ctx].append(after)
        data = b"a blob after the disk was freed"
        acked.blobs[await store.cas.write_blob(data)] = data
        await store.memory.record_transition("s", "a", "t", 0.5, True)
        acked.transitions += 1
        await store.budget.record_spend("v", "m", input_tokens=1, output_tokens=1, cost=7)
        acked.spend += 7
        acked.nonces.append(await store.nonces.issue("subject", 3600))
        await _verify(store, acked, consume=False)

    async with open_store(root) as store:
        await _verify(store, acked, consume=True)
        check = await store.check()
        assert check.ok, check.problems
    return {
        "filled": filled,
        "failures_while_full": failures_while_full,
        "unexpected": unexpected_while_full + acked.unexpected,
        "slowest_failure": acked.slowest_failure,
        "max_tick_gap": max(gaps),
        "acked_turns": sum(len(v) for v in acked.turns.values()),
        "acked_blobs": len(acked.blobs),
    }


async def _verify(store: object, acked: Acked, *, consume: bool) -> None:
    from pforge_async import Store

    assert isinstance(store, Store)
    for ctx, payloads in acked.turns.items():
        turns = await store.turns.list_turns(ctx, limit=len(payloads) + 10)
        # Exactly what was acknowledged: no write that failed was kept.
        assert [t.payload for t in turns] == payloads
    for oid, data in acked.blobs.items():
        assert await store.cas.read_blob(oid) == data
    [stats] = await store.memory.stats("s")
    assert stats.count == acked.transitions
    assert (await store.budget.totals("v")).cost == acked.spend
    if consume:
        for nonce in acked.nonces:
            await store.nonces.consume(nonce, "subject")


def _check(report: dict[str, object]) -> None:
    print(json.dumps(report, indent=1))
    assert not report["unexpected"], report["unexpected"]
    failures = report["failures_while_full"]
    assert isinstance(failures, dict)
    # The disk was full for seconds: every kind of write met it, as a StorageError.
    for kind in ("turn", "blob", "transition", "spend", "nonce"):
        assert failures.get(kind, 0) > 0, f"no {kind} write failed while the disk was full: {failures}"
    assert isinstance(report["slowest_failure"], float) and report["slowest_failure"] < FAIL_WITHIN
    assert isinstance(report["max_tick_gap"], float) and report["max_tick_gap"] < MAX_TICK_GAP


_CHILD = """
import json, sys
from pathlib import Path
import anyio
from tests.test_disk_full import scenario
print(json.dumps(anyio.run(scenario, Path(sys.argv[1]))))
"""


@pytest.mark.anyio
async def test_a_full_disk_fails_writes_promptly_and_the_store_serves_again_once_freed(
    small_volume: Path | None, tmp_path: Path
) -> None:
    if small_volume is not None:
        _check(await scenario(small_volume))
        return
    unshare = shutil.which("unshare")
    assert unshare is not None, "no way to get a small volume: not root, and no unshare(1)"
    mountpoint = tmp_path / "volume"
    script = (
        f"mount -t tmpfs -o size={VOLUME_MIB}m tmpfs {mountpoint} && "
        f"exec {sys.executable} -c {_shell_quote(_CHILD)} {mountpoint}"
    )
    done = subprocess.run(
        [unshare, "--user", "--map-root-user", "--mount", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )
    assert done.returncode == 0, f"the namespaced scenario failed:\n{done.stderr}"
    _check(json.loads(done.stdout.strip().splitlines()[-1]))


def _shell_quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"
