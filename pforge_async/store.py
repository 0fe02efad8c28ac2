"""``connect`` and ``open_store``: the embedded store, its on-disk layout, and the task its actors run in.

The store's actors run in a task group owned by a runner task of the store's own, spawned on the event
loop when the store opens. Closing the store signals that task and waits for it, so any task may close
a store another task opened (a test fixture's setup and teardown, a web framework's lifespan, a store
created lazily on first use), and cancelling the task that opened it does not kill the actors under
the callers using it.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, get_args

import anyio
import msgspec
from anyio.abc import TaskGroup

from .actor import Actor
from .cas.actor import CasActor
from .cas.objects import is_oid
from .cas.store import Cas, FsckReport
from .cas.watch import Watcher, open_watcher
from .errors import ActorClosed, IntegrityError, InvalidInput, LockTimeout, StorageError
from .fslock import FsLock
from .ledgers.budget import BudgetActor, BudgetLedger
from .ledgers.constellation import ConstellationActor, ConstellationMemory
from .ledgers.nonces import NonceActor, NonceLedger
from .lifecycle import GcReport, collect_store, turn_roots, validate_gc
from .manifest import PARTS, RootKind, RootPlan, create_root, plan_root, quarantined, write_manifest
from .turnstore.rules import DEFAULT_MAX_PAYLOAD, validate_limit
from .turnstore.sqlite import SqliteTurnStore, TurnActor

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup  # type: ignore[import-not-found]

__all__ = ["Durability", "GcReport", "Store", "StoreCheck", "connect", "open_store"]

Durability = Literal["full", "normal"]
DEFAULT_ROOT = ".pforge"
#: How long opening a store that another process is creating waits for that process
#: (``locks/create.lock``), in seconds. A creation takes seconds; a creator that was stopped
#: (SIGSTOP, a debugger) or hangs under the lock must not hold every other opener forever.
CREATE_LOCK_TIMEOUT = 120.0


class StoreCheck(msgspec.Struct, frozen=True):
    """What :meth:`Store.check` found; ``problems`` is empty when the store is sound."""

    problems: list[str]
    cas: FsckReport

    @property
    def ok(self) -> bool:
        return not self.problems


class Store:
    """What ``connect`` returns and ``open_store`` yields. Its actors run until :meth:`aclose`.

    ``async with store:`` closes it at the end of the block. Every call after the store closed raises
    ``ActorClosed``, reads included.
    """

    cas: Cas
    turns: SqliteTurnStore
    memory: ConstellationMemory
    nonces: NonceLedger
    budget: BudgetLedger

    def __init__(
        self,
        root: Path,
        durability: Durability,
        plan: RootPlan,
        *,
        watch_workspaces: bool,
        max_payload_bytes: int,
        readonly: bool,
    ) -> None:
        self.root = root
        self.durability: Durability = durability
        #: opened for inspection: nothing on disk is created or changed; every write raises InvalidInput.
        self.readonly = readonly
        self._plan = plan
        self._actors: list[Actor[Any]] = []
        self._ledgers: tuple[Any, ...] = ()
        self._watch_workspaces = watch_workspaces and not readonly
        self._watcher: Watcher | None = None
        self._max_payload_bytes = max_payload_bytes
        self._task_group: TaskGroup | None = None
        self._cas_actor: CasActor | None = None
        self._runner: asyncio.Task[None] | None = None
        self._close_requested = anyio.Event()
        self._close_error: BaseException | None = None
        #: parts whose file is too damaged to open: file -> the IntegrityError that said so.
        self._damaged: dict[str, IntegrityError] = {}

    # -- opening -----------------------------------------------------------------------------------

    async def _launch(self) -> None:
        """Spawn the runner task and wait until every actor has started (or one failed to)."""
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        self._runner = loop.create_task(self._run(ready), name=f"pforge store {self.root}")
        try:
            await asyncio.shield(ready)
        except BaseException:
            # Startup failed (the runner has closed what it opened), or the opener was cancelled:
            # either way nobody will hold this store, so it closes before the error goes on.
            self._close_requested.set()
            with anyio.CancelScope(shield=True):
                await asyncio.wait([self._runner])
            self._close_error = None
            raise

    async def _run(self, ready: asyncio.Future[None]) -> None:
        """The runner task: owns the task group the actors run in, from open to close."""
        try:
            async with anyio.create_task_group() as tg:
                self._task_group = tg
                try:
                    await self._start()
                    if not ready.done():
                        ready.set_result(None)
                    await self._close_requested.wait()
                finally:
                    with anyio.CancelScope(shield=True):
                        await self._close()
        except BaseException as exc:
            error = _single(exc)
            if not ready.done():
                if isinstance(error, Exception):
                    ready.set_exception(error)
                else:
                    ready.cancel()
            elif isinstance(error, Exception):
                self._close_error = error
            if not isinstance(error, Exception):
                raise  # cancelled (the event loop is shutting down): the task ends cancelled
        finally:
            self._task_group = None

    async def _start(self) -> None:
        fsync = self.durability == "full"
        readonly = self.readonly
        if self._watch_workspaces:
            self._watcher = open_watcher()
        cas_actor = CasActor(
            self.root / "cas", self._lock("cas-refs"), fsync=fsync, watcher=self._watcher, readonly=readonly
        )
        await self.start_actor(cas_actor)
        self._cas_actor = cas_actor
        self.cas = Cas(cas_actor, self.root / "cache", self.root)
        sqlite: dict[str, Any] = {"durability": self.durability, "readonly": readonly}
        turns = TurnActor(self._db("turns"), self._lock("turns"), **sqlite)
        if await self._start_part("turns.db", turns):
            self.turns = SqliteTurnStore(turns, self.cas, max_payload_bytes=self._max_payload_bytes)
        else:
            self.turns = _damaged_part(self, "turns.db")
        memory = ConstellationActor(self._db("memory"), self._lock("memory"), **sqlite)
        nonces = NonceActor(self._db("nonces"), self._lock("nonces"), **sqlite)
        budget = BudgetActor(self._db("budget"), self._lock("budget"), **sqlite)
        started = [await self._start_part(ledger.path.name, ledger) for ledger in (memory, nonces, budget)]
        self._ledgers = tuple(ledger for ledger, ok in zip((memory, nonces, budget), started, strict=True) if ok)
        self.memory = ConstellationMemory(memory) if memory in self._ledgers else _damaged_part(self, "memory.db")
        self.nonces = NonceLedger(nonces) if nonces in self._ledgers else _damaged_part(self, "nonces.db")
        self.budget = BudgetLedger(budget) if budget in self._ledgers else _damaged_part(self, "budget.db")
        if not readonly and self._plan.needs_manifest:
            # Every part exists now: record them, so none of them can later vanish unnoticed.
            plan = self._plan
            await anyio.to_thread.run_sync(
                lambda: write_manifest(self.root, list(PARTS), fsync=fsync, damaged=plan.damaged_manifest is not None)
            )

    async def _start_part(self, file: str, actor: Actor[Any]) -> bool:
        """Start one database's actor. A database too damaged to open stays closed and stands in
        for itself (see :class:`_DamagedPart`): the rest of the store serves beside it."""
        try:
            await self.start_actor(actor)
        except IntegrityError as exc:
            self._damaged[file] = exc
            return False
        return True

    async def start_actor(self, actor: Actor[Any]) -> None:
        """Run ``actor`` in the store's task group; it is drained and closed when the store closes."""
        if not isinstance(actor, Actor):
            raise InvalidInput(f"start_actor takes an Actor, not {type(actor).__name__}")
        if self._task_group is None or self._close_requested.is_set():
            raise ActorClosed(f"store {self.root} is closed")
        await self._task_group.start(actor.run)
        self._actors.append(actor)

    # -- closing -----------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether the store has closed (its actors are stopped)."""
        return self._runner is None or self._runner.done()

    async def aclose(self) -> None:
        """Close the store: every call queued before this runs, then the actors stop. Any task may call
        it, any number of times; a caller cancelled meanwhile stops waiting, the close goes on."""
        runner = self._runner
        if runner is not None and not runner.done() and runner.get_loop() is not asyncio.get_running_loop():
            await self._aclose_on(runner.get_loop())
            return
        self._close_requested.set()
        if runner is None:
            return
        if not runner.done():
            await asyncio.shield(runner)
        # A runner already done was either closed (its error, if any, is kept below) or cancelled
        # by its event loop's end, which closed the actors too: awaiting it would raise that old
        # cancellation into this caller, as if this caller had been cancelled.
        error, self._close_error = self._close_error, None
        if error is not None:
            raise error

    async def _aclose_on(self, loop: asyncio.AbstractEventLoop) -> None:
        """Close a store that serves another event loop (in another thread) on that loop: its event
        and its runner belong there, and cannot be set or awaited from here."""
        if loop.is_closed() or not loop.is_running():
            raise InvalidInput(
                f"store {self.root} was opened on another event loop, which is not running: close it on that loop"
            )
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self.aclose(), loop))

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        with anyio.CancelScope(shield=True):
            await self.aclose()

    async def _close(self) -> None:
        # Newest first: later actors may call into earlier ones while draining.
        for actor in reversed(self._actors):
            await actor.aclose()
        if self._watcher is not None:
            self._watcher.close()

    # -- verification ------------------------------------------------------------------------------

    async def check(self) -> StoreCheck:
        """The store's own integrity check: every CAS object re-hashed and its links followed, damaged
        packs and files set aside, SQLite's integrity check of every database, every turn payload
        re-hashed, and the invariants the ledgers keep (action_stats = aggregate of transitions, spend
        totals = sum of spend, ...)."""
        cas = await self.cas.fsck()
        problems = [f"cas: object {oid} is corrupt" for oid in cas.corrupt]
        problems += [f"cas: object {oid} is referenced but missing" for oid in cas.missing]
        problems += [f"cas: object {invalid} (git fsck --strict rejects it)" for invalid in cas.invalid]
        assert self._cas_actor is not None
        problems += [f"cas: {problem}" for problem in await anyio.to_thread.run_sync(self._cas_actor.odb.damage_report)]
        problems += await anyio.to_thread.run_sync(quarantined, self.root)
        if self._plan.damaged_manifest is not None:
            problems.append(self._plan.damaged_manifest + (" (read-only: not rewritten)" if self.readonly else ""))
        problems += [f"{file}: cannot be opened, every call to it fails: {exc}" for file, exc in self._damaged.items()]
        parts: list[tuple[str, Callable[[], Awaitable[list[str]]]]] = []
        databases = list(self._ledgers)
        if "turns.db" not in self._damaged:
            parts.append(("turns.db", self.turns.check))
            databases.insert(0, self.turns._actor)
        parts += [(actor.path.name, actor.check) for actor in self._ledgers]
        parts += [(actor.path.name, partial(_text_problems, actor)) for actor in databases]
        for file, part_check in parts:
            try:
                problems += await part_check()
            except IntegrityError as exc:  # damage the check itself runs into is a finding too
                problems.append(f"{file}: {exc}")
        if "turns.db" not in self._damaged:
            problems += await self._missing_turn_objects()
        return StoreCheck(problems, cas)

    async def _missing_turn_objects(self) -> list[str]:
        """The CAS objects turns still present name (``fs_root``, ``refs``, blobs named in checkpoint
        and tool-output payloads) that the CAS lacks: gc keeps every one of them, so a gap is damage
        (a workspace that can no longer be restored), not garbage. Looked up without freshening."""
        odb = self._cas_actor.odb if self._cas_actor is not None else None
        if odb is None:
            return []

        def missing() -> list[str]:
            try:
                roots = turn_roots(self.turns.path, connect=self.turns._actor._connect_readonly)
            except sqlite3.DatabaseError as exc:
                return [f"turns.db: cannot list the objects turns name: {exc}"]
            found = []
            for oid in sorted(roots):
                if not is_oid(oid):
                    found.append(f"turns.db: a turn names {oid!r}, which is not an object id")
                elif not odb.has(bytes.fromhex(oid)):
                    found.append(f"turns.db: a turn names CAS object {oid}, which is missing")
            return found

        return await anyio.to_thread.run_sync(missing)

    # -- lifecycle ---------------------------------------------------------------------------------

    async def gc(self, *, grace_s: float = 3600.0, dry_run: bool = False) -> GcReport:
        """Collect the whole store beside live writers of any process: the turns no live context
        reaches, then the CAS objects no remaining turn (``fs_root``, ``refs``, pipeline checkpoints,
        agent tool outputs), no ref and nothing young reaches (packs consolidated), expired nonces
        and never-committed reservations, then each database gives its free pages back and
        truncates its WAL. Nothing created, freshened or expired in the last ``grace_s`` seconds
        is reclaimed: another process may be about to name it, so ``grace_s`` must exceed the
        longest time a writer takes from checking an object to committing the turn that names it
        (``grace_s=0`` is for a store no one else is writing). Crash-safe at any point: the next
        gc finishes what a killed one began.

        ``dry_run`` only counts what would go. A read-only store refuses (``InvalidInput``), as
        does a store with a part too damaged to open (``IntegrityError``: what it names cannot be
        known). See :mod:`pforge_async.lifecycle` for the order and why it is safe."""
        grace = validate_gc(grace_s, dry_run)
        if self.readonly:
            raise InvalidInput(f"store {self.root} is open read-only: gc needs a writable store")
        return await collect_store(self, grace_s=grace, dry_run=dry_run)

    # -- layout ------------------------------------------------------------------------------------

    def _db(self, name: str) -> Path:
        return self.root / f"{name}.db"

    def _lock(self, name: str) -> Path:
        return self.locks_dir / f"{name}.lock"

    @property
    def locks_dir(self) -> Path:
        return self.root / "locks"


