"""The token budget ledger (``store.budget``): spend per LLM vendor and model, budgets never overdrawn.

Money is an ``int`` of micro-units (1 USD = 1_000_000) everywhere; a float is refused. A call
reserves what it may spend (``reserve``), then commits what it did spend (``commit``, at most what
it reserved) or gives the reservation back (``release``). A reservation never committed stops
counting when it expires. Every check runs inside the ledger actor's transaction, under the
database's file lock, so concurrent reservations from many processes never overdraw a budget.
"""

from __future__ import annotations

import datetime as dt
import secrets
import sqlite3
from typing import Annotated, Literal

import msgspec

from ..clock import now_ms
from ..errors import BudgetExceeded, Conflict, InvalidInput, NotFound
from ..sqlite.actor import SqliteActor, replay
from ._checks import (
    MAX_INT,
    MAX_TEXT,
    Millis,
    Text,
    Whole,
    bound_values,
    instant_ms,
    optional_text,
    seconds,
    show,
    text,
    whole,
)

__all__ = ["BudgetActor", "BudgetLedger", "Reservation", "Totals", "Usage"]

DAY_MS = 86_400_000
Window = Literal["total", "day"]
_RESERVATION_PATTERN = r"\A[0-9a-f]{32}\Z"
ReservationId = Annotated[str, msgspec.Meta(pattern=_RESERVATION_PATTERN)]
Model = Annotated[str, msgspec.Meta(max_length=MAX_TEXT)]


class Usage(msgspec.Struct, frozen=True):
    """What a call actually used. ``cost`` is in micro-units."""

    input_tokens: int
    output_tokens: int
    cost: int

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens


class Reservation(msgspec.Struct, frozen=True):
    reservation_id: str
    vendor: str
    model: str
    tokens: int
    cost: int
    expires_at_ms: int


class Totals(msgspec.Struct, frozen=True):
    """Committed spend of a vendor (since a time, if asked), and what is reserved and still held."""

    vendor: str
    input_tokens: int
    output_tokens: int
    cost: int
    reserved_tokens: int
    reserved_cost: int

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens


class SetBudget(msgspec.Struct, frozen=True, tag="set_budget"):
    vendor: Text
    window: Window
    tokens: Whole | None
    cost: Whole | None


class Reserve(msgspec.Struct, frozen=True, tag="reserve"):
    reservation_id: ReservationId
    vendor: Text
    model: Model
    tokens: Whole
    cost: Whole
    ttl_ms: Millis


class CommitSpend(msgspec.Struct, frozen=True, tag="commit"):
    reservation_id: ReservationId
    input_tokens: Whole
    output_tokens: Whole
    cost: Whole


class Release(msgspec.Struct, frozen=True, tag="release"):
    reservation_id: ReservationId


class RecordSpend(msgspec.Struct, frozen=True, tag="record_spend"):
    vendor: Text
    model: Text
    input_tokens: Whole
    output_tokens: Whole
    cost: Whole
    idempotency_key: Text | None = None


BudgetCommand = SetBudget | Reserve | CommitSpend | Release | RecordSpend


