"""The token budget ledger (``store.budget``): spend per LLM vendor and model, budgets never overdrawn.

Money is an ``int`` of micro-units (1 USD = 1_000_000) everywhere; a float is refused. A call
reserves what it may spend (``reserve``), then commits what it did spend (``commit``, at most what
it reserved) or gives the reservation back (``release``). A reservation never committed stops
counting when it expires. Every check runs inside the ledger actor's transaction, under the
database's file lock, so concurrent reservations from many processes never overdraw a budget.

Built for loops that crash and resume: a reserve with an ``idempotency_key`` made again (by a
restarted loop, or by several processes at once) returns the one reservation the key made; ``tags``
(session, agent, ...) stay on a reservation and its spend, and ``totals`` and ``list_reservations``
filter by them; and a spend that happened is never refused: ``commit`` after the reservation expired
records it, and says (in its result and in ``totals``) by how much it took the budget past its limit.
"""

from __future__ import annotations

import datetime as dt
import secrets
import sqlite3
from collections.abc import Sequence
from typing import Annotated, Any, ClassVar, Literal

import msgspec

from ..clock import now_ms
from ..errors import BudgetExceeded, Conflict, IdempotencyConflict, InvalidInput, NotFound
from ..sqlite.actor import SqliteActor
from ._checks import (
    MAX_INT,
    MAX_SECONDS,
    MAX_TEXT,
    Millis,
    Text,
    Whole,
    bound_values,
    instant_ms,
    number,
    optional_text,
    seconds,
    show,
    text,
    whole,
)

__all__ = ["BudgetActor", "BudgetLedger", "Reservation", "Spent", "Totals", "Usage"]

DAY_MS = 86_400_000
Window = Literal["total", "day"]
_RESERVATION_PATTERN = r"\A[0-9a-f]{32}\Z"
ReservationId = Annotated[str, msgspec.Meta(pattern=_RESERVATION_PATTERN)]
Model = Annotated[str, msgspec.Meta(max_length=MAX_TEXT)]
#: tags on one reservation or spend, at most
MAX_TAGS = 16
Tags = Annotated[dict[Text, Text], msgspec.Meta(max_length=MAX_TAGS)]
#: reservations one ``list_reservations`` call returns, at most
MAX_LIST = 10_000


class Usage(msgspec.Struct, frozen=True):
    """What a call actually used. ``cost`` is in micro-units."""

    input_tokens: int
    output_tokens: int
    cost: int

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens


class Reservation(msgspec.Struct, frozen=True):
    """Tokens and cost held against a vendor's budgets until ``expires_at_ms``.

    ``state`` as of when it was read: ``"held"`` (counting), ``"expired"`` (neither committed nor
    released, but no longer counting; it may still be committed or extended), ``"committed"`` or
    ``"released"``."""

    reservation_id: str
    vendor: str
    model: str
    tokens: int
    cost: int
    expires_at_ms: int
    state: str = "held"
    idempotency_key: str | None = None
    tags: dict[str, str] = {}
    created_at_ms: int = 0


class Spent(msgspec.Struct, frozen=True):
    """What ``commit`` recorded. ``late``: committed after the reservation expired. ``over_tokens``
    and ``over_cost``: how far this spend took the vendor's budget past its limit (the most over any
    of its windows), 0 when it stayed within; only a late commit can be over."""

    spend_id: int
    reservation_id: str
    vendor: str
    model: str
    input_tokens: int
    output_tokens: int
    cost: int
    late: bool = False
    over_tokens: int = 0
    over_cost: int = 0

    @property
    def overdrawn(self) -> bool:
        return self.over_tokens > 0 or self.over_cost > 0


class Totals(msgspec.Struct, frozen=True):
    """Committed spend of a vendor (since a time, with tags, if asked), and what is reserved and still
    held. ``over_tokens`` and ``over_cost``: of that spend, how much went past a limit (late commits)."""

    vendor: str
    input_tokens: int
    output_tokens: int
    cost: int
    reserved_tokens: int
    reserved_cost: int
    over_tokens: int = 0
    over_cost: int = 0

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    @property
    def overdrawn(self) -> bool:
        return self.over_tokens > 0 or self.over_cost > 0


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
    idempotency_key: Text | None = None
    tags: Tags = {}


class Extend(msgspec.Struct, frozen=True, tag="extend"):
    reservation_id: ReservationId
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
    tags: Tags = {}
    allow_overdraw: bool = False


#: reservations deleted per purge command (one short transaction under the writers' lock)
PURGE_SLICE = 2_000
GraceMillis = Annotated[int, msgspec.Meta(ge=0, le=MAX_SECONDS * 1000)]
SliceSize = Annotated[int, msgspec.Meta(ge=1, le=100_000)]


