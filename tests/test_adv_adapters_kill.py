"""Both adapters killed (SIGKILL) mid-write at random points, then resumed by a new process: every
checkpoint and item stored is whole and readable, the history is one chain, a new writer goes on from
what is there, other threads and sessions are untouched, and the store checks clean."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import pytest

from pforge_async import open_store
from pforge_async.integrations.langgraph import PforgeSaver
from pforge_async.integrations.openai_agents import PforgeSession

from ._procs import spawn, wait_for_line

pytestmark = pytest.mark.anyio

SAVER_CHILD = r"""
import asyncio, sys
from langgraph.checkpoint.base.id import uuid6
from pforge_async import open_store
from pforge_async.integrations.langgraph import PforgeSaver

async def main(root):
    async with open_store(root, durability="normal") as store:
        saver = PforgeSaver(store)
        latest = await saver.aget_tuple({"configurable": {"thread_id": "t", "checkpoint_ns": ""}})
        parent = latest.config["configurable"]["checkpoint_id"] if latest else None
        step = latest.metadata["step"] + 1 if latest else 0
        chat = list(latest.checkpoint["channel_values"]["chat"]) if latest else []
        print("ready", flush=True)
        while True:
            chat.append(f"message {step} " + "x" * (step % 7) * 300)
            cp = {"v": 4, "id": str(uuid6(clock_seq=-1)), "ts": "2026-01-01T00:00:00+00:00",
                  "channel_values": {"chat": list(chat), "step": step, "doc": "d" * 4000 + str(step % 3)},
                  "channel_versions": {"chat": step + 1, "step": step + 1, "doc": step + 1},
                  "versions_seen": {}, "updated_channels": None}
            conf = {"configurable": {"thread_id": "t", "checkpoint_ns": ""}}
            if parent:
                conf["configurable"]["checkpoint_id"] = parent
            new = {"chat": step + 1, "step": step + 1, "doc": step + 1}
            stored = await saver.aput(conf, cp, {"source": "loop", "step": step, "parents": {}}, new)
            writes = [("chat", "w" * (step % 5) * 30000), ("__error__", f"e{step}")]
            await saver.aput_writes(stored, writes, f"task{step}")
            if step % 9 == 8:
                await saver.aprune(["t"])
            parent = stored["configurable"]["checkpoint_id"]
            step += 1

asyncio.run(main(sys.argv[1]))
"""

SESSION_CHILD = r"""
import asyncio, sys
from pforge_async import open_store
from pforge_async.integrations.openai_agents import PforgeSession

async def main(root):
    async with open_store(root, durability="normal") as store:
        session = PforgeSession("s", store)
        items = await session.get_items()
        n = items[-1]["n"] + 1 if items else 0
        print("ready", flush=True)
        while True:
            await session.add_items([{"n": n, "part": k, "text": "y" * (n % 11) * 100} for k in range(3)])
            if n % 4 == 3:
                await session.pop_item()
            if n % 8 == 5:  # a group never popped (n % 4 == 1): its three items are replaced
                snap = await session._get_compaction_snapshot(3)
                await snap.replace_suffix(0, [{"n": n, "part": k, "text": "compacted"} for k in range(3)])
            n += 1

asyncio.run(main(sys.argv[1]))
"""


def kill_mid_write(code: str, root: Path, rng: random.Random) -> None:
    proc = spawn(code, root)
    try:
        wait_for_line(proc, "ready")
        time.sleep(rng.uniform(0.05, 0.4))  # where the kill lands is what varies, nothing is timed
    finally:
        proc.kill()
        proc.communicate()


async def check_thread(saver: PforgeSaver) -> int:
    listed = [t async for t in saver.alist({"configurable": {"thread_id": "t", "checkpoint_ns": ""}})]
    ids = {t.config["configurable"]["checkpoint_id"] for t in listed}
    for t in listed:
        values: dict[str, Any] = t.checkpoint["channel_values"]
        step = values["step"]
        assert t.metadata["step"] == step and values["doc"] == "d" * 4000 + str(step % 3)
        assert len(values["chat"]) == step + 1 and values["chat"][-1].startswith(f"message {step} ")
        parent = t.parent_config["configurable"]["checkpoint_id"] if t.parent_config else None
        assert parent is None or parent in ids or t is listed[-1]  # a prune keeps the latest alone
        for task, _channel, value in t.pending_writes:
            assert task == f"task{step}" and (value == f"e{step}" or value == "w" * (step % 5) * 30000)
    return len(listed)


async def test_killed_writers_resume(tmp_path: Path) -> None:
    root = tmp_path / "store"
    async with open_store(root, durability="normal") as store:
        await PforgeSaver(store).aput(
            {"configurable": {"thread_id": "bystander", "checkpoint_ns": ""}},
            {
                "v": 4,
                "id": "1",
                "ts": "",
                "channel_values": {"k": "keep" * 100},
                "channel_versions": {"k": 1},
                "versions_seen": {},
                "updated_channels": None,
            },  # type: ignore[typeddict-unknown-key]
            {"source": "input", "step": -1, "parents": {}},
            {"k": 1},
        )
        await PforgeSession("bystander", store).add_items([{"keep": True}])
    rng = random.Random(20261203)
    for _ in range(4):
        kill_mid_write(SAVER_CHILD, root, rng)
        kill_mid_write(SESSION_CHILD, root, rng)
        async with open_store(root, durability="normal") as store:
            assert await check_thread(PforgeSaver(store)) >= 0
            items = await PforgeSession("s", store).get_items()
            groups: dict[int, list[int]] = {}
            for item in items:
                groups.setdefault(item["n"], []).append(item["part"])
            assert [item["n"] for item in items] == sorted(item["n"] for item in items)
            for n, parts in groups.items():  # an add is whole; a group of n % 4 == 3 may have had one popped
                assert parts == [0, 1, 2] or (n % 4 == 3 and parts == [0, 1]), (n, parts)
    async with open_store(root, durability="normal") as store:
        saver = PforgeSaver(store)
        assert await check_thread(saver) >= 1
        kept = await saver.aget_tuple({"configurable": {"thread_id": "bystander", "checkpoint_ns": ""}})
        assert kept is not None and kept.checkpoint["channel_values"] == {"k": "keep" * 100}
        assert await PforgeSession("bystander", store).get_items() == [{"keep": True}]
        assert (await store.check()).problems == []
