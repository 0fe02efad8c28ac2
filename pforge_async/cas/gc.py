"""Garbage collection of the object store: git's model (prune grace, freshening, cruft packs).

One run, on a worker thread, beside live writers in this process and others:

1. **Mark** (no lock). Inventory every pack and loose file with its inode and mtime, and every object
   with its type, its links (trees and commits are read and re-hashed) and its age: a loose object's
   file mtime, a packed one's pack mtime, a cruft pack's per-object mtime from its ``.mtimes``.
   *Kept*: what the roots and every ref reach. *Young*: what objects younger than the cutoff
   (``roots_taken_at - grace_s``) reach, beyond the kept. The rest is *doomed*.
2. **Write** (no lock). The kept objects into one new pack (more past 128 MiB), the young ones into a
   cruft pack whose ``.mtimes`` carries each object's own age, so they still expire on time. Large
   loose objects that stay are left loose. Everything is fsynced before anything is retired.
3. **Rescue** (no lock, a few passes). A writer that freshened an object since the mark touched its
   file: every doomed or young object in a touched file (and what it reaches among them) is written
   anew into a rescue pack. Refs are read again.
4. **Decide** (the gate held exclusively, briefly): the same look once more, with nothing able to
   freshen meanwhile; then the journal of retired files is written durably (:mod:`.retired`). From
   here every process treats the old files as gone.
5. **Delete**, slice by slice under the gate, then the journal.

A gc killed anywhere leaves either the old files (and perhaps complete new packs: duplicates) or a
journal the next gc or writable open finishes. A kept object is never only in a retired file.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import secrets
import stat
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from ..errors import InvalidInput, PforgeError, StorageError
from .dirfd import ROOT_FLAGS, open_dir_at
from .gate import GcGate
from .gitrules import parse_tree
from .objects import BLOB, COMMIT, TAG, TREE, TYPE_NUMBERS, object_header, validate_oid
from .odb import ObjectDB
from .pack import OFS_DELTA, REF_DELTA, PackReader, read_mtimes, write_mtimes, write_pack
from .refs import RefStore
from .retired import FRESH_LOG, Retired, discard, finish, prepare_journal, publish_journal, read_fresh_log

__all__ = ["CasGcReport", "collect", "validate_gc_args"]

log = logging.getLogger(__name__)

#: file times tick coarsely (a jiffy): a grace shorter than this counts as this long.
MIN_GRACE_S = 0.05
#: bytes of objects per pack gc writes.
_PACK_BYTES = 128 << 20
#: loose objects at least this large stay loose when kept (they are not read whole into memory).
_LARGE_LOOSE = 1 << 20
_RESCUE_PASSES = 3
_GITLINK = 0o160000


class CasGcReport(msgspec.Struct, frozen=True):
    """What one :meth:`Cas.gc` did (or, with ``dry_run``, would do).

    ``objects_kept``: reachable from the roots or a ref. ``objects_young``: unreachable but within the
    grace (or reached from such an object): kept, in a cruft pack. ``objects_rescued``: freshened by a
    writer while gc ran: kept. ``objects_reclaimed``: dropped. Bytes are those of the files under
    ``objects/``. ``missing`` lists roots and ref targets that are not in the CAS; ``unreadable`` the
    objects gc could not read (their files are left in place). ``gate_held_s`` is the longest time gc
    held the writers' gate at once. ``skipped`` lists entries under ``objects/`` (``ab``, ``ab/cdef...``)
    that are not a real directory or regular file (a symlink someone made): gc neither follows nor
    removes them, and the objects they would hold count as absent."""

    dry_run: bool
    objects_before: int
    objects_kept: int
    objects_young: int
    objects_rescued: int
    objects_reclaimed: int
    bytes_before: int
    bytes_after: int
    bytes_freed: int
    packs_before: int
    packs_after: int
    loose_before: int
    loose_after: int
    files_retired: int
    slices: int
    gate_held_s: float
    seconds: float
    missing: list[str] = msgspec.field(default_factory=list)
    unreadable: list[str] = msgspec.field(default_factory=list)
    skipped: list[str] = msgspec.field(default_factory=list)


def validate_gc_args(roots: object, grace_s: object, dry_run: object, roots_taken_at: object) -> list[str]:
    """The roots as a list of oids; ``InvalidInput`` for anything malformed, before any work."""
    if isinstance(roots, (str, bytes)) or not isinstance(roots, Iterable):
        raise InvalidInput(f"gc roots must be an iterable of object ids, not {type(roots).__name__}")
    out = [validate_oid(oid, "gc root") for oid in roots]
    for name, value in (("grace_s", grace_s), ("roots_taken_at", roots_taken_at)):
        if value is None and name == "roots_taken_at":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise InvalidInput(f"gc {name} must be a finite number >= 0, not {value!r}")
    if not isinstance(dry_run, bool):
        raise InvalidInput(f"gc dry_run must be a bool, not {dry_run!r}")
    return out


@dataclass
class _File:
    """One pack (with its .idx and .mtimes) or loose file, as the mark found it."""

    rel: str  # relative to objects/: "pack/pack-<h>.pack" or "ab/cdef..."
    path: str
    ino: int
    mtime_ns: int
    size: int
    reader: PackReader | None = None
    companions: list[tuple[str, int]] = field(default_factory=list)  # (rel, ino): .idx, .mtimes
    objects: list[bytes] = field(default_factory=list)
    pinned: bool = False  # holds an object gc could not copy: never retired


class _Inventory:
    def __init__(self) -> None:
        self.files: list[_File] = []
        #: raw id -> [(file index, offset in its pack; -1 if loose)]
        self.where: dict[bytes, list[tuple[int, int]]] = {}
        self.age: dict[bytes, float] = {}
        self.type: dict[bytes, int] = {}
        self.links: dict[bytes, list[bytes]] = {}
        self.unreadable: set[bytes] = set()

    def add(self, raw: bytes, file_index: int, offset: int, age: float) -> None:
        self.where.setdefault(raw, []).append((file_index, offset))
        if age > self.age.get(raw, -math.inf):
            self.age[raw] = age
        self.files[file_index].objects.append(raw)


class _Collector:
    def __init__(self, gitdir: Path, gate: GcGate) -> None:
        self.gitdir = gitdir
        self.gate = gate
        self.odb = ObjectDB(gitdir, fsync=True, readonly=True)
        self.refs = RefStore(gitdir, fsync=True)
        self.objects = self.odb.objects
        self.pack_dir = self.odb.pack_dir
        self.inv = _Inventory()
        self.gate_held = 0.0
        self.slices = 0
        self.outputs: set[str] = set()  # pack base names gc wrote
        self.log_offset = 0  # how much of the freshening log the mark read
        self.exclusive_depth = 0
        self.skipped: list[str] = []  # entries under objects/ gc neither followed nor removed

    # -- mark ---------------------------------------------------------------------------------------

    def inventory(self) -> None:
        self.odb.init()  # read-only: checks the config, loads every pack
        inv = self.inv
        for name, reader, offsets in self.odb.pack_table():
            base = os.path.join(self.pack_dir, name[:-4])
            try:
                st = os.stat(base + ".pack")
                idx_ino = os.stat(base + ".idx").st_ino
            except FileNotFoundError:
                continue
            if st.st_ino != reader.ino:
                continue  # replaced since it was loaded: the next gc sees the new one
            companions = [(f"pack/{name}", idx_ino)]
            ages = None
            with contextlib.suppress(FileNotFoundError):
                companions.append((f"pack/{name[:-4]}.mtimes", os.stat(base + ".mtimes").st_ino))
                ages = read_mtimes(base + ".mtimes", len(offsets), reader.trailer)
            pack_age = st.st_mtime_ns / 1e9
            # A cruft pack is born with mtime = its newest object's: a different mtime means a writer
            # touched it since, and then every object in it is that young.
            untouched = ages is not None and st.st_mtime_ns == max(ages, default=0) * 1_000_000_000
            index = len(inv.files)
            inv.files.append(
                _File(
                    f"pack/{name[:-4]}.pack", base + ".pack", st.st_ino, st.st_mtime_ns, st.st_size, reader, companions
                )
            )
            ordered = sorted(offsets)
            for i, raw in enumerate(ordered):
                age = pack_age
                if ages is not None:
                    age = float(ages[i]) if untouched else max(float(ages[i]), pack_age)
                inv.add(raw, index, offsets[raw], age)
        self.inventory_loose()

    def inventory_loose(self) -> None:
        """Loose objects, listed relative to descriptors opened without following symlinks: a fan-out
        directory or an object file that is anything but a real directory or regular file is skipped
        (reported in ``skipped``), never followed, so gc never reads, retires or deletes through it."""
        inv = self.inv
        objects_fd = os.open(self.objects, ROOT_FLAGS)
        try:
            with os.scandir(objects_fd) as it:
                prefixes = sorted(entry.name for entry in it if _is_hex(entry.name, 2))
            for prefix in prefixes:
                opened = open_dir_at(objects_fd, prefix.encode())
                if opened is None:
                    with contextlib.suppress(FileNotFoundError):
                        if not stat.S_ISDIR(os.stat(prefix, dir_fd=objects_fd, follow_symlinks=False).st_mode):
                            self.skip(prefix)
                    continue
                dir_fd, _ = opened
                try:
                    with os.scandir(dir_fd) as it:
                        names = sorted(entry.name for entry in it if _is_hex(entry.name, 62))
                    for rest in names:
                        try:
                            st = os.stat(rest, dir_fd=dir_fd, follow_symlinks=False)
                        except FileNotFoundError:
                            continue
                        if not stat.S_ISREG(st.st_mode):
                            self.skip(f"{prefix}/{rest}")
                            continue
                        index = len(inv.files)
                        path = os.path.join(self.objects, prefix, rest)
                        inv.files.append(_File(f"{prefix}/{rest}", path, st.st_ino, st.st_mtime_ns, st.st_size))
                        inv.add(bytes.fromhex(prefix + rest), index, -1, st.st_mtime_ns / 1e9)
                finally:
                    os.close(dir_fd)
        finally:
            os.close(objects_fd)

    def skip(self, rel: str) -> None:
        log.warning("%s/%s is not a real directory or regular file: gc leaves it alone", self.objects, rel)
        self.skipped.append(rel)

    def read_fresh_log(self) -> None:
        """Objects of cruft packs freshened one by one: as young as their latest freshening."""
        fresh, self.log_offset = read_fresh_log(str(self.gitdir))
        age = self.inv.age
        for raw, at in fresh.items():
            if raw in age and at > age[raw]:
                age[raw] = at

    def read_object(self, raw: bytes) -> tuple[int, bytes] | None:
        """The object's type and body from any of its copies, re-hashed; None if none reads."""
        for file_index, offset in self.inv.where.get(raw, ()):
            f = self.inv.files[file_index]
            try:
                if f.reader is not None:
                    type_num, body = self.odb.read_at(f.reader, offset)
                else:
                    type_num, body = _read_loose_file(f.path)
            except (PforgeError, OSError, ValueError, IndexError, zlib.error):
                continue
            if hashlib.sha256(object_header(type_num, len(body)) + body).digest() == raw:
                return type_num, body
        return None

    def object_type(self, raw: bytes) -> int | None:
        """An object's type without reading a blob's body where the header tells it."""
        for file_index, offset in self.inv.where.get(raw, ()):
            f = self.inv.files[file_index]
            try:
                if f.reader is not None:
                    kind = f.reader.entry_type(offset)
                    if kind not in (OFS_DELTA, REF_DELTA):
                        return kind
                else:
                    with open(f.path, "rb") as fh:
                        head = zlib.decompressobj().decompress(fh.read(256), 64)
                    name = head.split(b" ", 1)[0]
                    if name in TYPE_NUMBERS and b"\0" in head:
                        return TYPE_NUMBERS[name]
            except (PforgeError, OSError, zlib.error):
                continue
        found = self.read_object(raw)
        return None if found is None else found[0]

    def mark_links(self) -> None:
        inv = self.inv
        for raw in inv.where:
            kind = self.object_type(raw)
            if kind is None:
                inv.unreadable.add(raw)
                continue
            inv.type[raw] = kind
            if kind == BLOB:
                continue
            found = self.read_object(raw)
            if found is None:
                inv.unreadable.add(raw)
                continue
            inv.links[raw] = _links(kind, found[1], raw)

    def closure(self, start: Iterable[bytes], within: set[bytes] | None, into: set[bytes]) -> None:
        """Add to ``into`` what ``start`` reaches among present objects (only ``within``, if given)."""
        links = self.inv.links
        where = self.inv.where
        stack = [raw for raw in start if raw in where and (within is None or raw in within) and raw not in into]
        into.update(stack)
        while stack:
            for child in links.get(stack.pop(), ()):
                if child not in into and child in where and (within is None or child in within):
                    into.add(child)
                    stack.append(child)

    def ref_targets(self) -> list[bytes]:
        return [bytes.fromhex(oid) for _name, oid in self.refs.iter_refs()]

    # -- write ---------------------------------------------------------------------------------------

    def write_objects(self, raws: Iterable[bytes], kind: str) -> list[bytes]:
        """Write ``raws`` into new packs (fsynced) of ``kind`` ("kept", "cruft" or "rescue"); returns
        those that could not be read (their files are pinned)."""
        failed: list[bytes] = []
        chunk: list[tuple[bytes, int, bytes]] = []
        size = 0
        for raw in raws:
            found = self.read_object(raw)
            if found is None:
                failed.append(raw)
                for file_index, _ in self.inv.where.get(raw, ()):
                    self.inv.files[file_index].pinned = True
                continue
            chunk.append((raw, found[0], found[1]))
            size += len(found[1])
            if size >= _PACK_BYTES:
                self._write_pack(chunk, kind)
                chunk, size = [], 0
        if chunk:
            self._write_pack(chunk, kind)
        return failed

    def _write_pack(self, objects: list[tuple[bytes, int, bytes]], kind: str) -> None:
        # git's .mtimes holds 32-bit seconds: a file time past 2106 (a restored backup, a clock gone
        # wrong) is clamped, still young, never a struct.error that fails every gc.
        ages = (
            [min(max(math.ceil(self.inv.age[raw]), 0), 2**32 - 1) for raw, _, _ in sorted(objects)]
            if kind == "cruft"
            else []
        )

        def before_publish(name: str, pack_temp: str) -> bool:
            self.outputs.add(f"pack-{name}")
            base = os.path.join(self.pack_dir, f"pack-{name}")
            if os.path.exists(base + ".pack") and os.path.exists(base + ".idx"):
                self._reuse(name, kind, ages)
                return False
            if kind == "cruft":
                self._write_sidecar(name, ages)
                # Born with its newest object's mtime: see inventory().
                os.utime(pack_temp, (max(ages), max(ages)))
            return True

        try:
            write_pack(
                self.pack_dir,
                objects,
                len(objects),
                level=self.odb.compression,
                fsync=True,
                temp_prefix=f"tmp_pack_{os.getpid()}_{secrets.token_hex(8)}",
                before_publish=before_publish,
                version=3,
            )
        except OSError as exc:
            raise StorageError(f"gc cannot write a pack in {self.pack_dir}: {exc}") from exc

    def _write_sidecar(self, name: str, ages: list[int]) -> None:
        temp = os.path.join(self.pack_dir, f"tmp_gc_{os.getpid()}_{secrets.token_hex(8)}.mtimes")
        try:
            write_mtimes(temp, ages, bytes.fromhex(name), True)
            os.rename(temp, os.path.join(self.pack_dir, f"pack-{name}.mtimes"))
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
            raise

    def _reuse(self, name: str, kind: str, ages: list[int]) -> None:
        """A pack with these very bytes exists already (an earlier gc wrote the same set): it is
        this run's output, made to say what a new one would (under the gate, so no writer touches
        it meanwhile; the inventory then takes in gc's own change, so it is not a writer's)."""
        path = os.path.join(self.pack_dir, f"pack-{name}.pack")
        rel = f"pack/pack-{name}.pack"
        f = next((f for f in self.inv.files if f.rel == rel), None)
        with self.exclusive():
            st = os.stat(path)
            if f is not None and (st.st_ino, st.st_mtime_ns) != (f.ino, f.mtime_ns):
                return  # a writer touched it since the mark: all of it is young already
            if kind == "cruft":
                self._write_sidecar(name, ages)
                os.utime(path, (max(ages), max(ages)))
            elif kind == "rescue":
                os.utime(path)  # what a writer freshened is young from now
            if f is not None:
                st = os.stat(path)
                f.ino, f.mtime_ns = st.st_ino, st.st_mtime_ns

    # -- rescue and decide ----------------------------------------------------------------------------

    def changed_files(self, candidates: list[int]) -> list[int]:
        """Files (among ``candidates``) touched, replaced or removed since the mark."""
        changed = []
        for i in candidates:
            f = self.inv.files[i]
            try:
                st = os.stat(f.path)
            except FileNotFoundError:
                changed.append(i)
                continue
            if (st.st_ino, st.st_mtime_ns) != (f.ino, f.mtime_ns):
                changed.append(i)
        return changed

    def rescue(self, changed: list[int], unsafe: set[bytes], rescued: set[bytes]) -> None:
        """Write anew what a touched file holds among ``unsafe`` (doomed or young), and what that
        reaches among them, and every ref target among them; move it from ``unsafe`` to ``rescued``."""
        seeds = [raw for i in changed for raw in self.inv.files[i].objects if raw in unsafe]
        seeds += [raw for raw in self.ref_targets() if raw in unsafe]
        fresh, self.log_offset = read_fresh_log(str(self.gitdir), self.log_offset)
        seeds += [raw for raw in fresh if raw in unsafe]
        found: set[bytes] = set()
        self.closure(seeds, unsafe, found)
        if not found:
            return
        unsafe.difference_update(found)
        rescued.update(found)
        self.write_objects(sorted(found), "rescue")

    def retired_files(self, indexes: Iterable[int]) -> list[tuple[str, int]]:
        out: list[tuple[str, int]] = []
        for i in indexes:
            f = self.inv.files[i]
            if f.pinned or (f.reader is not None and os.path.basename(f.path)[:-5] in self.outputs):
                continue
            try:
                ino = os.stat(f.path).st_ino
            except FileNotFoundError:
                continue
            out.append((f.rel, ino))  # the .pack first: its index goes after it
            out += f.companions
        return out

    @staticmethod
    def temp_name() -> str:
        return f"tmp_gc_{os.getpid()}_{secrets.token_hex(8)}"

    def exclusive(self) -> contextlib.AbstractContextManager[object]:
        return _Timed(self)

    def object_bytes(self) -> tuple[int, int, int]:
        """(bytes of files under objects/, packs, loose objects) now."""
        total = packs = loose = 0
        for entry in os.scandir(self.objects):
            if entry.is_dir(follow_symlinks=False):
                try:
                    inner = list(os.scandir(entry.path))
                except FileNotFoundError:
                    continue
                for item in inner:
                    with contextlib.suppress(FileNotFoundError):
                        total += item.stat(follow_symlinks=False).st_size
                    if entry.name == "pack" and item.name.endswith(".idx"):
                        packs += 1
                    elif len(entry.name) == 2 and len(item.name) == 62:
                        loose += 1
            else:
                with contextlib.suppress(FileNotFoundError):
                    total += entry.stat(follow_symlinks=False).st_size
        return total, packs, loose


