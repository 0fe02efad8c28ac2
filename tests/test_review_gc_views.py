"""Adversarial review of the CAS gc (issue 13): another opener of the store (a second Store on the same
root: its own object database, its own descriptors on the gate's lock files, as another process has)
acts at the precise points of one gc run, reached by wrapping gc's own steps."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import pytest

from pforge_async import open_store
from pforge_async.cas import gc as cas_gc
from pforge_async.store import Store

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


def at_step(
    monkeypatch: pytest.MonkeyPatch, name: str, call: int, action: Callable[[], Coroutine[Any, Any, None]]
) -> list[int]:
    """Run ``action`` (on the event loop) when gc's worker thread calls ``cas_gc.<name>`` for the
    ``call``-th time, just before that step runs. Returns a list that gets a 1 once it ran."""
    real = getattr(cas_gc, name)
    calls: list[int] = []
    ran: list[int] = []

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == call:
            anyio.from_thread.run(action)
            ran.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(cas_gc, name, wrapped)
    return ran


async def test_another_opener_writes_and_names_a_doomed_object_between_decision_and_deletion(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After gc published its journal and before it unlinks: the other opener (whose view still
    holds the retired packs) stores the doomed blob again, names it from a tree and a turn, and reads
    a kept object that is moving. Everything it relies on must outlive the deletions."""
    root = tmp_path / "s"
    async with open_store(root, watch_workspaces=False) as a, open_store(root, watch_workspaces=False) as b:
        kept = await a.cas.write_blob(b"kept by a ref")
        await a.cas.update_ref("refs/tags/keep", kept)
        doomed = await a.cas.write_blob(b"old and unreachable")
        assert await b.cas.read_blob(doomed) == b"old and unreachable"  # b has the old packs loaded
        age_cas(root, 2 * HOUR)
        ctx = await b.turns.create_context(name="c")
        seen: dict[str, object] = {}

        async def rewrite() -> None:
            # Stored again in a pack byte for byte the retired one: its rename waits for the deletion.
            seen["rewrite"] = await b.cas.write_blob(b"old and unreachable")
            seen["tree"] = await b.cas.write_tree([("f", "100644", doomed)])
            turn = await b.turns.append_turn(ctx.context_id, "t", b"x", refs=[doomed])
            seen["turn"] = turn.turn_id

        async with anyio.create_task_group() as tg:

            async def other_opener() -> None:
                seen["read kept"] = await b.cas.read_blob(kept)  # from its old view of a retired pack
                seen["has kept"] = await b.cas.has(kept)  # freshened in the new pack
                seen["has doomed"] = await b.cas.has(doomed)  # retired: gone from every view
                tg.start_soon(rewrite)

            # finish(): called once for a leftover journal, then for this run's, after it is published.
            ran = at_step(monkeypatch, "finish", 2, other_opener)
            report = await a.cas.gc([], grace_s=HOUR)
        assert ran and report.files_retired > 0 and report.objects_reclaimed == 1
        assert seen["read kept"] == b"kept by a ref" and seen["has kept"] is True
        assert seen["has doomed"] is False
        assert seen["rewrite"] == doomed
        assert await b.cas.read_blob(doomed) == b"old and unreachable"
        assert (await b.cas.read_tree(str(seen["tree"])))[0].oid == doomed
    async with open_store(root, watch_workspaces=False) as store:
        assert await store.cas.read_blob(doomed) == b"old and unreachable"
        assert await store.cas.read_blob(kept) == b"kept by a ref"
        assert (await store.check()).problems == []
    git_fsck(root / "cas")


