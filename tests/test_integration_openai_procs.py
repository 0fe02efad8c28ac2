"""PforgeSession with several processes on one store: 4 processes x 16 tasks on distinct sessions lose
nothing and see no error; two processes writing one session get WriterConflict, and every batch that
was stored was written on the session as it really stood (no run's items written on a stale view)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from pforge_async import open_store
from pforge_async.integrations.openai_agents import PforgeSession
from tests._procs import run_all, spawn, wait_for_line

pytestmark = pytest.mark.anyio

DISTINCT = r"""
import asyncio, sys
from pforge_async import open_store
from pforge_async.integrations.openai_agents import PforgeSession

async def main(root, proc, rounds):
    async with open_store(root, durability="normal") as store:
        async def task(i):
            session = PforgeSession(f"p{proc}-s{i}", store)
            for r in range(rounds):
                batch = [{"role": "user", "content": f"{r}a"}, {"role": "assistant", "content": f"{r}b"}]
                await session.add_items(batch)
                items = await session.get_items(limit=2)
                assert [x["content"] for x in items] == [f"{r}a", f"{r}b"], items
        await asyncio.gather(*(task(i) for i in range(16)))
    print("ok")

asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
"""

SHARED = r"""
import asyncio, json, sys
from pforge_async import open_store
from pforge_async.integrations.openai_agents import PforgeSession, WriterConflict

async def main(root, proc, rounds):
    written = conflicts = 0
    async with open_store(root, durability="normal") as store:
        session = PforgeSession("shared", store)
        await session.get_items()
        print("ready", flush=True)
        sys.stdin.readline()  # both start together
        for r in range(rounds):
            seen = len(await session.get_items())  # what a run reads first
            await asyncio.sleep(0.01)  # the model thinks
            batch = [{"role": "user", "content": f"{proc}:{r}:{seen}:{k}"} for k in range(2)]
            try:
                await session.add_items(batch)
                written += 1
            except WriterConflict:
                conflicts += 1
    print(json.dumps({"written": written, "conflicts": conflicts}))

asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
"""


async def test_four_processes_sixteen_sessions_each(tmp_path: Path) -> None:
    root = tmp_path / "store"
    rounds = 10
    async with open_store(root):  # made first: concurrent first opens of one root race (see the report)
        pass
    outputs = run_all([spawn(DISTINCT, root, proc, rounds) for proc in range(4)], timeout=300)
    assert [out.strip() for out in outputs] == ["ok"] * 4
    async with open_store(root) as store:
        for proc in range(4):
            for i in range(16):
                items: list[Any] = await PforgeSession(f"p{proc}-s{i}", store).get_items()
                assert [x["content"] for x in items] == [f"{r}{k}" for r in range(rounds) for k in "ab"]
        assert (await store.check()).ok


async def test_two_processes_on_one_session(tmp_path: Path) -> None:
    root = tmp_path / "store"
    async with open_store(root) as store:  # made once, so both children open an existing store
        await PforgeSession("shared", store).add_items([{"role": "system", "content": "start"}])
    rounds = 30
    procs = [spawn(SHARED, root, proc, rounds, stdin=subprocess.PIPE) for proc in range(2)]
    for proc in procs:
        wait_for_line(proc, "ready", timeout=120)
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    outputs = [json.loads(out) for out in run_all(procs, timeout=300)]
    assert sum(o["conflicts"] for o in outputs) >= 1, outputs  # the second writer was told
    async with open_store(root) as store:
        items: list[Any] = await PforgeSession("shared", store).get_items()
    assert len(items) == 1 + 2 * sum(o["written"] for o in outputs)
    for position in range(1, len(items), 2):
        first, second = items[position]["content"].split(":"), items[position + 1]["content"].split(":")
        assert first[:3] == second[:3] and (first[3], second[3]) == ("0", "1")  # a batch stays whole
        assert int(first[2]) == position, (position, items)  # written on the session as it stood
