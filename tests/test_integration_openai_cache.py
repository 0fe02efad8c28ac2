"""PforgeSession's cache of its items: every change another writer makes (another session object or
another process) shows at the next ``get_items``: appends, a pop, a clear, the head moved to another
branch, the session deleted and made again, and erasure, also of turns the session shares with a
branch. Erased items are never served from the cache, and a second writer is still refused."""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from pforge_async import InvalidInput, MemoryTurnStore, open_store
from pforge_async.errors import IntegrityError
from pforge_async.integrations.openai_agents import ITEM, PforgeSession, WriterConflict
from pforge_async.turnstore.base import TurnStoreBase
from tests._procs import run_all, spawn, wait_for_line

pytestmark = pytest.mark.anyio


def user(text: str) -> Any:
    return {"role": "user", "content": text}


def texts(items: list[Any]) -> list[str]:
    return [item["content"] for item in items]


@pytest.fixture(params=["memory", "sqlite"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Any]:
    if request.param == "memory":
        yield MemoryTurnStore()
    else:
        async with open_store(tmp_path / "store", durability="normal") as opened:
            yield opened


def turns_of(store: Any) -> TurnStoreBase:
    return store if isinstance(store, TurnStoreBase) else store.turns


async def warm(session: PforgeSession, *batches: list[str]) -> None:
    """Write the batches through the session and read them back, so its cache holds them."""
    for batch in batches:
        await session.add_items([user(text) for text in batch])
    assert await session.get_items() == [user(t) for batch in batches for t in batch]


async def context_id(store: Any, session: PforgeSession) -> int:
    info = await turns_of(store).find_context(session.name)
    assert info is not None
    return info.context_id


async def test_another_writers_appends_pops_and_clears_show(store: Any) -> None:
    mine, other = PforgeSession("s", store), PforgeSession("s", store)
    await warm(mine, ["a", "b"], ["c"])
    assert texts(await other.get_items()) == ["a", "b", "c"]
    await other.add_items([user("d"), user("e")])
    assert texts(await mine.get_items()) == ["a", "b", "c", "d", "e"]
    assert texts(await mine.get_items(limit=2)) == ["d", "e"]
    assert texts(await other.get_items()) == ["a", "b", "c", "d", "e"]
    assert (await other.pop_item()) == user("e")
    assert texts(await mine.get_items()) == ["a", "b", "c", "d"]
    # popped and written again at the same depth: a different turn where the cache had one
    await other.add_items([user("e2")])
    assert texts(await mine.get_items()) == ["a", "b", "c", "d", "e2"]
    for _ in range(3):
        await other.pop_item()
    await other.add_items([user(f"n{i}") for i in range(40)])  # far more than the first read looks at
    assert texts(await mine.get_items()) == ["a", "b", *(f"n{i}" for i in range(40))]
    await other.clear_session()
    assert await mine.get_items() == []
    await other.add_items([user("after clear")])
    assert texts(await mine.get_items()) == ["after clear"]
    await mine.add_items([user("mine again")])  # read since: not a conflict
    assert texts(await other.get_items()) == ["after clear", "mine again"]


async def test_the_head_moved_to_another_branch_or_the_session_made_again(store: Any) -> None:
    turns = turns_of(store)
    mine = PforgeSession("s", store)
    await warm(mine, ["a", "b", "c"])
    ctx = await context_id(store, mine)
    elsewhere = await turns.create_context()
    other_head = (await turns.append_turn(elsewhere.context_id, ITEM, b'{"role":"user","content":"x"}')).turn_id
    await turns.set_head(ctx, other_head)
    assert texts(await mine.get_items()) == ["x"]
    chain = await turns.list_turns(ctx, limit=1)
    assert chain[-1].turn_id == other_head
    await turns.delete_context(ctx)
    again = PforgeSession("s", store)
    await again.add_items([user("new 1"), user("new 2")])
    assert texts(await mine.get_items()) == ["new 1", "new 2"]


@pytest.mark.parametrize("how", ["erase_all", "erase_before", "prune", "through_a_branch"])
async def test_erased_items_are_never_served_from_the_cache(store: Any, how: str) -> None:
    turns = turns_of(store)
    mine = PforgeSession("s", store)
    await warm(mine, ["a", "b"], ["c", "d"])
    ctx = await context_id(store, mine)
    chain = await turns.list_turns(ctx, limit=10)
    if how == "erase_all":
        await turns.erase_turns(ctx)
        expected: list[str] = []
    elif how == "erase_before":
        await turns.erase_turns(ctx, before_turn_id=chain[2].turn_id)
        expected = ["c", "d"]
    elif how == "prune":
        await turns.prune_context(ctx, keep_last=1)
        expected = ["d"]
    else:
        # a branch shares the first three turns; erasing the branch's prefix erases them for both
        branch = await mine.branch("b", from_item=3)
        await branch.add_items([user("branch only")])
        branch_ctx = await context_id(store, branch)
        branch_chain = await turns.list_turns(branch_ctx, limit=10)
        await turns.erase_turns(branch_ctx, before_turn_id=branch_chain[1].turn_id)
        expected = ["b", "c", "d"]
    assert texts(await mine.get_items()) == expected
    assert texts(await mine.get_items(limit=1)) == expected[-1:]
    # and the session goes on from there, its cache rebuilt from what is readable
    await mine.add_items([user("e")])
    assert texts(await mine.get_items()) == [*expected, "e"]
    assert texts(await PforgeSession("s", store).get_items()) == [*expected, "e"]


async def test_a_stale_cache_never_hides_a_second_writer(store: Any) -> None:
    mine, other = PforgeSession("s", store), PforgeSession("s", store)
    await warm(mine, ["a"])
    await other.get_items()
    await other.add_items([user("b")])
    with pytest.raises(WriterConflict):
        await mine.add_items([user("on a stale view")])
    with pytest.raises(WriterConflict):
        await mine.pop_item()
    assert texts(await mine.get_items()) == ["a", "b"]
    await mine.add_items([user("c")])
    assert texts(await other.get_items()) == ["a", "b", "c"]


async def test_a_bounded_cache_and_no_cache(store: Any) -> None:
    small = PforgeSession("s", store, cache_bytes=100)  # a few items at most
    none = PforgeSession("s", store, cache_bytes=0)
    expected = [f"item {i:03} " + "x" * 20 for i in range(30)]
    for i in range(0, 30, 3):
        await small.add_items([user(t) for t in expected[i : i + 3]])
        assert texts(await small.get_items()) == expected[: i + 3]
        assert texts(await small.get_items(limit=2)) == expected[i + 1 : i + 3]
        assert texts(await none.get_items()) == expected[: i + 3]
    await small.add_items([user("one more")])
    assert texts(await none.get_items(limit=2)) == [expected[-1], "one more"]
    for bad in (-1, 1.5, True, "1"):
        with pytest.raises(InvalidInput, match="cache_bytes"):
            PforgeSession("s", store, cache_bytes=bad)  # type: ignore[arg-type]


async def test_items_returned_are_fresh_and_foreign_turns_checked(store: Any) -> None:
    turns = turns_of(store)
    mine = PforgeSession("s", store)
    await warm(mine, ["a"])
    first: list[Any] = await mine.get_items()
    first[0]["content"] = "changed by the caller"
    first.append(user("appended by the caller"))
    assert texts(await mine.get_items()) == ["a"]  # the cache is not the caller's list
    ctx = await context_id(store, mine)
    await turns.append_turn(ctx, ITEM, b'{"role":"user","content":NaN}')  # json's NaN, as json.dumps writes
    items: list[Any] = await mine.get_items()
    assert items[0] == user("a") and items[1]["content"] != items[1]["content"]
    await turns.append_turn(ctx, "something.else", b"{}")
    with pytest.raises(IntegrityError, match="not an item"):
        await mine.get_items()


CHANGER = r"""
import asyncio, sys
from pforge_async import open_store
from pforge_async.integrations.openai_agents import PforgeSession

async def main(root):
    async with open_store(root, durability="normal") as store:
        session = PforgeSession("shared", store)
        print("ready", flush=True)
        for line in sys.stdin:
            await session.get_items()
            step = line.strip()
            if step == "append":
                await session.add_items([{"role": "user", "content": "from the other process"}])
            elif step == "pop":
                await session.pop_item()
            elif step == "erase":
                info = await store.turns.find_context(session.name)
                await store.turns.prune_context(info.context_id, keep_last=1)
            print("done", flush=True)

asyncio.run(main(sys.argv[1]))
"""


async def test_another_process_changes_show(tmp_path: Path) -> None:
    root = tmp_path / "store"
    async with open_store(root, durability="normal") as opened:
        await PforgeSession("shared", opened).add_items([user("start")])
    child = spawn(CHANGER, root, stdin=subprocess.PIPE)
    try:
        wait_for_line(child, "ready", timeout=120)
        async with open_store(root, durability="normal") as opened:
            mine = PforgeSession("shared", opened)
            await mine.add_items([user("mine")])
            assert texts(await mine.get_items()) == ["start", "mine"]

            def tell(step: str) -> None:
                assert child.stdin is not None
                child.stdin.write(step + "\n")
                child.stdin.flush()
                wait_for_line(child, "done", timeout=120)

            tell("append")
            assert texts(await mine.get_items()) == ["start", "mine", "from the other process"]
            tell("pop")
            assert texts(await mine.get_items()) == ["start", "mine"]
            tell("erase")
            assert texts(await mine.get_items()) == ["mine"]
            await mine.add_items([user("after")])
            assert texts(await mine.get_items()) == ["mine", "after"]
    except BaseException:
        child.kill()
        raise
    run_all([child], timeout=120)  # closes its stdin: it ends
