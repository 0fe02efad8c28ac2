"""The PostgreSQL actor machinery every part of a PostgreSQL store shares.

The shape is the SQLite actor's (:mod:`pforge_async.sqlite.actor`): one actor per part per process,
owning one writer connection. It drains a batch from its mailbox and runs the whole batch as ONE
transaction: ``BEGIN``, the subclass's :meth:`PgActor.begin` (which takes the batch's row locks, in a
fixed order, so concurrent batches of many processes cannot deadlock), each command (inside a
savepoint of its own when :attr:`PgActor.savepoints` is on, so a failing command rolls back only
itself), :meth:`PgActor.flush`, ``COMMIT``. Reads run on a small pool of other connections, and see
every write whose call has returned (the writer commits before it replies).

**Faults.** Every asyncpg and OS error is translated at one boundary, :func:`translate`: a lost
connection, a server shutting down, a full disk are ``StorageError``; a value the server refuses
(out of range, not text) is ``InvalidInput``; a broken constraint is ``Conflict``; data the server
reports corrupt is ``IntegrityError``. The actor reconnects by itself: a batch whose connection was
lost before its ``COMMIT`` was sent is certainly not stored, so it runs again on a new connection
(for up to ``reconnect_wait`` seconds, which covers a server restart); a connection lost during the
``COMMIT`` leaves the outcome unknown, and those callers get ``StorageError`` saying so. A deadlock or
serialization failure (possible only between writes the lock order does not cover) rolls the batch
back and runs it again.

**Text.** PostgreSQL's ``text`` cannot hold NUL, which the SQLite store's strings may contain. So
every ``str`` crossing this boundary is escaped (NUL as ``\\x01\\x01``, ``\\x01`` as ``\\x01\\x02``)
and unescaped on the way back. The code is order-preserving under the ``C`` collation (byte order)
and maps a prefix to a prefix, so equality, ``ORDER BY`` and prefix matches of escaped values agree
with the originals'. Integral ``numeric`` results (what ``SUM`` of a ``bigint`` gives) come back as
``int``.
"""

from __future__ import annotations

import asyncio
import contextlib
import decimal
import logging
import re
import time
import urllib.parse
from abc import abstractmethod
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, ClassVar, TypeVar

import anyio
import asyncpg

from ..actor import Actor, Failed
from ..errors import (
    ActorClosed,
    Conflict,
    IntegrityError,
    InvalidInput,
    LockTimeout,
    PforgeError,
    StorageError,
)
from .migrate import check_schema_name, migrate, quote_ident, stored_version

__all__ = ["PgActor", "PgConn", "from_db", "safe_dsn", "to_db", "translate"]

C = TypeVar("C")
log = logging.getLogger(__name__)

# -- values across the boundary ----------------------------------------------------------------------

_ESCAPE = str.maketrans({"\x00": "\x01\x01", "\x01": "\x01\x02"})
_UNESCAPE_RE = re.compile("\x01([\x01\x02])")


def _unescape_one(match: re.Match[str]) -> str:
    return "\x00" if match.group(1) == "\x01" else "\x01"


def to_db(value: Any) -> Any:
    """A parameter as the server takes it: strings escaped (see the module), in lists and tuples too."""
    kind = type(value)
    if kind is str:
        return value.translate(_ESCAPE) if ("\x00" in value or "\x01" in value) else value
    if kind is list or kind is tuple:
        return kind(to_db(v) for v in value)
    return value


def from_db(value: Any) -> Any:
    """A result value as the store's API gives it: strings unescaped, integral numerics as int."""
    kind = type(value)
    if kind is str:
        return _UNESCAPE_RE.sub(_unescape_one, value) if "\x01" in value else value
    if kind is decimal.Decimal:
        return int(value) if value == value.to_integral_value() else value
    if kind is list:
        return [from_db(v) for v in value]
    return value


def _row(record: Any) -> tuple[Any, ...]:
    return tuple(from_db(v) for v in record)


