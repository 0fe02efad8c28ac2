"""The CAS actor: the one writer of the object store. A batch of commands becomes one pack and one fsync.

No input and no I/O error kills it: each command's failure (a ``PforgeError``, or an ``OSError`` or a
bad-name ``ValueError`` translated into one) goes to that command's caller only, and the actor keeps
serving. It dies only of a bug, and then every caller gets ``ActorClosed`` naming the cause.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import msgspec

from ..actor import Actor, Failed
from ..errors import InvalidInput, ObjectNotFound, PforgeError, StorageError
from ..fslock import FsLock
from ..owner import OwnerThread
from .objects import BLOB, COMMIT, TREE, decode_tree, hash_object, validate_oid
from .odb import FreshSession, ObjectDB
from .refs import RefStore, validate_ref_name
from .snapshot import SnapshotPlan
from .statcache import WRITE_INTERVAL_S, StatCaches
from .watch import Watcher

__all__ = ["CasActor", "PutObjects", "Snapshot", "UpdateRef"]

#: a batch writes a pack early once it holds this much, bounding the actor's memory.
_PACK_FLUSH_BYTES = 64 << 20


class PutObjects(msgspec.Struct, frozen=True, tag="put_objects"):
    """Store objects given as ``(type, body)``; replies with their hex ids, in order."""

    objects: list[tuple[int, bytes]]


class Snapshot(msgspec.Struct, frozen=True, tag="snapshot"):
    """Store the directory ``root`` as a tree; replies with the tree's hex id. ``cache_file`` is its
    stat cache; directories whose ``(st_dev, st_ino)`` is in ``exclude`` are left out. Paths are bytes
    (``os.fsencode``): a path need not be UTF-8."""

    root: bytes
    cache_file: bytes
    exclude: list[tuple[int, int]]


class UpdateRef(msgspec.Struct, frozen=True, tag="update_ref"):
    name: str
    new: str
    expected: str | None = None


CasCommand = PutObjects | Snapshot | UpdateRef


class _Batch:
    """Objects a batch has staged but not yet written: they count as present for link checks.

    Every existing object the batch relies on (a deduplicated write, a tree entry or commit link, a
    snapshot's stat-cache hit) is freshened through the batch's :class:`FreshSession`, so a gc
    running meanwhile keeps it (see :mod:`.gate`)."""

    def __init__(self, odb: ObjectDB) -> None:
        self.odb = odb
        self.session = FreshSession(odb)
        self.staged: dict[bytes, tuple[int, bytes]] = {}
        self.size = 0
        odb.refresh()  # once per batch: packs other processes wrote count for deduplication

    def has(self, raw: bytes) -> bool:
        return raw in self.staged or self.session.freshen(raw)

    def freshen(self, raw: bytes) -> bool:
        """Whether an existing object is present, made young again (a snapshot's stat-cache hit)."""
        return self.has(raw)

    def add(self, type_num: int, body: bytes, raw: bytes | None = None) -> bytes:
        if raw is None:
            raw = hash_object(type_num, body)
        # A duplicate that slips through (say, a loose copy) costs space, never correctness.
        if raw not in self.staged and not self.session.freshen(raw, look_further=False):
            self.staged[raw] = (type_num, body)
            self.size += len(body)
            if self.size >= _PACK_FLUSH_BYTES:
                self.flush()
        return raw

    def add_large_file(self, fd: int, shown: str) -> bytes:
        return self.odb.write_fd_blob(fd, shown, self.session)[0]

    def flush(self) -> None:
        objects = [(raw, type_num, body) for raw, (type_num, body) in self.staged.items()]
        self.staged = {}
        self.size = 0
        self.odb.write_pack(objects, self.session)

    def close(self) -> None:
        self.session.release()


class CasActor(Actor[CasCommand]):
    command_type = CasCommand
    name = "cas"

    def __init__(
        self,
        gitdir: Path,
        lock_path: Path,
        *,
        fsync: bool,
        compression: int = 0,
        watcher: Watcher | None = None,
        readonly: bool = False,
    ) -> None:
        super().__init__(mailbox_size=64, max_batch=64)
        self.watcher = watcher
        #: open an existing repository without creating or changing anything; every write command fails.
        self.readonly = readonly
        self.odb = ObjectDB(gitdir, fsync=fsync, compression=compression, readonly=readonly, lock_dir=lock_path.parent)
        self.refs = RefStore(gitdir, fsync=fsync)
        self.lock_path = lock_path
        self._owner: OwnerThread | None = None
        #: the snapshots' stat caches: answered from memory, written after the replies (see .statcache)
        self.stat_caches = StatCaches()
        self._cache_timer: asyncio.TimerHandle | None = None
        self._caches_written_at = 0.0

    async def setup(self) -> None:
        self._owner = OwnerThread("pforge-cas")
        try:
            await self._owner.run(self.odb.init)  # read-only: checks, creates nothing
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self.teardown()
            raise

    async def teardown(self) -> None:
        if self._cache_timer is not None:
            self._cache_timer.cancel()
            self._cache_timer = None
        if self._owner is not None:
            owner, self._owner = self._owner, None
            if self.stat_caches.dirty:
                owner.post(self.stat_caches.write_dirty)  # runs before the stop, as jobs run in order
            await owner.stop()
        self.odb.close()

    async def handle_batch(self, commands: Sequence[CasCommand]) -> list[Any]:
        assert self._owner is not None
        outcomes: list[Any] = await self._owner.run(self._apply, commands)
        if self.stat_caches.dirty and self._cache_timer is None:
            # Written after this reply, on the owner thread (before any later batch), and coalesced:
            # at most once per interval while snapshots keep coming.
            wait = self._caches_written_at + WRITE_INTERVAL_S - time.monotonic()
            if wait <= 0:
                self._write_caches()
            else:
                self._cache_timer = asyncio.get_running_loop().call_later(wait, self._write_caches)
        return outcomes

    def _write_caches(self) -> None:
        self._cache_timer = None
        self._caches_written_at = time.monotonic()
        if self._owner is not None:
            self._owner.post(self.stat_caches.write_dirty)

    def _apply(self, commands: Sequence[CasCommand]) -> list[Any]:
        if self.readonly:
            return [Failed(InvalidInput("the store is open read-only")) for _ in commands]
        batch = _Batch(self.odb)
        try:
            return self._apply_batch(batch, commands)
        finally:
            batch.close()

    def _apply_batch(self, batch: _Batch, commands: Sequence[CasCommand]) -> list[Any]:
        outcomes: list[Any] = [None] * len(commands)
        refs: list[int] = []
        snapshots: list[SnapshotPlan] = []
        for i, command in enumerate(commands):
            try:
                match command:
                    case PutObjects(objects=objects):
                        outcomes[i] = self._put_objects(batch, objects)
                    case Snapshot(root=root, cache_file=cache, exclude=exclude):
                        path = Path(os.fsdecode(cache))
                        plan = SnapshotPlan(
                            os.fsdecode(root),
                            path,
                            {(dev, ino) for dev, ino in exclude},
                            self.stat_caches.get(path),
                        )
                        outcomes[i] = plan.run(batch, self.odb, self.watcher).hex()
                        snapshots.append(plan)
                    case UpdateRef():
                        refs.append(i)
            except Exception as exc:
                outcomes[i] = Failed(_contained(exc, _what(command)))
        try:
            batch.flush()
        except Exception as exc:
            # Nothing of this batch is stored: fail its writers, keep serving.
            error = _contained(exc, "writing a pack")
            return [Failed(error) for _ in commands]
        for plan in snapshots:
            # Only now: what it records is durable. Written to its file after the reply (.statcache).
            self.stat_caches.put(plan.cache_path, plan.cache_entries())
        # Never a hold of gc's gate inside another (a gc waiting at the turnstile would wait for it).
        batch.close()
        if refs:
            self._update_refs(commands, refs, outcomes)
        return outcomes

    def _put_objects(self, batch: _Batch, objects: list[tuple[int, bytes]]) -> list[str]:
        # Validate the whole command before staging any of it, so a failed command stores nothing.
        hashed = []
        pending: set[bytes] = set()
        for type_num, body in objects:
            if type_num not in (BLOB, TREE, COMMIT):
                raise InvalidInput(f"unknown object type {type_num}: want blob, tree or commit")
            raw = hash_object(type_num, body)
            if type_num == TREE:
                for name, _mode, target in decode_tree(body, raw.hex()):
                    if target not in pending and not batch.has(target):
                        raise ObjectNotFound(
                            f"tree entry {name.decode(errors='replace')!r} points at missing object {target.hex()}"
                        )
            elif type_num == COMMIT:
                for target in _commit_links(body):
                    if target not in pending and not batch.has(target):
                        raise ObjectNotFound(f"commit refers to missing object {target.hex()}")
            pending.add(raw)
            hashed.append((type_num, body, raw))
        return [batch.add(type_num, body, raw).hex() for type_num, body, raw in hashed]

    def _update_refs(self, commands: Sequence[CasCommand], refs: list[int], outcomes: list[Any]) -> None:
        try:
            lock = FsLock(self.lock_path)
            lock.acquire()
        except Exception as exc:
            error = _contained(exc, f"locking {self.lock_path}")
            for i in refs:
                outcomes[i] = Failed(error)
            return
        try:
            for i in refs:
                command = commands[i]
                assert isinstance(command, UpdateRef)
                try:
                    name = validate_ref_name(command.name)
                    new = validate_oid(command.new)
                    if command.expected is not None:
                        validate_oid(command.expected, "expected ref value")
                    if not self.odb.freshen_one(bytes.fromhex(new)):
                        raise ObjectNotFound(f"cannot point ref {name} at missing object {new}")
                    self.refs.update(name, new, command.expected)
                except Exception as exc:
                    outcomes[i] = Failed(_contained(exc, _what(command)))
        finally:
            lock.release()


def _what(command: CasCommand) -> str:
    match command:
        case Snapshot(root=root):
            return f"snapshot of {_shown(os.fsdecode(root))}"
        case UpdateRef(name=name):
            return f"update of ref {_shown(name)}"
        case _:
            return "storing objects"


def _shown(text: str, limit: int = 200) -> str:
    """A name for a message: printable whatever it holds, and not 5,000 characters long."""
    shown = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return repr(shown if len(shown) <= limit else shown[:limit] + "...")


def _contained(exc: Exception, what: str) -> Exception:
    """The error one command's caller gets. What is not a bug becomes a ``PforgeError``: an
    ``OSError`` a ``StorageError``, a bad name (``UnicodeError``, ``ValueError`` such as an embedded
    NUL) ``InvalidInput``, each chained to its cause. Anything else is a bug and is re-raised, which
    kills the actor (every caller then gets ``ActorClosed`` naming it)."""
    if isinstance(exc, PforgeError):
        return exc
    if isinstance(exc, OSError):
        name = exc.filename
        where = f" ({_shown(os.fsdecode(name) if isinstance(name, bytes) else str(name))})" if name is not None else ""
        error: Exception = StorageError(f"{what} failed{where}: {exc.strerror or exc!r}")
    elif isinstance(exc, ValueError):  # UnicodeError is one
        error = InvalidInput(f"{what} failed: {exc}")
    else:
        raise exc
    error.__cause__ = exc
    return error


def _commit_links(body: bytes) -> list[bytes]:
    header = body.split(b"\n\n", 1)[0]
    links = []
    for line in header.split(b"\n"):
        key, _, value = line.partition(b" ")
        if key in (b"tree", b"parent"):
            try:
                links.append(bytes.fromhex(validate_oid(value.decode("ascii", "replace"))))
            except InvalidInput as exc:
                raise InvalidInput(f"commit has a malformed {key.decode()} line: {exc}") from exc
    return links
