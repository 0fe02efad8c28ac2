"""The SQLite actor machinery every database of the store shares.

One writer connection per database, owned by the actor: a batch of commands runs in one
``BEGIN IMMEDIATE`` transaction, each command inside its own savepoint (a failing command rolls back
only itself), and one ``COMMIT`` (one fsync under ``synchronous=FULL``) answers the whole batch.
Across processes, an fslock held around each batch makes the writers of one database take turns, so
``SQLITE_BUSY`` never reaches a caller. Reads use a separate connection on a thread of its own in
WAL mode, and see every write whose call has returned. ``readonly=True`` opens only that reader (see
:meth:`SqliteActor._connect_readonly`): no WAL reserve, no migration, and every write fails its caller.
Every thread here is a daemon that teardown stops without joining, so a process interrupted in the
middle of a batch still exits.

Schemas are versioned with ``PRAGMA user_version`` and migrated forward at open inside a transaction;
a database written by a newer version is refused before anything touches it.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import threading
import time
import urllib.parse
from abc import abstractmethod
from collections.abc import Callable, Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import anyio

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
from ..fslock import FsLock
from ..owner import OwnerThread

__all__ = ["SqliteActor", "free_bytes", "load_script", "split_statements", "translate"]

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


# SQLite's primary result codes this boundary tells apart (sqlite3.h).
_SQLITE_READONLY = 8
_SQLITE_IOERR = 10
_SQLITE_CORRUPT = 11
_SQLITE_FULL = 13
_SQLITE_CANTOPEN = 14
_SQLITE_CONSTRAINT = 19
_SQLITE_NOTADB = 26


#: the size of one region of a -shm file (the wal-index), as SQLite maps and grows it
_SHM_REGION = 32 << 10


def _primary_code(exc: sqlite3.Error) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)
    return code & 0xFF if isinstance(code, int) else None


def translate(path: Path, exc: BaseException) -> PforgeError:
    """The one boundary for what a database's backend raises: a ``PforgeError`` naming the file.

    A damaged file (``SQLITE_CORRUPT``, ``SQLITE_NOTADB``, "malformed") is ``IntegrityError``;
    a full disk and every other I/O or database failure is ``StorageError``; a constraint the
    write broke is ``Conflict``; a value the database cannot bind (an integer past 64 bits, a lone
    surrogate) is ``InvalidInput``; a closed connection is ``ActorClosed``.
    """
    if isinstance(exc, PforgeError):
        return exc
    if isinstance(exc, sqlite3.Error):
        text = str(exc)
        code = _primary_code(exc)
        if code in (_SQLITE_CORRUPT, _SQLITE_NOTADB) or "malformed" in text or "not a database" in text:
            return IntegrityError(f"database {path} is damaged: {text}")
        if "Could not decode to UTF-8" in text:  # every text we store is UTF-8: these bytes were damaged
            return IntegrityError(f"database {path} is damaged: {text}")
        if code == _SQLITE_FULL:
            return StorageError(f"database {path}: the disk is full ({text})")
        if code == _SQLITE_CONSTRAINT:
            return Conflict(f"database {path}: {text}")
        if isinstance(exc, sqlite3.ProgrammingError) and "closed" in text:
            return ActorClosed(f"database {path} is closed")
        if isinstance(exc, (sqlite3.ProgrammingError, sqlite3.InterfaceError)):
            return InvalidInput(f"database {path}: {text}")
        return StorageError(f"database {path}: {text}")
    if isinstance(exc, OSError):
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return StorageError(f"database {path}: the disk is full ({exc.strerror})")
        return StorageError(f"database {path}: {exc.strerror or exc!r}")
    if isinstance(exc, UnicodeDecodeError):  # sqlite3 decoding a message that quotes a damaged schema
        return IntegrityError(f"database {path} is damaged: SQLite's message is not UTF-8: {exc}")
    if isinstance(exc, (OverflowError, UnicodeEncodeError, ValueError, TypeError)):
        # What sqlite3 raises for a value it cannot bind, before anything is written.
        return InvalidInput(f"database {path}: cannot store a value: {exc}")
    return PforgeError(f"database {path}: unexpected {exc!r}")


def _is_storage_failure(error: PforgeError) -> bool:
    """A failure of the storage, not of one command: every command of a batch meets it alike."""
    return isinstance(error, (StorageError, IntegrityError, LockTimeout, ActorClosed))


class _BatchFailed(Exception):
    """The batch's transaction is gone (rolled back by SQLite, or its end failed): none of it is
    stored. ``culprit`` is the index of the command that was running, if one was; ``outcomes``
    what the commands before it came to (a command that failed on its own account stays failed)."""

    def __init__(self, cause: BaseException, culprit: int | None = None) -> None:
        super().__init__(cause)
        self.cause = cause
        self.culprit = culprit
        self.outcomes: list[Any] = []


def free_bytes(directory: Path) -> int:
    """Bytes an unprivileged writer may still use on ``directory``'s file system (0 if unknown)."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


