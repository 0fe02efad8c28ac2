"""The store's format marker and manifest, ``pforge.json`` at its root, and what opening a root refuses.

The manifest says that a directory is a pforge_async store, which format version wrote it, and which
parts it holds (``cas`` and the databases). Opening checks every recorded part before anything runs:
a database that is missing or empty (a deleted or truncated file) is refused with ``IntegrityError``
naming it, because SQLite would otherwise open it as a new, empty database and the store would serve
as if it never held anything.

Layout of the file (JSON, written atomically: temp file, fsync, rename, fsync of the directory)::

    {"format": "pforge_async store", "version": 1, "parts": ["cas", "turns.db", ...],
     "checksum": "<sha256 of the canonical JSON of the other three fields>"}

A store is created in two steps: the manifest first, with no parts (the root is a store from then on,
so an interrupted creation is finished by the next open), then, once every part exists, the manifest
with all of them. A store written before manifests existed (no ``pforge.json``, but its databases and
CAS) is recognised, held to the strict rule below, and given its manifest at its first writable open.
So is a store whose manifest is damaged (the damaged file is set aside in ``quarantine/``): the strict
rule is that every part must be there, since every version of pforge_async creates all of them at a
store's first open.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import stat
import time
from enum import Enum
from pathlib import Path

import msgspec

from .cas.pack import fsync_dir
from .errors import IntegrityError, InvalidInput, NotFound, StorageError

__all__ = ["FORMAT", "MANIFEST", "PARTS", "VERSION", "Manifest", "RootKind", "RootPlan", "plan_root", "write_manifest"]

MANIFEST = "pforge.json"
FORMAT = "pforge_async store"
VERSION = 1
#: every part a store of this version holds, in the order the store opens them.
PARTS = ("cas", "turns.db", "memory.db", "nonces.db", "budget.db")
#: what may sit in a root that holds no part yet (an interrupted creation) without making it foreign.
_SCAFFOLD = {"locks", "cache", "quarantine"}
_TEMP_PREFIX = f".{MANIFEST}.tmp"
QUARANTINE = "quarantine"


class Manifest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    format: str
    version: int
    parts: list[str]
    checksum: str

    @staticmethod
    def digest(fmt: str, version: int, parts: list[str]) -> str:
        canonical = json.dumps({"format": fmt, "parts": parts, "version": version}, sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()

    @classmethod
    def of(cls, parts: list[str]) -> Manifest:
        return cls(FORMAT, VERSION, parts, cls.digest(FORMAT, VERSION, parts))


class RootKind(Enum):
    #: nothing there: a store is created (or, with ``create=False``, ``NotFound``).
    ABSENT = "absent"
    #: an empty directory (or one an interrupted creation left before any part): created in place.
    EMPTY = "empty"
    #: a store with a sound manifest.
    STORE = "store"
    #: a store without a manifest (an earlier version's) or with a damaged one: the strict rule holds.
    UNRECORDED = "unrecorded"


class RootPlan(msgspec.Struct, frozen=True):
    """What :func:`plan_root` found, and what opening the root will do."""

    kind: RootKind
    #: the parts the manifest records (for UNRECORDED: every part, which the strict rule demands).
    recorded: list[str]
    #: the manifest is damaged (it is set aside and rewritten at a writable open).
    damaged_manifest: str | None = None

    @property
    def needs_manifest(self) -> bool:
        """A writable open writes the manifest once every part exists."""
        return self.kind is not RootKind.STORE or sorted(self.recorded) != sorted(PARTS)


#: a manifest is a few hundred bytes: one larger than this is damaged, and is not read whole
_MAX_MANIFEST = 64 << 10


def _read_bytes(path: Path) -> bytes:
    """The manifest's bytes, at most ``_MAX_MANIFEST`` and one more. Opened without blocking and
    refused unless a regular file: a FIFO there would make every open wait for a writer forever,
    a symlink to ``/dev/zero`` read without end."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise StorageError(f"the store manifest {path} is not a regular file: refusing to read it")
            chunks: list[bytes] = []
            size = 0
            while size <= _MAX_MANIFEST and (chunk := os.read(fd, _MAX_MANIFEST + 1 - size)):
                chunks.append(chunk)
                size += len(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)
    except OSError as exc:
        raise StorageError(f"cannot read the store manifest {path}: {exc.strerror}") from exc


def _read_manifest(path: Path) -> Manifest | str:
    """The manifest, or why it is damaged."""
    data = _read_bytes(path)
    if len(data) > _MAX_MANIFEST:
        return f"it is over {_MAX_MANIFEST} bytes"
    try:
        manifest = msgspec.json.decode(data, type=Manifest)
    except msgspec.DecodeError as exc:
        # msgspec's ValidationError is a DecodeError: a field of the wrong type lands here too.
        return f"it does not parse ({exc})"
    if Manifest.digest(manifest.format, manifest.version, manifest.parts) != manifest.checksum:
        return "it fails its checksum"
    if manifest.format != FORMAT:
        raise InvalidInput(f"{path} is not a pforge_async store manifest (format {manifest.format!r})")
    if manifest.version > VERSION:
        raise StorageError(
            f"store {path.parent} has format version {manifest.version}, newer than this pforge_async "
            f"understands ({VERSION}); it was left untouched"
        )
    return manifest


