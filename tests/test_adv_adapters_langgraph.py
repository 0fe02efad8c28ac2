"""PforgeSaver against hostile input: what a graph can hand the checkpointer through LangGraph's API
is either stored so that every read gives it back, or refused with a named error, nothing stored,
the thread (and every other thread) still readable."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest
from langgraph.checkpoint.base import Checkpoint, CheckpointMetadata
from langgraph.checkpoint.base.id import uuid6

from pforge_async import InvalidInput, MemoryTurnStore, open_store
from pforge_async.integrations.langgraph import PforgeSaver

pytestmark = pytest.mark.anyio


def checkpoint(values: dict[Any, Any]) -> Checkpoint:
    return Checkpoint(
        v=4,
        id=str(uuid6(clock_seq=-1)),
        ts="2026-01-01T00:00:00+00:00",
        channel_values=values,
        channel_versions={k: 1 for k in values},
        versions_seen={},
        updated_channels=None,
    )


def meta(step: int = 0) -> CheckpointMetadata:
    return {"source": "loop", "step": step, "parents": {}}  # type: ignore[typeddict-item]


def cfg(thread: str, checkpoint_id: Any = None, ns: str = "") -> Any:
    conf: dict[str, Any] = {"thread_id": thread, "checkpoint_ns": ns}
    if checkpoint_id is not None:
        conf["checkpoint_id"] = checkpoint_id
    return {"configurable": conf}


async def everything(saver: PforgeSaver) -> list[tuple[str, Any, list[Any]]]:
    return [
        (t.config["configurable"]["thread_id"], t.checkpoint["channel_values"], t.pending_writes)
        async for t in saver.alist(None)
    ]


async def test_non_str_fields_are_refused_before_anything_is_stored() -> None:
    """A non-str parent id, channel name, writes' checkpoint id, task id, task path or write channel
    was stored as given, and the log's typed decoder then refused the turn: every read of the thread,
    and alist(None) over every thread, raised IntegrityError for good."""
    saver = PforgeSaver(MemoryTurnStore())
    good = await saver.aput(cfg("good"), checkpoint({"a": 1}), meta(), {"a": 1})
    await saver.aput_writes(good, [("a", 2)], "task")
    before = await everything(saver)
    assert before == [("good", {"a": 1}, [("task", "a", 2)])]
    cid = good["configurable"]["checkpoint_id"]
    hostile = [
        saver.aput(cfg("bad", 123), checkpoint({"a": 1}), meta(), {"a": 1}),
        saver.aput(cfg("bad"), checkpoint({5: 1}), meta(), {5: 1}),
        saver.aput_writes(cfg("bad", 7), [("a", 1)], "task"),
        saver.aput_writes(cfg("bad", cid), [("a", 1)], 5),  # type: ignore[arg-type]
        saver.aput_writes(cfg("bad", cid), [("a", 1)], "task", None),  # type: ignore[arg-type]
        saver.aput_writes(cfg("bad", cid), [(3, 1)], "task"),  # type: ignore[list-item]
    ]
    for call in hostile:
        with pytest.raises(InvalidInput):
            await call
    assert await everything(saver) == before
    assert await saver.aget_tuple(cfg("bad")) is None
    # the thread refused nothing it should take: a good write to it is stored and read back
    stored = await saver.aput(cfg("bad"), checkpoint({"b": 1}), meta(), {"b": 1})
    got = await saver.aget_tuple(stored)
    assert got is not None and got.checkpoint["channel_values"] == {"b": 1}


async def test_alist_takes_configs_as_the_framework_savers_do() -> None:
    """An empty config or ``before`` ({}: falsy) is no filter to InMemorySaver and SqliteSaver; alist
    raised KeyError on them. A config missing its thread_id, or with a non-str checkpoint_ns, raised
    KeyError/TypeError instead of the named error aget_tuple gives."""
    saver = PforgeSaver(MemoryTurnStore())
    await saver.aput(cfg("t1"), checkpoint({"a": 1}), meta(), {"a": 1})
    await saver.aput(cfg("t2", ns="child:1"), checkpoint({"a": 2}), meta(), {"a": 2})
    every = [t.config["configurable"]["thread_id"] async for t in saver.alist(None)]
    assert sorted(every) == ["t1", "t2"]
    assert sorted([t.config["configurable"]["thread_id"] async for t in saver.alist({})]) == sorted(every)  # type: ignore[typeddict-item]
    in_t1 = [t.config["configurable"]["thread_id"] async for t in saver.alist(cfg("t1"), before={})]  # type: ignore[typeddict-item]
    assert in_t1 == ["t1"]
    for config in ({"configurable": {}}, {"configurable": {"thread_id": "t1", "checkpoint_ns": 5}}):
        with pytest.raises(InvalidInput):
            [t async for t in saver.alist(config)]  # type: ignore[arg-type]
    with pytest.raises(InvalidInput):
        [t async for t in saver.alist(cfg("t1"), before=cfg("t1", 5))]


async def test_an_empty_checkpoint_id_names_the_latest() -> None:
    """A config whose checkpoint_id is "" names the latest checkpoint to LangGraph's own savers (they
    test its truth); aget_tuple found nothing and alist filtered everything out. A non-str id names
    no checkpoint (it raised TypeError)."""
    saver = PforgeSaver(MemoryTurnStore())
    stored = await saver.aput(cfg("t"), checkpoint({"a": 1}), meta(), {"a": 1})
    latest = await saver.aget_tuple(cfg("t", ""))
    assert latest is not None and latest.config == stored
    assert [t.config async for t in saver.alist(cfg("t", ""))] == [stored]
    assert await saver.aget_tuple(cfg("t", 5)) is None
    assert [t async for t in saver.alist(cfg("t", 5))] == []


class DeletingStore(MemoryTurnStore):
    """Deletes the context a batch is for just before the batch (once armed): another task's
    adelete_thread landing between a rewrite's read and its write."""

    armed = False

    async def append_turns(self, turns: Any, **kwargs: Any) -> Any:
        if self.armed:
            self.armed = False
            await self.delete_context(turns[0].context_id)
        return await super().append_turns(turns, **kwargs)


