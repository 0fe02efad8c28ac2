"""Adversarial review of opening and closing a store: event loops that end under it, closes from anywhere."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import pytest

import pforge_async as pf


def test_a_store_whose_event_loop_ended_closes_quietly_from_the_next_loop(tmp_path: Path) -> None:
    # A store opened in one asyncio.run and never closed there: the loop's end cancels its runner,
    # which closes the actors. Closing it later from another loop (a teardown run apart from the
    # setup) must just find it closed; it raised the dead runner's CancelledError into the closer,
    # which then looked cancelled itself (asyncio.run ended with CancelledError).
    async def opener() -> pf.Store:
        store = await pf.connect(tmp_path / "s")
        await store.nonces.issue("x", 5)
        return store

    store = asyncio.run(opener())
    assert store.closed

    async def closer() -> str:
        with pytest.raises(pf.ActorClosed):
            await store.nonces.issue("x", 5)
        await store.aclose()
        await store.aclose()
        async with store:
            pass
        return "closed"

    assert asyncio.run(closer()) == "closed"

    async def reopen() -> list[str]:
        async with pf.connect(tmp_path / "s") as again:
            return (await again.check()).problems

    assert asyncio.run(reopen()) == []


@pytest.mark.anyio
async def test_check_reads_a_table_whose_name_and_columns_hold_quotes(tmp_path: Path) -> None:
    # A table added to a database by hand (or by tampering) named a"b: check() quoted names with
    # bare double quotes and raised StorageError (a syntax error) instead of reporting what it found.
    async with pf.connect(tmp_path / "s") as store:
        await store.nonces.issue("x", 5)
    with sqlite3.connect(tmp_path / "s" / "nonces.db") as db:
        db.execute('CREATE TABLE "a""b" ("c""d" TEXT)')
        db.execute('INSERT INTO "a""b" VALUES (CAST(? AS TEXT))', (b"\xff\xfe",))
    db.close()
    async with pf.connect(tmp_path / "s") as store:
        problems = (await store.check()).problems
    assert len(problems) == 1 and 'table a"b' in problems[0] and "not UTF-8" in problems[0], problems


@pytest.mark.anyio
@pytest.mark.parametrize("limit", [float("nan"), -1, True, 10**30, "5"], ids=["nan", "negative", "bool", "huge", "str"])
async def test_a_bad_max_payload_bytes_is_refused_before_anything_is_created(tmp_path: Path, limit: object) -> None:
    # It was refused only once the whole store had been created and its actors started.
    with pytest.raises(pf.InvalidInput, match="max_payload_bytes"):
        await pf.connect(tmp_path / "s", max_payload_bytes=limit)  # type: ignore[arg-type]
    assert not (tmp_path / "s").exists()


@pytest.mark.anyio
async def test_one_connect_entered_twice_at_once_is_refused_and_closes_what_it_opened(tmp_path: Path) -> None:
    # db = connect(root) shared by tasks that each do `async with db as store`: the second entry
    # replaced the first's store, so the first exit closed the second task's store under it and the
    # first store was never closed (its actors and locks held until the event loop ended).
    db = pf.connect(tmp_path / "s")
    async with db as first:
        with pytest.raises(pf.InvalidInput, match="connect"):
            async with db:
                pass
        await first.nonces.issue("x", 5)
    assert first.closed
    async with db as again:  # one entry after another is fine
        await again.nonces.issue("x", 5)
    assert again.closed


def test_a_store_open_on_another_threads_loop_is_closed_there(tmp_path: Path) -> None:
    # A store serving a loop in a worker thread, closed from the main thread's loop: aclose set the
    # other loop's event from this thread (never waking it) and raised a bare RuntimeError ("attached
    # to a different loop"), leaving the store open. The close now runs on the store's own loop.
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def opener() -> pf.Store:
        return await pf.connect(tmp_path / "s")

    try:
        store = asyncio.run_coroutine_threadsafe(opener(), loop).result(60)

        async def closer() -> None:
            await store.aclose()
            await store.aclose()

        asyncio.run(closer())
        assert store.closed
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()

    async def reopen() -> list[str]:
        async with pf.connect(tmp_path / "s") as again:
            return (await again.check()).problems

    assert asyncio.run(reopen()) == []
    # A loop that no longer runs cannot close what it holds: a named error, not a hang.
    stopped = asyncio.new_event_loop()
    try:
        held = stopped.run_until_complete(opener())
        with pytest.raises(pf.InvalidInput, match="event loop"):
            asyncio.run(held.aclose())
        stopped.run_until_complete(held.aclose())
        assert held.closed
    finally:
        stopped.close()
