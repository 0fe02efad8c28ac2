"""``OwnerThread``: the thread an actor's blocking work runs on, one job at a time, in order.

The thread is a daemon and nothing ever joins it: a process that is interrupted (Ctrl-C twice,
an event loop torn down mid-batch) exits without waiting on a job that may never finish, and
:meth:`OwnerThread.stop` waits for the jobs queued before it only up to a bound.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from queue import SimpleQueue
from typing import Any

import anyio

from .errors import ActorClosed

__all__ = ["OwnerThread"]

_Job = tuple[asyncio.AbstractEventLoop | None, "asyncio.Future[Any] | None", Callable[..., Any], tuple[Any, ...]]
log = logging.getLogger(__name__)


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _nothing() -> None:
    pass


class OwnerThread:
    """The one thread that owns a resource (a writer connection, the object store) and runs its
    jobs in order: aiosqlite's shape. A thread of its own rather than a pool's: a job queued to a
    thread already waiting on this queue costs less than a trip through a worker pool, and an actor
    pays it once per batch.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._jobs: SimpleQueue[_Job | None] = SimpleQueue()
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    async def run(self, function: Callable[..., Any], *args: Any) -> Any:
        """Run ``function(*args)`` on the thread and return (or raise) what it did. A caller
        cancelled meanwhile stops waiting; the job still runs, in its turn."""
        if self._stopping:
            raise ActorClosed(f"{self.name} is stopped")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._jobs.put((loop, future, function, args))
        return await future

    def post(self, function: Callable[..., Any], *args: Any) -> None:
        """Queue a job nobody waits for (it runs after the jobs queued before it, as any other)."""
        if not self._stopping:
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
                    log.error("%s: a posted job failed", self.name, exc_info=error)
                continue
            try:
                loop.call_soon_threadsafe(_settle, future, result, error)
            except RuntimeError:
                pass  # the loop is gone: nobody waits for this any more

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop_nowait(self) -> None:
        """End the thread once the jobs queued so far have run; do not wait for it."""
        if not self._stopping:
            self._stopping = True
            self._jobs.put(None)

    async def stop(self, *, wait: float = 30.0) -> bool:
        """Finish what is queued, then end the thread (the sentinel queues behind real work).

        Waits for the queued jobs at most ``wait`` seconds and returns whether they finished.
        Never joins the thread: a job stuck in a system call must not hold up a closing event
        loop, and a daemon thread does not hold up the interpreter's exit either.
        """
        if self._stopping:
            raise RuntimeError(f"{self.name} was already stopped")
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self._jobs.put((loop, done, _nothing, ()))
        self.stop_nowait()
        with anyio.move_on_after(wait):
            await done
            return True
        log.warning("%s: jobs still running after %.0fs; leaving the thread behind", self.name, wait)
        return False