async def test_a_thread_deleted_while_it_is_rewritten() -> None:
    """A thread deleted between a prune's (or delete_for_runs') read and its write made the call raise
    ContextNotFound: delete_for_runs stopped there, leaving the threads after it untouched. A thread
    deleted meanwhile is one with nothing to prune, as an unknown one is."""
    turns = DeletingStore()
    saver = PforgeSaver(turns)
    for thread in ("a", "b"):
        parent = None
        for step in range(3):
            stored = await saver.aput(cfg(thread, parent), checkpoint({"s": step}), meta(step), {"s": step + 1})
            parent = stored["configurable"]["checkpoint_id"]
    turns.armed = True
    await saver.aprune(["a"])
    assert await saver.aget_tuple(cfg("a")) is None
    assert len([t async for t in saver.alist(cfg("b"))]) == 3
    run_meta: Any = {**meta(9), "run_id": "run-1"}
    for thread in ("c", "d"):
        await saver.aput(cfg(thread), checkpoint({"s": 9}), run_meta, {"s": 1})
        await saver.aput(cfg(thread), checkpoint({"s": 10}), meta(10), {"s": 2})
    turns.armed = True  # the first thread rewritten ("b" has no run-1: "c") goes meanwhile
    await saver.adelete_for_runs(["run-1"])
    assert await saver.aget_tuple(cfg("c")) is None
    left = [t.metadata.get("run_id") async for t in saver.alist(cfg("d"))]
    assert left == [None]
    assert len([t async for t in saver.alist(cfg("b"))]) == 3