class PurgeReservations(msgspec.Struct, frozen=True, tag="purge"):
    """Delete up to ``limit`` reservations never committed (held or released) whose expiry passed more
    than ``grace_ms`` ago, with their tags; the reply is how many."""

    grace_ms: GraceMillis = 0
    limit: SliceSize = PURGE_SLICE


BudgetCommand = SetBudget | Reserve | Extend | CommitSpend | Release | RecordSpend | PurgeReservations


# -- the rules, for every backend ---------------------------------------------------------------------
# The SQLite and PostgreSQL actors read what a rule needs with their own SQL, ask the rule, and write
# what it decided: what is refused, what a replay answers, how late and how far over a spend went are
# decided here once, so the two ledgers cannot drift apart.

#: one budget of a vendor as it stands: its window, what is spent and held in that window (tokens,
#: cost), and its token and cost limits (None: unlimited)
Standing = tuple[str, int, int, int, int, int | None, int | None]

RESERVATION_COLUMNS = (
    "reservation_id, vendor, model, tokens, cost, expires_at_ms, state, idempotency_key, created_at_ms"
)


def reservation_of(row: Sequence[Any], tags: dict[str, str], now: int) -> Reservation:
    """A ``Reservation`` from a row of ``RESERVATION_COLUMNS``, its state as of ``now``."""
    rid, vendor, model, tokens, cost, expires, state, key, created = row
    if state == "held" and expires <= now:
        state = "expired"
    return Reservation(rid, vendor, model, tokens, cost, expires, state, key, tags, created)


def no_reservation(reservation_id: str) -> NotFound:
    return NotFound(f"no reservation {reservation_id} (never made, or purged once expired)")


def check_budgets(vendor: str, standing: Sequence[Standing], tokens: int, cost: int) -> None:
    """Refuse ``tokens`` and ``cost`` more for ``vendor`` if they would take any of its budgets past a
    limit, what is spent and held counted (``BudgetExceeded``), or if it has no budget (``NotFound``)."""
    if not standing:
        raise NotFound(f"no budget is set for vendor {vendor!r}: call set_budget first")
    for window, spent_tokens, spent_cost, held_tokens, held_cost, token_limit, cost_limit in standing:
        for what, limit, spent, held, asked in (
            ("token", token_limit, spent_tokens, held_tokens, tokens),
            ("cost", cost_limit, spent_cost, held_cost, cost),
        ):
            if limit is not None and spent + held + asked > limit:
                raise BudgetExceeded(
                    f"{vendor} {window} {what} budget: limit {limit}, spent {spent}, reserved {held}, "
                    f"asked {asked} (over by {spent + held + asked - limit})"
                )


def overdraft(standing: Sequence[Standing], tokens: int, cost: int) -> tuple[int, int]:
    """How far spending ``tokens`` and ``cost`` now takes a vendor past its limits (what is spent and
    what others hold counted first), the most over any window; each at most what is spent."""
    over = [0, 0]
    for _window, spent_tokens, spent_cost, held_tokens, held_cost, token_limit, cost_limit in standing:
        for i, (limit, spent, held, asked) in enumerate(
            ((token_limit, spent_tokens, held_tokens, tokens), (cost_limit, spent_cost, held_cost, cost))
        ):
            if limit is not None:
                over[i] = max(over[i], min(asked, spent + held + asked - limit))
    return over[0], over[1]


def check_room(vendor: str, spent: Sequence[int], held: Sequence[int], tokens: int, cost: int) -> None:
    """Keep what ``vendor`` has spent plus what it holds (each ``(tokens, cost)``) within 64-bit
    integers, so every sum the ledger takes (totals, budget checks, this check) stays exact. Whatever no
    budget limits, a commit only moves what was held to what was spent, and an expiry or release only
    lowers what is held; so checking at every reserve, record_spend and late commit is enough."""
    for what, total, asked in (("tokens", spent[0] + held[0], tokens), ("cost", spent[1] + held[1], cost)):
        if total + asked > MAX_INT:
            raise InvalidInput(
                f"{vendor}: {asked} more {what} would take what is spent and reserved ({total}) past "
                f"2**63-1, the most the ledger counts"
            )


def reserve_replay(first: Reservation, command: Reserve) -> Reservation:
    """What a reserve whose key already made ``first`` answers: ``first``, as it is now, checking
    nothing against the budget again; or ``IdempotencyConflict`` if it asks for other values."""
    asked = (command.vendor, command.model, command.tokens, command.cost, command.tags)
    if (first.vendor, first.model, first.tokens, first.cost, first.tags) != asked:
        what = f"{first.vendor}, {first.model!r}, {first.tokens} tokens, cost {first.cost}, tags {first.tags}"
        raise IdempotencyConflict(
            f"idempotency key {command.idempotency_key!r} reserved {first.reservation_id} for other values ({what})"
        )
    return first


