"""PforgeSession against hostile input and racing calls: what the SDK's own SQLiteSession stores, it
stores and gives back the same; what it refuses is refused with a named error, nothing stored."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from agents import SQLiteSession

from pforge_async import InvalidInput, MemoryTurnStore, open_store
from pforge_async.integrations.openai_agents import PforgeSession

pytestmark = pytest.mark.anyio


async def test_items_as_sqlite_session_takes_them(tmp_path: Path) -> None:
    """A lone surrogate in an item (text cut mid-pair, say) was refused as 'not JSON-serializable'
    (the JSON, written with ensure_ascii=False, does not encode as UTF-8); SQLiteSession stores it.
    Each item goes through the cache and through a fresh reader too."""
    items: list[Any] = [
        {"role": "user", "content": "cut \ud83d"},
        {"role": "user", "content": "\udc00 alone", "\ud800key": [1, "\ud800"]},
        {"role": "user", "content": "whole \U0001f600 pair"},
        {"x": float("nan"), 1: 10**40},
    ]
    sqlite = SQLiteSession("s")
    await sqlite.add_items(items)
    expected = await sqlite.get_items()
    async with open_store(tmp_path / "store", durability="normal") as store:
        for backing in (MemoryTurnStore(), store):
            session = PforgeSession("s", backing)
            await session.add_items(items)
            got = await session.get_items()
            assert repr(got) == repr(expected)  # repr: NaN is not equal to itself
            assert repr(await PforgeSession("s", backing).get_items()) == repr(expected)
            assert repr(await session.get_items(2)) == repr(expected[-2:])
            assert repr(await session.pop_item()) == repr(expected[-1])


async def test_unserializable_items_are_refused_whole() -> None:
    session = PforgeSession("s", MemoryTurnStore())
    await session.add_items([{"i": 0}])
    loop: dict[str, Any] = {}
    loop["self"] = loop
    for bad in ({"b": b"x"}, {"s": {1}}, loop, object()):
        with pytest.raises(InvalidInput, match="item 1"):
            await session.add_items([{"i": 1}, bad])
    assert await session.get_items() == [{"i": 0}]
    assert await PforgeSession("s", session._backing.fixed).get_items() == [{"i": 0}]  # type: ignore[arg-type]


class Usage:
    input_tokens = 100
    output_tokens = 20


class Wrapper:
    usage = Usage()


async def test_usage_that_cannot_be_recorded_stores_nothing() -> None:
    """record_usage=True on a bare turn store: add_items stored the items, then raised InvalidInput
    for want of a budget ledger, so the SDK took the call as failed while the items were in (a retry
    added them twice)."""
    session = PforgeSession("s", MemoryTurnStore(), record_usage=True)
    with pytest.raises(InvalidInput, match="budget ledger"):
        await session.add_items([{"i": 0}], wrapper=Wrapper())  # type: ignore[arg-type]
    assert await session.get_items() == []
    await session.add_items([{"i": 1}])  # no run, no usage to record
    assert await session.get_items() == [{"i": 1}]


async def test_a_price_that_fails_stores_nothing(tmp_path: Path) -> None:
    """A price function that raised (a model missing from its table) did so after the items were
    stored: the call failed with the items in."""

    def price(model: str, input_tokens: int, output_tokens: int) -> int:
        raise KeyError(model)

    async with open_store(tmp_path / "store", durability="normal") as store:
        session = PforgeSession("s", store, record_usage=True, model="unpriced", price=price)
        with pytest.raises(KeyError):
            await session.add_items([{"i": 0}], wrapper=Wrapper())  # type: ignore[arg-type]
        assert await session.get_items() == []
