"""Directory -> tree: the scan and stat cache behind ``snapshot``.

The stat cache works as git's index does: a file whose ``(mode, size, mtime, ctime, inode, device)``
match what was recorded when it was last stored is not read again. The device counts: a bind mount or
another file system mounted inside the workspace numbers its inodes on its own, so without it a file
there could pass for the one stored before under the same path. Entries modified within
``RACY_NS`` of a snapshot's start (2 s where the file system keeps whole seconds) are "racily
clean" (a later write could keep the same timestamp tick) and are never cached, so a change is
never missed.

The workspace is untrusted: tools may swap, rename and delete its entries while the scan runs. The
scan opens the root once (a symlink *at* the root, which the caller named, is followed) and from
there opens, lists, stats and reads everything relative to directory descriptors it opened itself
(:mod:`.dirfd`): a directory swapped for a symlink is never followed, a file swapped for a FIFO is
never waited on. An entry that changed type between the listing and the open is left out, as one
deleted meanwhile is (it changed during the scan; the change watch has seen it, so the next snapshot
scans again). A file replaced by another regular file is read as what was opened.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import logging
import os
import secrets
import stat
import time
from pathlib import Path
from typing import Annotated, Final, Protocol

import msgspec

from ..errors import InvalidInput, StorageError
from .dirfd import ROOT_FLAGS, open_dir_at, open_file_at, shown_path
from .gitrules import DOTFILE_MAX_BYTES, MAX_TREE_DEPTH, dotfile_blob_problem, dotfile_kind
from .objects import BLOB, DIR_MODE, TREE, encode_tree, hash_object, tree_name_problem
from .odb import ObjectDB
from .pack import write_all
from .restore import restore_tree
from .watch import Watcher

__all__ = [
    "LARGE_FILE",
    "CacheEntry",
    "SnapshotPlan",
    "Sink",
    "cache_file",
    "entry_oid",
    "restore_tree",
    "write_cache",
]

log = logging.getLogger(__name__)

RACY_NS = 50_000_000
#: files at least this large stream into loose objects instead of being read whole into a pack.
LARGE_FILE = 1 << 20
_LINK_MODE = 0o120000

# Keyed by the path relative to the root as bytes: names are bytes on Linux, and not all are UTF-8.
# The oid's pattern makes a damaged cache file fail to decode (and be dropped), never fail a snapshot.
# A cache written before the device was part of the key holds 6-tuples: it fails to decode and is
# dropped whole (every file read again), so no entry without a device is ever trusted.
_CacheEntry = tuple[int, int, int, int, int, int, Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{64}$")]]
#: one file's entry in a stat cache: (mode, size, mtime_ns, ctime_ns, inode, device, hex oid)
CacheEntry = _CacheEntry
#: the part of an entry that must match a file's stat for the entry to answer for it
_StatKey = tuple[int, int, int, int, int, int]
_KEY_LEN: Final = 6


def _stat_key(st: os.stat_result) -> _StatKey:
    return (st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


def entry_oid(entry: _CacheEntry) -> str:
    """The hex id of the object a stat cache entry names."""
    return entry[_KEY_LEN]


_cache_decoder = msgspec.msgpack.Decoder(dict[bytes, _CacheEntry])
_cache_encoder = msgspec.msgpack.Encoder()


#: the longest relative path a stat cache entry is kept for (Linux's PATH_MAX: a longer path cannot
#: be opened by name anyway). Keeping every path whole cost memory as the square of the depth: a
#: tool nesting 2,000 directories of 255-byte names with a file in each made a snapshot hold 2 GB
#: and write a 500 MB cache.
_KEY_MAX = 4096
#: how much of a longer path is kept, for messages only
_TAIL = 1024


def _join(rel: bytes, name: bytes) -> bytes:
    """``rel/name``; past ``_KEY_MAX`` bytes, NUL (no path holds one) and the path's last ``_TAIL``
    bytes: never a cache key, shown by :func:`.dirfd.shown_path` as ``.../tail``. So what a scan holds
    per directory and per file stays bounded however deep the workspace nests."""
    joined = rel + b"/" + name if rel else name
    if len(joined) <= _KEY_MAX:
        return joined
    return b"\0" + joined[-_TAIL:]


def _git_mode(st_mode: int) -> int:
    if stat.S_ISLNK(st_mode):
        return _LINK_MODE
    return 0o100755 if st_mode & stat.S_IXUSR else 0o100644


class Sink(Protocol):
    """Where a snapshot puts what it reads: the CAS actor's batch."""

    def add(self, type_num: int, body: bytes, raw: bytes | None = None) -> bytes: ...

    def add_large_file(self, fd: int, shown: str) -> bytes: ...

    def freshen(self, raw: bytes) -> bool: ...