def new_reservation(command: Reserve, now: int) -> Reservation:
    """The reservation ``command`` makes at ``now`` (once the budgets and the room were checked)."""
    return Reservation(
        command.reservation_id,
        command.vendor,
        command.model,
        command.tokens,
        command.cost,
        now + command.ttl_ms,
        "held",
        command.idempotency_key,
        dict(sorted(command.tags.items())),
        now,
    )


def reservation_values(made: Reservation) -> tuple[Any, ...]:
    """A new reservation's row: reservation_id, vendor, model, tokens, cost, created_at_ms,
    expires_at_ms, idempotency_key (its state is 'held')."""
    return (
        made.reservation_id,
        made.vendor,
        made.model,
        made.tokens,
        made.cost,
        made.created_at_ms,
        made.expires_at_ms,
        made.idempotency_key,
    )


def check_extend(current: Reservation) -> bool:
    """Whether extending ``current`` needs the room a new reservation would (it expired, so it stopped
    counting); ``Conflict`` if it is committed or released."""
    if current.state in ("committed", "released"):
        raise Conflict(f"reservation {current.reservation_id} is {current.state}: it cannot be extended")
    return current.state == "expired"


def extended(current: Reservation, ttl_ms: int, now: int) -> Reservation:
    """``current`` held until ``ttl_ms`` from now, or longer if it already was (never shortened)."""
    return msgspec.structs.replace(current, expires_at_ms=max(now + ttl_ms, current.expires_at_ms), state="held")


def check_release(reservation_id: str, state: str | None) -> None:
    """Refuse to release a reservation in ``state`` (None: there is none)."""
    if state is None:
        raise no_reservation(reservation_id)
    if state == "committed":
        raise Conflict(f"reservation {reservation_id} is already committed")


#: what a commit reads of its reservation: vendor, model, tokens, cost, expires_at_ms, state
RESERVED_COLUMNS = "vendor, model, tokens, cost, expires_at_ms, state"
#: what a retried commit reads of the spend it made
COMMITTED_COLUMNS = "spend_id, input_tokens, output_tokens, cost, recorded_at_ms, over_tokens, over_cost"


def commit_replay(command: CommitSpend, reserved: Sequence[Any], spend: Sequence[Any]) -> Spent:
    """What a commit of a reservation already committed answers: the ``Spent`` it recorded (``late``
    as it was then), or ``Conflict`` for other usage. ``reserved``: the reservation's
    ``RESERVED_COLUMNS``; ``spend``: its spend's ``COMMITTED_COLUMNS``."""
    vendor, model, _tokens, _cost, expires_at, _state = reserved
    used = (command.input_tokens, command.output_tokens, command.cost)
    if tuple(spend[1:4]) != used:
        raise Conflict(f"reservation {command.reservation_id} was committed with other usage")
    late = spend[4] >= expires_at
    return Spent(int(spend[0]), command.reservation_id, vendor, model, *used, late, spend[5], spend[6])


def check_commit(command: CommitSpend, reserved: Sequence[Any], now: int) -> bool:
    """Refuse to commit ``command`` against a reservation (its ``RESERVED_COLUMNS``, not committed)
    that was released (``Conflict``) or holds less than was used (``InvalidInput``); else whether the
    commit is late (the reservation expired: it is recorded all the same, with how far it went over)."""
    _vendor, _model, tokens, cost, expires_at, state = reserved
    if state == "released":
        raise Conflict(f"reservation {command.reservation_id} was released")
    used_tokens = command.input_tokens + command.output_tokens
    if used_tokens > tokens or command.cost > cost:
        raise InvalidInput(
            f"usage of {used_tokens} tokens and cost {command.cost} is over reservation {command.reservation_id} "
            f"({tokens} tokens, cost {cost})"
        )
    return bool(expires_at <= now)


def committed(command: CommitSpend, reserved: Sequence[Any], spend_id: int, late: bool, over: tuple[int, int]) -> Spent:
    """The ``Spent`` a first commit answers."""
    used = (command.input_tokens, command.output_tokens, command.cost)
    return Spent(spend_id, command.reservation_id, reserved[0], reserved[1], *used, late, *over)


def spend_replay_values(command: RecordSpend) -> tuple[Any, ...]:
    """What a ``record_spend`` key's first spend must equal (``SPEND_REPLAY_COLUMNS`` after the id)."""
    return (command.vendor, command.model, command.input_tokens, command.output_tokens, command.cost)


SPEND_REPLAY_COLUMNS = "spend_id, vendor, model, input_tokens, output_tokens, cost"


