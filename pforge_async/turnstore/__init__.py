"""The turn store: conversations as an immutable DAG of turns, with O(1) forks and idempotent appends."""

from __future__ import annotations

from .fs import FsTurnStore
from .keys import agent_key, attractor_key, idempotency_key
from .memory import MemoryTurnStore
from .protocol import ArtifactStore, SessionStore, TurnStore, TypedTurnStore
from .sqlite import SqliteTurnStore
from .types import ContextHead, ContextInfo, ContextOrder, ContextPage, Correlation, NewTurn, TurnEnvelope, TurnRecord

__all__ = [
    "ArtifactStore",
    "ContextHead",
    "ContextInfo",
    "ContextOrder",
    "ContextPage",
    "Correlation",
    "FsTurnStore",
    "MemoryTurnStore",
    "NewTurn",
    "SessionStore",
    "SqliteTurnStore",
    "TurnEnvelope",
    "TurnRecord",
    "TurnStore",
    "TypedTurnStore",
    "agent_key",
    "attractor_key",
    "idempotency_key",
]
