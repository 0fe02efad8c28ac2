"""pforge_async: an embedded async persistence runtime for AI agent systems."""

from __future__ import annotations

from .actor import Actor, Failed
from .errors import (
    ActorClosed,
    BudgetExceeded,
    Conflict,
    ContextNotFound,
    IdempotencyConflict,
    IntegrityError,
    InvalidInput,
    LockTimeout,
    NonceExpired,
    NonceReplayed,
    NonceUnknown,
    NotFound,
    ObjectNotFound,
    PersistenceError,
    PforgeError,
    RefConflict,
    StorageError,
    TurnNotFound,
)
from .fslock import FsLock
from .store import Durability, Store, open_store

__version__ = "0.1.0"

__all__ = [
    "Actor",
    "ActorClosed",
    "BudgetExceeded",
    "Conflict",
    "ContextNotFound",
    "Durability",
    "Failed",
    "FsLock",
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
    "Store",
    "TurnNotFound",
    "__version__",
    "open_store",
]
