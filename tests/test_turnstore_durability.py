"""Several processes, killed writers, damaged files: what the turn store promises across them."""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import signal
import sqlite3
import time
from pathlib import Path

import anyio
import pytest

from pforge_async import IntegrityError, InvalidInput, StorageError, open_store
from pforge_async.turnstore import Correlation, FsTurnStore, TurnEnvelope, TurnRecord, agent_key, attractor_key
from pforge_async.turnstore.core import TurnRec
from pforge_async.turnstore.fs import MAGIC, frame
from pforge_async.turnstore.keys import idempotency_key

from ._procs import run_all, spawn, wait_for_line

pytestmark = pytest.mark.anyio

APPENDER = """
import json, sys, anyio
from pforge_async import open_store
root, shared, proc = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
async def main():
    async with open_store(root) as store:
        acks = []
        async def task(t):
            own = await store.turns.create_context()
            for i in range(8):
                a = await store.turns.append_turn(own.context_id, "t", b"own %d %d %d" % (proc, t, i))
                b = await store.turns.append_turn(
                    shared, "t", b"shared %d %d %d" % (proc, t, i), idempotency_key=f"{proc}-{t}-{i}"
                )
                # a retry of the same write: must come back as the same turn
                c = await store.turns.append_turn(
                    shared, "t", b"shared %d %d %d" % (proc, t, i), idempotency_key=f"{proc}-{t}-{i}"
                )
                assert c == b
                acks.append((own.context_id, a.turn_id, b.turn_id))
        async with anyio.create_task_group() as tg:
            for t in range(16):
                tg.start_soon(task, t)
    print(json.dumps(acks))
anyio.run(main)
"""

CRASH_SQLITE = """
import sys, anyio
from pforge_async import open_store
async def main():
    async with open_store(sys.argv[1]) as store:
        ctx = await store.turns.create_context()
        i = 0
        while True:
            turn = await store.turns.append_turn(ctx.context_id, "t", b"payload %d" % i * 20)
            print(turn.turn_id, i, flush=True)
            i += 1
anyio.run(main)
"""

CRASH_FS = (
    CRASH_SQLITE.replace("from pforge_async import open_store", "from pforge_async.turnstore import FsTurnStore")
    .replace(
        "async with open_store(sys.argv[1]) as store:\n        ctx = await store.turns.create_context()",
        "async with FsTurnStore(sys.argv[1]) as turns:\n        ctx = await turns.create_context()",
    )
    .replace("await store.turns.append_turn", "await turns.append_turn")
)


async def test_four_processes_of_sixteen_tasks_on_one_store(tmp_path: Path) -> None:
    root = tmp_path / ".pforge"
    async with open_store(root) as store:
        shared = (await store.turns.create_context()).context_id
    outputs = run_all([spawn(APPENDER, root, shared, p) for p in range(4)], timeout=300)
    acks = [tuple(a) for out in outputs for a in json.loads(out)]
    assert len(acks) == 4 * 16 * 8
    async with open_store(root) as store:
        turns = store.turns
        shared_chain = [t.turn_id for t in await turns.list_turns(shared, limit=10_000)]
        # every shared append stored exactly once, and the head's chain holds them all
        assert sorted(shared_chain) == sorted(b for _, _, b in acks)
        assert len(set(shared_chain)) == len(shared_chain) == 512
        assert (await turns.get_head(shared)).head_depth == 512
        by_context: dict[int, list[int]] = {}
        for context_id, own, _ in acks:
            by_context.setdefault(context_id, []).append(own)
        for context_id, ids in by_context.items():
            got = [t.turn_id for t in await turns.list_turns(context_id, limit=100)]
            assert got == ids
            head = await turns.get_head(context_id)
            assert (head.head_turn_id, head.head_depth) == (ids[-1], 8)
        report = await store.check()
        assert report.ok, report.problems


