"""How a recorder treats a write that fails: the three modes and the failure record.

``off``: nothing is written and no store is needed; a hook returns at once. ``best_effort`` (the
default): a failed write never stops the loop; it is kept on ``recorder.failures`` and logged as a
warning. ``required``: the first failed write raises ``PersistenceError`` in the loop, its cause chained.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from ..errors import InvalidInput
from ..ledgers._checks import show

__all__ = ["MODES", "Mode", "PersistenceFailure", "logger", "validate_mode"]

Mode = Literal["off", "best_effort", "required"]
MODES: tuple[Mode, ...] = ("off", "best_effort", "required")

#: where best_effort failures are logged (as warnings)
logger = logging.getLogger("pforge_async.agent")


def validate_mode(mode: object) -> Mode:
    if isinstance(mode, str):  # checked first: a caller's object's own == may raise
        for known in MODES:
            if mode == known:
                return known
    raise InvalidInput(f"mode must be one of {', '.join(map(repr, MODES))}, got {show(mode)}")


@dataclass(frozen=True)
class PersistenceFailure:
    """A write a recorder could not make: the session, the hook, the position it had (None for the
    link records and the session's opening), and the error (a ``PforgeError`` from the store, or
    whatever a failing store raised)."""

    session_name: str
    hook: str
    seq: int | None
    error: Exception

    def __str__(self) -> str:
        at = "" if self.seq is None else f" at position {self.seq}"
        error = f"{type(self.error).__name__}: {self.error}"
        return f"session {self.session_name!r}: {self.hook}{at} was not recorded: {error}"
