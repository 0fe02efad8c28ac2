"""PforgeSession: the OpenAI Agents SDK's Session contract over the memory backend and the SQLite store,
atomic batches, branches that copy nothing, a second writer refused, usage through the budget ledger."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
from agents.memory.session import Session, _session_accepts_wrapper
from agents.memory.session_settings import SessionSettings

from pforge_async import ActorClosed, Conflict, InvalidInput, MemoryTurnStore, open_store
from pforge_async.integrations.openai_agents import PforgeSession, WriterConflict

pytestmark = pytest.mark.anyio


def user(text: str) -> Any:
    return {"role": "user", "content": text}


@pytest.fixture(params=["memory", "sqlite"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Any]:
    if request.param == "memory":
        yield MemoryTurnStore()
    else:
        async with open_store(tmp_path / "store", durability="normal") as opened:
            yield opened


async def test_the_session_contract(store: Any) -> None:
    session = PforgeSession("s-1", store)
    assert isinstance(session, Session) and _session_accepts_wrapper(session)
    assert await session.get_items() == [] and await session.pop_item() is None
    await session.add_items([user("a"), user("b")])
    await session.add_items([])
    assistant: Any = {"type": "message", "role": "assistant", "content": [{"text": "d\u00e9"}]}
    await session.add_items([user("c"), assistant])
    items: list[Any] = await session.get_items()
    assert [i["content"] for i in items[:3]] == ["a", "b", "c"] and items[3]["content"][0]["text"] == "d\u00e9"
    assert await session.get_items(limit=2) == items[2:]
    assert await session.get_items(limit=0) == []
    assert await session.get_items(limit=-1) == items  # as SQLite's LIMIT -1: no limit
    assert await session.get_items(limit=100) == items
    assert await session.pop_item() == items[3]
    assert await session.get_items() == items[:3]
    other = PforgeSession("s-2", store)
    await other.add_items([user("elsewhere")])
    await session.clear_session()
    assert await session.get_items() == [] and await session.pop_item() is None
    assert await other.get_items() == [user("elsewhere")]
    await session.add_items([user("after clear")])
    assert await session.get_items() == [user("after clear")]
    limited = PforgeSession("s-1", store, session_settings={"limit": 1})
    assert limited.session_settings == SessionSettings(limit=1)
    await limited.add_items([user("x")])
    assert await limited.get_items() == [user("x")]
    assert await limited.get_items(limit=5) == [user("after clear"), user("x")]


async def test_add_items_is_one_atomic_batch(store: Any) -> None:
    session = PforgeSession("atomic", store)
    await session.add_items([user("kept")])
    with pytest.raises(InvalidInput, match="item 1 is not JSON"):
        await session.add_items([user("a"), cast(Any, {"bad": object()})])
    with pytest.raises(InvalidInput):  # one item over the store's payload limit: the others go neither
        await session.add_items([user("b"), user("x" * (17 << 20))])
    assert await session.get_items() == [user("kept")]


async def test_items_persist_across_opens(tmp_path: Path) -> None:
    path = tmp_path / "store"
    async with PforgeSession("persist", str(path)) as session:
        await session.add_items([user("one"), user("two")])
    async with PforgeSession("persist", str(path)) as again:
        assert await again.get_items() == [user("one"), user("two")]
        assert await again.pop_item() == user("two")
    async with open_store(path) as opened:
        assert await PforgeSession("persist", opened).get_items() == [user("one")]
    closed = PforgeSession("persist", str(path))
    await closed.aclose()
    with pytest.raises(ActorClosed, match="'persist' is closed"):
        await closed.get_items()


class CountingStore(MemoryTurnStore):
    def __init__(self) -> None:
        super().__init__()
        self.appended = 0

    async def append_turns(self, *args: Any, **kwargs: Any) -> Any:
        self.appended += len(args[0])
        return await super().append_turns(*args, **kwargs)


async def test_branch_is_a_fork() -> None:
    turns = CountingStore()
    session = PforgeSession("main", turns)
    items = [user(f"m{i}") for i in range(500)]
    for start in range(0, 500, 100):
        await session.add_items(items[start : start + 100])
    appended = turns.appended
    whole = await session.branch("copy")
    head = await session.branch("head", from_item=3)
    tail = await session.branch(from_item=-1)
    empty = await session.branch("empty", from_item=0)
    assert turns.appended == appended  # nothing copied
    assert await whole.get_items() == items
    assert await head.get_items() == items[:3]
    assert await tail.get_items() == items[:-1] and tail.session_id.startswith("main@")
    assert await empty.get_items() == []
    await head.add_items([user("other way")])
    assert await head.get_items() == [*items[:3], user("other way")]
    assert await session.get_items(limit=1) == [items[-1]]
    with pytest.raises(Conflict, match="'head' already exists"):
        await session.branch("head")
    memory = PforgeSession("mem")  # ":memory:": a branch shares the very same memory store
    await memory.add_items([user("a")])
    assert await (await memory.branch("mem-2")).get_items() == [user("a")]


async def test_a_second_writer_is_refused(store: Any) -> None:
    one, two = PforgeSession("shared", store), PforgeSession("shared", store)
    await one.add_items([user("1")])
    assert await two.get_items() == [user("1")]
    await one.add_items([user("2")])
    for write in (two.add_items([user("interleaved")]), two.pop_item(), two.clear_session()):
        with pytest.raises(WriterConflict, match="session 'shared': another writer changed it"):
            await write
    assert await one.get_items() == [user("1"), user("2")]
    assert await two.get_items() == [user("1"), user("2")]  # read again: goes on from there
    await two.add_items([user("3")])
    assert await one.get_items() == [user("1"), user("2"), user("3")]
    # a session read while it did not exist: someone else making it meanwhile is a conflict too
    late, early = PforgeSession("new", store), PforgeSession("new", store)
    assert await late.get_items() == []
    await early.add_items([user("first")])
    with pytest.raises(WriterConflict):
        await late.add_items([user("on a stale view")])


@dataclass
class FakeUsage:
    input_tokens: int = 0
    output_tokens: int = 0


@dataclass
class FakeWrapper:
    usage: FakeUsage = field(default_factory=FakeUsage)


async def test_usage_recorded_through_the_budget_ledger(tmp_path: Path) -> None:
    async with open_store(tmp_path / "store", durability="normal") as opened:
        session = PforgeSession(
            "paid", opened, record_usage=True, model="gpt-test", price=lambda model, i, o: i + 10 * o
        )
        run = FakeWrapper()
        run.usage.input_tokens, run.usage.output_tokens = 100, 20
        await session.add_items([user("q")], wrapper=run)  # type: ignore[arg-type]
        run.usage.input_tokens, run.usage.output_tokens = 250, 30
        await session.add_items([user("a")], wrapper=run)  # type: ignore[arg-type]
        await session.add_items([user("no new usage")], wrapper=run)  # type: ignore[arg-type]
        await session.add_items([user("no wrapper")])
        totals = await opened.budget.totals("openai", tags={"session": "paid"})
        assert (totals.input_tokens, totals.output_tokens, totals.cost) == (250, 30, 250 + 300)
        unpaid = PforgeSession("free", opened)
        await unpaid.add_items([user("q")], wrapper=run)  # type: ignore[arg-type]
        assert (await opened.budget.totals("openai", tags={"session": "free"})).input_tokens == 0
        with pytest.raises(InvalidInput, match="budget ledger"):
            await PforgeSession("x", MemoryTurnStore(), record_usage=True).add_items([user("q")], wrapper=run)  # type: ignore[arg-type]


async def test_argument_errors() -> None:
    with pytest.raises(InvalidInput, match="session_id"):
        PforgeSession(7)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="takes a Store"):
        PforgeSession("x", 42)  # type: ignore[arg-type]
    session = PforgeSession("x")
    with pytest.raises(InvalidInput, match="list of items"):
        await session.add_items(user("not a list"))
    with pytest.raises(InvalidInput, match="from_item"):
        await session.branch("y", from_item="1")  # type: ignore[arg-type]


def test_one_session_across_event_loops(tmp_path: Path) -> None:
    """asyncio.run after asyncio.run, and threads with loops of their own, on one session object:
    each loop gets its own open store, and the session's writes still take turns."""
    import asyncio
    import threading

    session = PforgeSession("loops", str(tmp_path / "store"))
    for turn in range(3):
        asyncio.run(session.add_items([user(f"run {turn}")]))

    def worker(index: int) -> None:
        async def work() -> None:
            for k in range(5):
                await session.add_items([user(f"thread {index}.{k}")])

        asyncio.run(work())

    workers = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=60)
        assert not w.is_alive()
    got: list[Any] = asyncio.run(session.get_items())
    items = [i["content"] for i in got]
    assert items[:3] == ["run 0", "run 1", "run 2"]
    assert sorted(items[3:]) == sorted(f"thread {i}.{k}" for i in range(3) for k in range(5))
    for i in range(3):  # each thread's items in its own order
        mine = [x for x in items if x.startswith(f"thread {i}.")]
        assert mine == [f"thread {i}.{k}" for k in range(5)]


