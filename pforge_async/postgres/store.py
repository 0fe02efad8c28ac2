"""``connect_pg``: the whole store in one PostgreSQL schema, with the same API as the embedded store.

A :class:`PgStore` is a :class:`~pforge_async.store.Store` (``isinstance`` holds, so the agent
recorder and the framework adapters take it unchanged) whose parts run on PostgreSQL: ``cas``
(:class:`.cas.PgCas`), ``turns`` (:class:`.turns.PgTurnStore`), and the ledgers ``memory``,
``nonces`` and ``budget`` (the SQLite store's facades on :mod:`.ledgers`' actors). Each part has its
actor, one per process, and its tables in the store's schema (``schema=``, default ``pforge``), so
several stores share a database without seeing each other. Opening creates or migrates the schema
under an advisory lock (:mod:`.migrate`): any number of processes may open one store at once.

The runner task, closing from any task and ``async with`` are the embedded store's.
"""

from __future__ import annotations

import time
import urllib.parse
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg

from ..clock import now_ms
from ..errors import InvalidInput, NotFound, PforgeError
from ..lifecycle import RESERVATION_GRACE_S, GcReport, _count, validate_gc
from ..manifest import PARTS, RootKind, RootPlan
from ..store import Durability, Store, StoreCheck
from ..turnstore.rules import DEFAULT_MAX_PAYLOAD
from .actor import PgActor, safe_dsn, translate
from .cas import PgCas, PgCasActor
from .ledgers import (
    PgBudgetActor,
    PgConstellationActor,
    PgNonceActor,
    budget_ledger,
    constellation_memory,
    nonce_ledger,
)
from .migrate import VERSIONS_TABLE, check_schema_name, quote_ident
from .turns import PgTurnActor, PgTurnStore

__all__ = ["PgStore", "connect_pg", "is_pg_dsn"]

_SCHEMES = ("postgresql://", "postgres://")
#: options :func:`connect_pg` hands every actor (see :class:`.actor.PgActor`).
_ACTOR_OPTIONS = ("read_pool_size", "connect_timeout", "reconnect_wait", "connect_kwargs", "mailbox_size", "max_batch")
#: the tables gc deletes from besides the turn store's (which vacuums its own): vacuumed afterwards so
#: the space is reused (PostgreSQL's plain VACUUM gives back only trailing empty pages to the OS).
_VACUUMED = ("cas_objects", "cas_chunks", "nonces", "reservations", "reservation_tags")
#: every table of the schema: heap, TOAST and indexes (``pg_total_relation_size``).
_SCHEMA_BYTES = (
    "SELECT COALESCE(sum(pg_total_relation_size(c.oid)), 0)::int8 FROM pg_class c "
    "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relkind = 'r'"
)


def is_pg_dsn(root: object) -> bool:
    """Whether ``root`` names a PostgreSQL server (a ``postgresql://`` or ``postgres://`` URL)."""
    return isinstance(root, str) and root.startswith(_SCHEMES)


