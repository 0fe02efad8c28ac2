"""The public turn store API, written once: backends differ in how a command is carried and applied,
and in how reads are served.

Every public method validates its arguments here (types, id ranges, text, sizes, that an ``fs_root``
names a tree in the CAS) before a backend sees them, and every turn a read returns is checked here
against its ``payload_hash``. A backend implements ``_write`` (apply a validated command, all or
nothing) and the ``_``-prefixed read hooks below.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Iterable, Mapping, Sequence
from typing import Any, Protocol

from ..cas.objects import validate_oid
from ..errors import InvalidInput, ObjectNotFound
from .commands import (
    AppendTurn,
    AppendTurns,
    AttachFs,
    CreateContext,
    DeleteContext,
    EraseTurns,
    PublishBundle,
    PutBlob,
    SetContextMetadata,
    SetHead,
    TurnCommand,
)
from .rules import (
    DEFAULT_MAX_PAYLOAD,
    MAX_BATCH_BYTES,
    MAX_BATCH_TURNS,
    MAX_ID,
    MAX_LIST_LIMIT,
    MAX_PAGE_SIZE,
    check_text,
    decode_cursor,
    encode_cursor,
    encode_metadata,
    plain_bytes,
    plain_str,
    validate_append,
    validate_bundle,
    validate_id,
    validate_key,
    validate_limit,
    validate_name,
    validate_order,
    validate_prefix,
    validate_refs,
    verify_turn,
)
from .types import ContextHead, ContextInfo, ContextOrder, ContextPage, NewTurn, TurnRecord

__all__ = ["ContextKey", "TreeSource", "TurnStoreBase"]

#: a position in a ``list_contexts`` order (see ``rules.encode_cursor``)
ContextKey = tuple[int, int] | tuple[int] | tuple[str]


class TreeSource(Protocol):
    """Where ``fs_root`` oids are checked: anything with the CAS's ``read_tree`` (``store.cas`` is one).
    It raises ``ObjectNotFound`` for a missing object and ``InvalidInput`` for one that is not a tree.
    One that also has ``async has_many(oids) -> list[bool]`` (a flag per oid, in order) gets a turn's
    refs checked in one call."""

    async def read_tree(self, oid: str) -> object: ...

    async def has(self, oid: str) -> bool: ...


class TurnStoreBase(ABC):
    """``TurnStore`` + ``SessionStore`` + ``TypedTurnStore`` + ``ArtifactStore``; see ``pforge_async.turnstore``.

    ``trees`` is where ``fs_root`` oids are checked (the SQLite store passes its CAS). A store without
    one accepts no ``fs_root``: it cannot know the oid names a tree (``ObjectNotFound``).
    """

    def __init__(self, *, max_payload_bytes: int = DEFAULT_MAX_PAYLOAD, trees: TreeSource | None = None) -> None:
        validate_limit(max_payload_bytes, "max_payload_bytes")
        self.max_payload_bytes = max_payload_bytes
        self._trees = trees

    @abstractmethod
    def _write(self, command: TurnCommand) -> Awaitable[object]:
        """Carry a validated command to where it is applied; awaited, its reply. A coroutine function,
        or a function handing on its actor's awaitable (``Actor.send``): every level of coroutines
        between a hook and the reply is resumed at every reply."""

    # -- contexts ------------------------------------------------------------------------------------

    async def create_context(
        self,
        base_turn_id: int | None = None,
        *,
        name: str | None = None,
        metadata: dict[str, Any] | None = None,
        parent_context_id: int | None = None,
        idempotency_key: str | None = None,
    ) -> ContextInfo:
        """A new context, empty or starting at ``base_turn_id`` (which it shares, not copies).

        ``name`` must not be taken (``Conflict``; see ``open_context`` for get-or-create).
        ``parent_context_id`` records lineage (0/None: none). With ``idempotency_key`` (scoped to the
        store, one space for every context creation and fork), the same key again returns the same
        context as it is now and creates nothing; the same key for a different request raises
        ``IdempotencyConflict``. So a caller that crashed after creating can retry and find it.
        """
        base = 0 if base_turn_id is None else validate_id(base_turn_id, "base_turn_id")
        parent = 0 if parent_context_id is None else validate_id(parent_context_id, "parent_context_id")
        return await self._create(
            CreateContext(
                base,
                None if name is None else validate_name(name),
                encode_metadata(metadata),
                parent,
                validate_key(idempotency_key),
            )
        )

    async def fork_context(
        self,
        from_turn_id: int,
        *,
        parent_context_id: int | None = None,
        name: str | None = None,
        metadata: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> ContextInfo:
        """A new context whose head is ``from_turn_id``: O(1), nothing is copied.

        The fork records where it came from: ``base_turn_id`` is ``from_turn_id`` and
        ``parent_context_id`` the context given, or by default the context ``from_turn_id`` was
        appended in. ``name``, ``metadata`` and ``idempotency_key`` as for ``create_context``: with a
        key, a crash between the fork and the next write leaves no orphan, since the retry finds it.
        """
        base = validate_id(from_turn_id, "from_turn_id")
        parent = None if parent_context_id is None else validate_id(parent_context_id, "parent_context_id")
        return await self._create(
            CreateContext(
                base,
                None if name is None else validate_name(name),
                encode_metadata(metadata),
                parent,
                validate_key(idempotency_key),
            )
        )

    async def open_context(
        self,
        name: str,
        *,
        base_turn_id: int | None = None,
        parent_context_id: int | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> ContextInfo:
        """The context named ``name``, created (with the other arguments) if there is none.

        Get-or-create: across tasks and processes exactly one context ever has a name, and an existing
        one is returned unchanged, whatever the other arguments say (they are validated, not compared).
        """
        base = 0 if base_turn_id is None else validate_id(base_turn_id, "base_turn_id")
        parent = 0 if parent_context_id is None else validate_id(parent_context_id, "parent_context_id")
        command = CreateContext(base, validate_name(name), encode_metadata(metadata), parent, open_existing=True)
        return await self._create(command)

    async def _create(self, command: CreateContext) -> ContextInfo:
        info = await self._write(command)
        assert isinstance(info, ContextInfo)
        return info

    async def get_context(self, context_id: int) -> ContextInfo:
        """Everything about a context but its turns; ``ContextNotFound`` if there is none."""
        return await self._get_context(validate_id(context_id, "context_id"))

    async def find_context(self, name: str) -> ContextInfo | None:
        """The context named ``name``, or None."""
        return await self._find_context(validate_name(name))

    async def list_contexts(
        self,
        *,
        prefix: str | None = None,
        parent_context_id: int | None = None,
        order: ContextOrder = "updated",
        after: str | None = None,
        limit: int = 100,
    ) -> ContextPage:
        """One page of contexts, and the cursor to pass as ``after`` for the next (None at the end).

        ``prefix``: only contexts whose name starts with it ("" for every named context).
        ``parent_context_id``: only the contexts forked from (or created with lineage to) that one.
        ``order``: ``"updated"``, most recently changed first (``updated_at_ms``, then the higher
        context id); ``"created"``, newest first (by context id, which the store allocates
        increasing); ``"name"``, ascending by code point, which is UTF-8 byte order; contexts without
        a name are not listed in this order.
        A cursor is a position in its order, not a snapshot: the next page holds the contexts strictly
        after it as they stand then; in one pass each context appears at most once, and one changed
        during the pass may move ahead of the cursor and be left out of that pass.
        Cost grows with ``limit`` (and the log of the number of contexts), not with the number of
        contexts in the store; with a filter it grows with the contexts that pass the filter when the
        order is not the filter's own (``prefix`` with a time order, ``parent_context_id`` with any).
        """
        checked_prefix = None if prefix is None else validate_prefix(prefix)
        parent = None if parent_context_id is None else validate_id(parent_context_id, "parent_context_id")
        checked_order = validate_order(order)
        key = None if after is None else decode_cursor(checked_order, after)
        validate_limit(limit, low=1, high=MAX_LIST_LIMIT)
        found = await self._list_contexts(checked_prefix, parent, checked_order, key, limit)
        if len(found) > limit:
            found = found[:limit]
            return ContextPage(found, encode_cursor(checked_order, found[-1]))
        return ContextPage(found, None)

    async def set_context_metadata(
        self, context_id: int, metadata: dict[str, Any], *, expected_updated_at_ms: int | None = None
    ) -> ContextInfo:
        """Replace a context's metadata (a change: ``updated_at_ms`` moves). With
        ``expected_updated_at_ms``, only if the context has not changed since (``Conflict`` otherwise)."""
        context_id = validate_id(context_id, "context_id")
        if metadata is None:
            raise InvalidInput("metadata must be a dict, got None (pass {} to clear it)")
        expected = None
        if expected_updated_at_ms is not None:
            expected = validate_id(expected_updated_at_ms, "expected_updated_at_ms", allow_zero=True)
        info = await self._write(SetContextMetadata(context_id, encode_metadata(metadata), expected))
        assert isinstance(info, ContextInfo)
        return info

    async def set_head(self, context_id: int, turn_id: int, *, expected_head: int | None = None) -> ContextInfo:
        """Move a context's head to any existing turn (``TurnNotFound`` otherwise), or to 0 to clear it:
        undo, "pop the last item", switching branches. No turn is removed. With ``expected_head``,
        only if the head is still that (``HeadConflict`` otherwise). Always a change (``updated_at_ms``)."""
        context_id = validate_id(context_id, "context_id")
        turn_id = validate_id(turn_id, "turn_id", allow_zero=True)
        if expected_head is not None:
            expected_head = validate_id(expected_head, "expected_head", allow_zero=True)
        info = await self._write(SetHead(context_id, turn_id, expected_head))
        assert isinstance(info, ContextInfo)
        return info

    async def delete_context(self, context_id: int) -> None:
        """Delete a context: afterwards it is not found by id (``ContextNotFound`` from every call
        that names it) nor by name, is in no ``list_contexts``, and its name is free for a new context.
        Its metadata, its creation key (a ``create_context``/``fork_context`` retry with that key then
        creates a new context) and the idempotency keys of its turns go with it.

        Its turns stay readable by id: other contexts may share them (forks, ``set_head``), and
        records keep their ``context_id``. ``gc`` reclaims the turns no live context reaches. The id
        is never given to another context. A context forked from it keeps its ``parent_context_id``
        (lineage only), and a fork from one of its turns that names no parent gets none (0).
        ``ContextNotFound`` if there is no such context (deleting twice is an error, so a caller can
        tell a delete that found nothing)."""
        context_id = validate_id(context_id, "context_id")
        await self._write(DeleteContext(context_id))

    async def erase_turns(self, context_id: int, *, before_turn_id: int | None = None) -> int:
        """Erase, for good, the payloads of the context's chain: every turn from the head down, or
        only those before ``before_turn_id`` (which must be on the chain: ``InvalidInput``). Returns
        how many turns this erased (turns erased before are not counted).

        The records stay, so every chain still holds: reads return them with ``erased=True``,
        ``payload=b""`` and ``payload_hash=""`` (type, parent, depth, key, ``fs_root``, times are kept),
        and never the old bytes. A turn is erased for every context that shares it. An erased turn's
        ancestors are erased too (erasure always takes a whole prefix of a chain). The bytes leave
        the files of the store at the next ``gc`` (SQLite pages wiped, the filesystem log rewritten).
        A retried append whose key names an erased turn gets the erased record back (its payload
        cannot be compared any more)."""
        context_id = validate_id(context_id, "context_id")
        if before_turn_id is not None:
            before_turn_id = validate_id(before_turn_id, "before_turn_id")
        erased = await self._write(EraseTurns(context_id, before_turn_id))
        assert isinstance(erased, int)
        return erased

    async def prune_context(self, context_id: int, *, keep_last: int) -> int:
        """Keep the payloads of the context's last ``keep_last`` turns (head included) and erase the
        older ones' (as ``erase_turns``; 0 erases all). Decided against the head at the time of the
        write, in one command. Returns how many turns this erased."""
        context_id = validate_id(context_id, "context_id")
        keep_last = validate_limit(keep_last, "keep_last", low=0, high=MAX_ID)
        erased = await self._write(EraseTurns(context_id, keep_last=keep_last))
        assert isinstance(erased, int)
        return erased

    # -- turns: writes -------------------------------------------------------------------------------

    async def append_turn(
        self,
        context_id: int,
        type_id: str,
        payload: bytes,
        *,
        type_version: int = 1,
        parent_turn_id: int | None = None,
        idempotency_key: str | None = None,
        expected_head: int | None = None,
        fs_root: str | None = None,
        refs: Iterable[str] = (),
    ) -> TurnRecord:
        """Append a turn (its parent defaults to the head) and move the head to it.

        With ``idempotency_key``, a retry returns the turn first stored and writes nothing; the same
        key for a different payload, type, explicit parent or explicit ``fs_root`` raises
        ``IdempotencyConflict``. With ``expected_head`` (0: empty), the append happens only if the head
        is still that turn, else ``HeadConflict``; a retry whose first attempt landed gets its turn
        back, not a conflict. ``fs_root`` (a CAS tree id: ``ObjectNotFound`` / ``InvalidInput``
        otherwise) is attached in the same write.

        ``refs``: CAS objects (ids of blobs from ``put_blob``, trees, commits; at most 4,096) the turn
        keeps alive besides ``fs_root``: ``gc`` reclaims no object a live turn names. Each must be in
        the store's CAS, or among its own blobs for a store without one (``ObjectNotFound``). They are
        stored sorted, each once; an erasure drops them with the payload. A retry that names refs
        must name the same (``IdempotencyConflict``).
        """
        if type(payload) is not bytes:
            payload = plain_bytes(payload)
        command = AppendTurn(
            context_id,
            type_id,
            payload,
            type_version,
            parent_turn_id,
            idempotency_key,
            expected_head,
            fs_root,
            () if type(refs) is tuple and not refs else validate_refs(refs),  # the default: no call
        )
        command = validate_append(command, self.max_payload_bytes)
        if command.fs_root is not None:
            await self._check_tree(command.fs_root)
        if command.refs:
            await self._check_refs(command.refs)
        record = await self._write(command)
        assert isinstance(record, TurnRecord)
        if record.payload != payload:
            verify_turn(record)  # a retry answered from storage: never hand back damaged bytes
        return record

    async def append_turns(
        self, turns: Sequence[NewTurn], *, expected_heads: Mapping[int, int] | None = None
    ) -> list[TurnRecord]:
        """Append every turn or none, across contexts, in one write; turns of one context chain in the
        order given (a ``parent_turn_id`` of None follows the batch's own earlier turns). Returns their
        records in order (a turn whose key is already stored comes back as first stored).

        ``expected_heads`` maps context ids to the head each must have before the batch
        (``HeadConflict`` otherwise; a context whose turns in the batch are all retries of stored keys
        is not checked, so a retried batch that landed gets its turns back). At most 4,096 turns and
        64 MiB of payload (or ``max_payload_bytes``, if more) per batch.
        """
        # A list (what a recorder's batch passes) needs no check against the Sequence ABC.
        if type(turns) is not list and (isinstance(turns, (str, bytes)) or not isinstance(turns, Sequence)):
            raise InvalidInput(f"turns must be a sequence of NewTurn, got {type(turns).__name__}")
        if len(turns) > MAX_BATCH_TURNS:
            raise InvalidInput(f"a batch of {len(turns)} turns is over the maximum of {MAX_BATCH_TURNS}")
        commands: list[AppendTurn] = []
        total = 0
        trees: set[str] = set()
        refs: set[str] = set()
        for i, turn in enumerate(turns):
            if not isinstance(turn, NewTurn):
                raise InvalidInput(f"turns[{i}] must be a NewTurn, got {type(turn).__name__}")
            try:
                payload = plain_bytes(turn.payload)
                command = AppendTurn(
                    turn.context_id,
                    turn.type_id,
                    payload,
                    turn.type_version,
                    turn.parent_turn_id,
                    turn.idempotency_key,
                    None,
                    turn.fs_root,
                    validate_refs(turn.refs),
                )
                command = validate_append(command, self.max_payload_bytes)
            except InvalidInput as exc:
                raise InvalidInput(f"turns[{i}]: {exc}") from exc
            total += len(payload)
            if command.fs_root is not None:
                trees.add(command.fs_root)
            if command.refs:
                refs.update(command.refs)
            commands.append(command)
        if total > max(MAX_BATCH_BYTES, self.max_payload_bytes):
            raise InvalidInput(f"a batch of {total} payload bytes is over the maximum of {MAX_BATCH_BYTES}")
        heads: dict[int, int] = {}
        if expected_heads is not None:
            if not isinstance(expected_heads, Mapping):
                raise InvalidInput(f"expected_heads must be a mapping, got {type(expected_heads).__name__}")
            for context_id, head in expected_heads.items():
                checked = validate_id(context_id, "expected_heads context id")
                heads[checked] = validate_id(head, f"expected head of context {context_id}", allow_zero=True)
        for oid in sorted(trees):
            await self._check_tree(oid)
        if refs:  # most batches name none: no check to await
            await self._check_refs(sorted(refs))
        records = await self._write(AppendTurns(commands, heads))
        assert isinstance(records, list)
        for record, command in zip(records, commands, strict=True):
            if record.payload != command.payload:
                verify_turn(record)
        return records

    # -- turns: reads --------------------------------------------------------------------------------

    async def get_head(self, context_id: int) -> ContextHead:
        return await self._get_head(validate_id(context_id, "context_id"))

    async def get_turn(self, turn_id: int) -> TurnRecord:
        """A turn, its payload checked against its hash (``IntegrityError`` naming it if damaged)."""
        return verify_turn(await self._get_turn(validate_id(turn_id, "turn_id")))

    async def get_turn_by_key(self, context_id: int, key: str) -> TurnRecord | None:
        """The turn appended in ``context_id`` with idempotency key ``key``, or None (the context must
        exist: ``ContextNotFound``). What a resuming loop asks before redoing a step."""
        context_id = validate_id(context_id, "context_id")
        key = validate_key(key, "key")  # type: ignore[assignment]
        if key is None:
            raise InvalidInput("key must be a non-empty str, got None")
        record = await self._get_turn_by_key(context_id, key)
        return None if record is None else verify_turn(record)

    async def list_turns(
        self, context_id: int, *, before_turn_id: int | None = None, limit: int = 64
    ) -> list[TurnRecord]:
        """Oldest to newest, the ``limit`` turns that end at the head, or just before
        ``before_turn_id`` (which must be on the context's chain)."""
        context_id = validate_id(context_id, "context_id")
        if before_turn_id is not None:
            before_turn_id = validate_id(before_turn_id, "before_turn_id")
        limit = validate_limit(limit)
        return [verify_turn(record) for record in await self._list_turns(context_id, before_turn_id, limit)]

    def iter_turns(
        self, context_id: int, *, newest_first: bool = False, page_size: int = 256
    ) -> AsyncIterator[TurnRecord]:
        """Every turn of the context's chain, from the first (depth 1) to the head, or the reverse.

        The chain is the one that ends at the head when iteration starts; appends and head moves
        after that do not change what this iteration yields (turns are immutable). It is read
        ``page_size`` turns at a time: memory stays bounded by a page and each page costs the same
        at any depth (oldest-first pages find their top through the skip links). Arguments are
        checked at the call; ``ContextNotFound`` comes at the first ``__anext__``.
        """
        context_id = validate_id(context_id, "context_id")
        if not isinstance(newest_first, bool):
            raise InvalidInput(f"newest_first must be a bool, got {type(newest_first).__name__}")
        page_size = validate_limit(page_size, "page_size", low=1, high=MAX_PAGE_SIZE)
        return self._iter_turns(context_id, newest_first, page_size)

    async def _iter_turns(self, context_id: int, newest_first: bool, page_size: int) -> AsyncIterator[TurnRecord]:
        head = await self._get_head(context_id)
        if newest_first:
            top = head.head_turn_id
            while top:
                page = await self._chain(top, page_size)
                for record in reversed(page):
                    yield verify_turn(record)
                top = page[0].parent_turn_id
            return
        start = 1
        while start <= head.head_depth:
            end = min(start + page_size - 1, head.head_depth)
            top = await self._ancestor_at(head.head_turn_id, end)
            for record in await self._chain(top, end - start + 1):
                yield verify_turn(record)
            start = end + 1

    # -- read hooks every backend implements ---------------------------------------------------------

    @abstractmethod
    async def _get_head(self, context_id: int) -> ContextHead: ...

    @abstractmethod
    async def _get_turn(self, turn_id: int) -> TurnRecord:
        """The stored record as it is; the base verifies its payload."""

    @abstractmethod
    async def _list_turns(self, context_id: int, before_turn_id: int | None, limit: int) -> list[TurnRecord]: ...

    @abstractmethod
    async def _get_context(self, context_id: int) -> ContextInfo:
        """``ContextNotFound`` if there is none."""

    @abstractmethod
    async def _find_context(self, name: str) -> ContextInfo | None: ...

    @abstractmethod
    async def _list_contexts(
        self,
        prefix: str | None,
        parent_context_id: int | None,
        order: ContextOrder,
        after: ContextKey | None,
        limit: int,
    ) -> list[ContextInfo]:
        """Up to ``limit + 1`` contexts in ``order`` (see ``rules.encode_cursor``: descending keys for
        "updated" and "created", ascending names for "name"), strictly after ``after``, filtered by
        ``prefix`` (name starts with it) and ``parent_context_id``. The base makes the page and cursor."""

    @abstractmethod
    async def _get_turn_by_key(self, context_id: int, key: str) -> TurnRecord | None:
        """``ContextNotFound`` if the context does not exist."""

    @abstractmethod
    async def _chain(self, top_turn_id: int, limit: int) -> list[TurnRecord]:
        """Oldest to newest, the ``limit`` turns that end at ``top_turn_id`` (included; it exists)."""

    @abstractmethod
    async def _ancestor_at(self, turn_id: int, depth: int) -> int:
        """The ancestor of ``turn_id`` (itself included) at ``depth`` (1 <= depth <= its depth), in
        O(log depth) over the skip links."""

    @abstractmethod
    async def check(self) -> list[str]:
        """What is wrong in the stored data (damaged payloads and records, broken invariants), one
        line per problem naming the thing at fault; [] when sound."""

    async def _check_tree(self, oid: str) -> None:
        """``ObjectNotFound`` / ``InvalidInput`` unless ``oid`` (already a valid oid) names a tree."""
        if self._trees is None:
            raise ObjectNotFound(
                f"fs_root {oid}: {type(self).__name__} has no CAS to hold trees (give it trees=, e.g. store.cas)"
            )
        try:
            await self._trees.read_tree(oid)
        except ObjectNotFound as exc:
            raise ObjectNotFound(f"fs_root {oid} is not in the CAS") from exc
        except InvalidInput as exc:
            raise InvalidInput(f"fs_root {oid} is not a tree: {exc}") from exc
        # read_tree does not freshen; has() does, so a CAS gc running now (or within the grace) keeps
        # the tree this turn is about to name, however old it is.
        has = getattr(self._trees, "has", None)
        if has is not None and not await has(oid):
            raise ObjectNotFound(f"fs_root {oid} is not in the CAS")

    async def _check_refs(self, oids: Sequence[str]) -> None:
        """``ObjectNotFound`` naming the first of ``oids`` (valid oids) that is not in the CAS.

        A turn of a growing chat names every chunk of its history, so checking one ref per await
        (a hop to a worker thread each) cost the LangGraph adapter more than its own code: a CAS
        with ``has_many`` answers for all of them in one hop. A backend that checks refs its own way
        (overriding ``_check_ref``) is asked once per ref."""
        if not oids:
            return
        many = getattr(self._trees, "has_many", None)
        if len(oids) == 1 or many is None or type(self)._check_ref is not TurnStoreBase._check_ref:
            for oid in oids:
                await self._check_ref(oid)
            return
        present = await many(oids)
        for oid, found in zip(oids, present, strict=True):
            if not found:
                raise ObjectNotFound(f"ref {oid} is not in the CAS")

    async def _check_ref(self, oid: str) -> None:
        """``ObjectNotFound`` unless ``oid`` (already a valid oid) is in the CAS."""
        if self._trees is None:
            raise ObjectNotFound(f"ref {oid}: {type(self).__name__} has no CAS (give it trees=, e.g. store.cas)")
        if not await self._trees.has(oid):
            raise ObjectNotFound(f"ref {oid} is not in the CAS")

    # -- TypedTurnStore ------------------------------------------------------------------------------

    async def publish_registry_bundle(self, bundle_id: str, bundle_json: bytes) -> None:
        """Publish a type registry bundle (JSON). Republishing the same bytes is a no-op; other
        bytes under the same id raise ``Conflict``."""
        bundle_json = plain_bytes(bundle_json, "bundle_json")
        validate_bundle(bundle_id, bundle_json)
        await self._write(PublishBundle(plain_str(bundle_id), bundle_json))

    async def get_registry_bundle(self, bundle_id: str) -> bytes | None:
        if not isinstance(bundle_id, str):
            raise InvalidInput(f"bundle_id must be a str, got {type(bundle_id).__name__}")
        check_text(bundle_id, "bundle_id")
        return await self._get_registry_bundle(plain_str(bundle_id))

    @abstractmethod
    async def _get_registry_bundle(self, bundle_id: str) -> bytes | None: ...

    # -- ArtifactStore -------------------------------------------------------------------------------

    async def put_blob(self, data: bytes) -> str:
        """Store bytes; returns their id (git's SHA-256 blob id, the same in every backend)."""
        data = plain_bytes(data, "data")
        if not isinstance(data, bytes):
            raise InvalidInput(f"put_blob takes bytes, got {type(data).__name__}")
        return await self._put_blob(data)

    async def _put_blob(self, data: bytes) -> str:
        oid = await self._write(PutBlob(data))
        assert isinstance(oid, str)
        return oid

    async def get_blob(self, oid: str) -> bytes:
        return await self._get_blob(plain_str(validate_oid(oid)))

    @abstractmethod
    async def _get_blob(self, oid: str) -> bytes: ...

    async def attach_fs(self, turn_id: int, fs_root: str) -> None:
        """Attach a workspace snapshot (a CAS tree id: ``ObjectNotFound`` / ``InvalidInput``
        otherwise) to a turn, once; the same tree again is a no-op, another is ``Conflict``."""
        turn_id = validate_id(turn_id, "turn_id")
        fs_root = plain_str(validate_oid(fs_root, "fs_root"))
        await self._check_tree(fs_root)
        await self._write(AttachFs(turn_id, fs_root))

    async def __aenter__(self) -> TurnStoreBase:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        return None
