"""``store.cas``: the public face of the content-addressed store."""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import cast

import anyio
import msgspec

from ..errors import (
    ActorClosed,
    IntegrityError,
    InvalidInput,
    NotFound,
    ObjectNotFound,
    PforgeError,
    StorageError,
)
from .actor import CasActor, PutObjects, Snapshot, UpdateRef
from .gc import CasGcReport, collect, validate_gc_args
from .gitrules import (
    GITLINK_MODE,
    LINK_MODE,
    MAX_TREE_DEPTH,
    commit_problems,
    dotfile_blob_problem,
    dotfile_kind,
    parse_tree,
    tree_name_problem,
    tree_problems,
)
from .objects import (
    BLOB,
    COMMIT,
    DIR_MODE,
    TREE,
    TYPE_NAMES,
    TYPE_NUMBERS,
    Commit,
    TreeEntry,
    decode_commit,
    decode_tree,
    encode_commit,
    encode_tree,
    hash_object,
    parse_mode,
    shown_name,
    validate_oid,
)
from .odb import ObjectDB
from .refs import validate_ref_name
from .snapshot import cache_file, restore_tree

__all__ = ["Cas", "CasGcReport", "FsckReport"]


class FsckReport(msgspec.Struct, frozen=True):
    """What :meth:`Cas.fsck` found: ``corrupt`` objects do not match their ids (or cannot be read);
    ``missing`` ids are referenced by a tree or commit but absent; ``invalid`` lists, as ``"<id>:
    <why>"``, well-hashed objects ``git fsck --strict`` would reject (a tree entry ``..``, ``a/b`` or
    ``.git``, a gitlink, a directory entry pointing at a blob, a commit date git cannot hold, a bad
    ``.gitmodules``), typically written into the repository by another tool."""

    checked: int
    corrupt: list[str]
    missing: list[str]
    invalid: list[str] = msgspec.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.corrupt and not self.missing and not self.invalid


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
        """Whether the object is stored. A caller about to reference it (a turn's ``refs``) may rely
        on it: a present object is freshened (made young again), so a gc running now or within the
        grace keeps it (see :meth:`gc`)."""
        validate_oid(oid)
        return await anyio.to_thread.run_sync(self._odb_open().freshen_one, bytes.fromhex(oid))

    async def has_many(self, oids: Sequence[str]) -> list[bool]:
        """:meth:`has` for each of ``oids``, in order, in one hop to a worker thread (a turn's refs)."""
        if isinstance(oids, (str, bytes)) or not isinstance(oids, Sequence):
            raise InvalidInput(f"has_many takes a sequence of object ids, not {type(oids).__name__}")
        raws = [bytes.fromhex(validate_oid(oid)) for oid in oids]
        if not raws:
            return []
        return await anyio.to_thread.run_sync(self._odb_open().freshen_many, raws)

    # -- trees -------------------------------------------------------------------------------------

    async def write_tree(self, entries: Iterable[tuple[str, str | int, str]]) -> str:
        """Write ``(path, mode, oid)`` entries; ``a/b/c`` paths build the subtrees. Returns the root id.

        Paths are str, turned into the tree's bytes with ``os.fsencode`` (so a file name that is not
        UTF-8, read with ``os.fsdecode``, round-trips byte-exact). Whatever ``git fsck --strict`` would
        reject is refused with ``InvalidInput`` naming the entry, before anything is stored: a name git
        refuses (``..``, ``.git`` in any spelling, see :func:`.gitrules.tree_name_problem`), a gitlink,
        an entry whose mode says tree and whose object is a blob or the reverse, a ``.gitmodules`` or
        ``.gitattributes`` blob git would reject."""
        objects, root, leaves = _build_trees(entries)
        odb = self._odb_open()
        await anyio.to_thread.run_sync(self._check_leaves, odb, leaves)
        if objects:
            await self._actor.call(PutObjects(objects))
        return root

    def _check_leaves(self, odb: ObjectDB, leaves: list[_Leaf]) -> None:
        """The checks that need the objects a tree points at: their types, and dotfile contents."""
        types: dict[str, int] = {}
        for path, name, mode, oid in leaves:
            if oid not in types:
                types[oid] = _object_type(odb, oid, f"tree entry {path!r}")
            want = TREE if mode == DIR_MODE else BLOB
            if types[oid] != want:
                raise InvalidInput(
                    f"tree entry {path!r} has mode {mode:o}, a {TYPE_NAMES[want]}, "
                    f"but {oid} is a {TYPE_NAMES[types[oid]]}"
                )
            kind = dotfile_kind(name)
            if kind is not None and want == BLOB:
                why = dotfile_blob_problem(kind, odb.read_blob(oid))
                if why:
                    raise InvalidInput(f"tree entry {path!r}: git fsck rejects this content: {why}")

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
        """A commit of ``tree``; anything ``git fsck --strict`` would reject is ``InvalidInput`` naming the
        field (see :func:`.objects.encode_commit`), and so is a ``tree`` that is not a tree or a parent
        that is not a commit."""
        if isinstance(parents, (str, bytes)) or not isinstance(parents, Iterable):
            raise InvalidInput(f"parents must be an iterable of commit ids, not {type(parents).__name__}")
        parents = tuple(parents)
        body = encode_commit(tree, parents, message=message, author=author, timestamp=timestamp, metadata=metadata)
        odb = self._odb_open()
        links = [(tree, TREE, "tree")] + [(parent, COMMIT, "parent") for parent in parents]
        await anyio.to_thread.run_sync(_check_links, odb, links)
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
        root = _local_path(directory, "snapshot directory")
        if not os.path.isdir(root):
            raise InvalidInput(f"cannot snapshot {root}: not a directory")
        # One snapshot of a root at a time: the watch state must follow the order of the scans.
        lock = self._snapshot_locks.setdefault(root, anyio.Lock())
        async with lock:
            watcher = self._watcher
            if watcher is not None:
                tree = watcher.unchanged_tree(root)
                # Freshened: the caller is about to reference it, and a gc must keep it.
                if tree is not None and await anyio.to_thread.run_sync(self._odb.freshen_one, bytes.fromhex(tree)):
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
        target = _local_path(directory, "restore directory")
        await anyio.to_thread.run_sync(restore_tree, self._odb_open(), tree, target)

    # -- garbage collection --------------------------------------------------------------------------

    async def gc(
        self,
        roots: Iterable[str],
        *,
        grace_s: float = 3600.0,
        dry_run: bool = False,
        roots_taken_at: float | None = None,
    ) -> CasGcReport:
        """Drop the objects nothing reaches and consolidate the packs, beside live writers.

        Kept: what ``roots`` (oids of commits, trees, blobs: the caller's, e.g. live turns' ``fs_root``
        and ``refs``) and every ref reach, and, for ``grace_s`` seconds, every object younger than that
        and what it reaches (another process may be about to reference it). An object a writer
        freshened (stored again, named by a new tree or commit, or checked with :meth:`has`) counts as
        new from then on, also while this gc runs. ``roots_taken_at`` (``time.time()``) is when the
        caller began to gather its roots: objects freshened since then are kept whatever the grace.
        Kept objects go into one new pack, young unreachable ones into a cruft pack with their own
        ages; every old pack and loose object (large loose ones that are kept excepted) is removed.
        Crash-safe at any point (see :mod:`.gc`). ``dry_run`` only counts. A read-only store refuses
        (``InvalidInput``), as does a malformed root, before anything is done."""
        root_list = validate_gc_args(roots, grace_s, dry_run, roots_taken_at)
        odb = self._odb_open()
        if self._actor.readonly or odb.gate is None:
            raise InvalidInput("the store is open read-only: gc needs a writable store")
        gate = odb.gate
        try:
            report = await anyio.to_thread.run_sync(
                lambda: collect(
                    odb.gitdir,
                    gate,
                    root_list,
                    grace_s=float(grace_s),
                    dry_run=dry_run,
                    roots_taken_at=roots_taken_at,
                )
            )
        except OSError as exc:
            # A full disk or an I/O error mid-gc: the store stays whole (each step is crash-safe and
            # the next gc finishes a journal), so this caller gets a StorageError and nothing is lost.
            raise StorageError(f"cas gc: {exc}") from exc
        # This process's own view drops the retired packs now (other processes do at their next look).
        await anyio.to_thread.run_sync(odb.sync_retired)
        return report

    # -- verification ------------------------------------------------------------------------------

    async def fsck(self) -> FsckReport:
        """Read and re-hash every object; report corrupt ones and links to missing ones."""
        self._odb_open()
        return await anyio.to_thread.run_sync(self._fsck)

    def _fsck(self) -> FsckReport:
        corrupt: list[str] = []
        invalid: list[str] = []
        types: dict[str, int] = {}
        # target id -> (referring id, the type the reference says, what refers)
        links: dict[str, list[tuple[str, int, str]]] = {}
        dotfiles: dict[str, list[tuple[str, str]]] = {}  # blob id -> (tree id, kind)
        for oid in self._odb.iter_oids():
            try:
                type_num, body = self._odb.verify(oid)
            except ObjectNotFound:
                continue  # listed, then gone: a gc retired it meanwhile
            except (IntegrityError, NotFound):
                corrupt.append(oid)
                continue
            types[oid] = type_num
            if body is None:
                continue
            if type_num == TREE:
                invalid += [f"{oid}: tree {problem}" for problem in tree_problems(body)]
                _tree_links(oid, body, links, dotfiles)
            elif type_num == COMMIT:
                problems = commit_problems(body)
                invalid += [f"{oid}: commit {problem}" for problem in problems]
                if not problems:
                    _commit_links(oid, body, links)
        for target, refs in links.items():
            actual = types.get(target)
            for referrer, want, what in refs:
                if actual is not None and actual != want:
                    invalid.append(f"{referrer}: {what} says {TYPE_NAMES[want]} but {target} is a {TYPE_NAMES[actual]}")
        for target, kinds in dotfiles.items():
            actual = types.get(target)
            if actual is not None and actual != BLOB:
                # git blames the object itself ("non-blob found at .gitmodules"), so name it too.
                for referrer, kind in sorted(set(kinds)):
                    invalid.append(f"{target}: a {TYPE_NAMES[actual]} found at .{kind} in tree {referrer}")
                continue
            if actual is None:
                continue  # missing or corrupt: reported as such
            try:
                data = self._odb.read_blob(target)
            except PforgeError:
                continue
            for referrer, kind in sorted(set(kinds)):
                why = dotfile_blob_problem(kind, data)
                if why:
                    invalid.append(f"{target}: blob read as .{kind} by tree {referrer}: {why}")
        missing = sorted(
            target
            for target in set(links) - types.keys() - set(corrupt)
            # A gc running meanwhile retires a doomed object and its doomed referrers alike: a link
            # counts as missing only if some referrer is still there.
            if any(self._odb.has(bytes.fromhex(referrer)) for referrer, _, _ in links[target])
        )
        return FsckReport(checked=len(types) + len(corrupt), corrupt=sorted(corrupt), missing=missing, invalid=invalid)


