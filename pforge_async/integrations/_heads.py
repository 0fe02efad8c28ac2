"""Compare-and-set heads for the adapters: each writer remembers the head it last saw of each context
it writes, and every write it makes must find that head still there. A second writer on the same
thread or session (another process, or another adapter instance) therefore gets a
:class:`WriterConflict` instead of silently forking the history.

A writer sees a head when it opens the context, when it reads it, and when its own write lands. A read
that overlapped one of the writer's own writes does not count (the write's head is newer than what
the read may have seen): the writer keeps the head its write left.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Generic, TypeVar

from ..errors import HeadConflict
from ..turnstore.base import TurnStoreBase
from ..turnstore.types import TurnRecord

__all__ = ["Tracked", "WriterConflict", "WriterLock"]

T = TypeVar("T")


class WriterConflict(HeadConflict):
    """Another writer changed a thread or session since this one last saw it: its write was refused,
    nothing of it was stored. Read the thread or session again (a new run does) to continue from what
    is there now."""

    def __init__(self, what: str, context_id: int, expected: int, actual: int) -> None:
        super().__init__(context_id, expected, actual)
        self.what = what
        self.args = (
            f"{what}: another writer changed it since this one last read it (context {context_id}: expected "
            f"head {expected}, found {actual}); the write was refused and nothing of it stored: read it again "
            "to continue from what is there",
        )

    def __str__(self) -> str:
        return str(self.args[0])

    def __reduce__(self) -> tuple[type[WriterConflict], tuple[str, int, int, int]]:  # type: ignore[override]
        return type(self), (self.what, self.context_id, self.expected, self.actual)


class WriterLock:
    """One writer's writes to one context, one at a time: across the tasks of an event loop (they
    queue on an ``asyncio.Lock``, in order) and across event loops (an adapter used by ``asyncio.run``
    after ``asyncio.run``, or from threads with loops of their own: a thread lock, waited for by
    polling, so no loop ever blocks)."""

    def __init__(self) -> None:
        self._across = threading.Lock()
        self._per_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = weakref.WeakKeyDictionary()

    def locked(self) -> bool:
        return self._across.locked()

    async def __aenter__(self) -> None:
        loop = asyncio.get_running_loop()
        lock = self._per_loop.get(loop)
        if lock is None:
            lock = self._per_loop.setdefault(loop, asyncio.Lock())
        await lock.acquire()
        try:
            delay = 0.0005
            while not self._across.acquire(blocking=False):
                await asyncio.sleep(delay)  # held by a task of another event loop
                delay = min(delay * 2, 0.05)
        except BaseException:
            lock.release()
            raise

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._across.release()
        self._per_loop[asyncio.get_running_loop()].release()


@dataclass
class Tracked(Generic[T]):
    """What a writer knows of one context: its id, the head it last saw, and adapter state that goes
    with that head (``state``). ``lock`` serializes this writer's own writes to the context, so each
    one expects the head the previous one left."""

    context_id: int
    head: int
    state: T
    lock: WriterLock = field(default_factory=WriterLock)
    #: how many writes this writer made to the context: a read compares it before and after
    writes: int = 0
    #: a write whose outcome is unknown (it failed or was cancelled on its way): the head it expected
    #: and the payloads of its turns, to learn at the next write whether it landed
    uncertain: tuple[int, list[bytes]] | None = None
    #: a move of the head whose outcome is unknown: the head it expected and the turn (not 0) it moved
    #: it to
    landing: tuple[int, int] | None = None

    def wrote(self, head: int, state: T) -> None:
        """This writer's own write landed, leaving ``head``."""
        self.head = head
        self.state = state
        self.writes += 1

    def saw(self, mark: int, context_id: int, head: int, state: T) -> bool:
        """A read that began when ``writes`` was ``mark`` found ``head``: that is the head now seen,
        unless a write of ours landed meanwhile. False if the context is another one now (deleted and
        made again under the same name): the caller must resolve the name again."""
        if context_id != self.context_id:
            return False
        if mark == self.writes:
            self.head = head
            self.state = state
        return True

    async def settle(self, turns: TurnStoreBase, state_of: Callable[[TurnRecord], T]) -> None:
        """Learn whether a write whose outcome was unknown landed: if the chain now ends with its
        turns right after the head it expected, it did, and this writer goes on from there; otherwise
        the head it expected stays expected (so a write by another writer meanwhile conflicts)."""
        if self.landing is not None:
            await self._settle_landing(turns, state_of)
        if self.uncertain is None:
            return
        expected, payloads = self.uncertain
        self.uncertain = None
        tail = await turns.list_turns(self.context_id, limit=len(payloads) + 1)
        if not tail or tail[-1].turn_id == expected:
            return
        mine = tail[-len(payloads) :]
        before = tail[0].turn_id if len(tail) > len(payloads) else 0
        if [r.payload for r in mine] == payloads and (mine[0].parent_turn_id == expected and before == expected):
            self.wrote(mine[-1].turn_id, state_of(mine[-1]))

    async def _settle_landing(self, turns: TurnStoreBase, state_of: Callable[[TurnRecord], T]) -> None:
        """A head move landed if the head is now where it moved it (turn ids are never reused)."""
        assert self.landing is not None
        expected, target = self.landing
        self.landing = None
        if self.head == expected and (await turns.get_head(self.context_id)).head_turn_id == target:
            self.wrote(target, state_of(await turns.get_turn(target)))

    def conflict(self, what: str, exc: HeadConflict) -> WriterConflict:
        error = WriterConflict(what, exc.context_id, exc.expected, exc.actual)
        error.__cause__ = exc
        return error
