"""A bridge from synchronous callers (LangGraph's sync API, ``SQLiteSession.close()``-style code) to
the event loop a store runs on.

A store's actors live on one event loop. A synchronous call made from another thread is handed to
that loop (``run_coroutine_threadsafe``) and waited for; made from the loop's own thread it would block
the very loop that must answer it, so it is refused with ``InvalidInput`` (await the ``a*`` method
there). An adapter built outside any loop gets a loop of its own, on a daemon thread, when it first
needs one.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from ..errors import ActorClosed, InvalidInput

__all__ = ["LoopBridge"]

T = TypeVar("T")


class LoopBridge:
    def __init__(self, loop: asyncio.AbstractEventLoop | None, what: str) -> None:
        self.loop = loop
        self._what = what
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @classmethod
    def current(cls, what: str) -> LoopBridge:
        """A bridge to the running loop, or (outside one) to a loop started on first need."""
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        return cls(loop, what)

    def start(self) -> asyncio.AbstractEventLoop:
        """The bridge's loop, started on a daemon thread if it has none."""
        with self._lock:
            if self.loop is None:
                loop = asyncio.new_event_loop()
                ready = threading.Event()

                def run() -> None:
                    asyncio.set_event_loop(loop)
                    loop.call_soon(ready.set)
                    loop.run_forever()

                self._thread = threading.Thread(target=run, name=f"pforge {self._what} loop", daemon=True)
                self._thread.start()
                ready.wait()
                self.loop = loop
            return self.loop

    def run(self, coro: Coroutine[Any, Any, T], call: str) -> T:
        loop = self.loop
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if loop is None:
            loop = self.start()
        if running is loop:
            coro.close()
            raise InvalidInput(
                f"{self._what}.{call}() was called from the thread of the event loop the store runs on, where "
                f"waiting would block that loop: await {self._what}.a{call}() instead, or call {call}() from "
                "another thread"
            )
        if loop.is_closed():
            coro.close()
            raise ActorClosed(f"{self._what}: the event loop its store ran on is closed")
        return asyncio.run_coroutine_threadsafe(coro, loop).result()

    def stop(self) -> None:
        """Stop the loop this bridge started (a loop it was given is left alone)."""
        thread, self._thread = self._thread, None
        if thread is None or self.loop is None:
            return
        loop = self.loop
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()
        self.loop = None