class PgConn:
    """An asyncpg connection with the boundary's conversions (and types) on every call.

    ``raw`` is the asyncpg connection itself, for what this does not wrap (``copy_records_to_table``,
    say); values passed to it are not converted."""

    __slots__ = ("raw",)

    def __init__(self, raw: Any) -> None:
        self.raw = raw

    async def execute(self, sql: str, *args: Any) -> str:
        status: str = await self.raw.execute(sql, *(to_db(a) for a in args))
        return status

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """One statement for many rows, pipelined (one round trip for the lot)."""
        await self.raw.executemany(sql, [tuple(to_db(v) for v in row) for row in rows])

    async def fetch(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        return [_row(r) for r in await self.raw.fetch(sql, *(to_db(a) for a in args))]

    async def fetchrow(self, sql: str, *args: Any) -> tuple[Any, ...] | None:
        record = await self.raw.fetchrow(sql, *(to_db(a) for a in args))
        return None if record is None else _row(record)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        return from_db(await self.raw.fetchval(sql, *(to_db(a) for a in args)))


_PLACEHOLDER_CACHE: dict[str, str] = {}


def _dollar_params(sql: str) -> str:
    """SQLite-style ``?`` placeholders as ``$1, $2, ...`` (outside quoted text), so the ledgers'
    facades run their reads unchanged on either backend."""
    converted = _PLACEHOLDER_CACHE.get(sql)
    if converted is None:
        out: list[str] = []
        n = 0
        quote = ""
        for ch in sql:
            if quote:
                if ch == quote:
                    quote = ""
            elif ch in "'\"":
                quote = ch
            elif ch == "?":
                n += 1
                out.append(f"${n}")
                continue
            out.append(ch)
        converted = "".join(out)
        if len(_PLACEHOLDER_CACHE) < 4096:
            _PLACEHOLDER_CACHE[sql] = converted
    return converted


# -- errors -----------------------------------------------------------------------------------------

_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,  # class 08
    asyncpg.exceptions.AdminShutdownError,  # 57P01: terminated, or the server shutting down
    asyncpg.exceptions.CrashShutdownError,  # 57P02
    asyncpg.exceptions.CannotConnectNowError,  # 57P03: starting up or shutting down
    asyncpg.exceptions.TooManyConnectionsError,  # 53300: others will leave
    ConnectionError,
    OSError,
    TimeoutError,
    asyncio.TimeoutError,
)
_RETRY_STATES = ("40001", "40P01")  # serialization failure, deadlock detected


def safe_dsn(dsn: str) -> str:
    """``dsn`` without its password, for messages."""
    try:
        parts = urllib.parse.urlsplit(dsn)
    except ValueError:
        return "<unparsable dsn>"
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    user = f"{parts.username}@" if parts.username else ""
    return f"{parts.scheme}://{user}{host}{parts.path}"


def _connection_lost(exc: BaseException, raw: Any = None) -> bool:
    if isinstance(exc, _CONNECTION_ERRORS):
        return True
    if isinstance(exc, asyncpg.exceptions.InternalClientError):
        # The client's protocol state is confused (seen after a server restart: "cannot switch to
        # state 12; another operation is in progress"): only a new connection is safe.
        return True
    if isinstance(exc, asyncpg.InterfaceError) and "closed" in str(exc):
        return True
    if raw is None:
        return False
    try:
        return bool(raw.is_closed())
    except asyncpg.InterfaceError:
        return True  # a pool proxy released under us: its connection is gone


def _nothing_sent(exc: BaseException) -> bool:
    """asyncpg refused to start the call (a connection still taking in the server's FATAL: "cannot
    switch to state 12; another operation is in progress"): no byte of it reached the server."""
    return isinstance(exc, asyncpg.exceptions.InternalClientError)


def unknown_outcome(where: str, exc: BaseException) -> StorageError:
    """The failure of writes whose connection was lost while they committed."""
    error = StorageError(
        f"{where}: the connection was lost while committing; these writes may or may not have been "
        f"stored ({type(exc).__name__}: {exc})"
    )
    error.__cause__ = exc
    return error