def _check_part(root: Path, part: str, why: str) -> None:
    """Refuse to open when a part the store had is missing or empty."""
    if part == "cas":
        config = root / "cas" / "config"
        if not config.is_file():
            raise IntegrityError(
                f"store {root}: the CAS ({root / 'cas'}) is missing or damaged (no {config}), but {why}: "
                "refusing to open the store without it"
            )
        return
    path = root / part
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        problem = "is missing"
    except OSError as exc:
        raise StorageError(f"store {root}: cannot stat {path}: {exc.strerror}") from exc
    else:
        if size > 0:
            return
        problem = "is empty (0 bytes)"
    raise IntegrityError(
        f"store {root}: database {path} {problem}, but {why}: refusing to open the store as if it were "
        "empty (restore the file from a backup)"
    )


def plan_root(root: Path, *, create: bool, readonly: bool) -> RootPlan:
    """Look at ``root`` and decide how to open it, refusing (with nothing created) what must not be."""
    # Another process creating this store renames its manifest in between our look for the manifest
    # and our listing of the root: the listing then shows it. Look again, and the manifest is read.
    # A manifest never goes away once written, so a second look finds it.
    for _ in range(_LOOKS - 1):
        try:
            return _plan_root(root, create=create, readonly=readonly)
        except _ManifestAppeared:
            continue
    return _plan_root(root, create=create, readonly=readonly, last=True)


_LOOKS = 3


class _ManifestAppeared(Exception):
    """The root's listing shows a manifest that was not there a moment before."""


def _plan_root(root: Path, *, create: bool, readonly: bool, last: bool = False) -> RootPlan:
    try:
        st = root.stat()
    except FileNotFoundError:
        st = None
    except NotADirectoryError as exc:
        raise InvalidInput(f"store root {root} is not a directory: a path above it is a file") from exc
    except OSError as exc:
        raise StorageError(f"cannot open store root {root}: {exc.strerror}") from exc
    if st is None:
        if readonly or not create:
            suffix = " (opened read-only, so none is created)" if readonly else ""
            raise NotFound(f"no pforge store at {root}{suffix}")
        return RootPlan(RootKind.ABSENT, [])
    if not root.is_dir():
        raise InvalidInput(f"store root {root} is not a directory (it is a file or some other non-directory)")
    manifest_path = root / MANIFEST
    damaged: str | None = None
    if manifest_path.exists() or manifest_path.is_symlink():
        found = _read_manifest(manifest_path)
        if isinstance(found, Manifest):
            for part in found.parts:
                if part not in PARTS:
                    raise StorageError(f"store {root} records a part {part!r} this pforge_async does not know")
                _check_part(root, part, f"the store's manifest {manifest_path} records it")
            if readonly:
                for part in PARTS:
                    if part not in found.parts:
                        raise StorageError(
                            f"store {root} was never fully created (it has no {part} yet): "
                            "open it once writable to finish its creation"
                        )
            return RootPlan(RootKind.STORE, list(found.parts))
        damaged = f"the store manifest {manifest_path} is damaged: {found}"
    try:
        names = set(os.listdir(root))
    except OSError as exc:
        raise StorageError(f"cannot list store root {root}: {exc.strerror}") from exc
    names -= {name for name in names if name.startswith(_TEMP_PREFIX)}
    if MANIFEST in names and damaged is None and not last:
        raise _ManifestAppeared
    if damaged is None and not names & set(PARTS):
        if names - _SCAFFOLD:
            shown = ", ".join(sorted(names - _SCAFFOLD)[:3])
            raise InvalidInput(
                f"{root} is not empty ({shown}...) and is not a pforge store (it has no {MANIFEST}): "
                "refusing to create a store in it"
            )
        if readonly or not create:
            raise NotFound(f"no pforge store at {root} (the directory is empty)")
        return RootPlan(RootKind.EMPTY, [])
    why = (
        f"{damaged} and every store holds it"
        if damaged
        else f"the store at {root} has no {MANIFEST} (an earlier version wrote it) and every store holds it"
    )
    for part in PARTS:
        _check_part(root, part, why)
    return RootPlan(RootKind.UNRECORDED, list(PARTS), damaged)


def create_root(root: Path) -> None:
    """Make the directory of a new store (owner-only) and mark it as a store before any part exists."""
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"cannot create store root {root}: {exc.strerror}") from exc
    write_manifest(root, [])


def write_manifest(root: Path, parts: list[str], *, fsync: bool = True, damaged: bool = False) -> None:
    """Write ``pforge.json`` atomically; a damaged one is first copied aside into ``quarantine/``."""
    path = root / MANIFEST
    temp = root / f"{_TEMP_PREFIX}{os.getpid()}.{secrets.token_hex(4)}"
    data = msgspec.json.encode(Manifest.of(parts)) + b"\n"
    try:
        if damaged and path.exists():
            aside = root / QUARANTINE
            aside.mkdir(mode=0o700, exist_ok=True)
            (aside / f"{MANIFEST}.{time.time_ns()}").write_bytes(path.read_bytes())
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
        if fsync:
            fsync_dir(str(root))
    except OSError as exc:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise StorageError(f"cannot write the store manifest {path}: {exc.strerror}") from exc


def quarantined(root: Path) -> list[str]:
    """Damaged files set aside at the store root, one problem line each."""
    try:
        names = sorted(os.listdir(root / QUARANTINE))
    except FileNotFoundError:
        return []
    except OSError as exc:
        return [f"cannot list {root / QUARANTINE}: {exc.strerror}"]
    return [f"{root / QUARANTINE / name}: a damaged file set aside; delete it once noted" for name in names]
