"""A real LangGraph graph on PforgeSaver gives what it gives on InMemorySaver: a graph with a subgraph,
an interrupt inside the subgraph and its resume, ``update_state`` on an old checkpoint (a branch), a
run of that branch, and a replay from history. On the SQLite store the store is closed and opened
again between the phases, so what is compared is what was stored. LangGraph's sync API goes through
the saver's bridge to the store's event loop."""

from __future__ import annotations

import operator
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, TypedDict

import pytest
from langchain_core.messages import AIMessage, AnyMessage, BaseMessage, HumanMessage
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.types import Command, interrupt

from pforge_async import InvalidInput, MemoryTurnStore, open_store
from pforge_async.integrations.langgraph import PforgeSaver

pytestmark = pytest.mark.anyio


class State(TypedDict, total=False):
    log: Annotated[list[str], operator.add]
    messages: Annotated[list[AnyMessage], add_messages]
    answer: str


def build(checkpointer: BaseCheckpointSaver[Any]) -> Any:
    def s1(state: State) -> State:
        return {"log": ["s1"]}

    def s2(state: State) -> State:
        answer = interrupt({"question": "go on?", "seen": len(state.get("log", []))})
        return {"log": [f"s2:{answer}"], "answer": str(answer)}

    sub = StateGraph(State)
    sub.add_node("s1", s1)
    sub.add_node("s2", s2)
    sub.add_edge(START, "s1")
    sub.add_edge("s1", "s2")
    sub.add_edge("s2", END)

    def a(state: State) -> State:
        return {"log": ["a"], "messages": [AIMessage(f"a saw {len(state.get('messages', []))} messages")]}

    def b(state: State) -> State:
        return {"log": [f"b:{state.get('answer')}"], "messages": [AIMessage("done " + "x" * 200)]}

    main = StateGraph(State)
    main.add_node("a", a)
    main.add_node("sub", sub.compile())
    main.add_node("b", b)
    main.add_edge(START, "a")
    main.add_edge("a", "sub")
    main.add_edge("sub", "b")
    main.add_edge("b", END)
    return main.compile(checkpointer=checkpointer)


def _values(values: Any) -> Any:
    if isinstance(values, dict):
        return {k: _values(v) for k, v in sorted(values.items())}
    if isinstance(values, list):
        return [_values(v) for v in values]
    if isinstance(values, BaseMessage):
        return (type(values).__name__, values.content)
    if hasattr(values, "value") and type(values).__name__ == "Interrupt":
        return ("Interrupt", _values(values.value))
    return values


def _snapshot(state: Any) -> Any:
    return {
        "values": _values(state.values),
        "next": state.next,
        "source": state.metadata.get("source") if state.metadata else None,
        "step": state.metadata.get("step") if state.metadata else None,
        "interrupts": [_values(i.value) for i in state.interrupts],
        "tasks": [(t.name, _values(list(t.interrupts))) for t in state.tasks],
        "has_parent": state.parent_config is not None,
    }


Phase = Callable[[], AbstractAsyncContextManager[BaseCheckpointSaver[Any]]]