async def test_compaction_snapshot_replaces_the_tail_atomically(store: Any) -> None:
    session = PforgeSession("compact", store)
    await session.add_items([user("old 1"), user("old 2"), user("keep"), user("a"), user("b")])
    snapshot = await session._get_compaction_snapshot(3)
    assert snapshot is not None and not snapshot.complete
    assert snapshot.items == [user("keep"), user("a"), user("b")]
    assert await snapshot.replace_suffix(1, [user("summary of a, b")])
    assert await session.get_items() == [user("old 1"), user("old 2"), user("keep"), user("summary of a, b")]
    stale = await session._get_compaction_snapshot(10)
    assert stale is not None and stale.complete
    await session.add_items([user("c")])  # the session moved on since the snapshot
    assert not await stale.replace_suffix(0, [user("everything")])
    assert (await session.get_items())[-1] == user("c")
    # the oldest items the caller calls expired go too; the kept ones between are written again
    pruning = await session._get_compaction_snapshot(
        2, prune_prefix=lambda item: cast(Any, item)["content"].startswith("old")
    )
    assert pruning is not None
    assert await pruning.replace_suffix(0, [user("new tail")])
    assert await session.get_items() == [user("keep"), user("new tail")]
    assert await PforgeSession("never-written", store)._get_compaction_snapshot(5) is not None

    class Transforming(PforgeSession):
        async def get_items(self, limit: int | None = None, *, wrapper: Any = None) -> list[Any]:
            return await super().get_items(limit, wrapper=wrapper)

    assert await Transforming("compact", store)._get_compaction_snapshot(3) is None
