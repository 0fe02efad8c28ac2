"""The object database on disk: a bare SHA-256 git repository, read and written synchronously.

Only the CAS actor writes (from its worker thread); any thread may read. Small objects are written in
packs, one per batch; large files stream into loose objects. Every read re-hashes what it returns.

Damage stays local. A pack whose index is damaged (or missing) is re-indexed from the pack itself: its
entries are walked and every object re-hashed, the pack's own checksum verified, and the damaged index
set aside in ``quarantine/`` for :meth:`ObjectDB.damage_report` to name. A pack that is itself damaged
serves every object that can still be walked and re-hashed; a read of one that cannot raises
``IntegrityError``, as does a read of any object whose bytes are damaged.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import secrets
import shutil
import stat
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import BinaryIO

from ..errors import IntegrityError, InvalidInput, LockTimeout, ObjectNotFound, StorageError
from ..fslock import FsLock
from .gate import GcGate
from .objects import BLOB, TYPE_NAMES, TYPE_NUMBERS, object_header, validate_oid
from .pack import PackEntry, PackIndex, PackReader, fsync_dir, write_all, write_idx, write_pack, zlib_stream
from .retired import FRESH_LOG, JOURNAL, finish, read_journal, retirable

__all__ = ["FreshSession", "ObjectDB"]

log = logging.getLogger(__name__)

_CONFIG = """[core]
\trepositoryformatversion = 1
\tfilemode = true
\tbare = true
[extensions]
\tobjectformat = sha256
[gc]
\tauto = 0
\tpruneExpire = never
"""
_TEMP_RE = re.compile(r"tmp_(?:obj|pack|gc)_(\d+)_[0-9a-f]+(?:\.pack|\.idx|\.mtimes)?")
_CHUNK = 1 << 20
#: how long an orphaned pack (renamed, its .idx never was) may be a live writer's, not a crash's.
_ORPHAN_AGE_S = 60.0
#: reads of a large file that keeps changing before its last read takes it as its fstat sizes it
_READ_ATTEMPTS = 3
#: how many REF_DELTA bases deep a read may go (git's own bound on a delta chain).
_MAX_REF_DEPTH = 4095
#: how often a read looks whether packs went away (another process's gc), so their space is freed.
_STALE_CHECK_S = 2.0


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ObjectDB:
    """A git object store (loose objects and packs) at ``gitdir``."""

    def __init__(
        self,
        gitdir: Path,
        *,
        fsync: bool,
        compression: int = 0,
        readonly: bool = False,
        lock_dir: Path | None = None,
    ) -> None:
        self.gitdir = gitdir
        self.objects = str(gitdir / "objects")
        self.pack_dir = str(gitdir / "objects" / "pack")
        self.quarantine = str(gitdir / "quarantine")
        self.fsync = fsync
        self.compression = compression
        #: read-only: nothing on disk is created, cleaned or repaired (a damaged index is rebuilt in
        #: memory only).
        self.readonly = readonly
        # Re-entrant: re-indexing a damaged pack reads delta bases, and a read may refresh.
        self._refresh_lock = threading.RLock()
        self._packs: dict[str, PackReader | None] = {}
        #: per loaded pack, its objects' offsets: what ``_where`` is rebuilt from when packs go away.
        self._offsets: dict[str, dict[bytes, int]] = {}
        self._where: dict[bytes, tuple[PackReader, int]] = {}
        #: gc's gate (see :mod:`.gate`); None when read-only (nothing is freshened or published).
        self.gate = GcGate(lock_dir) if lock_dir is not None and not readonly else None
        #: what gc's journal retires: pack base name -> inode of its .pack; loose hex id -> inode.
        self._retired_key: tuple[int, int, int] | None = None
        self._retired_packs: dict[str, int] = {}
        self._retired_loose: dict[str, int] = {}
        self._stale_at = 0.0
        self._pack_dir_mtime = 0
        self._finished_seen = 0  # the gate's count of finished journals at the last refresh
        #: objects a damaged pack held that could not be recovered: raw id -> why.
        self._lost: dict[bytes, str] = {}
        #: packs found damaged and not repaired: idx name -> what is wrong.
        self._damaged: dict[str, str] = {}

    # -- layout ----------------------------------------------------------------------------------

    def init(self) -> None:
        """Create the repository if missing, check it is SHA-256 if present, clean crash leftovers."""
        config = self.gitdir / "config"
        if self.readonly:
            try:
                self._check_config(config.read_bytes())
            except OSError as exc:
                raise StorageError(f"cannot open the CAS at {self.gitdir}: {exc}") from exc
            self.refresh()
            return
        try:
            if config.exists():
                self._check_config(config.read_bytes())
            else:
                for sub in ("objects/pack", "objects/info", "refs/heads", "refs/tags"):
                    (self.gitdir / sub).mkdir(parents=True, exist_ok=True)
                head = self.gitdir / "HEAD"
                if not head.exists():
                    head.write_text("ref: refs/heads/main\n")
                (self.gitdir / "description").write_text("pforge_async content-addressed store\n")
                tmp = self.gitdir / f"config.tmp{os.getpid()}"
                tmp.write_text(_CONFIG)
                os.replace(tmp, config)
            self.clean_temp()
            self.finish_retired()
        except OSError as exc:
            raise StorageError(f"cannot open the CAS at {self.gitdir}: {exc}") from exc
        self.refresh()

    def _check_config(self, data: bytes) -> None:
        """Refuse a repository that is not SHA-256. A config one or two bytes off the one this module
        writes is ours, damaged: it is set aside in quarantine and written anew (read-only: noted)."""
        ours = _CONFIG.encode()
        if data == ours:
            return
        if len(data) != len(ours) or sum(a != b for a, b in zip(data, ours, strict=True)) > 2:
            if re.search(rb"objectformat\s*=\s*sha256", data):
                return  # a config someone edited (git config ...): theirs to keep
            raise StorageError(f"{self.gitdir} is a git repository, but not in SHA-256 format")
        log.warning("%s/config is damaged; it is the config this store writes, one byte off", self.gitdir)
        if self.readonly:
            self._damaged["config"] = f"{self.gitdir}/config is damaged (read-only: not rewritten)"
            return
        config = self.gitdir / "config"
        os.makedirs(self.quarantine, exist_ok=True)
        shutil.copyfile(config, os.path.join(self.quarantine, f"config.{time.time_ns()}"))
        tmp = self.gitdir / f"config.tmp{os.getpid()}"
        tmp.write_text(_CONFIG)
        os.replace(tmp, config)
        if self.fsync:
            fsync_dir(str(self.gitdir))

    def clean_temp(self) -> None:
        """Remove temp files whose writing process is gone; never another live writer's."""
        dirs = [str(self.gitdir), self.objects, self.pack_dir]
        dirs += [os.path.join(self.objects, d) for d in os.listdir(self.objects) if len(d) == 2]
        for directory in dirs:
            for name in os.listdir(directory):
                match = _TEMP_RE.fullmatch(name)
                if match and not _pid_alive(int(match[1])):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(directory, name))
        now = time.time()
        names = set(os.listdir(self.pack_dir))
        for name in sorted(names):
            if not name.startswith("pack-"):
                continue
            path = os.path.join(self.pack_dir, name)
            base = name.rsplit(".", 1)[0]
            if name.endswith(".pack"):
                if base + ".idx" not in names:
                    with contextlib.suppress(FileNotFoundError):
                        if now - os.stat(path).st_mtime > _ORPHAN_AGE_S:
                            self._adopt_orphan(path)
            elif name.endswith(".idx") and base + ".pack" not in names:
                # gc unlinks a retired pack before its index: an index alone is a leftover of one.
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            elif name.endswith(".mtimes") and base + ".pack" not in names:
                # gc renames a cruft pack's .mtimes first: alone and old, it outlived its pack.
                with contextlib.suppress(FileNotFoundError):
                    if now - os.stat(path).st_mtime > _ORPHAN_AGE_S:
                        os.unlink(path)

    def finish_retired(self) -> int:
        """Unlink what a gc that did not finish retired (see :mod:`.retired`); returns how many files."""
        if self.gate is None or not os.path.exists(os.path.join(self.gitdir, JOURNAL)):
            return 0
        # Only while no gc runs: a running one finishes its journal itself, and may write the next.
        run = self.gate.run_lock(timeout=0)
        try:
            run.acquire()
        except LockTimeout:
            return 0
        try:
            removed = finish(str(self.gitdir), self.objects, self.gate.exclusive)
            if removed:
                self.gate.note_finished()
            return removed
        finally:
            run.release()

    def _adopt_orphan(self, path: str) -> None:
        """A pack without its index: a writer died between the two renames, or the index was lost.
        Either way its objects are whole and self-describing, so index it again; a pack that does not
        walk to its end and its checksum is set aside in quarantine, never deleted."""
        try:
            reader = PackReader(path)
        except IntegrityError:
            self._set_aside(path)
            return
        try:
            scan = reader.scan(self._resolver(0))
        finally:
            reader.close()
        if scan.problems:
            self._set_aside(path)
        else:
            self._write_index(path[:-5], scan.entries, reader.trailer)

    def _set_aside(self, path: str) -> None:
        try:
            os.makedirs(self.quarantine, exist_ok=True)
            os.rename(path, os.path.join(self.quarantine, os.path.basename(path)))
        except OSError:
            log.warning("could not set the damaged pack %s aside", path, exc_info=True)

    def damage_report(self) -> list[str]:
        """What is damaged in the object store beyond single objects (those :meth:`iter_oids` and a
        re-hash find): packs that cannot be fully read, and damaged files set aside in quarantine."""
        with self._refresh_lock:
            problems = sorted(self._damaged.values())
        try:
            aside = sorted(os.listdir(self.quarantine))
        except FileNotFoundError:
            aside = []
        except OSError as exc:
            return [*problems, f"cannot list {self.quarantine}: {exc.strerror or exc!r}"]
        problems += [
            f"{os.path.join(self.quarantine, name)}: a damaged file set aside (see the CAS's quarantine/ in the "
            "README); delete it once noted"
            for name in aside
        ]
        return problems

    def _temp_name(self, kind: str) -> str:
        return f"tmp_{kind}_{os.getpid()}_{secrets.token_hex(8)}"

    def refresh(self) -> None:
        """Load the index of every pack not yet known (another process may have written some), and
        forget packs that are gone or that gc retired (their objects are in the packs that replaced
        them; a read under way on a forgotten pack still finishes, its map lives while it is used)."""
        with self._refresh_lock:
            if self.gate is not None:
                self._finished_seen = self.gate.finished
            self._load_retired()
            try:
                names = os.listdir(self.pack_dir)
                self._pack_dir_mtime = os.stat(self.pack_dir).st_mtime_ns
            except OSError as exc:
                raise StorageError(f"cannot list {self.pack_dir}: {exc.strerror or exc!r}") from exc
            self._stale_at = time.monotonic() + _STALE_CHECK_S
            present = set(names)
            gone = [
                name
                for name, reader in self._packs.items()
                if name not in present or (reader is not None and self._reader_retired(reader))
            ]
            if gone:
                self._forget(gone)
            for name in sorted(names):
                if not (name.startswith("pack-") and name.endswith(".idx")) or name in self._packs:
                    continue
                retired_ino = self._retired_packs.get(name[:-4])
                if retired_ino is not None:
                    try:
                        if os.stat(os.path.join(self.pack_dir, name[:-4] + ".pack")).st_ino == retired_ino:
                            continue
                    except FileNotFoundError:
                        continue
                self._load_pack(name)

    def _forget(self, names: list[str]) -> None:
        for name in names:
            self._packs.pop(name, None)
            self._offsets.pop(name, None)
        where: dict[bytes, tuple[PackReader, int]] = {}
        for name, offsets in self._offsets.items():
            reader = self._packs.get(name)
            if reader is None:
                continue
            for raw, offset in offsets.items():
                where.setdefault(raw, (reader, offset))
        # Swapped whole: a reader on another thread sees the old table or the new one.
        self._where = where

    def _load_retired(self) -> bool:
        """Reload gc's journal if it changed; whether it did."""
        path = os.path.join(self.gitdir, JOURNAL)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            if self._retired_key is None:
                return False
            self._retired_key = None
            self._retired_packs, self._retired_loose = {}, {}
            return True
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        if key == self._retired_key:
            return False
        retired = read_journal(str(self.gitdir))
        packs: dict[str, int] = {}
        loose: dict[str, int] = {}
        for rel, ino in retired.files if retired is not None else []:
            where = retirable(rel)  # what finish() would act on, nothing else
            if where is None:
                continue
            directory, name = where
            if directory == "pack":
                if name.endswith(".pack"):
                    packs[name[:-5]] = ino
            else:
                loose[directory + name] = ino
        self._retired_key = key
        self._retired_packs, self._retired_loose = packs, loose
        return True

    def _reader_retired(self, reader: PackReader) -> bool:
        base = os.path.basename(reader.path)[:-5]
        return self._retired_packs.get(base) == reader.ino

    def _loose_retired(self, hex_oid: str) -> bool:
        """Whether the loose file of ``hex_oid`` is one gc retired (call only if it exists)."""
        ino = self._retired_loose.get(hex_oid)
        if ino is None:
            return False
        try:
            return os.stat(self.loose_path(hex_oid)).st_ino == ino
        except FileNotFoundError:
            return True

    def sync_retired(self) -> None:
        """Take in a gc decision made since the last look (a writer does at each hold of the gate)."""
        with self._refresh_lock:
            # A journal finished in this process since the last refresh (Cas.gc) is gone again before
            # this looks: its deleted packs would still be served from their maps until the next look.
            finished = self.gate is not None and self.gate.finished != self._finished_seen
            if self._load_retired() or finished:
                self.refresh()

    def _maybe_stale(self) -> None:
        """Every few seconds, one stat: if packs came or went, refresh (frees retired packs' maps)."""
        if time.monotonic() < self._stale_at:
            return
        self._stale_at = time.monotonic() + _STALE_CHECK_S
        try:
            changed = os.stat(self.pack_dir).st_mtime_ns != self._pack_dir_mtime
        except OSError:
            return
        if changed:
            self.refresh()

    def _load_pack(self, name: str) -> None:
        """Load one pack and its index; a damaged one is recovered as far as it can be, never fatal."""
        base = os.path.join(self.pack_dir, name[:-4])
        reader: PackReader | None = None
        try:
            reader = PackReader(base + ".pack")
            index = PackIndex(base + ".idx", reader)
        except FileNotFoundError:
            if reader is not None:
                reader.close()
            return  # removed by `git repack` meanwhile
        except (OSError, ValueError, IntegrityError) as exc:
            self._recover(name, base, reader, exc)
            return
        if reader.problems:
            # The objects are found through the index and re-hashed on every read: serve them.
            self._damaged[name] = "; ".join(reader.problems) + " (its objects are read through its index)"
        self._add_pack(name, reader, index.offsets)

    def _recover(self, name: str, base: str, reader: PackReader | None, error: Exception) -> None:
        """Re-index a pack from its own data after its index (or the pack) failed to load."""
        why = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        entries: list[PackEntry] = []
        problems = [f"{base}.pack: {why}"] if reader is None else []
        self._packs[name] = reader  # known from now on, so a refresh during the scan skips it
        if reader is not None:
            scan = reader.scan(self._resolver(0))
            entries, problems = scan.entries, scan.problems
        listed = PackIndex.listed(base + ".idx")
        found = {entry.raw for entry in entries}
        if reader is not None:
            self._add_pack(name, reader, {entry.raw: entry.offset for entry in entries})
        if reader is not None and not problems:
            # Only the index was damaged: the pack is whole and every object in it re-hashed.
            log.warning("pack index %s.idx was damaged (%s); rebuilding it from its pack", base, why)
            if self.readonly or not self._write_index(base, entries, reader.trailer):
                self._damaged[name] = f"{base}.idx is damaged ({why}); its pack was re-indexed in memory only"
            return
        lost = [raw for raw in listed - found if raw not in self._where]
        log.error("pack %s.pack is damaged: %s", base, "; ".join(problems))
        for raw in lost:
            self._lost[raw] = f"object {raw.hex()} was in the damaged pack {base}.pack and cannot be recovered"
        self._damaged[name] = f"{'; '.join(problems)} ({len(entries)} objects recovered from it" + (
            f", {len(lost)} that its index lists are lost)" if listed else ")"
        )

    def _write_index(self, base: str, entries: list[PackEntry], trailer: bytes) -> bool:
        """Write ``base.idx`` anew (atomically), first setting a damaged one aside in quarantine."""
        idx = base + ".idx"
        temp = os.path.join(self.pack_dir, self._temp_name("pack") + ".idx")
        try:
            if os.path.exists(idx):
                os.makedirs(self.quarantine, exist_ok=True)
                shutil.copyfile(idx, os.path.join(self.quarantine, f"{os.path.basename(idx)}.{time.time_ns()}"))
            write_idx(temp, entries, trailer, self.fsync)
            os.chmod(temp, 0o444)
            # Replaced, never removed first: a pack without an index could look like a crash's leftover.
            os.replace(temp, idx)
            if self.fsync:
                fsync_dir(self.pack_dir)
        except OSError:
            log.warning("could not write the rebuilt index %s", idx, exc_info=True)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
            return False
        return True

    def _add_pack(self, name: str, reader: PackReader, offsets: dict[bytes, int]) -> None:
        self._packs[name] = reader
        self._offsets[name] = offsets
        where = self._where
        for raw, offset in offsets.items():
            where.setdefault(raw, (reader, offset))
            self._lost.pop(raw, None)

    def pack_table(self) -> list[tuple[str, PackReader, dict[bytes, int]]]:
        """Every pack loaded, with its objects' offsets (what gc inventories)."""
        with self._refresh_lock:
            return [(name, reader, self._offsets[name]) for name, reader in self._packs.items() if reader is not None]

    def read_at(self, reader: PackReader, offset: int) -> tuple[int, bytes]:
        """The object at ``offset`` of ``reader`` (deltas applied; not re-hashed: the caller does)."""
        return reader.read(offset, self._resolver(0))

    def close(self) -> None:
        if self.gate is not None:
            self.gate.close()
        with self._refresh_lock:
            self._offsets.clear()
            self._where.clear()
            self._lost.clear()
            for reader in self._packs.values():
                if reader is not None:
                    reader.close()
            self._packs.clear()

    # -- lookups ---------------------------------------------------------------------------------

    def loose_path(self, hex_oid: str) -> str:
        return os.path.join(self.objects, hex_oid[:2], hex_oid[2:])

    def known(self, raw: bytes) -> bool:
        """Whether a pack already loaded holds the object: no I/O."""
        return raw in self._where

    def has(self, raw: bytes) -> bool:
        """Whether the object is present (not freshened: see :meth:`freshen_one` for a writer)."""
        self._maybe_stale()
        if raw in self._where:
            return True
        hex_oid = raw.hex()
        if os.path.exists(self.loose_path(hex_oid)) and not self._loose_retired(hex_oid):
            return True
        self.refresh()
        return raw in self._where

    def freshen(self, raw: bytes, touched: set[str], *, look_further: bool = True) -> bool:
        """Whether the object is present, making it young again if so (git's freshening): the file
        holding it gets a new mtime, so a gc deciding later keeps it. The caller holds the gate shared
        (a :class:`FreshSession`); ``touched`` names the files already touched during that hold.
        Without ``look_further`` (a deduplicating write) only loaded packs are looked in: a miss then
        costs a duplicate, never a listing."""
        hex_oid = raw.hex()
        for attempt in (0, 1):
            found = self._where.get(raw)
            if found is not None:
                reader = found[0]
                path = reader.path
                if path in touched:
                    return True
                if not self._reader_retired(reader):
                    if reader.cruft:
                        if self._log_fresh(raw, path, touched):
                            return True
                    else:
                        try:
                            os.utime(path)
                        except FileNotFoundError:
                            pass
                        else:
                            touched.add(path)
                            return True
            if not look_further:
                return False
            loose = self.loose_path(hex_oid)
            if loose in touched:
                return True
            try:
                os.utime(loose)
            except FileNotFoundError:
                pass
            else:
                if not self._loose_retired(hex_oid):
                    touched.add(loose)
                    return True
            if attempt == 0:
                self.refresh()
        return False

    def _log_fresh(self, raw: bytes, pack: str, touched: set[str]) -> bool:
        """Freshen one object of a cruft pack: a line in gc's freshening log (``O_APPEND``: whole
        lines from any number of writers), which the next gc reads as that object's age."""
        key = "log:" + raw.hex()
        if key in touched:
            return True
        if not os.path.exists(pack):
            return False
        fd = os.open(os.path.join(self.gitdir, FRESH_LOG), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, f"{raw.hex()} {time.time():.3f}\n".encode())
        finally:
            os.close(fd)
        touched.add(key)
        return True

    def freshen_one(self, raw: bytes) -> bool:
        """:meth:`freshen` of one object under a hold of its own (``Cas.has``); read-only: :meth:`has`."""
        return self.freshen_many([raw])[0]

    def freshen_many(self, raws: list[bytes]) -> list[bool]:
        """:meth:`freshen` of each object, in order, under one hold (``Cas.has_many``)."""
        if self.gate is None:
            return [self.has(raw) for raw in raws]
        session = FreshSession(self)
        try:
            return [session.freshen(raw) for raw in raws]
        finally:
            session.release()

    def read(self, oid: str) -> tuple[int, bytes]:
        """``(type, body)`` of an object; ``ObjectNotFound`` or ``IntegrityError`` otherwise."""
        validate_oid(oid)
        self._maybe_stale()
        raw = bytes.fromhex(oid)
        type_num, body = self._read_raw(raw)
        if hashlib.sha256(object_header(type_num, len(body)) + body).digest() != raw:
            raise IntegrityError(f"object {oid} does not match its id: the stored bytes are corrupt")
        return type_num, body

    def read_blob(self, oid: str) -> bytes:
        type_num, body = self.read(oid)
        if type_num != BLOB:
            raise InvalidInput(f"object {oid} is a {TYPE_NAMES[type_num]}, not a blob")
        return body

    def copy_blob(self, oid: str, fd: int) -> None:
        """Write a blob's bytes to ``fd``; a loose blob streams, so a large one never sits in memory."""
        validate_oid(oid)
        stream = self._stream_loose_object(oid)
        if stream is None:
            write_all(fd, self.read_blob(oid))
            return
        type_num = next(stream)
        if type_num != BLOB:
            raise InvalidInput(f"object {oid} is a {TYPE_NAMES[int(type_num)]}, not a blob")
        for chunk in stream:
            write_all(fd, chunk)  # type: ignore[arg-type]

    def verify(self, oid: str) -> tuple[int, bytes | None]:
        """Re-hash one object; returns its type, and its body unless it is a blob (which streams)."""
        stream = self._stream_loose_object(oid)
        if stream is None:
            type_num, body = self.read(oid)
            return type_num, None if type_num == BLOB else body
        type_num = int(next(stream))  # type: ignore[arg-type]
        parts = [chunk for chunk in stream if type_num != BLOB]
        return type_num, None if type_num == BLOB else b"".join(parts)  # type: ignore[arg-type]

    def _stream_loose_object(self, oid: str) -> Iterator[int | bytes] | None:
        """For a loose object: a generator yielding its type, then its body in pieces, checking the
        id at the end (``IntegrityError`` before the last piece is done). None if not loose."""
        try:
            f = open(self.loose_path(oid), "rb")  # noqa: SIM115
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"cannot read object {oid}: {exc.strerror or exc!r}") from exc
        return self._stream(oid, f)

    def _stream(self, oid: str, f: BinaryIO) -> Iterator[int | bytes]:
        with f:
            digest = hashlib.sha256()
            head = b""
            remaining: int | None = None
            try:
                for out in _inflated(f):
                    if remaining is None:
                        head += out
                        if b"\0" not in head:
                            if len(head) > 64:
                                raise ValueError("no object header")
                            continue
                        header, _, out = head.partition(b"\0")
                        kind, _, size = header.partition(b" ")
                        remaining = int(size)
                        digest.update(header + b"\0")
                        yield TYPE_NUMBERS[kind]
                    digest.update(out)
                    remaining -= len(out)
                    if out:
                        yield out
            except (zlib.error, ValueError, KeyError) as exc:
                raise IntegrityError(f"object {oid} is corrupt: {exc}") from exc
            if remaining != 0 or digest.hexdigest() != oid:
                raise IntegrityError(f"object {oid} does not match its id: the stored bytes are corrupt")

    def _resolver(self, depth: int) -> Callable[[bytes], tuple[int, bytes]]:
        def resolve(raw: bytes) -> tuple[int, bytes]:
            if depth >= _MAX_REF_DEPTH:
                raise IntegrityError(f"delta base {raw.hex()} is more than {_MAX_REF_DEPTH} deltas deep")
            type_num, body = self._read_raw(raw, depth + 1)
            if hashlib.sha256(object_header(type_num, len(body)) + body).digest() != raw:
                raise IntegrityError(f"delta base {raw.hex()} does not match its id")
            return type_num, body

        return resolve

    def _read_raw(self, raw: bytes, depth: int = 0) -> tuple[int, bytes]:
        found = self._where.get(raw)
        if found is None:
            loose = self._read_loose(raw.hex())
            if loose is not None:
                return loose
            self.refresh()
            found = self._where.get(raw)
            if found is None:
                lost = self._lost.get(raw)
                if lost is not None:
                    raise IntegrityError(lost)
                raise ObjectNotFound(f"no object {raw.hex()} in the CAS")
        reader, offset = found
        try:
            return reader.read(offset, self._resolver(depth))
        except ObjectNotFound as exc:
            raise IntegrityError(f"object {raw.hex()} in {reader.path} is a delta on a missing base: {exc}") from exc
        except (IntegrityError, IndexError, ValueError, OverflowError, struct.error, zlib.error) as exc:
            raise IntegrityError(f"object {raw.hex()} in {reader.path} is corrupt: {exc}") from exc

    def _read_loose(self, hex_oid: str) -> tuple[int, bytes] | None:
        try:
            with open(self.loose_path(hex_oid), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"cannot read object {hex_oid}: {exc.strerror or exc!r}") from exc
        try:
            full = zlib.decompress(data)
            header, _, body = full.partition(b"\0")
            kind, _, size = header.partition(b" ")
            type_num = TYPE_NUMBERS[kind]
            if int(size) != len(body):
                raise ValueError(f"header says {int(size)} bytes, body has {len(body)}")
        except (zlib.error, KeyError, ValueError) as exc:
            raise IntegrityError(f"object {hex_oid} is corrupt: {exc}") from exc
        return type_num, body

    def iter_oids(self) -> Iterator[str]:
        """Every object id present, loose and packed (each once); what gc retired is not."""
        self.refresh()
        seen: set[bytes] = set(self._where) | set(self._lost)
        yield from (raw.hex() for raw in seen)
        for prefix in sorted(os.listdir(self.objects)):
            if len(prefix) != 2:
                continue
            try:
                names = os.listdir(os.path.join(self.objects, prefix))
            except FileNotFoundError:
                continue  # an empty directory gc removed
            for rest in names:
                oid = prefix + rest
                if len(oid) == 64 and not rest.startswith("tmp_"):
                    raw = bytes.fromhex(oid)
                    if raw not in seen and not self._loose_retired(oid):
                        seen.add(raw)
                        yield oid

    # -- writes (the CAS actor's thread only) ----------------------------------------------------

    def write_pack(self, objects: list[tuple[bytes, int, bytes]], session: FreshSession | None = None) -> None:
        """Store ``(raw oid, type, body)`` objects (all new) as one pack, renamed into place under
        gc's gate (``session``'s hold, or one of its own)."""
        if not objects:
            return
        if session is not None:
            session.release()  # not held while the pack is written: only around its renames

        def publish(name: str) -> AbstractContextManager[object]:
            return self._publishing(session, lambda: f"pack-{name}" in self._retired_packs)

        try:
            name, offsets = write_pack(
                self.pack_dir,
                objects,
                len(objects),
                level=self.compression,
                fsync=self.fsync,
                temp_prefix=self._temp_name("pack"),
                publish=publish,
            )
            reader = PackReader(os.path.join(self.pack_dir, f"pack-{name}.pack"))
        except OSError as exc:
            raise StorageError(f"cannot write a pack in {self.pack_dir}: {exc}") from exc
        with self._refresh_lock:
            self._add_pack(f"pack-{name}.idx", reader, dict(offsets))

    @contextlib.contextmanager
    def _publishing(self, session: FreshSession | None, retired_name: Callable[[], bool]) -> Iterator[None]:
        """Hold gc's gate (``session``'s hold, or one of its own) around a rename into place. A name
        gc retired and has not unlinked yet (a batch that is byte for byte a retired pack, a large
        blob gc dropped) waits until it is gone: gc unlinks retired names without the gate, so no
        writer may rename onto one meanwhile. A journal whose gc died is finished here."""
        if self.gate is None:
            yield
            return
        own = session if session is not None else FreshSession(self)
        try:
            while True:
                own.hold()
                if not retired_name():
                    break
                own.release()
                if not self.finish_retired():
                    time.sleep(0.01)  # the gc that retired it is deleting: soon gone
            yield
        finally:
            if session is None:
                own.release()

    def write_file_blob(self, path: str, session: FreshSession | None = None) -> tuple[bytes, os.stat_result] | None:
        """Stream a (large) regular file into a loose blob without holding it in memory.

        Returns the raw oid and the file's ``fstat`` after reading, or None if the file vanished.
        """
        fd = open_for_reading(path)
        if fd is None:
            return None
        try:
            return self.write_fd_blob(fd, path, session)
        finally:
            os.close(fd)

    def write_fd_blob(self, fd: int, path: str, session: FreshSession | None = None) -> tuple[bytes, os.stat_result]:
        """Stream the regular file open on ``fd`` (``path`` names it in errors) into a loose blob."""
        if session is not None:
            session.release()  # not held while a large file streams: only around its rename
        for attempt in range(_READ_ATTEMPTS):
            before = os.fstat(fd)
            if not stat.S_ISREG(before.st_mode):
                raise InvalidInput(f"{path} is not a regular file")
            # The last attempt takes the file as its fstat sizes it, as git does: a log a tool keeps
            # appending to would otherwise fail every snapshot of its workspace. What it stores is
            # what was read; the stat recorded (the open's) no longer matches, so the next snapshot
            # reads the file again.
            last = attempt == _READ_ATTEMPTS - 1
            result = self._stream_loose(fd, before.st_size, path, session, prefix=last)
            after = os.fstat(fd)
            if result is not None and (last or after.st_mtime_ns == before.st_mtime_ns):
                return result, after
        raise StorageError(f"{path} kept shrinking while it was read")

    def _stream_loose(
        self, fd: int, size: int, path: str, session: FreshSession | None, *, prefix: bool = False
    ) -> bytes | None:
        """The file's ``size`` bytes as a loose blob; None if it shrank, or (unless ``prefix``, which
        stores its first ``size`` bytes) grew, while it was read."""
        header = object_header(BLOB, size)
        digest = hashlib.sha256(header)
        temp = os.path.join(self.objects, self._temp_name("obj"))
        level = self.compression
        try:
            with open(temp, "xb") as out:
                if level:
                    comp = zlib.compressobj(level)
                    out.write(comp.compress(header))
                else:  # stored deflate blocks by hand, so the stream costs no compression time
                    out.write(b"\x78\x01")
                    adler = zlib.adler32(header)
                    pending = header
                os.lseek(fd, 0, os.SEEK_SET)
                remaining = size
                while True:
                    chunk = os.read(fd, min(_CHUNK, remaining) if remaining else 1) if remaining or not prefix else b""
                    if len(chunk) > remaining:
                        return None  # the file grew under us: read it again
                    if not chunk:
                        break
                    remaining -= len(chunk)
                    digest.update(chunk)
                    if level:
                        out.write(comp.compress(chunk))
                    else:
                        adler = zlib.adler32(chunk, adler)
                        data = pending + chunk
                        last = remaining == 0
                        for part in zlib_stream_blocks(data, final=last):
                            out.write(part)
                        pending = b""
                    if remaining == 0:
                        if not prefix and os.read(fd, 1):
                            return None  # it grew
                        break
                if remaining:
                    return None  # the file shrank under us
                if level:
                    out.write(comp.flush())
                else:
                    if size == 0:
                        for part in zlib_stream_blocks(pending, final=True):
                            out.write(part)
                    out.write(adler.to_bytes(4, "big"))
                out.flush()
                if self.fsync:
                    os.fsync(out.fileno())
            raw = digest.digest()
            hex_oid = raw.hex()
            with self._publishing(session, lambda: hex_oid in self._retired_loose):
                self._publish_loose(temp, hex_oid)
            temp = ""
            return raw
        except OSError as exc:
            raise StorageError(f"cannot store {path}: {exc}") from exc
        finally:
            if temp:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temp)

    def _publish_loose(self, temp: str, hex_oid: str) -> None:
        os.chmod(temp, 0o444)
        directory = os.path.join(self.objects, hex_oid[:2])
        created = False
        try:
            os.mkdir(directory)
            created = True
        except FileExistsError:
            pass
        os.rename(temp, os.path.join(directory, hex_oid[2:]))
        if self.fsync:
            fsync_dir(directory)
            if created:
                fsync_dir(self.objects)