def spend_replay(command: RecordSpend, first: Sequence[Any], tags: dict[str, str]) -> int:
    """What a ``record_spend`` whose key already recorded a spend answers: that spend's id, writing
    nothing; or ``IdempotencyConflict`` if it asks for other values, tags included (as a reserve's
    replay does). ``first``: the spend's ``SPEND_REPLAY_COLUMNS``; ``tags``: the spend's tags.
    ``allow_overdraw`` is not compared: it permits a spend, it is not part of it."""
    spend_id, *stored = first
    if (*stored, tags) != (*spend_replay_values(command), command.tags):
        vendor, model, input_tokens, output_tokens, cost = stored
        what = f"{vendor}, {model!r}, {input_tokens} + {output_tokens} tokens, cost {cost}, tags {tags}"
        raise IdempotencyConflict(
            f"idempotency key {command.idempotency_key!r} recorded spend {spend_id} for other values ({what})"
        )
    return int(spend_id)


def record_spend_over(command: RecordSpend, standing: Sequence[Standing]) -> tuple[int, int]:
    """How far a ``record_spend`` goes past the vendor's limits: refused (``BudgetExceeded``) unless
    it allows an overdraft, then recorded with how far over it went."""
    tokens = command.input_tokens + command.output_tokens
    if command.allow_overdraw:
        return overdraft(standing, tokens, command.cost)
    check_budgets(command.vendor, standing, tokens, command.cost)
    return (0, 0)


SPEND_COLUMNS = (
    "vendor, model, input_tokens, output_tokens, cost, idempotency_key, reservation_id, recorded_at_ms, "
    "over_tokens, over_cost"
)


def spend_values(
    vendor: str,
    model: str,
    used: CommitSpend | RecordSpend,
    key: str | None,
    reservation_id: str | None,
    now: int,
    over: tuple[int, int],
) -> tuple[Any, ...]:
    """A spend row, in ``SPEND_COLUMNS`` order."""
    return (vendor, model, used.input_tokens, used.output_tokens, used.cost, key, reservation_id, now, *over)


#: what ``check()`` looks for, in SQL both backends run: each query selects what is wrong
INVARIANTS = (
    (
        "spend_totals that differ from the sum of spend",
        "SELECT * FROM (SELECT vendor, tokens, cost FROM spend_totals EXCEPT SELECT vendor, "
        "SUM(input_tokens + output_tokens), SUM(cost) FROM spend GROUP BY vendor) x UNION ALL SELECT * FROM "
        "(SELECT vendor, SUM(input_tokens + output_tokens), SUM(cost) FROM spend GROUP BY vendor EXCEPT "
        "SELECT vendor, tokens, cost FROM spend_totals) y",
    ),
    (
        "committed reservations without exactly one spend row",
        "SELECT r.reservation_id FROM reservations r LEFT JOIN spend s ON s.reservation_id = r.reservation_id "
        "WHERE r.state = 'committed' GROUP BY r.reservation_id HAVING COUNT(s.spend_id) != 1",
    ),
    (
        "spend rows of reservations that are not committed",
        "SELECT s.spend_id FROM spend s JOIN reservations r ON r.reservation_id = s.reservation_id "
        "WHERE r.state != 'committed'",
    ),
    (
        "tags of reservations or spend that do not exist",
        "SELECT reservation_id FROM reservation_tags WHERE reservation_id NOT IN "
        "(SELECT reservation_id FROM reservations) UNION ALL SELECT CAST(spend_id AS TEXT) FROM spend_tags "
        "WHERE spend_id NOT IN (SELECT spend_id FROM spend)",
    ),
    (
        "spend over a limit by more than it spent",
        "SELECT spend_id FROM spend WHERE over_tokens > input_tokens + output_tokens OR over_cost > cost",
    ),
)


