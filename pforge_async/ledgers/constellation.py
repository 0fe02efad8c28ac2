"""Constellation memory (``store.memory``): transitions an agent learns from, and per-action statistics.

``best_action`` follows UCB1 (Auer, Cesa-Bianchi and Fischer, 2002): an action never tried in this
state comes first (candidates in the order given); otherwise the highest
``mean_reward + exploration * sqrt(ln N / n)``, where ``n`` is the action's count, ``N`` the total
count of the actions considered, and ``exploration`` defaults to ``sqrt(2)`` (classic UCB1, whose
regret bound assumes rewards in [0, 1]; scale it for other reward ranges). Ties go to the
alphabetically first action, so the choice is deterministic.
"""

from __future__ import annotations

import json
import math
import sqlite3
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import msgspec

from ..clock import now_ms
from ..errors import InvalidInput
from ..sqlite.actor import SqliteActor
from ._checks import MAX_REWARD, Reward, Text, bound_values, number, optional_text, replay_sqlite, text

__all__ = ["ActionStats", "ConstellationActor", "ConstellationMemory", "RecordTransition"]


class RecordTransition(msgspec.Struct, frozen=True, tag="record_transition"):
    state: Text
    action: Text
    next_state: Text
    reward: Reward
    success: bool
    context: Text | None = None
    idempotency_key: Text | None = None


class ActionStats(msgspec.Struct, frozen=True):
    """What the memory knows of one action in one state."""

    action: str
    count: int
    successes: int
    reward_sum: float
    reward_sq_sum: float
    last_seen_ms: int

    @property
    def mean_reward(self) -> float:
        return self.reward_sum / self.count

    @property
    def success_rate(self) -> float:
        return self.successes / self.count

    @property
    def reward_variance(self) -> float:
        mean = self.mean_reward
        return max(0.0, self.reward_sq_sum / self.count - mean * mean)


#: a reward squared as Python squares it: 0 where the product underflows (PostgreSQL refuses those)
_SQUARE = "CASE WHEN abs(reward) < 1e-150 THEN 0.0 ELSE reward * reward END"

#: what ``check()`` looks for, in SQL both backends run: each query selects what is wrong
INVARIANTS = (
    (
        "action_stats that differ from the aggregate of transitions",
        "SELECT * FROM (SELECT state, action, count, successes, last_seen_ms FROM action_stats EXCEPT "
        "SELECT state, action, COUNT(*), SUM(success), MAX(recorded_at_ms) FROM transitions GROUP BY 1, 2) x "
        "UNION ALL SELECT * FROM (SELECT state, action, COUNT(*), SUM(success), MAX(recorded_at_ms) "
        "FROM transitions GROUP BY 1, 2 EXCEPT SELECT state, action, count, successes, last_seen_ms "
        "FROM action_stats) y",
    ),
    # The tolerance of the reward sum is relative to the sum of the rewards' magnitudes, not to the
    # sum itself: rewards that cancel (1e100, 1, -1e100) sum to 0 or 1 depending on the order and
    # the algorithm (SQLite 3.43+ sums exactly, the running sum does not), and the rounding error of
    # any order is bounded by the magnitudes. Squares are never negative, so their sum is its own bound.
    (
        "action_stats whose reward sums differ from the transitions'",
        "SELECT s.state, s.action FROM action_stats s JOIN (SELECT state, action, SUM(reward) AS r, "
        f"SUM(abs(reward)) AS m, SUM({_SQUARE}) AS q FROM transitions GROUP BY 1, 2) a USING (state, action) "
        "WHERE abs(s.reward_sum - a.r) > 1e-6 * CASE WHEN a.m > 1.0 THEN a.m ELSE 1.0 END "
        "OR abs(s.reward_sq_sum - a.q) > 1e-6 * CASE WHEN abs(a.q) > 1.0 THEN abs(a.q) ELSE 1.0 END",
    ),
)


class ConstellationActor(SqliteActor[RecordTransition]):
    command_type = RecordTransition
    name = "memory"
    schema_file = "constellation_schema.sql"
    schema_version = 2
    migrations: ClassVar[dict[int, str]] = {2: "constellation_v2.sql"}
    invariants = INVARIANTS

    def apply(self, conn: sqlite3.Connection, command: RecordTransition) -> int:
        with bound_values(self.name, command):
            return self._record(conn, command)

    def _record(self, conn: sqlite3.Connection, command: RecordTransition) -> int:
        select = f"SELECT {TRANSITION_REPLAY_COLUMNS} FROM transitions WHERE idempotency_key = ?"
        first = replay_sqlite(conn, select, command.idempotency_key, transition_replay_values(command), "transition")
        if first is not None:
            return first
        now = now_ms()
        cursor = conn.execute(
            f"INSERT INTO transitions ({TRANSITION_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            transition_values(command, now),
        )
        conn.execute(
            "INSERT INTO action_stats VALUES (?, ?, 1, ?, ?, ?, ?) ON CONFLICT (state, action) DO UPDATE SET "
            "count = count + 1, successes = successes + excluded.successes, "
            "reward_sum = reward_sum + excluded.reward_sum, "
            # The latest stamp, not the last one's: the wall clock may have stepped back since.
            "reward_sq_sum = reward_sq_sum + excluded.reward_sq_sum, "
            "last_seen_ms = max(last_seen_ms, excluded.last_seen_ms)",
            (command.state, command.action, int(command.success), command.reward, command.reward**2, now),
        )
        assert cursor.lastrowid is not None
        return cursor.lastrowid


