"""Turn gc on the in-core backends (issue 13): the memory and filesystem backends reclaim what the SQLite
backend reclaims, and the filesystem backend then rewrites its log, so erased payloads and deleted
contexts are in no file of its directory. The rewrite is crash-safe (old log or new, never half) and
writers of the same store keep working through it."""

from __future__ import annotations

import json
import os
import random
import signal
import struct
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from pforge_async import IntegrityError, InvalidInput, NewTurn, TurnNotFound
from pforge_async.turnstore import FsTurnStore, MemoryTurnStore
from pforge_async.turnstore.base import TurnStoreBase
from pforge_async.turnstore.core import TurnCore
from pforge_async.turnstore.fs import COMPACT_NAME, MAGIC

from ._procs import spawn, wait_for_line, whole_lines
from .test_turnstore import BACKENDS, open_backend

pytestmark = pytest.mark.anyio

SECRET = b"erase-me-0x5ec2e7"


def _files_holding(directory: Path, needle: bytes) -> list[str]:
    found = []
    for dirpath, _, names in os.walk(directory):
        for name in names:
            path = Path(dirpath, name)
            if needle in path.read_bytes():
                found.append(str(path.relative_to(directory)))
    return found


def dump(core: TurnCore) -> dict[str, Any]:
    """Everything a core holds that a reader or a writer can see, comparable across a reopen."""
    return {
        "contexts": {
            cid: (
                c.head,
                c.base,
                c.name,
                c.parent,
                c.metadata,
                c.created,
                c.updated,
                c.creation_key,
                sorted(c.turn_keys),
            )
            for cid, c in core.contexts.items()
        },
        "turns": dict(core.turns),
        "keys": dict(core.keys),
        "context_keys": dict(core.context_keys),
        "names": dict(core.names),
        "bundles": dict(core.bundles),
        "blobs": dict(core.blobs),
        "last": (core.last_turn, core.last_context),
        "indexes": (
            list(core._created),
            list(core._sorted_names),
            {p: c for p, c in core._children.items() if c},
            list(core._updated.descending(None)),
        ),
    }


async def make_garbage(store: TurnStoreBase) -> dict[str, Any]:
    """The scenario of the SQLite gc test: a deleted context whose head and side branch nothing else
    reaches, a fork and a base that keep a prefix alive, and an erased prefix."""
    a = await store.create_context(name="a", metadata={"note": SECRET.decode()})
    a_ids = [
        (await store.append_turn(a.context_id, "t", SECRET + b"-a%d" % i, idempotency_key=f"a{i}")).turn_id
        for i in range(10)
    ]
    b = await store.fork_context(a_ids[4], name="b")
    b_ids = [
        (await store.append_turn(b.context_id, "t", b"b%d" % i, idempotency_key=f"b{i}")).turn_id for i in range(3)
    ]
    c = await store.create_context(base_turn_id=a_ids[2])
    side = await store.append_turn(a.context_id, "t", SECRET + b"-side", parent_turn_id=a_ids[6])
    await store.set_head(a.context_id, a_ids[-1])
    await store.delete_context(a.context_id)
    # A rewound branch of b: its keyed turn becomes unreachable, so its key goes with it.
    abandoned = await store.append_turn(b.context_id, "t", b"abandoned", idempotency_key="gone")
    await store.set_head(b.context_id, b_ids[-1])
    await store.erase_turns(b.context_id, before_turn_id=b_ids[0])  # what b shares with a, for good
    last = await store.create_context(name="last")
    top = await store.append_turn(last.context_id, "t", b"top")
    return {
        "a": a_ids,
        "b": b.context_id,
        "b_ids": b_ids,
        "c": c.context_id,
        "gone": [*a_ids[5:], side.turn_id, abandoned.turn_id],
        "top": top,
        "last": last.context_id,
        "payload": sum(len(SECRET + b"-a%d" % i) for i in range(5, 10)) + len(SECRET + b"-side") + len(b"abandoned"),
    }


