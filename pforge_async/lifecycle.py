"""``Store.gc``: the whole store's garbage collection, part by part, in the order that keeps it safe.

1. *Turns* (``turnstore.gc``): the turns no live context reaches, older than the grace, in slices.
2. *Roots*: the CAS objects every turn still present names (``fs_root``, ``refs``, and the blobs
   pipeline checkpoints and agent tool outputs name inside their payloads, which were written before
   turns could declare refs), gathered after the turn gc so the turns it reclaimed keep nothing.
3. *CAS* (``Cas.gc``): what no root, no ref and nothing younger than the grace reaches. A turn appended
   while the roots are gathered is not among them: the objects it names were freshened (written, or
   checked with ``has``, by its writer) after ``roots_taken_at``, which the CAS keeps whatever the
   grace, or were younger than the grace anyway. So the grace must exceed the longest time a writer
   takes from checking an object to committing the turn that names it (the default hour does).
4. *Ledgers*: nonces and never-committed reservations expired more than the grace ago.
5. *Space*: each SQLite database gives its free pages back (``compact``) and truncates its WAL, so
   deleted and erased bytes are in no file of the store.

Each step is crash-safe on its own and leaves the store sound, so a gc killed anywhere is finished or
redone by the next one.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable, Container, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import msgspec

from .cas.gc import CasGcReport
from .cas.objects import is_oid
from .clock import now_ms
from .errors import IntegrityError, InvalidInput
from .turnstore import gc as turn_gc
from .turnstore.gc import TurnGcReport
from .turnstore.sqlite import SqliteTurnStore

if TYPE_CHECKING:
    from .store import Store

__all__ = [
    "PAYLOAD_OID_TYPES",
    "RESERVATION_GRACE_S",
    "GcReport",
    "add_row_roots",
    "collect_store",
    "payload_oids",
    "store_bytes",
    "turn_roots",
]


class GcReport(msgspec.Struct, frozen=True):
    """What :meth:`Store.gc` reclaimed (with ``dry_run``: would reclaim; nothing was changed).

    ``bytes_*``: every file under the store's root, apparent sizes, before and after (a dry run's
    ``bytes_freed`` is the turn payloads and CAS bytes it would free, and ``bytes_after`` what that
    leaves). ``roots``: the distinct CAS objects live turns name. ``compacted_bytes``: what the
    databases gave back to the file system. ``turns`` and ``cas``: the parts' own reports."""

    dry_run: bool
    grace_s: float
    turns_reclaimed: int
    objects_reclaimed: int
    nonces_purged: int
    reservations_purged: int
    bytes_before: int
    bytes_after: int
    bytes_freed: int
    seconds: float
    roots: int
    compacted_bytes: int
    turns: TurnGcReport
    cas: CasGcReport


def _agent_oids(type_id: str, payload: bytes) -> list[str]:
    from .agent.records import ToolCallEnd, ToolResultsTurn, decode_record

    record = decode_record(type_id, payload)
    if isinstance(record, ToolCallEnd):
        outputs = [record.output]
    elif isinstance(record, ToolResultsTurn):
        outputs = [result.output for result in record.results]
    else:
        outputs = []
    return [output.oid for output in outputs if output.oid is not None]


def _checkpoint_oids(type_id: str, payload: bytes) -> list[str]:
    from .attractor.records import CheckpointEvent, decode_record

    record = decode_record(type_id, payload)
    return [record.state.oid] if isinstance(record, CheckpointEvent) and record.state.oid else []


#: record types whose payloads name CAS objects without declaring them as ``refs``
_PAYLOAD_OIDS: dict[str, Callable[[str, bytes], list[str]]] = {
    "pforge.agent.tool_call_end": _agent_oids,
    "pforge.agent.tool_results_turn": _agent_oids,
    "pforge.attractor.checkpoint": _checkpoint_oids,
}


def payload_oids(type_id: str, payload: bytes) -> list[str]:
    """The CAS objects a payload of ``type_id`` names (a payload that does not decode names none: a
    damaged turn is ``check()``'s finding, and its hash check refuses to return it anyway)."""
    extract = _PAYLOAD_OIDS.get(type_id)
    if extract is None or not payload:
        return []
    try:
        named = extract(type_id, payload)
    except (msgspec.DecodeError, KeyError, ValueError, RecursionError):
        # RecursionError: a payload nested deeper than msgspec recurses (any writer can append one)
        # is no record either; raised, it would stop every gc and check of the store
        return []
    # Any writer can append such a record: a string in it that is not an object id names nothing
    # (kept, it would make every gc refuse its roots). The payload stays as written.
    return [oid for oid in named if is_oid(oid)]


_PAGE = 5000

#: the record types whose payloads name objects (a backend selects their payloads to pass to
#: :func:`add_row_roots`)
PAYLOAD_OID_TYPES: tuple[str, ...] = tuple(sorted(_PAYLOAD_OIDS))


def add_row_roots(roots: set[str], rows: Iterable[Sequence[Any]], skip: Container[int] = ()) -> None:
    """Add to ``roots`` what each ``(turn_id, fs_root, refs, type_id, payload or None)`` row names,
    but the rows of turns in ``skip``: the one reading of a turn's roots, whatever backend read it."""
    for turn_id, fs_root, refs, type_id, payload in rows:
        if turn_id in skip:
            continue
        if fs_root:
            roots.add(fs_root)
        if refs:
            roots.update(refs.split(" "))
        if payload is not None:
            roots.update(payload_oids(type_id, bytes(payload)))


