"""``PforgeSaver``: a LangGraph checkpointer over any pforge_async store.

One line to switch::

    checkpointer = PforgeSaver(".pforge")                  # was: AsyncSqliteSaver.from_conn_string(...)
    graph = builder.compile(checkpointer=checkpointer)

``PforgeSaver`` takes an open :class:`~pforge_async.Store`, any turn store (``MemoryTurnStore`` for
tests, ``FsTurnStore``, ``store.turns``) or a path, opened on first use (shared by every adapter of
the event loop naming it) and closed by :meth:`PforgeSaver.aclose`. ``PforgeSaver.from_path(path)``
opens a store the saver owns: ``await`` it, or use it as ``async with`` (or ``with``, for LangGraph's
sync API: the store then runs on a loop of its own, on a daemon thread).

How a thread is stored (see :mod:`pforge_async.integrations._lglog`):

- A (thread, checkpoint namespace) is a named context, ``<prefix>/<len>:<thread_id>/<namespace>``
  (``prefix`` is ``"langgraph"`` unless given), so every namespace of a thread shares one name prefix.
- Checkpoints and pending writes are turns of its chain, in the order they were put. Channel values
  are content-addressed blobs (the CAS on the SQLite store), which each checkpoint turn names as its
  ``refs`` (so the store's ``gc`` keeps them while a live checkpoint names them): a value that did not
  change is stored once, however many checkpoints name it. A list (a chat's messages) is kept in
  chunks of 16 items: its full chunks are blobs, stored once; its last, partial chunk, which every
  append rewrites, is inline in the checkpoint that changed the list, is inline again in the first
  checkpoint that carries the list unchanged (a run's input checkpoint, before its first node
  changes the list), and becomes a blob the second time it is carried. A value whose encoding is at
  most 64 bytes is inline (its reference would be as large); so is a pending write's value up to
  64 KiB (a write belongs to one checkpoint), while one ``aput_writes``'s inline values stay within
  4 MiB (the rest are blobs, so a task's writes always fit a turn).
- Pending writes keep LangGraph's semantics: for a normal channel the first write of a (task, index)
  wins, the special channels (error, interrupt, resume, scheduled) take the last one.
- ``acopy_thread`` forks each namespace's context: O(1) per namespace, whatever the thread's length;
  the copy shares the source's turns and blobs.
- ``aprune`` and ``adelete_for_runs`` rewrite what is kept of a namespace as a new chain (one atomic
  batch; the kept values' blobs are shared, not copied) and move the head to it; what was left out is
  no longer reachable from the thread.

Several writers, several processes: each saver remembers the head it last saw of every namespace it
writes (a read, such as the one each run starts with, refreshes it) and every write compare-and-sets
that head. A second writer on the same thread, say another process running the same thread at once,
gets :class:`WriterConflict` (a ``HeadConflict``) from its write, so a run fails instead of silently
forking the history (langgraph#8796). Past the 10,000 namespaces a saver keeps whole, it keeps of the
others only the context id and head it saw (a small tuple each, until the namespace is used again or
deleted through it), so detection does not end there. Writes of one saver to one namespace are
serialized, so the concurrent ``aput_writes`` of one superstep never conflict with each other. Two runs of one thread on
one saver in one process are not told apart.

The sync methods (``get_tuple``, ``list``, ``put``, ...) hand the call to the event loop the store runs
on and wait for it; from that loop's own thread they raise ``InvalidInput`` (await the ``a*`` method
there), as ``AsyncSqliteSaver`` does.

Costs: ``aput`` and ``aput_writes`` append one turn. ``aget_tuple`` of the latest checkpoint reads from
the head back to it (the head records where it is); of a given id, from the head back to that
checkpoint, since its pending writes are the turns after it. ``alist`` walks the chain newest first,
yielding as soon as nothing older can come before. ``adelete_for_runs`` looks at every thread, as run
ids are not indexed.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import random
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, nullcontext
from types import TracebackType
from typing import Any, cast

import msgspec

from ..errors import (
    Conflict,
    ContextNotFound,
    HeadConflict,
    IntegrityError,
    InvalidInput,
    ObjectNotFound,
    TurnNotFound,
)
from ..store import DEFAULT_ROOT
from ..turnstore.base import TurnStoreBase
from ..turnstore.rules import MAX_LIST_LIMIT, MAX_REFS, split_batches
from ..turnstore.types import ContextInfo, NewTurn, TurnRecord
from . import _lglog as log
from ._blobs import INLINE, INLINE_MAX, BlobCache, ChunkMemo, Ref, ValueCodec, refs_of
from ._heads import Tracked, WriterConflict
from ._stores import Backing, StoreLike
from ._sync import LoopBridge

try:
    from langchain_core.runnables import RunnableConfig
    from langgraph.checkpoint.base import (
        WRITES_IDX_MAP,
        BaseCheckpointSaver,
        ChannelVersions,
        Checkpoint,
        CheckpointMetadata,
        CheckpointTuple,
        PendingWrite,
        get_checkpoint_id,
        get_checkpoint_metadata,
    )
    from langgraph.checkpoint.serde.base import SerializerProtocol
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "pforge_async.integrations.langgraph needs LangGraph's checkpoint package: "
        "pip install 'pforge_async[langgraph]'"
    ) from exc

__all__ = ["PforgeSaver", "WriterConflict"]

#: turns read at once when looking for the latest checkpoint (it is nearly always among them)
_QUICK = 8
_PAGE = 256
#: how often a prune or delete_for_runs re-reads a namespace another writer changed meanwhile
_REWRITE_TRIES = 8
_MAX_TRACKED = 10_000
_MAX_CHANNEL_MAPS = 4_096
#: a pending write's value up to this many bytes is kept inline (writes belong to one checkpoint)
WRITE_INLINE_MAX = 64 << 10
#: the inline values of one ``aput_writes`` together, at most (the rest are blobs)
WRITES_INLINE_TOTAL = 4 << 20

#: channel -> (its version, its reference, whether it was carried unchanged from the checkpoint before)
Channels = dict[str, tuple[Any, Ref, bool]]
_Found = tuple[log.CheckpointEntry, list[log.Write]]


class _Top(msgspec.Struct):
    """What goes with a seen head: the largest checkpoint id up to it, the depth of its turn, and the
    head's own depth."""

    top_id: str
    top_depth: int
    head_depth: int


