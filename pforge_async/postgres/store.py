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

import urllib.parse
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg

from ..errors import InvalidInput, NotFound, PforgeError
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
        cas_actor = PgCasActor(self._dsn, **options)
        await self.start_actor(cas_actor)
        self._pg_actors.append(cas_actor)
        self.cas = PgCas(cas_actor, cache_dir=self._cache_dir)
        turns = PgTurnActor(self._dsn, **options)
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
    default). Other ``options`` go to every part's actor: ``read_pool_size`` (read connections per
    part, default 4), ``connect_timeout``, ``reconnect_wait`` (seconds a write or read waits for a lost
    server to come back before it fails with ``StorageError``, default 10), ``connect_kwargs``
    (asyncpg.connect's: ``ssl``, ``password``, ...), ``mailbox_size``, ``max_batch``.
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
    )
    await store._launch()
    return store
