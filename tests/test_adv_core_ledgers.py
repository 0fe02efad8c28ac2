"""Adversarial review of the nonce and constellation ledgers (the embedded SQLite store)."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

import pforge_async as pf
from pforge_async.ledgers import constellation, nonces

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


class _SteppedClock:
    """The wall clock as NTP or a VM migration may step it: back by ``step`` ms after ``after`` reads."""

    def __init__(self, after: int, step: int) -> None:
        self.reads = 0
        self.after = after
        self.step = step
        self.start = time.time_ns() // 1_000_000

    def __call__(self) -> int:
        self.reads += 1
        return self.start - (self.step if self.reads > self.after else 0)


async def test_a_clock_stepped_back_between_issue_and_consume_leaves_a_sound_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The consume was stamped before the issue, which check() calls damage ("consumed before issued").
    monkeypatch.setattr(nonces, "now_ms", _SteppedClock(after=1, step=50))
    async with pf.connect(tmp_path / "s") as store:
        nonce = await store.nonces.issue("agent", 60)
        await store.nonces.consume(nonce, "agent")
        with pytest.raises(pf.NonceReplayed):
            await store.nonces.consume(nonce, "agent")
        assert (await store.check()).problems == []


async def test_a_clock_stepped_back_between_two_transitions_leaves_a_sound_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # last_seen_ms took the later transition's (earlier) stamp, so it no longer was MAX(recorded_at_ms).
    monkeypatch.setattr(constellation, "now_ms", _SteppedClock(after=1, step=50))
    async with pf.connect(tmp_path / "s") as store:
        await store.memory.record_transition("s", "a", "t", 1.0, True)
        await store.memory.record_transition("s", "a", "t", 0.0, False)
        [stats] = await store.memory.stats("s")
        assert stats.count == 2
        assert (await store.check()).problems == []


class _Disguised(str):
    """A str that misreports itself: checks must read the characters, not ask the object."""

    def isascii(self) -> bool:
        return True

    def __len__(self) -> int:
        return 1


@pytest.mark.parametrize("value", [_Disguised("\ud800"), _Disguised("x" * 5000)], ids=["surrogate", "long"])
async def test_a_str_subclass_that_misreports_itself_is_checked_by_its_characters(tmp_path: Path, value: str) -> None:
    # A lone surrogate passed the check (isascii said True) and failed in the encoder as a bare
    # UnicodeEncodeError; a 5,000-char state passed as 1 char long (len said 1).
    async with pf.connect(tmp_path / "s") as store:
        with pytest.raises(pf.InvalidInput, match="subject"):
            await store.nonces.issue(value, 5)
        with pytest.raises(pf.InvalidInput, match="state"):
            await store.memory.record_transition(value, "a", "b", 1.0, True)
        with pytest.raises(pf.InvalidInput, match="state"):
            await store.memory.stats(value)
        assert (await store.check()).problems == []


class _Boundless(float):
    """A float that claims to be within any bound and converts to NaN."""

    def __ge__(self, other: object) -> bool:
        return True

    def __le__(self, other: object) -> bool:
        return True

    def __float__(self) -> float:
        return float("nan")

    def __mul__(self, other: object) -> float:
        return float("nan")


async def test_a_number_subclass_that_misreports_itself_is_checked_by_its_value(tmp_path: Path) -> None:
    # A NaN ttl reached round() inside the check (a bare ValueError) through a float subclass whose
    # comparisons said it was in range.
    async with pf.connect(tmp_path / "s") as store:
        with pytest.raises(pf.InvalidInput, match="ttl_s"):
            await store.nonces.issue("x", _Boundless("nan"))
        with pytest.raises(pf.InvalidInput, match="reward"):
            await store.memory.record_transition("s", "a", "b", _Boundless("nan"), True)
        assert (await store.check()).problems == []