_Leaf = tuple[str, bytes, int, str]


def _tree_links(
    oid: str, body: bytes, links: dict[str, list[tuple[str, int, str]]], dotfiles: dict[str, list[tuple[str, str]]]
) -> None:
    entries, _ = parse_tree(body)
    for name, mode_text, raw in entries:
        mode = int(mode_text, 8)
        if mode == GITLINK_MODE:
            continue  # names a commit of another repository (reported as a problem of the tree itself)
        target = raw.hex()
        want = TREE if mode == DIR_MODE else BLOB
        links.setdefault(target, []).append((oid, want, f"tree entry {shown_name(name)!r}"))
        kind = dotfile_kind(name)
        if kind is not None and mode != LINK_MODE:
            dotfiles.setdefault(target, []).append((oid, kind))


def _commit_links(oid: str, body: bytes, links: dict[str, list[tuple[str, int, str]]]) -> None:
    header = body.split(b"\n\n", 1)[0]
    for line in header.split(b"\n"):
        key, _, value = line.partition(b" ")
        if key == b"tree":
            links.setdefault(value.decode(), []).append((oid, TREE, "commit's tree"))
        elif key == b"parent":
            links.setdefault(value.decode(), []).append((oid, COMMIT, "commit's parent"))


def _object_type(odb: ObjectDB, oid: str, what: str) -> int:
    """The type of a stored object; a loose one's from its header alone (a large blob is not read)."""
    try:
        with open(odb.loose_path(oid), "rb") as f:
            head = zlib.decompressobj().decompress(f.read(256), 64)
        kind = head.split(b" ", 1)[0]
        if kind in TYPE_NUMBERS and b"\0" in head:
            return TYPE_NUMBERS[kind]
    except (OSError, zlib.error):
        pass  # not loose, or unreadable: read it the ordinary way, which names the problem
    try:
        return odb.read(oid)[0]
    except ObjectNotFound as exc:
        raise ObjectNotFound(f"{what} points at missing object {oid}") from exc


