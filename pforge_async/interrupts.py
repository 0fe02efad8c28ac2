"""Ctrl-C delivered between event-loop callbacks while actors run, never in the middle of one.

``asyncio.run`` (and ``anyio.run``, which runs on it) answers the first Ctrl-C by cancelling the
main task, and every later one by raising ``KeyboardInterrupt`` from a plain signal handler, that
is, at whatever bytecode the main thread is running. During a busy shutdown that is often inside an
event-loop callback: a task-done callback of a task group, a future's wake-up. The callback is
abandoned half-way, the task group waits forever for a child that has in fact ended, and the loop's
own shutdown (cancel every task, run them to their end) waits on it for good: the process hangs.

While an actor runs on the main thread's loop, and SIGINT is still Python's default handler or the
asyncio runner's, SIGINT goes through ``loop.add_signal_handler`` instead: the signal only wakes the
loop, and the handler that was there before runs as a callback of its own. It does just what it did
(cancels the main task the first time, raises ``KeyboardInterrupt`` later), but between callbacks,
where nothing is left half-done, so the loop's shutdown can run every task to its end. An
application that installed a SIGINT handler of its own keeps it untouched.
"""

from __future__ import annotations

import asyncio
import functools
import signal
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["hold_sigint", "release_sigint"]

_Handler = Callable[[int, Any], Any]
#: loop -> (actors holding SIGINT on it, the handler that was there before, the loop's own handler)
_held: dict[asyncio.AbstractEventLoop, tuple[int, _Handler, object]] = {}


def _ours_to_take(handler: object) -> bool:
    if handler is signal.default_int_handler:
        return True
    return isinstance(handler, functools.partial) and getattr(handler.func, "__qualname__", "") == "Runner._on_sigint"


def _deliver(previous: _Handler) -> None:
    previous(signal.SIGINT, None)


def hold_sigint() -> bool:
    """Route SIGINT through the running loop (see the module). True if this call holds it and
    must be matched by :func:`release_sigint`."""
    if threading.current_thread() is not threading.main_thread():
        return False
    loop = asyncio.get_running_loop()
    held = _held.get(loop)
    if held is not None:
        _held[loop] = (held[0] + 1, held[1], held[2])
        return True
    previous = signal.getsignal(signal.SIGINT)
    if not _ours_to_take(previous) or not callable(previous):
        return False
    try:
        loop.add_signal_handler(signal.SIGINT, _deliver, previous)
    except (NotImplementedError, RuntimeError, ValueError):
        return False
    _held[loop] = (1, previous, signal.getsignal(signal.SIGINT))
    return True


def release_sigint() -> None:
    """Undo one :func:`hold_sigint`; the last one puts the previous handler back."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return
    held = _held.get(loop)
    if held is None:
        return
    users, previous, ours = held
    if users > 1:
        _held[loop] = (users - 1, previous, ours)
        return
    del _held[loop]
    current = signal.getsignal(signal.SIGINT)
    try:
        loop.remove_signal_handler(signal.SIGINT)
    except (NotImplementedError, RuntimeError, ValueError):
        return
    if current is not ours and current is not None:
        # The application installed a handler of its own since: the removal must not drop it.
        signal.signal(signal.SIGINT, current)
        return
    # remove_signal_handler leaves Python's default; the handler from before goes back instead.
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, previous)