def translate(where: str, exc: BaseException) -> PforgeError:
    """The one boundary for what asyncpg and the OS raise: a ``PforgeError`` naming the server.

    Lost connection, shutdown, full disk and every other server failure: ``StorageError``; data the
    server reports corrupt: ``IntegrityError``; a value it cannot take: ``InvalidInput``; a broken
    constraint: ``Conflict``."""
    if isinstance(exc, PforgeError):
        return exc
    text = str(exc) or type(exc).__name__
    if isinstance(exc, asyncpg.exceptions.DiskFullError):
        return StorageError(f"{where}: the server's disk is full ({text})")
    if _connection_lost(exc):
        return StorageError(f"{where}: the connection to the server was lost ({type(exc).__name__}: {text})")
    if isinstance(exc, (asyncpg.exceptions.DataCorruptedError, asyncpg.exceptions.IndexCorruptedError)):
        return IntegrityError(f"{where}: the server reports damaged data: {text}")
    if isinstance(exc, asyncpg.exceptions.DataError):  # class 22, and values asyncpg cannot encode
        return InvalidInput(f"{where}: cannot store a value: {text}")
    if isinstance(exc, asyncpg.exceptions.IntegrityConstraintViolationError):
        return Conflict(f"{where}: {text}")
    if isinstance(exc, asyncpg.exceptions.TransactionRollbackError):
        return StorageError(f"{where}: transactions kept conflicting: {text}")
    if isinstance(exc, asyncpg.PostgresError):
        return StorageError(f"{where}: {type(exc).__name__}: {text}")
    if isinstance(exc, asyncpg.InterfaceError):
        return InvalidInput(f"{where}: {text}")
    if isinstance(exc, (OverflowError, UnicodeEncodeError, ValueError, TypeError)):
        return InvalidInput(f"{where}: cannot store a value: {exc}")
    return PforgeError(f"{where}: unexpected {exc!r}")


def _is_storage_failure(error: PforgeError) -> bool:
    """A failure of the storage, not of one command: every command of a batch meets it alike."""
    return isinstance(error, (StorageError, IntegrityError, LockTimeout, ActorClosed))


class _BatchFailed(Exception):
    """The batch's transaction is gone: none of it is stored. ``culprit``: the index of the command that
    was running, if one was; ``outcomes``: what the commands before it came to; ``retry``: the batch
    may simply run again (its connection was lost before COMMIT was sent, or the server rolled it
    back for a deadlock or serialization failure)."""

    def __init__(self, cause: BaseException, culprit: int | None = None, *, retry: bool = False) -> None:
        super().__init__(cause)
        self.cause = cause
        self.culprit = culprit
        self.retry = retry
        self.outcomes: list[Any] = []