def _check_links(odb: ObjectDB, links: list[tuple[str, int, str]]) -> None:
    for oid, want, what in links:
        actual = _object_type(odb, oid, f"the commit's {what}")
        if actual != want:
            raise InvalidInput(f"the commit's {what} {oid} is a {TYPE_NAMES[actual]}, not a {TYPE_NAMES[want]}")


def _local_path(value: object, what: str) -> str:
    """An absolute local path from a str, bytes or path-like; anything else, a NUL, or a str the file
    system encoding cannot hold (a lone surrogate) is ``InvalidInput``."""
    if not isinstance(value, (str, bytes, os.PathLike)):
        raise InvalidInput(f"{what} must be a path, not {type(value).__name__}")
    try:
        text = os.fsdecode(os.fspath(value))
        encoded = os.fsencode(text)
    except (TypeError, UnicodeError) as exc:
        raise InvalidInput(f"{what} {value!r} cannot be a file name: {exc}") from exc
    if b"\0" in encoded:
        raise InvalidInput(f"{what} {value!r} holds a NUL character")
    return os.path.abspath(text)


def _build_trees(entries: Iterable[tuple[str, str | int, str]]) -> tuple[list[tuple[int, bytes]], str, list[_Leaf]]:
    """Nested paths to tree objects, children before parents, and the leaves as ``(path, name, mode,
    oid)``. Validates every path, name and mode first."""
    if isinstance(entries, (str, bytes, Mapping)) or not isinstance(entries, Iterable):
        raise InvalidInput(f"write_tree takes an iterable of (path, mode, oid), not {type(entries).__name__}")
    root: dict[bytes, object] = {}
    leaves: list[_Leaf] = []
    for item in entries:
        if not isinstance(item, (tuple, list)) or len(item) != 3:
            raise InvalidInput(f"tree entry {item!r} is not (path, mode, oid)")
        path, mode_in, oid = item
        if not isinstance(path, str):
            raise InvalidInput(f"tree entry path {path!r} is not a str")
        try:
            mode = parse_mode(mode_in)
        except InvalidInput as exc:
            raise InvalidInput(f"tree entry {path!r}: {exc}") from exc
        validate_oid(oid, f"object id of {path!r}")
        try:
            encoded = os.fsencode(path)
        except UnicodeEncodeError as exc:
            raise InvalidInput(f"tree entry path {path!r} is not a file name: {exc.reason}") from exc
        parts = encoded.split(b"/")
        # The trees this path builds (the root counted), and the subtree it names, if it names one.
        if len(parts) + (mode == DIR_MODE) > MAX_TREE_DEPTH:
            shown = path if len(path) <= 200 else path[:100] + "..." + path[-100:]
            raise InvalidInput(
                f"tree entry path {shown!r} is nested {len(parts)} levels deep: git refuses trees "
                f"nested deeper than {MAX_TREE_DEPTH}, the root counted (core.maxTreeDepth)"
            )
        for i, part in enumerate(parts):
            why = tree_name_problem(part, mode if i == len(parts) - 1 else DIR_MODE)
            if why:
                raise InvalidInput(f"invalid tree entry path {path!r}: bad component {shown_name(part)!r}: {why}")
        level = root
        for part in parts[:-1]:
            child = level.setdefault(part, {})
            if not isinstance(child, dict):
                raise InvalidInput(f"tree entry path {path!r} goes through a file")
            level = child
        leaf = parts[-1]
        if leaf in level:
            raise InvalidInput(f"duplicate tree entry {path!r}")
        level[leaf] = (mode, bytes.fromhex(oid))
        leaves.append((path, leaf, mode, oid))

    objects = _emit_trees(root)
    return objects, hash_object(TREE, objects[-1][1]).hex(), leaves


def _emit_trees(root: dict[bytes, object]) -> list[tuple[int, bytes]]:
    """The tree objects of nested levels, children before parents (the root last). Without recursion:
    a path may be as deep as ``MAX_TREE_DEPTH``, far past Python's recursion limit."""
    # Breadth first: every level after its parent, so walking the list backwards meets children first.
    order: list[tuple[dict[bytes, object], int, bytes]] = [(root, -1, b"")]
    at = 0
    while at < len(order):
        for name, value in order[at][0].items():
            if isinstance(value, dict):
                order.append((value, at, name))
        at += 1
    built: list[list[tuple[bytes, int, bytes]]] = [[] for _ in order]
    objects: list[tuple[int, bytes]] = []
    for index in range(len(order) - 1, -1, -1):
        level, parent, name = order[index]
        items = built[index]
        for leaf_name, value in level.items():
            if not isinstance(value, dict):
                leaf_mode, leaf_raw = cast("tuple[int, bytes]", value)
                items.append((leaf_name, leaf_mode, leaf_raw))
        body = encode_tree(items)
        objects.append((TREE, body))
        if parent >= 0:
            built[parent].append((name, DIR_MODE, hash_object(TREE, body)))
    return objects