@pytest.mark.parametrize("backend", ["sqlite", "fs"])
async def test_sigkill_loses_no_acknowledged_turn(tmp_path: Path, backend: str) -> None:
    rng = random.Random()
    for _round in range(2):
        path = tmp_path / (".pforge" if backend == "sqlite" else "fs")
        child = spawn(CRASH_SQLITE if backend == "sqlite" else CRASH_FS, path)
        assert child.stdout is not None
        acked: list[tuple[int, int]] = []
        deadline = None  # counted from the first acknowledgement, so a slow start is not the crash
        while deadline is None or time.monotonic() < deadline or len(acked) < 20:
            line = child.stdout.readline()
            if deadline is None:
                deadline = time.monotonic() + rng.uniform(0.3, 1.0)
            assert line, child.stderr.read() if child.stderr else "child ended"
            turn_id, i = map(int, line.split())
            acked.append((turn_id, i))
        child.send_signal(signal.SIGKILL)
        child.wait()
        if backend == "sqlite":
            async with open_store(path) as store:
                await check_acked(store.turns, acked)
                report = await store.check()
                assert report.ok, report.problems
        else:
            async with FsTurnStore(path) as turns:
                await check_acked(turns, acked)


async def check_acked(turns: object, acked: list[tuple[int, int]]) -> None:
    for turn_id, i in acked:
        record = await turns.get_turn(turn_id)  # type: ignore[attr-defined]
        payload = b"payload %d" % i * 20
        assert record.payload == payload
        assert record.payload_hash == hashlib.sha256(payload).hexdigest()
    last = await turns.get_turn(acked[-1][0])  # type: ignore[attr-defined]
    chain = await turns.list_turns(last.context_id, limit=100_000)  # type: ignore[attr-defined]
    ids = [t.turn_id for t in chain]
    assert ids[: len(acked)] == [turn_id for turn_id, _ in acked]
    assert all(b.parent_turn_id == a.turn_id for a, b in itertools.pairwise(chain))


class TestFsLog:
    async def _write(self, path: Path, n: int) -> list[int]:
        async with FsTurnStore(path) as turns:
            ctx = await turns.create_context()
            return [(await turns.append_turn(ctx.context_id, "t", b"rec %d" % i)).turn_id for i in range(n)]

    async def test_a_torn_tail_is_truncated_and_nothing_else_lost(self, tmp_path: Path) -> None:
        ids = await self._write(tmp_path, 5)
        log = tmp_path / "turns.log"
        good = log.read_bytes()
        # What a crash leaves past the last acknowledged record: a prefix of the next frame, or zeros.
        next_frame = frame(TurnRec(TurnRecord(99, 1, ids[-1], 6, "t", 1, b"x", "h", None, 0)))
        torn_tails = (
            next_frame[:2],  # the header, cut
            next_frame[:-3],  # the body, cut
            next_frame[:-1] + bytes([next_frame[-1] ^ 1]),  # a whole last frame that fails its checksum
            b"\0" * 4096,  # zeros past the last write
        )
        for torn in torn_tails:
            log.write_bytes(good + torn)
            async with FsTurnStore(tmp_path) as turns:
                assert [t.turn_id for t in await turns.list_turns(1)] == ids
            assert log.read_bytes() == good
        async with FsTurnStore(tmp_path) as turns:
            turn = await turns.append_turn(1, "t", b"after")
            assert turn.parent_turn_id == ids[-1]

    async def test_a_damaged_length_is_not_taken_for_a_torn_tail(self, tmp_path: Path) -> None:
        ids = await self._write(tmp_path, 5)
        log = tmp_path / "turns.log"
        data = bytearray(log.read_bytes())
        first_frame = len(MAGIC)
        data[first_frame + 2] ^= 0x40  # the first record (the context) now claims to run past the end
        log.write_bytes(bytes(data))
        async with FsTurnStore(tmp_path) as turns:
            # Damage stays local: the context's own record is lost, its turns (sound) still read.
            assert any(f"byte {first_frame}" in p and "frame header" in p for p in await turns.check())
            with pytest.raises(IntegrityError, match="context 1"):
                await turns.get_head(1)
            assert [(await turns.get_turn(t)).payload for t in ids] == [b"rec %d" % i for i in range(5)]
            ctx = await turns.create_context()
            new = await turns.append_turn(ctx.context_id, "t", b"new")
            assert ctx.context_id > 1 and new.turn_id > ids[-1]  # no id the lost record may have held
        assert log.read_bytes()[: len(data)] == bytes(data)  # not truncated, not rewritten

    async def test_a_corrupt_record_before_the_end_is_an_integrity_error(self, tmp_path: Path) -> None:
        ids = await self._write(tmp_path, 5)
        log = tmp_path / "turns.log"
        data = bytearray(log.read_bytes())
        at = data.index(b"rec 2")
        data[at] ^= 0xFF
        log.write_bytes(bytes(data))
        async with FsTurnStore(tmp_path) as turns:
            with pytest.raises(IntegrityError, match=rf"turn {ids[2]} .*turns\.log"):
                await turns.get_turn(ids[2])
            with pytest.raises(IntegrityError, match=str(ids[2])):
                await turns.list_turns(1)  # the chain runs through the damaged turn
            # Everything else still serves: the turns before and after it, read one by one or paged.
            assert [t.turn_id for t in await turns.list_turns(1, limit=2)] == ids[3:]
            for i in (0, 1, 3, 4):
                assert (await turns.get_turn(ids[i])).payload == b"rec %d" % i
            assert any(f"byte {len(MAGIC)}" not in p and "checksum" in p for p in await turns.check())
        assert log.read_bytes() == bytes(data)  # reported, not "repaired" by dropping records

    async def test_one_process_at_a_time(self, tmp_path: Path) -> None:
        async with FsTurnStore(tmp_path):
            child = spawn(
                "import sys, anyio\nfrom pforge_async.turnstore import FsTurnStore\n"
                "async def main():\n"
                "    try:\n"
                "        async with FsTurnStore(sys.argv[1]):\n"
                "            print('opened')\n"
                "    except Exception as exc:\n"
                "        print(type(exc).__name__)\n"
                "anyio.run(main)\n",
                tmp_path,
            )
            (out,) = run_all([child])
        assert out.strip() == "StorageError"