# -- the rules, for every backend (see the budget ledger's) ------------------------------------------

#: what a replayed key's first transition must equal, after its id
TRANSITION_REPLAY_COLUMNS = "transition_id, state, action, next_state, reward, success, context"
TRANSITION_COLUMNS = "state, action, next_state, reward, success, idempotency_key, recorded_at_ms, context"


def transition_replay_values(command: RecordTransition) -> tuple[Any, ...]:
    """What the transition an idempotency key made must hold for ``command`` to be its replay."""
    c = command
    return (c.state, c.action, c.next_state, c.reward, int(c.success), c.context)


def transition_values(command: RecordTransition, now: int) -> tuple[Any, ...]:
    """The row ``command`` inserts at ``now``, in ``TRANSITION_COLUMNS`` order."""
    c = command
    return (c.state, c.action, c.next_state, c.reward, int(c.success), c.idempotency_key, now, c.context)


class ConstellationMemory:
    """``store.memory``."""

    def __init__(self, actor: ConstellationActor) -> None:
        self._actor = actor

    async def record_transition(
        self,
        state: str,
        action: str,
        next_state: str,
        reward: float,
        success: bool,
        *,
        context: str | Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> int:
        """Record ``state --action--> next_state`` and update the action's statistics in the same
        transaction. Returns the transition id (the first one's, for a repeated idempotency key).
        ``reward`` is a finite number of magnitude at most 1e100; a ``context`` mapping is stored as
        JSON (at most 1024 chars, like every string)."""
        reward = number(reward, "reward", low=-MAX_REWARD, high=MAX_REWARD)
        if not isinstance(success, bool):
            raise InvalidInput(f"success must be a bool, got {type(success).__name__}")
        if isinstance(context, Mapping):
            try:
                context = json.dumps(context, sort_keys=True, separators=(",", ":"), allow_nan=False)
            except (TypeError, ValueError, RecursionError) as exc:
                raise InvalidInput(f"context is not JSON-serialisable: {exc}") from None
        command = RecordTransition(
            text(state, "state"),
            text(action, "action"),
            text(next_state, "next_state"),
            reward,
            success,
            optional_text(context, "context"),
            optional_text(idempotency_key, "idempotency_key"),
        )
        return int(await self._actor.call(command))

    async def stats(self, state: str) -> list[ActionStats]:
        """Every action recorded in ``state``, by action name."""
        rows = await self._actor.fetchall(
            "SELECT action, count, successes, reward_sum, reward_sq_sum, last_seen_ms FROM action_stats "
            "WHERE state = ? ORDER BY action",
            (text(state, "state"),),
        )
        return [ActionStats(*row) for row in rows]

    async def best_action(
        self,
        state: str,
        candidates: Iterable[str] | None = None,
        *,
        exploration: float = math.sqrt(2),
    ) -> str | None:
        """The action to take next in ``state`` by UCB1 (see the module); None if there is none.
        ``exploration`` is a finite number >= 0."""
        exploration = number(exploration, "exploration", low=0, high=sys.float_info.max)
        state = text(state, "state")
        options: Sequence[str] | None = None
        if candidates is not None:
            if isinstance(candidates, (str, bytes, bytearray)):
                raise InvalidInput("candidates must be a collection of action names, not one str")
            try:
                names = iter(candidates)
            except TypeError:
                what = type(candidates).__name__
                raise InvalidInput(f"candidates must be a collection of action names, got {what}") from None
            options = [text(c, "candidate action") for c in names]
        known = {s.action: s for s in await self.stats(state)}
        return choose_ucb1(sorted(known) if options is None else options, known, exploration)


def choose_ucb1(options: Sequence[str], known: Mapping[str, ActionStats], exploration: float) -> str | None:
    for action in options:
        if action not in known:
            return action
    if not options:
        return None
    total = sum(known[a].count for a in options)
    log_total = math.log(total)

    def score(action: str) -> tuple[float, str]:
        s = known[action]
        return (-(s.mean_reward + exploration * math.sqrt(log_total / s.count)), action)

    return min(options, key=score)
