"""pforge_async: an embedded async persistence runtime for AI agent systems."""

from __future__ import annotations

from .actor import Actor, Failed
from .cas import EMPTY_TREE, Commit, FsckReport, TreeEntry
from .errors import (
    ActorClosed,
    BudgetExceeded,
    Conflict,
    ContextNotFound,
    HeadConflict,
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
from .ledgers import ActionStats, Reservation, Totals, Usage
from .store import Durability, Store, StoreCheck, open_store
from .turnstore import (
    ContextHead,
    ContextInfo,
    ContextPage,
    Correlation,
    FsTurnStore,
    MemoryTurnStore,
    NewTurn,
    TurnEnvelope,
    TurnRecord,
    agent_key,
    attractor_key,
)

__version__ = "0.1.0"

__all__ = [
    "EMPTY_TREE",
    "ActionStats",
    "Actor",
    "ActorClosed",
    "BudgetExceeded",
    "Commit",
    "Conflict",
    "ContextHead",
    "ContextInfo",
    "ContextNotFound",
    "ContextPage",
    "Correlation",
    "Durability",
    "Failed",
    "FsLock",
    "FsTurnStore",
    "FsckReport",
    "HeadConflict",
    "IdempotencyConflict",
    "IntegrityError",
    "InvalidInput",
    "LockTimeout",
    "MemoryTurnStore",
    "NewTurn",
    "NonceExpired",
    "NonceReplayed",
    "NonceUnknown",
    "NotFound",
    "ObjectNotFound",
    "PersistenceError",
    "PforgeError",
    "RefConflict",
    "Reservation",
    "StorageError",
    "Store",
    "StoreCheck",
    "Totals",
    "TreeEntry",
    "TurnEnvelope",
    "TurnNotFound",
    "TurnRecord",
    "Usage",
    "__version__",
    "agent_key",
    "attractor_key",
    "open_store",
]
