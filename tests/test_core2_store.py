"""Opening a store: what a stopped creator does to the others."""

from __future__ import annotations

import signal
from pathlib import Path

import anyio
import pytest

import pforge_async.store as store_module
from pforge_async import LockTimeout, connect

from ._procs import spawn, wait_for_line

pytestmark = pytest.mark.anyio

# A child that starts creating the store and stops itself (SIGSTOP) while it holds locks/create.lock:
# the real creation path, stopped where a debugger or a suspended terminal job would stop it.
STOPPED_CREATOR = """
import os, signal, sys, anyio
import pforge_async.store as store_module
from pforge_async import connect

launch = store_module.Store._launch

async def stop_first(self):
    print("holding", flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)
    await launch(self)

store_module.Store._launch = stop_first

async def main():
    store = await connect(sys.argv[1], watch_workspaces=False)
    await store.aclose()

anyio.run(main)
"""


async def test_a_stopped_creator_makes_the_open_time_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / ".pforge"
    child = spawn(STOPPED_CREATOR, root)
    try:
        wait_for_line(child, "holding", timeout=120)
        # The child holds the lock and never lets go while stopped: the wait must end all the same.
        monkeypatch.setattr(store_module, "CREATE_LOCK_TIMEOUT", 0.5, raising=False)
        # fail_after only turns a wait without end (what this test catches) into a failure.
        with anyio.fail_after(300), pytest.raises(LockTimeout, match=r"locks/create\.lock") as caught:
            await connect(root, watch_workspaces=False)
        assert str(root) in str(caught.value)
    finally:
        child.kill()  # SIGKILL ends a stopped process too
        child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL
    # Its lock died with it: the store is created and serves.
    async with await connect(root, watch_workspaces=False) as store:
        ctx = await store.turns.create_context()
        assert (await store.turns.append_turn(ctx.context_id, "t", b"x")).depth == 1
        report = await store.check()
        assert report.ok, report.problems
