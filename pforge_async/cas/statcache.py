"""The stat caches of the workspaces a CAS actor snapshots, held in memory and written to disk late.

Writing a root's cache file after every snapshot (a temp file renamed over the old one) cost the
CAS actor's thread as much as the scan itself in a loop that snapshots after each tool step, and it
sat on the reply path. So the actor keeps each root's latest cache here, answers the next snapshot
from memory, and writes the files after its replies: at once when none was written for
``WRITE_INTERVAL_S``, otherwise once that interval has passed (every root changed meanwhile in one
job), and all of them when the store closes.

Crash safety is the file's, unchanged: an entry is used only while the file's stat matches it and
its object is present, and the memory only ever holds what snapshots stored durably. A cache file
left behind by a crash is older than the memory was, or missing: it costs the next snapshot of that
root a re-read of the files changed since, never a wrong tree.

Only the actor's owner thread calls these methods; ``dirty`` is read from the event loop between
jobs (a dict's truth, which the GIL keeps consistent).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Final

from .snapshot import CacheEntry, write_cache

__all__ = ["MAX_HELD_ENTRIES", "WRITE_INTERVAL_S", "StatCaches"]

#: at most one write of the dirty caches per this many seconds while snapshots keep coming
WRITE_INTERVAL_S: Final = 1.0
#: entries held in memory, over every root (about 400 bytes each); the least recently snapshotted
#: roots are dropped beyond it (their files answer them again) and a larger root is never held
MAX_HELD_ENTRIES: Final = 1 << 16

Cache = dict[bytes, CacheEntry]


class StatCaches:
    """Each root's latest stat cache (by its file's path), and which of them are not yet written."""

    def __init__(self, max_entries: int = MAX_HELD_ENTRIES) -> None:
        self.max_entries = max_entries
        self._held: OrderedDict[Path, Cache] = OrderedDict()  # least recently snapshotted first
        self._entries = 0
        self._dirty: dict[Path, Cache] = {}
        #: cache files written, and writes that failed (only logged: the memory still answers)
        self.written = 0
        self.failed = 0

    def get(self, path: Path) -> Cache | None:
        """The cache of the root whose file is ``path``, if this process holds it (else None: the
        file answers)."""
        cache = self._held.get(path)
        if cache is not None:
            self._held.move_to_end(path)
            return cache
        return self._dirty.get(path)  # too large to hold, or dropped, and not written yet

    def put(self, path: Path, cache: Cache) -> None:
        """A snapshot's cache, once its objects are durable: held, and written later."""
        self._dirty[path] = cache
        old = self._held.pop(path, None)
        if old is not None:
            self._entries -= len(old)
        if len(cache) > self.max_entries:
            return
        self._held[path] = cache
        self._entries += len(cache)
        while self._entries > self.max_entries:
            _, dropped = self._held.popitem(last=False)
            self._entries -= len(dropped)

    @property
    def dirty(self) -> bool:
        """Whether some cache is not written yet."""
        return bool(self._dirty)

    def write_dirty(self) -> None:
        """Write every cache not yet written (a failure is logged by ``write_cache``, and that
        cache is not tried again until its root is snapshotted again)."""
        while self._dirty:
            path, cache = self._dirty.popitem()
            if write_cache(path, cache):
                self.written += 1
            else:
                self.failed += 1
