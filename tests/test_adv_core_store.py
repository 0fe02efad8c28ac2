"""Adversarial review of opening and closing a store: event loops that end under it, closes from anywhere."""

from __future__ import annotations

import asyncio
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
