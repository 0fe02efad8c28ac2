"""``Store.gc`` (issue 13): the whole store collected in one call. Space comes back (1,000 contexts with
workspace snapshots, 900 deleted: within 1.5x of a store that only ever held the 100 kept), erased
payloads are in no file, blobs named only inside pipeline checkpoints and agent tool outputs are kept,
a dry run changes nothing, and a read-only store, bad arguments and a damaged part are refused."""

from __future__ import annotations

import os
import sqlite3
import subprocess
from pathlib import Path

import anyio
import pytest

from pforge_async import IntegrityError, InvalidInput, Usage, open_store
from pforge_async.agent import SessionRecorder
from pforge_async.agent.records import TOOL_CALL_END, ToolCallEnd, decode_record
from pforge_async.attractor import AttractorWriter, load_latest_checkpoint
from pforge_async.attractor.records import CheckpointRecord
from pforge_async.store import Store

pytestmark = pytest.mark.anyio

CONTEXTS = 1000
KEPT = 100
TURNS = 4
#: the CAS counts a grace under 50 ms as 50 ms (file times tick coarsely): objects just written wait that
FLOOR = 0.1


def disk_bytes(root: Path) -> tuple[int, int]:
    """(apparent bytes, allocated bytes) of every file under ``root``."""
    apparent = allocated = 0
    for directory, _, names in os.walk(root):
        for name in names:
            st = os.lstat(os.path.join(directory, name))
            apparent += st.st_size
            allocated += st.st_blocks * 512
    return apparent, allocated


def files_holding(root: Path, needle: bytes) -> list[str]:
    found = []
    for directory, _, names in os.walk(root):
        for name in names:
            path = Path(directory) / name
            if needle in path.read_bytes():
                found.append(str(path.relative_to(root)))
    return found