async def test_another_opener_freshens_between_the_journal_and_the_decision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The journal is prepared outside the gate: an opener that freshens then (has(), a tree entry)
    is seen by the look under the gate, and what it freshened is kept."""
    root = tmp_path / "s"
    async with open_store(root, watch_workspaces=False) as a, open_store(root, watch_workspaces=False) as b:
        blobs = [await a.cas.write_blob(b"old %d" % i) for i in range(4)]
        assert await b.cas.read_blob(blobs[0]) == b"old 0"
        age_cas(root, 2 * HOUR)
        names: dict[str, str] = {}

        async def other_opener() -> None:
            assert await b.cas.has(blobs[0])
            names["tree"] = await b.cas.write_tree([("f", "100644", blobs[1])])

        ran = at_step(monkeypatch, "prepare_journal", 1, other_opener)
        report = await a.cas.gc([], grace_s=HOUR)
        assert ran
        assert report.objects_reclaimed == 2, report
    async with open_store(root, watch_workspaces=False) as store:
        assert await store.cas.read_blob(blobs[0]) == b"old 0"
        assert await store.cas.read_blob(blobs[1]) == b"old 1"
        assert not await store.cas.has(blobs[2])
        assert (await store.check()).problems == []
    git_fsck(root / "cas")


async def test_two_store_gcs_at_once_beside_a_writer(tmp_path: Path) -> None:
    """Store.gc in two openers at once (their turn sweeps, CAS runs and compactions interleave) while
    a third deletes contexts and appends: nothing kept is lost, check() and git fsck clean."""
    root = tmp_path / "s"
    async with (
        open_store(root, watch_workspaces=False) as a,
        open_store(root, watch_workspaces=False) as b,
        open_store(root, watch_workspaces=False) as w,
    ):
        live: dict[int, tuple[list[bytes], str]] = {}

        async def add(i: int) -> None:
            ctx = await w.turns.create_context(name=f"c{i}")
            blob = await w.cas.write_blob(b"blob of context %d" % i)
            payloads = [b"context %d turn %d" % (i, n) for n in range(4)]
            for n, payload in enumerate(payloads):
                await w.turns.append_turn(ctx.context_id, "t", payload, refs=[blob] if n == 3 else ())
            live[ctx.context_id] = (payloads, blob)

        for i in range(30):
            await add(i)
        for context_id in list(live)[:20]:
            await w.turns.delete_context(context_id)
            del live[context_id]
        # The grace must exceed the writer's time from writing a blob to committing the turn that
        # names it (Store.gc): 50 ms did not, on a loaded machine, with two gcs holding the locks
        # between. What was deleted above is past the grace (and the CAS's whole-second stamps) when
        # the gcs start, so they still have it to collect while the writer adds more.
        grace = 1.0
        await anyio.sleep(grace + 1.1)

        async def writer() -> None:
            for i in range(30, 45):
                await add(i)

        async def collector(store: Store) -> None:
            for _ in range(3):
                await store.gc(grace_s=grace)

        async with anyio.create_task_group() as tg:
            tg.start_soon(writer)
            tg.start_soon(collector, a)
            tg.start_soon(collector, b)
        for context_id, (payloads, _blob) in live.items():
            turns = await w.turns.list_turns(context_id)
            assert [t.payload for t in turns] == payloads
    async with open_store(root, watch_workspaces=False) as store:
        for context_id, (payloads, blob) in live.items():
            assert [t.payload for t in await store.turns.list_turns(context_id)] == payloads
            assert await store.cas.read_blob(blob) == b"blob of context %d" % int(payloads[0].split()[1])
        assert (await store.check()).problems == []
    git_fsck(root / "cas")


async def test_a_large_file_snapshotted_again_while_its_doomed_loose_blob_is_deleted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large blob is a loose file named by its id. gc retires it (unreachable, old); between the
    decision and the deletion another opener snapshots the same file: its new loose file has the same
    name, so its rename must wait for the deletion (an unlink by name after it would lose it)."""
    root = tmp_path / "s"
    workspace = tmp_path / "ws"
    workspace.mkdir()
    big = os.urandom(1 << 20) * 3  # over the large-file threshold: streamed into a loose object
    (workspace / "big.bin").write_bytes(big)
    async with open_store(root, watch_workspaces=False) as a:
        old = await a.cas.snapshot(workspace)
        big_oid = (await a.cas.read_tree(old))[0].oid
        assert (root / "cas" / "objects" / big_oid[:2] / big_oid[2:]).exists()
    age_cas(root, 2 * HOUR)
    async with open_store(root, watch_workspaces=False) as a, open_store(root, watch_workspaces=False) as b:
        trees: list[str] = []

        async def snapshot() -> None:
            trees.append(await b.cas.snapshot(workspace))

        async with anyio.create_task_group() as tg:

            async def other_opener() -> None:
                assert not await b.cas.has(big_oid)  # retired: gone from its view
                tg.start_soon(snapshot)

            ran = at_step(monkeypatch, "finish", 2, other_opener)
            report = await a.cas.gc([], grace_s=HOUR)
        assert ran and report.objects_reclaimed == 2  # the tree and the big blob
        assert trees == [old]
    async with open_store(root, watch_workspaces=False) as store:
        assert await store.cas.read_blob(big_oid) == big
        await store.cas.restore(old, tmp_path / "restored")
        assert (tmp_path / "restored" / "big.bin").read_bytes() == big
        assert (await store.check()).problems == []
    git_fsck(root / "cas")
