"""Argument checks the ledgers share: clear ``InvalidInput`` before anything reaches an actor."""

from __future__ import annotations

import math

from ..errors import InvalidInput

MAX_TEXT = 1024


def text(value: object, what: str) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_TEXT:
        raise InvalidInput(f"{what} must be a non-empty str of at most {MAX_TEXT} chars, got {value!r}")
    return value


def optional_text(value: object, what: str) -> str | None:
    return None if value is None else text(value, what)


def whole(value: object, what: str) -> int:
    """A non-negative int (money is micro-units: a float is refused, never rounded)."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidInput(f"{what} must be an int, got {type(value).__name__} {value!r}")
    if value < 0:
        raise InvalidInput(f"{what} must be >= 0, got {value}")
    return value


def seconds(value: object, what: str) -> int:
    """A positive duration in seconds, returned in milliseconds."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidInput(f"{what} must be a number of seconds, got {value!r}")
    if value <= 0:
        raise InvalidInput(f"{what} must be > 0, got {value}")
    return max(1, round(value * 1000))
