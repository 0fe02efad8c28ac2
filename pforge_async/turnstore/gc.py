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

:func:`collect` is the driver (``SqliteTurnStore.gc`` and ``Store.gc`` run it). Beside live writers it
keeps its own cost off theirs: the mark is one recursive query on a connection of its own in a worker
thread (SQLite walks the parents in C, with the GIL released, instead of Python holding it for a walk
over every turn), and the sweep sizes its slices to a time budget (:data:`SLICE_TARGET_S`: halved
when a slice overran it, doubled up to :data:`SLICE` when well under) and rests as long as each slice
took before sending the next, so the writers' own batches always get the actor in between.

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
from typing import TYPE_CHECKING

import anyio
import msgspec

from ..clock import now_ms
from ..errors import InvalidInput

if TYPE_CHECKING:
    from .sqlite import SqliteTurnStore

__all__ = [
    "SLICE",
    "SLICE_TARGET_S",
    "collect",
    "mark",
    "validate_grace",
    "CollectContexts",
    "CollectTurns",
    "TurnGcReport",
    "collect_contexts",
    "collect_turns",
    "files_size",
    "truncate_wal",
    "unreachable",
]

#: at most this many turns per slice (one transaction of the turns actor)
SLICE = 256
#: the sweep's first slice, and the least it shrinks to
SLICE_MIN = 32
#: what one slice may take, from sending it to its reply: writers queued behind it wait that long
SLICE_TARGET_S = 0.008


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
        # Most of the WAL first, beside the writers (a passive checkpoint takes no writers' lock), so
        # the truncating one, which holds that lock, has only the last frames left to copy.
        try:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.OperationalError:
            pass  # another checkpoint is running: the truncating one waits for it below
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


def validate_grace(grace_s: object) -> float:
    if isinstance(grace_s, bool) or not isinstance(grace_s, (int, float)) or not 0 <= grace_s < 10**9:
        raise InvalidInput(f"grace_s must be a number of seconds from 0, got {grace_s!r}")
    return float(grace_s)


#: Every turn no live context's head or base, no turn younger than the cutoff and not the highest
#: turn reaches through parents: (turn id, parent, payload bytes), highest id first. One statement,
#: so one snapshot of roots and turns alike.
_MARK = """
WITH RECURSIVE
  roots(id) AS (
    SELECT head_turn_id FROM contexts WHERE deleted_at_ms IS NULL AND head_turn_id != 0
    UNION SELECT base_turn_id FROM contexts WHERE deleted_at_ms IS NULL AND base_turn_id != 0
    UNION SELECT turn_id FROM turns WHERE created_at_ms > :cutoff
    UNION SELECT MAX(turn_id) FROM turns
  ),
  live(id) AS (
    SELECT id FROM roots WHERE id IS NOT NULL
    UNION SELECT t.parent_turn_id FROM turns t JOIN live ON t.turn_id = live.id WHERE t.parent_turn_id != 0
  )
SELECT turn_id, parent_turn_id, length(payload) FROM turns
WHERE turn_id NOT IN (SELECT id FROM live) ORDER BY turn_id DESC
"""


def mark(path: Path, cutoff_ms: int) -> tuple[list[tuple[int, int, int]], int]:
    """The candidates (:data:`_MARK`) and the highest turn id, read in one read transaction on a
    connection of its own (blocking: run it in a worker thread)."""
    conn = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, isolation_level=None, timeout=10)
    try:
        conn.execute("BEGIN")
        top = conn.execute("SELECT COALESCE(MAX(turn_id), 0) FROM turns").fetchone()[0]
        rows = [(row[0], row[1], row[2]) for row in conn.execute(_MARK, {"cutoff": cutoff_ms})]
        conn.execute("COMMIT")
        return rows, int(top)
    finally:
        conn.close()


