"""The SQLite actor machinery every database of the store shares.

One writer connection per database, owned by the actor: a batch of commands runs in one
``BEGIN IMMEDIATE`` transaction, each command inside its own savepoint (a failing command rolls back
only itself), and one ``COMMIT`` (one fsync under ``synchronous=FULL``) answers the whole batch.
Across processes, an fslock held around each batch makes the writers of one database take turns, so
``SQLITE_BUSY`` never reaches a caller. Reads use a separate connection (aiosqlite) in WAL mode, and
see every write whose call has returned.

Schemas are versioned with ``PRAGMA user_version`` and migrated forward at open inside a transaction;
a database written by a newer version is refused before anything touches it.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from abc import abstractmethod
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import aiosqlite
import anyio

from ..actor import Actor, Failed
from ..errors import ActorClosed, IdempotencyConflict, IntegrityError, PforgeError, StorageError
from ..fslock import FsLock
from ..owner import OwnerThread

__all__ = ["SqliteActor", "load_script", "replay", "split_statements"]

C = TypeVar("C")
log = logging.getLogger(__name__)


def load_script(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text()


def split_statements(script: str) -> Iterator[str]:
    """The statements of a script, so they run inside our transaction (``executescript`` would
    commit first)."""
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            statement = pending.strip()
            if statement:
                yield statement
            pending = ""
    if pending.strip() and not all(part.strip().startswith("--") or not part.strip() for part in pending.splitlines()):
        raise ValueError(f"incomplete SQL statement at the end of a script: {pending.strip()[:80]}")


def replay(conn: sqlite3.Connection, select: str, key: str | None, asked: tuple[Any, ...], what: str) -> int | None:
    """The id of the row an idempotency key already wrote, if the key was used before; None if not.

    ``select`` selects ``(id, *columns)`` by key; the columns must equal ``asked``, or the reuse of the
    key for other values is an ``IdempotencyConflict``.
    """
    if key is None:
        return None
    row = conn.execute(select, (key,)).fetchone()
    if row is None:
        return None
    if tuple(row[1:]) != asked:
        raise IdempotencyConflict(f"idempotency key {key!r} was used for {what} {row[0]} with other values")
    return int(row[0])


def translate(path: Path, exc: sqlite3.Error) -> PforgeError:
    """One boundary for sqlite3's errors: corruption is IntegrityError, the rest StorageError."""
    text = str(exc)
    if isinstance(exc, sqlite3.DatabaseError) and (
        "not a database" in text or "malformed" in text or "corrupt" in text
    ):
        return IntegrityError(f"database {path} is corrupt: {text}")
    return StorageError(f"database {path}: {text}")


