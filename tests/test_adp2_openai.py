"""PforgeSession where the SDK's own SQLiteSession sets the contract: an empty session id, compaction's
replace_suffix on a session deleted since its snapshot. Each test runs the same calls on both."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from agents import SQLiteSession

from pforge_async import MemoryTurnStore, open_store
from pforge_async.integrations.openai_agents import PforgeSession

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