class PgStore(Store):
    """The store on PostgreSQL. ``dsn`` (without its password) and ``schema`` say where it lives;
    ``root`` is a label naming them, not a directory."""

    cas: PgCas  # type: ignore[assignment]  # the same API as Cas, on other storage
    turns: PgTurnStore  # type: ignore[assignment]  # the same API as SqliteTurnStore (TurnStoreBase)

    def __init__(
        self,
        dsn: str,
        schema: str,
        durability: Durability,
        *,
        max_payload_bytes: int,
        readonly: bool,
        actor_options: dict[str, Any],
        cache_dir: Path | None,
        freshen_s: float = 60.0,
    ) -> None:
        label = safe_dsn(dsn)
        super().__init__(
            Path(f"{label}#{schema}"),
            durability,
            RootPlan(RootKind.STORE, list(PARTS)),
            watch_workspaces=False,
            max_payload_bytes=max_payload_bytes,
            readonly=readonly,
        )
        self._dsn = dsn
        self.dsn = label
        self.schema = schema
        self._actor_options = actor_options
        self._cache_dir = cache_dir
        self._freshen_s = freshen_s
        self._pg_actors: list[PgActor[Any]] = []

    def _options(self) -> dict[str, Any]:
        return {
            "schema": self.schema,
            "durability": self.durability,
            "readonly": self.readonly,
            **self._actor_options,
        }

    async def __aenter__(self) -> PgStore:
        return self

    async def _start(self) -> None:
        options = self._options()
        cas_actor = PgCasActor(self._dsn, freshen_s=self._freshen_s, **options)
        await self.start_actor(cas_actor)
        self._pg_actors.append(cas_actor)
        self.cas = PgCas(cas_actor, cache_dir=self._cache_dir)
        turns = PgTurnActor(self._dsn, **options)
        turns.check_refs_in(self._freshen_s)  # the CAS is in the same schema: refs checked in the write
        await self.start_actor(turns)
        self._pg_actors.append(turns)
        self.turns = PgTurnStore(turns, self.cas, max_payload_bytes=self._max_payload_bytes)
        memory = PgConstellationActor(self._dsn, **options)
        nonces = PgNonceActor(self._dsn, **options)
        budget = PgBudgetActor(self._dsn, **options)
        for actor in (memory, nonces, budget):
            await self.start_actor(actor)
            self._pg_actors.append(actor)
        self.memory = constellation_memory(memory)
        self.nonces = nonce_ledger(nonces)
        self.budget = budget_ledger(budget)

    async def _close(self) -> None:
        try:
            await super()._close()
        finally:
            cas = getattr(self, "cas", None)
            if isinstance(cas, PgCas):
                cas.close_cache()

    async def check(self) -> StoreCheck:
        """Every CAS object re-hashed and its links followed (and what ``git fsck --strict`` would
        reject), every turn payload re-hashed and the turn store's invariants, and every invariant of
        every part's tables (action_stats = aggregate of transitions, spend totals = sum of spend, ...)."""
        cas = await self.cas.fsck()
        problems = [f"cas: object {oid} is corrupt" for oid in cas.corrupt]
        problems += [f"cas: object {oid} is referenced but missing" for oid in cas.missing]
        problems += [f"cas: object {invalid} (git fsck --strict rejects it)" for invalid in cas.invalid]
        checks: list[tuple[str, Callable[[], Awaitable[list[str]]]]] = [("turns", self.turns.check)]
        checks += [(actor.part, actor.check) for actor in self._pg_actors]
        for part, part_check in checks:
            try:
                problems += await part_check()
            except PforgeError as exc:  # damage the check itself runs into is a finding too
                problems.append(f"{self.schema}.{part}: {exc}")
        return StoreCheck(problems, cas)

    async def gc(self, *, grace_s: float = 3600.0, dry_run: bool = False) -> GcReport:
        """:meth:`Store.gc` on PostgreSQL, in the same order and with the same report (see
        :mod:`pforge_async.lifecycle`): the turns no live context reaches (in slices, beside writers of
        any process), then the roots every remaining turn names (``fs_root``, ``refs``, and the blobs
        pipeline checkpoints and agent tool outputs name in their payloads), then the CAS objects no
        root, no ref and nothing younger than ``grace_s`` reaches, then expired nonces and
        never-committed reservations (those kept at least a day whatever ``grace_s``: a late
        ``commit`` of a purged one fails), then a plain ``VACUUM`` of the tables it deleted from.

        Bytes are the schema's tables on the server (heap, TOAST, indexes): the server reuses freed
        pages rather than shrinking its files, so ``bytes_freed`` may be small even when much went.
        ``grace_s`` must be at least the CAS's ``freshen_s`` (``connect_pg(freshen_s=...)``, default
        60 s), as :meth:`.cas.PgCas.gc` requires; a read-only store refuses; both ``InvalidInput``,
        before anything is done. Crash-safe at any point: each step leaves the store sound."""
        grace = validate_gc(grace_s, dry_run)
        if self.readonly:
            raise InvalidInput(f"store {self.root} is open read-only: gc needs a writable store")
        if grace < self.cas.freshen_s:
            # Checked here, not only by the CAS: otherwise the turns would go and then the CAS refuse.
            raise InvalidInput(
                f"gc grace_s {grace} is below the CAS's freshen_s {self.cas.freshen_s}: an object looked at "
                "that recently may be about to be named (open the store with a smaller freshen_s)"
            )
        started = time.monotonic()
        before = await self._bytes()
        leave_out: list[int] = []
        if dry_run:
            leave_out = await self.turns.gc_candidates(grace_s=grace)
            turns_report = await self.turns.gc(grace_s=grace, dry_run=True)
        else:
            turns_report = await self.turns.gc(grace_s=grace)
        # Taken before the roots are read: what a writer freshens from now on is kept whatever the grace.
        taken_at = time.time()
        roots = await self.turns.cas_roots(leave_out)
        cas_report = await self.cas.gc(sorted(roots), grace_s=grace, dry_run=dry_run, roots_taken_at=taken_at)
        reservation_grace = max(grace, RESERVATION_GRACE_S)
        compacted = 0
        if dry_run:
            nonces = await _count(
                self.nonces._actor,
                "SELECT COUNT(*) FROM nonces WHERE expires_at_ms <= ?",
                (now_ms() - int(grace * 1000),),
            )
            reservations = await _count(
                self.budget._actor,
                "SELECT COUNT(*) FROM reservations WHERE state != 'committed' AND expires_at_ms <= ?",
                (now_ms() - round(reservation_grace * 1000),),
            )
            freed = turns_report.payload_bytes_reclaimed + cas_report.bytes_freed
            after = max(0, before - freed)
        else:
            nonces = await self.nonces.purge_expired(grace_s=grace)
            reservations = await self.budget.purge_expired(grace_s=reservation_grace)
            vacuumed_from = await self._bytes()
            await self._vacuum()
            after = await self._bytes()
            compacted = max(0, vacuumed_from - after)
            freed = max(0, before - after)
        return GcReport(
            dry_run=dry_run,
            grace_s=grace,
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

    async def _bytes(self) -> int:
        rows = await self._pg_actors[0].fetch(_SCHEMA_BYTES, self.schema)
        return int(rows[0][0])

    async def _vacuum(self) -> None:
        # Outside a transaction (VACUUM refuses one), beside writers; SKIP_LOCKED passes over a table
        # another session holds rather than waiting for it.
        async with self._pg_actors[0].reading() as conn:
            await conn.execute(f"VACUUM (SKIP_LOCKED) {', '.join(_VACUUMED)}")


def _split_schema(dsn: str) -> tuple[str, str | None]:
    """``dsn`` without its ``schema`` query parameter (asyncpg would send it to the server as a
    setting), and that parameter's value."""
    parts = urllib.parse.urlsplit(dsn)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    named = [value for key, value in query if key == "schema"]
    if not named:
        return dsn, None
    if len(named) > 1:
        raise InvalidInput("the dsn names its schema more than once")
    rest = urllib.parse.urlencode([(key, value) for key, value in query if key != "schema"])
    return urllib.parse.urlunsplit(parts._replace(query=rest)), named[0]


async def _schema_exists(dsn: str, schema: str, connect_kwargs: dict[str, Any]) -> bool:
    kwargs = {k: v for k, v in connect_kwargs.items() if k != "server_settings"}
    try:
        conn = await asyncpg.connect(dsn, **kwargs)
    except Exception as exc:
        raise translate(f"store on {safe_dsn(dsn)} (schema {schema})", exc) from exc
    try:
        return bool(
            await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", f"{quote_ident(schema)}.{VERSIONS_TABLE}")
        )
    finally:
        await conn.close(timeout=5)


async def connect_pg(
    dsn: str,
    *,
    schema: str | None = None,
    durability: Durability = "full",
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD,
    create: bool = True,
    readonly: bool = False,
    watch_workspaces: bool = True,
    cache_dir: str | Path | None = None,
    freshen_s: float = 60.0,
    **options: Any,
) -> PgStore:
    """Open the store in ``schema`` of the PostgreSQL database ``dsn`` (``postgresql://user@host/db``):
    ``store = await connect_pg(dsn)`` ... ``await store.aclose()``, or ``async with await
    connect_pg(dsn) as store:``. Its tables are created or migrated if needed (safe from many processes
    at once). The schema is ``schema=``, or the DSN's ``schema`` query parameter (so
    ``open_store("postgresql://host/db?schema=team_a")`` names it too), or ``pforge``.

    ``durability="full"`` waits for the server to flush each commit (the server's own
    ``synchronous_commit``); ``"normal"`` does not (``synchronous_commit=off`` for the store's writes:
    a server crash may lose the last acknowledged commits, never corrupt). ``create=False`` raises
    ``NotFound`` when the schema holds no store; ``readonly=True`` opens an existing store and every
    write raises ``InvalidInput``. ``watch_workspaces`` is accepted for the embedded store's sake and
    has no effect. ``cache_dir``: where snapshot stat caches live (a private temporary directory by
    default). ``freshen_s``: how old a CAS object must be before a write or ``has`` that finds it
    stamps it again (default 60 s; ``gc`` needs ``grace_s`` at least that). Other ``options`` go to
    every part's actor: ``read_pool_size`` (read connections per part, default 4), ``connect_timeout``,
    ``reconnect_wait`` (seconds a write or read waits for a lost server to come back before it fails
    with ``StorageError``, default 10), ``connect_kwargs`` (asyncpg.connect's: ``ssl``, ``password``,
    ...), ``mailbox_size``, ``max_batch``.
    """
    if not is_pg_dsn(dsn):
        raise InvalidInput(f"dsn must be a postgresql:// URL, got {dsn!r:.80}")
    dsn, named = _split_schema(dsn)
    if schema is not None and named is not None and schema != named:
        raise InvalidInput(f"the dsn names schema {named!r} and schema= says {schema!r}: name it once")
    schema = check_schema_name(schema if schema is not None else named if named is not None else "pforge")
    if durability not in ("full", "normal"):
        raise InvalidInput(f"durability must be 'full' or 'normal', got {durability!r}")
    for name, flag in (("create", create), ("readonly", readonly), ("watch_workspaces", watch_workspaces)):
        if not isinstance(flag, bool):
            raise InvalidInput(f"{name} must be True or False, got {flag!r}")
    unknown = sorted(set(options) - set(_ACTOR_OPTIONS))
    if unknown:
        raise InvalidInput(f"connect_pg got unknown options {unknown}; it takes {list(_ACTOR_OPTIONS)}")
    if (not create or readonly) and not await _schema_exists(dsn, schema, dict(options.get("connect_kwargs") or {})):
        raise NotFound(f"no store in schema {schema!r} of {safe_dsn(dsn)}")
    store = PgStore(
        dsn,
        schema,
        durability,
        max_payload_bytes=max_payload_bytes,
        readonly=readonly,
        actor_options=options,
        cache_dir=None if cache_dir is None else Path(cache_dir),
        freshen_s=freshen_s,
    )
    await store._launch()
    return store