def open_for_reading(path: str, *, dir_fd: int | None = None, directory: bool = False, shown: str = "") -> int | None:
    """A descriptor on a workspace file or directory (never through a final symlink), or None if it
    vanished. With ``dir_fd``, ``path`` is relative to that directory. Never waits on a FIFO or a
    device, never makes a terminal the controlling one (as :mod:`.dirfd` opens); the caller checks
    what it opened with ``fstat``."""
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY
    flags |= os.O_DIRECTORY if directory else 0
    try:
        return os.open(path, flags, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StorageError(f"cannot read {shown or path}: {exc.strerror or exc!r}") from exc


def _inflated(f: BinaryIO) -> Iterator[bytes]:
    """Inflate a zlib file in bounded pieces (a highly compressed object cannot balloon memory)."""
    inflate = zlib.decompressobj()
    while chunk := f.read(_CHUNK):
        while chunk:
            out = inflate.decompress(chunk, _CHUNK)
            if out:
                yield out
            chunk = inflate.unconsumed_tail
    if tail := inflate.flush():
        yield tail


def zlib_stream_blocks(data: bytes, *, final: bool) -> list[bytes]:
    """Stored deflate blocks of ``data`` (no zlib header or checksum): the middle of a stream."""
    if not data and not final:
        return []
    parts = zlib_stream(data, 0)[1:-1]
    if not final:
        # zlib_stream marks its last block final; a stream that goes on must not.
        last_header = parts[-2]
        parts[-2] = bytes([0]) + last_header[1:]
    return parts


class FreshSession:
    """A writer's hold of gc's gate (shared), taken at the first freshening or publication and kept
    for a batch's run of them, at most ``HOLD_S`` at a time (gc waits for it; newcomers wait for gc).
    While held, no gc decides, so a file touched once stays touched: each is touched once per hold."""

    HOLD_S = 0.02

    def __init__(self, odb: ObjectDB) -> None:
        self.odb = odb
        self._lock: FsLock | None = None
        self._since = 0.0
        self._touched: set[str] = set()

    def _enter(self) -> None:
        gate = self.odb.gate
        assert gate is not None
        if self._lock is not None and time.monotonic() - self._since > self.HOLD_S:
            self.release()
        if self._lock is None:
            self._lock = gate.acquire_shared()
            self._since = time.monotonic()
            self._touched = set()
            self.odb.sync_retired()

    def freshen(self, raw: bytes, *, look_further: bool = True) -> bool:
        """See :meth:`ObjectDB.freshen`; read-only stores only look (:meth:`ObjectDB.has`)."""
        if self.odb.gate is None:
            return self.odb.known(raw) if not look_further else self.odb.has(raw)
        self._enter()
        return self.odb.freshen(raw, self._touched, look_further=look_further)

    def hold(self) -> None:
        """Hold the gate (shared), with gc's latest decision taken in."""
        if self.odb.gate is not None:
            self._enter()

    def release(self) -> None:
        if self._lock is not None:
            lock, self._lock = self._lock, None
            GcGate.release(lock)
