"""Adversarial review of the nonce and constellation ledgers (the embedded SQLite store)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

import pforge_async as pf

pytestmark = pytest.mark.anyio


async def test_check_accepts_reward_sums_as_any_summation_order_rounds_them(tmp_path: Path) -> None:
    # Rewards of magnitude up to 1e100 are valid; 1e100 + 1.0 - 1e100 is 0.0 summed left to right,
    # 1.0 summed exactly (SQLite 3.43+ sums with Kahan-Babuska-Neumaier, so its SUM() differs from
    # the running sum action_stats keeps). Both are correct roundings of the same rewards: check()
    # must not call the store damaged for either. The exact sum is written here as a newer SQLite's
    # aggregate would give it.
    async with pf.connect(tmp_path / "s") as store:
        for reward in (1e100, 1.0, -1e100):
            await store.memory.record_transition("s", "a", "t", reward, True)
        assert (await store.check()).problems == []
    with sqlite3.connect(tmp_path / "s" / "memory.db") as db:
        db.execute("UPDATE action_stats SET reward_sum = 1.0")
    db.close()
    async with pf.connect(tmp_path / "s") as store:
        assert (await store.check()).problems == []
        # A real mismatch is still found.
        await store.memory.record_transition("s", "b", "t", 5.0, True)
    with sqlite3.connect(tmp_path / "s" / "memory.db") as db:
        db.execute("UPDATE action_stats SET reward_sum = 6.0 WHERE action = 'b'")
    db.close()
    async with pf.connect(tmp_path / "s") as store:
        assert any("reward sums" in p for p in (await store.check()).problems)