async def scenario(open_saver: Phase) -> list[Any]:
    """The transcript: what each step returned, states and histories, ids left out."""
    out: list[Any] = []
    cfg: dict[str, Any] = {"configurable": {"thread_id": "t-1"}}
    async with open_saver() as saver:
        graph = build(saver)
        result = await graph.ainvoke({"log": ["start"], "messages": [HumanMessage("hi")]}, cfg)
        out.append(("first run", _values(result)))
        state = await graph.aget_state(cfg, subgraphs=True)
        out.append(("interrupted", _snapshot(state)))
        sub_states = [_snapshot(t.state) for t in state.tasks if t.state is not None]
        out.append(("subgraph state", sub_states))
    async with open_saver() as saver:
        graph = build(saver)
        result = await graph.ainvoke(Command(resume="yes"), cfg)
        out.append(("resumed", _values(result)))
        history = [s async for s in graph.aget_state_history(cfg)]
        out.append(("history", [_snapshot(s) for s in history]))
        # update_state on an old checkpoint: the one where the subgraph is about to run
        old = next(s for s in history if s.next == ("sub",))
        branch = await graph.aupdate_state(old.config, {"log": ["edited"]})
        out.append(("branch state", _snapshot(await graph.aget_state(branch))))
    async with open_saver() as saver:
        graph = build(saver)
        result = await graph.ainvoke(None, branch)
        out.append(("branch run", _values(result)))
        result = await graph.ainvoke(Command(resume="no"), cfg)
        out.append(("branch resumed", _values(result)))
        history = [s async for s in graph.aget_state_history(cfg)]
        out.append(("history after branch", [_snapshot(s) for s in history]))
        # replay from history: the checkpoint right after node "a" ran on the first run
        first_a = [s for s in history if s.next == ("sub",) and s.metadata and s.metadata.get("source") == "loop"][-1]
        result = await graph.ainvoke(None, first_a.config)
        out.append(("replay", _values(result)))
        result = await graph.ainvoke(Command(resume="again"), cfg)
        out.append(("replay resumed", _values(result)))
        out.append(("final", _snapshot(await graph.aget_state(cfg))))
        out.append(("history length", len([s async for s in graph.aget_state_history(cfg)])))
        out.append(("filtered", len([s async for s in graph.aget_state_history(cfg, filter={"source": "update"})])))
        limited = [s async for s in graph.aget_state_history(cfg, limit=2)]
        out.append(("limited", [_snapshot(s)["values"] for s in limited]))
    return out


async def test_graph_same_as_in_memory_saver(tmp_path: Path) -> None:
    reference = InMemorySaver()

    @asynccontextmanager
    async def in_memory() -> AsyncIterator[BaseCheckpointSaver[Any]]:
        yield reference

    expected = await scenario(in_memory)
    assert ("interrupted", expected[1][1]) == expected[1] and expected[1][1]["next"] == ("sub",)
    assert any(step == "branch run" for step, _ in expected)

    turns = MemoryTurnStore()

    @asynccontextmanager
    async def memory() -> AsyncIterator[BaseCheckpointSaver[Any]]:
        yield PforgeSaver(turns)

    assert await scenario(memory) == expected

    @asynccontextmanager
    async def sqlite() -> AsyncIterator[BaseCheckpointSaver[Any]]:
        async with open_store(tmp_path / "store", durability="normal") as store:  # a fresh open each phase
            yield PforgeSaver(store)

    assert await scenario(sqlite) == expected

    @asynccontextmanager
    async def from_path() -> AsyncIterator[BaseCheckpointSaver[Any]]:
        async with PforgeSaver.from_path(str(tmp_path / "owned"), durability="normal") as saver:
            yield saver

    assert await scenario(from_path) == expected


def test_sync_api_through_the_bridge(tmp_path: Path) -> None:
    """``graph.invoke`` (sync) on a saver from ``with PforgeSaver.from_path(...)``: the store runs on
    a loop of its own; results equal InMemorySaver's."""

    def run(saver: BaseCheckpointSaver[Any]) -> list[Any]:
        graph = build(saver)
        cfg: dict[str, Any] = {"configurable": {"thread_id": "sync"}}
        out = [_values(graph.invoke({"log": ["start"]}, cfg))]
        out.append(_values(graph.invoke(Command(resume="ok"), cfg)))
        out.append([_snapshot(s) for s in graph.get_state_history(cfg)])
        return out

    expected = run(InMemorySaver())
    with PforgeSaver.from_path(str(tmp_path / "store"), durability="normal") as saver:
        assert run(saver) == expected
        assert saver.get_tuple({"configurable": {"thread_id": "sync"}}) is not None
    # and again, the store reopened: everything is still there
    with PforgeSaver.from_path(str(tmp_path / "store"), durability="normal") as saver:
        graph = build(saver)
        assert [_snapshot(s) for s in graph.get_state_history({"configurable": {"thread_id": "sync"}})] == expected[2]


async def test_sync_call_from_the_loop_thread_is_refused() -> None:
    saver = PforgeSaver(MemoryTurnStore())
    with pytest.raises(InvalidInput, match=r"await PforgeSaver\.aget_tuple"):
        saver.get_tuple({"configurable": {"thread_id": "x"}})
    # from another thread it is served by the loop
    results: list[Any] = []

    def other() -> None:
        results.append(saver.get_tuple({"configurable": {"thread_id": "x"}}))

    import anyio

    def start_and_join() -> None:
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()

    await anyio.to_thread.run_sync(start_and_join)
    assert results == [None]
