"""Adversarial review of Ctrl-C routing: a SIGINT handler the application installs while a store is open."""

from __future__ import annotations

import asyncio
import signal
import threading
from pathlib import Path
from types import FrameType

import pytest

import pforge_async as pf


def _mine(signum: int, frame: FrameType | None) -> None:
    pass


def test_a_sigint_handler_installed_while_a_store_is_open_survives_its_close(tmp_path: Path) -> None:
    # The store routes SIGINT through the loop while its actors run. An application that installs a
    # handler of its own meanwhile (a server starting up after the store) lost it when the store
    # closed: the loop's removal put back the default, then the handler from before the store.
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers can only be installed from the main thread")
    before = signal.getsignal(signal.SIGINT)

    async def main() -> object:
        store = await pf.connect(tmp_path / "s")
        signal.signal(signal.SIGINT, _mine)
        await store.aclose()
        return signal.getsignal(signal.SIGINT)

    try:
        assert asyncio.run(main()) is _mine
    finally:
        signal.signal(signal.SIGINT, before)
