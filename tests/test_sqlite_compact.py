"""``SqliteActor.compact``: the space of deleted rows leaves the databases' files (issue 13).

New databases are made with ``auto_vacuum=INCREMENTAL`` and write with ``secure_delete``: deleted
rows' bytes are zeroed, free pages leave the end of the file in slices, and the WAL is truncated, so
purged or erased bytes are in no file of the store. Writers of this and other processes keep working
while it runs."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import anyio
import pytest

from pforge_async import ActorClosed, InvalidInput, NewTurn, NonceReplayed, open_store
from pforge_async.sqlite.actor import SqliteActor

from ._procs import spawn, wait_for_line

pytestmark = pytest.mark.anyio

#: distinctive bytes a purged row held; no file may keep them
SECRET = "c0mpact-secret-"


def _files(root: Path, stem: str) -> list[Path]:
    return [p for p in root.iterdir() if p.name.startswith(stem)]


def _holds(root: Path, needle: bytes) -> list[str]:
    """Every file under ``root`` whose bytes contain ``needle``."""
    found = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = Path(dirpath, name)
            if needle in path.read_bytes():
                found.append(str(path.relative_to(root)))
    return found


async def _fill(store: object, count: int, subject: str, ttl_s: float) -> list[str]:
    nonces = store.nonces  # type: ignore[attr-defined]
    out: list[str] = []

    async def issue() -> None:
        out.append(await nonces.issue(subject, ttl_s))

    for start in range(0, count, 1000):
        async with anyio.create_task_group() as tg:
            for _ in range(min(1000, count - start)):
                tg.start_soon(issue)
    return out


def _actor(store: object) -> SqliteActor[object]:
    actor = store.nonces._actor  # type: ignore[attr-defined]
    assert isinstance(actor, SqliteActor)
    return actor


async def test_files_shrink_and_purged_bytes_leave_every_file(tmp_path: Path) -> None:
    root = tmp_path / ".pforge"
    async with open_store(root, watch_workspaces=False) as store:
        actor = _actor(store)
        assert (await actor.fetchone("PRAGMA auto_vacuum"))[0] == 2  # INCREMENTAL, from the start
        await _fill(store, 8_000, SECRET + "x" * 900, 0.001)
        live = await _fill(store, 50, "keep", 600)
        grown = actor.files_size()
        assert grown > 6 << 20
        await anyio.sleep(0.01)
        assert await store.nonces.purge_expired() == 8_000
        freed = await actor.compact()
        after = actor.files_size()
        assert after < 1 << 20 and freed >= grown - after - (4 << 20)  # what the WAL held counts too
        assert _holds(root, SECRET.encode()) == []
        # Everything kept is intact, and the database serves on.
        for nonce in live:
            await store.nonces.consume(nonce, "keep")
        assert await actor.compact() >= 0
        assert (await store.check()).ok
    async with open_store(root, watch_workspaces=False) as store:
        with pytest.raises(NonceReplayed):
            await store.nonces.consume(live[0], "keep")
        assert (await store.check()).ok


async def test_compact_takes_slices_of_the_writers_lock(tmp_path: Path) -> None:
    async with open_store(tmp_path / ".pforge", durability="normal", watch_workspaces=False) as store:
        actor = _actor(store)
        await _fill(store, 6_000, "y" * 1000, 0.001)
        await anyio.sleep(0.01)
        await store.nonces.purge_expired()
        free = (await actor.fetchone("PRAGMA freelist_count"))[0]
        assert free > 4 * actor.compact_slice_pages
        slices = 0
        step = actor._vacuum_slice

        def counted(conn: sqlite3.Connection) -> bool:
            nonlocal slices
            slices += 1
            return step(conn)

        actor._vacuum_slice = counted  # type: ignore[method-assign]
        await actor.compact()
        assert slices >= free // actor.compact_slice_pages
        assert (await actor.fetchone("PRAGMA freelist_count"))[0] == 0


async def test_an_older_database_is_converted_once_when_small(tmp_path: Path) -> None:
    root = tmp_path / ".pforge"
    async with open_store(root, watch_workspaces=False):
        pass
    db = root / "nonces.db"
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA auto_vacuum = NONE")
    conn.execute("VACUUM")  # as databases were made before compact existed
    assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 0
    conn.close()
    async with open_store(root, watch_workspaces=False) as store:
        actor = _actor(store)
        await _fill(store, 3_000, SECRET + "z" * 900, 0.001)
        keep = await _fill(store, 5, "keep", 600)
        await anyio.sleep(0.01)
        await store.nonces.purge_expired()
        grown = actor.files_size()
        assert await actor.compact() > 0
        assert (await actor.fetchone("PRAGMA auto_vacuum"))[0] == 2
        assert actor.files_size() < grown // 4
        assert _holds(root, SECRET.encode()) == []
        await store.nonces.consume(keep[0], "keep")
        assert (await store.check()).ok


async def test_a_large_older_database_keeps_its_mode_and_still_loses_the_bytes(tmp_path: Path) -> None:
    root = tmp_path / ".pforge"
    async with open_store(root, watch_workspaces=False):
        pass
    conn = sqlite3.connect(root / "nonces.db", isolation_level=None)
    conn.execute("PRAGMA auto_vacuum = NONE")
    conn.execute("VACUUM")
    conn.close()
    async with open_store(root, watch_workspaces=False) as store:
        actor = _actor(store)
        actor.compact_convert_limit = 0  # type: ignore[misc]
        await _fill(store, 2_000, SECRET + "w" * 900, 0.001)
        await anyio.sleep(0.01)
        await store.nonces.purge_expired()
        await actor.compact()
        assert (await actor.fetchone("PRAGMA auto_vacuum"))[0] == 0  # not rewritten: too large
        assert (await actor.fetchone("PRAGMA freelist_count"))[0] > 0  # free pages stay for reuse
        assert _holds(root, SECRET.encode()) == []  # zeroed, and out of the WAL


#: A writer in another process: issues and consumes nonces until told to stop (stdin closes), and
#: prints how many it did; any error fails it.
WRITER = r"""
import sys, anyio
from pforge_async import open_store