#: a purged reservation is unknown to a late ``commit`` (a spend is never refused: committed after its
#: reservation expired it is recorded as late), so gc keeps expired ones at least a day, whatever its grace.
RESERVATION_GRACE_S = 86400.0


def turn_roots(
    path: Path, leave_out: Iterable[int] = (), *, connect: Callable[[], sqlite3.Connection] | None = None
) -> set[str]:
    """Every CAS object a turn of ``turns.db`` names, but those of the turns ``leave_out`` (a dry run's
    turns that would go). Blocking: run it in a worker thread. Pages down the primary key, each its
    own statement, so no read transaction pins the WAL for the whole walk. ``connect``: how to open
    the database (a read-only store's check opens it as its reader does)."""
    skip = set(leave_out)
    types = PAYLOAD_OID_TYPES
    marks = ",".join("?" * len(types))
    sql = (
        f"SELECT turn_id, fs_root, refs, type_id, CASE WHEN type_id IN ({marks}) THEN payload END FROM turns "
        f"WHERE turn_id > ? AND (fs_root IS NOT NULL OR refs IS NOT NULL OR type_id IN ({marks})) "
        f"ORDER BY turn_id LIMIT {_PAGE}"
    )
    roots: set[str] = set()
    if connect is None:
        conn = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, isolation_level=None, timeout=10)
    else:
        conn = connect()
    try:
        after = 0
        while rows := conn.execute(sql, (*types, after, *types)).fetchall():
            add_row_roots(roots, rows, skip)
            after = rows[-1][0]
    finally:
        conn.close()
    return roots


def store_bytes(root: Path) -> int:
    """Apparent bytes of every file under ``root`` (a file gone meanwhile counts nothing)."""
    total = 0
    for directory, _, names in os.walk(root):
        for name in names:
            try:
                total += os.lstat(os.path.join(directory, name)).st_size
            except OSError:
                pass
    return total


async def _count(actor: Any, sql: str, params: tuple[Any, ...]) -> int:
    row = await actor.fetchone(sql, params)
    return int(row[0]) if row else 0


async def collect_store(store: Store, *, grace_s: float, dry_run: bool) -> GcReport:
    """:meth:`Store.gc` on the embedded (SQLite and files) store; arguments are checked by the caller."""
    if store._damaged:
        parts = ", ".join(sorted(store._damaged))
        raise IntegrityError(
            f"store {store.root}: gc refuses a store with a part it cannot open ({parts}): what that part "
            "names cannot be known, so gc could reclaim what it still needs"
        )
    if not isinstance(store.turns, SqliteTurnStore):  # another backend's store brings its own gc
        raise InvalidInput(f"{type(store).__name__} does not implement gc")
    started = time.monotonic()
    root = store.root
    before = await anyio.to_thread.run_sync(store_bytes, root)
    turns = store.turns
    leave_out: list[int] = []
    if dry_run:
        cutoff = now_ms() - int(grace_s * 1000)
        candidates, _ = await anyio.to_thread.run_sync(turn_gc.mark, turns.path, cutoff)
        leave_out = [row[0] for row in candidates]
        turns_report = TurnGcReport(
            turns_reclaimed=len(candidates),
            payload_bytes_reclaimed=sum(row[2] for row in candidates),
            contexts_reclaimed=0,
            slices=0,
            wal_truncated=False,
            bytes_before=turn_gc.files_size(turns.path),
            bytes_after=turn_gc.files_size(turns.path),
            seconds=time.monotonic() - started,
        )
    else:
        turns_report = await turn_gc.collect(turns, grace_s=grace_s)
    taken_at = time.time()
    roots = await anyio.to_thread.run_sync(turn_roots, turns.path, leave_out)
    cas_report = await store.cas.gc(sorted(roots), grace_s=grace_s, dry_run=dry_run, roots_taken_at=taken_at)
    if dry_run:
        cutoff = now_ms() - int(grace_s * 1000)
        nonces = await _count(store.nonces._actor, "SELECT COUNT(*) FROM nonces WHERE expires_at_ms <= ?", (cutoff,))
        reservations = await _count(
            store.budget._actor,
            "SELECT COUNT(*) FROM reservations WHERE state != 'committed' AND expires_at_ms <= ?",
            (now_ms() - int(max(grace_s, RESERVATION_GRACE_S) * 1000),),
        )
        compacted = 0
        freed = turns_report.payload_bytes_reclaimed + cas_report.bytes_freed
        after = max(0, before - freed)
    else:
        nonces = await store.nonces.purge_expired(grace_s=grace_s)
        reservations = await store.budget.purge_expired(grace_s=max(grace_s, RESERVATION_GRACE_S))
        compacted = 0
        for actor in (turns._actor, *store._ledgers):
            compacted += await actor.compact()
        after = await anyio.to_thread.run_sync(store_bytes, root)
        freed = max(0, before - after)
    return GcReport(
        dry_run=dry_run,
        grace_s=grace_s,
        turns_reclaimed=turns_report.turns_reclaimed,
        objects_reclaimed=cas_report.objects_reclaimed,
        nonces_purged=nonces,
        reservations_purged=reservations,
        bytes_before=before,
        bytes_after=after,
        bytes_freed=freed,
        seconds=time.monotonic() - started,
        roots=len(roots),
        compacted_bytes=compacted,
        turns=turns_report,
        cas=cas_report,
    )


def validate_gc(grace_s: object, dry_run: object) -> float:
    grace = turn_gc.validate_grace(grace_s)
    if not isinstance(dry_run, bool):
        raise InvalidInput(f"dry_run must be True or False, got {dry_run!r}")
    return grace
