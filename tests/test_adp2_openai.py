"""PforgeSession where the SDK's own SQLiteSession sets the contract: an empty session id, compaction's
replace_suffix on a session deleted since its snapshot. Each test runs the same calls on both."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from agents import SQLiteSession

from pforge_async import InvalidInput, MemoryTurnStore, open_store
from pforge_async.integrations.openai_agents import PforgeSession, WriterConflict

pytestmark = pytest.mark.anyio


def user(text: str) -> Any:
    return {"role": "user", "content": text}


async def exercise(session: Any) -> list[Any]:
    """What a run does to a session, and what each step reads back."""
    seen: list[Any] = [await session.get_items()]
    await session.add_items([user("a"), user("b"), user("c")])
    seen.append(await session.get_items())
    seen.append(await session.get_items(limit=2))
    seen.append(await session.pop_item())
    seen.append(await session.get_items())
    await session.clear_session()
    seen.append(await session.get_items())
    await session.add_items([user("d")])
    seen.append(await session.get_items())
    return seen


async def test_an_empty_session_id_is_a_session_as_in_sqlite_session(tmp_path: Path) -> None:
    """SQLiteSession("") is a session like any other; PforgeSession("") raised InvalidInput. Its name
    ("<prefix>/") is distinct from every other id's, so it neither sees nor is seen by them."""
    expected = await exercise(SQLiteSession(""))
    async with open_store(tmp_path / "store", durability="normal") as store:
        assert await exercise(PforgeSession("", store)) == expected
        others = [PforgeSession(other, store) for other in ("/", " ", "@", "openai-agents")]
        for other in others:
            assert await other.get_items() == []
            await other.add_items([user(f"other {other.session_id!r}")])
        # another object, as after a restart, reads the same session back
        again = PforgeSession("", store)
        assert await again.get_items() == [user("d")]
        for other in others:
            assert await PforgeSession(other.session_id, store).get_items() == [user(f"other {other.session_id!r}")]
        branch = await again.branch()
        assert branch.session_id.startswith("@") and await branch.get_items() == [user("d")]


async def snapshot_then(session: Any, between: Any, *, prune: bool) -> tuple[bool, list[Any]]:
    await session.add_items([user(str(i)) for i in range(4)])
    snapshot = await session._get_compaction_snapshot(10, prune_prefix=(lambda item: True) if prune else None)
    assert snapshot is not None and snapshot.items == [user(str(i)) for i in range(4)]
    await between()
    replaced = await snapshot.replace_suffix(2, [user("summary")])
    return replaced, await session.get_items()


@pytest.mark.parametrize("prune", [False, True], ids=["suffix", "suffix-and-prefix"])
async def test_replace_suffix_after_the_session_was_deleted_returns_false(prune: bool) -> None:
    """replace_suffix on a snapshot of a session deleted since raised ContextNotFound; SQLiteSession,
    whose rows are gone, returns False (the session no longer ends with what was read) and changes
    nothing. The session then keeps serving."""
    sqlite = SQLiteSession("s")
    expected = await snapshot_then(sqlite, sqlite.clear_session, prune=prune)
    assert expected == (False, [])

    turns = MemoryTurnStore()
    session = PforgeSession("s", turns)

    async def delete() -> None:
        info = await turns.find_context(session.name)
        assert info is not None
        await turns.delete_context(info.context_id)

    assert await snapshot_then(session, delete, prune=prune) == expected
    # cleared rather than deleted: the same answer
    assert await snapshot_then(PforgeSession("c", turns), PforgeSession("c", turns).clear_session, prune=prune) == (
        False,
        [],
    )
    await session.add_items([user("after")])
    assert await session.get_items() == [user("after")]


async def test_a_snapshot_of_a_deleted_session_is_empty_as_in_sqlite_session() -> None:
    """A snapshot taken after the session's context was deleted under a session object that had read
    it raised ContextNotFound; SQLiteSession gives an empty, complete snapshot."""
    sqlite = SQLiteSession("s")
    await sqlite.add_items([user("a")])
    await sqlite.clear_session()
    expected = await sqlite._get_compaction_snapshot(5)
    assert expected is not None

    turns = MemoryTurnStore()
    session = PforgeSession("s", turns)
    await session.add_items([user("a")])
    assert await session.get_items() == [user("a")]
    info = await turns.find_context(session.name)
    assert info is not None
    await turns.delete_context(info.context_id)
    snapshot = await session._get_compaction_snapshot(5)
    assert snapshot is not None
    assert (snapshot.items, snapshot.complete) == (expected.items, expected.complete) == ([], True)
    assert await snapshot.replace_suffix(0, [user("x")]) is False


