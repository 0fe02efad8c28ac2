"""PforgeSaver beyond the conformance suite: values stored once, writes that land before their
checkpoint, O(1) copies, a second writer refused, names that cannot collide, argument errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
from langgraph.checkpoint.base import Checkpoint, CheckpointMetadata
from langgraph.checkpoint.base.id import uuid6

from pforge_async import Conflict, ContextNotFound, InvalidInput, MemoryTurnStore, open_store
from pforge_async.integrations.langgraph import PforgeSaver, WriterConflict

pytestmark = pytest.mark.anyio


class CountingStore(MemoryTurnStore):
    """Counts what reaches the store."""

    def __init__(self) -> None:
        super().__init__()
        self.blobs: list[int] = []
        self.appended = 0
        self.forks = 0

    async def put_blob(self, data: bytes) -> str:
        self.blobs.append(len(data))
        return await super().put_blob(data)

    async def append_turn(self, *args: Any, **kwargs: Any) -> Any:
        self.appended += 1
        return await super().append_turn(*args, **kwargs)

    async def append_turns(self, *args: Any, **kwargs: Any) -> Any:
        self.appended += len(args[0])
        return await super().append_turns(*args, **kwargs)

    async def fork_context(self, *args: Any, **kwargs: Any) -> Any:
        self.forks += 1
        return await super().fork_context(*args, **kwargs)


def checkpoint(values: dict[str, Any], versions: dict[str, Any]) -> Checkpoint:
    return Checkpoint(
        v=4,
        id=str(uuid6(clock_seq=-1)),
        ts="2026-01-01T00:00:00+00:00",
        channel_values=values,
        channel_versions=versions,
        versions_seen={},
        updated_channels=None,
    )


def meta(step: int, **extra: Any) -> CheckpointMetadata:
    return {"source": "loop", "step": step, "parents": {}, **extra}  # type: ignore[typeddict-item]


def cfg(thread: str, ns: str = "", checkpoint_id: str | None = None) -> Any:
    conf: dict[str, Any] = {"thread_id": thread, "checkpoint_ns": ns}
    if checkpoint_id:
        conf["checkpoint_id"] = checkpoint_id
    return {"configurable": conf}


async def put_chain(saver: PforgeSaver, thread: str, values: list[dict[str, Any]], ns: str = "") -> list[Any]:
    stored = []
    parent: str | None = None
    previous: dict[str, Any] = {}
    versions: dict[str, int] = {}
    for step, vals in enumerate(values):
        new: dict[str, Any] = {k: versions.get(k, 0) + 1 for k, v in vals.items() if previous.get(k, object()) != v}
        versions.update(new)
        cp = checkpoint(vals, dict(versions))
        stored.append(await saver.aput(cfg(thread, ns, parent), cp, meta(step), new))
        parent = cp["id"]
        previous = vals
    return stored


async def test_an_unchanged_value_is_stored_once() -> None:
    turns = CountingStore()
    saver = PforgeSaver(turns)
    big = {"doc": "x" * 10_000}
    await put_chain(saver, "t", [{"big": big, "n": i} for i in range(6)])
    assert sum(1 for size in turns.blobs if size > 10_000) == 1
    # a second saver (a restarted process: no cache) still finds the same blob, stored once
    other = PforgeSaver(turns)
    latest = await other.aget_tuple(cfg("t"))
    assert latest is not None and latest.checkpoint["channel_values"] == {"big": big, "n": 5}
    await put_chain(other, "u", [{"big": big}])
    assert sum(1 for size in turns.blobs if size > 10_000) == 1  # it read the blob: known stored
    third = PforgeSaver(turns)
    await put_chain(third, "v", [{"big": big}])
    assert sum(1 for size in turns.blobs if size > 10_000) == 2  # offered again by a saver that never saw it...
    assert len([b for b in turns._core.blobs.values() if len(b) > 10_000]) == 1  # ...kept once


async def test_a_growing_list_stores_its_chunks_once() -> None:
    turns = CountingStore()
    saver = PforgeSaver(turns)
    messages = [{"role": "user", "content": f"message {i} " + "y" * 100} for i in range(200)]
    steps = [{"messages": messages[: n + 1]} for n in range(200)]
    stored = await put_chain(saver, "chat", steps)
    whole = sum(len(str(m)) for m in messages)
    # storing the whole list at every step would write ~100x the list in blobs; its full chunks are
    # written once (the changing last chunk is inline in the checkpoint that changed it)
    assert sum(turns.blobs) < 1.2 * whole, (sum(turns.blobs), whole)
    chat = await turns.find_context("langgraph/4:chat/")
    assert chat is not None
    payloads = 0
    async for record in turns.iter_turns(chat.context_id):
        payloads += len(record.payload)
    # against the whole list at every step (what a saver storing full checkpoints writes): a fraction
    quadratic = sum(whole * (n + 1) / len(messages) for n in range(len(messages)))
    assert payloads + sum(turns.blobs) < 0.2 * quadratic, (payloads, sum(turns.blobs), quadratic)
    for step in (0, 15, 16, 17, 100, 199):
        got = await saver.aget_tuple(stored[step])
        assert got is not None and got.checkpoint["channel_values"]["messages"] == messages[: step + 1]
    # carried unchanged into a new checkpoint, the inline tail stays inline once (a run's input
    # checkpoint does that, and its first node changes the list), and becomes a blob the second time
    versions = {"messages": 200}
    for carry, blobs_after in ((1, len(turns.blobs)), (2, len(turns.blobs) + 1), (3, len(turns.blobs) + 1)):
        cp = checkpoint({"messages": messages, "other": carry}, {**versions, "other": carry})
        again = await saver.aput(stored[-1], cp, meta(199 + carry), {"other": carry})
        stored.append(again)
        assert len(turns.blobs) == blobs_after, carry
        got = await PforgeSaver(turns).aget_tuple(again)
        assert got is not None and got.checkpoint["channel_values"]["messages"] == messages


class CountingSerde:
    """LangGraph's serializer, counting the list items it serializes."""

    def __init__(self) -> None:
        from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer

        self.inner = JsonPlusSerializer()
        self.items = 0

    def dumps_typed(self, obj: Any) -> tuple[str, bytes]:
        if isinstance(obj, list):
            self.items += len(obj)
        return self.inner.dumps_typed(obj)

    def loads_typed(self, data: tuple[str, bytes]) -> Any:
        return self.inner.loads_typed(data)


