"""gc's journal of retired files: ``<cas>/gc-retired``.

Once gc has decided (under the gate, see :mod:`.gate`) which pack and loose files it retires, it
writes their names and inodes here, durably, before it unlinks any of them. From that instant every
process treats them as gone: refresh drops retired packs from its view and freshening never counts an
object found only in a retired file. So the deletions that follow may run in slices, and a gc killed
among them leaves files that are already dead to every reader and writer; whoever finds the journal
(the next gc, the next writable open) finishes the deletions. A file is unlinked only if its inode is
still the one recorded: a writer that renamed a new file onto a retired name keeps it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import stat
from collections.abc import Callable
from contextlib import AbstractContextManager

import msgspec

from .dirfd import ROOT_FLAGS, open_dir_at
from .pack import fsync_dir

__all__ = [
    "FRESH_LOG",
    "JOURNAL",
    "Retired",
    "discard",
    "finish",
    "prepare_journal",
    "publish_journal",
    "read_fresh_log",
    "read_journal",
    "retirable",
]

log = logging.getLogger(__name__)

JOURNAL = "gc-retired"
#: "<hex id> <unix time>" lines: objects of cruft packs freshened since the last gc (see odb.freshen).
FRESH_LOG = "gc-fresh"


class Retired(msgspec.Struct, frozen=True):
    """Files relative to ``objects/`` (``pack/pack-<h>.pack`` before its ``.idx``, ``ab/cdef...``),
    each with the inode it had when gc retired it."""

    files: list[tuple[str, int]]


_decoder = msgspec.msgpack.Decoder(Retired)
_encoder = msgspec.msgpack.Encoder()


def read_journal(gitdir: str) -> Retired | None:
    """The journal, or None if there is none (or it is unreadable: then it retires nothing)."""
    try:
        with open(os.path.join(gitdir, JOURNAL), "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    try:
        return _decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        log.warning("%s/%s is damaged; nothing is retired by it", gitdir, JOURNAL)
        return None


def read_fresh_log(gitdir: str, start: int = 0) -> tuple[dict[bytes, float], int]:
    """The freshening log from byte ``start``: raw id -> latest time, and the offset it ends at (a
    line still being written is left for later)."""
    try:
        with open(os.path.join(gitdir, FRESH_LOG), "rb") as f:
            f.seek(start)
            data = f.read()
    except FileNotFoundError:
        return {}, 0
    end = data.rfind(b"\n") + 1
    out: dict[bytes, float] = {}
    for line in data[:end].splitlines():
        hex_oid, _, when = line.partition(b" ")
        try:
            raw = bytes.fromhex(hex_oid.decode("ascii"))
            at = float(when)
        except (ValueError, UnicodeError):
            continue
        if len(raw) == 32 and at > out.get(raw, 0.0):
            out[raw] = at
    return out, start + end


def prepare_journal(gitdir: str, retired: Retired, temp_name: str) -> str:
    """Write the journal to a temp file, fsynced; :func:`publish_journal` renames it into place."""
    temp = os.path.join(gitdir, temp_name)
    try:
        with open(temp, "xb", buffering=0) as f:
            f.write(_encoder.encode(retired))
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    return temp


def publish_journal(gitdir: str, temp: str) -> None:
    """Rename a prepared journal into place, durably: from here its files are retired."""
    try:
        os.rename(temp, os.path.join(gitdir, JOURNAL))
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    fsync_dir(gitdir)


def discard(temp: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temp)


#: exactly the names gc retires (see ``gc._Collector.retired_files``), relative to ``objects/``.
_RETIRABLE = re.compile(r"(pack)/(pack-[0-9a-f]{64}\.(?:pack|idx|mtimes))|([0-9a-f]{2})/([0-9a-f]{62})")


def retirable(rel: str) -> tuple[str, str] | None:
    """``(directory, name)`` of a journal entry gc could have written; None for anything else (a
    damaged or forged journal must never name a file outside ``objects/`` nor one gc does not own)."""
    match = _RETIRABLE.fullmatch(rel)
    if match is None:
        return None
    if match[1] is not None:
        return match[1], match[2]
    return match[3], match[4]


def finish(gitdir: str, objects: str, exclusive: Callable[[], AbstractContextManager[object]]) -> int:
    """Unlink what the journal retires, then the journal; returns how many files were unlinked.

    Without the gate: no writer renames onto a retired name while the journal stands (see
    ``ObjectDB._publishing``), and the inode check keeps a file that is not the one retired. Only
    removing emptied loose directories takes ``exclusive()`` (a writer creates its directory, then
    renames into it, under the gate).

    Every name is checked against the shapes gc writes and resolved relative to descriptors of
    ``objects/`` and its subdirectories opened without following symlinks: an entry naming anything
    else, a subdirectory that is a symlink, or a name that is not a regular file is left alone
    (logged), so no journal makes this unlink a file outside the store."""
    retired = read_journal(gitdir)
    journal = os.path.join(gitdir, JOURNAL)
    if retired is None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(journal)  # a damaged one retires nothing
        return 0
    by_dir: dict[str, list[tuple[str, int]]] = {}
    for rel, ino in retired.files:
        where = retirable(rel)
        if where is None:
            log.warning("%s/%s names %r, which gc never retires: left alone", gitdir, JOURNAL, rel)
            continue
        by_dir.setdefault(where[0], []).append((where[1], ino))
    removed = 0
    emptied: list[str] = []
    try:
        objects_fd = os.open(objects, ROOT_FLAGS)
    except FileNotFoundError:
        objects_fd = -1
    if objects_fd >= 0:
        try:
            _drop_derived_indexes(objects_fd)
            for directory, entries in by_dir.items():  # in journal order: a .pack before its .idx
                count = _unlink_in(objects_fd, objects, directory, entries)
                removed += count
                if count and directory != "pack":
                    emptied.append(directory)
            with exclusive():
                # Empty loose directories go too (a writer creates its directory under the gate);
                # rmdir never follows a symlink.
                for directory in sorted(emptied):
                    with contextlib.suppress(OSError):
                        os.rmdir(directory, dir_fd=objects_fd)
            os.fsync(objects_fd)
        finally:
            os.close(objects_fd)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(journal)
    fsync_dir(gitdir)
    return removed


def _unlink_in(objects_fd: int, objects: str, directory: str, entries: list[tuple[str, int]]) -> int:
    """Unlink, in the subdirectory ``directory`` of ``objects_fd`` (never through a symlink), each
    regular file whose inode is still the one retired; returns how many; fsyncs the directory."""
    opened = open_dir_at(objects_fd, directory.encode())
    if opened is None:
        if os.path.islink(os.path.join(objects, directory)):
            log.warning("%s/%s is a symlink: gc deletes nothing through it", objects, directory)
        return 0
    dir_fd, _ = opened
    removed = 0
    try:
        for name, ino in entries:
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                if st.st_ino != ino or not stat.S_ISREG(st.st_mode):
                    continue  # not the file retired
                os.unlink(name, dir_fd=dir_fd)
            except FileNotFoundError:
                continue
            removed += 1
        if removed:
            os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return removed


#: what git derives from the pack list (`git repack --write-midx`, `git maintenance`,
#: `update-server-info`): naming packs a gc retires, they would make `git fsck` fail. Git works
#: without them and writes them again when asked.
_DERIVED = (("pack", "multi-pack-index"), ("info", "packs"))


def _drop_derived_indexes(objects_fd: int) -> None:
    for directory, name in _DERIVED:
        try:
            dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=objects_fd)
        except OSError:
            continue
        try:
            with contextlib.suppress(FileNotFoundError, IsADirectoryError, PermissionError):
                os.unlink(name, dir_fd=dir_fd)  # a symlink named so goes, never its target
        finally:
            os.close(dir_fd)