async def collect(
    turns: SqliteTurnStore, *, grace_s: float, drop_deleted_rows: bool = False, dry_run: bool = False
) -> TurnGcReport:
    """Reclaim the turns of ``turns.db`` no live context reaches (see the module docstring); with
    ``dry_run``, only say what would go. Arguments are checked by the caller."""
    actor = turns._actor
    started = time.monotonic()
    before = files_size(turns.path)
    cutoff = now_ms() - int(grace_s * 1000)
    candidates, marked_top = await anyio.to_thread.run_sync(mark, turns.path, cutoff)
    if dry_run:
        return TurnGcReport(
            turns_reclaimed=len(candidates),
            payload_bytes_reclaimed=sum(size for _, _, size in candidates),
            contexts_reclaimed=0,
            slices=0,
            wal_truncated=False,
            bytes_before=before,
            bytes_after=before,
            seconds=time.monotonic() - started,
        )
    parents = {turn_id: parent for turn_id, parent, _ in candidates}
    reclaimed = payload = slices = 0
    kept: set[int] = set()

    def keep(turn_ids: Iterable[int]) -> None:
        for turn_id in turn_ids:  # made live again: so are its ancestors, in later slices
            while turn_id in parents and turn_id not in kept:
                kept.add(turn_id)
                turn_id = parents[turn_id]

    # The turns appended since the mark are read here, each once, as the sweep goes: a slice then
    # looks only at those made since this read (above ``seen_top``) for children of its candidates.
    # Left to the slices, each would read every turn made since the mark, under the writers' lock:
    # a cost that grows as long as writers keep appending during the gc.
    newer = _Newer(turns.path, marked_top)
    try:
        size = SLICE_MIN
        i = 0
        while i < len(candidates):
            keep(parent for parent in await anyio.to_thread.run_sync(newer.parents) if parent in parents)
            chunk = [row[0] for row in candidates[i : i + size] if row[0] not in kept]
            i += size
            if not chunk:
                continue
            sent = time.monotonic()
            deleted, freed, kept_now = await actor.call(CollectTurns(chunk, cutoff, newer.seen_top))
            took = time.monotonic() - sent
            reclaimed += len(deleted)
            payload += freed
            slices += 1
            keep(kept_now)
            if took > SLICE_TARGET_S:
                size = max(SLICE_MIN, size // 2)
            elif took < SLICE_TARGET_S / 2:
                size = min(SLICE, size * 2)
            # Rest as long as the slice took: the writers' batches waiting behind it run before the next.
            await anyio.sleep(min(took, 0.05))
    finally:
        newer.close()
    contexts = 0
    if drop_deleted_rows:
        contexts = await _collect_contexts(turns, cutoff, marked_top)
        slices += 1
    truncated = await anyio.to_thread.run_sync(truncate_wal, turns.path)
    return TurnGcReport(
        turns_reclaimed=reclaimed,
        payload_bytes_reclaimed=payload,
        contexts_reclaimed=contexts,
        slices=slices,
        wal_truncated=truncated,
        bytes_before=before,
        bytes_after=files_size(turns.path),
        seconds=time.monotonic() - started,
    )


class _Newer:
    """Reads the turns appended since the mark, in id order, a batch at a time (blocking calls)."""

    def __init__(self, path: Path, marked_top: int) -> None:
        self._path = path
        self._conn: sqlite3.Connection | None = None
        #: every turn up to this id has been read (ids are given in commit order, under the lock)
        self.seen_top = marked_top

    def parents(self) -> list[int]:
        """The parents of the turns appended since the last call."""
        if self._conn is None:
            uri = f"{self._path.as_uri()}?mode=ro"
            self._conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=10, check_same_thread=False)
        rows = self._conn.execute(
            "SELECT turn_id, parent_turn_id FROM turns WHERE turn_id > ? ORDER BY turn_id", (self.seen_top,)
        ).fetchall()
        if rows:
            self.seen_top = rows[-1][0]
        return [row[1] for row in rows]

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


async def _collect_contexts(turns: SqliteTurnStore, cutoff: int, marked_top: int) -> int:
    """Drop the rows of contexts deleted before ``cutoff`` that no turn names any more."""
    actor = turns._actor
    # Read after the sweep: a turn made since names its (live) context, never a deleted one, and
    # the command re-checks turns above marked_top anyway.
    named = {row[0] for row in await actor.fetchall("SELECT DISTINCT context_id FROM turns")}
    deleted = await actor.fetchall(
        "SELECT context_id FROM contexts WHERE deleted_at_ms IS NOT NULL AND deleted_at_ms <= ?", (cutoff,)
    )
    bare = [row[0] for row in deleted if row[0] not in named]
    count: int = await actor.call(CollectContexts(bare, cutoff, marked_top))
    return count