async def test_a_list_read_back_is_not_serialized_again() -> None:
    """A run starts by reading its thread's latest checkpoint: the list it carries on is made of the
    objects that read gave, so the chunks already stored are not serialized again (only the tail),
    and what is stored is still exactly the list, also when an item read back was replaced."""
    turns = MemoryTurnStore()
    messages = [{"role": "user", "content": f"m{i}"} for i in range(40)]
    stored = await put_chain(PforgeSaver(turns), "chat", [{"messages": messages}])
    serde = CountingSerde()
    reader = PforgeSaver(turns, serde=serde)  # a new process: it knows only what it reads
    latest = await reader.aget_tuple(stored[-1])
    assert latest is not None
    carried = [*latest.checkpoint["channel_values"]["messages"], {"role": "user", "content": "m40"}]
    serde.items = 0
    cp = checkpoint({"messages": carried}, {"messages": 2})
    again = await reader.aput(stored[-1], cp, meta(1), {"messages": 2})
    assert serde.items == 40 - 32 + 1  # the two full chunks of 16 were read, not serialized again
    got = await PforgeSaver(turns).aget_tuple(again)
    assert got is not None and got.checkpoint["channel_values"]["messages"] == [*messages, carried[-1]]
    # an item of a read chunk replaced by another object: that chunk is serialized again
    changed = list(carried)
    changed[3] = {"role": "user", "content": "m3, edited"}
    cp = checkpoint({"messages": changed}, {"messages": 3})
    edited = await reader.aput(again, cp, meta(2), {"messages": 3})
    got = await PforgeSaver(turns).aget_tuple(edited)
    assert got is not None and got.checkpoint["channel_values"]["messages"] == changed


