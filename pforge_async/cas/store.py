"""``store.cas``: the public face of the content-addressed store."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import cast

import anyio
import msgspec

from ..errors import ActorClosed, IntegrityError, InvalidInput, NotFound, PforgeError
from .actor import CasActor, PutObjects, Snapshot, UpdateRef
from .objects import (
    BLOB,
    COMMIT,
    DIR_MODE,
    TREE,
    Commit,
    TreeEntry,
    decode_commit,
    decode_tree,
    encode_commit,
    encode_tree,
    hash_object,
    parse_mode,
    validate_oid,
)
from .odb import ObjectDB
from .refs import validate_ref_name
from .snapshot import cache_file, restore_tree

__all__ = ["Cas", "FsckReport"]


class FsckReport(msgspec.Struct, frozen=True):
    """What :meth:`Cas.fsck` found: ``missing`` ids are referenced by a tree or commit but absent."""

    checked: int
    corrupt: list[str]
    missing: list[str]

    @property
    def ok(self) -> bool:
        return not self.corrupt and not self.missing


class Cas:
    """Blobs, trees, commits and refs in a SHA-256 git repository (``<root>/cas``)."""

    def __init__(self, actor: CasActor, cache_dir: Path, store_root: Path) -> None:
        self._actor = actor
        self._odb = actor.odb
        self._refs = actor.refs
        self._cache_dir = cache_dir
        self._store_root = store_root
        self._watcher = actor.watcher
        self._snapshot_locks: dict[str, anyio.Lock] = {}
        self.path = actor.odb.gitdir
        #: snapshots answered from the change watch without scanning, and those that scanned.
        self.snapshots_unchanged = 0
        self.snapshots_scanned = 0

    def _odb_open(self) -> ObjectDB:
        """The object database, for reads; after the store closed, ``ActorClosed``."""
        if self._actor.closed:
            raise ActorClosed("the CAS is closed")
        return self._odb

    # -- blobs -------------------------------------------------------------------------------------

    async def write_blob(self, data: bytes) -> str:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise InvalidInput(f"write_blob takes bytes, not {type(data).__name__}")
        (oid,) = await self._actor.call(PutObjects([(BLOB, bytes(data))]))
        return str(oid)

    async def read_blob(self, oid: str) -> bytes:
        validate_oid(oid)
        return await anyio.to_thread.run_sync(self._odb_open().read_blob, oid)

    async def has(self, oid: str) -> bool:
        validate_oid(oid)
        return await anyio.to_thread.run_sync(self._odb_open().has, bytes.fromhex(oid))

    # -- trees -------------------------------------------------------------------------------------

    async def write_tree(self, entries: Iterable[tuple[str, str | int, str]]) -> str:
        """Write ``(path, mode, oid)`` entries; ``a/b/c`` paths build the subtrees. Returns the root id."""
        objects, root = _build_trees(entries)
        if objects:
            await self._actor.call(PutObjects(objects))
        return root

    async def read_tree(self, oid: str, recursive: bool = False) -> list[TreeEntry]:
        """One level of a tree, or with ``recursive`` every non-tree entry below it by path."""
        validate_oid(oid)
        self._odb_open()
        return await anyio.to_thread.run_sync(self._read_tree, oid, recursive)

    def _read_tree(self, oid: str, recursive: bool) -> list[TreeEntry]:
        out: list[TreeEntry] = []
        stack = [(oid, "")]
        while stack:
            tree, prefix = stack.pop()
            type_num, body = self._odb.read(tree)
            if type_num != TREE:
                raise InvalidInput(f"object {tree} is not a tree")
            for name, mode, raw in decode_tree(body, tree):
                path = prefix + os.fsdecode(name)
                if recursive and mode == DIR_MODE:
                    stack.append((raw.hex(), path + "/"))
                else:
                    out.append(TreeEntry(path, mode, raw.hex()))
        if recursive:
            out.sort(key=lambda e: e.name.encode("utf-8", "surrogateescape"))
        return out

    # -- commits -----------------------------------------------------------------------------------

    async def write_commit(
        self,
        tree: str,
        parents: Iterable[str] = (),
        *,
        message: str = "",
        author: str | None = None,
        timestamp: int | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> str:
        body = encode_commit(tree, parents, message=message, author=author, timestamp=timestamp, metadata=metadata)
        (oid,) = await self._actor.call(PutObjects([(COMMIT, body)]))
        return str(oid)

    async def read_commit(self, oid: str) -> Commit:
        validate_oid(oid)
        type_num, body = await anyio.to_thread.run_sync(self._odb_open().read, oid)
        if type_num != COMMIT:
            raise InvalidInput(f"object {oid} is not a commit")
        return decode_commit(body, oid)

    # -- refs --------------------------------------------------------------------------------------

    async def update_ref(self, name: str, new: str, *, expected: str | None = None) -> None:
        """Point ``name`` at ``new``. With ``expected``, only if the ref still holds it (the null oid
        ``"0" * 64`` means: only if the ref does not exist); otherwise ``RefConflict``."""
        validate_ref_name(name)
        validate_oid(new)
        if expected is not None:
            validate_oid(expected, "expected ref value")
        await self._actor.call(UpdateRef(name, new, expected))

    async def get_ref(self, name: str) -> str | None:
        validate_ref_name(name)
        self._odb_open()
        return await anyio.to_thread.run_sync(self._refs.get, name)

    # -- workspaces --------------------------------------------------------------------------------

    async def snapshot(self, directory: str | os.PathLike[str]) -> str:
        """Store a directory tree and return its tree id (the same content always gives the same id)."""
        root = os.path.abspath(os.fspath(directory))
        if not os.path.isdir(root):
            raise InvalidInput(f"cannot snapshot {root}: not a directory")
        # One snapshot of a root at a time: the watch state must follow the order of the scans.
        lock = self._snapshot_locks.setdefault(root, anyio.Lock())
        async with lock:
            watcher = self._watcher
            if watcher is not None:
                tree = watcher.unchanged_tree(root)
                if tree is not None and self._odb.known(bytes.fromhex(tree)):
                    self.snapshots_unchanged += 1
                    return tree
            self.snapshots_scanned += 1
            tree = await self._snapshot(root)
            if watcher is not None:
                watcher.finish(root, tree)
            return tree

    async def _snapshot(self, root: str) -> str:
        store = os.stat(self._store_root)
        cache = os.fsencode(cache_file(self._cache_dir, root))
        command = Snapshot(os.fsencode(root), cache, [(store.st_dev, store.st_ino)])
        return str(await self._actor.call(command))

    async def restore(self, tree: str, directory: str | os.PathLike[str]) -> None:
        """Recreate a snapshot in ``directory``, which must be missing or empty."""
        validate_oid(tree)
        await anyio.to_thread.run_sync(restore_tree, self._odb_open(), tree, os.path.abspath(directory))

    # -- verification ------------------------------------------------------------------------------

    async def fsck(self) -> FsckReport:
        """Read and re-hash every object; report corrupt ones and links to missing ones."""
        self._odb_open()
        return await anyio.to_thread.run_sync(self._fsck)

    def _fsck(self) -> FsckReport:
        corrupt: list[str] = []
        linked: set[str] = set()
        present: set[str] = set()
        for oid in self._odb.iter_oids():
            present.add(oid)
            try:
                type_num, body = self._odb.verify(oid)
            except (IntegrityError, NotFound):
                corrupt.append(oid)
                continue
            try:
                if body is None:
                    continue
                if type_num == TREE:
                    linked.update(raw.hex() for _, _, raw in decode_tree(body, oid))
                elif type_num == COMMIT:
                    commit = decode_commit(body, oid)
                    linked.add(commit.tree)
                    linked.update(commit.parents)
            except PforgeError:
                corrupt.append(oid)
        missing = sorted(linked - present)
        return FsckReport(checked=len(present), corrupt=sorted(corrupt), missing=missing)


def _build_trees(entries: Iterable[tuple[str, str | int, str]]) -> tuple[list[tuple[int, bytes]], str]:
    """Nested paths to tree objects, children before parents. Validates everything first."""
    root: dict[bytes, object] = {}
    for item in entries:
        try:
            path, mode_in, oid = item
        except (TypeError, ValueError) as exc:
            raise InvalidInput(f"tree entry {item!r} is not (path, mode, oid)") from exc
        if not isinstance(path, str):
            raise InvalidInput(f"tree entry path {path!r} is not a str")
        mode = parse_mode(mode_in)
        validate_oid(oid, f"object id of {path!r}")
        parts = path.split("/")
        for part in parts:
            if part in ("", ".", "..") or "\0" in part or part.lower() == ".git":
                raise InvalidInput(f"invalid tree entry path {path!r}: bad component {part!r}")
        level = root
        for part in parts[:-1]:
            key = os.fsencode(part)
            child = level.setdefault(key, {})
            if not isinstance(child, dict):
                raise InvalidInput(f"tree entry path {path!r} goes through a file")
            level = child
        leaf = os.fsencode(parts[-1])
        if leaf in level:
            raise InvalidInput(f"duplicate tree entry {path!r}")
        level[leaf] = (mode, bytes.fromhex(oid))

    objects: list[tuple[int, bytes]] = []

    def emit(level: dict[bytes, object]) -> bytes:
        items = []
        for name, value in level.items():
            if isinstance(value, dict):
                items.append((name, DIR_MODE, emit(value)))
            else:
                leaf_mode, leaf_raw = cast("tuple[int, bytes]", value)
                items.append((name, leaf_mode, leaf_raw))
        body = encode_tree(items)
        objects.append((TREE, body))
        return hash_object(TREE, body)

    try:
        root_raw = emit(root)
    except RecursionError as exc:
        raise InvalidInput("tree paths are nested too deeply") from exc
    return objects, root_raw.hex()