class _Timed(contextlib.AbstractContextManager[object]):
    """The gate held exclusively, timed (the report's ``gate_held_s``) and counted (``slices``).
    Re-entrant: a rescue under the decision's hold may reuse a pack, which holds it too."""

    def __init__(self, collector: _Collector) -> None:
        self.collector = collector
        self._cm: contextlib.AbstractContextManager[float] | None = None
        self._start = 0.0

    def __enter__(self) -> object:
        c = self.collector
        if c.exclusive_depth == 0:
            self._cm = c.gate.exclusive()
            self._cm.__enter__()
            self._start = time.monotonic()
        c.exclusive_depth += 1
        return self

    def __exit__(self, *exc: object) -> None:
        c = self.collector
        c.exclusive_depth -= 1
        if self._cm is not None:
            c.gate_held = max(c.gate_held, time.monotonic() - self._start)
            c.slices += 1
            cm, self._cm = self._cm, None
            cm.__exit__(None, None, None)


def collect(
    gitdir: Path,
    gate: GcGate,
    roots: list[str],
    *,
    grace_s: float,
    dry_run: bool,
    roots_taken_at: float | None,
) -> CasGcReport:
    """One gc run (blocking: call it on a worker thread). See the module docstring."""
    started = time.monotonic()
    now = time.time()
    cutoff = min(now if roots_taken_at is None else roots_taken_at, now) - max(grace_s, MIN_GRACE_S)
    with gate.run_lock():
        c = _Collector(gitdir, gate)
        try:
            # What a gc killed earlier left.
            if not dry_run and finish(str(gitdir), c.objects, c.exclusive):
                gate.note_finished()
            bytes_before, packs_before, loose_before = c.object_bytes()
            c.inventory()
            c.read_fresh_log()
            c.mark_links()
            inv = c.inv
            present = set(inv.where)
            kept: set[bytes] = set()
            wanted = [bytes.fromhex(oid) for oid in roots] + c.ref_targets()
            missing = sorted({raw.hex() for raw in wanted if raw not in present})
            c.closure(wanted, None, kept)
            # Unreadable objects are kept where they are (their files pinned below): never dropped.
            c.closure(inv.unreadable, None, kept)
            young: set[bytes] = set()
            c.closure((raw for raw, age in inv.age.items() if age >= cutoff and raw not in kept), None, young)
            young -= kept
            doomed = present - kept - young
            stay_loose = {
                raw
                for raw in kept | young
                if all(inv.files[i].reader is None and inv.files[i].size >= _LARGE_LOOSE for i, _ in inv.where[raw])
            }
            files = list(range(len(inv.files)))
            keep_in_place = {i for raw in stay_loose for i, _ in inv.where[raw]}
            for raw in inv.unreadable:
                for i, _ in inv.where[raw]:
                    inv.files[i].pinned = True
            movable = [i for i in files if i not in keep_in_place and not inv.files[i].pinned]
            nothing_to_do = not doomed and (
                not movable or (len(movable) == 1 and inv.files[movable[0]].reader is not None and not young)
            )
            if dry_run or nothing_to_do:
                freed = sum(inv.files[i].size for i in movable) if doomed else 0
                return CasGcReport(
                    dry_run=dry_run,
                    objects_before=len(present),
                    objects_kept=len(kept),
                    objects_young=len(young),
                    objects_rescued=0,
                    objects_reclaimed=len(doomed),
                    bytes_before=bytes_before,
                    bytes_after=bytes_before - freed if dry_run else bytes_before,
                    bytes_freed=freed if dry_run else 0,
                    packs_before=packs_before,
                    packs_after=packs_before,
                    loose_before=loose_before,
                    loose_after=loose_before,
                    files_retired=0,
                    slices=0,
                    gate_held_s=0.0,
                    seconds=time.monotonic() - started,
                    missing=missing,
                    unreadable=sorted(raw.hex() for raw in inv.unreadable),
                    skipped=c.skipped,
                )
            order = {TAG: 0, COMMIT: 1, TREE: 2, BLOB: 3}
            unreadable = set(inv.unreadable)
            to_write = sorted((kept - stay_loose - unreadable), key=lambda r: (order.get(inv.type.get(r, BLOB), 4), r))
            unreadable.update(c.write_objects(to_write, "kept"))
            unreadable.update(c.write_objects(sorted(young - stay_loose - unreadable), "cruft"))
            # Objects pinned by now are kept in place with their files: what they reach must stay.
            pinned_objects = {raw for i in files if inv.files[i].pinned for raw in inv.files[i].objects}
            extra: set[bytes] = set()
            c.closure(pinned_objects & doomed, doomed, extra)
            doomed -= extra
            kept |= extra
            if extra:
                unreadable.update(c.write_objects(sorted(extra - unreadable), "kept"))
            movable = [i for i in files if i not in keep_in_place and not inv.files[i].pinned]
            unsafe = doomed | (young - stay_loose)
            rescued: set[bytes] = set()
            seen = list(movable)
            for _ in range(_RESCUE_PASSES):
                changed = c.changed_files(seen)
                if not changed:
                    break
                c.rescue(changed, unsafe, rescued)
                for i in changed:  # rescued once is enough: look at it again only if touched again
                    f = inv.files[i]
                    with contextlib.suppress(FileNotFoundError):
                        st = os.stat(f.path)
                        f.ino, f.mtime_ns = st.st_ino, st.st_mtime_ns
            # The journal is written (and fsynced) before the hold; under it, only what changed since.
            retired = c.retired_files(movable)
            journal = prepare_journal(str(gitdir), Retired(retired), c.temp_name())
            try:
                with c.exclusive():
                    c.rescue(c.changed_files(seen), unsafe, rescued)
                    now_retired = c.retired_files(movable)
                    if now_retired != retired:  # a file replaced or removed meanwhile
                        discard(journal)
                        retired = now_retired
                        journal = prepare_journal(str(gitdir), Retired(retired), c.temp_name())
                    publish_journal(str(gitdir), journal)
                    # Every freshening logged is in the ages just written, or rescued: start afresh.
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(gitdir, FRESH_LOG))
            finally:
                discard(journal)  # published: gone already; otherwise a temp file
            finish(str(gitdir), c.objects, c.exclusive)
            gate.note_finished()  # this process's ObjectDB drops the deleted packs (see sync_retired)
            doomed &= unsafe
            bytes_after, packs_after, loose_after = c.object_bytes()
            return CasGcReport(
                dry_run=False,
                objects_before=len(present),
                objects_kept=len(kept),
                objects_young=len(young & unsafe),
                objects_rescued=len(rescued),
                objects_reclaimed=len(doomed),
                bytes_before=bytes_before,
                bytes_after=bytes_after,
                bytes_freed=max(0, bytes_before - bytes_after),
                packs_before=packs_before,
                packs_after=packs_after,
                loose_before=loose_before,
                loose_after=loose_after,
                files_retired=len(retired),
                slices=c.slices,
                gate_held_s=c.gate_held,
                seconds=time.monotonic() - started,
                missing=missing,
                unreadable=sorted(raw.hex() for raw in unreadable),
                skipped=c.skipped,
            )
        finally:
            c.odb.close()


def _is_hex(name: str, length: int) -> bool:
    return len(name) == length and all(c in "0123456789abcdef" for c in name)


def _read_loose_file(path: str) -> tuple[int, bytes]:
    with open(path, "rb") as f:
        full = zlib.decompress(f.read())
    header, _, body = full.partition(b"\0")
    kind, _, size = header.partition(b" ")
    if int(size) != len(body):
        raise ValueError("loose object size mismatch")
    return TYPE_NUMBERS[kind], body


def _links(kind: int, body: bytes, raw: bytes) -> list[bytes]:
    """The ids a tree, commit or tag names (gitlinks excepted: another repository's commits)."""
    if kind == TREE:
        # Leniently: a tree git would reject still keeps what it names alive.
        entries, _ = parse_tree(body)
        return [target for _name, mode, target in entries if int(mode, 8) != _GITLINK]
    out: list[bytes] = []
    header = body.split(b"\n\n", 1)[0]
    for line in header.split(b"\n"):
        key, _, value = line.partition(b" ")
        if key in ((b"tree", b"parent") if kind == COMMIT else (b"object",)):
            with contextlib.suppress(ValueError):
                target = bytes.fromhex(value.decode("ascii", "replace"))
                if len(target) == 32:
                    out.append(target)
    return out
