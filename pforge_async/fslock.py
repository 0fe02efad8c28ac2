"""A cross-process file lock that is also an in-process lock, usable with ``with`` and ``async with``.

Built on ``fcntl.flock`` on an open file, so the kernel drops the lock when its holder dies: no stale
locks, no pid files. The traps the popular lock libraries fell into, and what this module does instead:

- Deleting the lock file on release lets a waiter lock an orphaned inode while a newcomer locks a new
  file, so two processes both "hold" the lock. The file is never deleted.
- ``flock`` locks belong to an open file description, so a second ``open()`` + blocking ``flock`` in
  the same process waits on itself. One description per path per process is shared by every holder,
  behind an in-process reader/writer state that makes tasks and threads of one process exclude each
  other first.
- A thread blocked in ``flock`` on behalf of a cancelled task can take the lock later and never give it
  back. Waiting is therefore ``LOCK_NB`` attempts with a short backoff sleep, which a cancellation
  simply stops.
- A forked child inherits the description and unlocking it there would unlock the parent. Files are
  opened ``O_CLOEXEC`` and the child forgets them after ``fork`` without unlocking.

``flock`` does not lock across NFS mounts that use ``nolock`` (and is emulated per-client on some
others): keep the store on a local file system.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
import time
from types import TracebackType

import anyio

from .errors import InvalidInput, LockTimeout, StorageError

__all__ = ["FsLock"]

_FIRST_BACKOFF = 0.0005
_MAX_BACKOFF = 0.01
#: times one attempt opens the lock file again when the open file is no longer the one at the path
_REOPENS = 3
#: a timeout longer than this many seconds (about 3,000 years) is waited as ``None`` is: forever
_FOREVER = 1e11


class _PathState:
    """Who in this process holds the lock on one path, and the one descriptor they share."""

    __slots__ = ("fd", "keepers", "mutex", "readers", "writer")

    def __init__(self) -> None:
        self.mutex = threading.Lock()
        self.readers = 0
        self.writer = False
        self.fd: int | None = None
        self.keepers = 0  # lock objects that asked for the descriptor to stay open between holds


_registry_mutex = threading.Lock()
_registry: dict[str, _PathState] = {}


def _state_for(path: str) -> _PathState:
    with _registry_mutex:
        state = _registry.get(path)
        if state is None:
            state = _registry[path] = _PathState()
        return state


def _forget_after_fork() -> None:
    # Close, never unlock: LOCK_UN in the child would release the parent's lock. Another thread may
    # have held a mutex at the fork, so every mutex is made anew.
    global _registry_mutex
    _registry_mutex = threading.Lock()
    for state in _registry.values():
        if state.fd is not None:
            try:
                os.close(state.fd)
            except OSError:
                pass
        state.__init__()  # type: ignore[misc]


os.register_at_fork(after_in_child=_forget_after_fork)


def _lock_path(path: object) -> str:
    try:
        text = os.fsdecode(path)  # type: ignore[arg-type]
    except TypeError:
        raise InvalidInput(f"FsLock path must be a str or os.PathLike, not {type(path).__name__}") from None
    if "\0" in text:
        raise InvalidInput(f"FsLock path {text!r} contains a NUL character")
    return os.path.abspath(text)


class FsLock:
    """An exclusive (or, with ``shared=True``, shared) lock on ``path``.

    ``timeout`` is in seconds; ``None`` waits forever, ``0`` tries once. The lock file is created
    (mode 0600) if missing and never deleted. Not reentrant: acquiring a lock object twice without
    releasing it waits on itself. ``keep_open`` keeps the file open between holds (for a lock taken
    very often); :meth:`close` gives it up.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        shared: bool = False,
        timeout: float | None = None,
        keep_open: bool = False,
    ) -> None:
        # ``not timeout >= 0`` refuses NaN too: no deadline is ever past it, so a wait would never end.
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout >= 0
        ):
            raise InvalidInput(f"FsLock timeout must be None or a number >= 0, got {timeout!r}")
        for what, flag in (("shared", shared), ("keep_open", keep_open)):
            if not isinstance(flag, bool):
                raise InvalidInput(f"FsLock {what} must be True or False, got {flag!r}")
        self.path = _lock_path(path)
        self.shared = shared
        self.timeout = timeout
        self._state = _state_for(self.path)
        self._held = False
        self._keeping = keep_open
        if keep_open:
            with self._state.mutex:
                self._state.keepers += 1

    @property
    def held(self) -> bool:
        """Whether this lock object holds the lock now."""
        return self._held

    def _try_acquire(self) -> bool:
        state = self._state
        with state.mutex:
            if state.writer or (not self.shared and state.readers):
                return False
            if not state.readers and not state.writer and not self._lock_file(state):
                return False
            if self.shared:
                state.readers += 1
            else:
                state.writer = True
        self._held = True
        return True

    def _lock_file(self, state: _PathState) -> bool:
        """``flock`` the file ``path`` names now (under ``state.mutex``); False if another process
        holds it. The descriptor (kept open between holds, or opened a moment ago) may name a file
        deleted or replaced since: locking that inode would exclude nobody who opens the path anew,
        so it is given up and the path opened again."""
        for _ in range(_REOPENS):
            if state.fd is None:
                state.fd = self._open()
            if not self._flock(state.fd):
                self._maybe_close(state)
                return False
            try:
                same = self._names_path(state.fd)
            except BaseException:
                self._give_up_file(state)  # nobody holds it: the flock must not stay taken
                raise
            if same:
                return True
            self._give_up_file(state)
        return False  # the path keeps changing under us: try again after the backoff

    @staticmethod
    def _give_up_file(state: _PathState) -> None:
        fd, state.fd = state.fd, None
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _names_path(self, fd: int) -> bool:
        try:
            now = os.stat(self.path)
        except (FileNotFoundError, NotADirectoryError):
            return False
        except OSError as exc:
            raise StorageError(f"cannot check lock file {self.path}: {exc.strerror}") from exc
        held = os.fstat(fd)
        return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StorageError(f"cannot open lock file {self.path}: {exc.strerror}") from exc

    def _flock(self, fd: int) -> bool:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return False
            raise StorageError(f"cannot lock {self.path}: {exc.strerror}") from exc
        return True

    def release(self) -> None:
        """Release the lock. Releasing a lock that is not held raises ``RuntimeError``."""
        if not self._held:
            raise RuntimeError(f"FsLock({self.path!r}) is not held")
        state = self._state
        with state.mutex:
            if self.shared:
                state.readers -= 1
            else:
                state.writer = False
            if not state.readers and not state.writer and state.fd is not None:
                fcntl.flock(state.fd, fcntl.LOCK_UN)
                self._maybe_close(state)
        self._held = False

    @staticmethod
    def _maybe_close(state: _PathState) -> None:
        if state.fd is not None and not state.keepers and not state.readers and not state.writer:
            fd, state.fd = state.fd, None
            os.close(fd)

    def close(self) -> None:
        """Stop keeping the file open (``keep_open``); the lock itself is released by ``release``."""
        if self._keeping:
            self._keeping = False
            with self._state.mutex:
                self._state.keepers = max(0, self._state.keepers - 1)
                self._maybe_close(self._state)

    def _deadline(self, now: float) -> float | None:
        """When a wait starting ``now`` ends; None: never (a timeout past ``_FOREVER`` seconds
        would overflow a float, or be infinite, and waits as ``None`` does)."""
        if self.timeout is None or self.timeout > _FOREVER:
            return None
        return now + self.timeout

    def _timeout_error(self, waited: float) -> LockTimeout:
        mode = "shared" if self.shared else "exclusive"
        return LockTimeout(f"could not take the {mode} lock on {self.path} within {waited:.3f}s")

    def acquire(self, *, abandon: threading.Event | None = None) -> None:
        """Take the lock, sleeping the thread between attempts. Once ``abandon`` is set the wait
        ends with ``LockTimeout`` (a thread's wait that its owner can call off, as a task's wait
        is called off by cancellation)."""
        deadline = self._deadline(time.monotonic())
        started = time.monotonic()
        delay = _FIRST_BACKOFF
        while not self._try_acquire():
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise self._timeout_error(self.timeout or 0.0)
            if abandon is not None and abandon.is_set():
                raise LockTimeout(f"gave up waiting for the lock on {self.path} after {now - started:.3f}s")
            time.sleep(delay if deadline is None else min(delay, max(0.0, deadline - now)))
            delay = min(delay * 2, _MAX_BACKOFF)

    async def acquire_async(self) -> None:
        """Take the lock without blocking the event loop; cancelling the wait leaves nothing held."""
        deadline = self._deadline(anyio.current_time())
        delay = _FIRST_BACKOFF
        while not self._try_acquire():
            now = anyio.current_time()
            if deadline is not None and now >= deadline:
                raise self._timeout_error(self.timeout or 0.0)
            await anyio.sleep(delay if deadline is None else min(delay, max(0.0, deadline - now)))
            delay = min(delay * 2, _MAX_BACKOFF)

    def __enter__(self) -> FsLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    async def __aenter__(self) -> FsLock:
        await self.acquire_async()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        mode = "shared" if self.shared else "exclusive"
        return f"<FsLock {self.path} {mode}{' held' if self._held else ''}>"