@pytest.mark.parametrize("kind", BACKENDS)
async def test_every_backend_reclaims_the_same_turns(kind: str, tmp_path: Path) -> None:
    async with open_backend(kind, tmp_path) as store:
        made = await make_garbage(store)
        assert (await store.gc(grace_s=3600)).turns_reclaimed == 0  # type: ignore[attr-defined]  # all young
        report = await store.gc(grace_s=0)  # type: ignore[attr-defined]
        assert report.turns_reclaimed == len(made["gone"])
        assert report.payload_bytes_reclaimed == made["payload"]
        for turn_id in made["gone"]:
            with pytest.raises(TurnNotFound):
                await store.get_turn(turn_id)
        a_ids = made["a"]
        chain = [t.turn_id for t in await store.list_turns(made["b"])]
        assert chain == [*a_ids[:5], *made["b_ids"]]
        assert [t.erased for t in await store.list_turns(made["b"])] == [True] * 5 + [False] * 3
        assert (await store.get_context(made["c"])).head_turn_id == a_ids[2]
        assert (await store.get_turn(made["top"].turn_id)).payload == b"top"
        # The reclaimed turn's key is free again; the kept ones still answer.
        assert (await store.get_turn_by_key(made["b"], "b1")).turn_id == made["b_ids"][1]  # type: ignore[union-attr]
        assert await store.get_turn_by_key(made["b"], "gone") is None
        assert await store.check() == []
        again = await store.gc(grace_s=0)  # type: ignore[attr-defined]
        assert again.turns_reclaimed == 0
        # New ids stay above every id ever given.
        assert (await store.append_turn(made["b"], "t", b"new")).turn_id > made["top"].turn_id
        assert (await store.create_context()).context_id > made["last"]