async def main(root):
    done = 0
    async with open_store(root, durability="normal", watch_workspaces=False) as store:
        print("ready", flush=True)
        stop = anyio.Event()
        async def watch():
            await anyio.to_thread.run_sync(sys.stdin.read)
            stop.set()
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            while not stop.is_set():
                nonce = await store.nonces.issue("w" * 500, 0.001 if done % 2 else 600)
                if done % 2 == 0:
                    await store.nonces.consume(nonce, "w" * 500)
                done += 1
                if done == 2:
                    print("writing", flush=True)
    print(done, flush=True)

anyio.run(main, sys.argv[1])
"""


async def test_writers_here_and_in_another_process_see_no_errors(tmp_path: Path) -> None:
    root = tmp_path / ".pforge"
    async with open_store(root, durability="normal", watch_workspaces=False):
        pass
    child = spawn(WRITER, root, stdin=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        async with open_store(root, durability="normal", watch_workspaces=False) as store:
            actor = _actor(store)
            consumed: list[tuple[str, str]] = []
            compacts = 0
            stop = anyio.Event()

            async def local_writer(n: int) -> None:
                while not stop.is_set():
                    subject = f"local-{n}" + "l" * 500
                    nonce = await store.nonces.issue(subject, 600)
                    await store.nonces.consume(nonce, subject)
                    consumed.append((nonce, subject))
                    await store.nonces.issue("garbage" * 100, 0.001)

            async with anyio.create_task_group() as tg:
                for n in range(4):
                    tg.start_soon(local_writer, n)
                for _ in range(15):
                    await anyio.sleep(0.05)
                    await store.nonces.purge_expired()
                    await actor.compact()
                    compacts += 1
                # Both writers wrote beside the compacts (counted, not timed: a loaded machine may
                # give them little of that time).
                await anyio.to_thread.run_sync(wait_for_line, child, "writing")
                for _ in range(2400):  # 120 s at most
                    if len(consumed) > 15:
                        break
                    await anyio.sleep(0.05)
                stop.set()
            assert compacts == 15 and len(consumed) > 15
            for nonce, subject in consumed[:50]:
                with pytest.raises(NonceReplayed):
                    await store.nonces.consume(nonce, subject)
    finally:
        out, err = child.communicate(input="", timeout=120)
    assert child.returncode == 0, err
    assert int(out.split()[-1]) > 0
    async with open_store(root, watch_workspaces=False) as store:
        assert (await store.check()).ok


async def test_compact_refuses_a_read_only_store_and_a_closed_one(tmp_path: Path) -> None:
    root = tmp_path / ".pforge"
    async with open_store(root, watch_workspaces=False) as store:
        nonce = await store.nonces.issue("s", 600)
        closed = _actor(store)
    with pytest.raises(ActorClosed):
        await closed.compact()
    async with open_store(root, readonly=True, create=False, watch_workspaces=False) as store:
        with pytest.raises(InvalidInput, match="read-only"):
            await _actor(store).compact()
    async with open_store(root, watch_workspaces=False) as store:
        await store.nonces.consume(nonce, "s")  # nothing was lost on the way
        assert (await store.check()).ok


async def test_turns_db_gives_back_deleted_turns_and_keeps_no_erased_payload(tmp_path: Path) -> None:
    """The turn store's database: after delete + gc the file shrinks; after erase + compact the
    payload is in no file of the store (secure_delete zeroed the cells, the WAL is truncated)."""
    root = tmp_path / ".pforge"
    async with open_store(root, watch_workspaces=False) as store:
        turns = store.turns
        actor = turns._actor  # type: ignore[attr-defined]
        assert isinstance(actor, SqliteActor)
        assert (await actor.fetchone("PRAGMA auto_vacuum"))[0] == 2
        keep = await turns.create_context(name="keep")
        kept = [await turns.append_turn(keep.context_id, "t", b"kept %d" % i) for i in range(5)]
        erased = await turns.create_context(name="erased")
        await turns.append_turn(erased.context_id, "t", SECRET.encode() + b"erased payload")
        await turns.append_turn(erased.context_id, "t", b"after")
        doomed = []
        for n in range(40):
            ctx = await turns.create_context(name=f"doomed-{n}")
            await turns.append_turns([NewTurn(ctx.context_id, "t", os.urandom(4000)) for _ in range(50)])
            doomed.append(ctx.context_id)
        for context_id in doomed:
            await turns.delete_context(context_id)
        await turns.erase_turns(erased.context_id)
        assert await actor.compact() > 0  # the WAL, at least
        assert _holds(root, SECRET.encode()) == []
        grown = actor.files_size()
        await turns.gc(grace_s=0)  # type: ignore[attr-defined]
        await actor.compact()
        assert actor.files_size() < grown // 4
        assert [t.payload for t in await turns.list_turns(keep.context_id)] == [t.payload for t in kept]
        assert (await store.check()).ok


#: The child keeps making garbage in nonces.db, purging it and compacting, until it is killed.
COMPACTER = r"""
import sys, anyio
from pforge_async import open_store

