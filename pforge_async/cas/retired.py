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
from collections.abc import Callable
from contextlib import AbstractContextManager

import msgspec

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


def finish(gitdir: str, objects: str, exclusive: Callable[[], AbstractContextManager[object]]) -> int:
    """Unlink what the journal retires, then the journal; returns how many files were unlinked.

    Without the gate: no writer renames onto a retired name while the journal stands (see
    ``ObjectDB._publishing``), and the inode check keeps a file that is not the one retired. Only
    removing emptied loose directories takes ``exclusive()`` (a writer creates its directory, then
    renames into it, under the gate)."""
    retired = read_journal(gitdir)
    journal = os.path.join(gitdir, JOURNAL)
    if retired is None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(journal)  # a damaged one retires nothing
        return 0
    removed = 0
    dirs: set[str] = set()
    files = retired.files
    for rel, ino in files:
        path = os.path.join(objects, rel)
        try:
            if os.lstat(path).st_ino != ino:
                continue  # not the file retired
            os.unlink(path)
        except FileNotFoundError:
            continue
        removed += 1
        dirs.add(os.path.dirname(path))
    with exclusive():
        # Empty loose directories go too (a writer creates its directory under the gate).
        for directory in sorted(dirs):
            if os.path.basename(directory) != "pack":
                with contextlib.suppress(OSError):
                    os.rmdir(directory)
    for directory in sorted(dirs):
        with contextlib.suppress(FileNotFoundError):
            fsync_dir(directory)
    with contextlib.suppress(FileNotFoundError):
        fsync_dir(objects)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(journal)
    fsync_dir(gitdir)
    return removed