class TestSqliteFiles:
    async def test_a_newer_schema_is_refused_and_left_untouched(self, tmp_path: Path) -> None:
        root = tmp_path / ".pforge"
        async with open_store(root) as store:
            await store.turns.create_context()
        db = root / "turns.db"
        with sqlite3.connect(db) as conn:
            conn.execute("PRAGMA user_version = 99")
        conn.close()
        before = db.read_bytes()
        with pytest.raises(StorageError, match="newer"):
            async with open_store(root):
                pass
        assert db.read_bytes() == before

    async def test_a_corrupt_database_is_an_integrity_error(self, tmp_path: Path) -> None:
        root = tmp_path / ".pforge"
        async with open_store(root):
            pass
        (root / "turns.db").write_bytes(b"this is not a database at all" * 200)
        for sidecar in ("turns.db-wal", "turns.db-shm"):
            (root / sidecar).unlink(missing_ok=True)
        # Damage stays local: the store opens, every call to the damaged part fails naming it, and
        # check() reports it; the other parts serve.
        async with open_store(root) as store:
            with pytest.raises(IntegrityError, match=r"turns\.db"):
                await store.turns.create_context()
            assert any("turns.db" in problem for problem in (await store.check()).problems)
            assert await store.cas.read_blob(await store.cas.write_blob(b"x")) == b"x"


class TestKeysAndEnvelopes:
    def test_keys_are_unambiguous(self) -> None:
        inputs = [("a|b",), ("a", "b"), ("ab",), (1,), ("1",), ("a", 1), ("a", "1"), ()]
        keys = {agent_key(*parts) for parts in inputs}
        assert len(keys) == len(inputs)
        assert agent_key("s", 1) == agent_key("s", 1)
        assert agent_key("x").startswith("pforge-agent:v1|")
        assert attractor_key("x").startswith("pforge-attractor:v1|")
        assert agent_key("x") != attractor_key("x")
        long_key = agent_key("x" * 5000)
        assert len(long_key) < 200 and long_key != agent_key("x" * 5001)
        with pytest.raises(InvalidInput):
            agent_key(1.5)  # type: ignore[arg-type]
        with pytest.raises(InvalidInput):
            idempotency_key("bad namespace", "x")

    def test_envelopes_round_trip(self) -> None:
        envelope = TurnEnvelope(
            event_kind="assistant_turn",
            timestamp_ms=1,
            payload=b"\x00\x01",
            correlation=Correlation(run_id="r", agent_context_id=3, sequence_no=7, thread_key="main"),
            session_id="s",
        )
        assert TurnEnvelope.decode(envelope.encode()) == envelope
        assert TurnEnvelope.decode(TurnEnvelope("e", 0).encode()).correlation == Correlation()