#: session ids SQLiteSession stores and a context name cannot hold as they are
AWKWARD_IDS = ["a\x00b", "x" * 2000, "\U0001f600" * 300, "\x01plain", "y" * 1009]


async def test_session_ids_a_name_cannot_hold_are_sessions_as_in_sqlite_session(tmp_path: Path) -> None:
    """A session id with a NUL, or longer than a context name's 1,024 UTF-8 bytes, was InvalidInput
    at the first call; SQLiteSession stores it. Each is now a session of its own, found again by a
    new object, and none meets another (an id starting with \\x01, the hashed names' mark, included)."""
    for session_id in AWKWARD_IDS:
        sqlite = SQLiteSession(session_id)
        await sqlite.add_items([user(session_id)])
        assert await sqlite.get_items() == [user(session_id)]
    async with open_store(tmp_path / "store", durability="normal") as store:
        for session_id in AWKWARD_IDS:
            await PforgeSession(session_id, store).add_items([user(session_id)])
        for session_id in AWKWARD_IDS:
            assert await PforgeSession(session_id, store).get_items() == [user(session_id)]
        names = {PforgeSession(session_id, store).name for session_id in [*AWKWARD_IDS, "plain", ""]}
        assert len(names) == len(AWKWARD_IDS) + 2


@dataclass
class Usage:
    input_tokens: int = 100
    output_tokens: int = 10


@dataclass
class Wrapper:
    usage: Usage = field(default_factory=Usage)


@pytest.mark.parametrize(
    "session_id", ["", "a\ud800", "y" * 1009, "z" * 1500], ids=["empty", "surrogate", "1009", "1500"]
)
async def test_usage_of_any_session_id_is_recorded(tmp_path: Path, session_id: str) -> None:
    """The spend's "session" tag was the id and its key the name plus the turn: an empty id, half a
    surrogate pair, or a long id made the ledger refuse the spend after the items were stored (the
    call failed with them in: a retry stored them twice)."""
    async with open_store(tmp_path / "store", durability="normal") as store:
        session = PforgeSession(session_id, store, record_usage=True)
        await session.add_items([user("q")], wrapper=Wrapper())  # type: ignore[arg-type]
        assert await session.get_items() == [user("q")]
        totals = await store.budget.totals("openai")
        assert (totals.input_tokens, totals.output_tokens) == (100, 10)


@pytest.mark.parametrize(
    "options",
    [
        {"vendor": ""},
        {"vendor": "v" * 1025},
        {"model": "m\ud800"},
        {"price": lambda model, i, o: 1.5},
        {"price": lambda model, i, o: -1},
    ],
    ids=["empty-vendor", "long-vendor", "surrogate-model", "float-cost", "negative-cost"],
)
async def test_a_spend_the_ledger_refuses_stores_no_items(tmp_path: Path, options: dict[str, Any]) -> None:
    """A vendor, model or price's cost the budget ledger refuses was refused after the items were
    stored. Now InvalidInput before anything is stored; the session keeps serving."""
    async with open_store(tmp_path / "store", durability="normal") as store:
        session = PforgeSession("s", store, record_usage=True, **options)
        with pytest.raises(InvalidInput):
            await session.add_items([user("q")], wrapper=Wrapper())  # type: ignore[arg-type]
        assert await session.get_items() == []
        await session.add_items([user("no run")])
        assert await session.get_items() == [user("no run")]


def many_items(count: int, size: int = 0) -> list[Any]:
    return [{"role": "user", "content": f"{i}:" + "x" * size} for i in range(count)]


async def test_an_add_past_one_batch_is_whole_as_in_sqlite_session(tmp_path: Path) -> None:
    """add_items of more than 4,096 items was InvalidInput (the store's batch bound; so was one of
    more than 64 MiB, which takes the same path now); SQLiteSession stores them in one transaction.
    Now one add still, all or none."""
    items = many_items(5000)
    sqlite = SQLiteSession("s")
    await sqlite.add_items(items)
    assert await sqlite.get_items() == items
    async with open_store(tmp_path / "store", durability="normal") as store:
        session = PforgeSession("s", store)
        await session.add_items([user("first")])
        await session.add_items(items)
        assert await PforgeSession("s", store, cache_bytes=0).get_items() == [user("first"), *items]
        assert await session.get_items(limit=2) == items[-2:]
        popped = await session.pop_item()
        assert popped == items[-1]
        # the scratch context the add was built in is gone; only the session is named
        assert [c.name for c in (await store.turns.list_contexts()).contexts] == [session.name]


