"""``OwnerThread``: the thread an actor's blocking work runs on, one job at a time, in order."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from queue import SimpleQueue
from typing import Any

import anyio

__all__ = ["OwnerThread"]

_Job = tuple[asyncio.AbstractEventLoop | None, "asyncio.Future[Any] | None", Callable[..., Any], tuple[Any, ...]]
log = logging.getLogger(__name__)


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class OwnerThread:
    """The one thread that owns a resource (a writer connection, the object store) and runs its
    jobs in order: aiosqlite's shape. A thread of its own rather than a pool's: a job queued to a
    thread already waiting on this queue costs less than a trip through a worker pool, and an actor
    pays it once per batch.
    """

    def __init__(self, name: str) -> None:
        self._jobs: SimpleQueue[_Job | None] = SimpleQueue()
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    async def run(self, function: Callable[..., Any], *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._jobs.put((loop, future, function, args))
        return await future

    def post(self, function: Callable[..., Any], *args: Any) -> None:
        """Queue a job nobody waits for (it runs after the jobs queued before it, as any other)."""
        self._jobs.put((None, None, function, args))

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            loop, future, function, args = job
            try:
                result, error = function(*args), None
            except BaseException as exc:
                result, error = None, exc
            if loop is None or future is None:
                if error is not None:
                    log.error("%s: a posted job failed", self._thread.name, exc_info=error)
                continue
            try:
                loop.call_soon_threadsafe(_settle, future, result, error)
            except RuntimeError:
                pass  # the loop is gone: nobody waits for this any more

    async def stop(self) -> None:
        """Finish what is queued, then end the thread (the sentinel queues behind real work)."""
        self._jobs.put(None)
        await anyio.to_thread.run_sync(self._thread.join)