class BudgetActor(SqliteActor[BudgetCommand]):
    command_type = BudgetCommand
    name = "budget"
    schema_file = "budget_ledger_schema.sql"
    schema_version = 1
    invariants = (
        (
            "spend_totals that differ from the sum of spend",
            "SELECT * FROM (SELECT vendor, tokens, cost FROM spend_totals EXCEPT SELECT vendor, "
            "SUM(input_tokens + output_tokens), SUM(cost) FROM spend GROUP BY vendor) UNION ALL SELECT * FROM "
            "(SELECT vendor, SUM(input_tokens + output_tokens), SUM(cost) FROM spend GROUP BY vendor EXCEPT "
            "SELECT vendor, tokens, cost FROM spend_totals)",
        ),
        (
            "committed reservations without exactly one spend row",
            "SELECT r.reservation_id FROM reservations r LEFT JOIN spend s ON s.reservation_id = r.reservation_id "
            "WHERE r.state = 'committed' GROUP BY r.reservation_id HAVING COUNT(s.spend_id) != 1",
        ),
    )

    def apply(self, conn: sqlite3.Connection, command: BudgetCommand) -> object:
        with bound_values(self.name, command):
            return self._apply(conn, command)

    def _apply(self, conn: sqlite3.Connection, command: BudgetCommand) -> object:
        now = now_ms()
        match command:
            case SetBudget(vendor=vendor, window=window, tokens=tokens, cost=cost):
                conn.execute(
                    "INSERT INTO budgets VALUES (?, ?, ?, ?, ?) ON CONFLICT (vendor, window) DO UPDATE SET "
                    "token_limit = excluded.token_limit, cost_limit = excluded.cost_limit, "
                    "updated_at_ms = excluded.updated_at_ms",
                    (vendor, window, tokens, cost, now),
                )
                return None
            case Reserve():
                self._check(conn, command.vendor, command.tokens, command.cost, now)
                self._room(conn, command.vendor, command.tokens, command.cost, now)
                conn.execute(
                    "INSERT INTO reservations VALUES (?, ?, ?, ?, ?, ?, ?, 'held')",
                    (
                        command.reservation_id,
                        command.vendor,
                        command.model,
                        command.tokens,
                        command.cost,
                        now,
                        now + command.ttl_ms,
                    ),
                )
                return Reservation(
                    command.reservation_id,
                    command.vendor,
                    command.model,
                    command.tokens,
                    command.cost,
                    now + command.ttl_ms,
                )
            case CommitSpend():
                return self._commit(conn, command, now)
            case Release(reservation_id=reservation_id):
                row = conn.execute(
                    "SELECT state FROM reservations WHERE reservation_id = ?", (reservation_id,)
                ).fetchone()
                if row is None:
                    raise NotFound(f"no reservation {reservation_id}")
                if row[0] == "committed":
                    raise Conflict(f"reservation {reservation_id} is already committed")
                conn.execute("UPDATE reservations SET state = 'released' WHERE reservation_id = ?", (reservation_id,))
                return None
            case RecordSpend():
                first = replay(
                    conn,
                    "SELECT spend_id, vendor, model, input_tokens, output_tokens, cost FROM spend "
                    "WHERE idempotency_key = ?",
                    command.idempotency_key,
                    (command.vendor, command.model, command.input_tokens, command.output_tokens, command.cost),
                    "spend",
                )
                if first is not None:
                    return first
                tokens = command.input_tokens + command.output_tokens
                self._check(conn, command.vendor, tokens, command.cost, now)
                self._room(conn, command.vendor, tokens, command.cost, now)
                return self._insert_spend(
                    conn,
                    command.vendor,
                    command.model,
                    command.input_tokens,
                    command.output_tokens,
                    command.cost,
                    command.idempotency_key,
                    None,
                    now,
                )
        raise InvalidInput(f"unknown budget command {command!r}")

    def _check(self, conn: sqlite3.Connection, vendor: str, tokens: int, cost: int, now: int) -> None:
        budgets = conn.execute(
            "SELECT window, token_limit, cost_limit FROM budgets WHERE vendor = ?", (vendor,)
        ).fetchall()
        if not budgets:
            raise NotFound(f"no budget is set for vendor {vendor!r}: call set_budget first")
        for window, token_limit, cost_limit in budgets:
            if window == "total":
                row = conn.execute("SELECT tokens, cost FROM spend_totals WHERE vendor = ?", (vendor,)).fetchone()
                spent_tokens, spent_cost = row if row is not None else (0, 0)
                since = 0
            else:
                since = now - DAY_MS
                spent_tokens, spent_cost = conn.execute(
                    "SELECT COALESCE(SUM(input_tokens + output_tokens), 0), COALESCE(SUM(cost), 0) FROM spend "
                    "WHERE vendor = ? AND recorded_at_ms > ?",
                    (vendor, since),
                ).fetchone()
            held_tokens, held_cost = conn.execute(
                "SELECT COALESCE(SUM(tokens), 0), COALESCE(SUM(cost), 0) FROM reservations "
                "WHERE vendor = ? AND state = 'held' AND expires_at_ms > ? AND created_at_ms > ?",
                (vendor, now, since),
            ).fetchone()
            for what, limit, spent, held, asked in (
                ("token", token_limit, spent_tokens, held_tokens, tokens),
                ("cost", cost_limit, spent_cost, held_cost, cost),
            ):
                if limit is not None and spent + held + asked > limit:
                    raise BudgetExceeded(
                        f"{vendor} {window} {what} budget: limit {limit}, spent {spent}, reserved {held}, "
                        f"asked {asked} (over by {spent + held + asked - limit})"
                    )

    def _room(self, conn: sqlite3.Connection, vendor: str, tokens: int, cost: int, now: int) -> None:
        """Keep what ``vendor`` has spent plus what it holds within SQLite's 64-bit integers, so every
        sum the ledger takes (totals, budget checks, its own check) stays exact. Whatever no budget
        limits, a commit only moves what was held to what was spent, and an expiry or release only
        lowers what is held; so checking here, at every reserve and record_spend, is enough."""
        spent = conn.execute("SELECT tokens, cost FROM spend_totals WHERE vendor = ?", (vendor,)).fetchone()
        held = conn.execute(
            "SELECT COALESCE(SUM(tokens), 0), COALESCE(SUM(cost), 0) FROM reservations "
            "WHERE vendor = ? AND state = 'held' AND expires_at_ms > ?",
            (vendor, now),
        ).fetchone()
        spent_tokens, spent_cost = spent if spent is not None else (0, 0)
        for what, total, asked in (("tokens", spent_tokens + held[0], tokens), ("cost", spent_cost + held[1], cost)):
            if total + asked > MAX_INT:
                raise InvalidInput(
                    f"{vendor}: {asked} more {what} would take what is spent and reserved ({total}) past "
                    f"2**63-1, the most the ledger counts"
                )

    def _commit(self, conn: sqlite3.Connection, command: CommitSpend, now: int) -> int:
        reservation_id = command.reservation_id
        row = conn.execute(
            "SELECT vendor, model, tokens, cost, expires_at_ms, state FROM reservations WHERE reservation_id = ?",
            (reservation_id,),
        ).fetchone()
        if row is None:
            raise NotFound(f"no reservation {reservation_id}")
        vendor, model, tokens, cost, expires_at, state = row
        if state == "committed":
            spent = conn.execute(
                "SELECT spend_id, input_tokens, output_tokens, cost FROM spend WHERE reservation_id = ?",
                (reservation_id,),
            ).fetchone()
            if tuple(spent[1:]) != (command.input_tokens, command.output_tokens, command.cost):
                raise Conflict(f"reservation {reservation_id} was committed with other usage")
            return int(spent[0])
        if state == "released":
            raise Conflict(f"reservation {reservation_id} was released")
        if expires_at <= now:
            raise Conflict(f"reservation {reservation_id} expired {now - expires_at} ms ago")
        used = command.input_tokens + command.output_tokens
        if used > tokens or command.cost > cost:
            raise InvalidInput(
                f"usage of {used} tokens and cost {command.cost} is over reservation {reservation_id} "
                f"({tokens} tokens, cost {cost})"
            )
        conn.execute("UPDATE reservations SET state = 'committed' WHERE reservation_id = ?", (reservation_id,))
        return self._insert_spend(
            conn,
            vendor,
            model,
            command.input_tokens,
            command.output_tokens,
            command.cost,
            None,
            reservation_id,
            now,
        )

    def _insert_spend(
        self,
        conn: sqlite3.Connection,
        vendor: str,
        model: str,
        input_tokens: int,
        output_tokens: int,
        cost: int,
        key: str | None,
        reservation_id: str | None,
        now: int,
    ) -> int:
        cursor = conn.execute(
            "INSERT INTO spend (vendor, model, input_tokens, output_tokens, cost, idempotency_key, reservation_id, "
            "recorded_at_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (vendor, model, input_tokens, output_tokens, cost, key, reservation_id, now),
        )
        conn.execute(
            "INSERT INTO spend_totals VALUES (?, ?, ?) ON CONFLICT (vendor) DO UPDATE SET "
            "tokens = tokens + excluded.tokens, cost = cost + excluded.cost",
            (vendor, input_tokens + output_tokens, cost),
        )
        assert cursor.lastrowid is not None
        return cursor.lastrowid


