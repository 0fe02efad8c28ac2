"""Descriptor-relative access to a workspace that untrusted tools may change while we read or write it.

Every name is resolved as one component relative to a directory descriptor the caller opened itself:
never through a symlink (``O_NOFOLLOW``), never waiting on a FIFO or a device (``O_NONBLOCK``), never
making a terminal put in a file's place the process's controlling terminal (``O_NOCTTY``: a session
leader without one would otherwise acquire it, and with it the terminal's signals), and checked with
``fstat`` after opening. So a component swapped for a symlink to somewhere else is never
followed, and an entry whose type changed between the listing and the open is reported as gone, never
read as something it is not. ``..`` is never looked up: ``scandir`` does not list it and callers only
open names it listed or names they created.
"""

from __future__ import annotations

import errno
import os
import stat

__all__ = ["DIR_FLAGS", "ROOT_FLAGS", "open_dir_at", "open_file_at", "shown_path"]

#: the root a caller names: its own path may go through symlinks (the caller chose it).
ROOT_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
#: a directory below the root: never through a symlink.
DIR_FLAGS = ROOT_FLAGS | os.O_NOFOLLOW
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC

#: what ``open`` says when the name no longer is what was listed: gone, now a symlink (ELOOP), a
#: non-directory (ENOTDIR), a socket or a device without a driver (ENXIO, ENODEV), a device that
#: would block (EAGAIN).
_CHANGED = frozenset({errno.ENOENT, errno.ELOOP, errno.ENOTDIR, errno.ENXIO, errno.ENODEV, errno.EAGAIN})


def _open_at(dir_fd: int, name: bytes, flags: int) -> tuple[int, os.stat_result] | None:
    """``name`` in ``dir_fd`` opened with ``flags`` and ``fstat``'ed; None if it changed under us."""
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in _CHANGED:
            return None
        raise
    try:
        st = os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def open_dir_at(dir_fd: int, name: bytes) -> tuple[int, os.stat_result] | None:
    """Open the directory ``name`` in ``dir_fd``; None if it is gone or is no longer a directory.
    Other errors (``EACCES``, ``EMFILE``) raise ``OSError``."""
    return _open_at(dir_fd, name, DIR_FLAGS)


def open_file_at(dir_fd: int, name: bytes) -> tuple[int, os.stat_result] | None:
    """Open the regular file ``name`` in ``dir_fd`` for reading; None if it is gone or is no longer
    a regular file (a FIFO put in its place is opened without blocking, seen by ``fstat``, closed)."""
    opened = _open_at(dir_fd, name, _FILE_FLAGS)
    if opened is None:
        return None
    fd, st = opened
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        return None
    return fd, st


def shown_path(root: str, rel: bytes) -> str:
    """A workspace path for messages: printable whatever bytes the name holds (``\\xff`` escapes)."""
    shown = root.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    if not rel:
        return shown
    if rel.startswith(b"\0"):
        rel = b".../" + rel[1:].lstrip(b"/")  # the tail of a path too long to keep whole (see snapshot._join)
    return os.path.join(shown, rel.decode("utf-8", "backslashreplace"))
