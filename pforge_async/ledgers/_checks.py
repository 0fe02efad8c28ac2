"""Argument checks the ledgers share: a clear ``InvalidInput`` before anything reaches an actor.

Each check returns the value as a plain ``str``, ``int`` or ``float`` (a ``StrEnum`` or ``IntEnum``
member becomes its value), because that is all msgspec encodes and SQLite binds. The bounds are the
ledgers' documented limits:

- a string (state, action, vendor, model, subject, key, ...) is 1 to ``MAX_TEXT`` characters of
  valid Unicode: a lone surrogate cannot be stored as UTF-8, so it is refused here;
- an integer stored (tokens, money, ids) is within SQLite's signed 64-bit ``INTEGER``, 0 to
  ``MAX_INT``;
- a number (reward, exploration, seconds) is finite, and a reward at most ``MAX_REWARD`` in
  magnitude, so the sums of rewards and of their squares the statistics keep stay finite;
- a time to live is at most ``MAX_SECONDS``, so an expiry time stays a 64-bit integer.

The command types carry the same bounds (the ``Annotated`` aliases below), so a command that reaches
an actor's mailbox as bytes, not through these checks, is refused by the decoder as ``InvalidInput``.
"""

from __future__ import annotations

import datetime as dt
import math
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Annotated, Any

import msgspec

from ..errors import IdempotencyConflict, InvalidInput, PforgeError

MAX_TEXT = 1024
MAX_INT = 2**63 - 1
MAX_REWARD = 1e100
MAX_SECONDS = 10**15

Text = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_TEXT)]
Whole = Annotated[int, msgspec.Meta(ge=0, le=MAX_INT)]
Millis = Annotated[int, msgspec.Meta(ge=1, le=MAX_SECONDS * 1000)]
Reward = Annotated[float, msgspec.Meta(ge=-MAX_REWARD, le=MAX_REWARD)]


def text(value: object, what: str) -> str:
    # str's own methods, not the object's: a subclass may misreport its length or its ASCII-ness.
    if not isinstance(value, str) or not 0 < str.__len__(value) <= MAX_TEXT:
        raise InvalidInput(f"{what} must be a non-empty str of at most {MAX_TEXT} chars, got {show(value)}")
    if not str.isascii(value):
        try:
            str.encode(value, "utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidInput(
                f"{what} holds a lone surrogate at index {exc.start}, which is not Unicode text: {show(value)}"
            ) from None
    return str.__str__(value)


def optional_text(value: object, what: str) -> str | None:
    return None if value is None else text(value, what)


def whole(value: object, what: str) -> int:
    """A non-negative int that SQLite stores as is (money is micro-units: a float is refused, never
    rounded)."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidInput(f"{what} must be an int, got {type(value).__name__} {show(value)}")
    if not 0 <= value <= MAX_INT:
        raise InvalidInput(f"{what} must be from 0 to 2**63-1, got {show(value)}")
    return int.__index__(value)


def number(value: object, what: str, *, low: float, high: float) -> float:
    """A finite int or float from ``low`` to ``high``, as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidInput(f"{what} must be a number, got {type(value).__name__} {show(value)}")
    # The plain value, by int's or float's own method: a subclass may misreport its comparisons.
    # An int is compared before it is converted: float(10**400) itself overflows.
    plain = int.__index__(value) if isinstance(value, int) else float.__float__(value)
    if not low <= plain <= high:  # false for NaN too
        raise InvalidInput(f"{what} must be a finite number from {low:g} to {high:g}, got {show(value)}")
    return float(plain)


def seconds(value: object, what: str) -> int:
    """A positive duration of at most ``MAX_SECONDS`` seconds, returned in milliseconds (at least 1)."""
    duration = number(value, what, low=0, high=MAX_SECONDS)
    if duration <= 0:
        raise InvalidInput(f"{what} must be > 0, got {show(value)}")
    return max(1, round(duration * 1000))


def instant_ms(value: object, what: str) -> int:
    """A datetime or epoch seconds, as the first whole millisecond at or after it."""
    if isinstance(value, dt.datetime):
        try:
            epoch = value.timestamp()
        except (OverflowError, ValueError, OSError) as exc:  # a naive datetime near year 1 or 9999
            raise InvalidInput(f"{what} is not a time this platform can convert: {value!r} ({exc})") from None
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        epoch = value
    else:
        raise InvalidInput(f"{what} must be a datetime or epoch seconds, got {type(value).__name__} {show(value)}")
    if not -(MAX_INT // 1000) <= epoch <= MAX_INT // 1000:
        raise InvalidInput(f"{what} must be a finite time within the 64-bit range of milliseconds, got {show(value)}")
    return math.ceil(epoch * 1000)


def replay_sqlite(
    conn: sqlite3.Connection, select: str, key: str | None, asked: tuple[Any, ...], what: str
) -> int | None:
    """``replayed`` on SQLite: ``select`` reads ``(id, *columns)`` by key (None: no key, no replay)."""
    return None if key is None else replayed(key, conn.execute(select, (key,)).fetchone(), asked, what)


def replayed(key: str, first: Sequence[Any] | None, asked: tuple[Any, ...], what: str) -> int | None:
    """The id of the row an idempotency key already wrote (``first``: ``(id, *columns)``, or None if
    the key wrote none); the columns must equal ``asked``, or the reuse of the key for other values is
    an ``IdempotencyConflict``. Every backend's ledgers answer a replay by this rule."""
    if first is None:
        return None
    if tuple(first[1:]) != asked:
        raise IdempotencyConflict(f"idempotency key {key!r} was used for {what} {first[0]} with other values")
    return int(first[0])


@contextmanager
def bound_values(name: str, command: object) -> Iterator[None]:
    """Inside an actor's ``apply``: a value the database cannot bind (an integer past 64 bits, a
    string that is not UTF-8) fails the command's caller as ``InvalidInput``, never as a bare Python
    error. The facades' checks and the command types' bounds refuse such values first; this is the
    backstop."""
    try:
        yield
    except PforgeError:
        raise
    except (OverflowError, UnicodeError) as exc:
        raise InvalidInput(f"{name}: {type(command).__name__} holds a value the database cannot store: {exc}") from exc


def show(value: object) -> str:
    """``repr`` of a caller's value, cut short: a message names the value, it does not echo 5,000 chars."""
    try:
        shown = repr(value)
    except Exception:  # a caller's object whose repr fails is still named by its type
        return f"<{type(value).__name__}>"
    return shown if len(shown) <= 80 else f"{shown[:77]}..."