def _reservation_id(reservation: Reservation | str) -> str:
    rid = reservation.reservation_id if isinstance(reservation, Reservation) else reservation
    if not isinstance(rid, str) or len(rid) != 32 or not all(c in "0123456789abcdef" for c in rid):
        raise InvalidInput(f"malformed reservation {show(reservation)}")
    return str.__str__(rid)


class BudgetLedger:
    """``store.budget``."""

    def __init__(self, actor: BudgetActor) -> None:
        self._actor = actor

    async def set_budget(
        self, vendor: str, *, tokens: int | None = None, cost: int | None = None, window: Window = "total"
    ) -> None:
        """Limit ``vendor`` to ``tokens`` and/or ``cost`` (micro-units) over ``window``: ``"total"``
        (all time) or ``"day"`` (a rolling 24 hours). None leaves that dimension unlimited."""
        if not isinstance(window, str) or window not in ("total", "day"):
            raise InvalidInput(f"window must be 'total' or 'day', got {show(window)}")
        command = SetBudget(
            text(vendor, "vendor"),
            "total" if window == "total" else "day",
            None if tokens is None else whole(tokens, "tokens"),
            None if cost is None else whole(cost, "cost"),
        )
        await self._actor.call(command)

    async def reserve(
        self, vendor: str, *, tokens: int = 0, cost: int = 0, model: str = "", ttl_s: float = 300
    ) -> Reservation:
        """Hold ``tokens`` and ``cost`` against every budget of ``vendor``, or raise
        ``BudgetExceeded`` (naming the limit, what is spent, what is reserved and what was asked).
        ``ttl_s`` is at most 10**15 seconds."""
        command = Reserve(
            secrets.token_hex(16),
            text(vendor, "vendor"),
            "" if isinstance(model, str) and model == "" else text(model, "model"),
            whole(tokens, "tokens"),
            whole(cost, "cost"),
            seconds(ttl_s, "ttl_s"),
        )
        reservation = await self._actor.call(command)
        assert isinstance(reservation, Reservation)
        return reservation

    async def commit(self, reservation: Reservation | str, actual: Usage) -> int:
        """Record what a reserved call used (at most what was reserved); returns the spend row id.
        Committing again with the same usage returns the same row."""
        if not isinstance(actual, Usage):
            raise InvalidInput(f"actual must be a Usage, got {type(actual).__name__} {show(actual)}")
        command = CommitSpend(
            _reservation_id(reservation),
            whole(actual.input_tokens, "input_tokens"),
            whole(actual.output_tokens, "output_tokens"),
            whole(actual.cost, "cost"),
        )
        return int(await self._actor.call(command))

    async def release(self, reservation: Reservation | str) -> None:
        """Give a reservation back unused."""
        await self._actor.call(Release(_reservation_id(reservation)))

    async def record_spend(
        self,
        vendor: str,
        model: str,
        *,
        input_tokens: int,
        output_tokens: int,
        cost: int,
        idempotency_key: str | None = None,
    ) -> int:
        """Reserve and commit in one step (for spend known only afterwards); idempotent by key."""
        command = RecordSpend(
            text(vendor, "vendor"),
            text(model, "model"),
            whole(input_tokens, "input_tokens"),
            whole(output_tokens, "output_tokens"),
            whole(cost, "cost"),
            optional_text(idempotency_key, "idempotency_key"),
        )
        return int(await self._actor.call(command))

    async def totals(self, vendor: str, since: dt.datetime | float | None = None) -> Totals:
        """Committed spend of ``vendor`` (from ``since``: a datetime or epoch seconds), and what is
        reserved and still held."""
        vendor = text(vendor, "vendor")
        since_ms = -1 if since is None else instant_ms(since, "since")
        spent = await self._actor.fetchone(
            "SELECT COALESCE(SUM(input_tokens), 0), COALESCE(SUM(output_tokens), 0), COALESCE(SUM(cost), 0) "
            "FROM spend WHERE vendor = ? AND recorded_at_ms >= ?",
            (vendor, since_ms),
        )
        held = await self._actor.fetchone(
            "SELECT COALESCE(SUM(tokens), 0), COALESCE(SUM(cost), 0) FROM reservations "
            "WHERE vendor = ? AND state = 'held' AND expires_at_ms > ?",
            (vendor, now_ms()),
        )
        return Totals(vendor, spent[0], spent[1], spent[2], held[0], held[1])