async def test_two_processes_read_and_write_one_open_store(tmp_path: Path) -> None:
    # While a child holds the store open, this process reads its writes and appends after them.
    root = tmp_path / ".pforge"
    child = spawn(
        "import sys, anyio\nfrom pforge_async import open_store\n"
        "async def main():\n"
        "    async with open_store(sys.argv[1]) as store:\n"
        "        ctx = await store.turns.create_context()\n"
        "        await store.turns.append_turn(ctx.context_id, 't', b'from the child')\n"
        "        print('ready', flush=True)\n"
        "        await anyio.sleep(30)\n"
        "anyio.run(main)\n",
        root,
    )
    try:
        wait_for_line(child, "ready")
        async with open_store(root) as store:
            assert (await store.turns.get_turn(1)).payload == b"from the child"
            turn = await store.turns.append_turn(1, "t", b"from the parent")
            assert turn.parent_turn_id == 1
    finally:
        child.kill()
        child.wait()


CRASH_MANY = """
import sys, anyio
from pforge_async import open_store
async def main():
    async with open_store(sys.argv[1]) as store:
        async def writer(w):
            ctx = await store.turns.create_context()
            i = 0
            while True:
                turn = await store.turns.append_turn(ctx.context_id, "t", b"%d %d " % (w, i) * 100)
                print(ctx.context_id, turn.turn_id, w, i, flush=True)
                i += 1
        async with anyio.create_task_group() as tg:
            for w in range(16):
                tg.start_soon(writer, w)
anyio.run(main)
"""


async def test_sigkill_after_the_wal_has_been_reused(tmp_path: Path) -> None:
    # 16 writers run long enough for the WAL to be checkpointed and rewritten from its start a few
    # times, so the kill lands among stale frames of earlier laps and the zeros reserved past them.
    path = tmp_path / ".pforge"
    child = spawn(CRASH_MANY, path)
    assert child.stdout is not None
    acked: dict[int, list[tuple[int, int, int]]] = {}
    wanted = 4000 + random.randrange(2000)
    for _ in range(wanted):
        line = child.stdout.readline()
        assert line, child.stderr.read() if child.stderr else "child ended"
        context_id, turn_id, w, i = map(int, line.split())
        acked.setdefault(context_id, []).append((turn_id, w, i))
    child.send_signal(signal.SIGKILL)
    child.wait()
    async with open_store(path) as store:
        for context_id, turns in acked.items():
            chain = await store.turns.list_turns(context_id, limit=100_000)
            assert [t.turn_id for t in chain[: len(turns)]] == [turn_id for turn_id, _, _ in turns]
            for record, (_, w, i) in zip(chain, turns, strict=False):
                assert record.payload == b"%d %d " % (w, i) * 100
        report = await store.check()
        assert report.ok, report.problems


async def test_the_wal_stays_short_under_sustained_writes(tmp_path: Path) -> None:
    # Writers that never pause still let the WAL be rewritten from its start: it does not grow with
    # what was written (20 MiB here).
    async with open_store(tmp_path / ".pforge", durability="full") as store:
        wal = store.turns.path.with_name("turns.db-wal")
        assert wal.stat().st_size == 4 << 20  # its blocks are reserved at open (README: WAL files)
        payload = bytes(1024)

        async def writer() -> None:
            ctx = await store.turns.create_context()
            for _ in range(500):
                await store.turns.append_turn(ctx.context_id, "t", payload)

        async with anyio.create_task_group() as tg:
            for _ in range(40):
                tg.start_soon(writer)
        assert wal.stat().st_size <= 8 << 20
        assert store.turns.path.stat().st_size >= 20 << 20


async def test_a_checkpoint_that_cannot_start_fails_no_committed_append(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    async with open_store(tmp_path / ".pforge") as store:
        actor = store.turns._actor
        broken = ThreadPoolExecutor(max_workers=1)
        broken.shutdown()  # submit() now raises RuntimeError
        actor._checkpointer, working = broken, actor._checkpointer
        actor.checkpoint_every_commits = 1  # type: ignore[misc]
        try:
            ctx = await store.turns.create_context()
            turns = [await store.turns.append_turn(ctx.context_id, "t", b"%d" % i) for i in range(5)]
            assert [t.turn_id for t in await store.turns.list_turns(ctx.context_id)] == [t.turn_id for t in turns]
        finally:
            actor._checkpointer = working