class PgActor(Actor[C]):
    """A subclass names its part and schema scripts and implements :meth:`apply`.

    ``scripts``: SQL script ``i`` (from 1) upgrades the part from version ``i - 1`` to ``i``
    (:func:`pforge_async.postgres.migrate.migrate`). ``invariants``: ``(what is wrong, a query that
    returns the offending rows)``, run by :meth:`check`.
    """

    part: ClassVar[str]
    scripts: ClassVar[tuple[str, ...]] = ()
    invariants: ClassVar[tuple[tuple[str, str], ...]] = ()
    #: run each command in a savepoint of its own. Off, a ``PforgeError`` out of ``apply`` fails just
    #: that command (so ``apply`` must raise it before it writes anything), and any other error
    #: rolls the batch back and runs it again without the command that raised.
    savepoints: ClassVar[bool] = True
    #: times a batch runs again after a deadlock or serialization failure before its callers get
    #: ``StorageError``.
    max_conflict_retries: ClassVar[int] = 20

    def __init__(
        self,
        dsn: str,
        *,
        schema: str = "pforge",
        durability: str = "full",
        readonly: bool = False,
        mailbox_size: int = 256,
        max_batch: int = 256,
        read_pool_size: int = 4,
        connect_timeout: float = 10.0,
        reconnect_wait: float = 10.0,
        connect_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(mailbox_size=mailbox_size, max_batch=max_batch)
        if not isinstance(dsn, str) or not dsn:
            raise InvalidInput(f"dsn must be a non-empty str, got {type(dsn).__name__}")
        self.dsn = dsn
        self.schema = check_schema_name(schema)
        self.durability = durability
        self.readonly = readonly
        self.read_pool_size = read_pool_size
        self.connect_timeout = connect_timeout
        self.reconnect_wait = reconnect_wait
        self.where = f"{self.name} on {safe_dsn(dsn)} (schema {self.schema})"
        self._connect_kwargs = dict(connect_kwargs or {})
        self._conn: PgConn | None = None
        self._pool: Any = None
        self._closing = False
        #: connections the writer made (1 at open, one more per reconnect), batches run again.
        self.connects = 0
        self.retried_batches = 0

    # -- connections -------------------------------------------------------------------------------

    def _settings(self, *, writer: bool) -> dict[str, Any]:
        kwargs = dict(self._connect_kwargs)
        settings = dict(kwargs.pop("server_settings", None) or {})
        settings["search_path"] = quote_ident(self.schema)
        # Which store and part a session serves, for pg_stat_activity (at most 63 bytes are kept).
        settings.setdefault("application_name", f"pforge-{self.part}-{self.schema}"[:63])
        if writer and self.durability != "full":
            # "normal": an acknowledged write survives a killed client; a server crash may lose the
            # last commits (the server's own WAL flush is not awaited).
            settings["synchronous_commit"] = "off"
        if self.readonly:
            settings["default_transaction_read_only"] = "on"
        kwargs["server_settings"] = settings
        kwargs.setdefault("timeout", self.connect_timeout)
        return kwargs

    async def _connect(self, *, writer: bool) -> Any:
        return await asyncpg.connect(self.dsn, **self._settings(writer=writer))

    async def setup(self) -> None:
        try:
            if self.readonly:
                raw = await self._connect(writer=False)
                try:
                    found = await stored_version(raw, self.schema, self.part)
                finally:
                    await raw.close(timeout=5)
                if found != len(self.scripts):
                    raise StorageError(
                        f"{self.where}: schema version {found}, this pforge_async uses {len(self.scripts)}; "
                        "open the store writable once to create or upgrade it"
                    )
            else:
                await self._open_writer()
            self._pool = await asyncpg.create_pool(
                self.dsn,
                min_size=0,
                max_size=max(1, self.read_pool_size),
                # Reads leave no session state behind, so the reset query asyncpg runs at every release
                # is one round trip per read for nothing (0.4-0.5 ms per fetch without it, 0.6-2 with).
                reset=_no_reset,
                **self._settings(writer=False),
            )
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await self.teardown()
            if isinstance(exc, Exception) and not isinstance(exc, PforgeError):
                raise translate(self.where, exc) from exc
            raise

    async def _open_writer(self) -> None:
        """Connect the writer and create or migrate the part's tables. A server that goes away
        meanwhile (a restart) is waited for, up to ``reconnect_wait`` seconds; the migration is one
        transaction, so a try cut short left nothing behind."""
        deadline = time.monotonic() + self.reconnect_wait
        while True:
            try:
                conn = await self._writer(deadline)
                await migrate(conn.raw, self.schema, self.part, self.scripts, where=f"{safe_dsn(self.dsn)}: ")
                return
            except Exception as exc:
                cause = exc.__cause__ if isinstance(exc, StorageError) and exc.__cause__ is not None else exc
                if not _connection_lost(cause) or time.monotonic() >= deadline:
                    raise
                self._drop_writer()
                await anyio.sleep(0.1)

    async def teardown(self) -> None:
        self._closing = True
        conn, self._conn = self._conn, None
        pool, self._pool = self._pool, None
        if conn is not None:
            try:
                with anyio.fail_after(5):
                    await conn.raw.close()
            except Exception:
                conn.raw.terminate()
        if pool is not None:
            try:
                with anyio.fail_after(5):
                    await pool.close()
            except Exception:
                pool.terminate()

    def _drop_writer(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.raw.terminate()

    async def _writer(self, deadline: float) -> PgConn:
        """The writer connection, connecting (again) if it was lost; tries until ``deadline``."""
        if self._conn is not None and not self._conn.raw.is_closed():
            return self._conn
        self._conn = None
        while True:
            try:
                raw = await self._connect(writer=True)
            except Exception as exc:
                if not _connection_lost(exc) or time.monotonic() >= deadline or self._closing:
                    raise translate(self.where, exc) from exc
                await anyio.sleep(0.1)
                continue
            self.connects += 1
            self._conn = PgConn(raw)
            return self._conn

    # -- writes ------------------------------------------------------------------------------------

    @abstractmethod
    async def apply(self, conn: PgConn, command: C) -> Any:
        """Run one command inside the batch's transaction and return its reply. Raise a
        ``PforgeError`` to fail just this command."""

    async def begin(self, conn: PgConn, commands: Sequence[C]) -> None:
        """A batch's transaction has begun: take the row locks its commands need, in a fixed order
        (sorted), before any command runs. What raises here fails the batch."""

    async def flush(self, conn: PgConn) -> None:
        """Write what the batch's commands deferred; runs just before the commit."""

    def abort(self) -> None:
        """The batch was rolled back: forget whatever it cached or deferred."""

    def single_statement(self, commands: Sequence[C]) -> bool:
        """Whether this batch runs no statement in :meth:`begin` or :meth:`apply` and at most one in
        :meth:`flush`, one that takes no lock another statement of the batch relies on and that may run
        twice to the same effect (an insert of content-addressed rows, say). Such a batch runs without
        ``BEGIN`` and ``COMMIT``: its one statement commits by itself, two round trips fewer (each a
        wake-up of both ends, what a lone writer pays most for). Savepoints must be off."""
        return False

    async def handle_batch(self, commands: Sequence[C]) -> list[Any]:
        """Run a batch and say, for each command, what became of it (see the SQLite actor's
        ``_transact``, whose rules this follows; here a lost connection or a deadlock also runs the
        batch again)."""
        if self.readonly:
            return [Failed(InvalidInput(f"{type(c).__name__}: {self.where} is open read-only")) for c in commands]
        outcomes: list[Any] = [None] * len(commands)
        todo = list(range(len(commands)))
        deadline = time.monotonic() + self.reconnect_wait
        conflicts = 0
        twins: set[int] = set()
        while todo:
            try:
                conn = await self._writer(deadline)
            except PforgeError as exc:
                for i in todo:
                    outcomes[i] = Failed(exc)
                return outcomes
            try:
                for i, outcome in zip(todo, await self._try_batch(conn, [commands[i] for i in todo]), strict=True):
                    outcomes[i] = outcome
                break
            except _BatchFailed as failed:
                if failed.retry and not self._closing:
                    if _connection_lost(failed.cause, conn.raw):
                        self._drop_writer()
                        if time.monotonic() < deadline:
                            self.retried_batches += 1
                            await anyio.sleep(0.05)
                            continue
                    elif conflicts < self.max_conflict_retries:
                        conflicts += 1
                        self.retried_batches += 1
                        continue
                elif _connection_lost(failed.cause, conn.raw):
                    self._drop_writer()
                error = translate(self.where, failed.cause)
                if failed.culprit is not None:
                    culprit = todo[failed.culprit]
                    if isinstance(failed.cause, asyncpg.exceptions.UniqueViolationError) and culprit not in twins:
                        # The unique index caught a twin another process committed meanwhile (the
                        # idempotency backstop): run the batch again, the command now finds it.
                        twins.add(culprit)
                        continue
                    outcomes[todo.pop(failed.culprit)] = Failed(self._command_error(failed.cause, error))
                    continue
                if len(todo) > 1 and not _is_storage_failure(error):
                    for i in todo:
                        try:
                            outcomes[i] = (await self._try_batch(conn, [commands[i]]))[0]
                        except _BatchFailed as alone:
                            outcomes[i] = Failed(translate(self.where, alone.cause))
                    break
                for n, i in enumerate(todo):
                    done = failed.outcomes[n] if n < len(failed.outcomes) else None
                    outcomes[i] = done if isinstance(done, Failed) else Failed(error)
                return outcomes
        return outcomes

    async def _try_batch(self, conn: PgConn, commands: list[C]) -> list[Any]:
        """One transaction for ``commands``: their outcomes once committed, else ``_BatchFailed``."""
        if not self.savepoints and self.single_statement(commands):
            return await self._try_single(conn, commands)
        outcomes: list[Any] = []
        committing = False
        try:
            await conn.execute("BEGIN")
            try:
                await self.begin(conn, commands)
                if self.savepoints:
                    # After begin(): rolling a command back must not undo the batch's row locks
                    # (a lock taken inside a savepoint is released when it is rolled back).
                    await conn.execute("SAVEPOINT command")
            except Exception as exc:
                raise _BatchFailed(exc, retry=self._retryable(exc, conn)) from exc
            await self._apply_each(conn, commands, outcomes)
            try:
                await self.flush(conn)
            except Exception as exc:
                raise _BatchFailed(exc, retry=self._retryable(exc, conn)) from exc
            committing = True
            await conn.execute("COMMIT")
        except _BatchFailed as failed:
            await self._rollback(conn)
            failed.outcomes = outcomes
            raise
        except Exception as exc:
            await self._rollback(conn)
            # A connection lost during COMMIT leaves the outcome unknown: never run it again.
            ended = _BatchFailed(exc, retry=not committing and self._retryable(exc, conn))
            if committing and _connection_lost(exc, conn.raw):
                ended.cause = unknown_outcome(self.where, exc)
            ended.outcomes = outcomes
            raise ended from exc
        except BaseException:
            await self._rollback(conn)
            raise
        return outcomes

    async def _apply_each(self, conn: PgConn, commands: list[C], outcomes: list[Any]) -> None:
        """Each command's outcome appended to ``outcomes``; the one at fault named on its failure."""
        for i, command in enumerate(commands):
            try:
                outcomes.append(await self._apply_one(conn, command))
            except _BatchFailed as failed:
                if not failed.retry:
                    failed.culprit = i
                raise

    async def _try_single(self, conn: PgConn, commands: list[C]) -> list[Any]:
        """A :meth:`single_statement` batch: its flush's statement is its transaction. A connection lost
        under it may or may not have committed it; running it again is safe (see there)."""
        outcomes: list[Any] = []
        try:
            await self.begin(conn, commands)
            await self._apply_each(conn, commands, outcomes)
            await self.flush(conn)
        except _BatchFailed as failed:
            self.abort()
            failed.outcomes = outcomes
            raise
        except Exception as exc:
            self.abort()
            ended = _BatchFailed(exc, retry=self._retryable(exc, conn))
            ended.outcomes = outcomes
            raise ended from exc
        except BaseException:
            self.abort()
            raise
        return outcomes

    @staticmethod
    def _retryable(exc: BaseException, conn: PgConn) -> bool:
        return getattr(exc, "sqlstate", None) in _RETRY_STATES or _connection_lost(exc, conn.raw)

    async def _apply_one(self, conn: PgConn, command: C) -> Any:
        if not self.savepoints:
            try:
                return await self.apply(conn, command)
            except PforgeError as exc:
                return Failed(exc)
            except Exception as exc:
                raise _BatchFailed(exc, retry=self._retryable(exc, conn)) from exc
        twin_waited = False
        while True:
            try:
                reply = await self.apply(conn, command)
                break
            except Exception as exc:
                if self._retryable(exc, conn):
                    raise _BatchFailed(exc, retry=True) from exc
                try:
                    await conn.execute("ROLLBACK TO SAVEPOINT command")
                except Exception as undo:
                    raise _BatchFailed(exc, retry=self._retryable(undo, conn)) from undo
                if isinstance(exc, asyncpg.exceptions.UniqueViolationError) and not twin_waited:
                    # A unique index is the idempotency backstop: another process inserted the same
                    # key, and the insert waited for it to commit. Once more: the command now finds
                    # the twin and answers as a replay (or as a conflict, if the values differ).
                    twin_waited = True
                    continue
                return Failed(self._command_error(exc, translate(self.where, exc)))
        await conn.execute("RELEASE SAVEPOINT command; SAVEPOINT command")
        return reply

    def _command_error(self, cause: BaseException, error: PforgeError) -> PforgeError:
        if not isinstance(cause, (PforgeError, asyncpg.PostgresError, asyncpg.InterfaceError, OSError, ValueError)):
            # Not an error a command is expected to meet: a bug, worth a trace, that fails only the
            # command that met it.
            log.error("%s: a command failed unexpectedly", self.name, exc_info=cause)
        return error

    async def _rollback(self, conn: PgConn) -> None:
        self.abort()
        if conn.raw.is_closed():
            return
        try:
            await conn.execute("ROLLBACK")
        except Exception:
            # The connection is in an unknown state: a fresh one is the only safe next step.
            log.warning("rollback on %s failed; reconnecting", self.where, exc_info=True)
            self._drop_writer()

    # -- reads -------------------------------------------------------------------------------------

    def _read_pool(self) -> Any:
        pool = self._pool
        if pool is None or self.closed:
            raise ActorClosed(f"{self.where} is closed")
        # The pool's connections belong to the actor's event loop: from another, asyncpg would fail
        # deep inside (or wait forever); every read passes here, so it is told plainly.
        self._check_loop()
        return pool

    async def fetch(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        """Every row ``sql`` (``$n`` placeholders) selects, on a read connection. A connection lost
        under a read is replaced and the read runs again, for up to ``reconnect_wait`` seconds."""
        deadline = time.monotonic() + self.reconnect_wait
        params = [to_db(a) for a in args]
        while True:
            pool = self._read_pool()
            try:
                async with pool.acquire() as raw:
                    try:
                        records = await raw.fetch(sql, *params)
                    except BaseException as exc:
                        if _connection_lost(exc, raw):
                            # The pool replaces it: never hand a confused one out again. A proxy the
                            # pool already took back (its connection died under it) refuses both calls.
                            with contextlib.suppress(asyncpg.InterfaceError):
                                raw.terminate()
                        raise
                return [_row(r) for r in records]
            except Exception as exc:
                if _connection_lost(exc) and time.monotonic() < deadline and not self._closing:
                    await anyio.sleep(0.05)
                    continue
                if isinstance(exc, asyncpg.InterfaceError) and self._pool is None:
                    raise ActorClosed(f"{self.where} is closed") from exc
                raise translate(self.where, exc) from exc

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """The SQLite actor's read API: ``?`` placeholders and a parameter sequence."""
        return await self.fetch(_dollar_params(sql), *params)

    async def fetchone(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        rows = await self.fetchall(sql, params)
        return rows[0] if rows else None

    @asynccontextmanager
    async def reading(self, *, snapshot: bool = False) -> AsyncIterator[PgConn]:
        """A read connection for several queries; with ``snapshot``, all of them in one
        ``REPEATABLE READ`` read-only transaction (one consistent view). Errors are translated; a lost
        connection is not retried here."""
        pool = self._read_pool()
        try:
            async with pool.acquire() as raw:
                conn = PgConn(raw)
                if snapshot:
                    async with raw.transaction(isolation="repeatable_read", readonly=True):
                        yield conn
                else:
                    yield conn
        except PforgeError:
            raise
        except Exception as exc:
            raise translate(self.where, exc) from exc

    # -- verification ------------------------------------------------------------------------------

    async def check(self) -> list[str]:
        """The part's schema version, then every invariant of its tables; what is wrong."""
        label = f"{self.schema}.{self.part}"
        try:
            async with self.reading() as conn:
                found = await stored_version(conn.raw, self.schema, self.part)
        except PforgeError as exc:
            return [f"{label}: cannot be checked: {exc}"]
        problems = []
        if found != len(self.scripts):
            problems.append(f"{label}: schema version {found}, expected {len(self.scripts)}")
        for what, query in self.invariants:
            try:
                found_rows = await self.fetch(query + " LIMIT 10")
            except PforgeError as exc:
                problems.append(f"{label}: {what}: {exc}")
                continue
            if found_rows:
                problems.append(f"{label}: {what}: {', '.join(str(tuple(r)) for r in found_rows)}")
        return problems


async def _no_reset(conn: Any) -> None:
    """The read pool's release hook: nothing to reset (see ``PgActor.setup``)."""
