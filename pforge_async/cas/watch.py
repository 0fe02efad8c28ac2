"""Change watching for snapshots (Linux inotify), the idea of git's fsmonitor.

While a store is open, every directory a snapshot scanned stays watched. The next snapshot of the
same root first reads the pending events: if nothing under the root changed, the previous tree id is
the answer and no file is even stat'ed. Any event, a lost event queue (overflow), or a directory that
could not be watched sends the snapshot down the full stat-cache path, so the watch only ever skips
work, never changes a result.

Limits (as for every inotify-based monitor): writes through a shared ``mmap``, writes to a file
through a hard link that lives outside the watched tree, and changes made on another machine of a
network file system raise no event. Open the store with ``watch_workspaces=False`` where that
matters. Each directory is watched through ``/proc/self/fd/<the scan's descriptor>`` (the directory the
scan opened, never what its path names by then); without ``/proc`` nothing is watched and every
snapshot scans. After :meth:`Watcher.close` nothing reads or watches through the descriptor again (its
number may by then be another file's).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import struct
import sys
import threading

__all__ = ["Watcher", "open_watcher"]

_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC
# No IN_DONT_FOLLOW: a directory is watched through /proc/self/fd/<its descriptor>, a link the
# kernel resolves to exactly the directory the scan opened, never to whatever its path names now.
_MASK = (
    0x2  # IN_MODIFY
    | 0x4  # IN_ATTRIB
    | 0x8  # IN_CLOSE_WRITE
    | 0x40  # IN_MOVED_FROM
    | 0x80  # IN_MOVED_TO
    | 0x100  # IN_CREATE
    | 0x200  # IN_DELETE
    | 0x400  # IN_DELETE_SELF
    | 0x800  # IN_MOVE_SELF
    | 0x01000000  # IN_ONLYDIR
    | 0x04000000  # IN_EXCL_UNLINK
)
_IN_Q_OVERFLOW = 0x4000
_EVENT = struct.Struct("iIII")


class _Root:
    __slots__ = ("dirty", "identity", "tree", "watched")

    def __init__(self) -> None:
        self.tree: str | None = None
        self.dirty = True
        self.watched = True
        #: (st_dev, st_ino) of the directory the last scan opened: the path may name another one later
        self.identity: tuple[int, int] | None = None


class Watcher:
    """One inotify instance for a store, shared by every root it snapshots."""

    def __init__(self, fd: int, add_watch: ctypes._NamedFuncPointer) -> None:
        self._fd = fd
        self._add_watch = add_watch
        self._lock = threading.Lock()
        self._roots: dict[str, _Root] = {}
        self._wd_roots: dict[int, set[str]] = {}
        self._ignored: set[tuple[int, bytes]] = set()
        #: once set, the descriptor is closed and its number may belong to another file: never used.
        self._closed = False

    def unchanged_tree(self, root: str) -> str | None:
        """The last tree of ``root`` if nothing under it changed since that snapshot's scan began and
        ``root`` still names the directory that scan opened."""
        with self._lock:
            if self._closed:
                return None
            self._drain()
            state = self._roots.get(root)
            if state is None or state.dirty or not state.watched or state.tree is None:
                return None
            # The watches follow the directories, not the path: a root symlink re-pointed or a parent
            # renamed makes the path name another directory without an event on any watched one.
            try:
                st = os.stat(root)
            except OSError:
                return None
            if (st.st_dev, st.st_ino) != state.identity:
                return None
            return state.tree

    def begin(self, root: str, identity: tuple[int, int]) -> None:
        """A full scan of ``root`` starts, on the directory ``identity`` (``(st_dev, st_ino)`` of the
        descriptor it opened): forget what it was, watch what the scan lists."""
        with self._lock:
            if self._closed:
                return
            self._drain()
            state = self._roots.setdefault(root, _Root())
            state.dirty = False
            state.watched = True
            state.tree = None
            state.identity = identity

    def watch_dir(self, root: str, dir_fd: int) -> int:
        """Watch the directory open on ``dir_fd`` before it is listed; returns its watch descriptor, or -1."""
        with self._lock:
            if self._closed:
                return -1
            wd = int(self._add_watch(self._fd, f"/proc/self/fd/{dir_fd}".encode(), _MASK))
            if wd < 0:
                self._roots[root].watched = False  # e.g. the user's inotify watch limit
                return -1
            self._wd_roots.setdefault(wd, set()).add(root)
        return wd

    def ignore(self, wd: int, name: bytes) -> None:
        """Events about ``name`` in the directory ``wd`` concern no snapshot (the store, ``.git``)."""
        if wd >= 0:
            with self._lock:
                self._ignored.add((wd, name))

    def finish(self, root: str, tree: str) -> None:
        with self._lock:
            state = self._roots.get(root)
            if state is not None and not self._closed:
                state.tree = tree

    def _drain(self) -> None:
        while True:
            try:
                data = os.read(self._fd, 1 << 16)
            except BlockingIOError:
                return
            pos = 0
            while pos < len(data):
                wd, mask, _cookie, size = _EVENT.unpack_from(data, pos)
                name = data[pos + _EVENT.size : pos + _EVENT.size + size].rstrip(b"\0")
                pos += _EVENT.size + size
                if mask & _IN_Q_OVERFLOW:
                    for state in self._roots.values():
                        state.dirty = True
                elif (wd, name) not in self._ignored:
                    for root in self._wd_roots.get(wd, ()):
                        self._roots[root].dirty = True

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._roots.clear()
            with contextlib.suppress(OSError):
                os.close(self._fd)


def open_watcher() -> Watcher | None:
    """A watcher, or None where inotify is not available (not Linux, or no instance left)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        init = libc.inotify_init1
        add_watch = libc.inotify_add_watch
    except (OSError, AttributeError):
        return None
    init.argtypes = [ctypes.c_int]
    init.restype = ctypes.c_int
    add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    add_watch.restype = ctypes.c_int
    fd = int(init(_IN_NONBLOCK | _IN_CLOEXEC))
    if fd < 0:
        return None
    return Watcher(fd, add_watch)
