"""What pipeline storage writes to and reads from: a ``Store`` (its turn store, whose blobs are the
store's CAS) or any turn store (whose blob store, if it has one, holds large state)."""

from __future__ import annotations

from ..errors import ContextNotFound, InvalidInput
from ..store import Store
from ..turnstore.protocol import ArtifactStore, SessionStore
from ..turnstore.types import ContextInfo
from .keys import run_context_name

__all__ = ["Target", "blobs_of", "find_run", "turns_of"]

#: a ``Store``, or any turn store (memory, filesystem, SQLite)
Target = Store | SessionStore


def turns_of(target: object) -> SessionStore:
    turns = target.turns if isinstance(target, Store) else target
    if not isinstance(turns, SessionStore):
        raise InvalidInput(f"target must be a Store or a turn store, got {type(target).__name__}")
    return turns


def blobs_of(turns: SessionStore) -> ArtifactStore | None:
    """Where large checkpoint state goes: the turn store's blob store (a ``Store``'s is its CAS), or
    None (state stays inline) for a turn store without one."""
    return turns if isinstance(turns, ArtifactStore) else None


async def find_run(turns: SessionStore, run_id: str) -> ContextInfo:
    """The context of run ``run_id``; ``ContextNotFound`` naming the run if there is none."""
    info = await turns.find_context(run_context_name(run_id))
    if info is None:
        raise ContextNotFound(f"no pipeline run {run_id!r} (no context named {run_context_name(run_id)!r})")
    return info
