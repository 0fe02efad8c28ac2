"""Garbage collection of ``turns.db``: the turns no live context reaches, and the rows of deleted contexts.

Mark, then sweep in slices, beside live writers in this and other processes:

- *Mark* runs on the reader, in pages: every turn's parent, the live contexts' heads and bases, and the
  turns younger than the grace period (another process may be about to name them, as git's prune
  grace). What those roots reach through parents is kept; the rest are candidates.
- *Sweep* deletes the candidates in slices of at most :data:`SLICE` turns, highest ids first, each slice
  one command of the turns actor: one short transaction under the writers' lock, so writers wait at
  most a slice. Since a child's id is always above its parent's, children go before their parents,
  and a gc killed between slices leaves no turn without its parent. Inside its transaction a slice
  re-checks what may have changed since the mark: a candidate that is now a live context's head or
  base, or that has a child made since the mark (an append to it), is kept, and so, transitively, are
  its ancestors in the slice; the ancestors of what a slice keeps are taken out of later slices (from
  the mark's parents). The highest turn id is never deleted, so
  ids are never given twice (the next id is the highest plus one).
- With ``drop_deleted_rows``, deleted contexts' rows go once no turn names them, no context names
  them as parent, they were deleted before the grace period, and they do not hold the highest
  context id. (Off by default: SQLite checks each deleted row against every turn, ``turns.context_id``
  being a foreign key without an index.)
- The grace period: what was created (or deleted) in the last ``grace_s`` seconds is left alone;
  ``grace_s=0`` leaves only what is younger than the gc itself.

The writer runs with ``PRAGMA secure_delete`` during a sweep, so a deleted row's bytes are zeroed in
the file; at the end the WAL is checkpointed and truncated (``wal_checkpoint(TRUNCATE)``, retried while
readers hold it), so erased and deleted payloads are left in no file of the turn store. Free pages stay
in ``turns.db`` for later writes (no VACUUM: it would hold the lock for the whole file).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path

import msgspec

__all__ = [
    "SLICE",
    "CollectContexts",
    "CollectTurns",
    "TurnGcReport",
    "collect_contexts",
    "collect_turns",
    "files_size",
    "truncate_wal",
    "unreachable",
]

#: turns deleted per slice (one transaction of the turns actor)
SLICE = 256


class TurnGcReport(msgspec.Struct, frozen=True):
    """What ``SqliteTurnStore.gc`` reclaimed: turns and their payload bytes, deleted contexts' rows,
    how many slices (write transactions) that took, whether the WAL was truncated (False: a reader held
    it throughout; the next gc tries again), and ``turns.db`` + WAL bytes on disk before and after."""

    turns_reclaimed: int
    payload_bytes_reclaimed: int
    contexts_reclaimed: int
    slices: int
    wal_truncated: bool
    bytes_before: int
    bytes_after: int
    seconds: float


class CollectTurns(msgspec.Struct, frozen=True, tag="collect_turns"):
    """Delete ``turn_ids`` (one slice, highest first), but for those the re-check keeps. ``marked_top``:
    the highest turn id when the mark read the turns (a child made since has a higher id). The reply
    is ``(ids deleted, payload bytes deleted, ids kept)``."""

    turn_ids: list[int]
    cutoff_ms: int
    marked_top: int


class CollectContexts(msgspec.Struct, frozen=True, tag="collect_contexts"):
    """Delete the rows of ``context_ids`` (deleted contexts the mark saw no surviving turn name) that
    were deleted at or before ``cutoff_ms``, name no turn above ``marked_top`` and no context as parent.
    (A context deleted before the gc began gets no turn after the mark: appends need a live context.)
    The reply is how many."""

    context_ids: list[int]
    cutoff_ms: int
    marked_top: int


def unreachable(
    rows: Iterable[tuple[int, int, int, int]], roots: Iterable[int], cutoff_ms: int
) -> tuple[list[int], dict[int, int]]:
    """The turns (``rows``: turn id, parent, created_at_ms, context) that neither a root nor a turn
    created after ``cutoff_ms`` reaches through parents, highest id first (never the highest of all);
    and the parent of every turn."""
    parent: dict[int, int] = {}
    stack: list[int] = [root for root in roots if root]
    top = 0
    for turn_id, parent_id, created, _ in rows:
        parent[turn_id] = parent_id
        top = max(top, turn_id)
        if created > cutoff_ms:
            stack.append(turn_id)
    stack.append(top)
    kept: set[int] = set()
    while stack:
        turn_id = stack.pop()
        while turn_id and turn_id not in kept and turn_id in parent:
            kept.add(turn_id)
            turn_id = parent[turn_id]
    return sorted((t for t in parent if t not in kept), reverse=True), parent


def _marks(ids: list[int]) -> str:
    return ",".join("?" * len(ids))


def collect_turns(conn: sqlite3.Connection, command: CollectTurns) -> tuple[list[int], int, list[int]]:
    """The sweep of one slice, inside the actor's transaction (see the module docstring). A child the
    mark saw is a candidate of this or an earlier slice, or was kept by an earlier one (whose
    ancestors the caller takes out of later slices): so only children made since the mark, above
    ``marked_top``, are looked for here, down the primary key rather than across the table."""
    conn.execute("PRAGMA secure_delete = ON")
    doomed = set(command.turn_ids)
    top = conn.execute("SELECT MAX(turn_id) FROM turns").fetchone()[0]
    doomed.discard(top)
    asked = set(doomed)
    if not doomed:
        return [], 0, []
    ids = sorted(doomed)
    marks = _marks(ids)
    parent: dict[int, int] = {}
    keep: set[int] = set()
    for turn_id, parent_id, created in conn.execute(
        f"SELECT turn_id, parent_turn_id, created_at_ms FROM turns WHERE turn_id IN ({marks})", ids
    ):
        parent[turn_id] = parent_id
        if created > command.cutoff_ms:
            keep.add(turn_id)
    doomed &= parent.keys()  # gone already (a gc before this one)
    for column in ("head_turn_id", "base_turn_id"):
        keep.update(
            row[0]
            for row in conn.execute(
                f"SELECT {column} FROM contexts WHERE {column} IN ({marks}) AND deleted_at_ms IS NULL", ids
            )
        )
    keep.update(
        row[0]
        for row in conn.execute(
            f"SELECT parent_turn_id FROM turns WHERE turn_id > ? AND parent_turn_id IN ({marks})",
            (command.marked_top, *ids),
        )
    )
    for turn_id in keep:  # what a kept turn stands on is kept too
        while turn_id in doomed:
            doomed.discard(turn_id)
            turn_id = parent[turn_id]
    kept = sorted((asked & parent.keys()) - doomed)
    if not doomed:
        return [], 0, kept
    ids = sorted(doomed)
    marks = _marks(ids)
    size = conn.execute(f"SELECT COALESCE(SUM(length(payload)), 0) FROM turns WHERE turn_id IN ({marks})", ids)
    payload_bytes = int(size.fetchone()[0])
    conn.execute(f"DELETE FROM turns WHERE turn_id IN ({marks})", ids)
    return ids, payload_bytes, kept


def collect_contexts(conn: sqlite3.Connection, command: CollectContexts) -> int:
    conn.execute("PRAGMA secure_delete = ON")
    # Turns made since the mark, in one pass down the primary key.
    named = {
        row[0] for row in conn.execute("SELECT DISTINCT context_id FROM turns WHERE turn_id > ?", (command.marked_top,))
    }
    ids = [context_id for context_id in command.context_ids if context_id not in named]
    deleted = 0
    for i in range(0, len(ids), SLICE):
        chunk = ids[i : i + SLICE]
        cursor = conn.execute(
            f"DELETE FROM contexts WHERE context_id IN ({_marks(chunk)}) AND deleted_at_ms IS NOT NULL "
            "AND deleted_at_ms <= ? AND context_id < (SELECT MAX(context_id) FROM contexts) "
            "AND NOT EXISTS (SELECT 1 FROM contexts c WHERE c.parent_context_id = contexts.context_id "
            "AND c.parent_context_id != 0)",
            (*chunk, command.cutoff_ms),
        )
        deleted += cursor.rowcount
    return deleted


def truncate_wal(path: Path, *, attempts: int = 20, wait_s: float = 0.05) -> bool:
    """Checkpoint the whole WAL into ``path`` and truncate it to nothing; False if readers kept it busy
    through every attempt. A TRUNCATE checkpoint holds the writers' lock while it waits for readers, so
    each attempt waits at most 50 ms (writers wait no longer), and writers run between attempts."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=0.05)
    try:
        for _ in range(attempts):
            try:
                busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
            except sqlite3.OperationalError:
                busy = 1  # the writers' lock was not free within the attempt's wait
            if not busy:
                return True
            time.sleep(wait_s)
        return False
    finally:
        conn.close()


def files_size(path: Path) -> int:
    total = 0
    for suffix in ("", "-wal"):
        try:
            total += Path(str(path) + suffix).stat().st_size
        except FileNotFoundError:
            pass
    return total