class BudgetActor(SqliteActor[BudgetCommand]):
    command_type = BudgetCommand
    name = "budget"
    schema_file = "budget_ledger_schema.sql"
    schema_version = 2
    migrations: ClassVar[dict[int, str]] = {2: "budget_ledger_v2.sql"}
    invariants = INVARIANTS

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
                return self._reserve(conn, command, now)
            case Extend(reservation_id=reservation_id, ttl_ms=ttl_ms):
                return self._extend(conn, reservation_id, ttl_ms, now)
            case CommitSpend():
                return self._commit(conn, command, now)
            case Release(reservation_id=reservation_id):
                row = conn.execute(
                    "SELECT state FROM reservations WHERE reservation_id = ?", (reservation_id,)
                ).fetchone()
                check_release(reservation_id, None if row is None else row[0])
                conn.execute("UPDATE reservations SET state = 'released' WHERE reservation_id = ?", (reservation_id,))
                return None
            case RecordSpend():
                return self._record_spend(conn, command, now)
            case PurgeReservations(grace_ms=grace_ms, limit=limit):
                return _purge(conn, now - grace_ms, limit)
        raise InvalidInput(f"unknown budget command {command!r}")

    def _record_spend(self, conn: sqlite3.Connection, command: RecordSpend, now: int) -> int:
        key = command.idempotency_key
        if key is not None:
            first = conn.execute(f"SELECT {SPEND_REPLAY_COLUMNS} FROM spend WHERE idempotency_key = ?", (key,))
            found = first.fetchone()
            if found is not None:
                return spend_replay(command, found, _tags_of(conn, "spend_tags", found[0]))
        over = record_spend_over(command, self._standing(conn, command.vendor, now))
        self._room(conn, command.vendor, command.input_tokens + command.output_tokens, command.cost, now)
        spend_id = self._insert_spend(conn, spend_values(command.vendor, command.model, command, key, None, now, over))
        _insert_tags(conn, "spend_tags", spend_id, command.tags)
        return spend_id

    def _reserve(self, conn: sqlite3.Connection, command: Reserve, now: int) -> Reservation:
        key = command.idempotency_key
        if key is not None:
            row = conn.execute(f"SELECT {RESERVATION_COLUMNS} FROM reservations WHERE idempotency_key = ?", (key,))
            found = row.fetchone()
            if found is not None:
                return reserve_replay(reservation_of(found, _tags_of(conn, "reservation_tags", found[0]), now), command)
        check_budgets(command.vendor, self._standing(conn, command.vendor, now), command.tokens, command.cost)
        self._room(conn, command.vendor, command.tokens, command.cost, now)
        made = new_reservation(command, now)
        conn.execute(
            "INSERT INTO reservations (reservation_id, vendor, model, tokens, cost, created_at_ms, expires_at_ms, "
            "state, idempotency_key) VALUES (?, ?, ?, ?, ?, ?, ?, 'held', ?)",
            reservation_values(made),
        )
        _insert_tags(conn, "reservation_tags", made.reservation_id, made.tags)
        return made

    def _extend(self, conn: sqlite3.Connection, reservation_id: str, ttl_ms: int, now: int) -> Reservation:
        row = conn.execute(
            f"SELECT {RESERVATION_COLUMNS} FROM reservations WHERE reservation_id = ?", (reservation_id,)
        ).fetchone()
        if row is None:
            raise no_reservation(reservation_id)
        current = reservation_of(row, _tags_of(conn, "reservation_tags", reservation_id), now)
        if check_extend(current):
            check_budgets(current.vendor, self._standing(conn, current.vendor, now), current.tokens, current.cost)
            self._room(conn, current.vendor, current.tokens, current.cost, now)
        longer = extended(current, ttl_ms, now)
        conn.execute(
            "UPDATE reservations SET expires_at_ms = ? WHERE reservation_id = ?", (longer.expires_at_ms, reservation_id)
        )
        return longer

    def _standing(self, conn: sqlite3.Connection, vendor: str, now: int) -> list[Standing]:
        """For each budget of ``vendor``: its window, what is spent and held in it, and its limits."""
        standing = []
        budgets = conn.execute(
            "SELECT window, token_limit, cost_limit FROM budgets WHERE vendor = ?", (vendor,)
        ).fetchall()
        for window, token_limit, cost_limit in budgets:
            if window == "total":
                row = conn.execute("SELECT tokens, cost FROM spend_totals WHERE vendor = ?", (vendor,)).fetchone()
                spent_tokens, spent_cost = row if row is not None else (0, 0)
            else:
                spent_tokens, spent_cost = conn.execute(
                    "SELECT COALESCE(SUM(input_tokens + output_tokens), 0), COALESCE(SUM(cost), 0) FROM spend "
                    "WHERE vendor = ? AND recorded_at_ms > ?",
                    (vendor, now - DAY_MS),
                ).fetchone()
            # Every reservation still held counts in every window, whenever it was made: its spend
            # lands in the window it is committed in, so one made before the day began holds room today.
            held_tokens, held_cost = conn.execute(
                "SELECT COALESCE(SUM(tokens), 0), COALESCE(SUM(cost), 0) FROM reservations "
                "WHERE vendor = ? AND state = 'held' AND expires_at_ms > ?",
                (vendor, now),
            ).fetchone()
            standing.append((window, spent_tokens, spent_cost, held_tokens, held_cost, token_limit, cost_limit))
        return standing

    def _room(self, conn: sqlite3.Connection, vendor: str, tokens: int, cost: int, now: int) -> None:
        """``check_room`` with what ``vendor`` has spent and holds now."""
        spent = conn.execute("SELECT tokens, cost FROM spend_totals WHERE vendor = ?", (vendor,)).fetchone()
        held = conn.execute(
            "SELECT COALESCE(SUM(tokens), 0), COALESCE(SUM(cost), 0) FROM reservations "
            "WHERE vendor = ? AND state = 'held' AND expires_at_ms > ?",
            (vendor, now),
        ).fetchone()
        check_room(vendor, spent if spent is not None else (0, 0), held, tokens, cost)

    def _commit(self, conn: sqlite3.Connection, command: CommitSpend, now: int) -> Spent:
        reservation_id = command.reservation_id
        reserved = conn.execute(
            f"SELECT {RESERVED_COLUMNS} FROM reservations WHERE reservation_id = ?", (reservation_id,)
        ).fetchone()
        if reserved is None:
            raise no_reservation(reservation_id)
        vendor, model, *_, state = reserved
        if state == "committed":
            spend = conn.execute(f"SELECT {COMMITTED_COLUMNS} FROM spend WHERE reservation_id = ?", (reservation_id,))
            return commit_replay(command, reserved, spend.fetchone())
        late = check_commit(command, reserved, now)
        over = (0, 0)
        if late:
            # It stopped counting when it expired, and others may have reserved the room since: the
            # spend is recorded all the same (it happened), with how far it goes past a limit.
            used_tokens = command.input_tokens + command.output_tokens
            self._room(conn, vendor, used_tokens, command.cost, now)
            over = overdraft(self._standing(conn, vendor, now), used_tokens, command.cost)
        conn.execute("UPDATE reservations SET state = 'committed' WHERE reservation_id = ?", (reservation_id,))
        spend_id = self._insert_spend(conn, spend_values(vendor, model, command, None, reservation_id, now, over))
        conn.execute(
            "INSERT INTO spend_tags (spend_id, tag, value) SELECT ?, tag, value FROM reservation_tags "
            "WHERE reservation_id = ?",
            (spend_id, reservation_id),
        )
        return committed(command, reserved, spend_id, late, over)

    def _insert_spend(self, conn: sqlite3.Connection, values: tuple[Any, ...]) -> int:
        """Insert a spend row (``spend_values``) and add it to its vendor's ``spend_totals``."""
        cursor = conn.execute(f"INSERT INTO spend ({SPEND_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", values)
        vendor, _model, input_tokens, output_tokens, cost = values[:5]
        conn.execute(
            "INSERT INTO spend_totals VALUES (?, ?, ?) ON CONFLICT (vendor) DO UPDATE SET "
            "tokens = tokens + excluded.tokens, cost = cost + excluded.cost",
            (vendor, input_tokens + output_tokens, cost),
        )
        assert cursor.lastrowid is not None
        return cursor.lastrowid


