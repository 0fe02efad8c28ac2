"""``open_store``: the embedded store, its on-disk layout, and the task group its actors run in."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal, get_args

import anyio
import msgspec
from anyio.abc import TaskGroup

from .actor import Actor
from .cas.actor import CasActor
from .cas.store import Cas, FsckReport
from .cas.watch import open_watcher
from .errors import InvalidInput, StorageError
from .ledgers.budget import BudgetActor, BudgetLedger
from .ledgers.constellation import ConstellationActor, ConstellationMemory
from .ledgers.nonces import NonceActor, NonceLedger
from .turnstore.rules import DEFAULT_MAX_PAYLOAD
from .turnstore.sqlite import SqliteTurnStore, TurnActor

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup  # type: ignore[import-not-found]

__all__ = ["Durability", "Store", "StoreCheck", "open_store"]

Durability = Literal["full", "normal"]
DEFAULT_ROOT = ".pforge"


class StoreCheck(msgspec.Struct, frozen=True):
    """What :meth:`Store.check` found; ``problems`` is empty when the store is sound."""

    problems: list[str]
    cas: FsckReport

    @property
    def ok(self) -> bool:
        return not self.problems


class Store:
    """What ``open_store`` yields. Its actors live exactly as long as the ``async with`` block."""

    cas: Cas
    turns: SqliteTurnStore
    memory: ConstellationMemory
    nonces: NonceLedger
    budget: BudgetLedger

    def __init__(
        self,
        root: Path,
        durability: Durability,
        task_group: TaskGroup,
        *,
        watch_workspaces: bool,
        max_payload_bytes: int,
    ) -> None:
        self.root = root
        self.durability: Durability = durability
        self._task_group = task_group
        self._actors: list[Actor[Any]] = []
        self._watcher = open_watcher() if watch_workspaces else None
        self._max_payload_bytes = max_payload_bytes

    async def _start(self) -> None:
        fsync = self.durability == "full"
        cas_actor = CasActor(self.root / "cas", self.locks_dir / "cas-refs.lock", fsync=fsync, watcher=self._watcher)
        await self.start_actor(cas_actor)
        self.cas = Cas(cas_actor, self.root / "cache", self.root)
        turns = TurnActor(self._db("turns"), self._lock("turns"), durability=self.durability)
        await self.start_actor(turns)
        self.turns = SqliteTurnStore(turns, self.cas, max_payload_bytes=self._max_payload_bytes)
        memory = ConstellationActor(self._db("memory"), self._lock("memory"), durability=self.durability)
        nonces = NonceActor(self._db("nonces"), self._lock("nonces"), durability=self.durability)
        budget = BudgetActor(self._db("budget"), self._lock("budget"), durability=self.durability)
        self._ledgers = (memory, nonces, budget)
        for actor in self._ledgers:
            await self.start_actor(actor)
        self.memory = ConstellationMemory(memory)
        self.nonces = NonceLedger(nonces)
        self.budget = BudgetLedger(budget)

    async def check(self) -> StoreCheck:
        """The store's own integrity check: every CAS object re-hashed and its links followed,
        SQLite's integrity check of every database, every turn payload re-hashed, and the invariants
        the ledgers keep (action_stats = aggregate of transitions, spend totals = sum of spend, ...)."""
        cas = await self.cas.fsck()
        problems = [f"cas: object {oid} is corrupt" for oid in cas.corrupt]
        problems += [f"cas: object {oid} is referenced but missing" for oid in cas.missing]
        problems += await self.turns.check()
        for actor in self._ledgers:
            problems += await actor.check()
        return StoreCheck(problems, cas)

    def _db(self, name: str) -> Path:
        return self.root / f"{name}.db"

    def _lock(self, name: str) -> Path:
        return self.locks_dir / f"{name}.lock"

    @property
    def locks_dir(self) -> Path:
        return self.root / "locks"

    async def start_actor(self, actor: Actor[Any]) -> None:
        """Run ``actor`` in the store's task group; it is drained and closed when the store closes."""
        await self._task_group.start(actor.run)
        self._actors.append(actor)

    async def _close(self) -> None:
        # Newest first: later actors may call into earlier ones while draining.
        for actor in reversed(self._actors):
            await actor.aclose()
        if self._watcher is not None:
            self._watcher.close()


def _make_root(root: Path) -> None:
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        (root / "locks").mkdir(mode=0o700, exist_ok=True)
    except OSError as exc:
        raise StorageError(f"cannot create store root {root}: {exc.strerror}") from exc
    if not root.is_dir():
        raise InvalidInput(f"store root {root} is not a directory")


@asynccontextmanager
async def open_store(
    root: str | os.PathLike[str] = DEFAULT_ROOT,
    *,
    durability: Durability = "full",
    watch_workspaces: bool = True,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD,
) -> AsyncIterator[Store]:
    """Open (creating if needed) the store at ``root`` and run its actors until the block exits.

    ``durability="full"`` makes an acknowledged write survive power loss (fsync per batch);
    ``"normal"`` makes it survive a killed process. The root is created owner-only (0700).
    ``watch_workspaces`` lets a repeated ``cas.snapshot`` of an unchanged directory answer from
    inotify events instead of a stat walk (see :mod:`pforge_async.cas.watch` for its limits).
    ``max_payload_bytes`` bounds one turn's payload.
    """
    if durability not in get_args(Durability):
        raise InvalidInput(f"durability must be 'full' or 'normal', got {durability!r}")
    path = Path(root).absolute()
    await anyio.to_thread.run_sync(_make_root, path)
    try:
        async with anyio.create_task_group() as tg:
            store = Store(
                path,
                durability,
                tg,
                watch_workspaces=watch_workspaces,
                max_payload_bytes=max_payload_bytes,
            )
            try:
                await store._start()
                yield store
            finally:
                with anyio.CancelScope(shield=True):
                    await store._close()
    except BaseExceptionGroup as group:
        # The task group wraps whatever the block (or an actor's startup) raised: hand the one
        # error back as itself, as a caller of open_store expects (raised outside this handler, so
        # its own cause and context stay as they were).
        if len(group.exceptions) != 1:
            raise
        error = group.exceptions[0]
    else:
        return
    raise error
