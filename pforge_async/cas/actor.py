"""The CAS actor: the one writer of the object store. A batch of commands becomes one pack and one fsync."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import msgspec

from ..actor import Actor, Failed
from ..errors import InvalidInput, ObjectNotFound, PforgeError, StorageError
from ..fslock import FsLock
from .objects import BLOB, COMMIT, TREE, decode_tree, hash_object, validate_oid
from .odb import ObjectDB, open_for_reading
from .refs import RefStore, validate_ref_name

__all__ = ["CasActor", "PutFiles", "PutObjects", "UpdateRef"]

#: files at least this large stream into loose objects instead of being read whole into a pack.
LARGE_FILE = 1 << 20
#: a batch writes a pack early once it holds this much, bounding the actor's memory.
_PACK_FLUSH_BYTES = 64 << 20


class PutObjects(msgspec.Struct, frozen=True, tag="put_objects"):
    """Store objects given as ``(type, body)``; replies with their hex ids, in order."""

    objects: list[tuple[int, bytes]]


class PutFiles(msgspec.Struct, frozen=True, tag="put_files"):
    """Read files and store them as blobs; replies with each one's hex id, or None if it vanished.
    ``sizes`` are what a scan saw: hints for reading, not promises."""

    paths: list[str]
    sizes: list[int]


class UpdateRef(msgspec.Struct, frozen=True, tag="update_ref"):
    name: str
    new: str
    expected: str | None = None


CasCommand = PutObjects | PutFiles | UpdateRef


class _Batch:
    """Objects a batch has staged but not yet written: they count as present for link checks."""

    def __init__(self, odb: ObjectDB) -> None:
        self.odb = odb
        self.staged: dict[bytes, tuple[int, bytes]] = {}
        self.size = 0
        odb.refresh()  # once per batch: packs other processes wrote count for deduplication

    def has(self, raw: bytes) -> bool:
        return raw in self.staged or self.odb.has(raw)

    def add(self, type_num: int, body: bytes, raw: bytes | None = None) -> bytes:
        if raw is None:
            raw = hash_object(type_num, body)
        # A duplicate that slips through (say, a loose copy) costs space, never correctness.
        if raw not in self.staged and not self.odb.known(raw):
            self.staged[raw] = (type_num, body)
            self.size += len(body)
            if self.size >= _PACK_FLUSH_BYTES:
                self.flush()
        return raw

    def flush(self) -> None:
        objects = [(raw, type_num, body) for raw, (type_num, body) in self.staged.items()]
        self.staged = {}
        self.size = 0
        self.odb.write_pack(objects)


class CasActor(Actor[CasCommand]):
    command_type = CasCommand
    name = "cas"

    def __init__(self, gitdir: Path, lock_path: Path, *, fsync: bool, compression: int = 0) -> None:
        super().__init__(mailbox_size=64, max_batch=64)
        self.odb = ObjectDB(gitdir, fsync=fsync, compression=compression)
        self.refs = RefStore(gitdir, fsync=fsync)
        self.lock_path = lock_path
        self._limiter = anyio.CapacityLimiter(1)

    async def setup(self) -> None:
        await anyio.to_thread.run_sync(self.odb.init)

    async def teardown(self) -> None:
        self.odb.close()

    async def handle_batch(self, commands: Sequence[CasCommand]) -> list[Any]:
        return await anyio.to_thread.run_sync(self._apply, commands, limiter=self._limiter)

    def _apply(self, commands: Sequence[CasCommand]) -> list[Any]:
        batch = _Batch(self.odb)
        outcomes: list[Any] = [None] * len(commands)
        refs: list[int] = []
        for i, command in enumerate(commands):
            try:
                match command:
                    case PutObjects(objects=objects):
                        outcomes[i] = self._put_objects(batch, objects)
                    case PutFiles(paths=paths, sizes=sizes):
                        if len(paths) != len(sizes):
                            raise InvalidInput("put_files needs one size per path")
                        outcomes[i] = self._put_files(batch, paths, sizes)
                    case UpdateRef():
                        refs.append(i)
            except PforgeError as exc:
                outcomes[i] = Failed(exc)
        try:
            batch.flush()
        except PforgeError as exc:
            # Nothing of this batch is stored: fail its writers, keep serving.
            return [Failed(exc) for _ in commands]
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

    def _put_files(self, batch: _Batch, paths: list[str], sizes: list[int]) -> list[str | None]:
        # Files of one directory come together (a scan lists them so): each is opened relative to
        # the directory's descriptor, sparing the kernel a path walk per file.
        oids: list[str | None] = []
        directory: str | None = None
        dir_fd: int | None = None
        try:
            for path, size in zip(paths, sizes, strict=True):
                if size >= LARGE_FILE:
                    streamed = self.odb.write_file_blob(path)
                    oids.append(None if streamed is None else streamed[0].hex())
                    continue
                parent, name = os.path.split(path)
                if parent != directory:
                    if dir_fd is not None:
                        os.close(dir_fd)
                    directory, dir_fd = parent, open_for_reading(parent, directory=True)
                fd = None if dir_fd is None else open_for_reading(name, dir_fd=dir_fd, shown=path)
                if fd is None:
                    oids.append(None)  # vanished since the scan
                    continue
                try:
                    data = _read_all(fd, size)
                except IsADirectoryError as exc:
                    raise InvalidInput(f"{path} is not a regular file") from exc
                except OSError as exc:
                    raise StorageError(f"cannot read {path}: {exc.strerror}") from exc
                finally:
                    os.close(fd)
                oids.append(batch.add(BLOB, data).hex())
        finally:
            if dir_fd is not None:
                os.close(dir_fd)
        return oids

    def _update_refs(self, commands: Sequence[CasCommand], refs: list[int], outcomes: list[Any]) -> None:
        try:
            lock = FsLock(self.lock_path)
            lock.acquire()
        except PforgeError as exc:
            for i in refs:
                outcomes[i] = Failed(exc)
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
                    if not self.odb.has(bytes.fromhex(new)):
                        raise ObjectNotFound(f"cannot point ref {name} at missing object {new}")
                    self.refs.update(name, new, command.expected)
                except PforgeError as exc:
                    outcomes[i] = Failed(exc)
        finally:
            lock.release()


def _read_all(fd: int, size: int) -> bytes:
    # Asking for one byte more than the size says in one read whether the file grew meanwhile.
    data = os.read(fd, size + 1)
    if len(data) <= size:
        return data
    chunks = [data]
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


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