_EMPTY = _Top("", 0, 0)


class PforgeSaver(BaseCheckpointSaver[Any]):
    """A LangGraph checkpointer (``BaseCheckpointSaver``) over a pforge_async store: see the module's
    documentation. ``store``: an open ``Store``, a turn store, or a path opened on first use (closed by
    :meth:`aclose`). ``prefix``: the first part of every context name it uses."""

    def __init__(
        self,
        store: StoreLike,
        *,
        serde: SerializerProtocol | None = None,
        prefix: str = "langgraph",
        connect_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(serde=serde)
        if not isinstance(prefix, str) or not prefix or "/" in prefix:
            raise InvalidInput(f"prefix must be a non-empty str without '/', got {prefix!r}")
        self.prefix = prefix
        self._backing = Backing(store, "PforgeSaver", connect_options)
        self._bridge = LoopBridge.current("PforgeSaver")
        self._cache = BlobCache()
        self._logs: OrderedDict[str, Tracked[_Top]] = OrderedDict()
        #: name -> (context id, the head this saver last saw) of namespaces dropped from ``_logs`` (a
        #: small tuple each, kept until the namespace is used again or deleted through this saver): its
        #: next use goes on from that head, so a writer that came meanwhile is still a conflict however
        #: many namespaces this saver tracked in between
        self._seen_heads: dict[str, tuple[int, int]] = {}
        self._channels: OrderedDict[tuple[str, str], Channels] = OrderedDict()
        #: (name, channel) -> the full chunks of the list the channel last held
        self._memos: OrderedDict[tuple[str, str], ChunkMemo] = OrderedDict()
        #: names a read found no context for (the first write then expects it empty)
        self._absent: dict[str, None] = {}
        #: (name, checkpoint id) -> depth of the first writes turn this saver made to it
        self._early: dict[tuple[str, str], int] = {}
        self._owned: Any = None  # a store from_path opened for this saver alone

    # -- opening and closing -------------------------------------------------------------------------

    @classmethod
    def from_path(
        cls,
        path: str = DEFAULT_ROOT,
        *,
        serde: SerializerProtocol | None = None,
        prefix: str = "langgraph",
        **connect_options: Any,
    ) -> _Opening:
        """A saver on a store of its own at ``path`` (created if missing; ``connect_options`` as for
        :func:`pforge_async.connect`): ``saver = await PforgeSaver.from_path(p)`` (then
        ``await saver.aclose()``), ``async with PforgeSaver.from_path(p) as saver:``, or, for
        LangGraph's sync API, ``with PforgeSaver.from_path(p) as saver:``."""
        return _Opening(cls, path, {"serde": serde, "prefix": prefix}, connect_options)

    async def aclose(self) -> None:
        """Close the store if this saver opened it (from a path); a store it was given stays open."""
        owned, self._owned = self._owned, None
        if owned is not None:
            await owned.aclose()
        await self._backing.aclose()
        for name, tracked in self._logs.items():
            self._remember_head(name, tracked)
        self._logs.clear()

    def close(self) -> None:
        """:meth:`aclose` from synchronous code (not from the store's own event loop)."""
        if self._bridge.loop is not None and not self._bridge.loop.is_closed():
            self._bridge.run(self.aclose(), "close")
        self._bridge.stop()

    async def __aenter__(self) -> PforgeSaver:
        await self._turns()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def _turns(self) -> TurnStoreBase:
        turns = await self._backing.open()
        if self._bridge.loop is None:
            self._bridge.loop = asyncio.get_running_loop()
        return turns

    async def _value_codec(self) -> ValueCodec:
        return ValueCodec(await self._turns(), self.serde.dumps_typed, self.serde.loads_typed, self._cache)

    # -- names ---------------------------------------------------------------------------------------

    def _thread_prefix(self, thread_id: str) -> str:
        return f"{self.prefix}/{len(thread_id)}:{thread_id}/"

    def _name(self, thread_id: str, ns: str) -> str:
        return self._thread_prefix(thread_id) + ns

    def _parse(self, name: str) -> tuple[str, str]:
        """The (thread id, namespace) a context name of this saver's stands for; ``IntegrityError`` for
        a name under the prefix that this saver never makes (something else took it)."""
        rest = name[len(self.prefix) + 1 :]
        size, _, rest = rest.partition(":")
        if size.isdigit() and size.isascii():
            parsed = rest[: int(size)], rest[int(size) + 1 :]
            if self._name(*parsed) == name:
                return parsed
        raise IntegrityError(
            f"context {name!r} is under this saver's prefix {self.prefix!r} but is not a thread's name: "
            "the name is taken by something else"
        )

    @staticmethod
    def _what(thread_id: str, ns: str) -> str:
        return f"thread {thread_id!r}" + (f" (namespace {ns!r})" if ns else "")

    async def _namespaces(self, thread_id: str) -> list[ContextInfo]:
        return await self._contexts(self._thread_prefix(thread_id))

    async def _contexts(self, prefix: str) -> list[ContextInfo]:
        turns = await self._turns()
        found: list[ContextInfo] = []
        after = None
        while True:
            page = await turns.list_contexts(prefix=prefix, order="name", after=after, limit=MAX_LIST_LIMIT)
            found += page.contexts
            if page.cursor is None:
                return found
            after = page.cursor

    # -- what this writer knows of each namespace ---------------------------------------------------

    async def _log(self, name: str, *, create: bool) -> Tracked[_Top] | None:
        tracked = self._logs.get(name)
        if tracked is not None:
            self._logs.move_to_end(name)
            return tracked
        turns = await self._turns()
        # A namespace this saver saw before (dropped from _logs since) must not be made again here:
        # if it was deleted meanwhile, the write is refused, as it would have been had it stayed tracked.
        known = name in self._seen_heads
        info = await turns.open_context(name) if create and not known else await turns.find_context(name)
        tracked = self._logs.get(name)
        if tracked is not None and info is not None and tracked.context_id == info.context_id:
            return tracked  # another task of this saver tracked it meanwhile
        seen = self._seen_heads.pop(name, None)
        if seen is not None and (info is None or info.context_id != seen[0]):
            seen = None
            if create:
                raise ContextNotFound(
                    f"{self._what(*self._parse(name))} was deleted since this saver last saw it; nothing of the "
                    "write was stored"
                )
        if info is None:
            # Seen absent: a first write expects it still empty, so a writer that made it meanwhile
            # is a conflict, not the baseline.
            self._absent[name] = None
            while len(self._absent) > _MAX_TRACKED:
                self._absent.pop(next(iter(self._absent)))
            return None
        if create and self._absent.pop(name, 0) is None:
            tracked = Tracked(info.context_id, 0, _EMPTY)
        else:
            # Seen before: it goes on from the head seen then, not the store's, so another writer's
            # turns since are a conflict, as they would have been had it stayed tracked.
            head = seen[1] if seen is not None else info.head_turn_id
            tracked = Tracked(info.context_id, head, await self._seen_top(turns, head))
        self._logs[name] = tracked
        self._evict()
        return tracked

    def _evict(self) -> None:
        while len(self._logs) > _MAX_TRACKED:
            name, tracked = next(iter(self._logs.items()))
            if tracked.lock.locked() or tracked.uncertain is not None:
                self._logs.move_to_end(name)  # in use, or a write's outcome still to learn
                return
            del self._logs[name]
            self._remember_head(name, tracked)

    def _remember_head(self, name: str, tracked: Tracked[_Top]) -> None:
        self._seen_heads[name] = (tracked.context_id, tracked.head)

    def _forget(self, name: str, tracked: Tracked[_Top]) -> None:
        """The namespace's context is gone (deleted): nothing about it is worth keeping."""
        if self._logs.get(name) is tracked:
            del self._logs[name]
        if self._seen_heads.get(name, (0, 0))[0] == tracked.context_id:
            del self._seen_heads[name]

    async def _seen_top(self, turns: TurnStoreBase, head: int) -> _Top:
        """The state that goes with a head seen earlier, which may since have been collected (the
        head moved on, so a write expecting it conflicts whatever the state)."""
        try:
            return await self._top_at(turns, head)
        except TurnNotFound:
            return _EMPTY

    async def _top_at(self, turns: TurnStoreBase, head: int) -> _Top:
        return self._top_of(await turns.get_turn(head)) if head else _EMPTY

    @staticmethod
    def _top_of(record: TurnRecord) -> _Top:
        if record.erased:  # erased (prune_context, erase_turns): nothing from here back
            return _Top("", 0, record.depth)
        entry = log.decode(record)
        return _Top(entry.top_id, entry.top_depth, record.depth)

    async def _append(
        self, name: str, tracked: Tracked[_Top], type_id: str, payload: bytes, refs: tuple[str, ...]
    ) -> TurnRecord:
        """Append after the head this saver last saw (the caller holds ``tracked.lock`` and has settled
        it): another writer's turn there is a ``WriterConflict``, and stays one until a read."""
        turns = await self._turns()
        expected = tracked.head
        try:
            return await turns.append_turn(tracked.context_id, type_id, payload, expected_head=expected, refs=refs)
        except HeadConflict as exc:
            raise tracked.conflict(self._what(*self._parse(name)), exc) from exc
        except ContextNotFound as exc:
            self._forget(name, tracked)
            raise ContextNotFound(
                f"{self._what(*self._parse(name))} was deleted while this saver was writing it; nothing of the "
                "write was stored"
            ) from exc
        except ObjectNotFound:
            raise  # refused whole: a blob it names is not stored (the caller stores it and retries)
        except BaseException:
            tracked.uncertain = (expected, [payload])  # it may have landed: the next write finds out
            raise

    # -- writes --------------------------------------------------------------------------------------

    async def aput(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        """Store a checkpoint (a turn; its changed channel values as blobs) after the namespace's head."""
        thread_id, ns = _thread_and_ns(config)
        name = self._name(thread_id, ns)
        parent = get_checkpoint_id(config)
        parent_id = "" if parent is None else _text(parent, "the config's checkpoint_id (the parent)")
        codec = await self._value_codec()
        rest = cast(dict[str, Any], dict(checkpoint))
        values: dict[str, Any] = rest.pop("channel_values")
        for channel in values:
            _text(channel, "a channel name")
        checkpoint_id = rest.pop("id")
        if not isinstance(checkpoint_id, str) or not checkpoint_id:
            raise InvalidInput(f"a checkpoint id must be a non-empty str, got {checkpoint_id!r}")
        versions = checkpoint["channel_versions"]
        parent_channels = self._channels.get((name, parent_id)) if parent_id else None
        skeleton = self.serde.dumps_typed(rest)
        meta = self.serde.dumps_typed(get_checkpoint_metadata(config, metadata))
        channels, carried, pending = self._encode_channels(codec, name, values, versions, new_versions, parent_channels)
        try:
            await self._put_checkpoint(name, checkpoint_id, parent_id, skeleton, meta, channels, codec, pending)
        except ObjectNotFound:
            # A blob this saver remembered as stored is gone (gc collected a deleted or pruned thread's
            # values): forget what the checkpoint names, and store every value it needs this time.
            self._cache.forget(refs_of(channels.values()))
            channels, carried, pending = self._encode_channels(codec, name, values, versions, new_versions, None)
            await self._put_checkpoint(name, checkpoint_id, parent_id, skeleton, meta, channels, codec, pending)
        self._remember(name, checkpoint_id, versions, channels, carried)
        return _config(config, thread_id, ns, checkpoint_id)

    def _encode_channels(
        self,
        codec: ValueCodec,
        name: str,
        values: dict[str, Any],
        versions: ChannelVersions,
        new_versions: ChannelVersions,
        parent_channels: Channels | None,
    ) -> tuple[dict[str, Ref], set[str], dict[str, bytes]]:
        """Each channel's reference, the channels carried unchanged from the parent, and the blobs to
        store first."""
        pending: dict[str, bytes] = {}
        channels: dict[str, Ref] = {}
        carried: set[str] = set()
        for channel, value in values.items():
            version = versions.get(channel)
            known = parent_channels.get(channel) if parent_channels is not None else None
            if known is not None and channel not in new_versions and version is not None and known[0] == version:
                # Unchanged since the parent: the same value, already stored. A list's inline tail
                # becomes a blob when it is carried a second time: a run's input checkpoint carries
                # the messages once, then its first node changes them, so that copy stays inline
                # (one more inline tail) rather than cost a blob write; a list that stays as it is
                # is shared from its second checkpoint on.
                channels[channel] = codec.promote(known[1], pending) if known[2] else known[1]
                carried.add(channel)
            else:
                channels[channel] = codec.encode(value, pending, self._memo(name, channel))
        _fit_refs(codec, values, channels, carried)
        return channels, carried, pending

    async def _put_checkpoint(
        self,
        name: str,
        checkpoint_id: str,
        parent_id: str,
        skeleton: tuple[str, bytes],
        meta: tuple[str, bytes],
        channels: dict[str, Ref],
        codec: ValueCodec,
        pending: dict[str, bytes],
    ) -> None:
        await codec.store(pending)
        tracked = await self._log(name, create=True)
        assert tracked is not None
        async with tracked.lock:
            await tracked.settle(await self._turns(), self._top_of)
            top = tracked.state
            depth = top.head_depth + 1
            if checkpoint_id > top.top_id:
                top = _Top(checkpoint_id, depth, depth)
            else:
                top = _Top(top.top_id, top.top_depth, depth)
            early = self._early.get((name, checkpoint_id), 0)
            entry = log.CheckpointEntry(
                top.top_id, top.top_depth, checkpoint_id, parent_id, skeleton, meta, channels, early
            )
            refs = refs_of(channels.values())
            record = await self._append(name, tracked, log.CHECKPOINT, log.encode(entry), refs)
            tracked.wrote(record.turn_id, top)
            self._early.pop((name, checkpoint_id), None)

    def _memo(self, name: str, channel: str) -> ChunkMemo:
        key = (name, channel)
        memo = self._memos.get(key)
        if memo is None:
            memo = self._memos[key] = ChunkMemo()
            while len(self._memos) > _MAX_CHANNEL_MAPS:
                self._memos.popitem(last=False)
        else:
            self._memos.move_to_end(key)
        return memo

    def _remember(
        self,
        name: str,
        checkpoint_id: str,
        versions: ChannelVersions,
        channels: dict[str, Ref],
        carried: set[str] | frozenset[str] = frozenset(),
    ) -> None:
        self._channels[(name, checkpoint_id)] = {
            ch: (versions.get(ch), ref, ch in carried) for ch, ref in channels.items()
        }
        while len(self._channels) > _MAX_CHANNEL_MAPS:
            self._channels.popitem(last=False)

    async def aput_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        """Store the pending writes of a task for the checkpoint ``config`` names (one turn)."""
        if not writes:
            return
        thread_id, ns = _thread_and_ns(config)
        checkpoint_id = get_checkpoint_id(config)
        if not checkpoint_id:
            raise InvalidInput(f"aput_writes: the config names no checkpoint_id ({self._what(thread_id, ns)})")
        _text(checkpoint_id, "aput_writes: the config's checkpoint_id")
        _text(task_id, "aput_writes: task_id")
        _text(task_path, "aput_writes: task_path")
        for channel, _ in writes:
            _text(channel, "aput_writes: a write's channel")
        name = self._name(thread_id, ns)
        codec = await self._value_codec()

        def encoded() -> tuple[list[log.Write], dict[str, bytes]]:
            pending: dict[str, bytes] = {}
            entries: list[log.Write] = []
            # Inline values share one budget, so many writes of a task still make a turn the store
            # takes (its payload bound is 16 MiB by default); past it, values are blobs.
            budget = WRITES_INLINE_TOTAL
            for idx, (channel, value) in enumerate(writes):
                ref = codec.encode_plain(value, pending, max(INLINE_MAX, min(WRITE_INLINE_MAX, budget)))
                if ref.kind == INLINE:
                    budget -= len(ref.data)
                entries.append(log.Write(task_id, task_path, WRITES_IDX_MAP.get(channel, idx), channel, ref))
            return entries, pending

        entries, pending = encoded()
        try:
            await self._put_writes(name, checkpoint_id, entries, pending, codec)
        except ObjectNotFound:
            # a blob remembered as stored was collected since (see aput): store the values again
            self._cache.forget(refs_of(w.value for w in entries))
            await self._put_writes(name, checkpoint_id, *encoded(), codec)

    async def _put_writes(
        self,
        name: str,
        checkpoint_id: str,
        entries: list[log.Write],
        pending: dict[str, bytes],
        codec: ValueCodec,
    ) -> None:
        await codec.store(pending)
        tracked = await self._log(name, create=True)
        assert tracked is not None
        async with tracked.lock:
            await tracked.settle(await self._turns(), self._top_of)
            top = tracked.state
            depth = top.head_depth + 1
            entry = log.WritesEntry(top.top_id, top.top_depth, checkpoint_id, entries)
            refs = refs_of(w.value for w in entries)
            record = await self._append(name, tracked, log.WRITES, log.encode(entry), refs)
            tracked.wrote(record.turn_id, _Top(top.top_id, top.top_depth, depth))
            # If the checkpoint is not in yet (its put waits on the one before), it will say so.
            self._early.setdefault((name, checkpoint_id), record.depth)
            while len(self._early) > _MAX_CHANNEL_MAPS:
                self._early.pop(next(iter(self._early)))

    # -- reads ---------------------------------------------------------------------------------------

    async def aget_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        """The checkpoint ``config`` names, or without a ``checkpoint_id`` the latest (largest id) of
        the namespace; None if there is none."""
        thread_id, ns = _thread_and_ns(config)
        name = self._name(thread_id, ns)
        # "" names the latest, as to LangGraph's own savers (they test the id's truth)
        wanted = get_checkpoint_id(config) or None
        if wanted is not None and not isinstance(wanted, str):
            return None  # no checkpoint has a non-str id (aput refuses one)
        for _ in range(2):
            tracked = await self._log(name, create=False)
            if tracked is None:
                return None
            try:
                found = await self._find(tracked, wanted)
            except ContextNotFound:
                self._forget(name, tracked)  # deleted (and maybe made again): look the name up again
                continue
            if found is None:
                return None
            entry, writes = found
            result = await self._tuple(config, thread_id, ns, entry, writes)
            self._remember(name, entry.checkpoint_id, result.checkpoint["channel_versions"], entry.channels)
            return result
        return None

    async def _find(self, tracked: Tracked[_Top], wanted: str | None) -> _Found | None:
        turns = await self._turns()
        mark = tracked.writes
        page = await turns.list_turns(tracked.context_id, limit=_QUICK)
        if not page:
            tracked.saw(mark, tracked.context_id, 0, _EMPTY)
            return None
        head = page[-1]
        tracked.saw(mark, tracked.context_id, head.turn_id, self._top_of(head))
        search = _Search(wanted)
        for record in reversed(page):
            if record.erased:  # an erased prefix: for readers the chain ends here
                break
            outcome = search.feed(record, log.decode(record))
            if outcome is not None:
                return None if outcome is _Search.ABSENT else cast(_Found, outcome)
        if len(page) < _QUICK or record.erased or page[0].parent_turn_id == 0:
            outcome = search.end()
            return None if outcome is _Search.ABSENT else cast(_Found, outcome)
        # Not settled within the first turns: walk the whole chain (as it stands now).
        search = _Search(wanted)
        async for record in turns.iter_turns(tracked.context_id, newest_first=True, page_size=_PAGE):
            if record.erased:
                break
            outcome = search.feed(record, log.decode(record))
            if outcome is not None:
                return None if outcome is _Search.ABSENT else cast(_Found, outcome)
        outcome = search.end()
        return None if outcome is _Search.ABSENT else cast(_Found, outcome)

    async def _tuple(
        self, config: RunnableConfig, thread_id: str, ns: str, entry: log.CheckpointEntry, writes: list[log.Write]
    ) -> CheckpointTuple:
        codec = await self._value_codec()
        blobs = await codec.fetch([*entry.channels.values(), *(w.value for w in writes)])
        checkpoint = cast(dict[str, Any], self.serde.loads_typed(entry.skeleton))
        checkpoint["id"] = entry.checkpoint_id
        name = self._name(thread_id, ns)
        checkpoint["channel_values"] = {
            ch: codec.decode(ref, blobs, self._memo(name, ch)) for ch, ref in entry.channels.items()
        }
        pending_writes: list[PendingWrite] = [(w.task_id, w.channel, codec.decode(w.value, blobs)) for w in writes]
        parent = _config(config, thread_id, ns, entry.parent_id) if entry.parent_id else None
        return CheckpointTuple(
            config=_config(config, thread_id, ns, entry.checkpoint_id),
            checkpoint=cast(Checkpoint, checkpoint),
            metadata=cast(CheckpointMetadata, self.serde.loads_typed(entry.metadata)),
            parent_config=parent,
            pending_writes=pending_writes,
        )

    async def alist(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[CheckpointTuple]:
        """Checkpoints newest first (by id): of one namespace, of every namespace of a thread (a
        config without ``checkpoint_ns``), or of every thread (``config`` None); only those whose
        metadata has every item of ``filter``, with an id below ``before``'s, at most ``limit``."""
        if limit is not None and limit <= 0:
            return
        # An empty config or before ({}) is no filter, as to LangGraph's own savers (they test truth).
        before_id = (before.get("configurable") or {}).get("checkpoint_id") if before else None
        if before_id is not None:
            _text(before_id, "alist: before's checkpoint_id")
        only_id = ((config.get("configurable") or {}).get("checkpoint_id") or None) if config else None
        targets: list[tuple[str, str]]
        if not config:
            names = [info.name for info in await self._contexts(f"{self.prefix}/") if info.name]
            targets = [self._parse(name) for name in names]
        else:
            thread_id, ns = _thread_and_ns(config)
            if config["configurable"].get("checkpoint_ns") is None:
                targets = [self._parse(info.name) for info in await self._namespaces(thread_id) if info.name]
            else:
                targets = [(thread_id, ns)]
        count = 0
        for thread_id, ns in targets:
            source = config if config else {"configurable": {"thread_id": thread_id}}
            async for result in self._list_namespace(source, thread_id, ns, filter, before_id, only_id):
                yield result
                count += 1
                if limit is not None and count >= limit:
                    return

    async def _list_namespace(
        self,
        config: RunnableConfig,
        thread_id: str,
        ns: str,
        filter: dict[str, Any] | None,
        before_id: str | None,
        only_id: str | None,
    ) -> AsyncIterator[CheckpointTuple]:
        name = self._name(thread_id, ns)
        tracked = await self._log(name, create=False)
        if tracked is None:
            return
        turns = await self._turns()
        # Checkpoints found, in id order, with the writes made to them: the largest goes out once
        # nothing older can come before it and writes made to it before it landed are behind.
        held: list[_Held] = []
        waiting: dict[str, _Held] = {}
        writes_of: dict[str, list[log.WritesEntry]] = {}
        seen: set[str] = set()
        first = True
        mark = tracked.writes
        try:
            async for record in turns.iter_turns(tracked.context_id, newest_first=True, page_size=_PAGE):
                if first:
                    first = False
                    tracked.saw(mark, tracked.context_id, record.turn_id, self._top_of(record))
                if record.erased:
                    break  # an erased prefix: nothing older is readable
                entry = log.decode(record)
                while held and held[-1].checkpoint_id > entry.top_id and held[-1].early_done(record.depth):
                    yield await self._tuple(config, thread_id, ns, *held.pop().done(waiting))
                if isinstance(entry, log.WritesEntry):
                    target = waiting.get(entry.checkpoint_id)
                    if target is not None:
                        target.writes.append(entry)
                    else:
                        writes_of.setdefault(entry.checkpoint_id, []).append(entry)
                    continue
                checkpoint_id = entry.checkpoint_id
                if checkpoint_id in seen:
                    continue  # put again later: the later one stands
                seen.add(checkpoint_id)
                mine = writes_of.pop(checkpoint_id, [])
                if before_id is not None and checkpoint_id >= before_id:
                    continue
                if only_id is not None and checkpoint_id != only_id:
                    continue
                if filter and not _matches(self.serde.loads_typed(entry.metadata), filter):
                    continue
                item = _Held(checkpoint_id, entry, mine, entry.early)
                if entry.early:
                    waiting[checkpoint_id] = item
                bisect.insort(held, item, key=lambda held_item: held_item.checkpoint_id)
        except ContextNotFound:
            self._forget(name, tracked)
            return
        while held:
            yield await self._tuple(config, thread_id, ns, *held.pop().done(waiting))

    async def adelete_thread(self, thread_id: str) -> None:
        """Delete a thread: the context of each of its namespaces goes (its name is free again). The
        turns and blobs nothing else reaches are reclaimed by the store's ``gc``; a copy made with
        ``acopy_thread`` keeps everything it shares. A writer elsewhere still holding the thread gets
        ``ContextNotFound`` from its next write instead of bringing it back. Unknown threads are no-ops."""
        thread = str(thread_id)
        turns = await self._turns()
        for info in await self._namespaces(thread):
            name = info.name
            if name is None:
                continue
            tracked = self._logs.get(name)
            lock: AbstractAsyncContextManager[Any] = tracked.lock if tracked is not None else nullcontext()
            async with lock:
                with contextlib.suppress(ContextNotFound):  # deleted meanwhile
                    await turns.delete_context(info.context_id)
                if tracked is not None:
                    self._forget(name, tracked)
                self._seen_heads.pop(name, None)
                self._absent[name] = None  # this saver's next write starts it afresh
            for key in [key for key in self._early if key[0] == name]:
                del self._early[key]

    # -- the optional capabilities -------------------------------------------------------------------

    async def acopy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        """Copy every checkpoint and write of a thread, in every namespace, to a thread that has none:
        each namespace is a fork of the source's (O(1): the turns and blobs are shared, not copied),
        with the same checkpoint ids in the same order. A target that already has checkpoints is a
        ``Conflict`` (unless it is this very copy, done before: then it is left as it is)."""
        source, target = str(source_thread_id), str(target_thread_id)
        if source == target:
            return
        turns = await self._turns()
        for info in await self._namespaces(source):
            if not info.head_turn_id or info.name is None:
                continue
            ns = self._parse(info.name)[1]
            name = self._name(target, ns)
            try:
                copy = await turns.fork_context(info.head_turn_id, name=name, parent_context_id=info.context_id)
            except Conflict as exc:
                existing = await turns.find_context(name)
                if existing is None or existing.head_turn_id != info.head_turn_id:
                    raise Conflict(
                        f"acopy_thread: {self._what(target, ns)} already has checkpoints; copy to a new thread"
                    ) from exc
                copy = existing
            # The copy is this saver's own write: a read that found the target absent, or a context
            # of that name deleted since, must not make its next write expect the target empty.
            self._absent.pop(name, None)
            if self._seen_heads.get(name, (0, 0))[0] != copy.context_id:
                self._seen_heads.pop(name, None)
            stale = self._logs.get(name)
            if stale is not None and stale.context_id != copy.context_id:
                self._forget(name, stale)

    async def aprune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        """``"keep_latest"``: keep of each namespace of each thread only its latest checkpoint (largest
        id) with its pending writes; ``"delete"``: delete the threads. Threads not named are untouched;
        unknown ones are no-ops. A namespace whose graph uses ``DeltaChannel`` (beta) is refused with
        ``InvalidInput``: its latest checkpoint alone could not rebuild those channels."""
        threads = _thread_ids(thread_ids, "aprune")
        if strategy not in ("keep_latest", "delete"):
            raise InvalidInput(f"aprune: strategy must be 'keep_latest' or 'delete', got {strategy!r}")
        if strategy == "delete":
            for thread_id in threads:
                await self.adelete_thread(thread_id)
            return
        for thread_id in threads:
            for info in await self._namespaces(thread_id):
                if info.name is not None:
                    await self._rewrite(info.name, self._keep_latest)

    def _keep_latest(self, name: str, entries: list[log.Entry]) -> list[log.Entry] | None:
        latest: log.CheckpointEntry | None = None
        for entry in entries:
            if not isinstance(entry, log.CheckpointEntry):
                continue
            if latest is None or entry.checkpoint_id >= latest.checkpoint_id:
                latest = entry
        if latest is None:
            return None
        metadata = self.serde.loads_typed(latest.metadata)
        if isinstance(metadata, dict) and metadata.get("counters_since_delta_snapshot"):
            raise InvalidInput(
                f"aprune: {self._what(*self._parse(name))} uses DeltaChannel, whose values its latest checkpoint "
                "alone cannot rebuild; it was not pruned"
            )
        writes = log.pending(
            w
            for e in entries
            if isinstance(e, log.WritesEntry) and e.checkpoint_id == latest.checkpoint_id
            for w in e.writes
        )
        kept: list[log.Entry] = [latest]
        if writes:
            kept.append(log.WritesEntry("", 0, latest.checkpoint_id, writes))
        if len(entries) == len(kept) and entries[0] == latest:
            return None  # nothing to prune
        return kept

    async def adelete_for_runs(self, run_ids: Sequence[str]) -> None:
        """Delete every checkpoint whose metadata ``run_id`` is one of ``run_ids``, with its pending
        writes, in every thread and namespace, interior ones included (a kept checkpoint whose parent
        went keeps its parent's id). Every thread is looked at: run ids are not indexed."""
        runs = set(_thread_ids(run_ids, "adelete_for_runs"))
        if not runs:
            return

        def without_runs(name: str, entries: list[log.Entry]) -> list[log.Entry] | None:
            gone = set()
            for entry in entries:
                if isinstance(entry, log.CheckpointEntry):
                    metadata = self.serde.loads_typed(entry.metadata)
                    if isinstance(metadata, dict) and metadata.get("run_id") in runs:
                        gone.add(entry.checkpoint_id)
            if not gone:
                return None
            return [entry for entry in entries if entry.checkpoint_id not in gone]

        for info in await self._contexts(f"{self.prefix}/"):
            if info.name is not None and info.head_turn_id:
                await self._rewrite(info.name, without_runs)

    async def _rewrite(self, name: str, select: Callable[[str, list[log.Entry]], list[log.Entry] | None]) -> None:
        """Replace a namespace's chain by what ``select`` keeps of its entries (oldest first; None: no
        change), as a new chain in one atomic batch compare-and-set on the head it read."""
        turns = await self._turns()
        for _ in range(_REWRITE_TRIES):
            info = await turns.find_context(name)
            if info is None:
                return
            tracked = self._logs.get(name)
            lock: AbstractAsyncContextManager[Any] = (
                tracked.lock if tracked is not None and tracked.context_id == info.context_id else nullcontext()
            )
            async with lock:
                try:
                    records = [r async for r in turns.iter_turns(info.context_id, page_size=_PAGE)]
                except ContextNotFound:
                    return
                head = records[-1].turn_id if records else 0
                kept = select(name, [log.decode(r) for r in records if not r.erased])
                if kept is None:
                    return
                rebuilt, top = _positions(kept)
                try:
                    new_head = await self._replace_chain(info.context_id, head, rebuilt)
                except HeadConflict:
                    continue  # another writer moved it meanwhile: read it again
                except ContextNotFound:
                    return  # deleted meanwhile: nothing left to rewrite, as for an unknown thread
                if tracked is not None and tracked.context_id == info.context_id:
                    tracked.wrote(new_head, top)
                elif self._seen_heads.get(name, (0, 0))[0] == info.context_id:
                    self._seen_heads[name] = (info.context_id, new_head)  # this saver's own write
                for key in [key for key in self._early if key[0] == name]:
                    del self._early[key]  # depths of the old chain
                return
        what = self._what(*self._parse(name))
        raise Conflict(f"{what}: other writers kept changing it; gave up rewriting it after {_REWRITE_TRIES} tries")

    async def _replace_chain(self, context_id: int, head: int, entries: list[log.Entry]) -> int:
        """Make ``entries`` the context's chain, a new one from a first turn, if its head is still
        ``head`` (``HeadConflict`` otherwise); returns the new head. One atomic batch when it fits in
        one; else the chain is built in a scratch context, batch by batch, and the head moved to its
        end in one compare-and-set (the scratch context is deleted after, its turns kept by this one)."""
        turns = await self._turns()
        if not entries:
            await turns.set_head(context_id, 0, expected_head=head)
            return 0
        new = [_new_turn(context_id, entry, first=i == 0) for i, entry in enumerate(entries)]
        batches = split_batches(new)
        if len(batches) == 1:
            records = await turns.append_turns(new, expected_heads={context_id: head})
            return records[-1].turn_id
        scratch = await turns.create_context(
            parent_context_id=context_id, metadata={"pforge": f"langgraph rewrite of context {context_id}"}
        )
        try:
            for batch in batches:
                records = await turns.append_turns(
                    [msgspec.structs.replace(t, context_id=scratch.context_id) for t in batch]
                )
            await turns.set_head(context_id, records[-1].turn_id, expected_head=head)
        finally:
            with contextlib.suppress(ContextNotFound):
                await turns.delete_context(scratch.context_id)
        return records[-1].turn_id

    # -- versions ------------------------------------------------------------------------------------

    def get_next_version(self, current: Any, channel: None) -> Any:
        """Integers counting up (compact: stored in every checkpoint). A string version (a thread a
        string-versioned saver began) continues as ``InMemorySaver`` writes them."""
        if current is None:
            return 1
        if isinstance(current, str):
            return f"{int(current.split('.')[0]) + 1:032}.{random.random():016}"
        return current + 1

    # -- the sync API: a bridge to the store's event loop --------------------------------------------

    def get_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        return self._bridge.run(self.aget_tuple(config), "get_tuple")

    def list(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> Iterator[CheckpointTuple]:
        async def collect() -> list[CheckpointTuple]:
            return [t async for t in self.alist(config, filter=filter, before=before, limit=limit)]

        return iter(self._bridge.run(collect(), "list"))

    def put(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        return self._bridge.run(self.aput(config, checkpoint, metadata, new_versions), "put")

    def put_writes(
        self, config: RunnableConfig, writes: Sequence[tuple[str, Any]], task_id: str, task_path: str = ""
    ) -> None:
        self._bridge.run(self.aput_writes(config, writes, task_id, task_path), "put_writes")

    def delete_thread(self, thread_id: str) -> None:
        self._bridge.run(self.adelete_thread(thread_id), "delete_thread")

    def copy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        self._bridge.run(self.acopy_thread(source_thread_id, target_thread_id), "copy_thread")

    def prune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        self._bridge.run(self.aprune(thread_ids, strategy=strategy), "prune")

    def delete_for_runs(self, run_ids: Sequence[str]) -> None:
        self._bridge.run(self.adelete_for_runs(run_ids), "delete_for_runs")


class _Held:
    """A checkpoint ``alist`` found, waiting for its turn to be yielded."""

    __slots__ = ("checkpoint_id", "early", "entry", "writes")

    def __init__(self, checkpoint_id: str, entry: log.CheckpointEntry, writes: list[log.WritesEntry], early: int):
        self.checkpoint_id = checkpoint_id
        self.entry = entry
        self.writes = writes  # newest first
        self.early = early

    def early_done(self, depth: int) -> bool:
        """Whether every writes turn made to it before it is behind a walk about to read ``depth``."""
        return not self.early or self.early > depth

    def done(self, waiting: dict[str, _Held]) -> tuple[log.CheckpointEntry, list[log.Write]]:
        waiting.pop(self.checkpoint_id, None)
        return self.entry, log.pending(w for batch in reversed(self.writes) for w in batch.writes)


class _Search:
    """Looks, newest first, for the checkpoint ``wanted`` (None: the latest, which the first entry
    names) and the writes made to it. :meth:`feed` returns it with its pending writes once found (and
    once its early writes, if it has any, are behind), ``ABSENT`` once the entries show it is not
    there, and None while it cannot tell yet."""

    ABSENT: Any = object()

    def __init__(self, wanted: str | None) -> None:
        self.target = wanted
        self.collected: list[log.WritesEntry] = []
        self.found: log.CheckpointEntry | None = None

    def feed(self, record: TurnRecord, entry: log.Entry) -> Any:
        found = self.found
        if found is not None:  # going back for writes made before the checkpoint landed
            if record.depth < found.early:
                return self.result()
            if isinstance(entry, log.WritesEntry) and entry.checkpoint_id == found.checkpoint_id:
                self.collected.append(entry)
            return None
        if self.target is None:
            self.target = entry.top_id
            if not self.target:
                return self.ABSENT
        if entry.top_id < self.target:
            return self.ABSENT  # every checkpoint from here back has a smaller id
        if isinstance(entry, log.WritesEntry):
            if entry.checkpoint_id == self.target:
                self.collected.append(entry)
            return None
        if entry.checkpoint_id == self.target:
            self.found = entry
            if not entry.early:
                return self.result()
        return None

    def result(self) -> _Found:
        assert self.found is not None
        return self.found, log.pending(w for batch in reversed(self.collected) for w in batch.writes)

    def end(self) -> Any:
        """The chain ended (its first turn was fed)."""
        return self.result() if self.found is not None else self.ABSENT


def _fit_refs(codec: ValueCodec, values: dict[str, Any], channels: dict[str, Ref], carried: set[str]) -> None:
    """A turn names at most ``MAX_REFS`` blobs: past that, channel values go inline instead (those
    naming fewest blobs first), so a checkpoint of a wide graph is stored, as LangGraph's own savers
    store it. Blobs staged for them and no longer named are left for gc."""
    naming: dict[str, int] = {}
    for ref in channels.values():
        for oid in set(ref.oids()):
            naming[oid] = naming.get(oid, 0) + 1
    if len(naming) <= MAX_REFS:
        return
    for channel in sorted(channels, key=lambda ch: len(channels[ch].oids())):
        if len(naming) <= MAX_REFS:
            return
        oids = set(channels[channel].oids())
        if not oids:
            continue
        channels[channel] = codec.inline(values[channel])
        carried.discard(channel)
        for oid in oids:
            naming[oid] -= 1
            if not naming[oid]:
                del naming[oid]


def _positions(entries: list[log.Entry]) -> tuple[list[log.Entry], _Top]:
    """The entries of a new chain with their positions (largest id so far, its depth, and for a
    checkpoint the depth of writes made to it before it) recomputed."""
    rebuilt: list[log.Entry] = []
    top_id, top_depth = "", 0
    first_write: dict[str, int] = {}
    for depth, entry in enumerate(entries, start=1):
        if isinstance(entry, log.CheckpointEntry):
            if entry.checkpoint_id >= top_id:
                top_id, top_depth = entry.checkpoint_id, depth
            early = first_write.pop(entry.checkpoint_id, 0)
            rebuilt.append(msgspec.structs.replace(entry, top_id=top_id, top_depth=top_depth, early=early))
        else:
            first_write.setdefault(entry.checkpoint_id, depth)
            rebuilt.append(msgspec.structs.replace(entry, top_id=top_id, top_depth=top_depth))
    return rebuilt, _Top(top_id, top_depth, len(entries))


def _new_turn(context_id: int, entry: log.Entry, *, first: bool) -> NewTurn:
    if isinstance(entry, log.CheckpointEntry):
        type_id, refs = log.CHECKPOINT, refs_of(entry.channels.values())
    else:
        type_id, refs = log.WRITES, refs_of(w.value for w in entry.writes)
    return NewTurn(context_id, type_id, log.encode(entry), parent_turn_id=0 if first else None, refs=refs)


def _matches(metadata: Any, filter: dict[str, Any]) -> bool:
    return isinstance(metadata, dict) and all(metadata.get(key) == value for key, value in filter.items())


def _text(value: Any, what: str) -> str:
    """A field the log stores as a str: anything else would be stored as given and then refused by
    every read of the thread (the log's decoder is typed), so it is refused before anything is stored."""
    if not isinstance(value, str):
        raise InvalidInput(f"{what} must be a str, got {type(value).__name__} {value!r:.80}")
    return value


def _thread_and_ns(config: RunnableConfig) -> tuple[str, str]:
    configurable = config.get("configurable") or {}
    thread_id = configurable.get("thread_id")
    if thread_id is None:
        raise InvalidInput("the config names no thread_id (config['configurable']['thread_id'])")
    ns = configurable.get("checkpoint_ns") or ""
    if not isinstance(ns, str):
        raise InvalidInput(f"checkpoint_ns must be a str, got {type(ns).__name__} {ns!r}")
    return str(thread_id), ns


def _config(config: RunnableConfig, thread_id: str, ns: str, checkpoint_id: str) -> RunnableConfig:
    given = (config.get("configurable") or {}).get("thread_id")
    return {
        "configurable": {
            "thread_id": given if given is not None and str(given) == thread_id else thread_id,
            "checkpoint_ns": ns,
            "checkpoint_id": checkpoint_id,
        }
    }


def _thread_ids(values: Sequence[str], what: str) -> list[str]:
    if isinstance(values, (str, bytes)):
        raise InvalidInput(f"{what} takes a list of ids, not a single {type(values).__name__} {values!r:.80}")
    return [str(value) for value in values]


class _Opening:
    """What :meth:`PforgeSaver.from_path` returns: awaitable, ``async with`` and ``with``."""

    def __init__(
        self, cls: type[PforgeSaver], path: str, options: dict[str, Any], connect_options: dict[str, Any]
    ) -> None:
        self._cls = cls
        self._path = path
        self._options = options
        self._connect = connect_options
        self._saver: PforgeSaver | None = None

    async def _open(self) -> PforgeSaver:
        from ..store import connect

        store = await connect(self._path, **self._connect)
        saver = self._cls(store, **self._options)
        saver._owned = store
        return saver

    def __await__(self) -> Any:
        return self._open().__await__()

    async def __aenter__(self) -> PforgeSaver:
        self._saver = await self._open()
        return self._saver

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        saver, self._saver = self._saver, None
        if saver is not None:
            await asyncio.shield(saver.aclose())

    def __enter__(self) -> PforgeSaver:
        bridge = LoopBridge(None, "PforgeSaver")
        bridge.start()
        try:
            saver = bridge.run(self._open(), "from_path")
        except BaseException:
            bridge.stop()
            raise
        saver._bridge = bridge
        self._saver = saver
        return saver

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        saver, self._saver = self._saver, None
        if saver is not None:
            saver.close()