_TEXT_PAGE = 1000


async def _text_problems(actor: Any) -> list[str]:
    """Text values that are not UTF-8 in any table of one database. Everything the store writes is
    UTF-8 (arguments are checked), so such bytes were damaged on disk; SQLite's integrity check does
    not look inside values, and a read of the row fails. Tables are walked in key order, a page at a
    time (keyset paging: the cost of a page does not grow with the table)."""
    file = actor.path.name
    problems: list[str] = []
    tables = await actor.fetchall(
        "SELECT name, sql FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
    )
    for table, schema in tables:
        columns = await actor.fetchall(f"PRAGMA table_info({_quoted(table)})")
        names = [row[1] for row in columns]
        key = [row[1] for row in sorted(columns, key=lambda row: row[5]) if row[5]]
        if "WITHOUT ROWID" not in str(schema).upper() or not key:
            key = ["rowid"]
        keys = ", ".join(_quoted(k) if k != "rowid" else k for k in key)
        values = ", ".join(
            f"CASE WHEN typeof({_quoted(n)}) = 'text' THEN CAST({_quoted(n)} AS BLOB) END" for n in names
        )
        after: tuple[Any, ...] | None = None
        while True:
            where = "" if after is None else f"WHERE ({keys}) > ({', '.join('?' * len(key))})"
            sql = f"SELECT {keys}, {values} FROM {_quoted(table)} {where} ORDER BY {keys} LIMIT {_TEXT_PAGE}"
            try:
                rows = await actor.fetchall(sql, after or ())
            except IntegrityError as exc:
                problems.append(f"{file}: table {table}: a key after {after} is damaged: {exc}")
                break
            for row in rows:
                for name, value in zip(names, row[len(key) :], strict=True):
                    if value is None:
                        continue
                    try:
                        bytes(value).decode("utf-8")
                    except UnicodeDecodeError:
                        where_row = ", ".join(f"{k}={v!r}" for k, v in zip(key, row, strict=False))
                        problems.append(f"{file}: table {table}, row {where_row}: {name} is not UTF-8 (damaged)")
            if len(rows) < _TEXT_PAGE:
                break
            after = tuple(rows[-1][: len(key)])
    return problems


