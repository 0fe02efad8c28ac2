"""Adversarial review of the CAS gc (issue 13): the disk failing (ENOSPC, EIO) at gc's own steps. The
caller must get a named pforge_async error (never a bare OSError), and the store must stay whole:
check() and git fsck --strict clean, everything reachable readable, and the next gc must finish."""

from __future__ import annotations

import errno
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from pforge_async import open_store
from pforge_async.agent.records import ToolCallEnd, ToolOutput, encode_record
from pforge_async.cas import gc as cas_gc
from pforge_async.errors import PforgeError, StorageError

pytestmark = pytest.mark.anyio

HOUR = 3600.0


def git_fsck(gitdir: Path) -> None:
    proc = subprocess.run(
        ["git", f"--git-dir={gitdir}", "fsck", "--strict", "--no-dangling", "--no-progress"],
        capture_output=True,
        text=True,
        check=False,
    )
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if not line.startswith("notice:")]
    assert proc.returncode == 0 and not lines, "\n".join(lines)


def age_cas(root: Path, seconds: float) -> None:
    then = time.time() - seconds
    for directory, _dirs, files in os.walk(root / "cas" / "objects"):
        for name in files:
            os.utime(Path(directory) / name, (then, then))


def failing(monkeypatch: pytest.MonkeyPatch, name: str, code: int) -> None:
    """``cas_gc.<name>`` fails once as the file system would (its real work not done)."""
    real = getattr(cas_gc, name)
    failed: list[int] = []

    def step(*args: Any, **kwargs: Any) -> Any:
        if not failed:
            failed.append(1)
            raise OSError(code, os.strerror(code))
        return real(*args, **kwargs)

    monkeypatch.setattr(cas_gc, name, step)


async def _fill(root: Path) -> tuple[str, str, list[str]]:
    async with open_store(root, watch_workspaces=False) as store:
        kept = [await store.cas.write_blob(b"kept %d" % i) for i in range(5)]
        tree = await store.cas.write_tree([(f"f{i}", "100644", oid) for i, oid in enumerate(kept)])
        await store.cas.update_ref("refs/tags/keep", tree)
        doomed = await store.cas.write_blob(b"unreachable")
    age_cas(root, 2 * HOUR)
    return tree, doomed, kept


async def _whole(root: Path, kept: list[str]) -> None:
    async with open_store(root, watch_workspaces=False) as store:
        for i, oid in enumerate(kept):
            assert await store.cas.read_blob(oid) == b"kept %d" % i
        assert (await store.check()).problems == []
    git_fsck(root / "cas")


@pytest.mark.parametrize(
    "step",
    [
        pytest.param("prepare_journal"),
        pytest.param("publish_journal"),
    ],
)
async def test_a_disk_error_writing_the_journal_is_a_storage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    root = tmp_path / "s"
    _tree, _doomed, kept = await _fill(root)
    failing(monkeypatch, step, errno.ENOSPC)
    async with open_store(root, watch_workspaces=False) as store:
        with pytest.raises(StorageError):
            await store.cas.gc([], grace_s=HOUR)
        assert await store.cas.read_blob(kept[0]) == b"kept 0"  # still serving


@pytest.mark.parametrize("step", ["prepare_journal", "publish_journal", "finish"])
async def test_a_gc_that_failed_at_a_step_leaves_a_whole_store_and_the_next_gc_finishes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    """Whatever error escapes (named or not), the new packs gc wrote before it are duplicates at
    worst: the store is whole, and the next gc consolidates to one pack and drops the garbage."""
    root = tmp_path / "s"
    _tree, doomed, kept = await _fill(root)
    failing(monkeypatch, step, errno.EIO)
    async with open_store(root, watch_workspaces=False) as store:
        with pytest.raises((PforgeError, OSError)):
            await store.cas.gc([], grace_s=HOUR)
        for i, oid in enumerate(kept):
            assert await store.cas.read_blob(oid) == b"kept %d" % i
        assert (await store.check()).problems == []
    git_fsck(root / "cas")
    async with open_store(root, watch_workspaces=False) as store:
        report = await store.cas.gc([], grace_s=HOUR)
        assert not await store.cas.has(doomed)
        assert report.packs_after == 1 and report.loose_after == 0, report
    await _whole(root, kept)


async def test_an_object_with_a_far_future_mtime_does_not_break_gc(tmp_path: Path) -> None:
    root = tmp_path / "s"
    async with open_store(root, watch_workspaces=False) as store:
        kept = await store.cas.write_blob(b"kept")
        await store.cas.update_ref("refs/tags/keep", kept)
        odd = await store.cas.write_blob(b"from a file system with a clock gone wrong")
        for pack in (root / "cas" / "objects" / "pack").glob("*.pack"):
            os.utime(pack, (2**32 + 1000, 2**32 + 1000))
        report = await store.cas.gc([], grace_s=HOUR)
        assert report.objects_young == 1  # a time in the future is young, never reclaimed early
        assert await store.cas.read_blob(odd) == b"from a file system with a clock gone wrong"
        assert (await store.check()).problems == []
    git_fsck(root / "cas")


async def test_one_payload_naming_a_malformed_oid_does_not_stop_every_gc(tmp_path: Path) -> None:
    root = tmp_path / "s"
    async with open_store(root, watch_workspaces=False) as store:
        ctx = await store.turns.create_context(name="c")
        output = ToolOutput(size=3, sha256="0" * 64, text="abc", truncated=True, oid="not-an-object-id")
        type_id, payload = encode_record(ToolCallEnd(seq=1, call_id="x", output=output))
        await store.turns.append_turn(ctx.context_id, type_id, payload)  # any writer may append this
        garbage = await store.cas.write_blob(b"garbage")
        age_cas(root, 2 * HOUR)
        report = await store.gc(grace_s=HOUR)
        assert report.objects_reclaimed == 1
        assert not await store.cas.has(garbage)
