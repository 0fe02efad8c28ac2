"""The gate between gc and the CAS's writers, in this process and every other one sharing the store.

Writers hold it shared, briefly, while they *freshen* objects (make an existing object young again
before they reference it: a deduplicated write, a tree entry, ``Cas.has``) and while they rename a
new pack or loose object into place. gc holds it exclusively only to decide what it retires and to
unlink a slice of retired files. So a freshening either happens before gc's decision (which then
sees the touched file and keeps what it holds) or after it (and then finds retired files gone from
its view, never an object about to be deleted).

``flock`` has no writer preference: with several processes taking the shared lock in turn, a waiting
exclusive request could wait forever. A turnstile in front fixes that: writers pass it (shared, for
an instant) on their way in; gc takes it exclusively first, so newcomers wait behind gc while the
holders already inside finish.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..fslock import FsLock

__all__ = ["GcGate"]


class GcGate:
    """The turnstile and the gate (two lock files in ``lock_dir``), and the lock one gc run holds."""

    def __init__(self, lock_dir: Path) -> None:
        self.turnstile_path = lock_dir / "cas-gc-turnstile.lock"
        self.gate_path = lock_dir / "cas-gc-gate.lock"
        self.run_path = lock_dir / "cas-gc-run.lock"
        self._keepers: list[FsLock] = []
        self._keep_lock = threading.Lock()
        #: bumped each time a journal of retired files is finished through this gate (this process):
        #: the ObjectDB sharing it refreshes, so it stops serving objects from the deleted packs' maps.
        self.finished = 0

    def note_finished(self) -> None:
        with self._keep_lock:
            self.finished += 1

    def _keep_open(self) -> None:
        # Taken very often: keep the two descriptors open between holds (never acquired themselves).
        with self._keep_lock:
            if not self._keepers:
                self._keepers = [FsLock(self.turnstile_path, keep_open=True), FsLock(self.gate_path, keep_open=True)]

    def acquire_shared(self) -> FsLock:
        """Hold the gate shared (a writer); returns the held lock, for :meth:`release`."""
        self._keep_open()
        turnstile = FsLock(self.turnstile_path, shared=True)
        turnstile.acquire()
        try:
            gate = FsLock(self.gate_path, shared=True)
            gate.acquire()
        finally:
            turnstile.release()
        return gate

    @staticmethod
    def release(lock: FsLock) -> None:
        lock.release()

    @contextmanager
    def shared(self) -> Iterator[None]:
        lock = self.acquire_shared()
        try:
            yield
        finally:
            lock.release()

    @contextmanager
    def exclusive(self) -> Iterator[float]:
        """Hold the gate exclusively (gc); yields how long it waited, in seconds."""
        self._keep_open()
        started = time.monotonic()
        with FsLock(self.turnstile_path), FsLock(self.gate_path):
            yield time.monotonic() - started

    def run_lock(self, timeout: float | None = None) -> FsLock:
        """The lock one whole gc holds, so two collections (any processes) never overlap."""
        return FsLock(self.run_path, timeout=timeout)

    def close(self) -> None:
        with self._keep_lock:
            for keeper in self._keepers:
                keeper.close()
            self._keepers = []
