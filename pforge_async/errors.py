"""The exception hierarchy. Every error the library raises is a :class:`PforgeError`.

Backend errors (``sqlite3``, ``OSError``, ``zlib``) are translated at one boundary and chained with
``from``, so callers never have to catch a backend's exceptions.
"""

from __future__ import annotations

__all__ = [
    "ActorClosed",
    "BudgetExceeded",
    "Conflict",
    "ContextNotFound",
    "HeadConflict",
    "IdempotencyConflict",
    "IntegrityError",
    "InvalidInput",
    "LockTimeout",
    "NonceExpired",
    "NonceReplayed",
    "NonceUnknown",
    "NotFound",
    "ObjectNotFound",
    "PersistenceError",
    "PforgeError",
    "RefConflict",
    "StorageError",
    "TurnNotFound",
]


class PforgeError(Exception):
    """Base of every pforge_async error."""


class InvalidInput(PforgeError, ValueError):
    """The caller passed something the contract does not accept; nothing was stored."""


class NotFound(PforgeError, LookupError):
    """The named thing does not exist."""


class ObjectNotFound(NotFound):
    """No CAS object (or ref) with that id."""


class ContextNotFound(NotFound):
    """No turn-store context with that id."""


class TurnNotFound(NotFound):
    """No turn with that id."""


class Conflict(PforgeError):
    """The write contradicts what is already stored."""


class IdempotencyConflict(Conflict):
    """An idempotency key was reused for a different write."""


class HeadConflict(Conflict):
    """A compare-and-set on a context's head (``expected_head``) found another head."""

    def __init__(self, context_id: int, expected: int, actual: int) -> None:
        super().__init__(f"context {context_id}: expected head {expected}, but the head is {actual}")
        self.context_id = context_id
        self.expected = expected
        self.actual = actual

    def __reduce__(self) -> tuple[type[HeadConflict], tuple[int, int, int]]:
        return type(self), (self.context_id, self.expected, self.actual)


class RefConflict(Conflict):
    """A compare-and-swap ref update found a value other than the expected one."""


class IntegrityError(PforgeError):
    """Stored data does not match its hash or checksum."""


class LockTimeout(PforgeError, TimeoutError):
    """A file lock was not acquired within its timeout."""


class ActorClosed(PforgeError):
    """The actor serving this call is closed, or died; ``__cause__`` holds why it died."""


class NonceReplayed(PforgeError):
    """The nonce was already consumed."""


class NonceExpired(PforgeError):
    """The nonce's time to live has passed."""


class NonceUnknown(PforgeError):
    """No such nonce was ever issued (or it was purged)."""


class BudgetExceeded(PforgeError):
    """A reservation would overdraw a budget."""


class PersistenceError(PforgeError):
    """A required persistence write failed (agent hooks in ``required`` mode)."""


class StorageError(PforgeError, OSError):
    """An I/O or database failure; the backend error is chained as ``__cause__``."""