async def test_writes_that_land_before_their_checkpoint() -> None:
    """LangGraph hands a task's writes over as the task finishes, while the checkpoint's put may still
    wait for the previous put: the writes can be in the log before the checkpoint."""
    saver = PforgeSaver(MemoryTurnStore())
    first = await put_chain(saver, "t", [{"a": 1}])
    cp = checkpoint({"a": 2}, {"a": 2})
    early = cfg("t", "", cp["id"])
    await saver.aput_writes(early, [("a", "early-1"), ("b", "early-2")], "task-1", "p1")
    await saver.aput_writes(cfg("t", "", first[0]["configurable"]["checkpoint_id"]), [("z", "other")], "task-0")
    stored = await saver.aput(cfg("t", "", first[0]["configurable"]["checkpoint_id"]), cp, meta(1), {"a": 2})
    await saver.aput_writes(early, [("c", "late")], "task-2", "p2")
    await saver.aput_writes(early, [("a", "ignored: task-1 idx 0 is written")], "task-1", "p1")
    expected = [("task-1", "a", "early-1"), ("task-1", "b", "early-2"), ("task-2", "c", "late")]
    first_writes: list[Any] = [("task-0", "z", "other")]

    async def check(saver: PforgeSaver) -> None:
        for config in (stored, cfg("t")):
            got = await saver.aget_tuple(config)
            assert got is not None and got.pending_writes == expected
        listed = [t async for t in saver.alist(cfg("t"))]
        assert [t.checkpoint["id"] for t in listed] == [cp["id"], first[0]["configurable"]["checkpoint_id"]]
        assert listed[0].pending_writes == expected
        assert listed[1].pending_writes == first_writes

    await check(saver)
    # many turns later, past the first page a reader looks at, the same
    for i in range(20):
        await saver.aput_writes(cfg("t", "", first[0]["configurable"]["checkpoint_id"]), [("n", i)], f"task-x{i:02}")
        first_writes.append((f"task-x{i:02}", "n", i))
    await check(saver)
    # a delete_for_runs rewrite (of another checkpoint) keeps them
    other = await saver.aput(cfg("t", "", cp["id"]), checkpoint({}, {}), meta(2, run_id="gone"), {})
    await saver.adelete_for_runs(["gone"])
    assert await saver.aget_tuple(other) is None
    got = await saver.aget_tuple(cfg("t"))
    assert got is not None and got.checkpoint["id"] == cp["id"] and got.pending_writes == expected
    # and keep_latest keeps exactly those
    await saver.aprune(["t"])
    listed = [t async for t in saver.alist(cfg("t"))]
    assert [(t.checkpoint["id"], t.pending_writes) for t in listed] == [(cp["id"], expected)]


async def test_copy_is_a_fork_per_namespace() -> None:
    turns = CountingStore()
    saver = PforgeSaver(turns)
    await put_chain(saver, "src", [{"n": i} for i in range(300)])
    await put_chain(saver, "src", [{"n": i} for i in range(5)], ns="sub:1")
    before = turns.appended
    await saver.acopy_thread("src", "dst")
    assert turns.appended == before and turns.forks == 2
    src = [(t.checkpoint["id"], t.checkpoint["channel_values"]) async for t in saver.alist(cfg("src"))]
    dst = [(t.checkpoint["id"], t.checkpoint["channel_values"]) async for t in saver.alist(cfg("dst"))]
    assert src == dst and len(dst) == 300
    # the copy goes its own way
    latest = await saver.aget_tuple(cfg("dst"))
    assert latest is not None
    await saver.aput(latest.config, checkpoint({"n": "dst only"}, {"n": 999}), meta(300), {"n": 999})
    assert len([t async for t in saver.alist(cfg("src"))]) == 300
    assert len([t async for t in saver.alist(cfg("dst"))]) == 301
    with pytest.raises(Conflict, match="thread 'dst' already has checkpoints"):
        await saver.acopy_thread("src", "dst")  # dst went its own way: not overwritten
    # a copy retried after it was done (say, its reply was lost) finds it done and changes nothing
    await saver.acopy_thread("src", "dst-2")
    forks = turns.forks
    await saver.acopy_thread("src", "dst-2")
    assert turns.forks == forks + 2  # both refused as taken, both found to be this very copy
    assert len([t async for t in saver.alist(cfg("dst-2"))]) == 300


async def test_a_second_writer_is_refused_not_forked(tmp_path: Path) -> None:
    async with open_store(tmp_path / "store", durability="normal") as store:
        one, two = PforgeSaver(store), PforgeSaver(store)
        first = await put_chain(one, "t", [{"n": 0}])
        seen = await two.aget_tuple(cfg("t"))  # the second writer reads the thread ...
        assert seen is not None
        await one.aput(first[0], checkpoint({"n": 1}, {"n": 2}), meta(1), {"n": 2})  # ... the first moves on
        with pytest.raises(WriterConflict, match=r"thread 't'.*another writer changed it"):
            await two.aput(seen.config, checkpoint({"n": "fork"}, {"n": 2}), meta(1), {"n": 2})
        with pytest.raises(WriterConflict):
            await two.aput_writes(seen.config, [("n", "fork")], "task")
        history = [t async for t in one.alist(cfg("t"))]
        assert [t.checkpoint["channel_values"]["n"] for t in history] == [1, 0]
        assert all(not t.pending_writes for t in history)
        # having read again, the second writer continues from what is there
        again = await two.aget_tuple(cfg("t"))
        assert again is not None
        await two.aput(again.config, checkpoint({"n": 2}, {"n": 3}), meta(2), {"n": 3})
        assert [t.checkpoint["channel_values"]["n"] async for t in one.alist(cfg("t"))] == [2, 1, 0]
        # a thread read while it did not exist: someone else starting it meanwhile is a conflict too
        assert await two.aget_tuple(cfg("new")) is None
        await put_chain(one, "new", [{"n": "one"}])
        with pytest.raises(WriterConflict):
            await put_chain(two, "new", [{"n": "two"}])


