"""The SQLite ledgers: constellation memory, capability nonces, the token budget ledger."""

from __future__ import annotations

from .budget import BudgetLedger, Reservation, Spent, Totals, Usage
from .constellation import ActionStats, ConstellationMemory
from .nonces import NonceLedger

__all__ = [
    "ActionStats",
    "BudgetLedger",
    "ConstellationMemory",
    "NonceLedger",
    "Reservation",
    "Spent",
    "Totals",
    "Usage",
]