def _quoted(name: str) -> str:
    """``name`` as an SQL identifier: any table or column a database holds (one added by hand may
    have a double quote in its name) is read, never parsed as SQL."""
    return '"' + name.replace('"', '""') + '"'


class _DamagedPart:
    """Stands in for a part of the store whose database is too damaged to open: every method call
    raises the ``IntegrityError`` that said so (awaited or iterated), or ``ActorClosed`` once the store
    has closed, as the part itself would."""

    def __init__(self, store: Store, file: str) -> None:
        self._store = store
        self._file = file

    def __getattr__(self, name: str) -> Callable[..., _Failing]:
        if name.startswith("__"):
            raise AttributeError(name)

        def call(*args: Any, **kwargs: Any) -> _Failing:
            return _Failing(self._error)

        return call

    def _error(self) -> Exception:
        if self._store.closed:
            return ActorClosed(f"{self._file} is closed")
        cause = self._store._damaged[self._file]
        error = IntegrityError(str(cause))
        error.__cause__ = cause
        return error


class _Failing:
    """The outcome of a call to a damaged part: raises whether awaited or iterated."""

    def __init__(self, error: Callable[[], Exception]) -> None:
        self._error = error

    def __await__(self) -> Generator[Any, None, Any]:
        raise self._error()
        yield  # a generator, so awaiting it raises inside the awaiting task

    def __aiter__(self) -> _Failing:
        return self

    async def __anext__(self) -> Any:
        raise self._error()


