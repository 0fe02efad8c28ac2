"""PforgeSaver with several processes on one store: 4 processes x 16 concurrent graph runs on distinct
threads lose nothing and see no error; two processes running one thread at once get WriterConflict,
and the thread's history stays one chain (no checkpoint is the parent of two: no silent fork)."""

from __future__ import annotations

import itertools
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from pforge_async import open_store
from pforge_async.integrations.langgraph import PforgeSaver
from tests._procs import run_all, spawn, wait_for_line

pytestmark = pytest.mark.anyio

DISTINCT = r"""
import asyncio, operator, sys
from typing import Annotated, TypedDict
from langgraph.graph import END, START, StateGraph
from pforge_async import open_store
from pforge_async.integrations.langgraph import PforgeSaver

class State(TypedDict, total=False):
    log: Annotated[list[str], operator.add]

def node(name):
    async def run(state):
        await asyncio.sleep(0)
        return {"log": [name]}
    return run

async def main(root, proc, invokes):
    async with open_store(root, durability="normal") as store:
        builder = StateGraph(State)
        for name in ("a", "b", "c"):
            builder.add_node(name, node(name))
        builder.add_edge(START, "a"); builder.add_edge("a", "b"); builder.add_edge("b", "c"); builder.add_edge("c", END)
        graph = builder.compile(checkpointer=PforgeSaver(store))
        async def task(i):
            cfg = {"configurable": {"thread_id": f"p{proc}-t{i}"}}
            for n in range(invokes):
                out = await graph.ainvoke({"log": [f"in{n}"]}, cfg)
                assert out["log"][-4:] == [f"in{n}", "a", "b", "c"], out
        await asyncio.gather(*(task(i) for i in range(16)))
    print("ok")

asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
"""

SHARED = r"""
import asyncio, json, operator, sys
from typing import Annotated, TypedDict
from langgraph.graph import END, START, StateGraph
from pforge_async import open_store
from pforge_async.integrations.langgraph import PforgeSaver, WriterConflict

class State(TypedDict, total=False):
    log: Annotated[list[str], operator.add]

def node(name):
    async def run(state):
        await asyncio.sleep(0.05)
        return {"log": [name]}
    return run

async def main(root, proc, invokes):
    ok = conflicts = 0
    async with open_store(root, durability="normal") as store:
        builder = StateGraph(State)
        for name in ("a", "b"):
            builder.add_node(name, node(f"{proc}{name}"))
        builder.add_edge(START, "a"); builder.add_edge("a", "b"); builder.add_edge("b", END)
        graph = builder.compile(checkpointer=PforgeSaver(store))
        cfg = {"configurable": {"thread_id": "shared"}}
        await graph.aget_state(cfg)
        print("ready", flush=True)
        sys.stdin.readline()
        for n in range(invokes):
            try:
                await graph.ainvoke({"log": [f"{proc}in{n}"]}, cfg)
                ok += 1
            except WriterConflict:
                conflicts += 1
    print(json.dumps({"ok": ok, "conflicts": conflicts}))

asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
"""


async def test_four_processes_sixteen_threads_each(tmp_path: Path) -> None:
    root = tmp_path / "store"
    invokes = 3
    async with open_store(root):  # made first: concurrent first opens of one root race (see the report)
        pass
    outputs = run_all([spawn(DISTINCT, root, proc, invokes) for proc in range(4)], timeout=300)
    assert [out.strip() for out in outputs] == ["ok"] * 4
    async with open_store(root) as store:
        saver = PforgeSaver(store)
        for proc in range(4):
            for i in range(16):
                cfg: Any = {"configurable": {"thread_id": f"p{proc}-t{i}"}}
                latest = await saver.aget_tuple(cfg)
                assert latest is not None
                expected = [x for n in range(invokes) for x in (f"in{n}", "a", "b", "c")]
                assert latest.checkpoint["channel_values"]["log"] == expected
                history = [t async for t in saver.alist(cfg)]
                assert len(history) == invokes * 5  # input + 3 nodes + the loop's first, per invoke
        assert (await store.check()).ok


async def test_two_processes_on_one_thread(tmp_path: Path) -> None:
    root = tmp_path / "store"
    async with open_store(root):
        pass
    procs = [spawn(SHARED, root, proc, 6, stdin=subprocess.PIPE) for proc in range(2)]
    for proc in procs:
        wait_for_line(proc, "ready", timeout=120)
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    outputs = [json.loads(out) for out in run_all(procs, timeout=300)]
    assert sum(o["conflicts"] for o in outputs) >= 1, outputs  # the second writer was told
    async with open_store(root) as store:
        history = [t async for t in PforgeSaver(store).alist({"configurable": {"thread_id": "shared"}})]
    # one chain: newest first, each checkpoint's parent is the next one; no parent has two children
    ids = [t.checkpoint["id"] for t in history]
    parents = [t.parent_config["configurable"]["checkpoint_id"] if t.parent_config else None for t in history]
    assert parents == [*ids[1:], None]
    # each state grew from its parent's (the log only appends): nothing written on a stale state
    logs = [t.checkpoint["channel_values"].get("log", []) for t in history]
    for child, parent in itertools.pairwise(logs):
        assert child[: len(parent)] == parent
    completed = [log for log in logs if log and log[-1].endswith("b")]
    assert sum(o["ok"] for o in outputs) <= len(completed)