def _purge(conn: sqlite3.Connection, cutoff_ms: int, limit: int) -> int:
    """Delete up to ``limit`` reservations that expired at or before ``cutoff_ms`` and were never
    committed. Such a reservation holds nothing (a budget counts held ones until they expire), and no
    spend row names it (spend names committed ones only): what was spent and what is held are the same
    before and after. Committed reservations stay: each is its spend's record (a retried commit is
    answered from it, ``late`` included), kept as long as the spend is."""
    doomed = [
        row[0]
        for row in conn.execute(
            "SELECT reservation_id FROM reservations WHERE state != 'committed' AND expires_at_ms <= ? "
            "ORDER BY expires_at_ms LIMIT ?",
            (cutoff_ms, limit),
        )
    ]
    if not doomed:
        return 0
    marks = ", ".join("?" * len(doomed))
    conn.execute(f"DELETE FROM reservation_tags WHERE reservation_id IN ({marks})", doomed)
    return int(conn.execute(f"DELETE FROM reservations WHERE reservation_id IN ({marks})", doomed).rowcount)


def _tags_of(conn: sqlite3.Connection, table: str, owner: object) -> dict[str, str]:
    column = "reservation_id" if table == "reservation_tags" else "spend_id"
    rows = conn.execute(f"SELECT tag, value FROM {table} WHERE {column} = ? ORDER BY tag", (owner,))
    return dict(rows.fetchall())


def _insert_tags(conn: sqlite3.Connection, table: str, owner: object, tags: dict[str, str]) -> None:
    if tags:
        column = "reservation_id" if table == "reservation_tags" else "spend_id"
        conn.executemany(
            f"INSERT INTO {table} ({column}, tag, value) VALUES (?, ?, ?)",
            [(owner, tag, value) for tag, value in sorted(tags.items())],
        )