def _damaged_part(store: Store, file: str) -> Any:
    return _DamagedPart(store, file)


def _single(exc: BaseException) -> BaseException:
    """The one error a task group wrapped, as itself; a group of several stays a group."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _root_path(root: object) -> Path:
    if not isinstance(root, (str, os.PathLike)):
        raise InvalidInput(f"store root must be a path, not {type(root).__name__}")
    try:
        text = os.fspath(root)
    except TypeError as exc:
        raise InvalidInput(f"store root must be a path: {exc}") from exc
    if isinstance(text, bytes):
        raise InvalidInput(f"store root must be a str path, not bytes ({text!r})")
    if text == "":
        raise InvalidInput("store root is the empty string: name a directory (the default is .pforge)")
    if "\0" in text:
        raise InvalidInput(f"store root {text!r} contains a NUL character")
    try:
        text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as exc:
        raise InvalidInput(f"store root {text!r} cannot be encoded as a file name") from exc
    return Path(text).absolute()


def _prepare(root: Path, *, create: bool, readonly: bool) -> RootPlan:
    """Decide how to open ``root`` (refusing what must not be opened, creating nothing then), and for a
    writable open make what the store needs before its actors start."""
    plan = plan_root(root, create=create, readonly=readonly)
    if readonly:
        return plan
    if plan.kind in (RootKind.ABSENT, RootKind.EMPTY):
        create_root(root)
    try:
        (root / "locks").mkdir(mode=0o700, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"cannot create {root / 'locks'}: {exc.strerror}") from exc
    _clean_manifest_temps(root)
    return plan


def _clean_manifest_temps(root: Path) -> None:
    """Temp files of a manifest write that a crash interrupted (a live writer's is seconds old)."""
    now = time.time()
    for name in os.listdir(root):
        if name.startswith(".pforge.json.tmp"):
            path = root / name
            try:
                if now - path.stat().st_mtime > 60:
                    path.unlink()
            except OSError:
                pass


_PG_SCHEMES = ("postgresql://", "postgres://")


async def _connect_pg(dsn: str, **options: Any) -> Store:
    """The same store on PostgreSQL (``pforge_async.postgres``), imported only when a DSN asks for it."""
    try:
        connect_pg = importlib.import_module(f"{__package__}.postgres.store").connect_pg
    except ImportError as exc:
        raise InvalidInput(
            f"a PostgreSQL store needs the postgres extra (pip install 'pforge_async[postgres]'): {exc}"
        ) from exc
    store: Store = await connect_pg(dsn, **options)
    return store


async def _connect(
    root: object,
    *,
    durability: object,
    watch_workspaces: bool,
    max_payload_bytes: int,
    create: bool,
    readonly: bool,
) -> Store:
    if durability not in get_args(Durability):
        raise InvalidInput(f"durability must be 'full' or 'normal', got {durability!r}")
    for name, flag in (("create", create), ("readonly", readonly), ("watch_workspaces", watch_workspaces)):
        if not isinstance(flag, bool):
            raise InvalidInput(f"{name} must be True or False, got {flag!r}")
    # Checked here, not first by the turn store: that is made once the store is created and running.
    validate_limit(max_payload_bytes, "max_payload_bytes")
    if isinstance(root, str) and root.startswith(_PG_SCHEMES):
        return await _connect_pg(
            root,
            durability=durability,
            watch_workspaces=watch_workspaces,
            max_payload_bytes=max_payload_bytes,
            create=create,
            readonly=readonly,
        )
    path = _root_path(root)
    prepare = partial(_prepare, path, create=create, readonly=readonly)
    plan = await anyio.to_thread.run_sync(prepare)
    options: dict[str, Any] = {"watch_workspaces": watch_workspaces, "max_payload_bytes": max_payload_bytes}
    if readonly or not plan.needs_manifest:
        store = Store(path, durability, plan, readonly=readonly, **options)  # type: ignore[arg-type]
        await store._launch()
        return store
    # A store being created (or given its manifest): one process at a time makes its parts. Two
    # processes making the same new databases at once race on SQLite's switch to WAL, which does not
    # wait for a busy lock. The second looks again once the first is done, and finds a store.
    lock = FsLock(path / "locks" / "create.lock", timeout=CREATE_LOCK_TIMEOUT)
    try:
        await lock.acquire_async()
    except LockTimeout as exc:
        raise LockTimeout(
            f"store {path} is being created by another process, which has held locks/create.lock for over "
            f"{CREATE_LOCK_TIMEOUT:g}s (stopped or hung?): nothing was opened; try again once it is done or gone"
        ) from exc
    try:
        plan = await anyio.to_thread.run_sync(prepare)
        store = Store(path, durability, plan, readonly=readonly, **options)  # type: ignore[arg-type]
        await store._launch()
    finally:
        lock.release()
    return store


class _Connecting:
    """What :func:`connect` returns: ``await`` it for the store, or use it as ``async with``."""

    def __init__(self, root: object, options: dict[str, Any]) -> None:
        self._root = root
        self._options = options
        self._store: Store | None = None
        self._entered = False

    def __await__(self) -> Generator[Any, None, Store]:
        return _connect(self._root, **self._options).__await__()

    async def __aenter__(self) -> Store:
        # One store per entry: a second entry while one is open (tasks sharing one connect()) would
        # make the first exit close the other's store, and leave its own open.
        if self._entered:
            raise InvalidInput("this connect() is already entered: call connect() again for each async with")
        self._entered = True
        try:
            self._store = await _connect(self._root, **self._options)
        except BaseException:
            self._entered = False
            raise
        return self._store

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        store, self._store = self._store, None
        self._entered = False
        if store is not None:
            with anyio.CancelScope(shield=True):
                await store.aclose()


def connect(
    root: str | os.PathLike[str] = DEFAULT_ROOT,
    *,
    durability: Durability = "full",
    watch_workspaces: bool = True,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD,
    create: bool = True,
    readonly: bool = False,
) -> _Connecting:
    """Open the store at ``root``: ``store = await connect(root)`` ... ``await store.aclose()``, or
    ``async with connect(root) as store:``. The store may be closed from any task of the event loop.

    ``create=False`` raises ``NotFound`` when there is no store at ``root``. ``readonly=True`` opens an
    existing store for inspection: nothing is created or changed (it works for a user who cannot
    write the root) and every write raises ``InvalidInput``. A root that is a file, a non-empty
    directory that is not a store, and ``""`` are refused with ``InvalidInput``; a store whose
    manifest records a database that is now missing or empty is refused with ``IntegrityError``.
    Nothing is created by a refused open.

    ``durability="full"`` makes an acknowledged write survive power loss (fsync per batch);
    ``"normal"`` makes it survive a killed process. A new root is created owner-only (0700).
    ``watch_workspaces`` lets a repeated ``cas.snapshot`` of an unchanged directory answer from
    inotify events instead of a stat walk (see :mod:`pforge_async.cas.watch` for its limits).
    ``max_payload_bytes`` bounds one turn's payload.

    A ``root`` that is a ``postgresql://`` (or ``postgres://``) DSN opens the store on PostgreSQL
    (the ``postgres`` extra; without it, ``InvalidInput`` saying so).
    """
    options = {
        "durability": durability,
        "watch_workspaces": watch_workspaces,
        "max_payload_bytes": max_payload_bytes,
        "create": create,
        "readonly": readonly,
    }
    return _Connecting(root, options)


@asynccontextmanager
async def open_store(
    root: str | os.PathLike[str] = DEFAULT_ROOT,
    *,
    durability: Durability = "full",
    watch_workspaces: bool = True,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD,
    create: bool = True,
    readonly: bool = False,
) -> AsyncIterator[Store]:
    """The structured form of :func:`connect`: the store is open exactly for the ``async with`` block.
    An error raised in the block comes out as itself."""
    store = await connect(
        root,
        durability=durability,
        watch_workspaces=watch_workspaces,
        max_payload_bytes=max_payload_bytes,
        create=create,
        readonly=readonly,
    )
    try:
        yield store
    finally:
        with anyio.CancelScope(shield=True):
            await store.aclose()
