"""No input and no I/O error kills an actor: which callers of a batch fail, and why; the one
translation boundary; a read-only open."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, ClassVar

import anyio
import msgspec
import pytest

from pforge_async import (
    ActorClosed,
    Conflict,
    IntegrityError,
    InvalidInput,
    NonceReplayed,
    PforgeError,
    StorageError,
    open_store,
)
from pforge_async.actor import Actor, Failed
from pforge_async.ledgers.nonces import NonceActor, NonceLedger
from pforge_async.sqlite.actor import SqliteActor, translate

from ._procs import ROOT

pytestmark = pytest.mark.anyio


class Put(msgspec.Struct, frozen=True, tag=True):
    key: str


class Raise(msgspec.Struct, frozen=True, tag=True):
    """Write a row, then raise: ``what`` names the error."""

    key: str
    what: str


ProbeCommand = Put | Raise


def _error(what: str) -> BaseException:
    return {
        "replayed": NonceReplayed("seen before"),
        "bug": TypeError("a bug in one command"),
        "ioerr": sqlite3.OperationalError("disk I/O error"),
        "overflow": OverflowError("Python int too large to convert to SQLite INTEGER"),
    }[what]


class Probe(SqliteActor[ProbeCommand]):
    """Rows in the nonces table; commands that fail in every way a command can."""

    command_type = ProbeCommand
    name = "probe"
    schema_file = "nonces_schema.sql"
    schema_version = 1
    #: raised by the next flush (then forgotten): a commit that cannot happen.
    fail_flush: BaseException | None = None

    def apply(self, conn: sqlite3.Connection, command: ProbeCommand) -> Any:
        conn.execute("INSERT INTO nonces VALUES (?, 's', 0, 1, NULL)", (command.key,))
        if isinstance(command, Raise):
            raise _error(command.what)
        return command.key

    def flush(self, conn: sqlite3.Connection) -> None:
        error, self.fail_flush = self.fail_flush, None
        if error is not None:
            raise error


class DeferringProbe(Probe):
    """Like TurnActor: no savepoints, writes deferred to the flush."""

    name = "deferring-probe"
    savepoints = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pending: list[str] = []
        self.aborts = 0

    def apply(self, conn: sqlite3.Connection, command: ProbeCommand) -> Any:
        error = _error(command.what) if isinstance(command, Raise) else None
        if isinstance(error, PforgeError):
            raise error  # the contract: a PforgeError before anything is deferred
        self.pending.append(command.key)
        if error is not None:
            raise error  # anything else may come half-way: only a rollback undoes what it deferred
        return command.key

    def flush(self, conn: sqlite3.Connection) -> None:
        rows, self.pending = self.pending, []
        conn.executemany("INSERT INTO nonces VALUES (?, 's', 0, 1, NULL)", [(k,) for k in rows])
        super().flush(conn)

    def abort(self) -> None:
        self.pending = []
        self.aborts += 1


@asynccontextmanager
async def running(actor: Actor[Any]) -> AsyncIterator[Any]:
    async with anyio.create_task_group() as tg:
        await tg.start(actor.run)
        try:
            yield actor
        finally:
            await actor.aclose()


async def _keys(actor: SqliteActor[Any]) -> set[str]:
    return {row[0] for row in await actor.fetchall("SELECT nonce FROM nonces")}


def _failure(outcome: object) -> BaseException:
    assert isinstance(outcome, Failed), outcome
    return outcome.error


@pytest.fixture(params=[Probe, DeferringProbe])
def probe(request: pytest.FixtureRequest, tmp_path: Path) -> Probe:
    cls: type[Probe] = request.param
    return cls(tmp_path / "probe.db", tmp_path / "probe.lock")


async def test_a_failing_command_fails_only_its_caller_and_its_neighbours_commit(probe: Probe) -> None:
    async with running(probe):
        outcomes = await probe.handle_batch(
            [
                Put("a"),
                Raise("b", "replayed"),
                Put("c"),
                Raise("d", "bug"),
                Put("e"),
                Raise("f", "ioerr"),
                Raise("g", "overflow"),
                Put("h"),
            ]
        )
        assert [outcomes[i] for i in (0, 2, 4, 7)] == ["a", "c", "e", "h"]
        assert isinstance(_failure(outcomes[1]), NonceReplayed)
        bug = _failure(outcomes[3])
        assert isinstance(bug, PforgeError) and "a bug in one command" in str(bug)
        assert isinstance(_failure(outcomes[5]), StorageError)
        assert isinstance(_failure(outcomes[6]), InvalidInput)
        # What a failed command wrote is gone; what its neighbours wrote is there.
        assert await _keys(probe) == {"a", "c", "e", "h"}
        assert await probe.call(Put("later")) == "later"


async def test_a_commit_that_fails_fails_every_caller_of_the_batch_and_nothing_else(probe: Probe) -> None:
    async with running(probe):
        probe.fail_flush = sqlite3.OperationalError("database or disk is full")
        outcomes = await probe.handle_batch([Put("a"), Put("b"), Raise("c", "replayed")])
        errors = [_failure(o) for o in outcomes]
        assert all(isinstance(e, StorageError) and "disk is full" in str(e) for e in errors[:2])
        assert isinstance(errors[2], NonceReplayed)  # it failed on its own account
        assert await _keys(probe) == set()
        # The same connection serves the next batch; nothing of the failed one comes back.
        assert await probe.handle_batch([Put("d")]) == ["d"]
        assert await _keys(probe) == {"d"}


async def test_a_flush_that_breaks_a_constraint_fails_only_the_command_at_fault(probe: Probe) -> None:
    async with running(probe):
        await probe.call(Put("taken"))
        outcomes = await probe.handle_batch([Put("a"), Put("taken"), Put("b")])
        assert outcomes[0] == "a" and outcomes[2] == "b"
        assert isinstance(_failure(outcomes[1]), Conflict)
        assert await _keys(probe) == {"taken", "a", "b"}


async def test_a_deferring_actor_forgets_what_a_failed_command_deferred(tmp_path: Path) -> None:
    probe = DeferringProbe(tmp_path / "p.db", tmp_path / "p.lock")
    async with running(probe):
        outcomes = await probe.handle_batch([Put("a"), Raise("b", "bug"), Put("c")])
        assert outcomes[0] == "a" and outcomes[2] == "c"
        assert probe.aborts == 1  # the batch was rolled back once, then ran again without "b"
        assert await _keys(probe) == {"a", "c"}


class Batchy(Actor[Put]):
    command_type = Put
    name = "batchy"
    raise_next: BaseException | None = None

    async def handle_batch(self, commands: Sequence[Put]) -> list[Any]:
        error, self.raise_next = self.raise_next, None
        if error is not None:
            raise error
        return [c.key for c in commands]


async def test_a_pforge_error_out_of_a_handler_fails_its_batch_and_the_actor_serves_on() -> None:
    actor = Batchy()
    async with running(actor):
        actor.raise_next = StorageError("the store's disk went away")
        with pytest.raises(StorageError, match="went away"):
            await actor.call(Put("a"))
        assert await actor.call(Put("b")) == "b"


async def test_a_bug_in_a_handler_kills_the_actor_and_every_caller_learns_why() -> None:
    actor = Batchy()
    async with running(actor):
        actor.raise_next = ZeroDivisionError("the bug")
        with pytest.raises(ActorClosed, match="batchy died: ZeroDivisionError") as died:
            await actor.call(Put("a"))
        assert isinstance(died.value.__cause__, ZeroDivisionError)
        with pytest.raises(ActorClosed, match="the bug"):
            await actor.call(Put("b"))


def test_translate_is_the_one_boundary(tmp_path: Path) -> None:
    db = tmp_path / "x.db"

    def sqlite_error(cls: type[sqlite3.Error], text: str, code: int) -> sqlite3.Error:
        error = cls(text)
        error.sqlite_errorcode = code  # type: ignore[attr-defined]
        return error

    corrupt = translate(db, sqlite_error(sqlite3.DatabaseError, "database disk image is malformed", 11))
    assert isinstance(corrupt, IntegrityError) and str(db) in str(corrupt)
    notadb = translate(db, sqlite_error(sqlite3.DatabaseError, "file is not a database", 26))
    assert isinstance(notadb, IntegrityError) and str(db) in str(notadb)
    full = translate(db, sqlite_error(sqlite3.OperationalError, "database or disk is full", 13))
    assert isinstance(full, StorageError) and "disk is full" in str(full)
    ioerr = translate(db, sqlite_error(sqlite3.OperationalError, "disk I/O error", 10 | (4 << 8)))
    assert isinstance(ioerr, StorageError) and not isinstance(ioerr, IntegrityError)
    assert isinstance(translate(db, OSError(28, "No space left on device")), StorageError)
    assert isinstance(translate(db, sqlite3.ProgrammingError("Cannot operate on a closed database.")), ActorClosed)
    assert isinstance(translate(db, OverflowError("int too large")), InvalidInput)
    assert isinstance(translate(db, sqlite_error(sqlite3.IntegrityError, "UNIQUE constraint failed", 19)), Conflict)
    for error in (corrupt, full, ioerr):
        assert isinstance(error, PforgeError)


async def test_a_damaged_page_is_an_integrity_error_naming_the_file_and_the_actor_serves_on(tmp_path: Path) -> None:
    db = tmp_path / "probe.db"
    async with running(Probe(db, tmp_path / "probe.lock")) as probe:
        for n in range(300):
            await probe.call(Put(f"key-{n:04d}-" + "x" * 200))
    # Damage the pages of the table's b-tree (every page after the first two), not the header.
    data = bytearray(db.read_bytes())
    page = 4096
    for offset in range(2 * page, len(data), page):
        data[offset : offset + 64] = b"\xff" * 64  # no valid page type
    db.write_bytes(bytes(data))
    async with running(Probe(db, tmp_path / "probe.lock")) as probe:
        with pytest.raises(IntegrityError, match=r"probe\.db"):
            await probe.fetchall("SELECT count(*), max(subject) FROM nonces")
        outcome = await probe.handle_batch([Put("after")])
        assert isinstance(_failure(outcome[0]), IntegrityError)
        problems = await probe.check()
        assert problems and all("probe.db" in p for p in problems)
        # Still serving: a read that does not touch the damage works.
        assert await probe.fetchall("SELECT 1") == [(1,)]


# -- read-only ---------------------------------------------------------------------------------


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory another user can read (pytest's own tmp_path is private to us)."""
    path = Path(tempfile.mkdtemp(prefix="pforge-ro-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        path.chmod(0o755)
        for child in path.iterdir():
            child.unlink()
        path.rmdir()


_READER = """
import json, sys
from pathlib import Path
import anyio
from pforge_async import InvalidInput
from pforge_async.ledgers.nonces import NonceActor, NonceLedger

async def main():
    actor = NonceActor(Path(sys.argv[1]), Path(sys.argv[2]), readonly=True)
    seen = {}
    async with anyio.create_task_group() as tg:
        await tg.start(actor.run)
        seen["rows"] = sorted(r[0] for r in await actor.fetchall("SELECT subject FROM nonces"))
        try:
            await NonceLedger(actor).issue("new", 60)
        except InvalidInput as exc:
            seen["write"] = str(exc)
        if len(sys.argv) > 3:  # wait for the writer's next commit, then read again
            print(json.dumps(seen), flush=True)
            sys.stdin.readline()
            seen["rows"] = sorted(r[0] for r in await actor.fetchall("SELECT subject FROM nonces"))
        await actor.aclose()
    print(json.dumps(seen), flush=True)

anyio.run(main)
"""


def _as_reader(*args: object) -> subprocess.Popen[str]:
    """The reader in a child process that may not write the directory: user ``nobody`` when we are
    root (root writes anywhere), else ourselves with the directory made read-only."""
    argv = [sys.executable, "-c", _READER, *map(str, args)]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        assert setpriv is not None, "running as root, and no setpriv(1) to read the store as another user"
        argv = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", *argv]
    return subprocess.Popen(
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )


def _seal(directory: Path) -> None:
    """Nobody but root may write ``directory`` or its files."""
    for child in directory.iterdir():
        child.chmod(0o644)
    directory.chmod(0o755 if os.geteuid() == 0 else 0o555)


async def test_a_read_only_open_reads_a_store_it_may_not_write_and_refuses_every_write(shared_dir: Path) -> None:
    db, lock = shared_dir / "nonces.db", shared_dir / "nonces.lock"
    async with running(NonceActor(db, lock)) as writer:
        for subject in ("one", "two"):
            await NonceLedger(writer).issue(subject, 60)
    _seal(shared_dir)
    before = {p.name: p.read_bytes() for p in shared_dir.iterdir()}
    # No writer is live, no -wal nor -shm exists, and the reader may not create them: immutable.
    reader = _as_reader(db, lock)
    out, err = reader.communicate(timeout=60)
    assert reader.returncode == 0, err
    seen = json.loads(out)
    assert seen["rows"] == ["one", "two"]
    assert "read-only" in seen["write"]
    assert {p.name: p.read_bytes() for p in shared_dir.iterdir()} == before  # nothing written, nothing made


async def test_a_read_only_open_beside_a_live_writer_sees_its_commits(shared_dir: Path) -> None:
    db, lock = shared_dir / "nonces.db", shared_dir / "nonces.lock"
    writer = NonceActor(db, lock)
    async with running(writer):
        await NonceLedger(writer).issue("one", 60)
        _seal(shared_dir)  # the writer keeps its -wal and -shm open; the reader may only read them
        reader = _as_reader(db, lock, "follow")
        assert reader.stdout is not None and reader.stdin is not None
        first = json.loads(await anyio.to_thread.run_sync(reader.stdout.readline))
        assert first["rows"] == ["one"] and "read-only" in first["write"]
        await NonceLedger(writer).issue("two", 60)
        reader.stdin.write("\n")
        reader.stdin.flush()
        out, err = await anyio.to_thread.run_sync(lambda: reader.communicate(timeout=60))
        assert reader.returncode == 0, err
        assert json.loads(out)["rows"] == ["one", "two"]
        shared_dir.chmod(0o755)


class NewerNonces(NonceActor):
    schema_version = 2
    migrations: ClassVar[dict[int, str]] = {2: "nonces_schema.sql"}


async def test_a_read_only_open_of_a_closed_store_on_a_full_disk_reads_it(tmp_path: Path) -> None:
    """``mode=ro`` leaves an empty -wal behind when the disk has no room for the -shm: that is no
    writer, so the immutable open still serves (every read command, ``pforge check`` included)."""
    volume = tmp_path / "vol"
    volume.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(volume)]
    if subprocess.run(mount, capture_output=True, check=False).returncode:
        pytest.skip("mounting a 3 MiB tmpfs to fill needs root; the full-disk read-only open is not tried")
    try:
        root = volume / ".pforge"
        async with open_store(root, watch_workspaces=False) as store:
            await store.turns.open_context("kept")
        for name in os.listdir(root):
            if name.endswith(("-wal", "-shm")):
                os.unlink(root / name)
        fd = os.open(volume / "fill", os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(fd, b"\0" * 65536)
        except OSError:
            pass
        finally:
            os.close(fd)
        async with open_store(root, readonly=True, create=False) as store:
            assert await store.turns.find_context("kept") is not None
            assert (await store.check()).ok
    finally:
        subprocess.run(["umount", "-l", str(volume)], check=False)


async def test_a_read_only_open_of_an_older_schema_asks_for_a_writable_open(tmp_path: Path) -> None:
    db, lock = tmp_path / "nonces.db", tmp_path / "nonces.lock"
    async with running(NonceActor(db, lock)):
        pass
    before = db.read_bytes()
    with pytest.raises(StorageError, match="writable"):
        await NewerNonces(db, lock, readonly=True).run()
    assert db.read_bytes() == before
