"""``PforgeSession``: an OpenAI Agents SDK session over any pforge_async store.

One line to switch::

    session = PforgeSession("user-123", ".pforge")      # was: SQLiteSession("user-123", "conversations.db")
    result = await Runner.run(agent, "Hello", session=session)

``store`` is an open :class:`~pforge_async.Store`, any turn store, a path (opened on first use, one
open store per directory and event loop, shared by every session naming it; released by
:meth:`PforgeSession.aclose` or :meth:`close`), or ``":memory:"`` (the default, as for
``SQLiteSession``: a private in-memory store).

A session is a named context (``<prefix>/<session_id>``, ``prefix`` ``"openai-agents"`` unless given;
any str is a session id, as for ``SQLiteSession``: one a context name cannot hold, with a NUL or past
its 1,024 UTF-8 bytes, or starting with ``\\x01``, is named ``<prefix>/\\x01<its SHA-256>``) and each item
one turn of its chain, JSON as the SDK's own sessions store it:

- ``add_items`` appends its items in one atomic batch (all or none);
- ``get_items(limit)`` reads the last ``limit`` items back from the head (every item: the whole
  chain), oldest first; ``session_settings.limit`` applies when ``limit`` is None;
- ``pop_item`` moves the head back one item and returns it; ``clear_session`` moves it to nothing.
  Neither copies or rewrites anything: what they leave behind is no longer reachable from the
  session (``store.gc`` reclaims it where the store has one);
- ``branch(from_item=k)`` starts a new session holding the first ``k`` items: a fork, O(1) whatever
  the length (nothing is copied; ``AdvancedSQLiteSession`` copies the rows);
- every method takes the SDK's ``wrapper`` keyword (the run's ``RunContextWrapper``). Given a budget
  ledger (``record_usage=True`` for the store's own, or a ``BudgetLedger``), ``add_items`` records the
  run's token usage since it last recorded it, tagged with the session id.

Reads are cached: turns are immutable, so a session keeps the items of its chain up to the head it
last saw (``cache_bytes`` of their JSON, 4 MiB unless given; 0: no cache). ``get_items`` then reads
the head (one small read), only the turns after what it holds, and the oldest turn it holds, whose
erasure would show any erasure of the items it holds (erasure always takes a prefix of a chain). So
another writer's appends, a ``pop_item`` or ``clear_session`` elsewhere, the head moved to another
branch, the session deleted, and erasure (``erase_turns``, ``prune_context``, through any context
sharing the turns) all show at the next ``get_items``, from any process, and an erased item is never
served. Past ``cache_bytes`` it keeps the newest items, and a read of more than those reads the chain.

Several writers, several processes: a session remembers the head it last saw (``get_items`` refreshes
it, as each run does first) and every write compare-and-sets it, so a second writer on the same
session (another process or another ``PforgeSession`` object with the same id) gets
:class:`WriterConflict` instead of interleaving two runs' items. The tasks of one session object
take turns.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import threading
import weakref
from collections.abc import Callable
from typing import Any, cast
from uuid import uuid4

import msgspec

from ..errors import (
    ActorClosed,
    Conflict,
    ContextNotFound,
    HeadConflict,
    IntegrityError,
    InvalidInput,
    TurnNotFound,
)
from ..ledgers._checks import MAX_TEXT, text, whole
from ..ledgers.budget import BudgetLedger
from ..turnstore.base import TurnStoreBase
from ..turnstore.rules import MAX_PAGE_SIZE, split_batches, validate_name
from ..turnstore.types import NewTurn, TurnRecord
from ._chaincache import ChainCache
from ._heads import Tracked, WriterConflict
from ._stores import MEMORY, Backing, StoreLike

try:
    from agents.items import TResponseInputItem
    from agents.memory.session import _CompactionSnapshot
    from agents.memory.session_settings import SessionSettings, resolve_session_limit
    from agents.run_context import RunContextWrapper
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "pforge_async.integrations.openai_agents needs the OpenAI Agents SDK: pip install 'pforge_async[openai-agents]'"
    ) from exc

__all__ = ["ITEM", "PforgeSession", "WriterConflict"]

#: the type id of an item's turn
ITEM = "openai_agents.item"
_PAGE = 256
#: how many growing reads ``get_items`` makes to join the head to its cache before it reads the chain
_SYNC_TRIES = 3
_SYNC_MAX = 1024
#: the default bound of a session's cache of its items (their JSON bytes)
CACHE_BYTES = 4 << 20
#: a ``list_turns`` limit no chain reaches (depths are below 2**63)
_ALL = 1 << 62

#: releases of path stores that ``close()`` started (kept so they are not collected unfinished)
_closing: set[asyncio.Task[None]] = set()

#: ``price(model, input_tokens, output_tokens)``: the cost in micro-units the budget ledger records
Price = Callable[[str, int, int], int]


class PforgeSession:
    """An OpenAI Agents SDK ``Session`` over a pforge_async store: see the module's documentation.

    ``session_settings``: a ``SessionSettings`` or a dict of its fields. ``prefix``: the first part of
    the context name (sessions under different prefixes never meet). ``record_usage``: True (the
    store's own budget ledger), a ``BudgetLedger``, or False; ``vendor``, ``model`` and ``price`` say
    what the spend is recorded as (cost 0 without ``price``). ``cache_bytes``: the bound of the
    session's cache of its items (see the module's documentation; 0 turns it off)."""

    session_settings: SessionSettings | None = None

    def __init__(
        self,
        session_id: str,
        store: StoreLike = MEMORY,
        *,
        session_settings: SessionSettings | dict[str, Any] | None = None,
        prefix: str = "openai-agents",
        record_usage: bool | BudgetLedger = False,
        vendor: str = "openai",
        model: str = "",
        price: Price | None = None,
        connect_options: dict[str, Any] | None = None,
        cache_bytes: int = CACHE_BYTES,
    ) -> None:
        if not isinstance(session_id, str):
            raise InvalidInput(f"session_id must be a str, got {type(session_id).__name__} {session_id!r:.80}")
        if not isinstance(prefix, str) or not prefix:
            raise InvalidInput(f"prefix must be a non-empty str, got {prefix!r}")
        self.session_id = session_id
        self.prefix = prefix
        self.session_settings = _settings(session_settings)
        self._backing = Backing(store, "PforgeSession", connect_options)
        # what a branch opens: the same store (for ":memory:", the very memory store this one made)
        self._store_arg: StoreLike = self._backing.fixed if self._backing.fixed is not None else store
        self._connect_options = connect_options
        self.name = _context_name(prefix, session_id)
        if isinstance(cache_bytes, bool) or not isinstance(cache_bytes, int) or cache_bytes < 0:
            raise InvalidInput(f"cache_bytes must be an int >= 0, got {cache_bytes!r}")
        self._cache = ChainCache(cache_bytes)
        #: the cache's changes, one at a time: the session may serve the event loops of several threads
        #: (each change is synchronous, so tasks of one loop never interleave inside one)
        self._cache_guard = threading.Lock()
        self._tracked: Tracked[None] | None = None
        self._seen_absent = False
        self._closed = False
        if not isinstance(record_usage, (bool, BudgetLedger)):
            raise InvalidInput(f"record_usage must be True, False or a BudgetLedger, got {record_usage!r}")
        self._record_usage = record_usage
        self.vendor = vendor
        self.model = model
        self._price = price
        #: per run (its RunContextWrapper): the usage already recorded
        self._recorded: dict[int, tuple[weakref.ref[Any], int, int]] = {}
        #: the ``session`` tag of the spend: the id, or where a tag cannot hold it (empty, over 1,024
        #: chars, half a surrogate pair) the session's context name
        self._tag = _tag_value(session_id, self.name)

    # -- opening and closing -------------------------------------------------------------------------

    async def _turns(self) -> TurnStoreBase:
        if self._closed:
            raise ActorClosed(f"PforgeSession {self.session_id!r} is closed")
        return await self._backing.open()

    async def _context(self, *, create: bool) -> Tracked[None] | None:
        tracked = self._tracked
        if tracked is not None:
            return tracked
        turns = await self._turns()
        info = await turns.open_context(self.name) if create else await turns.find_context(self.name)
        if info is None:
            # Seen absent: the first write expects it still empty (another writer's items are a conflict).
            self._seen_absent = True
            return None
        if self._tracked is None or self._tracked.context_id != info.context_id:
            head = 0 if create and self._seen_absent else info.head_turn_id
            self._tracked = Tracked(info.context_id, head, None)
            self._seen_absent = False
        return self._tracked

    async def aclose(self) -> None:
        """Release the store if this session opened it from a path. Later calls raise ``ActorClosed``."""
        self._closed = True
        await self._backing.aclose()

    def close(self) -> None:
        """Mark the session closed (every later call raises ``ActorClosed``). A store opened from a path
        is released by :meth:`aclose`; from synchronous code this cannot wait for that, so it is
        released when its event loop next runs."""
        self._closed = True
        if self._backing.path is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        task = loop.create_task(self._backing.aclose())
        _closing.add(task)
        task.add_done_callback(_closing.discard)

    async def __aenter__(self) -> PforgeSession:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- the Session protocol ------------------------------------------------------------------------

    async def get_items(
        self, limit: int | None = None, *, wrapper: RunContextWrapper[Any] | None = None
    ) -> list[TResponseInputItem]:
        """The last ``limit`` items (``session_settings.limit`` when None; every item when both are
        None), oldest first. ``limit`` 0 gives none; a negative one, every item (as SQLite's LIMIT)."""
        session_limit = resolve_session_limit(limit, self.session_settings)
        if session_limit is not None and (isinstance(session_limit, bool) or not isinstance(session_limit, int)):
            raise InvalidInput(f"limit must be an int or None, got {session_limit!r}")
        if session_limit == 0:
            await self._turns()
            return []
        wanted = session_limit if session_limit is not None and session_limit > 0 else None
        for _ in range(2):
            tracked = await self._context(create=False)
            if tracked is None:
                return []
            turns = await self._turns()
            mark = tracked.writes
            try:
                found = await self._from_cache(turns, tracked.context_id, wanted)
                if found is None:
                    found = await self._read_chain(turns, tracked.context_id, wanted)
            except ContextNotFound:
                self._tracked = None  # deleted (and maybe made again): look the name up again
                continue
            head, items = found
            tracked.saw(mark, tracked.context_id, head, None)
            return items
        return []

    async def _read_chain(
        self, turns: TurnStoreBase, context_id: int, wanted: int | None
    ) -> tuple[int, list[TResponseInputItem]]:
        """The head and the last ``wanted`` items (every item: None), read from the head back in one
        read; what it read becomes the cache."""
        records = await turns.list_turns(context_id, limit=_ALL if wanted is None else wanted)
        # erased turns (erase_turns, prune_context) are a prefix whose items are gone for good
        readable = [record for record in records if not record.erased]
        items = [self._item(record) for record in readable]
        if self._cache.max_bytes:
            reached_start = wanted is None or len(records) < wanted or records[0].parent_turn_id == 0
            with self._cache_guard:
                self._cache.clear()
                self._cache.extend(
                    ((r.turn_id, r.parent_turn_id, r.depth, r.payload) for r in readable),
                    complete=reached_start or len(readable) < len(records),
                )
        return (records[-1].turn_id if records else 0), items

    async def _from_cache(
        self, turns: TurnStoreBase, context_id: int, wanted: int | None
    ) -> tuple[int, list[TResponseInputItem]] | None:
        """The head and the last ``wanted`` items, from the cache and the turns after what it holds
        (read newest first, a page that grows, until a cached turn is met); None when a full read must
        do (nothing cached, another branch, an erasure, more wanted than cached)."""
        cache = self._cache
        if not cache.max_bytes or not cache.head:
            return None
        size = 1  # nearly always the head is the one cached: this session wrote it or read it last
        for _ in range(_SYNC_TRIES):
            page = await turns.list_turns(context_id, limit=size)
            if not page:
                return 0, []
            head = page[-1]
            new: list[TurnRecord] = []
            joined = False
            with self._cache_guard:
                for record in reversed(page):
                    if record.erased:
                        return None  # erased at or after where the cache joins: the full read sorts it out
                    if record.turn_id in cache:
                        cache.cut(record.turn_id)
                        joined = True
                        break
                    new.append(record)
                if joined:
                    # Taken now, with the turns after the join: other tasks of this session (and other
                    # threads using it) may change the cache while the check below waits.
                    cache.extend((r.turn_id, r.parent_turn_id, r.depth, self._valid(r)) for r in reversed(new))
                    payloads = cache.tail(wanted)
                    oldest = cache.oldest
                    break
                head_depth = cache.head_depth
            if page[0].parent_turn_id == 0:
                return None  # the whole chain, none of it cached: another chain; the full read starts again
            # The head moved on (another writer appended) or elsewhere: read back to the cached head's
            # depth if that is where it joins, else further.
            gap = head.depth - head_depth
            size = min(_SYNC_MAX, max(gap + 1, size * 8))
        else:
            return None
        if payloads is None:
            return None
        # An erasure of any cached turn erased the oldest one too (see _chaincache): its state, read
        # after the head's, says whether everything cached still holds.
        seen = next((r for r in page if r.turn_id == oldest), None)
        if seen is None:
            try:
                seen = await turns.get_turn(oldest)
            except TurnNotFound:
                seen = None  # deleted and collected since the head was read: the full read decides
        if seen is None or seen.erased:
            with self._cache_guard:
                cache.clear()
            return None
        return head.turn_id, self._decode(payloads)

    async def add_items(
        self, items: list[TResponseInputItem], *, wrapper: RunContextWrapper[Any] | None = None
    ) -> None:
        """Append the items, all in one atomic write (none of them if it fails)."""
        turns = await self._turns()
        if isinstance(items, (str, bytes, dict)):
            raise InvalidInput(f"add_items takes a list of items, not a {type(items).__name__}")
        if not items:
            return
        payloads = [_encode(item, i) for i, item in enumerate(items)]
        # Where the usage goes, and its cost, are settled before the items are stored: a session that
        # cannot record it refuses the call whole, rather than store the items and then fail (a retry
        # would add them twice).
        usage = self._unrecorded(wrapper)
        ledger = await self._ledger() if usage is not None else None
        tracked = await self._context(create=True)
        assert tracked is not None
        async with tracked.lock:
            await tracked.settle(turns, _no_state)
            expected = tracked.head
            try:
                records = await _append_chain(turns, tracked, expected, payloads, None)
            except HeadConflict as exc:
                raise tracked.conflict(self._what(), exc) from exc
            except ContextNotFound as exc:
                self._tracked = None
                raise ContextNotFound(f"{self._what()} was deleted while this session was writing it") from exc
            tracked.wrote(records[-1].turn_id, None)
            with self._cache_guard:
                if self._cache.head == expected:
                    # our own items, as encoded: the cache goes on from them without reading them back
                    self._cache.extend(
                        ((r.turn_id, r.parent_turn_id, r.depth, p) for r, p in zip(records, payloads, strict=True)),
                        complete=expected == 0,
                    )
        if usage is not None and ledger is not None and wrapper is not None:
            await self._usage(wrapper, usage, ledger, records[-1].turn_id)

    async def pop_item(self, *, wrapper: RunContextWrapper[Any] | None = None) -> TResponseInputItem | None:
        """Remove the most recent item (the head moves back one) and return it; None if there is none."""
        turns = await self._turns()
        tracked = await self._context(create=False)
        if tracked is None:
            return None
        async with tracked.lock:
            await tracked.settle(turns, _no_state)
            if not tracked.head:
                # nothing here as far as this session knows: see whether that is still so
                head = (await turns.get_head(tracked.context_id)).head_turn_id
                if head:
                    raise tracked.conflict(self._what(), HeadConflict(tracked.context_id, 0, head))
                return None
            record = await turns.get_turn(tracked.head)
            if record.erased:
                return None  # what is left was erased for good: nothing to give back
            item = self._item(record)
            await self._move_head(tracked, record.parent_turn_id)
        return item

    async def clear_session(self, *, wrapper: RunContextWrapper[Any] | None = None) -> None:
        """Empty the session: its head moves to nothing."""
        turns = await self._turns()
        tracked = await self._context(create=False)
        if tracked is None:
            return
        async with tracked.lock:
            await tracked.settle(turns, _no_state)
            if tracked.head:
                await self._move_head(tracked, 0)
            else:
                head = (await turns.get_head(tracked.context_id)).head_turn_id
                if head:
                    raise tracked.conflict(self._what(), HeadConflict(tracked.context_id, 0, head))

    async def _move_head(self, tracked: Tracked[None], turn_id: int) -> None:
        turns = await self._turns()
        expected = tracked.head
        try:
            await turns.set_head(tracked.context_id, turn_id, expected_head=expected)
        except HeadConflict as exc:
            raise tracked.conflict(self._what(), exc) from exc
        except ContextNotFound:
            self._tracked = None
            return  # deleted meanwhile: nothing left to move
        except BaseException:
            # set_head appends nothing, so no chain shows whether it landed: see the head afresh
            self._tracked = None
            raise
        tracked.wrote(turn_id, None)

    # -- compaction: the SDK's hook for an atomic replacement of the history's tail -------------------

    async def _get_compaction_snapshot(
        self, limit: int, *, prune_prefix: Callable[[TResponseInputItem], bool] | None = None
    ) -> _CompactionSnapshot | None:
        """The last ``limit`` items and a ``replace_suffix(start, output)`` that swaps the items from
        ``start`` on for ``output`` in one compare-and-set: only if the session still ends with exactly
        what was read (else False, nothing changed). The SDK's responses compaction uses it (as it does
        ``SQLiteSession``'s) instead of clear-and-re-add. ``prune_prefix``: also drop the oldest items
        it accepts (up to the first it refuses, before the replaced suffix): the kept items between are
        written again as a new chain, as a prefix cannot be cut off a chain in place.

        A subclass that changes how items are read or written gets None (as a ``SQLiteSession``
        subclass does): it must supply its own snapshot, or the SDK falls back to clear and re-add."""
        cls = type(self)
        if any(getattr(cls, m) is not getattr(PforgeSession, m) for m in _ITEM_METHODS):
            return None
        turns = await self._turns()
        for _ in range(2):
            tracked = await self._context(create=False)
            if tracked is None:
                break
            mark = tracked.writes
            try:
                records = await turns.list_turns(tracked.context_id, limit=max(0, limit))
            except ContextNotFound:
                self._tracked = None  # deleted (and maybe made again): look the name up again
                continue
            return self._snapshot(tracked, mark, records, limit, prune_prefix)
        # no session (never written, or deleted): nothing to compact, as SQLiteSession finds no rows
        return _CompactionSnapshot([], True, _nothing_to_replace)

    def _snapshot(
        self,
        tracked: Tracked[None],
        mark: int,
        records: list[TurnRecord],
        limit: int,
        prune_prefix: Callable[[TResponseInputItem], bool] | None,
    ) -> _CompactionSnapshot:
        head = records[-1].turn_id if records else 0
        tracked.saw(mark, tracked.context_id, head, None)
        complete = len(records) < limit or not records or records[0].parent_turn_id == 0 or records[0].erased
        records = [record for record in records if not record.erased]
        items = [self._item(record) for record in records]

        async def replace_suffix(start: int, output: list[TResponseInputItem]) -> bool:
            expected = records[start:]
            if not expected:
                return False
            return await self._replace_suffix(tracked, head, expected[0].parent_turn_id, output, prune_prefix)

        return _CompactionSnapshot(items, complete, replace_suffix)

    async def _replace_suffix(
        self,
        tracked: Tracked[None],
        head: int,
        base: int,
        output: list[TResponseInputItem],
        prune_prefix: Callable[[TResponseInputItem], bool] | None,
    ) -> bool:
        turns = await self._turns()
        payloads = [_encode(item, i) for i, item in enumerate(output)]
        async with tracked.lock:
            try:
                return await self._replace_suffix_locked(turns, tracked, head, base, payloads, prune_prefix)
            except ContextNotFound:
                # The session was deleted since the snapshot: it no longer ends with what was read,
                # so nothing is replaced (SQLiteSession, whose rows are gone, returns False too).
                self._tracked = None
                return False

    async def _replace_suffix_locked(
        self,
        turns: TurnStoreBase,
        tracked: Tracked[None],
        head: int,
        base: int,
        payloads: list[bytes],
        prune_prefix: Callable[[TResponseInputItem], bool] | None,
    ) -> bool:
        before: list[bytes] = []  # the items kept before the suffix, when a prefix is pruned
        restart = False
        if prune_prefix is not None and base:
            pruned = 0
            async for record in turns.iter_turns(tracked.context_id, page_size=_PAGE):
                if not record.erased and not prune_prefix(self._item(record)):
                    break
                pruned = record.depth
                if record.turn_id == base:
                    break
            if pruned:
                restart = True
                async for record in turns.iter_turns(tracked.context_id, page_size=_PAGE):
                    if record.depth > pruned:
                        before.append(record.payload)
                    if record.turn_id == base:
                        break
        chain = [*before, *payloads]
        try:
            if not chain:
                await turns.set_head(tracked.context_id, 0 if restart else base, expected_head=head)
                new_head = 0 if restart else base
            else:
                records = await _append_chain(turns, tracked, head, chain, 0 if restart else base)
                new_head = records[-1].turn_id
        except HeadConflict:
            return False  # the session changed since the snapshot: nothing replaced
        except ContextNotFound:
            raise
        except BaseException:
            if tracked.uncertain is None and tracked.landing is None:
                self._tracked = None  # the outcome is unknown: see the head afresh
            raise
        tracked.wrote(new_head, None)
        return True

    # -- beyond the SDK's sessions -------------------------------------------------------------------

    async def branch(self, session_id: str | None = None, *, from_item: int | None = None) -> PforgeSession:
        """A new session (``session_id``, or one made up from this one's) holding this session's first
        ``from_item`` items (all of them when None; a negative one counts from the end, as a slice
        does): a fork of this session's chain, O(1) whatever its length. The two go their own ways."""
        turns = await self._turns()
        new_id = session_id if session_id is not None else f"{self.session_id}@{uuid4().hex[:12]}"
        branch = PforgeSession(
            new_id,
            self._store_arg,
            session_settings=self.session_settings,
            prefix=self.prefix,
            record_usage=self._record_usage,
            vendor=self.vendor,
            model=self.model,
            price=self._price,
            connect_options=self._connect_options,
        )
        tracked = await self._context(create=False)
        head = (await turns.get_head(tracked.context_id)) if tracked is not None else None
        depth = head.head_depth if head is not None else 0
        keep = depth if from_item is None else _slice_end(from_item, depth)
        at = 0
        if keep and head is not None:
            at = await _turn_at(turns, head.context_id, head.head_depth, keep)
        parent = tracked.context_id if tracked is not None else None
        try:
            if at:
                info = await turns.fork_context(at, name=branch.name, parent_context_id=parent)
            else:
                info = await turns.create_context(name=branch.name, parent_context_id=parent)
        except Conflict as exc:
            raise Conflict(f"branch: session {new_id!r} already exists; name a new one") from exc
        branch._tracked = Tracked(info.context_id, info.head_turn_id, None)
        return branch

    def _unrecorded(self, wrapper: RunContextWrapper[Any] | None) -> tuple[int, int, int, int, int] | None:
        """The run's token usage (input, output), what of it is not recorded yet, and that spend's cost
        (``price`` is asked here, before the items are stored); None: nothing to record."""
        if wrapper is None or self._record_usage is False:
            return None
        usage = getattr(wrapper, "usage", None)
        if usage is None:
            return None
        input_tokens, output_tokens = int(usage.input_tokens or 0), int(usage.output_tokens or 0)
        known = self._recorded.get(id(wrapper))
        if known is not None and known[0]() is wrapper:
            before_in, before_out = known[1], known[2]
        else:
            before_in = before_out = 0
        spent_in, spent_out = input_tokens - before_in, output_tokens - before_out
        if spent_in <= 0 and spent_out <= 0:
            return None
        model = self.model or "unknown"
        cost = self._price(model, max(spent_in, 0), max(spent_out, 0)) if self._price is not None else 0
        # Everything the ledger will check, checked now, before the items are stored: a refusal after
        # them would leave the items stored and the spend not (and a retry would store them twice).
        text(self.vendor, "vendor")
        text(model, "model")
        whole(max(spent_in, 0), "the run's input_tokens")
        whole(max(spent_out, 0), "the run's output_tokens")
        whole(cost, f"price({model!r}, ...)'s cost")
        return input_tokens, output_tokens, spent_in, spent_out, cost

    async def _ledger(self) -> BudgetLedger:
        ledger = self._record_usage if isinstance(self._record_usage, BudgetLedger) else await self._backing.budget()
        if ledger is None:
            raise InvalidInput(
                f"{self._what()}: record_usage=True needs a store with a budget ledger (a Store or a path), "
                "not a bare turn store: pass record_usage=<a BudgetLedger>; nothing was stored"
            )
        return ledger

    async def _usage(
        self, wrapper: RunContextWrapper[Any], usage: tuple[int, int, int, int, int], ledger: BudgetLedger, turn_id: int
    ) -> None:
        input_tokens, output_tokens, spent_in, spent_out, cost = usage
        await ledger.record_spend(
            self.vendor,
            self.model or "unknown",
            input_tokens=max(spent_in, 0),
            output_tokens=max(spent_out, 0),
            cost=cost,
            idempotency_key=self._spend_key(turn_id),
            tags={"session": self._tag},
            allow_overdraw=True,  # the tokens are spent already: record them even past a limit
        )
        self._recorded = {k: v for k, v in self._recorded.items() if v[0]() is not None}
        self._recorded[id(wrapper)] = (weakref.ref(wrapper), input_tokens, output_tokens)

    def _spend_key(self, turn_id: int) -> str:
        """The spend's idempotency key: the session's name and the turn the spend is recorded at, the
        name's SHA-256 where the key would be over the ledger's 1,024 chars."""
        key = f"pforge-session:{self.name}@{turn_id}"
        if len(key) <= MAX_TEXT:
            return key
        return f"pforge-session:sha256:{hashlib.sha256(self.name.encode()).hexdigest()}@{turn_id}"

    # -- helpers -------------------------------------------------------------------------------------

    def _what(self) -> str:
        return f"session {self.session_id!r}"

    def _valid(self, record: TurnRecord) -> bytes:
        """The payload of an item's turn, checked once (``IntegrityError`` if it is not one)."""
        self._item(record)
        return record.payload

    def _decode(self, payloads: list[bytes]) -> list[TResponseInputItem]:
        """Fresh items (a caller may change them) from checked payloads: one decode of them all as a
        JSON array; what msgspec refuses but ``json`` takes (NaN, lone surrogates) item by item."""
        if not payloads:
            return []
        try:
            return cast(list[TResponseInputItem], msgspec.json.decode(b"[" + b",".join(payloads) + b"]"))
        except msgspec.MsgspecError:
            return [cast(TResponseInputItem, json.loads(payload)) for payload in payloads]

    def _item(self, record: TurnRecord) -> TResponseInputItem:
        if record.type_id != ITEM:
            raise IntegrityError(
                f"{self._what()}: turn {record.turn_id} is a {record.type_id!r}, not an item: the name "
                f"{self.name!r} is taken by something else"
            )
        try:
            return cast(TResponseInputItem, json.loads(record.payload))
        except ValueError as exc:
            raise IntegrityError(f"{self._what()}: turn {record.turn_id} is not a JSON item: {exc}") from exc


def _no_state(record: TurnRecord) -> None:
    return None


async def _append_chain(
    turns: TurnStoreBase, tracked: Tracked[None], expected: int, payloads: list[bytes], root: int | None
) -> list[TurnRecord]:
    """Append the items' turns as one chain (its first turn's parent: ``root``, or the head when None)
    if the head is still ``expected`` (``HeadConflict`` otherwise), all or none, whatever their number
    and size: past what one ``append_turns`` takes (4,096 turns, 64 MiB), the chain is built in a
    scratch context and the head moved to its end in one compare-and-set, as ``SQLiteSession`` takes
    any number of items in one transaction. An outcome left unknown (a failure or cancellation on
    the way) is recorded on ``tracked`` for its next write to learn."""
    context_id = tracked.context_id
    new = [NewTurn(context_id, ITEM, p, parent_turn_id=root if i == 0 else None) for i, p in enumerate(payloads)]
    batches = split_batches(new)
    if len(batches) == 1:
        try:
            return await turns.append_turns(new, expected_heads={context_id: expected})
        except (HeadConflict, ContextNotFound):
            raise
        except BaseException:
            if root is None:
                tracked.uncertain = (expected, payloads)
            raise
    current = (await turns.get_head(context_id)).head_turn_id
    if current != expected:
        raise HeadConflict(context_id, expected, current)
    base = expected if root is None else root
    scratch = await turns.create_context(
        base or None, parent_context_id=context_id, metadata={"pforge": f"openai-agents items for context {context_id}"}
    )
    try:
        records: list[TurnRecord] = []
        for batch in batches:
            moved = [msgspec.structs.replace(t, context_id=scratch.context_id) for t in batch]
            records += await turns.append_turns(moved)
        try:
            await turns.set_head(context_id, records[-1].turn_id, expected_head=expected)
        except (HeadConflict, ContextNotFound):
            raise
        except BaseException:
            tracked.landing = (expected, records[-1].turn_id)
            raise
    finally:
        with contextlib.suppress(ContextNotFound):
            await turns.delete_context(scratch.context_id)
    return records


async def _nothing_to_replace(start: int, output: list[TResponseInputItem]) -> bool:
    return False


#: the methods whose override makes a subclass supply its own compaction snapshot
_ITEM_METHODS = ("get_items", "add_items", "pop_item", "clear_session")


#: starts the name of a session whose id cannot be a context name as it is (see _context_name)
_HASHED = "\x01"


def _context_name(prefix: str, session_id: str) -> str:
    """``<prefix>/<session_id>``, a context name, for every id SQLiteSession takes (a str). "" gives
    ``<prefix>/``, which no other id gives. An id the store's names cannot hold (a NUL, a lone
    surrogate, more than the name's 1,024 UTF-8 bytes), and any id starting with ``\\x01``, is named
    by its SHA-256 instead, after ``\\x01``: no plain name starts so, so the two never meet."""
    if not session_id.startswith(_HASHED):
        try:
            return validate_name(f"{prefix}/{session_id}", "the session's context name")
        except InvalidInput:
            pass
    digest = hashlib.sha256(session_id.encode("utf-8", "surrogatepass")).hexdigest()
    return validate_name(f"{prefix}/{_HASHED}{digest}", "the session's context name (prefix too long?)")


def _tag_value(session_id: str, name: str) -> str:
    try:
        return text(session_id, "tag")
    except InvalidInput:
        return name


def _settings(value: SessionSettings | dict[str, Any] | None) -> SessionSettings:
    if value is None:
        return SessionSettings()
    from agents.memory.session_settings import coerce_session_settings

    return coerce_session_settings(value)


def _encode(item: object, index: int) -> bytes:
    try:
        text = json.dumps(item, ensure_ascii=False, separators=(",", ":"))
        try:
            return text.encode()
        except UnicodeEncodeError:
            # A lone surrogate (text cut mid-pair) has no UTF-8: written as a \u escape, as the SDK's
            # SQLiteSession writes every item, it reads back the same.
            return json.dumps(item, separators=(",", ":")).encode()
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"item {index} is not JSON-serializable: {exc}") from exc


def _slice_end(from_item: int, depth: int) -> int:
    if isinstance(from_item, bool) or not isinstance(from_item, int):
        raise InvalidInput(f"from_item must be an int or None, got {from_item!r}")
    return max(0, min(depth, from_item if from_item >= 0 else depth + from_item))


async def _turn_at(turns: TurnStoreBase, context_id: int, head_depth: int, depth: int) -> int:
    """The turn at ``depth`` of the chain, reading from whichever end is nearer."""
    if head_depth - depth < depth:
        return (await turns.list_turns(context_id, limit=head_depth - depth + 1))[0].turn_id
    last = 0
    async for record in turns.iter_turns(context_id, page_size=min(depth, MAX_PAGE_SIZE)):
        last = record.turn_id
        if record.depth == depth:
            break
    return last