async def main(root):
    async with open_store(root, durability="normal", watch_workspaces=False) as store:
        actor = store.nonces._actor
        actor.compact_slice_pages = 16  # many slices: more places for the kill to land
        print("ready", flush=True)
        while True:
            async with anyio.create_task_group() as tg:
                for _ in range(500):
                    tg.start_soon(store.nonces.issue, "g" * 1000, 0.001)
            await anyio.sleep(0.002)
            await store.nonces.purge_expired()
            await actor.compact()

anyio.run(main, sys.argv[1])
"""


async def test_a_compact_killed_anywhere_leaves_a_sound_database(tmp_path: Path) -> None:
    rng = random.Random(1313)
    root = tmp_path / ".pforge"
    async with open_store(root, watch_workspaces=False) as store:
        live = await _fill(store, 20, "live", 3600)
    # Made as before compact existed, so the first run's kill may land in the conversion's VACUUM.
    conn = sqlite3.connect(root / "nonces.db", isolation_level=None)
    conn.execute("PRAGMA auto_vacuum = NONE")
    conn.execute("VACUUM")
    conn.close()
    for _ in range(6):
        child = spawn(COMPACTER, root)
        try:
            wait_for_line(child, "ready", timeout=60)
            time.sleep(rng.uniform(0.05, 1.0))
        finally:
            child.send_signal(signal.SIGKILL)
            child.communicate(timeout=30)
        async with open_store(root, watch_workspaces=False) as store:
            problems = (await store.check()).problems
            assert problems == [], problems
            rows = await _actor(store).fetchall("SELECT nonce FROM nonces WHERE subject = 'live'")
            assert sorted(row[0] for row in rows) == sorted(live)
    async with open_store(root, watch_workspaces=False) as store:
        assert (await _actor(store).fetchone("PRAGMA auto_vacuum"))[0] == 2
        for nonce in live:
            await store.nonces.consume(nonce, "live")
        await store.nonces.purge_expired()
        await _actor(store).compact()
        assert (await store.check()).ok