async def test_thread_names_do_not_collide() -> None:
    saver = PforgeSaver(MemoryTurnStore())
    threads = ["a", "a/b", "1:a", "a/", "", "t\u00e9/\u4e2d", str(uuid4())]
    for i, thread in enumerate(threads):
        await put_chain(saver, thread, [{"i": i}])
        await put_chain(saver, thread, [{"i": -i}], ns="child:1|grand:2")
    for i, thread in enumerate(threads):
        got = [t.checkpoint["channel_values"]["i"] async for t in saver.alist({"configurable": {"thread_id": thread}})]
        assert sorted(got) == sorted([i, -i])
        root = [t.checkpoint["channel_values"]["i"] async for t in saver.alist(cfg(thread))]
        assert root == [i]
    everything = [
        (t.config["configurable"]["thread_id"], t.config["configurable"]["checkpoint_ns"])
        async for t in saver.alist(None)
    ]
    assert sorted(everything) == sorted([(t, ns) for t in threads for ns in ("", "child:1|grand:2")])
    assert [t async for t in saver.alist(None, limit=3)].__len__() == 3
    # an int thread id is the str's thread, and comes back as given
    await put_chain(saver, 42, [{"i": 42}])  # type: ignore[arg-type]
    by_int = await saver.aget_tuple({"configurable": {"thread_id": 42}})
    assert by_int is not None and by_int.config["configurable"]["thread_id"] == 42


async def test_argument_errors() -> None:
    saver = PforgeSaver(MemoryTurnStore())
    with pytest.raises(InvalidInput, match="list of ids"):
        await saver.aprune("thread-1")
    with pytest.raises(InvalidInput, match="strategy"):
        await saver.aprune(["t"], strategy="keep_some")
    with pytest.raises(InvalidInput, match="list of ids"):
        await saver.adelete_for_runs("run-1")
    with pytest.raises(InvalidInput, match="thread_id"):
        await saver.aget_tuple({"configurable": {}})
    with pytest.raises(InvalidInput, match="checkpoint_id"):
        await saver.aput_writes(cfg("t"), [("a", 1)], "task")
    with pytest.raises(InvalidInput, match="prefix"):
        PforgeSaver(MemoryTurnStore(), prefix="a/b")
    with pytest.raises(InvalidInput, match="takes a Store"):
        PforgeSaver(42)  # type: ignore[arg-type]


class LosingStore(MemoryTurnStore):
    """Loses the reply of the next append (after it landed, or before it reached the store)."""

    lose: str | None = None

    async def append_turn(self, *args: Any, **kwargs: Any) -> Any:
        lose, self.lose = self.lose, None
        if lose == "before":
            raise OSError("connection lost before the write")
        record = await super().append_turn(*args, **kwargs)
        if lose == "after":
            raise OSError("connection lost after the write")
        return record


async def test_a_write_whose_outcome_was_lost() -> None:
    turns = LosingStore()
    saver = PforgeSaver(turns)
    stored = await put_chain(saver, "t", [{"n": 0}])
    for lose in ("after", "before"):
        turns.lose = lose
        with pytest.raises(OSError):
            await saver.aput_writes(stored[0], [("n", lose)], f"task-{lose}")
        # the next write learns whether it landed, and goes on either way: no false conflict
        await saver.aput_writes(stored[0], [("m", lose)], f"next-{lose}")
    got = await saver.aget_tuple(stored[0])
    assert got is not None
    assert got.pending_writes == [
        ("next-after", "m", "after"),
        ("next-before", "m", "before"),
        ("task-after", "n", "after"),
    ]
    # a lost write, then another writer's: the next write is refused
    turns.lose = "after"
    with pytest.raises(OSError):
        await saver.aput_writes(stored[0], [("n", 1)], "lost")
    await PforgeSaver(turns).aput_writes(stored[0], [("n", 2)], "someone else")
    with pytest.raises(WriterConflict):
        await saver.aput_writes(stored[0], [("n", 3)], "refused")