class _Dir:
    """A directory being scanned: its descriptor, its watch, and the subdirectories it listed still to scan."""

    __slots__ = ("fd", "index", "rel", "subdirs", "wd")

    def __init__(self, fd: int, index: int, rel: bytes) -> None:
        self.fd = fd
        self.index = index
        self.rel = rel
        self.wd = -1
        self.subdirs: list[bytes] = []


class SnapshotPlan:
    """One snapshot, in one pass over the directory, run by the CAS actor (its single writer).

    Depth first, holding one descriptor per level: each directory is opened relative to its parent's
    descriptor, watched (if a watcher is given) before it is listed, listed and stat'ed relative to
    its descriptor, and every file the stat cache cannot answer is read and staged at once. Trees are
    built bottom-up at the end.
    """

    def __init__(
        self,
        root: str,
        cache_path: Path,
        exclude: set[tuple[int, int]],
        cache: dict[bytes, _CacheEntry] | None = None,
    ) -> None:
        self.root = root
        self.cache_path = cache_path
        self.exclude = exclude
        #: the stat cache to answer from, when the caller holds it (else it is read from ``cache_path``)
        self.cache = cache
        self.dirs: list[tuple[int, bytes]] = []  # (parent index, name); index 0 is the root
        #: per directory: (name, mode, raw oid) entries found so far
        self.levels: list[list[tuple[bytes, int, bytes]]] = []
        self.seen: dict[bytes, _CacheEntry] = {}  # what the next stat cache will hold
        self.start_ns = 0

    def run(self, sink: Sink, odb: ObjectDB, watcher: Watcher | None) -> bytes:
        """Scan, store, and return the raw id of the root tree."""
        self.start_ns = time.time_ns()
        cache = self._load_cache() if self.cache is None else self.cache
        open_dirs: list[_Dir] = []
        try:
            try:
                root_fd = os.open(self.root, ROOT_FLAGS)
            except OSError as exc:
                raise StorageError(f"cannot open {shown_path(self.root, b'')}: {exc.strerror or exc!r}") from exc
            self.dirs.append((-1, b""))
            self.levels.append([])
            open_dirs.append(_Dir(root_fd, 0, b""))
            if watcher is not None:
                # The directory opened, not the path: the watch answers only while the path names it.
                st = os.fstat(root_fd)
                watcher.begin(self.root, (st.st_dev, st.st_ino))
            self._scan_dir(open_dirs[-1], cache, sink, odb, watcher)
            while open_dirs:
                top = open_dirs[-1]
                if not top.subdirs:
                    open_dirs.pop()
                    os.close(top.fd)
                    continue
                name = top.subdirs.pop()
                rel = _join(top.rel, name)
                if len(open_dirs) >= MAX_TREE_DEPTH:
                    # Refused before it is opened: one descriptor is held per level, and git reads no
                    # tree nested deeper (write_tree refuses the same paths).
                    shown = shown_path(self.root, rel)
                    shown = shown if len(shown) <= 300 else shown[:150] + "..." + shown[-150:]
                    raise InvalidInput(
                        f"cannot snapshot {shown}: directories nested deeper than "
                        f"{MAX_TREE_DEPTH} levels, the root counted, which git refuses (core.maxTreeDepth)"
                    )
                try:
                    opened = open_dir_at(top.fd, name)
                except OSError as exc:
                    raise StorageError(f"cannot open {shown_path(self.root, rel)}: {exc.strerror or exc!r}") from exc
                if opened is None:
                    continue  # removed, or no longer a directory: it changed during the scan
                fd, st = opened
                if (st.st_dev, st.st_ino) in self.exclude:
                    os.close(fd)
                    if watcher is not None:
                        watcher.ignore(top.wd, name)
                    continue
                self.dirs.append((top.index, name))
                self.levels.append([])
                open_dirs.append(_Dir(fd, len(self.dirs) - 1, rel))
                self._scan_dir(open_dirs[-1], cache, sink, odb, watcher)
        finally:
            for left in open_dirs:
                os.close(left.fd)
        return self._build_trees(sink)

    def _scan_dir(
        self,
        here: _Dir,
        cache: dict[bytes, _CacheEntry],
        sink: Sink,
        odb: ObjectDB,
        watcher: Watcher | None,
    ) -> None:
        # Watched before listed: a change after this point is an event, never a miss.
        if watcher is not None:
            here.wd = watcher.watch_dir(self.root, here.fd)
        dir_fd = here.fd
        try:
            with os.scandir(dir_fd) as listing:
                entries = list(listing)
        except OSError as exc:
            raise StorageError(f"cannot list {shown_path(self.root, here.rel)}: {exc.strerror or exc!r}") from exc
        level = self.levels[here.index]
        for entry in entries:
            name_text = entry.name
            name = os.fsencode(name_text)
            if name_text.lower() == ".git":
                # The workspace's own repository is not part of its snapshot.
                if watcher is not None:
                    watcher.ignore(here.wd, name)
                continue
            rel = _join(here.rel, name)
            # A path too long to be a cache key (see _join) is read every time.
            keyed = not rel.startswith(b"\0")
            hit = cache.get(rel) if keyed else None
            try:
                # The listing's d_type answers these without a syscall. A file no cache entry can
                # answer is not stat'ed at all: it is opened, and its fstat is what counts.
                if entry.is_dir(follow_symlinks=False):
                    here.subdirs.append(name)
                    continue
                is_file = entry.is_file(follow_symlinks=False)
                if hit is not None or not is_file:
                    st = entry.stat(follow_symlinks=False)  # fstatat relative to dir_fd, no follow
                    is_file = stat.S_ISREG(st.st_mode)
                    if not (is_file or stat.S_ISLNK(st.st_mode)):
                        continue  # sockets, FIFOs and devices have no git representation: skipped, as git does
            except FileNotFoundError:
                continue  # removed while we scanned
            except OSError as exc:
                # e.g. a directory we may list but not search (mode 0o444)
                raise StorageError(f"cannot stat {shown_path(self.root, rel)}: {exc.strerror or exc!r}") from exc
            # Freshened: the tree this snapshot builds names it, so a gc must keep it.
            if (
                hit is not None
                and hit[:_KEY_LEN] == _stat_key(st)
                and sink.freshen(raw := bytes.fromhex(entry_oid(hit)))
            ):
                level.append((name, _git_mode(st.st_mode), raw))
                self.seen[rel] = hit  # keyed: a hit was found by its key
                continue
            if is_file:
                # The stat recorded is that of what was read, in case it was replaced meanwhile.
                found = self._store_file(sink, dir_fd, name, rel)
                if found is None:
                    continue  # vanished, or no longer a regular file: it changed during the scan
                oid, key = found
            else:
                link = self._store_link(sink, dir_fd, name, rel)
                if link is None:
                    continue  # vanished, or no longer a symlink
                oid = link
                key = _stat_key(st)
            level.append((name, _git_mode(key[0]), oid))
            if keyed:
                self.seen[rel] = (*key, oid.hex())

    def _store_link(self, sink: Sink, dir_fd: int, name: bytes, rel: bytes) -> bytes | None:
        try:
            target = os.readlink(name, dir_fd=dir_fd)  # readlinkat: reads the link, never follows it
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            if exc.errno == errno.EINVAL:  # no longer a symlink
                return None
            raise StorageError(f"cannot read {shown_path(self.root, rel)}: {exc.strerror or exc!r}") from exc
        return sink.add(BLOB, target)

    def _store_file(self, sink: Sink, dir_fd: int, name: bytes, rel: bytes) -> tuple[bytes, _StatKey] | None:
        try:
            opened = open_file_at(dir_fd, name)
        except OSError as exc:
            raise StorageError(f"cannot read {shown_path(self.root, rel)}: {exc.strerror or exc!r}") from exc
        if opened is None:
            return None
        fd, st = opened
        # git checks the content of .gitmodules and .gitattributes (any spelling): so does the CAS.
        kind = dotfile_kind(name)
        try:
            key = _stat_key(st)
            if st.st_size >= LARGE_FILE and kind is None:
                return sink.add_large_file(fd, shown_path(self.root, rel)), key
            if kind is not None and st.st_size > DOTFILE_MAX_BYTES:
                raise InvalidInput(f"cannot snapshot {shown_path(self.root, rel)}: larger than a .{kind} may be")
            try:
                # Bounded: a file can grow after its fstat (a sparse extension is instant), and what
                # it grew to must not be read whole into memory.
                data = _read_all(fd, st.st_size) if kind is None else _read_all(fd, st.st_size, DOTFILE_MAX_BYTES)
            except OSError as exc:
                raise StorageError(f"cannot read {shown_path(self.root, rel)}: {exc.strerror or exc!r}") from exc
            if data is None and kind is None:
                os.lseek(fd, 0, os.SEEK_SET)  # a sink may stream from where the descriptor stands
                return sink.add_large_file(fd, shown_path(self.root, rel)), key
            if data is None:
                raise InvalidInput(f"cannot snapshot {shown_path(self.root, rel)}: larger than a .{kind} may be")
        finally:
            os.close(fd)
        problem = None if kind is None else dotfile_blob_problem(kind, data)
        if problem is not None:
            raise InvalidInput(f"cannot snapshot {shown_path(self.root, rel)}: git fsck would reject it ({problem})")
        return sink.add(BLOB, data), key

    def _load_cache(self) -> dict[bytes, _CacheEntry]:
        try:
            data = self.cache_path.read_bytes()
            return _cache_decoder.decode(data)
        except (FileNotFoundError, NotADirectoryError, msgspec.DecodeError, msgspec.ValidationError):
            return {}
        except OSError as exc:
            # Only a cache: a snapshot without it reads every file, and is still right.
            log.warning("cannot read the snapshot cache %s: %s", self.cache_path, exc)
            return {}

    def _build_trees(self, sink: Sink) -> bytes:
        root_raw = b""
        # Children were appended after their parents, so walking backwards sees children first.
        for index in range(len(self.dirs) - 1, -1, -1):
            entries = self.levels[index]
            if not entries and index:
                continue  # git cannot represent an empty directory
            try:
                body = encode_tree(entries)  # refuses every name git refuses
            except InvalidInput as exc:
                raise self._refused(index, entries, exc) from exc
            raw = sink.add(TREE, body, hash_object(TREE, body))
            parent, name = self.dirs[index]
            if index:
                self.levels[parent].append((name, DIR_MODE, raw))
            else:
                root_raw = raw
        return root_raw

    def _refused(self, index: int, entries: list[tuple[bytes, int, bytes]], exc: InvalidInput) -> InvalidInput:
        """The error for a directory whose tree git would refuse, naming the entry by its path."""
        parts = []
        at = index
        while at > 0:
            at, name = self.dirs[at]
            parts.append(name)
        rel = b"/".join(reversed(parts))
        if len(rel) > _KEY_MAX:
            rel = b"\0" + rel[-_TAIL:]  # shown as .../tail
        for name, mode, _raw in entries:
            problem = tree_name_problem(name, mode)
            if problem is not None:
                path = shown_path(self.root, rel + b"/" + name if rel else name)
                return InvalidInput(f"cannot snapshot {path}: git refuses this name ({problem})")
        return InvalidInput(f"cannot snapshot {shown_path(self.root, rel)}: {exc}")

    def cache_entries(self) -> dict[bytes, _CacheEntry]:
        """The stat cache this snapshot leaves: what it saw, less the racily clean entries (modified
        within ``RACY_NS`` of its start: a later write could keep the same timestamp). Valid once the
        snapshot's objects are durable."""
        return {rel: entry for rel, entry in self.seen.items() if not _racy(entry, self.start_ns)}

    def save_cache(self) -> None:
        """Record what this snapshot saw; call once its objects are durable (see :func:`write_cache`)."""
        write_cache(self.cache_path, self.cache_entries())