def git_fsck(root: Path) -> None:
    result = subprocess.run(
        ["git", "--git-dir", str(root / "cas"), "fsck", "--strict"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "error" not in result.stderr.lower() and "missing" not in result.stdout, result.stdout + result.stderr


async def add_context(store: Store, workspace: Path, c: int) -> tuple[int, str, list[bytes]]:
    """A context with a workspace snapshot (a shared file, a file of its own, a subdirectory) and
    ``TURNS`` turns, the last naming the snapshot. Returns its id, tree and payloads."""
    (workspace / "sub").mkdir(parents=True, exist_ok=True)
    (workspace / "README.md").write_text("the same in every workspace\n" * 20)
    (workspace / "state.bin").write_bytes(c.to_bytes(4, "big") * 256)
    (workspace / "sub" / "notes.txt").write_text(f"notes of context {c}\n" * 10)
    tree = await store.cas.snapshot(workspace)
    ctx = await store.turns.create_context(name=f"ctx-{c}")
    payloads = [b"context %d turn %d " % (c, i) + bytes(200) for i in range(TURNS)]
    for i, payload in enumerate(payloads):
        await store.turns.append_turn(ctx.context_id, "t", payload, fs_root=tree if i == TURNS - 1 else None)
    return ctx.context_id, tree, payloads


async def test_space_comes_back_within_1_5x_of_a_store_that_only_held_what_is_kept(tmp_path: Path) -> None:
    full, only = tmp_path / "full", tmp_path / "only"
    kept: dict[int, tuple[int, str, list[bytes]]] = {}
    async with open_store(full, durability="normal", watch_workspaces=False) as store:
        made = [await add_context(store, tmp_path / "ws", c) for c in range(CONTEXTS)]
        for c, (context_id, _, _) in enumerate(made):
            if c % (CONTEXTS // KEPT) == CONTEXTS // KEPT - 1:  # the last kept: the highest turn always stays
                kept[c] = made[c]
            else:
                await store.turns.delete_context(context_id)
        await anyio.sleep(FLOOR)
        report = await store.gc(grace_s=0)
        assert report.turns_reclaimed == (CONTEXTS - KEPT) * TURNS
        assert report.objects_reclaimed == (CONTEXTS - KEPT) * 4  # tree, subtree, state.bin, notes.txt
        assert report.bytes_freed > 0 and report.bytes_after < report.bytes_before
        for c, (context_id, tree, payloads) in kept.items():
            turns = await store.turns.list_turns(context_id)
            assert [t.payload for t in turns] == payloads and turns[-1].fs_root == tree
            target = tmp_path / "restored" / str(c)
            await store.cas.restore(tree, target)
            assert (target / "state.bin").read_bytes() == c.to_bytes(4, "big") * 256
            assert (target / "sub" / "notes.txt").read_text() == f"notes of context {c}\n" * 10
        assert (await store.check()).problems == []
    async with open_store(only, durability="normal", watch_workspaces=False) as store:
        for c in kept:
            await add_context(store, tmp_path / "ws-only", c)
    git_fsck(full)
    got, want = disk_bytes(full), disk_bytes(only)
    print(f"after gc: {got[0]:,} bytes ({got[1]:,} allocated); only the kept: {want[0]:,} ({want[1]:,})")
    assert got[0] <= 1.5 * want[0] and got[1] <= 1.5 * want[1]


async def test_erased_payloads_and_their_blobs_are_in_no_file_after_gc(tmp_path: Path) -> None:
    root = tmp_path / ".pforge"
    secret = os.urandom(16).hex().encode() * 8  # 256 bytes no other file holds
    async with open_store(root, watch_workspaces=False) as store:
        turns = store.turns
        ctx = await turns.create_context(name="personal")
        document = await turns.put_blob(b"an attachment " + secret)
        for i in range(20):
            await turns.append_turn(ctx.context_id, "t", b"%d " % i + secret, refs=[document] if i == 3 else ())
        last = await turns.append_turn(ctx.context_id, "t", b"not personal")
        await turns.erase_turns(ctx.context_id, before_turn_id=last.turn_id)
        assert files_holding(root, secret), "the test must see the payload in a file before gc"
        await anyio.sleep(FLOOR)
        report = await store.gc(grace_s=0)
        assert report.objects_reclaimed == 1, report
        assert not await store.cas.has(document)
        assert (await turns.get_turn(last.turn_id)).payload == b"not personal"
        assert (await store.check()).problems == []
    assert files_holding(root, secret) == []
    git_fsck(root)


async def test_blobs_named_inside_checkpoints_and_tool_outputs_are_kept(tmp_path: Path) -> None:
    root = tmp_path / ".pforge"
    big_state = {"blob": os.urandom(64 * 1024)}
    long_output = "x" * 100_000
    async with open_store(root, watch_workspaces=False) as store:
        writer = AttractorWriter(store, inline_state_max=1024)
        await writer.create_run_context("run-1")
        await writer.append_checkpoint_event(CheckpointRecord("run-1", "cp-1", 1, "n1", ["n1"], {}, big_state, "n2"))
        recorder = await SessionRecorder.start(store, "session-1", mode="required", max_output_bytes=1024)
        await recorder.tool_call_start("call-1", "shell", {"cmd": "ls"})
        await recorder.tool_call_end("call-1", long_output)
        orphan = await store.cas.write_blob(b"named by nothing")
        await anyio.sleep(FLOOR)
        report = await store.gc(grace_s=0)
        assert report.objects_reclaimed == 1 and report.roots >= 2
        assert not await store.cas.has(orphan)
        latest = await load_latest_checkpoint(store, "run-1")
        assert latest is not None and latest.context == big_state
        session = await store.turns.find_context("session-1")
        assert session is not None
        [end] = [t async for t in store.turns.iter_turns(session.context_id) if t.type_id == TOOL_CALL_END]
        record = decode_record(end.type_id, end.payload)
        assert isinstance(record, ToolCallEnd) and record.output.oid is not None
        assert await store.cas.read_blob(record.output.oid) == long_output.encode()
        assert (await store.check()).problems == []


async def test_a_dry_run_counts_and_changes_nothing(tmp_path: Path) -> None:
    root = tmp_path / ".pforge"
    async with open_store(root, watch_workspaces=False) as store:
        made = [await add_context(store, tmp_path / "ws", c) for c in range(6)]
        for context_id, _, _ in made[:4]:
            await store.turns.delete_context(context_id)
        await anyio.sleep(FLOOR)
        dry = await store.gc(grace_s=0, dry_run=True)
        assert dry.dry_run and dry.turns_reclaimed == 4 * TURNS and dry.objects_reclaimed == 4 * 4
        assert dry.bytes_freed > 0
        again = await store.gc(grace_s=0, dry_run=True)
        assert (again.turns_reclaimed, again.objects_reclaimed) == (dry.turns_reclaimed, dry.objects_reclaimed)
        real = await store.gc(grace_s=0)
        assert (real.turns_reclaimed, real.objects_reclaimed) == (dry.turns_reclaimed, dry.objects_reclaimed)
        # The default grace keeps everything this young.
        young = await store.gc()
        assert (young.turns_reclaimed, young.objects_reclaimed) == (0, 0)


async def test_expired_nonces_and_reservations_are_purged(tmp_path: Path) -> None:
    async with open_store(tmp_path / ".pforge", watch_workspaces=False) as store:
        await store.nonces.issue("s", 0.05)
        live = await store.nonces.issue("s", 3600)
        await store.budget.set_budget("v", tokens=1000)
        old = await store.budget.reserve("v", tokens=10, ttl_s=0.05)
        late = await store.budget.reserve("v", tokens=10, ttl_s=0.05)
        await anyio.sleep(0.2)
        # A reservation expired under a day ago may still be committed late: gc keeps it whatever
        # its grace. One expired two days ago goes.
        db = sqlite3.connect(tmp_path / ".pforge" / "budget.db", timeout=10)
        with db:
            db.execute(
                "UPDATE reservations SET expires_at_ms = expires_at_ms - ? WHERE reservation_id = ?",
                (2 * 86_400_000, old.reservation_id),
            )
        db.close()
        report = await store.gc(grace_s=0)
        assert (report.nonces_purged, report.reservations_purged) == (1, 1)
        await store.nonces.consume(live, "s")
        spent = await store.budget.commit(late, Usage(input_tokens=3, output_tokens=0, cost=0))
        assert spent.late


async def test_read_only_bad_arguments_and_a_damaged_part_are_refused(tmp_path: Path) -> None:
    root = tmp_path / ".pforge"
    async with open_store(root, watch_workspaces=False) as store:
        ctx = await store.turns.create_context(name="a")
        await store.turns.append_turn(ctx.context_id, "t", b"kept")
        for bad in (-1, float("nan"), float("inf"), "10", True, None, 10**10):
            with pytest.raises(InvalidInput):
                await store.gc(grace_s=bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidInput):
            await store.gc(dry_run="yes")  # type: ignore[arg-type]
        assert (await store.gc(grace_s=0)).turns_reclaimed == 0
    async with open_store(root, readonly=True, create=False, watch_workspaces=False) as store:
        with pytest.raises(InvalidInput, match="read-only"):
            await store.gc()
    (root / "memory.db").write_bytes(b"not a database at all" * 300)
    async with open_store(root, watch_workspaces=False) as store:
        with pytest.raises(IntegrityError, match=r"memory\.db"):
            await store.gc(grace_s=0)
        assert [t.payload for t in await store.turns.list_turns(ctx.context_id)] == [b"kept"]
