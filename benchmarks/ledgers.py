"""Ledger operations through pforge's actors beside a plain aiosqlite implementation (one transaction per
operation, the way such a ledger is usually written), in one run, at 1 and 64 concurrent callers.

Run: ``python benchmarks/ledgers.py``. Both sides use the same schema files, WAL and
``synchronous=FULL`` (pforge: durability ``"full"``).
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiosqlite
import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import describe, run_callers

from pforge_async import open_store
from pforge_async.ledgers import Usage
from pforge_async.sqlite.actor import load_script, split_statements


class PlainLedgers:
    """The baseline: one aiosqlite connection, one transaction per operation, a lock to take turns."""

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self.conn = conn
        self.lock = anyio.Lock()

    @classmethod
    async def open(cls, path: Path) -> PlainLedgers:
        conn = await aiosqlite.connect(path, isolation_level=None)
        await conn.execute("PRAGMA journal_mode = WAL")
        await conn.execute("PRAGMA synchronous = FULL")
        for name in ("nonces_schema.sql", "budget_ledger_schema.sql", "constellation_schema.sql"):
            for statement in split_statements(load_script(name)):
                await conn.execute(statement)
        return cls(conn)

    async def _transaction(self, work: Callable[[], Awaitable[Any]]) -> Any:
        async with self.lock:
            await self.conn.execute("BEGIN IMMEDIATE")
            try:
                result = await work()
            except BaseException:
                await self.conn.execute("ROLLBACK")
                raise
            await self.conn.execute("COMMIT")
            return result

    async def issue(self, subject: str) -> str:
        nonce = secrets.token_urlsafe(32)
        now = time.time_ns() // 1_000_000

        async def work() -> None:
            await self.conn.execute(
                "INSERT INTO nonces VALUES (?, ?, ?, ?, NULL)", (nonce, subject, now, now + 600_000)
            )

        await self._transaction(work)
        return nonce

    async def consume(self, nonce: str, subject: str) -> None:
        now = time.time_ns() // 1_000_000

        async def work() -> None:
            async with self.conn.execute(
                "SELECT subject, expires_at_ms, consumed_at_ms FROM nonces WHERE nonce = ?", (nonce,)
            ) as cursor:
                row = await cursor.fetchone()
            assert row is not None and row[2] is None and row[0] == subject and row[1] > now
            await self.conn.execute("UPDATE nonces SET consumed_at_ms = ? WHERE nonce = ?", (now, nonce))

        await self._transaction(work)

    async def reserve_commit(self, vendor: str, tokens: int, cost: int) -> None:
        rid = secrets.token_hex(16)
        now = time.time_ns() // 1_000_000

        async def reserve() -> None:
            async with self.conn.execute("SELECT token_limit FROM budgets WHERE vendor = ?", (vendor,)) as c:
                (limit,) = await c.fetchone()  # type: ignore[misc]
            async with self.conn.execute("SELECT tokens FROM spend_totals WHERE vendor = ?", (vendor,)) as c:
                row = await c.fetchone()
            async with self.conn.execute(
                "SELECT COALESCE(SUM(tokens), 0) FROM reservations WHERE vendor = ? AND state = 'held' "
                "AND expires_at_ms > ?",
                (vendor, now),
            ) as c:
                (held,) = await c.fetchone()  # type: ignore[misc]
            assert (row[0] if row else 0) + held + tokens <= limit
            await self.conn.execute(
                "INSERT INTO reservations VALUES (?, ?, '', ?, ?, ?, ?, 'held')",
                (rid, vendor, tokens, cost, now, now + 300_000),
            )

        async def commit() -> None:
            await self.conn.execute("UPDATE reservations SET state = 'committed' WHERE reservation_id = ?", (rid,))
            await self.conn.execute(
                "INSERT INTO spend (vendor, model, input_tokens, output_tokens, cost, reservation_id, recorded_at_ms) "
                "VALUES (?, '', ?, 0, ?, ?, ?)",
                (vendor, tokens, cost, rid, now),
            )
            await self.conn.execute(
                "INSERT INTO spend_totals VALUES (?, ?, ?) ON CONFLICT (vendor) DO UPDATE SET "
                "tokens = tokens + excluded.tokens, cost = cost + excluded.cost",
                (vendor, tokens, cost),
            )

        await self._transaction(reserve)
        await self._transaction(commit)

    async def record_transition(self, state: str, action: str, reward: float) -> None:
        now = time.time_ns() // 1_000_000

        async def work() -> None:
            await self.conn.execute(
                "INSERT INTO transitions (state, action, next_state, reward, success, recorded_at_ms) "
                "VALUES (?, ?, 'next', ?, 1, ?)",
                (state, action, reward, now),
            )
            await self.conn.execute(
                "INSERT INTO action_stats VALUES (?, ?, 1, 1, ?, ?, ?) ON CONFLICT (state, action) "
                "DO UPDATE SET count = count + 1, successes = successes + 1, "
                "reward_sum = reward_sum + excluded.reward_sum, "
                "reward_sq_sum = reward_sq_sum + excluded.reward_sq_sum, last_seen_ms = excluded.last_seen_ms",
                (state, action, reward, reward * reward, now),
            )

        await self._transaction(work)


async def rate(callers: int, total: int, op: Callable[[int], Awaitable[Any]]) -> float:
    per = total // callers
    return callers * per / await run_callers(callers, per, op)


async def measure_round(callers: int, base: Path, total: int) -> None:
    base.mkdir()
    plain = await PlainLedgers.open(base / "plain.db")
    async with open_store(base / ".pforge", durability="full") as store:
        await store.budget.set_budget("v", tokens=10**15)
        await plain.conn.execute("INSERT INTO budgets VALUES ('v', 'total', ?, NULL, 0)", (10**15,))
        ours = [await store.nonces.issue("s", 600) for _ in range(total)]
        theirs = [await plain.issue("s") for _ in range(total)]

        async def our_pair(i: int) -> None:
            held = await store.budget.reserve("v", tokens=10, cost=10)
            await store.budget.commit(held, Usage(5, 5, 10))

        measurements = [
            (
                "nonce consume",
                lambda i: store.nonces.consume(ours[i], "s"),
                lambda i: plain.consume(theirs[i], "s"),
            ),
            ("reserve+commit pair", our_pair, lambda i: plain.reserve_commit("v", 10, 10)),
            (
                "transition",
                lambda i: store.memory.record_transition(f"s{i % 7}", f"a{i % 3}", "next", 0.5, True),
                lambda i: plain.record_transition(f"s{i % 7}", f"a{i % 3}", 0.5),
            ),
        ]
        for name, mine, baseline in measurements:
            os.sync()
            pforge_rate = await rate(callers, total, mine)
            os.sync()
            plain_rate = await rate(callers, total, baseline)
            print(f"{callers:>7} {name:>20} {pforge_rate:>10.0f} {plain_rate:>10.0f} {pforge_rate / plain_rate:>7.1f}")
    await plain.conn.close()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ops", type=int, default=2048, help="operations per measurement")
    args = parser.parse_args()
    print(describe())
    print(f"\n{'callers':>7} {'operation':>20} {'pforge/s':>10} {'plain/s':>10} {'ratio':>7}")
    with tempfile.TemporaryDirectory(prefix="pforge-bench-ledgers-", dir=os.environ.get("BENCH_DIR")) as tmp:
        for callers in (1, 64):
            await measure_round(callers, Path(tmp) / f"c{callers}", args.ops if callers > 1 else max(64, args.ops // 4))
    print("\ntarget at 64 callers with durability 'full': pforge >= 10x the plain implementation")


if __name__ == "__main__":
    anyio.run(main)