#: how old the times of a file must be to cache it where the file system keeps whole seconds
#: (ext2/ext3 with 128-byte inodes; FAT keeps two)
_COARSE_RACY_NS = 2_000_000_000
_SECOND_NS = 1_000_000_000


def _racy(entry: _CacheEntry, start_ns: int) -> bool:
    """Whether a file could have changed after it was read without its stat showing it: modified
    within the timestamp granularity (and ``RACY_NS`` of clock skew) of the snapshot's start. Times
    that are both whole seconds mean a file system that keeps seconds (on one that keeps
    nanoseconds, one time in 10**9 is): a change in the same second keeps the same stat."""
    mtime, ctime = entry[2], entry[3]
    coarse = mtime % _SECOND_NS == 0 and ctime % _SECOND_NS == 0
    horizon = start_ns - (_COARSE_RACY_NS if coarse else RACY_NS)
    return mtime >= horizon or ctime >= horizon


def write_cache(path: Path, cache: dict[bytes, _CacheEntry]) -> bool:
    """Write a stat cache to ``path``; whether it was written.

    Failing to write it (a full disk) fails nothing: the snapshots are stored, and the previous cache,
    if any, stays valid (an entry is used only while the file's stat still matches it and its object
    is present), so a stale or missing cache only costs the next snapshot a re-read. That is also
    why the old file is unlinked before the new one is renamed into place, not renamed over: ext4
    (``auto_da_alloc``) writes a file back at once when it replaces another by rename, which made
    each cache write cost a disk write; a crash between the two leaves no cache, and no file is
    synced, so one lost to a crash is missing or fails to decode (and is dropped)."""
    temp = path.with_name(f"{path.name}.{os.getpid()}.{_TEMP_TAG}.{next(_temp_numbers)}.tmp")
    created = False
    try:
        try:
            fd = os.open(temp, _CACHE_FLAGS, 0o600)
        except FileNotFoundError:
            path.parent.mkdir(mode=0o700, exist_ok=True)
            fd = os.open(temp, _CACHE_FLAGS, 0o600)
        created = True
        try:
            write_all(fd, _cache_encoder.encode(cache))
        finally:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.rename(temp, path)
    except OSError as exc:
        if created:
            with contextlib.suppress(OSError):
                temp.unlink()
        log.warning("cannot write the snapshot cache %s: %s", path, exc)
        return False
    return True


_CACHE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# Temp names unique to this process without a random draw per write (O_EXCL refuses a leftover).
_TEMP_TAG = secrets.token_hex(4)
_temp_numbers = itertools.count()


def _read_all(fd: int, size: int, limit: int = LARGE_FILE) -> bytes | None:
    """The file's bytes, or None once it holds more than ``limit`` (it grew after its fstat said
    ``size``): the caller streams it or refuses it, never holds it all."""
    # Asking for one byte more than the size says in one read whether the file grew meanwhile.
    data = os.read(fd, size + 1)
    if len(data) <= size:
        return data
    chunks = [data]
    total = len(data)
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
        total += len(chunk)
        if total > limit:
            return None
    return b"".join(chunks)


def cache_file(cache_dir: Path, directory: str) -> Path:
    return cache_dir / f"snapshot-{hashlib.sha256(os.fsencode(directory)).hexdigest()[:32]}"