class SqliteActor(Actor[C]):
    """A subclass names its schema file and version (and migrations) and implements :meth:`apply`."""

    schema_file: ClassVar[str]
    schema_version: ClassVar[int]
    #: version -> script that upgrades version - 1 to it.
    migrations: ClassVar[dict[int, str]] = {}

    #: commands, or commits, between WAL checkpoints: whichever comes first keeps a lap of the WAL
    #: near SQLite's own default of 1000 pages, for batches of 64 turns as for commits of one (a
    #: commit writes whole pages, at least one per table and index it touches).
    checkpoint_every: ClassVar[int] = 1000
    checkpoint_every_commits: ClassVar[int] = 250

    #: most bytes of WAL file to give blocks to at open, about one lap; see :meth:`_reserve_wal`.
    wal_reserve: ClassVar[int] = 4 << 20
    #: the reserve is at most this fraction of the file system's free space, and none at all when
    #: that comes to less than a MiB: a small or nearly full disk keeps its room for data.
    wal_reserve_share: ClassVar[int] = 64
    #: the WAL file's bound: a batch that finds the WAL larger first checkpoints and restarts it
    #: (see :meth:`_bound_wal`). Lower on a file system with less than 8 times this free.
    wal_limit: ClassVar[int] = 8 << 20
    #: seconds a WAL restart waits for readers (of any process) to leave the old WAL.
    wal_restart_wait: ClassVar[float] = 5.0

    def __init__(
        self,
        path: Path,
        lock_path: Path,
        *,
        durability: str = "full",
        mailbox_size: int = 256,
        max_batch: int = 256,
        readonly: bool = False,
    ) -> None:
        super().__init__(mailbox_size=mailbox_size, max_batch=max_batch)
        self.path = path
        self.lock_path = lock_path
        self.durability = durability
        self.readonly = readonly
        self._wal_path = path.with_name(path.name + "-wal")
        #: the WAL file, open for fstat (see _wal_size); writer thread only
        self._wal_fd: int | None = None
        #: _wal_size calls since the descriptor's link was last checked
        self._wal_checks = 0
        self._worker: OwnerThread | None = None
        self._conn: sqlite3.Connection | None = None
        self._reader: OwnerThread | None = None
        self._read_conn: sqlite3.Connection | None = None
        self._lock = FsLock(lock_path, keep_open=not readonly)
        #: set when teardown starts: a batch still waiting for the fslock stops waiting.
        self._closing = threading.Event()
        self._data_version = -1
        self._checkpointer: OwnerThread | None = None
        self._checkpointing: threading.Event | None = None
        self._checkpoint_conn: sqlite3.Connection | None = None
        self._since_checkpoint = self._commits_since_checkpoint = self._checkpoint_rounds = 0
        #: the WAL bound in force, and when a restart that found readers in the way may be retried.
        self._wal_bound = self.wal_limit
        self._next_restart = 0.0
        #: bytes of WAL file SQLite keeps after a restart (``journal_size_limit``), 0 until open.
        self.wal_kept = 0
        #: how often the bound forced a restart, and how often readers kept it from happening.
        self.wal_restarts = self.wal_restarts_missed = 0
        self.wal_restart_seconds = 0.0

    # -- lifecycle ---------------------------------------------------------------------------------

    async def setup(self) -> None:
        try:
            if not self.readonly:
                self._worker = OwnerThread(f"pforge-{self.name}")
                self._checkpointer = OwnerThread(f"pforge-{self.name}-ckpt")
                await self._worker.run(self._open_writer)
            self._reader = OwnerThread(f"pforge-{self.name}-read")
            await self._reader.run(self._open_reader)
        except BaseException as exc:
            with anyio.CancelScope(shield=True):
                await self.teardown()
            if isinstance(exc, (sqlite3.Error, OSError, UnicodeDecodeError)):
                raise translate(self.path, exc) from exc
            raise

    #: seconds teardown waits for one thread's queued jobs before it leaves the thread behind.
    close_wait: ClassVar[float] = 30.0

    async def teardown(self) -> None:
        self._closing.set()
        # Every thread is told to close its connection before anything is awaited, and a teardown
        # cut short (the event loop closing on a second Ctrl-C) still tells each one to end. The
        # threads are daemons, and each wait below is bounded.
        threads = []
        for thread, close in (
            (self._checkpointer, self._close_checkpoint_conn),
            (self._reader, self._close_reader),
            (self._worker, self._close_writer),
        ):
            if thread is not None:
                thread.post(close)
                threads.append(thread)
        self._checkpointer = self._reader = self._worker = None
        try:
            for thread in threads:
                await thread.stop(wait=self.close_wait)
        finally:
            for thread in threads:
                thread.stop_nowait()
            self._lock.close()

    def _close_checkpoint_conn(self) -> None:
        if self._checkpoint_conn is not None:
            conn, self._checkpoint_conn = self._checkpoint_conn, None
            conn.close()

    def _close_reader(self) -> None:
        if self._read_conn is not None:
            conn, self._read_conn = self._read_conn, None
            conn.close()

    def _close_writer(self) -> None:
        if self._wal_fd is not None:
            fd, self._wal_fd = self._wal_fd, None
            os.close(fd)
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.close()

    def _check_version(self, conn: sqlite3.Connection) -> int:
        version: int = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > self.schema_version:
            raise StorageError(
                f"database {self.path} has schema version {version}, newer than this "
                f"pforge_async understands ({self.schema_version}); it was left untouched"
            )
        return version

    def _open_writer(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10)
        try:
            # Read the version before any pragma can write to the file.
            version = self._check_version(conn)
            if version == 0 and not conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchone():
                # Only a database without tables can take it: free pages can then leave the file
                # (see compact); an older one is converted there, once, if it is small.
                conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
            conn.execute("PRAGMA journal_mode = WAL")
            # Zero what a delete or update frees (cells, freelist pages), so erased bytes do not
            # linger in free space: compact then takes them out of the WAL and the file's end.
            conn.execute("PRAGMA secure_delete = ON")
            # Checkpoints run beside the writer (see _checkpoint), never inside a caller's commit.
            conn.execute("PRAGMA wal_autocheckpoint = 0")
            sync = "FULL" if self.durability == "full" else "NORMAL"
            conn.execute(f"PRAGMA synchronous = {sync}")
            conn.execute("PRAGMA foreign_keys = ON")
            if version < self.schema_version:
                with FsLock(self.lock_path):
                    self._migrate(conn)
            free = free_bytes(self.path.parent)
            reserve = min(self.wal_reserve, free // self.wal_reserve_share) & ~((1 << 20) - 1)
            self._wal_bound = max(1 << 20, min(self.wal_limit, free // 8))
            # A restarted WAL is cut back to the bound by its first commit, so a WAL that once grew
            # past it (a read held it) gives the space back; a lap within the bound keeps its
            # blocks (cutting back to the reserve would make every lap grow the file again).
            conn.execute(f"PRAGMA journal_size_limit = {self._wal_bound}")
            self.wal_kept = self._wal_bound
            if self.durability == "full" and reserve:
                self._reserve_wal(conn, reserve)
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def _open_reader(self) -> None:
        if self.readonly:
            conn = self._connect_readonly()
        else:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10)
            conn.execute("PRAGMA query_only = ON")
        self._read_conn = conn

    def _connect_readonly(self) -> sqlite3.Connection:
        """A read-only connection, for a user who may not write the store's directory.

        ``mode=ro`` reads a WAL database, sees a live writer's commits and takes part in its
        locking, as long as the ``-shm`` file exists or can be created. Where it cannot (a
        directory we may not write, a full disk; no writer live, so no ``-shm`` and no frames in a
        ``-wal``), the database is opened ``immutable``: nobody has it open, and a writer that
        opens it while we read is not seen (SQLite then assumes the file does not change under it).
        """
        uri = "file:" + urllib.parse.quote(str(self.path.absolute()))
        if not self.path.exists():
            raise StorageError(f"database {self.path} does not exist (a read-only open creates nothing)")
        try:
            conn = self._checked_readonly(uri + "?mode=ro")
        except sqlite3.OperationalError as exc:
            if _primary_code(exc) not in (_SQLITE_CANTOPEN, _SQLITE_READONLY, _SQLITE_IOERR) or self._may_be_live():
                raise
            conn = self._checked_readonly(uri + "?mode=ro&immutable=1")
        return conn

    def _may_be_live(self) -> bool:
        """Whether a writer may have the database open, or left commits in its WAL: a ``-wal`` with
        frames, or a ``-shm`` as one in use is (SQLite maps it in regions of 32 KiB). A failed
        ``mode=ro`` open on a full disk leaves an empty ``-wal`` and a ``-shm`` cut short."""
        for path, empty_below in ((self._wal_path, 1), (self.path.with_name(self.path.name + "-shm"), _SHM_REGION)):
            try:
                if os.stat(path).st_size >= empty_below:
                    return True
            except FileNotFoundError:
                pass
        return False

    def _checked_readonly(self, uri: str) -> sqlite3.Connection:
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False, timeout=10)
        try:
            version = self._check_version(conn)
            if version < self.schema_version:
                raise StorageError(
                    f"database {self.path} has schema version {version}, older than this pforge_async "
                    f"uses ({self.schema_version}); open the store writable once to upgrade it"
                )
        except BaseException:
            conn.close()
            raise
        return conn

    def _reserve_wal(self, conn: sqlite3.Connection, reserve: int) -> None:
        """Give the WAL file its blocks before the first commit needs them.

        Under ``synchronous=FULL`` every commit syncs the WAL, and syncing a write into blocks the
        file already has costs about half of syncing one that grows the file (no metadata to
        journal). SQLite reuses its WAL from the start once it is checkpointed (see
        :meth:`_maybe_checkpoint`), so after the first lap the file has its blocks anyway; this
        gives them to the first lap too. Zeros past the last frame are what SQLite itself leaves
        behind a restarted WAL: recovery stops at the first frame whose salt does not match. They
        are written only under SQLite's write lock, so no other connection is appending frames.
        """
        with self._lock:
            conn.execute("BEGIN IMMEDIATE")
            try:
                fd = os.open(self._wal_path, os.O_WRONLY)
                try:
                    size = os.fstat(fd).st_size
                    if size < reserve:
                        chunk = bytes(1 << 20)
                        while size < reserve:
                            size += os.pwrite(fd, chunk[: reserve - size], size)
                        os.fdatasync(fd)
                finally:
                    os.close(fd)
            except FileNotFoundError:
                pass  # no WAL file yet: nothing to give blocks to
            except OSError:  # a disk that filled meanwhile, say: commits still work, only slower
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
    #: statements per command: a ``PforgeError`` out of its ``apply`` then fails just that command,
    #: and anything else rolls the batch back and runs it again without the command that raised.
    savepoints: ClassVar[bool] = True

    @abstractmethod
    def apply(self, conn: sqlite3.Connection, command: C) -> Any:
        """Run one command inside the batch's transaction and return its reply. Raise a
        ``PforgeError`` to fail just this command."""

    def begin(self, conn: sqlite3.Connection, changed_elsewhere: bool, commands: Sequence[C]) -> None:
        """A batch of ``commands`` starts (its transaction has begun). ``changed_elsewhere``: another
        connection (process) committed since our last batch, so anything cached from the database is
        stale. A subclass may read here, for the whole batch at once, what its commands will look up."""

    def flush(self, conn: sqlite3.Connection) -> None:
        """Write what the batch's commands deferred; runs just before the commit."""

    def abort(self) -> None:
        """The batch was rolled back: forget whatever it cached or deferred."""

    async def handle_batch(self, commands: Sequence[C]) -> list[Any]:
        worker = self._worker
        if worker is None:
            if self.readonly:
                return [Failed(InvalidInput(f"{type(c).__name__}: {self.path} is open read-only")) for c in commands]
            raise ActorClosed(f"database {self.path} is closed")
        outcomes: list[Any] = await worker.run(self._transact, commands)
        return outcomes

    def _transact(self, commands: Sequence[C]) -> list[Any]:
        """Run a batch and say, for each command, what became of it.

        Precisely: a command that fails alone (its own ``PforgeError``, or an error its savepoint
        rolled back) fails only its caller, and the rest commit. A command whose failure took the
        transaction with it is failed, and the batch runs again without it. When the transaction
        cannot begin, flush or commit, nothing of the batch is stored and every caller learns why;
        if that failure is not one of the storage (a constraint a flush broke, say), each command
        then runs in a transaction of its own so only the one at fault fails.
        """
        conn = self._conn
        if conn is None:
            return [Failed(ActorClosed(f"database {self.path} is closed")) for _ in commands]
        try:
            # Waits for the writers of other processes, unless teardown calls the wait off.
            self._lock.acquire(abandon=self._closing)
        except LockTimeout:
            if not self._closing.is_set():
                raise
            return [Failed(ActorClosed(f"database {self.path} closed while this command waited")) for _ in commands]
        try:
            try:
                self._bound_wal(conn)
            except Exception:  # the batch can run with a long WAL; the next one tries again
                log.warning("could not bound the WAL of %s", self.path, exc_info=True)
            try:
                outcomes = self._try_batch(conn, list(commands))
            except _BatchFailed as failed:
                outcomes, committed = self._retry(conn, commands, failed)
                if not committed:
                    return outcomes
        finally:
            self._lock.release()
        try:
            self._maybe_checkpoint(conn, len(commands))
        except Exception:  # the batch is committed: nothing here may report it failed
            log.warning("checkpoint of %s could not start; the next batch will retry", self.path, exc_info=True)
        return outcomes

    def _retry(self, conn: sqlite3.Connection, commands: Sequence[C], failed: _BatchFailed) -> tuple[list[Any], bool]:
        """The rest of :meth:`_transact` for a batch whose transaction failed, under the lock it
        holds (off the path of a batch that commits at once): the outcome of each command, and
        whether a transaction committed."""
        outcomes: list[Any] = [None] * len(commands)
        todo = list(range(len(commands)))
        while True:
            error = translate(self.path, failed.cause)
            if failed.culprit is not None:
                outcomes[todo.pop(failed.culprit)] = Failed(self._command_error(failed.cause, error))
                if not todo:
                    return outcomes, True
                try:
                    for i, outcome in zip(todo, self._try_batch(conn, [commands[i] for i in todo]), strict=True):
                        outcomes[i] = outcome
                    return outcomes, True
                except _BatchFailed as again:
                    failed = again
                    continue
            if len(todo) > 1 and not _is_storage_failure(error):
                for i in todo:
                    try:
                        outcomes[i] = self._try_batch(conn, [commands[i]])[0]
                    except _BatchFailed as alone:
                        outcomes[i] = Failed(translate(self.path, alone.cause))
                return outcomes, True
            for n, i in enumerate(todo):
                done = failed.outcomes[n] if n < len(failed.outcomes) else None
                outcomes[i] = done if isinstance(done, Failed) else Failed(error)
            return outcomes, False

    def _try_batch(self, conn: sqlite3.Connection, commands: list[C]) -> list[Any]:
        """One transaction for ``commands``: their outcomes once committed, else ``_BatchFailed``."""
        try:
            conn.execute("BEGIN IMMEDIATE")
            version = conn.execute("PRAGMA data_version").fetchone()[0]
            self.begin(conn, version != self._data_version, commands)
        except Exception as exc:
            self._rollback(conn)
            raise _BatchFailed(exc) from exc
        outcomes: list[Any] = []
        try:
            if self.savepoints:
                for i, command in enumerate(commands):
                    try:
                        outcomes.append(self._apply_one(conn, command))
                    except _BatchFailed as failed:
                        failed.culprit = i
                        raise
            else:
                apply = self.apply
                for command in commands:
                    try:
                        outcomes.append(apply(conn, command))
                    except PforgeError as exc:
                        outcomes.append(Failed(exc))
                    except Exception as exc:
                        # It may have deferred half its writes: only a rollback of the batch is sure.
                        culprit = _BatchFailed(exc, len(outcomes))
                        raise culprit from exc
            self.flush(conn)
            conn.execute("COMMIT")
        except _BatchFailed as failed:
            self._rollback(conn)
            failed.outcomes = outcomes
            raise
        except Exception as exc:
            self._rollback(conn)
            ended = _BatchFailed(exc)
            ended.outcomes = outcomes
            raise ended from exc
        except BaseException:
            self._rollback(conn)
            raise
        self._data_version = version  # our own commits leave it as it is
        return outcomes

    def _apply_one(self, conn: sqlite3.Connection, command: C) -> Any:
        """One command in a savepoint of its own (``savepoints``; _try_batch runs them otherwise)."""
        conn.execute("SAVEPOINT command")
        try:
            reply = self.apply(conn, command)
        except Exception as exc:
            if not conn.in_transaction:  # SQLite rolled the whole transaction back (a full disk, say)
                raise _BatchFailed(exc) from exc
            try:
                conn.execute("ROLLBACK TO command")
                conn.execute("RELEASE command")
            except sqlite3.Error as undo:
                raise _BatchFailed(exc) from undo
            return Failed(self._command_error(exc, translate(self.path, exc)))
        conn.execute("RELEASE command")
        return reply

    def _command_error(self, cause: BaseException, error: PforgeError) -> PforgeError:
        if not isinstance(cause, (PforgeError, sqlite3.Error, OSError, OverflowError, UnicodeEncodeError)):
            # Not an error a command is expected to meet: a bug, worth a trace, yet one that
            # fails only the command that met it.
            log.error("%s: a command failed unexpectedly", self.name, exc_info=cause)
        return error

    def _rollback(self, conn: sqlite3.Connection) -> None:
        self.abort()
        self._data_version = -1
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                log.exception("rollback of %s failed", self.path)

    # -- the WAL -----------------------------------------------------------------------------------

    #: batches between checks that the WAL descriptor still names a linked file (see _wal_size)
    wal_link_check_every: ClassVar[int] = 64

    def _wal_size(self) -> int:
        """The WAL file's size, by ``lseek`` to the end of a descriptor kept open (every batch asks:
        an ``fstat`` builds a stat result, ten times the work, and a stat by path more). While our
        writer is open SQLite never deletes the file, so the descriptor stays the file's; every
        :attr:`wal_link_check_every` batches an ``fstat`` makes sure, and a descriptor whose file lost
        its last link is dropped for a fresh open."""
        fd = self._wal_fd
        try:
            if fd is None:
                fd = self._wal_fd = os.open(self._wal_path, os.O_RDONLY | os.O_CLOEXEC)
                self._wal_checks = 0
            self._wal_checks += 1
            if self._wal_checks < self.wal_link_check_every:
                return os.lseek(fd, 0, os.SEEK_END)
            self._wal_checks = 0
            st = os.fstat(fd)
            if st.st_nlink:
                return st.st_size
        except OSError:
            pass
        if fd is not None:
            self._wal_fd = None
            os.close(fd)
        try:
            return os.stat(self._wal_path).st_size
        except OSError:
            return 0

    def _bound_wal(self, conn: sqlite3.Connection) -> None:
        """Keep the WAL file under :attr:`wal_limit`, whatever the number of writer processes.

        Runs at the start of every batch, under the fslock that every writer of this database
        (of any process) holds around its batch, so no frame is appended meanwhile. The
        checkpoints of :meth:`_maybe_checkpoint` keep one process's WAL short; but with several
        processes writing in turn a checkpoint beside the writers never reaches the end of the
        WAL, and SQLite only rewrites a WAL from its start once it was checkpointed to its end
        and no reader still uses it, so the file grows without end. Here, a WAL found over the
        bound is checkpointed to its end (RESTART: it waits, at most ``wal_restart_wait``
        seconds, for readers of any process to leave the old frames), so this batch starts the
        WAL afresh and ``journal_size_limit`` cuts the file back to the reserve. The WAL thus
        ends a batch at most one batch's pages over the bound. Only a read that lasts longer
        than the wait (none of ours does) can keep the restart from happening; the next batch
        after a second tries again.
        """
        if self._wal_size() <= self._wal_bound or time.monotonic() < self._next_restart:
            return
        started = time.monotonic()
        deadline = started + self.wal_restart_wait
        try:
            while True:
                left = max(0.0, deadline - time.monotonic())
                conn.execute(f"PRAGMA busy_timeout = {int(left * 1000)}")
                busy = conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()[0]
                if not busy:
                    self.wal_restarts += 1
                    return
                # Another checkpoint (one of ours beside a writer, in some process) holds the
                # checkpoint lock, or a reader stayed: they end soon, nobody appends meanwhile.
                if time.monotonic() >= deadline:
                    self.wal_restarts_missed += 1
                    self._next_restart = time.monotonic() + 1.0
                    log.warning(
                        "WAL of %s is %d bytes and readers kept it from restarting for %.0fs",
                        self.path,
                        self._wal_size(),
                        self.wal_restart_wait,
                    )
                    return
                time.sleep(0.002)
        except sqlite3.Error:
            # A checkpoint that fails (a full disk) is no reason to fail the batch behind it.
            self._next_restart = time.monotonic() + 1.0
            log.warning("could not restart the WAL of %s", self.path, exc_info=True)
        finally:
            self.wal_restart_seconds += time.monotonic() - started
            conn.execute("PRAGMA busy_timeout = 10000")

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
        take in their replies. (With writers in other processes, see :meth:`_bound_wal`.)
        """
        # Both counters restart whenever a checkpoint starts beside us: while one runs, they count
        # the commits landing during it; after the writer's share, the commits of the next lap.
        self._since_checkpoint += commands
        self._commits_since_checkpoint += 1
        running = self._checkpointing
        if running is not None:
            if running.is_set():
                self._checkpoint_rounds += 1
                if self._commits_since_checkpoint > 1 and self._checkpoint_rounds < 8:
                    self._start_checkpoint()
                else:
                    self._checkpointing = None
                    if (worker := self._worker) is not None:
                        worker.post(self._finish_checkpoint, conn)
        elif (
            self._since_checkpoint >= self.checkpoint_every
            or self._commits_since_checkpoint >= self.checkpoint_every_commits
        ):
            self._checkpoint_rounds = 0
            self._start_checkpoint()

    def _start_checkpoint(self) -> None:
        checkpointer = self._checkpointer
        if checkpointer is None:
            return
        self._since_checkpoint = self._commits_since_checkpoint = 0
        self._checkpointing = done = threading.Event()
        checkpointer.post(self._checkpoint, done)

    def _finish_checkpoint(self, conn: sqlite3.Connection) -> None:
        if conn is not self._conn:
            return  # closed meanwhile
        try:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error:
            log.warning("checkpoint of %s failed; the next one will retry", self.path, exc_info=True)

    def _checkpoint(self, done: threading.Event) -> None:
        """Copy the WAL back into the database (PASSIVE: never waits for, nor blocks, the writer or
        readers), on a connection and thread of its own."""
        try:
            if self._checkpoint_conn is None:
                self._checkpoint_conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._checkpoint_conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error:
            log.warning("checkpoint of %s failed; the next one will retry", self.path, exc_info=True)
        finally:
            done.set()

    # -- space -------------------------------------------------------------------------------------

    #: pages one ``incremental_vacuum`` slice gives back: one short write transaction under the lock
    compact_slice_pages: ClassVar[int] = 256
    #: a database made before ``auto_vacuum`` (mode NONE) up to this size is converted by one VACUUM
    #: at its first compact; it holds the writers' lock while it rewrites the file (here about 0.05 s
    #: a MiB), so a larger one keeps its free pages (zeroed) for later writes instead
    compact_convert_limit: ClassVar[int] = 8 << 20
    #: tries of the closing ``wal_checkpoint(TRUNCATE)``, each waiting at most ``compact_truncate_wait``
    #: seconds for readers while it holds the writers' lock; writers run between tries
    compact_truncate_attempts: ClassVar[int] = 20
    compact_truncate_wait: ClassVar[float] = 0.05

    def files_size(self) -> int:
        """Bytes of the database file and its WAL on disk now."""
        total = 0
        for path in (self.path, self._wal_path):
            try:
                total += os.stat(path).st_size
            except OSError:
                pass
        return total

    async def compact(self) -> int:
        """Give the space of deleted rows back to the file system; returns the bytes the database and
        its WAL shrank by (0 if they did not).

        Free pages leave the end of the file by ``incremental_vacuum`` in slices of
        :attr:`compact_slice_pages` pages, each its own transaction under the lock every writer of the
        database (of any process) takes, so writers wait at most a slice. A database made before
        ``auto_vacuum`` is converted once if it is small (:attr:`compact_convert_limit`), else keeps
        its free pages (zeroed: ``secure_delete``) for later writes. Then the WAL is checkpointed and
        truncated (``wal_checkpoint(TRUNCATE)``, retried while readers hold it), so deleted and
        erased bytes are in no file of the database. Safe beside readers and writers of other
        processes; a compact cut short anywhere leaves a sound database (each step is a transaction
        or a checkpoint)."""
        if self.readonly:
            raise InvalidInput(f"{self.path} is open read-only: compact needs a writable store")
        before = self.files_size()
        await self._on_writer(self._convert_to_incremental)
        while await self._on_writer(self._vacuum_slice):
            pass
        for attempt in range(self.compact_truncate_attempts):
            if await self._on_writer(self._truncate_wal):
                break
            if attempt + 1 < self.compact_truncate_attempts:
                await anyio.sleep(self.compact_truncate_wait)
        else:
            log.info("compact of %s: readers kept the WAL from being truncated; the next compact retries", self.path)
        return max(0, before - self.files_size())

    async def _on_writer(self, step: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run ``step(conn)`` on the writer's thread (between batches), under the writers' lock."""
        worker = self._worker
        if worker is None:
            raise ActorClosed(f"database {self.path} is closed")
        try:
            return await worker.run(self._locked_step, step)
        except PforgeError:
            raise
        except Exception as exc:
            raise translate(self.path, exc) from exc

    def _locked_step(self, step: Callable[[sqlite3.Connection], Any]) -> Any:
        conn = self._conn
        if conn is None:
            raise ActorClosed(f"database {self.path} is closed")
        try:
            self._lock.acquire(abandon=self._closing)
        except LockTimeout as exc:
            raise ActorClosed(f"database {self.path} closed while compact waited") from exc
        try:
            return step(conn)
        finally:
            self._lock.release()

    def _convert_to_incremental(self, conn: sqlite3.Connection) -> None:
        if conn.execute("PRAGMA auto_vacuum").fetchone()[0] != 0:
            return
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        size = pages * conn.execute("PRAGMA page_size").fetchone()[0]
        if size > self.compact_convert_limit:
            return
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        conn.execute("VACUUM")

    def _vacuum_slice(self, conn: sqlite3.Connection) -> bool:
        """One slice of free pages off the end of the file; whether another slice may find more."""
        if conn.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:
            return False
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
        if not free:
            return False
        conn.execute(f"PRAGMA incremental_vacuum({int(self.compact_slice_pages)})").fetchall()
        left = conn.execute("PRAGMA freelist_count").fetchone()[0]
        return bool(0 < left < free)

    def _truncate_wal(self, conn: sqlite3.Connection) -> bool:
        """One try at checkpointing the whole WAL and truncating it to nothing; False if busy."""
        conn.execute(f"PRAGMA busy_timeout = {int(self.compact_truncate_wait * 1000)}")
        try:
            busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        except sqlite3.OperationalError:
            busy = 1  # SQLite's own locks stayed taken for the whole wait
        finally:
            conn.execute("PRAGMA busy_timeout = 10000")
        return not busy

    # -- verification ------------------------------------------------------------------------------

    #: (what is wrong, a query that returns the offending rows): relations the data must keep.
    invariants: ClassVar[tuple[tuple[str, str], ...]] = ()

    async def check(self) -> list[str]:
        """SQLite's own ``integrity_check``, then every invariant of this database; what is wrong."""
        try:
            rows = await self.fetchall("PRAGMA integrity_check")
        except IntegrityError as exc:  # too damaged to be checked at all
            return [f"{self.path.name}: {exc}"]
        problems = [f"{self.path.name}: {row[0]}" for row in rows if row[0] != "ok"]
        for what, query in self.invariants:
            try:
                found = await self.fetchall(query + " LIMIT 10")
            except IntegrityError as exc:
                problems.append(f"{self.path.name}: {what}: {exc}")
                continue
            if found:
                problems.append(f"{self.path.name}: {what}: {', '.join(str(tuple(r)) for r in found)}")
        return problems

    # -- reads -------------------------------------------------------------------------------------

    async def fetchall(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[Any]:
        """Every row ``sql`` selects, read on the reader's own connection and thread.

        One trip to that thread per query; the statement runs to its end there, so no read keeps a
        snapshot (and the WAL frames under it) past its own call.
        """
        reader = self._reader
        if reader is None:
            raise ActorClosed(f"database {self.path} is closed")
        try:
            rows: list[Any] = await reader.run(self._read, sql, params)
        except ActorClosed:
            raise
        except Exception as exc:
            raise translate(self.path, exc) from exc
        return rows

    def _read(self, sql: str, params: Sequence[Any] | dict[str, Any]) -> list[Any]:
        conn = self._read_conn
        if conn is None:
            raise ActorClosed(f"database {self.path} is closed")
        return conn.execute(sql, params).fetchall()

    async def fetchone(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> Any:
        rows = await self.fetchall(sql, params)
        return rows[0] if rows else None