class SqliteActor(Actor[C]):
    """A subclass names its schema file and version (and migrations) and implements :meth:`apply`."""

    schema_file: ClassVar[str]
    schema_version: ClassVar[int]
    #: version -> script that upgrades version - 1 to it.
    migrations: ClassVar[dict[int, str]] = {}

    def __init__(
        self,
        path: Path,
        lock_path: Path,
        *,
        durability: str = "full",
        mailbox_size: int = 256,
        max_batch: int = 256,
    ) -> None:
        super().__init__(mailbox_size=mailbox_size, max_batch=max_batch)
        self.path = path
        self.lock_path = lock_path
        self.durability = durability
        self._worker: OwnerThread | None = None
        self._conn: sqlite3.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._lock = FsLock(lock_path, keep_open=True)
        self._data_version = -1
        self._checkpointer = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"pforge-{self.name}-ckpt")
        self._checkpointing: Future[None] | None = None
        self._checkpoint_conn: sqlite3.Connection | None = None
        self._since_checkpoint = self._commits_since_checkpoint = self._checkpoint_rounds = 0

    # -- lifecycle ---------------------------------------------------------------------------------

    async def setup(self) -> None:
        self._worker = OwnerThread(f"pforge-{self.name}")
        try:
            await self._worker.run(self._open_writer)
            self._reader = await aiosqlite.connect(self.path, isolation_level=None)
            await self._reader.execute("PRAGMA query_only = ON")
            await self._reader.execute("PRAGMA busy_timeout = 10000")
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await self.teardown()
            if isinstance(exc, sqlite3.Error):
                raise translate(self.path, exc) from exc
            raise

    #: commands, or commits, between WAL checkpoints: whichever comes first keeps a lap of the WAL
    #: near SQLite's own default of 1000 pages, for batches of 64 turns as for commits of one (a
    #: commit writes whole pages, at least one per table and index it touches).
    checkpoint_every: ClassVar[int] = 1000
    checkpoint_every_commits: ClassVar[int] = 250

    async def teardown(self) -> None:
        await anyio.to_thread.run_sync(self._stop_checkpointer)
        if self._reader is not None:
            reader, self._reader = self._reader, None
            await reader.close()
        if self._conn is not None:
            conn, self._conn = self._conn, None
            assert self._worker is not None
            await self._worker.run(conn.close)
        if self._worker is not None:
            worker, self._worker = self._worker, None
            await worker.stop()
        self._lock.close()

    def _stop_checkpointer(self) -> None:
        self._checkpointer.shutdown(wait=True)
        if self._checkpoint_conn is not None:
            self._checkpoint_conn.close()
            self._checkpoint_conn = None

    def _open_writer(self) -> None:
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10)
        except sqlite3.Error as exc:
            raise translate(self.path, exc) from exc
        try:
            # Read the version before any pragma can write to the file.
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > self.schema_version:
                raise StorageError(
                    f"database {self.path} has schema version {version}, newer than this "
                    f"pforge_async understands ({self.schema_version}); it was left untouched"
                )
            conn.execute("PRAGMA journal_mode = WAL")
            # Checkpoints run beside the writer (see _checkpoint), never inside a caller's commit.
            conn.execute("PRAGMA wal_autocheckpoint = 0")
            sync = "FULL" if self.durability == "full" else "NORMAL"
            conn.execute(f"PRAGMA synchronous = {sync}")
            conn.execute("PRAGMA foreign_keys = ON")
            if version < self.schema_version:
                with FsLock(self.lock_path):
                    self._migrate(conn)
            if self.durability == "full" and self.wal_reserve:
                self._reserve_wal(conn)
        except sqlite3.Error as exc:
            conn.close()
            raise translate(self.path, exc) from exc
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    #: bytes of WAL file to give blocks to at open (0: none), about one lap; see :meth:`_reserve_wal`.
    wal_reserve: ClassVar[int] = 4 << 20

    def _reserve_wal(self, conn: sqlite3.Connection) -> None:
        """Give the WAL file its blocks before the first commit needs them.

        Under ``synchronous=FULL`` every commit syncs the WAL, and syncing a write into blocks the
        file already has costs about half of syncing one that grows the file (no metadata to
        journal). SQLite reuses its WAL from the start once it is checkpointed (see
        :meth:`_maybe_checkpoint`), so after the first lap the file has its blocks anyway; this
        gives them to the first lap too. Zeros past the last frame are what SQLite itself leaves
        behind a restarted WAL: recovery stops at the first frame whose salt does not match. They
        are written only under SQLite's write lock, so no other connection is appending frames.
        """
        wal = self.path.with_name(self.path.name + "-wal")
        with self._lock:
            conn.execute("BEGIN IMMEDIATE")
            try:
                fd = os.open(wal, os.O_WRONLY)
                try:
                    size = os.fstat(fd).st_size
                    if size < self.wal_reserve:
                        chunk = bytes(1 << 20)
                        while size < self.wal_reserve:
                            size += os.pwrite(fd, chunk[: self.wal_reserve - size], size)
                        os.fdatasync(fd)
                finally:
                    os.close(fd)
            except FileNotFoundError:
                pass  # no WAL file yet: nothing to give blocks to
            except OSError:  # a full disk, say: commits still work, only slower
                log.warning("could not reserve WAL space for %s", self.path, exc_info=True)
            finally:
                conn.execute("COMMIT")

    def _migrate(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Read again under the lock: another process may have migrated meanwhile.
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:  # a fresh database gets the current schema whole
                scripts = [self.schema_file] if self.schema_version else []
            else:
                try:
                    scripts = [self.migrations[v] for v in range(version + 1, self.schema_version + 1)]
                except KeyError as exc:
                    raise StorageError(f"database {self.path}: no migration to version {exc}") from exc
            for name in scripts:
                for statement in split_statements(load_script(name)):
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {int(self.schema_version)}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    # -- writes ------------------------------------------------------------------------------------

    #: run each command in its own savepoint. A subclass whose ``apply`` checks everything before it
    #: writes anything (and defers its writes to :meth:`flush`) may turn this off to save two
    #: statements per command.
    savepoints: ClassVar[bool] = True

    @abstractmethod
    def apply(self, conn: sqlite3.Connection, command: C) -> Any:
        """Run one command inside the batch's transaction and return its reply. Raise a
        ``PforgeError`` to fail just this command."""

    def begin(self, conn: sqlite3.Connection, changed_elsewhere: bool) -> None:
        """A batch starts. ``changed_elsewhere``: another connection (process) committed since our
        last batch, so anything cached from the database is stale."""

    def flush(self, conn: sqlite3.Connection) -> None:
        """Write what the batch's commands deferred; runs just before the commit."""

    def abort(self) -> None:
        """The batch was rolled back: forget whatever it cached or deferred."""

    async def handle_batch(self, commands: Sequence[C]) -> list[Any]:
        assert self._worker is not None
        outcomes: list[Any] = await self._worker.run(self._transact, commands)
        return outcomes

    def _transact(self, commands: Sequence[C]) -> list[Any]:
        conn = self._conn
        if conn is None:
            raise StorageError(f"database {self.path} is closed")
        with self._lock:
            try:
                conn.execute("BEGIN IMMEDIATE")
                version = conn.execute("PRAGMA data_version").fetchone()[0]
                self.begin(conn, version != self._data_version)
                outcomes = [self._apply_one(conn, command) for command in commands]
                self.flush(conn)
                conn.execute("COMMIT")
                self._data_version = version  # our own commits leave it as it is
            except Exception as exc:
                # Nothing of the batch is kept; its callers learn why, later batches go on.
                self._rollback(conn)
                error = translate(self.path, exc) if isinstance(exc, sqlite3.Error) else exc
                return [Failed(error) for _ in commands]
            except BaseException:
                self._rollback(conn)
                raise
        try:
            self._maybe_checkpoint(conn, len(commands))
        except Exception:  # the batch is committed: nothing here may report it failed
            log.warning("checkpoint of %s could not start; the next batch will retry", self.path, exc_info=True)
        return outcomes

    def _apply_one(self, conn: sqlite3.Connection, command: C) -> Any:
        if not self.savepoints:
            try:
                return self.apply(conn, command)
            except PforgeError as exc:
                return Failed(exc)
        conn.execute("SAVEPOINT command")
        try:
            return self.apply(conn, command)
        except Exception as exc:
            conn.execute("ROLLBACK TO command")
            if isinstance(exc, sqlite3.Error):
                exc = translate(self.path, exc)
            return Failed(exc)
        finally:
            conn.execute("RELEASE command")

    def _maybe_checkpoint(self, conn: sqlite3.Connection, commands: int) -> None:
        """Keep the WAL short and its file reused.

        The bulk of a checkpoint (copying pages back, syncing the database) runs beside the writer.
        But a WAL is only rewritten from its start when it was checkpointed to its very end, and
        while we keep writing, a checkpoint beside us never sees the end. So once the bulk is done,
        the writer copies the few frames it wrote meanwhile itself: its next transaction then
        restarts the WAL, overwriting blocks the file already has, which syncs faster than growing.
        "Few": while more than one commit landed during a checkpoint beside us, another one runs
        beside us (each is shorter than the last), so the writer's own share stays about one
        batch's pages and one sync. It does that after it has answered the batch, while the callers
        take in their replies.
        """
        # Both counters restart whenever a checkpoint starts beside us: while one runs, they count
        # the commits landing during it; after the writer's share, the commits of the next lap.
        self._since_checkpoint += commands
        self._commits_since_checkpoint += 1
        running = self._checkpointing
        if running is not None:
            if running.done():
                self._checkpoint_rounds += 1
                if self._commits_since_checkpoint > 1 and self._checkpoint_rounds < 8:
                    self._start_checkpoint()
                else:
                    self._checkpointing = None
                    assert self._worker is not None
                    self._worker.post(self._finish_checkpoint, conn)
        elif (
            self._since_checkpoint >= self.checkpoint_every
            or self._commits_since_checkpoint >= self.checkpoint_every_commits
        ):
            self._checkpoint_rounds = 0
            self._start_checkpoint()

    def _start_checkpoint(self) -> None:
        self._since_checkpoint = self._commits_since_checkpoint = 0
        self._checkpointing = self._checkpointer.submit(self._checkpoint)

    def _finish_checkpoint(self, conn: sqlite3.Connection) -> None:
        try:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error:
            log.warning("checkpoint of %s failed; the next one will retry", self.path, exc_info=True)

    def _checkpoint(self) -> None:
        """Copy the WAL back into the database (PASSIVE: never waits for, nor blocks, the writer or
        readers), on a connection and thread of its own."""
        try:
            if self._checkpoint_conn is None:
                self._checkpoint_conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._checkpoint_conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error:
            log.warning("checkpoint of %s failed; the next one will retry", self.path, exc_info=True)

    def _rollback(self, conn: sqlite3.Connection) -> None:
        self.abort()
        self._data_version = -1
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                log.exception("rollback of %s failed", self.path)

    # -- verification ------------------------------------------------------------------------------

    #: (what is wrong, a query that returns the offending rows): relations the data must keep.
    invariants: ClassVar[tuple[tuple[str, str], ...]] = ()

    async def check(self) -> list[str]:
        """SQLite's own ``integrity_check``, then every invariant of this database; what is wrong."""
        problems = [
            f"{self.path.name}: {row[0]}" for row in await self.fetchall("PRAGMA integrity_check") if row[0] != "ok"
        ]
        for what, query in self.invariants:
            rows = await self.fetchall(query + " LIMIT 10")
            if rows:
                problems.append(f"{self.path.name}: {what}: {', '.join(str(tuple(r)) for r in rows)}")
        return problems

    # -- reads -------------------------------------------------------------------------------------

    async def fetchall(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[Any]:
        reader = self._reader
        if reader is None:
            raise ActorClosed(f"database {self.path} is closed")
        try:
            # One trip to the reader's thread, not three (execute, fetch, close).
            return list(await reader.execute_fetchall(sql, params))
        except sqlite3.Error as exc:
            raise translate(self.path, exc) from exc
        except ValueError as exc:  # aiosqlite: the connection was closed meanwhile
            raise ActorClosed(f"database {self.path} is closed") from exc

    async def fetchone(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> Any:
        rows = await self.fetchall(sql, params)
        return rows[0] if rows else None
