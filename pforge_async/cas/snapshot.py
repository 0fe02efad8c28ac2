"""Directory <-> tree: the scan and stat cache behind ``snapshot``, and ``restore``.

The stat cache works as git's index does: a file whose ``(mode, size, mtime, ctime, inode)`` match
what was recorded when it was last stored is not read again. Entries modified within
``RACY_NS`` of a snapshot's start are "racily clean" (a later write could keep the same timestamp
tick) and are never cached, so a change is never missed.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path

import msgspec

from ..errors import IntegrityError, InvalidInput, StorageError
from .objects import BLOB, DIR_MODE, TREE, decode_tree, encode_tree, hash_object
from .odb import ObjectDB
from .watch import Watcher

__all__ = ["SnapshotPlan", "restore_tree"]

RACY_NS = 50_000_000
#: how many bytes of small files one command to the actor carries.
CHUNK_BYTES = 4 << 20
CHUNK_FILES = 1024

_CacheEntry = tuple[int, int, int, int, int, str]  # mode, size, mtime_ns, ctime_ns, ino, oid
_cache_decoder = msgspec.msgpack.Decoder(dict[str, _CacheEntry])
_cache_encoder = msgspec.msgpack.Encoder()


def _git_mode(st_mode: int) -> int:
    if stat.S_ISLNK(st_mode):
        return 0o120000
    return 0o100755 if st_mode & stat.S_IXUSR else 0o100644


def _excluded(name: str) -> bool:
    return name.lower() == ".git"


class _File:
    __slots__ = ("dir_index", "name", "oid", "path", "rel", "st")

    def __init__(self, dir_index: int, name: bytes, rel: str, path: str, st: os.stat_result) -> None:
        self.dir_index = dir_index
        self.name = name
        self.rel = rel
        self.path = path
        self.st: tuple[int, int, int, int, int] = (
            st.st_mode,
            st.st_size,
            st.st_mtime_ns,
            st.st_ctime_ns,
            st.st_ino,
        )
        self.oid: str | None = None


class SnapshotPlan:
    """One snapshot in progress: what the scan found, what the cache answered, what is left to store."""

    def __init__(self, root: str, cache_path: Path, exclude: set[tuple[int, int]]) -> None:
        self.root = root
        self.cache_path = cache_path
        self.exclude = exclude
        self.dirs: list[tuple[int, bytes]] = []  # (parent index, name); index 0 is the root
        self.files: list[_File] = []

    # -- scan --------------------------------------------------------------------------------------

    def scan(self, odb: ObjectDB, watcher: Watcher | None = None) -> None:
        cache = self._load_cache()
        if watcher is not None:
            watcher.begin(self.root)
        self.dirs.append((-1, b""))
        stack = [(0, self.root, "")]
        while stack:
            index, path, rel = stack.pop()
            # Watched before listed: a change after this point is an event, never a miss.
            wd = watcher.watch_dir(self.root, path) if watcher is not None else -1
            try:
                # Listed and stat'ed relative to the directory's descriptor (getdents + fstatat):
                # no path walk from / for every file.
                dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue  # removed while we scanned
            except OSError as exc:
                raise StorageError(f"cannot list {path}: {exc.strerror}") from exc
            try:
                self._scan_dir(dir_fd, index, path, rel, wd, cache, odb, watcher, stack)
            finally:
                os.close(dir_fd)

    def _scan_dir(
        self,
        dir_fd: int,
        index: int,
        path: str,
        rel: str,
        wd: int,
        cache: dict[str, _CacheEntry],
        odb: ObjectDB,
        watcher: Watcher | None,
        stack: list[tuple[int, str, str]],
    ) -> None:
        try:
            entries = list(os.scandir(dir_fd))
        except OSError as exc:
            raise StorageError(f"cannot list {path}: {exc.strerror}") from exc
        for entry in entries:
            name = entry.name
            if _excluded(name):
                if watcher is not None:
                    watcher.ignore(wd, name)
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # removed while we scanned
            child_rel = f"{rel}/{name}" if rel else name
            if stat.S_ISDIR(st.st_mode):
                if (st.st_dev, st.st_ino) in self.exclude:
                    if watcher is not None:
                        watcher.ignore(wd, name)
                    continue
                self.dirs.append((index, os.fsencode(name)))
                stack.append((len(self.dirs) - 1, f"{path}/{name}", child_rel))
            elif stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
                f = _File(index, os.fsencode(name), child_rel, f"{path}/{name}", st)
                hit = cache.get(child_rel)
                if hit is not None and hit[:5] == f.st and odb.has(bytes.fromhex(hit[5])):
                    f.oid = hit[5]
                self.files.append(f)
            # sockets, fifos and devices have no git representation: skipped, as git does

    def _load_cache(self) -> dict[str, _CacheEntry]:
        try:
            data = self.cache_path.read_bytes()
            return _cache_decoder.decode(data)
        except (FileNotFoundError, msgspec.DecodeError, msgspec.ValidationError):
            return {}
        except OSError as exc:
            raise StorageError(f"cannot read the snapshot cache {self.cache_path}: {exc}") from exc

    # -- what is left to store ---------------------------------------------------------------------

    def file_chunks(self) -> Iterator[list[_File]]:
        """Regular files the cache could not answer, in chunks of bounded size."""
        chunk: list[_File] = []
        size = 0
        for f in self.files:
            if f.oid is None and stat.S_ISREG(f.st[0]):
                chunk.append(f)
                size += f.st[1]
                if size >= CHUNK_BYTES or len(chunk) >= CHUNK_FILES:
                    yield chunk
                    chunk, size = [], 0
        if chunk:
            yield chunk

    def links(self) -> list[_File]:
        return [f for f in self.files if f.oid is None and stat.S_ISLNK(f.st[0])]

    def read_links(self, links: list[_File]) -> list[tuple[int, bytes]]:
        objects = []
        for f in links:
            try:
                objects.append((BLOB, os.fsencode(os.readlink(f.path))))
            except OSError as exc:
                raise StorageError(f"cannot read symlink {f.path}: {exc.strerror}") from exc
        return objects

    def fill(self, files: list[_File], oids: Sequence[str | None]) -> None:
        # The stat recorded stays the scan's: had a file changed since, its next stat differs from it
        # and the cache misses.
        for f, oid in zip(files, oids, strict=True):
            f.oid = oid or ""  # "": vanished before it could be read, left out of the tree

    # -- trees -------------------------------------------------------------------------------------

    def build_trees(self, odb: ObjectDB) -> tuple[str, list[tuple[int, bytes]]]:
        """The root tree's id and the tree objects the store does not have yet (children first)."""
        levels: list[list[tuple[bytes, int, bytes]]] = [[] for _ in self.dirs]
        for f in self.files:
            if f.oid:
                levels[f.dir_index].append((f.name, _git_mode(f.st[0]), bytes.fromhex(f.oid)))
        missing: list[tuple[int, bytes]] = []
        root_raw = b""
        # Children were appended after their parents, so walking backwards sees children first.
        for index in range(len(self.dirs) - 1, -1, -1):
            entries = levels[index]
            if not entries and index:
                continue  # git cannot represent an empty directory
            body = encode_tree(entries)
            raw = hash_object(TREE, body)
            if not odb.has(raw):
                missing.append((TREE, body))
            parent, name = self.dirs[index]
            if index:
                levels[parent].append((name, DIR_MODE, raw))
            else:
                root_raw = raw
        return root_raw.hex(), missing

    def save_cache(self, start_ns: int) -> None:
        horizon = start_ns - RACY_NS
        cache = {f.rel: (*f.st, f.oid) for f in self.files if f.oid and f.st[2] < horizon and f.st[3] < horizon}
        temp = self.cache_path.with_name(f"{self.cache_path.name}.{os.getpid()}.tmp")
        try:
            self.cache_path.parent.mkdir(mode=0o700, exist_ok=True)
            temp.write_bytes(_cache_encoder.encode(cache))
            os.replace(temp, self.cache_path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                temp.unlink()
            raise StorageError(f"cannot write the snapshot cache {self.cache_path}: {exc}") from exc


def cache_file(cache_dir: Path, directory: str) -> Path:
    return cache_dir / f"snapshot-{hashlib.sha256(os.fsencode(directory)).hexdigest()[:32]}"


def restore_tree(odb: ObjectDB, tree: str, directory: str) -> None:
    """Write the tree into ``directory``, which must be missing or empty."""
    try:
        os.makedirs(directory, exist_ok=True)
        if os.listdir(directory):
            raise InvalidInput(f"restore target {directory} is not empty")
    except OSError as exc:
        raise StorageError(f"cannot prepare {directory}: {exc.strerror}") from exc
    type_num, body = odb.read(tree)
    if type_num != TREE:
        raise InvalidInput(f"{tree} is not a tree")
    stack = [(tree, body, directory)]
    while stack:
        oid, body, path = stack.pop()
        for name, mode, raw in decode_tree(body, oid):
            if not name or name in (b".", b"..") or b"/" in name or name.lower() == b".git":
                raise IntegrityError(f"tree {oid} has an unsafe entry name {name!r}")
            target = os.path.join(path, os.fsdecode(name))
            child = raw.hex()
            try:
                if mode == DIR_MODE:
                    child_type, child_body = odb.read(child)
                    if child_type != TREE:
                        raise IntegrityError(f"tree {oid} says {child} is a tree, it is not")
                    os.mkdir(target, 0o755)
                    stack.append((child, child_body, target))
                elif mode == 0o120000:
                    os.symlink(os.fsdecode(odb.read_blob(child)), target)
                elif mode in (0o100644, 0o100755):
                    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                    try:
                        odb.copy_blob(child, fd)
                        os.fchmod(fd, 0o755 if mode == 0o100755 else 0o644)
                    finally:
                        os.close(fd)
                else:
                    raise IntegrityError(f"tree {oid} has entry {name!r} of unsupported mode {mode:o}")
            except OSError as exc:
                raise StorageError(f"cannot restore {target}: {exc.strerror}") from exc