class RacingTurns(MemoryTurnStore):
    """A turn store where another writer adds an item just before the first head move it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.racer: PforgeSession | None = None

    async def set_head(self, context_id: int, turn_id: int, *, expected_head: int | None = None) -> Any:
        racer, self.racer = self.racer, None
        if racer is not None:
            await racer.get_items()
            await racer.add_items([user("the other writer")])
        return await super().set_head(context_id, turn_id, expected_head=expected_head)


async def test_an_add_past_one_batch_still_refuses_a_second_writer() -> None:
    """The large add's head move is a compare-and-set: another writer's item landing while the add is
    built makes it a WriterConflict with nothing of it stored, as a one-batch add is."""
    turns = RacingTurns()
    session = PforgeSession("s", turns)
    await session.add_items([user("first")])
    turns.racer = PforgeSession("s", turns)
    with pytest.raises(WriterConflict):
        await session.add_items(many_items(5000))
    assert await PforgeSession("s", turns).get_items() == [user("first"), user("the other writer")]
    with pytest.raises(WriterConflict):  # until it reads again
        await session.add_items(many_items(5000))
    assert len(await session.get_items()) == 2
    await session.add_items(many_items(5000))
    assert len(await PforgeSession("s", turns).get_items()) == 5002


class LostReplyTurns(MemoryTurnStore):
    """A turn store whose next head move lands but whose reply is lost (the caller sees an error)."""

    lose_next = False

    async def set_head(self, context_id: int, turn_id: int, *, expected_head: int | None = None) -> Any:
        info = await super().set_head(context_id, turn_id, expected_head=expected_head)
        if self.lose_next:
            self.lose_next = False
            raise ConnectionError("reply lost")
        return info


async def test_a_large_add_whose_outcome_was_lost_is_learnt() -> None:
    """A large add whose head move landed but whose reply was lost: the session's next write learns
    that it landed and goes on from it, instead of taking its own items for another writer's."""
    turns = LostReplyTurns()
    session = PforgeSession("s", turns)
    await session.add_items([user("first")])
    turns.lose_next = True
    with pytest.raises(ConnectionError):
        await session.add_items(many_items(5000))
    await session.add_items([user("next")])
    assert await PforgeSession("s", turns).get_items() == [user("first"), *many_items(5000), user("next")]


THREAD_ITEMS = 6000


def test_one_session_read_and_written_from_threads_serves_whole_histories(tmp_path: Path) -> None:
    """One session object serving the event loops of several threads (as the SDK's sync runner and
    asyncio.run in threads do): its item cache was changed by two threads at once, and get_items
    served histories missing their first items (seen: items 1821.. of 6,000). Every read is now the
    history as it stood, from its first item."""
    import asyncio
    import sys
    import threading

    # a path: each thread's event loop opens the store for itself, as the adapters do
    session = PforgeSession("s", tmp_path / "store", cache_bytes=20_000, connect_options={"durability": "normal"})
    done = threading.Event()
    wrong: list[Any] = []

    def writer() -> None:
        async def write() -> None:
            for i in range(THREAD_ITEMS):
                await session.add_items([{"i": i}])

        try:
            asyncio.run(write())
        finally:
            done.set()

    def reader() -> None:
        async def read() -> None:
            while not done.is_set():
                numbers = [item["i"] for item in await session.get_items()]
                if numbers != list(range(len(numbers))):
                    wrong.append(numbers[:3])
                last = [item["i"] for item in await session.get_items(limit=3)]
                if last and last != list(range(last[0], last[0] + len(last))):
                    wrong.append(last)

        try:
            asyncio.run(read())
        except Exception as exc:  # pragma: no cover - what the test reports
            wrong.append(repr(exc))

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch as often as they can: the interleavings show
    try:
        threads = [threading.Thread(target=writer), *(threading.Thread(target=reader) for _ in range(2))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert wrong == []

    async def count() -> int:
        async with session:
            return len(await session.get_items())

    assert asyncio.run(count()) == THREAD_ITEMS


async def test_a_compaction_keeping_more_than_one_batch_as_sqlite_session() -> None:
    """Compaction that prunes a prefix writes the kept items again as a new chain: past 4,096 of
    them that was InvalidInput; SQLiteSession deletes the prefix in place. Both now end the same."""

    def expired(item: Any) -> bool:
        return bool(item["content"].startswith(("0:", "1:")))

    results = []
    for session in (SQLiteSession("s"), PforgeSession("s", MemoryTurnStore())):
        await session.add_items(many_items(5000))
        snapshot = await session._get_compaction_snapshot(2, prune_prefix=expired)
        assert snapshot is not None
        assert await snapshot.replace_suffix(0, [user("summary")]) is True
        results.append(await session.get_items())
    assert results[0] == results[1] == [*many_items(4998)[2:], user("summary")]