async def test_values_whose_blobs_gc_collected_are_stored_again(tmp_path: Path) -> None:
    """The saver remembers the blobs it stored, for good: once a deleted thread's blobs were
    collected by gc, every put or write of a value with the same content (a common prompt in a new
    thread, a resume from the deleted thread's config) named a blob no longer stored and was refused
    (ObjectNotFound), however often retried, until the saver was made again."""
    async with open_store(tmp_path / "store", durability="normal") as store:
        saver = PforgeSaver(store)
        prompt = {"doc": "z" * 5_000, "chat": [f"message {i} " * 20 for i in range(20)]}
        gone = await saver.aput(cfg("gone"), checkpoint(prompt), meta(), {"doc": 1, "chat": 1})
        await saver.aput_writes(gone, [("doc", "w" * 100_000)], "task")
        await saver.adelete_thread("gone")
        await saver.aput(cfg("other"), checkpoint({"n": 1}), meta(), {"n": 1})  # gc keeps the newest turn
        await anyio.sleep(2.1)  # the store stamps times to the second: past a whole second, grace 0 takes it
        report = await store.gc(grace_s=0)
        assert report.cas.objects_reclaimed >= 3
        # a put after the deleted thread's last checkpoint (its config kept) carries its values on
        resumed = await saver.aput(cfg("gone", gone["configurable"]["checkpoint_id"]), checkpoint(prompt), meta(1), {})
        new = await saver.aput(cfg("new"), checkpoint(prompt), meta(), {"doc": 1, "chat": 1})
        await saver.aput_writes(new, [("doc", "w" * 100_000)], "task")
        for config in (new, resumed):
            got = await PforgeSaver(store).aget_tuple(config)
            assert got is not None and got.checkpoint["channel_values"] == prompt
        got = await PforgeSaver(store).aget_tuple(new)
        assert got is not None and got.pending_writes == [("task", "doc", "w" * 100_000)]
        assert (await store.check()).problems == []


async def test_a_copy_it_made_is_not_another_writer() -> None:
    """A saver that had seen the target thread absent, then copied a thread to it, refused its own
    next put to the copy with WriterConflict (it expected the thread still empty): the copy is its
    own write."""
    saver = PforgeSaver(MemoryTurnStore())
    source = await saver.aput(cfg("src"), checkpoint({"a": 1}), meta(), {"a": 1})
    assert await saver.aget_tuple(cfg("dst")) is None
    await saver.acopy_thread("src", "dst")
    parent = source["configurable"]["checkpoint_id"]
    stored = await saver.aput(cfg("dst", parent), checkpoint({"a": 2}), meta(1), {"a": 2})
    assert [t.config async for t in saver.alist(cfg("dst"))][:1] == [stored]
    assert len([t async for t in saver.alist(cfg("dst"))]) == 2
    assert len([t async for t in saver.alist(cfg("src"))]) == 1


async def test_a_foreign_context_under_the_prefix_is_named() -> None:
    """A context under the saver's prefix that it never makes (a session given the same prefix) made
    alist(None) raise ValueError from parsing its name; it is an IntegrityError naming it, as a
    foreign turn is."""
    from pforge_async import IntegrityError
    from pforge_async.integrations.openai_agents import PforgeSession

    turns = MemoryTurnStore()
    saver = PforgeSaver(turns)
    await saver.aput(cfg("t"), checkpoint({"a": 1}), meta(), {"a": 1})
    await PforgeSession("x", turns, prefix="langgraph").add_items([{"a": 1}])
    with pytest.raises(IntegrityError, match="langgraph/x"):
        [t async for t in saver.alist(None)]
    assert len([t async for t in saver.alist(cfg("t"))]) == 1


async def test_a_checkpoint_naming_more_blobs_than_a_turn_holds() -> None:
    """A turn names at most 4,096 blobs: a checkpoint with more channel values past the inline size
    (a wide graph) was refused with InvalidInput, so the graph could not checkpoint at all where
    LangGraph's own savers store it. The values past the limit are kept inline."""
    saver = PforgeSaver(MemoryTurnStore())
    values = {f"c{i}": "v" * 100 + str(i) for i in range(5_000)}
    values["chat"] = [f"message {i}" for i in range(40)]
    stored = await saver.aput(cfg("wide"), checkpoint(values), meta(), {k: 1 for k in values})
    got = await saver.aget_tuple(stored)
    assert got is not None and got.checkpoint["channel_values"] == values
    # the next checkpoint carries most of them on and changes a few
    changed = {**values, "c7": "changed " * 20, "chat": [*values["chat"], "one more"]}
    versions = {k: 1 for k in values} | {"c7": 2, "chat": 2}
    cp = checkpoint(changed)
    cp["channel_versions"] = versions
    again = await saver.aput(stored, cp, meta(1), {"c7": 2, "chat": 2})
    got = await PforgeSaver(saver._backing.fixed).aget_tuple(again)  # type: ignore[arg-type]
    assert got is not None and got.checkpoint["channel_values"] == changed
