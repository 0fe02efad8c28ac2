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
import time
from pathlib import Path
from typing import Protocol

import msgspec

from ..errors import IntegrityError, InvalidInput, StorageError
from .objects import BLOB, DIR_MODE, TREE, decode_tree, encode_tree, hash_object
from .odb import ObjectDB, open_for_reading
from .watch import Watcher

__all__ = ["LARGE_FILE", "SnapshotPlan", "Sink", "cache_file", "restore_tree"]

RACY_NS = 50_000_000
#: files at least this large stream into loose objects instead of being read whole into a pack.
LARGE_FILE = 1 << 20

_CacheEntry = tuple[int, int, int, int, int, str]  # mode, size, mtime_ns, ctime_ns, ino, oid
_cache_decoder = msgspec.msgpack.Decoder(dict[str, _CacheEntry])
_cache_encoder = msgspec.msgpack.Encoder()


def _git_mode(st_mode: int) -> int:
    if stat.S_ISLNK(st_mode):
        return 0o120000
    return 0o100755 if st_mode & stat.S_IXUSR else 0o100644


def _excluded(name: str) -> bool:
    return name.lower() == ".git"


class Sink(Protocol):
    """Where a snapshot puts what it reads: the CAS actor's batch."""

    def add(self, type_num: int, body: bytes, raw: bytes | None = None) -> bytes: ...

    def add_large_file(self, path: str) -> bytes | None: ...


class SnapshotPlan:
    """One snapshot, in one pass over the directory, run by the CAS actor (its single writer).

    Each directory is watched (if a watcher is given) before it is listed, listed and stat'ed
    relative to its descriptor, and every file the stat cache cannot answer is read and staged at
    once, while the directory is open. Trees are built bottom-up at the end.
    """

    def __init__(self, root: str, cache_path: Path, exclude: set[tuple[int, int]]) -> None:
        self.root = root
        self.cache_path = cache_path
        self.exclude = exclude
        self.dirs: list[tuple[int, bytes]] = []  # (parent index, name); index 0 is the root
        #: per directory: (name, mode, raw oid) entries found so far
        self.levels: list[list[tuple[bytes, int, bytes]]] = []
        self.seen: dict[str, _CacheEntry] = {}  # what the next stat cache will hold
        self.start_ns = 0

    def run(self, sink: Sink, odb: ObjectDB, watcher: Watcher | None) -> bytes:
        """Scan, store, and return the raw id of the root tree."""
        self.start_ns = time.time_ns()
        cache = self._load_cache()
        if watcher is not None:
            watcher.begin(self.root)
        self.dirs.append((-1, b""))
        self.levels.append([])
        stack = [(0, self.root, "")]
        while stack:
            index, path, rel = stack.pop()
            # Watched before listed: a change after this point is an event, never a miss.
            wd = watcher.watch_dir(self.root, path) if watcher is not None else -1
            try:
                # Listed, stat'ed and opened relative to the directory's descriptor (getdents,
                # fstatat, openat): no path walk from / for every file.
                dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue  # removed while we scanned
            except OSError as exc:
                raise StorageError(f"cannot list {path}: {exc.strerror}") from exc
            try:
                self._scan_dir(dir_fd, index, path, rel, wd, cache, sink, odb, watcher, stack)
            finally:
                os.close(dir_fd)
        return self._build_trees(sink)

    def _scan_dir(
        self,
        dir_fd: int,
        index: int,
        path: str,
        rel: str,
        wd: int,
        cache: dict[str, _CacheEntry],
        sink: Sink,
        odb: ObjectDB,
        watcher: Watcher | None,
        stack: list[tuple[int, str, str]],
    ) -> None:
        try:
            entries = list(os.scandir(dir_fd))
        except OSError as exc:
            raise StorageError(f"cannot list {path}: {exc.strerror}") from exc
        level = self.levels[index]
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
            mode = st.st_mode
            child_rel = f"{rel}/{name}" if rel else name
            if stat.S_ISDIR(mode):
                if (st.st_dev, st.st_ino) in self.exclude:
                    if watcher is not None:
                        watcher.ignore(wd, name)
                    continue
                self.dirs.append((index, os.fsencode(name)))
                self.levels.append([])
                stack.append((len(self.dirs) - 1, f"{path}/{name}", child_rel))
                continue
            if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
                continue  # sockets, fifos and devices have no git representation: skipped, as git does
            # The stat recorded is the scan's: had the file changed since, its next stat differs from
            # it and the cache misses.
            key = (mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
            hit = cache.get(child_rel)
            if hit is not None and hit[:5] == key and odb.has(raw := bytes.fromhex(hit[5])):
                oid = raw
            else:
                found = self._store(sink, dir_fd, name, f"{path}/{name}", mode, st.st_size)
                if found is None:
                    continue  # vanished before it could be read: left out of the tree
                oid = found
            level.append((os.fsencode(name), _git_mode(mode), oid))
            self.seen[child_rel] = (*key, oid.hex())

    def _store(self, sink: Sink, dir_fd: int, name: str, path: str, mode: int, size: int) -> bytes | None:
        try:
            if stat.S_ISLNK(mode):
                return sink.add(BLOB, os.fsencode(os.readlink(name, dir_fd=dir_fd)))
            if size >= LARGE_FILE:
                return sink.add_large_file(path)
            fd = open_for_reading(name, dir_fd=dir_fd, shown=path)
            if fd is None:
                return None
            try:
                data = _read_all(fd, size)
            finally:
                os.close(fd)
        except FileNotFoundError:
            return None
        except IsADirectoryError as exc:
            raise InvalidInput(f"{path} is not a regular file") from exc
        except OSError as exc:
            raise StorageError(f"cannot read {path}: {exc.strerror}") from exc
        return sink.add(BLOB, data)

    def _load_cache(self) -> dict[str, _CacheEntry]:
        try:
            data = self.cache_path.read_bytes()
            return _cache_decoder.decode(data)
        except (FileNotFoundError, msgspec.DecodeError, msgspec.ValidationError):
            return {}
        except OSError as exc:
            raise StorageError(f"cannot read the snapshot cache {self.cache_path}: {exc}") from exc

    def _build_trees(self, sink: Sink) -> bytes:
        root_raw = b""
        # Children were appended after their parents, so walking backwards sees children first.
        for index in range(len(self.dirs) - 1, -1, -1):
            entries = self.levels[index]
            if not entries and index:
                continue  # git cannot represent an empty directory
            body = encode_tree(entries)
            raw = sink.add(TREE, body, hash_object(TREE, body))
            parent, name = self.dirs[index]
            if index:
                self.levels[parent].append((name, DIR_MODE, raw))
            else:
                root_raw = raw
        return root_raw

    def save_cache(self) -> None:
        """Record what this snapshot saw; call once its objects are durable."""
        horizon = self.start_ns - RACY_NS
        cache = {rel: entry for rel, entry in self.seen.items() if entry[2] < horizon and entry[3] < horizon}
        temp = self.cache_path.with_name(f"{self.cache_path.name}.{os.getpid()}.tmp")
        try:
            self.cache_path.parent.mkdir(mode=0o700, exist_ok=True)
            temp.write_bytes(_cache_encoder.encode(cache))
            os.replace(temp, self.cache_path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                temp.unlink()
            raise StorageError(f"cannot write the snapshot cache {self.cache_path}: {exc}") from exc


def _read_all(fd: int, size: int) -> bytes:
    # Asking for one byte more than the size says in one read whether the file grew meanwhile.
    data = os.read(fd, size + 1)
    if len(data) <= size:
        return data
    chunks = [data]
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


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