def _tags(value: object) -> dict[str, str]:
    """``tags``: None or a dict of at most ``MAX_TAGS`` str -> str (each 1 to 1024 chars), sorted."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f"tags must be a dict of str to str, got {type(value).__name__} {show(value)}")
    if len(value) > MAX_TAGS:
        raise InvalidInput(f"at most {MAX_TAGS} tags, got {len(value)}")
    checked = {text(tag, "tag name"): text(tagged, f"tag {tag!r}") for tag, tagged in value.items()}
    return dict(sorted(checked.items()))


def _tag_filter(table: str, column: str, tags: dict[str, str]) -> tuple[str, list[str]]:
    """A SQL condition (and its parameters) true for the rows of ``column`` that carry every tag."""
    if not tags:
        return "", []
    wanted = " INTERSECT ".join([f"SELECT {column} FROM {table} WHERE tag = ? AND value = ?"] * len(tags))
    return f" AND {column} IN ({wanted})", [part for item in tags.items() for part in item]


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
        self,
        vendor: str,
        *,
        tokens: int = 0,
        cost: int = 0,
        model: str = "",
        ttl_s: float = 300,
        idempotency_key: str | None = None,
        tags: dict[str, str] | None = None,
    ) -> Reservation:
        """Hold ``tokens`` and ``cost`` against every budget of ``vendor``, or raise
        ``BudgetExceeded`` (naming the limit, what is spent, what is reserved and what was asked).
        ``ttl_s`` is at most 10**15 seconds.

        With ``idempotency_key``, the key's reservation if it made one already (in whatever state it
        is now: a retry after a crash, or the same reserve from several processes, gives one
        reservation), checking nothing against the budget again; the same key with another vendor,
        model, amount or tags is ``IdempotencyConflict``. ``tags`` (at most 16, str to str, e.g.
        ``{"session": ..., "agent": ...}``) stay on the reservation and on its spend."""
        command = Reserve(
            secrets.token_hex(16),
            text(vendor, "vendor"),
            "" if isinstance(model, str) and model == "" else text(model, "model"),
            whole(tokens, "tokens"),
            whole(cost, "cost"),
            seconds(ttl_s, "ttl_s"),
            optional_text(idempotency_key, "idempotency_key"),
            _tags(tags),
        )
        reservation = await self._actor.call(command)
        assert isinstance(reservation, Reservation)
        return reservation

    async def extend(self, reservation: Reservation | str, ttl_s: float) -> Reservation:
        """Hold a reservation until ``ttl_s`` seconds from now, or longer if it already was (for a call
        that runs long). One that expired counts again, so it needs the room a new reservation would
        (``BudgetExceeded``); a committed or released one is ``Conflict``."""
        command = Extend(_reservation_id(reservation), seconds(ttl_s, "ttl_s"))
        extended = await self._actor.call(command)
        assert isinstance(extended, Reservation)
        return extended

    async def commit(self, reservation: Reservation | str, actual: Usage) -> Spent:
        """Record what a reserved call used (at most what was reserved). Committing again with the
        same usage returns the same ``Spent``.

        A spend that happened is never refused: after the reservation expired (and others may have
        taken the room it held) the commit is recorded all the same, as ``late``, and ``over_tokens``
        / ``over_cost`` say how far it took the budget past its limit (``totals`` sums them)."""
        if not isinstance(actual, Usage):
            raise InvalidInput(f"actual must be a Usage, got {type(actual).__name__} {show(actual)}")
        command = CommitSpend(
            _reservation_id(reservation),
            whole(actual.input_tokens, "input_tokens"),
            whole(actual.output_tokens, "output_tokens"),
            whole(actual.cost, "cost"),
        )
        spent = await self._actor.call(command)
        assert isinstance(spent, Spent)
        return spent

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
        tags: dict[str, str] | None = None,
        allow_overdraw: bool = False,
    ) -> int:
        """Reserve and commit in one step (for spend known only afterwards); idempotent by key.
        Returns the spend row id. Over a budget it raises ``BudgetExceeded``, unless
        ``allow_overdraw``: then the spend (which happened) is recorded with how far it went over."""
        if not isinstance(allow_overdraw, bool):
            raise InvalidInput(f"allow_overdraw must be True or False, got {show(allow_overdraw)}")
        command = RecordSpend(
            text(vendor, "vendor"),
            text(model, "model"),
            whole(input_tokens, "input_tokens"),
            whole(output_tokens, "output_tokens"),
            whole(cost, "cost"),
            optional_text(idempotency_key, "idempotency_key"),
            _tags(tags),
            allow_overdraw,
        )
        return int(await self._actor.call(command))

    async def purge_expired(self, *, grace_s: float = 0.0) -> int:
        """Delete the reservations never committed (held past their expiry, or released) whose
        expiry passed more than ``grace_s`` seconds ago (0 to 10**15), with their tags; returns how
        many. They no longer count against any budget, so no total, no budget check and no spend
        changes. Committed reservations stay with their spend. In slices of a few thousand rows, each
        one short transaction beside other writers; a purge cut short leaves each row kept or gone.

        Afterwards a purged reservation is unknown: ``commit``, ``extend`` and ``release`` of it raise
        ``NotFound`` (a spend that happened after all is recorded with ``record_spend(...,
        allow_overdraw=True)``), ``find_reservation`` of its key gives None and a ``reserve`` with
        that key makes a new reservation. Choose ``grace_s`` longer than any call may run past its
        reservation's expiry."""
        grace_ms = round(number(grace_s, "grace_s", low=0, high=MAX_SECONDS) * 1000)
        purged = 0
        while True:
            gone = int(await self._actor.call(PurgeReservations(grace_ms, PURGE_SLICE)))
            purged += gone
            if gone < PURGE_SLICE:
                return purged

    async def find_reservation(self, idempotency_key: str) -> Reservation | None:
        """The reservation ``idempotency_key`` made, in its state now; None if it made none. (What a
        resumed loop asks to learn whether a step's spend was reserved, committed or neither.)"""
        key = text(idempotency_key, "idempotency_key")
        row = await self._actor.fetchone(
            f"SELECT {RESERVATION_COLUMNS} FROM reservations WHERE idempotency_key = ?", (key,)
        )
        if row is None:
            return None
        tags = await self._actor.fetchall(
            "SELECT tag, value FROM reservation_tags WHERE reservation_id = ? ORDER BY tag", (row[0],)
        )
        return reservation_of(row, {tag: value for tag, value in tags}, now_ms())

    async def list_reservations(
        self, vendor: str | None = None, *, tags: dict[str, str] | None = None, limit: int = 1000
    ) -> list[Reservation]:
        """The reservations neither committed nor released (of ``vendor``, with every one of
        ``tags``), oldest first, at most ``limit`` (1 to 10,000): ``"held"`` ones and ``"expired"``
        ones (which no longer count, but may still be committed or extended)."""
        where, params = _tag_filter("reservation_tags", "reservation_id", _tags(tags))
        if vendor is not None:
            where += " AND vendor = ?"
            params.append(text(vendor, "vendor"))
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIST:
            raise InvalidInput(f"limit must be an int from 1 to {MAX_LIST}, got {show(limit)}")
        rows = await self._actor.fetchall(
            f"SELECT {RESERVATION_COLUMNS} FROM reservations WHERE state = 'held'{where} "
            "ORDER BY created_at_ms, reservation_id LIMIT ?",
            [*params, limit],
        )
        tags_of: dict[str, dict[str, str]] = {}
        if rows:
            ids = [row[0] for row in rows]
            for rid, tag, value in await self._actor.fetchall(
                "SELECT reservation_id, tag, value FROM reservation_tags WHERE reservation_id IN "
                f"({', '.join('?' * len(ids))}) ORDER BY reservation_id, tag",
                ids,
            ):
                tags_of.setdefault(rid, {})[tag] = value
        now = now_ms()
        return [reservation_of(row, tags_of.get(row[0], {}), now) for row in rows]

    async def totals(
        self, vendor: str, since: dt.datetime | float | None = None, *, tags: dict[str, str] | None = None
    ) -> Totals:
        """Committed spend of ``vendor`` (from ``since``: a datetime or epoch seconds; with every one
        of ``tags``), what of it went past a limit, and what is reserved and still held."""
        vendor = text(vendor, "vendor")
        since_ms = -1 if since is None else instant_ms(since, "since")
        wanted = _tags(tags)
        spend_where, spend_params = _tag_filter("spend_tags", "spend_id", wanted)
        held_where, held_params = _tag_filter("reservation_tags", "reservation_id", wanted)
        spent = await self._actor.fetchone(
            "SELECT COALESCE(SUM(input_tokens), 0), COALESCE(SUM(output_tokens), 0), COALESCE(SUM(cost), 0), "
            "COALESCE(SUM(over_tokens), 0), COALESCE(SUM(over_cost), 0) "
            f"FROM spend WHERE vendor = ? AND recorded_at_ms >= ?{spend_where}",
            [vendor, since_ms, *spend_params],
        )
        held = await self._actor.fetchone(
            "SELECT COALESCE(SUM(tokens), 0), COALESCE(SUM(cost), 0) FROM reservations "
            f"WHERE vendor = ? AND state = 'held' AND expires_at_ms > ?{held_where}",
            [vendor, now_ms(), *held_params],
        )
        return Totals(vendor, spent[0], spent[1], spent[2], held[0], held[1], spent[3], spent[4])
