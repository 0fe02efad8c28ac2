"""What an adapter is built on: an open :class:`~pforge_async.Store`, a turn store of any backend
(``MemoryTurnStore``, ``FsTurnStore``, ``store.turns``), or a path opened on first use.

Stores opened from a path are shared: every adapter of one event loop that names the same directory
uses one open store (the store is one writer per database in a process), which closes when the last
of them is closed. Nothing here is tied to a task group, so a store opened in one task (a fixture's
setup) may be closed from another (its teardown).
"""

from __future__ import annotations

import asyncio
import os
import threading
import weakref
from pathlib import Path
from typing import Any, Union

from ..errors import InvalidInput
from ..ledgers.budget import BudgetLedger
from ..store import Store, connect
from ..turnstore.base import TurnStoreBase
from ..turnstore.memory import MemoryTurnStore

__all__ = ["MEMORY", "StoreLike", "Backing", "SharedStores", "turns_of"]

#: names a fresh, private, in-memory turn store (as ``":memory:"`` does for SQLite)
MEMORY = ":memory:"
#: a str starting so names a PostgreSQL store (``open_store`` takes the same)
_DSN_SCHEMES = ("postgresql://", "postgres://")

StoreLike = Union[Store, TurnStoreBase, str, "os.PathLike[str]"]


def turns_of(store: object, what: str) -> tuple[TurnStoreBase, BudgetLedger | None]:
    """The turn store (and budget ledger, if any) of an open store or a turn store."""
    if isinstance(store, Store):
        return store.turns, store.budget
    if isinstance(store, TurnStoreBase):
        return store, None
    raise InvalidInput(f"{what} takes a Store, a turn store or a path, not {type(store).__name__} {store!r:.80}")


class SharedStores:
    """One open store per (directory, event loop), counted by its users."""

    def __init__(self) -> None:
        self._open: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[Path | str, _Entry]] = (
            weakref.WeakKeyDictionary()
        )

    async def acquire(self, path: Path | str, options: dict[str, Any]) -> Store:
        loop = asyncio.get_running_loop()
        stores = self._open.setdefault(loop, {})
        entry = stores.get(path)
        if entry is None:
            entry = _Entry(asyncio.ensure_future(_connect_one_at_a_time(path, options)))
            stores[path] = entry
        entry.users += 1
        try:
            store = await asyncio.shield(entry.opening)
        except BaseException:
            entry.users -= 1
            if entry.opening.done() and stores.get(path) is entry:
                del stores[path]  # a failed open is not kept: the next user tries again
            raise
        if store.closed:  # closed by someone holding it directly: open again
            entry.users -= 1
            if stores.get(path) is entry:
                del stores[path]
            return await self.acquire(path, options)
        return store

    async def release(self, store: Store) -> None:
        loop = asyncio.get_running_loop()
        stores = self._open.get(loop, {})
        for path, entry in list(stores.items()):
            opened = entry.opening.done() and not entry.opening.cancelled() and entry.opening.exception() is None
            if opened and entry.opening.result() is store:
                entry.users -= 1
                if entry.users <= 0:
                    del stores[path]
                    await store.aclose()
                return
        await store.aclose()  # opened on another loop or already forgotten: close it all the same


_opening_guard = threading.Lock()
_opening: dict[Path | str, threading.Lock] = {}


async def _connect_one_at_a_time(path: Path | str, options: dict[str, Any]) -> Store:
    """Open the store at ``path``, one opener of this process at a time (the event loops of several
    threads may open it at once, and the first open creates it), waiting without blocking a loop."""
    with _opening_guard:
        gate = _opening.setdefault(path, threading.Lock())
    delay = 0.0005
    while not gate.acquire(blocking=False):
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.05)
    try:
        return await connect(path, **options)
    finally:
        gate.release()


class _Entry:
    def __init__(self, opening: asyncio.Future[Store]) -> None:
        self.opening = opening
        self.users = 0


SHARED = SharedStores()


class Backing:
    """An adapter's store: given open (the caller closes it), or a path opened on first use in each
    event loop that uses it (an adapter may serve ``asyncio.run`` after ``asyncio.run``, or threads
    with loops of their own) and released by :meth:`aclose`. ``":memory:"`` gives a private
    ``MemoryTurnStore``, which serves any loop."""

    def __init__(self, store: StoreLike, what: str, options: dict[str, Any] | None = None) -> None:
        self._what = what
        self._options = dict(options or {})
        #: the directory, or a PostgreSQL DSN (kept as given: it names a server, not a path)
        self._path: Path | str | None = None
        #: a store given (or made): the same for every loop
        self.fixed: TurnStoreBase | None = None
        self._fixed_budget: BudgetLedger | None = None
        #: per event loop, the store opened from the path
        self._opened: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Store] = weakref.WeakKeyDictionary()
        if isinstance(store, str) and store == MEMORY:
            self.fixed = MemoryTurnStore()
        elif isinstance(store, str) and store.startswith(_DSN_SCHEMES):
            self._path = store
        elif isinstance(store, (str, os.PathLike)):
            if isinstance(os.fspath(store), bytes) or os.fspath(store) == "":
                raise InvalidInput(f"{what}: the store path must be a non-empty str path, got {store!r}")
            self._path = Path(os.fspath(store)).absolute()
        else:
            self.fixed, self._fixed_budget = turns_of(store, what)

    @property
    def path(self) -> Path | str | None:
        return self._path

    async def open(self) -> TurnStoreBase:
        """The turn store for the running event loop."""
        if self.fixed is not None:
            return self.fixed
        return (await self._store()).turns

    async def budget(self) -> BudgetLedger | None:
        """The budget ledger of the store (None for a bare turn store)."""
        if self.fixed is not None:
            return self._fixed_budget
        return (await self._store()).budget

    async def _store(self) -> Store:
        assert self._path is not None
        loop = asyncio.get_running_loop()
        store = self._opened.get(loop)
        if store is not None and not store.closed:
            return store
        store = await SHARED.acquire(self._path, self._options)
        mine = self._opened.get(loop)
        if mine is not None and not mine.closed:  # another task of this adapter opened it first
            await SHARED.release(store)
            return mine
        self._opened[loop] = store
        return store

    async def aclose(self) -> None:
        """Release the store opened in the running loop. (One opened in another loop is closed when
        that loop ends, as every task of it is.)"""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        store = self._opened.pop(loop, None)
        if store is not None:
            await SHARED.release(store)