async def test_delete_thread_on_the_sqlite_store(tmp_path: Path) -> None:
    async with open_store(tmp_path / "store", durability="normal") as store:
        saver, elsewhere = PforgeSaver(store), PforgeSaver(store)
        big = {"doc": "z" * 5_000}
        stored = await put_chain(saver, "t", [{"big": big, "n": i} for i in range(3)])
        await put_chain(saver, "t", [{"n": 0}], ns="sub:1")
        # every checkpoint turn keeps its blobs alive: gc spares them while a live turn names them
        context = await store.turns.find_context("langgraph/1:t/")
        assert context is not None
        head = await store.turns.get_turn(context.head_turn_id)
        assert len(head.refs) == 1
        await saver.acopy_thread("t", "copy")
        assert await elsewhere.aget_tuple(cfg("t")) is not None  # another writer holds the thread
        await saver.adelete_thread("t")
        assert await store.turns.find_context("langgraph/1:t/") is None
        assert await store.turns.find_context("langgraph/1:t/sub:1") is None
        assert await saver.aget_tuple(cfg("t")) is None
        assert [t async for t in saver.alist({"configurable": {"thread_id": "t"}})] == []
        # the other writer's late write does not bring it back
        with pytest.raises(ContextNotFound, match="thread 't' was deleted"):
            await elsewhere.aput(stored[-1], checkpoint({"n": 9}, {"n": 9}), meta(9), {"n": 9})
        assert await store.turns.find_context("langgraph/1:t/") is None
        # the copy keeps everything it shared, through a gc too
        report = await store.turns.gc(grace_s=0)
        assert report is not None
        copied = await saver.aget_tuple(cfg("copy"))
        assert copied is not None and copied.checkpoint["channel_values"] == {"big": big, "n": 2}
        # and the deleting saver may start the thread afresh
        await put_chain(saver, "t", [{"n": "new"}])
        assert [t.checkpoint["channel_values"] async for t in saver.alist(cfg("t"))] == [{"n": "new"}]
        await saver.adelete_thread("never-was")


async def test_an_erased_prefix_ends_the_history() -> None:
    turns = MemoryTurnStore()
    saver = PforgeSaver(turns)
    stored = await put_chain(saver, "t", [{"n": i} for i in range(6)])
    context = await turns.find_context("langgraph/1:t/")
    assert context is not None
    await turns.prune_context(context.context_id, keep_last=2)
    got = await saver.aget_tuple(cfg("t"))
    assert got is not None and got.checkpoint["channel_values"] == {"n": 5}
    assert [t.checkpoint["channel_values"]["n"] async for t in saver.alist(cfg("t"))] == [5, 4]
    assert await saver.aget_tuple(stored[0]) is None
    await saver.aput(stored[-1], checkpoint({"n": 6}, {"n": 7}), meta(6), {"n": 7})
    assert [t.checkpoint["channel_values"]["n"] async for t in saver.alist(cfg("t"))] == [6, 5, 4]
    await saver.aprune(["t"])
    assert [t.checkpoint["channel_values"]["n"] async for t in saver.alist(cfg("t"))] == [6]


async def test_a_rewrite_larger_than_one_batch() -> None:
    """delete_for_runs keeping more turns than one atomic batch holds: built in a scratch context,
    then the head moved in one compare-and-set; the scratch context is gone after."""
    scratch_made: list[int] = []

    class Turns(MemoryTurnStore):
        async def create_context(self, *args: Any, **kwargs: Any) -> Any:
            scratch_made.append(1)
            return await super().create_context(*args, **kwargs)

    turns = Turns()
    saver = PforgeSaver(turns)
    parent: str | None = None
    for i in range(2100):
        cp = checkpoint({"n": i}, {"n": i + 1})
        run = "gone" if i == 1000 else "kept"
        stored = await saver.aput(cfg("big", "", parent), cp, meta(i, run_id=run), {"n": i + 1})
        await saver.aput_writes(stored, [("w", i)], f"task-{i}")
        parent = cp["id"]
    await saver.adelete_for_runs(["gone"])
    history = [t async for t in saver.alist(cfg("big"))]
    assert len(history) == 2099 and 1000 not in [t.checkpoint["channel_values"]["n"] for t in history]
    for t in history:
        n = t.checkpoint["channel_values"]["n"]
        assert t.pending_writes == [(f"task-{n}", "w", n)]
    everything = await turns.list_contexts(limit=100)  # named or not
    assert [c.name for c in everything.contexts] == ["langgraph/3:big/"]  # the scratch context is gone
    assert scratch_made == [1]