async def test_erased_and_deleted_bytes_leave_every_file_and_the_state_survives_reopening(tmp_path: Path) -> None:
    directory = tmp_path / "fs"
    async with FsTurnStore(directory) as store:
        await make_garbage(store)
        blob = await store.put_blob(b"a blob stays")
        await store.publish_registry_bundle("bundle", b'{"schema": 1}')
        assert _files_holding(directory, SECRET) == ["turns.log"]
        before = dump(store._core)
        report = await store.gc(grace_s=0)
        assert report.wal_truncated and report.bytes_after < report.bytes_before
        assert _files_holding(directory, SECRET) == []  # payloads and the deleted context's metadata
        assert sorted(os.listdir(directory)) == ["turns.lock", "turns.log"]
        # Nothing logged since: a second gc finds the log compact and leaves the file as it is.
        stat = (directory / "turns.log").stat()
        await anyio.sleep(0.01)
        again = await store.gc(grace_s=0)
        assert again.turns_reclaimed == 0 and again.bytes_after == report.bytes_after
        now = (directory / "turns.log").stat()
        assert (now.st_ino, now.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
        after = dump(store._core)
        # Contexts as they were, less the key of the reclaimed turn; ids as high as they were.
        expected = {cid: (*ctx[:-1], [k for k in ctx[-1] if k != "gone"]) for cid, ctx in before["contexts"].items()}
        assert after["contexts"] == expected and after["last"] == before["last"]
    async with FsTurnStore(directory) as store:
        assert dump(store._core) == after
        assert await store.check() == []
        assert await store.get_blob(blob) == b"a blob stays"
        # The compacted log is appended to like any other.
        b = await store.find_context("b")
        assert b is not None
        await store.append_turn(b.context_id, "t", b"after", idempotency_key="after")
        grown = dump(store._core)
    async with FsTurnStore(directory) as store:
        assert dump(store._core) == grown


async def test_writers_keep_working_while_gc_rewrites_the_log(tmp_path: Path) -> None:
    directory = tmp_path / "fs"
    async with FsTurnStore(directory, durability="normal") as store:
        stop = anyio.Event()
        written: dict[int, list[tuple[int, bytes]]] = {}
        gcs = 0

        async def writer(n: int) -> None:
            ctx = await store.create_context(name=f"w{n}")
            written[ctx.context_id] = []
            i = 0
            while not stop.is_set():
                payload = b"w%d-%d" % (n, i)
                record = await store.append_turn(ctx.context_id, "t", payload, idempotency_key=f"k{i}")
                written[ctx.context_id].append((record.turn_id, payload))
                # garbage: a fork that is deleted at once, and a branch that is abandoned
                fork = await store.fork_context(record.turn_id)
                await store.append_turns([NewTurn(fork.context_id, "t", SECRET) for _ in range(3)])
                await store.delete_context(fork.context_id)
                if i % 5 == 0:
                    turns = await store.list_turns(ctx.context_id, limit=3)
                    assert turns[-1].turn_id == record.turn_id
                i += 1

        async with anyio.create_task_group() as tg:
            for n in range(4):
                tg.start_soon(writer, n)
            # 25 gcs at least, and on until every writer wrote 6 turns beside them (counted, not
            # timed: a loaded machine may give the writers little of 25 short pauses).
            deadline = time.monotonic() + 120
            while gcs < 25 or len(written) < 4 or not all(len(turns) > 5 for turns in written.values()):
                assert time.monotonic() < deadline, f"{gcs} gcs, writers wrote {[len(t) for t in written.values()]}"
                await anyio.sleep(0.02)
                report = await store.gc(grace_s=0)
                gcs += 1
                assert report.wal_truncated
            stop.set()
        assert gcs >= 25 and len(written) == 4 and all(len(turns) > 5 for turns in written.values())
        for context_id, turns in written.items():
            assert [(t.turn_id, t.payload) for t in await store.list_turns(context_id, limit=10_000)] == turns
        await store.gc(grace_s=0)
        assert _files_holding(directory, SECRET) == []
        state = dump(store._core)
        assert await store.check() == []
    async with FsTurnStore(directory) as store:
        assert dump(store._core) == state


async def test_bad_arguments_and_a_damaged_log(tmp_path: Path) -> None:
    directory = tmp_path / "fs"
    async with FsTurnStore(directory) as store:
        ctx = await store.create_context(name="x")
        first = await store.append_turn(ctx.context_id, "t", b"first")
        second = await store.append_turn(ctx.context_id, "t", b"second")
        for bad in (-1, float("nan"), float("inf"), 10**9, "0", None, True):
            with pytest.raises(InvalidInput, match="grace_s"):
                await store.gc(grace_s=bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidInput, match="drop_deleted_rows"):
            await store.gc(grace_s=0, drop_deleted_rows=1)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            await store.gc(0)  # type: ignore[misc]
        # Raw commands out of bounds are refused by the decoder.
        from pforge_async.turnstore.fs import CompactLog

        with pytest.raises(InvalidInput):
            await store._actor_or_fail().call(CompactLog(-5))
    size = (directory / "turns.log").stat().st_size
    data = bytearray((directory / "turns.log").read_bytes())
    where = data.index(b"first")
    data[where] ^= 0xFF  # damage in the middle of the log
    (directory / "turns.log").write_bytes(bytes(data))
    async with FsTurnStore(directory) as store:
        assert await store.check() != []
        with pytest.raises(IntegrityError, match="damage"):
            await store.gc(grace_s=0)
        assert (directory / "turns.log").read_bytes() == bytes(data)  # left as it is, damage reported
        assert (await store.get_turn(second.turn_id)).payload == b"second"  # the rest serves
    assert (directory / "turns.log").stat().st_size == size
    with pytest.raises(IntegrityError):
        async with FsTurnStore(directory) as store:
            await store.get_turn(first.turn_id)


async def test_memory_gc_keeps_young_turns_on_its_own_clock() -> None:
    now = [1_000_000]
    store = MemoryTurnStore(clock=lambda: now[0])
    ctx = await store.create_context()
    old = await store.append_turn(ctx.context_id, "t", b"old")
    await store.set_head(ctx.context_id, 0)
    keep = await store.create_context()
    await store.append_turn(keep.context_id, "t", b"top")
    assert (await store.gc(grace_s=10)).turns_reclaimed == 0
    now[0] += 10_001
    report = await store.gc(grace_s=10)
    assert (report.turns_reclaimed, report.payload_bytes_reclaimed) == (1, 3)
    with pytest.raises(TurnNotFound):
        await store.get_turn(old.turn_id)


# -- crash --------------------------------------------------------------------------------------------

#: The child makes garbage, then appends to live contexts (printing each acknowledged turn) and
#: collects, again and again, until it is killed.
CHILD = r"""
import sys, anyio
from pforge_async import NewTurn
from pforge_async.turnstore import FsTurnStore

SECRET = b"erase-me-0x5ec2e7"

async def main(directory, run):
    async with FsTurnStore(directory) as store:
        live = []
        for n in range(3):
            info = await store.open_context(f"live-{n}")
            live.append(info.context_id)
        for g in range(20):
            ctx = await store.create_context(name=f"garbage-{run}-{g}")
            await store.append_turns([NewTurn(ctx.context_id, "t", SECRET + b"%d" % i) for i in range(50)])
            await store.delete_context(ctx.context_id)
        print("ready", flush=True)
        i = 0
        while True:
            for context_id in live:
                payload = b"r%d-%d-%d" % (run, context_id, i)
                record = await store.append_turn(context_id, "t", payload)
                print(record.turn_id, context_id, payload.decode(), flush=True)
            await store.gc(grace_s=0)
            i += 1

anyio.run(main, sys.argv[1], int(sys.argv[2]))
"""

RUNS = 20


async def test_a_gc_killed_anywhere_leaves_the_old_log_or_the_new_one(tmp_path: Path) -> None:
    rng = random.Random(1313)
    directory = tmp_path / "fs"
    acknowledged: dict[int, list[tuple[int, bytes]]] = {}
    compactions_seen = 0
    for run in range(RUNS):
        child = spawn(CHILD, directory, run)
        try:
            wait_for_line(child, "ready", timeout=60)
            time.sleep(rng.uniform(0.0, 0.3))
        finally:
            child.send_signal(signal.SIGKILL)
            # Through the text stream: readline may have buffered lines past "ready" already.
            assert child.stdout is not None
            out = child.stdout.read()
            child.communicate(timeout=30)
        # A line the kill cut short is dropped: its append may or may not have landed (the chain
        # check below allows one turn past the acknowledged ones).
        for line in whole_lines(out):
            fields = line.split()
            assert len(fields) == 3, f"run {run}: the child printed {line!r}"
            turn, ctx, payload = fields
            acknowledged.setdefault(int(ctx), []).append((int(turn), payload.encode()))
        compactions_seen += (directory / COMPACT_NAME).exists()
        async with FsTurnStore(directory) as store:
            assert not (directory / COMPACT_NAME).exists()
            assert await store.check() == []
            for context_id, turns in acknowledged.items():
                chain = [(t.turn_id, t.payload) for t in await store.list_turns(context_id, limit=100_000)]
                assert chain[: len(turns)] == turns  # every acknowledged append, in order
                assert len(chain) <= len(turns) + 1  # at most the one whose reply the kill cut off
                if len(chain) > len(turns):
                    acknowledged[context_id].append(chain[-1])
            await store.gc(grace_s=0)
            assert await store.check() == []
            state = dump(store._core)
        async with FsTurnStore(directory) as store:
            assert dump(store._core) == state
    assert _files_holding(directory, SECRET) == []
    print(json.dumps({"runs": RUNS, "kills_during_a_rewrite": compactions_seen}))


async def test_a_damaged_id_mark_still_keeps_new_ids_above_the_reclaimed_ones(tmp_path: Path) -> None:
    directory = tmp_path / "fs"
    async with FsTurnStore(directory) as store:
        keep = await store.create_context(name="keep")
        kept = await store.append_turn(keep.context_id, "t", b"kept")
        doomed = await store.create_context(name="doomed")
        last = [await store.append_turn(doomed.context_id, "t", b"d%d" % i) for i in range(5)][-1]
        await store.delete_context(doomed.context_id)
        assert (await store.gc(grace_s=0)).turns_reclaimed == 5
    log = directory / "turns.log"
    data = bytearray(log.read_bytes())
    start = len(MAGIC)  # the first frame is the id marks
    _, _, index_size, _ = struct.unpack_from("<IIII", data, start)
    data[start + 16 + index_size] ^= 0xFF  # its record, not its index
    log.write_bytes(bytes(data))
    async with FsTurnStore(directory) as store:
        assert any("checksum" in problem for problem in await store.check())
        assert (await store.get_turn(kept.turn_id)).payload == b"kept"
        assert (await store.append_turn(keep.context_id, "t", b"new")).turn_id > last.turn_id
        assert (await store.create_context()).context_id > doomed.context_id
