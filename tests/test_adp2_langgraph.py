"""PforgeSaver against LangGraph's own savers where they set the contract, and its second-writer
detection when the saver has tracked more namespaces than it keeps whole (10,000): a namespace dropped
from its tracking still goes on from the head it saw, so another writer is still a WriterConflict, a
read still refreshes, and a deletion is still refused as it would be."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from langgraph.checkpoint.base import Checkpoint, CheckpointMetadata
from langgraph.checkpoint.base.id import uuid6
from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

from pforge_async import ContextNotFound, MemoryTurnStore, open_store
from pforge_async.integrations.langgraph import PforgeSaver, WriterConflict

pytestmark = pytest.mark.anyio

#: more namespaces than a saver keeps whole
MANY = 10_001


def checkpoint(value: Any) -> Checkpoint:
    return Checkpoint(
        v=4,
        id=str(uuid6(clock_seq=-1)),
        ts="2026-01-01T00:00:00+00:00",
        channel_values={"a": value},
        channel_versions={"a": 1},
        versions_seen={},
        updated_channels=None,
    )


def meta(step: int = 0) -> CheckpointMetadata:
    return {"source": "loop", "step": step, "parents": {}}  # type: ignore[typeddict-item]


def cfg(thread: str) -> Any:
    return {"configurable": {"thread_id": thread, "checkpoint_ns": ""}}


async def touch_many(saver: PforgeSaver) -> None:
    """Make the saver track MANY other namespaces after the ones a test cares about."""
    for i in range(MANY):
        await saver.aput(cfg(f"other-{i}"), checkpoint(i), meta(), {"a": 1})


async def test_a_second_writer_is_detected_after_many_namespaces() -> None:
    """Past 10,000 namespaces the saver forgot the oldest and, for it, took whatever head the store
    had at its next write as its own: a second writer's checkpoint went unnoticed (a silent fork)."""
    turns = MemoryTurnStore()
    mine, other = PforgeSaver(turns), PforgeSaver(turns)
    first = await mine.aput(cfg("t"), checkpoint(1), meta(), {"a": 1})
    await mine.aput_writes(first, [("a", 2)], "task")
    await other.aput(cfg("read"), checkpoint(0), meta(), {"a": 1})
    seen = await mine.aget_tuple(cfg("read"))  # last seen by a read that found another writer's head
    assert seen is not None
    await touch_many(mine)

    await other.aget_tuple(cfg("t"))
    await other.aput(first, checkpoint(2), meta(1), {"a": 2})
    with pytest.raises(WriterConflict):
        await mine.aput(first, checkpoint(3), meta(1), {"a": 3})
    with pytest.raises(WriterConflict):
        await mine.aput_writes(first, [("a", 4)], "task")
    await other.aput(cfg("read"), checkpoint(5), meta(1), {"a": 5})
    with pytest.raises(WriterConflict):
        await mine.aput(seen.config, checkpoint(6), meta(1), {"a": 6})

    # as when tracked: a read takes what is there, and the next write goes on from it
    latest = await mine.aget_tuple(cfg("t"))
    assert latest is not None and latest.checkpoint["channel_values"] == {"a": 2}
    await mine.aput(latest.config, checkpoint(7), meta(2), {"a": 7})
    after = await other.aget_tuple(cfg("t"))
    assert after is not None and after.checkpoint["channel_values"] == {"a": 7}


async def test_no_conflict_where_nothing_else_wrote() -> None:
    """The other side: a namespace dropped from tracking that nobody else touched (or that this
    saver read after another writer, before the drop) takes this saver's next write."""
    turns = MemoryTurnStore()
    mine, other = PforgeSaver(turns), PforgeSaver(turns)
    first = await mine.aput(cfg("t"), checkpoint(1), meta(), {"a": 1})
    await other.aput(cfg("handed-over"), checkpoint(1), meta(), {"a": 1})
    handed = await mine.aget_tuple(cfg("handed-over"))
    assert handed is not None
    await touch_many(mine)
    second = await mine.aput(first, checkpoint(2), meta(1), {"a": 2})
    await mine.aput_writes(second, [("a", 3)], "task")
    await mine.aput(handed.config, checkpoint(4), meta(1), {"a": 4})
    got = await other.aget_tuple(cfg("t"))
    assert got is not None and got.checkpoint["channel_values"] == {"a": 2}
    assert got.pending_writes == [("task", "a", 3)]
    got = await other.aget_tuple(cfg("handed-over"))
    assert got is not None and got.checkpoint["channel_values"] == {"a": 4}


async def test_a_deletion_is_refused_as_when_tracked() -> None:
    """A thread deleted (and started again) by another saver after this one dropped it from
    tracking: this saver's next write went into the new thread as if it were its own; a tracked one
    gets ContextNotFound. Both now get it, then start afresh like a tracked one."""
    turns = MemoryTurnStore()
    mine, other = PforgeSaver(turns), PforgeSaver(turns)
    dropped = await mine.aput(cfg("dropped"), checkpoint(1), meta(), {"a": 1})
    await touch_many(mine)
    kept = await mine.aput(cfg("kept"), checkpoint(1), meta(), {"a": 1})
    for thread in ("dropped", "kept"):
        await other.adelete_thread(thread)
        await other.aput(cfg(thread), checkpoint("theirs"), meta(), {"a": 1})
    for config in (dropped, kept):
        with pytest.raises(ContextNotFound, match="deleted"):
            await mine.aput(config, checkpoint("mine"), meta(1), {"a": 2})
        thread = config["configurable"]["thread_id"]
        got = await other.aget_tuple(cfg(thread))
        assert got is not None and got.checkpoint["channel_values"] == {"a": "theirs"}


async def test_many_large_writes_of_one_task_as_the_sqlite_saver_takes_them(tmp_path: Path) -> None:
    """aput_writes of 400 values of 60 KiB each: each value was inline (up to 64 KiB), their turn was
    24 MiB, over the store's 16 MiB payload bound, and the call was InvalidInput; AsyncSqliteSaver
    stores them. Inline values now share a budget and the rest are blobs: all 400 read back."""
    writes = [("c", f"{i}:" + "y" * (60 << 10)) for i in range(400)]
    async with AsyncSqliteSaver.from_conn_string(str(tmp_path / "lg.db")) as sqlite:
        stored = await sqlite.aput(cfg("t"), checkpoint(1), meta(), {"a": 1})
        await sqlite.aput_writes(stored, writes, "task")
        expected = await sqlite.aget_tuple(cfg("t"))
    assert expected is not None and len(expected.pending_writes) == 400
    async with open_store(tmp_path / "store", durability="normal") as store:
        for saver in (PforgeSaver(store), PforgeSaver(MemoryTurnStore())):
            stored = await saver.aput(cfg("t"), checkpoint(1), meta(), {"a": 1})
            await saver.aput_writes(stored, writes, "task")
            got = await saver.aget_tuple(cfg("t"))
            assert got is not None and got.pending_writes == expected.pending_writes
            listed = [t async for t in saver.alist(cfg("t"))]
            assert [t.pending_writes for t in listed] == [expected.pending_writes]
