"""The turn store as an in-memory state machine, behind the memory and filesystem backends.

Every write becomes a *record* (what was decided: ids, timestamps) before anything changes, and
:meth:`TurnCore.load` is the one place a record changes the state. The filesystem backend logs the
record first and replays the same records at open, so both backends share one behaviour. One command
gives at most one record, so a command is all or nothing in the log too (an ``append_turns`` batch
is one ``BatchRec``).

Damage (filesystem backend): a record read back from a damaged part of the log is never served as
good data. :meth:`TurnCore.load_damaged` keeps only the ids such a record names, marked damaged;
:meth:`TurnCore.lost` notes a span of the log nothing could be read from. Reads of a damaged turn or
context, and writes that would build on one, raise ``IntegrityError`` naming it; ``list_contexts``
leaves damaged contexts out; ``check`` names all of it. Everything else serves as before.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import msgspec

from ..cas.objects import BLOB, hash_object
from ..clock import now_ms
from ..errors import (
    Conflict,
    ContextNotFound,
    HeadConflict,
    IntegrityError,
    InvalidInput,
    ObjectNotFound,
    TurnNotFound,
)
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
    check_creation_retry,
    check_idempotent,
    creation_fingerprint,
    decode_metadata,
    jump_for,
    name_successor,
    next_updated,
    payload_hash,
)
from .sortedkeys import SortedKeys
from .types import ContextHead, ContextInfo, ContextOrder, TurnRecord

__all__ = ["KEPT_PER_RECORD", "Record", "TurnCore", "erased_record"]


def erased_record(record: TurnRecord) -> TurnRecord:
    """``record`` with its payload erased for good."""
    return msgspec.structs.replace(record, payload=b"", payload_hash="", erased=True, refs=())


class ContextRec(msgspec.Struct, frozen=True, tag="ctx"):
    """A context created. ``head_turn_id`` is its base turn. Fields after it are absent from logs
    written before sessions (they decode to these defaults)."""

    context_id: int
    head_turn_id: int
    name: str | None = None
    parent_context_id: int = 0
    metadata: bytes = b"{}"
    created_at_ms: int = 0
    idempotency_key: str | None = None
    fingerprint: str | None = None


class TurnRec(msgspec.Struct, frozen=True, tag="turn"):
    """One turn appended; its context's ``updated_at_ms`` follows from ``record.created_at_ms``."""

    record: TurnRecord


class BatchRec(msgspec.Struct, frozen=True, tag="batch"):
    """The new turns of one ``append_turns``, in order; every context they touch changes once, at
    the first turn's ``created_at_ms`` (they all share it)."""

    records: list[TurnRecord]


class HeadRec(msgspec.Struct, frozen=True, tag="head"):
    context_id: int
    head_turn_id: int
    updated_at_ms: int


class MetaRec(msgspec.Struct, frozen=True, tag="meta"):
    context_id: int
    metadata: bytes
    updated_at_ms: int


class DeleteRec(msgspec.Struct, frozen=True, tag="delete"):
    """A context deleted (``TurnStoreBase.delete_context``); its turns stay."""

    context_id: int
    deleted_at_ms: int


class EraseRec(msgspec.Struct, frozen=True, tag="erase"):
    """Turns whose payloads were erased (``EraseTurns``): their records stay, emptied."""

    turn_ids: list[int]


class BundleRec(msgspec.Struct, frozen=True, tag="bundle"):
    bundle_id: str
    bundle_json: bytes


class AttachRec(msgspec.Struct, frozen=True, tag="attach"):
    turn_id: int
    fs_root: str


class BlobRec(msgspec.Struct, frozen=True, tag="blob"):
    oid: str
    data: bytes


# What a compacted log holds (``TurnCore.compacted``): the state itself, not the history that made it.


class MarksRec(msgspec.Struct, frozen=True, tag="marks"):
    """The highest turn and context ids ever given, so none is given again after a compaction."""

    last_turn: int
    last_context: int


class KeptTurnsRec(msgspec.Struct, frozen=True, tag="kept_turns"):
    """Turns as they are now (erased ones erased), ascending ids: loaded without moving any head."""

    records: list[TurnRecord]


class LiveContextRec(msgspec.Struct, frozen=True, tag="live_context"):
    """A live context as it is now, with its creation key and its turns' keys; after its turns."""

    context_id: int
    head_turn_id: int
    base_turn_id: int
    name: str | None
    parent_context_id: int
    metadata: bytes
    created_at_ms: int
    updated_at_ms: int
    creation_key: str | None
    fingerprint: str | None
    #: (key, turn id) of its turns that carry one
    turn_keys: list[tuple[str, int]]


Record = (
    ContextRec
    | TurnRec
    | BatchRec
    | HeadRec
    | MetaRec
    | DeleteRec
    | EraseRec
    | BundleRec
    | AttachRec
    | BlobRec
    | MarksRec
    | KeptTurnsRec
    | LiveContextRec
)

#: turns per ``KeptTurnsRec`` of a compacted log (one frame each)
KEPT_PER_RECORD = 1024


class Index(msgspec.Struct, frozen=True, array_like=True):
    """What a record changes, logged beside it under a checksum of its own, so a record damaged past
    decoding still says which ids not to trust (see ``TurnCore.damage_index``)."""

    #: (turn id, its context id, its idempotency key): the turn is written and its context's head
    #: moves to it; context 0: the turn is changed in place (an fs_root attached)
    turns: list[tuple[int, int, str | None]] = []
    #: contexts created or changed (head moved, metadata replaced)
    contexts: list[int] = []
    #: names and creation keys a new context took
    names: list[tuple[int, str]] = []
    context_keys: list[tuple[int, str]] = []
    bundles: list[str] = []
    #: the id marks of a compacted log (last turn id, last context id): a damaged ``MarksRec`` still
    #: keeps new ids above every id given before the compaction
    marks: list[int] = []


def index_of(rec: Record) -> Index:
    match rec:
        case TurnRec(record=record):
            return Index(turns=[(record.turn_id, record.context_id, record.idempotency_key)])
        case BatchRec(records=records):
            return Index(turns=[(r.turn_id, r.context_id, r.idempotency_key) for r in records])
        case ContextRec(context_id=context_id, name=name, idempotency_key=key):
            return Index(
                contexts=[context_id],
                names=[] if name is None else [(context_id, name)],
                context_keys=[] if key is None else [(context_id, key)],
            )
        case HeadRec(context_id=context_id) | MetaRec(context_id=context_id) | DeleteRec(context_id=context_id):
            return Index(contexts=[context_id])
        case BundleRec(bundle_id=bundle_id):
            return Index(bundles=[bundle_id])
        case AttachRec(turn_id=turn_id):
            return Index(turns=[(turn_id, 0, None)])
        case EraseRec(turn_ids=turn_ids):
            return Index(turns=[(turn_id, 0, None) for turn_id in turn_ids])
        case KeptTurnsRec(records=records):
            return Index(turns=[(r.turn_id, 0, None) for r in records])
        case LiveContextRec(context_id=context_id, name=name, creation_key=key):
            return Index(
                contexts=[context_id],
                names=[] if name is None else [(context_id, name)],
                context_keys=[] if key is None else [(context_id, key)],
            )
        case MarksRec(last_turn=last_turn, last_context=last_context):
            return Index(marks=[last_turn, last_context])
    return Index()  # a blob: checked against its id on every read


class _InfoOf(NamedTuple):
    """A reply to be read once its record is loaded: the context's info as the command left it."""

    context_id: int


class _Ctx:
    __slots__ = ("base", "created", "creation_key", "head", "metadata", "name", "parent", "turn_keys", "updated")

    def __init__(self, head: int, name: str | None, parent: int, metadata: bytes, created: int, updated: int) -> None:
        self.head = head
        self.base = head
        self.name = name
        self.parent = parent
        self.metadata = metadata
        self.created = created
        self.updated = updated
        #: what delete_context removes besides the context: its creation key and its turns' keys
        self.creation_key: str | None = None
        self.turn_keys: list[str] = []


class TurnCore:
    def __init__(self, clock: Callable[[], int] = now_ms) -> None:
        self.clock = clock
        self.contexts: dict[int, _Ctx] = {}
        #: turn id -> (record, skip link, skip link's depth)
        self.turns: dict[int, tuple[TurnRecord, int, int]] = {}
        #: (context id, key) -> turn id
        self.keys: dict[tuple[int, str], int] = {}
        #: context creation key -> (context id, creation fingerprint)
        self.context_keys: dict[str, tuple[int, str]] = {}
        self.names: dict[str, int] = {}
        self.bundles: dict[str, bytes] = {}
        self.blobs: dict[str, bytes] = {}
        self.last_context = 0
        self.last_turn = 0
        # Listing indexes. Context ids only grow, so creation order is id order.
        self._created: list[int] = []
        self._sorted_names: list[str] = []
        self._children: dict[int, list[int]] = {}
        self._updated: SortedKeys[tuple[int, int]] = SortedKeys()
        # Damage (see the module docstring): id -> why.
        self.damaged_turns: dict[int, str] = {}
        self.damaged_contexts: dict[int, str] = {}
        self.damaged_bundles: dict[str, str] = {}
        self.problems: list[str] = []

    # -- writes: decide a record, then load it -------------------------------------------------------

    def decide(self, command: TurnCommand) -> tuple[object, Record | None]:
        """The reply to a command and the record that makes it so (None: nothing to change). Pass the
        reply through :meth:`finish` after loading the record."""
        match command:
            case AppendTurn():
                return self._append(command)
            case AppendTurns():
                return self._append_batch(command)
            case CreateContext():
                return self._create(command)
            case SetHead(context_id=context_id, turn_id=turn_id, expected_head=expected):
                ctx = self._ctx(context_id)
                if expected is not None and ctx.head != expected:
                    raise HeadConflict(context_id, expected, ctx.head)
                if turn_id:
                    self._turn(turn_id)
                return _InfoOf(context_id), HeadRec(context_id, turn_id, next_updated(ctx.updated, self.clock()))
            case SetContextMetadata(context_id=context_id, metadata=metadata, expected_updated_at_ms=expected):
                ctx = self._ctx(context_id)
                if expected is not None and ctx.updated != expected:
                    raise Conflict(
                        f"context {context_id} changed since updated_at_ms {expected}: it is now {ctx.updated}"
                    )
                return _InfoOf(context_id), MetaRec(context_id, metadata, next_updated(ctx.updated, self.clock()))
            case DeleteContext(context_id=context_id):
                self._ctx(context_id)
                return None, DeleteRec(context_id, self.clock())
            case EraseTurns():
                erased = self._to_erase(command)
                return len(erased), EraseRec(erased) if erased else None
            case PublishBundle(bundle_id=bundle_id, bundle_json=data):
                if bundle_id in self.damaged_bundles:
                    raise IntegrityError(self.damaged_bundles[bundle_id])
                existing = self.bundles.get(bundle_id)
                if existing is None:
                    return None, BundleRec(bundle_id, data)
                if existing != data:
                    raise Conflict(f"registry bundle {bundle_id!r} is already published with other content")
                return None, None
            case AttachFs(turn_id=turn_id, fs_root=fs_root):
                record = self._turn(turn_id)
                if record.fs_root == fs_root:
                    return None, None
                if record.fs_root is not None:
                    raise Conflict(f"turn {turn_id} already has fs_root {record.fs_root}")
                return None, AttachRec(turn_id, fs_root)
            case PutBlob(data=data):
                oid = hash_object(BLOB, data).hex()
                return oid, None if oid in self.blobs else BlobRec(oid, data)
        raise InvalidInput(f"unknown turn store command {command!r}")

    def finish(self, reply: object) -> object:
        """The reply of a decided command, once its record is loaded."""
        if type(reply) is _InfoOf:
            return self.context_info(reply.context_id)
        return reply

    def apply(self, command: TurnCommand) -> object:
        reply, rec = self.decide(command)
        if rec is not None:
            self.load(rec)
        return self.finish(reply)

    def _create(self, command: CreateContext) -> tuple[object, ContextRec | None]:
        key = command.idempotency_key
        if key is not None:
            known = self.context_keys.get(key)
            if known is not None:
                self._ctx(known[0])  # IntegrityError if what the key made is damaged
                check_creation_retry(key, known[0], known[1], command)
                return _InfoOf(known[0]), None
        name = command.name
        if name is not None:
            holder = self.names.get(name)
            if holder is not None:
                if command.open_existing:
                    self._ctx(holder)
                    return _InfoOf(holder), None
                raise Conflict(f"context name {name!r} is taken (context {holder})")
        base = command.base_turn_id
        parent = command.parent_context_id
        if base:
            base_record = self._turn(base)
            if parent is None:
                # the context it was appended in, unless that was deleted since
                parent = base_record.context_id if base_record.context_id in self.contexts else 0
        if parent:
            self._ctx(parent, " (parent_context_id)")
        context_id = self.last_context + 1
        rec = ContextRec(
            context_id,
            base,
            name,
            parent or 0,
            command.metadata,
            self.clock(),
            key,
            None if key is None else creation_fingerprint(command),
        )
        return _InfoOf(context_id), rec

    def _new_turn(
        self, command: AppendTurn, turn_id: int, head: int, digest: str, now: int, pending: dict[int, TurnRecord]
    ) -> TurnRecord:
        parent = head if command.parent_turn_id is None else command.parent_turn_id
        depth = 1
        if parent:
            parent_record = pending.get(parent) or self._turn(parent, " to append to")
            depth = parent_record.depth + 1
        return TurnRecord(
            turn_id=turn_id,
            context_id=command.context_id,
            parent_turn_id=parent,
            depth=depth,
            type_id=command.type_id,
            type_version=command.type_version,
            payload=command.payload,
            payload_hash=digest,
            idempotency_key=command.idempotency_key,
            created_at_ms=now,
            fs_root=command.fs_root,
            refs=command.refs,
        )

    def _stored_key(self, context_id: int, key: str) -> TurnRecord | None:
        turn_id = self.keys.get((context_id, key))
        return None if turn_id is None else self._turn(turn_id)

    def _append(self, command: AppendTurn) -> tuple[TurnRecord, TurnRec | None]:
        context_id = command.context_id
        ctx = self._ctx(context_id)
        digest = payload_hash(command.payload)
        key = command.idempotency_key
        if key is not None:
            first = self._stored_key(context_id, key)
            if first is not None:
                return check_idempotent(first, command, digest), None
        expected = command.expected_head
        if expected is not None and ctx.head != expected:
            raise HeadConflict(context_id, expected, ctx.head)
        record = self._new_turn(command, self.last_turn + 1, ctx.head, digest, self.clock(), {})
        return record, TurnRec(record)

    def _append_batch(self, command: AppendTurns) -> tuple[list[TurnRecord], BatchRec | None]:
        now = self.clock()
        heads: dict[int, int] = {}
        pending: dict[int, TurnRecord] = {}
        pending_keys: dict[tuple[int, str], TurnRecord] = {}
        replies: list[TurnRecord] = []
        written: set[int] = set()
        turn_id = self.last_turn
        for turn in command.turns:
            context_id = turn.context_id
            ctx = self._ctx(context_id)
            digest = payload_hash(turn.payload)
            key = turn.idempotency_key
            if key is not None:
                first = pending_keys.get((context_id, key)) or self._stored_key(context_id, key)
                if first is not None:
                    heads.setdefault(context_id, ctx.head)
                    replies.append(check_idempotent(first, turn, digest))
                    continue
            turn_id += 1
            record = self._new_turn(turn, turn_id, heads.get(context_id, ctx.head), digest, now, pending)
            pending[turn_id] = record
            heads[context_id] = turn_id
            written.add(context_id)
            if key is not None:
                pending_keys[(context_id, key)] = record
            replies.append(record)
        for context_id, expected in command.expected_heads.items():
            if context_id in heads and context_id not in written:
                continue  # every turn it has in the batch is a retry that landed
            actual = self._ctx(context_id).head
            if actual != expected:
                raise HeadConflict(context_id, expected, actual)
        return replies, BatchRec(list(pending.values())) if pending else None

    # -- loading records (also on replay) ------------------------------------------------------------

    def load(self, rec: Record) -> None:
        """Apply a decided record: the only place the state changes (also on replay)."""
        match rec:
            case TurnRec(record=record):
                if self._load_turn(record):
                    self._touch(record.context_id, record.created_at_ms)
            case BatchRec(records=records):
                touched = {record.context_id for record in records if self._load_turn(record)}
                for context_id in sorted(touched):
                    self._touch(context_id, records[0].created_at_ms)
            case ContextRec():
                self._load_context(rec)
            case HeadRec(context_id=context_id, head_turn_id=head, updated_at_ms=updated):
                ctx = self.contexts.get(context_id)
                if ctx is None:
                    self._damage_context(context_id, "a head move was logged for a context the log lost")
                    return
                ctx.head = head
                self._set_updated(context_id, ctx, updated)
                if head and head not in self.turns:
                    self.damaged_turns.setdefault(head, f"turn {head} was lost from the log")
            case MetaRec(context_id=context_id, metadata=metadata, updated_at_ms=updated):
                ctx = self.contexts.get(context_id)
                if ctx is None:
                    self._damage_context(context_id, "a metadata change was logged for a context the log lost")
                    return
                ctx.metadata = metadata
                self._set_updated(context_id, ctx, updated)
            case DeleteRec(context_id=context_id):
                self._delete_context(context_id)
            case EraseRec(turn_ids=turn_ids):
                for turn_id in turn_ids:
                    entry = self.turns.get(turn_id)
                    if entry is not None:
                        old, skip, skip_depth = entry
                        self.turns[turn_id] = (erased_record(old), skip, skip_depth)
            case BundleRec(bundle_id=bundle_id, bundle_json=data):
                self.bundles[bundle_id] = data
            case AttachRec(turn_id=turn_id, fs_root=fs_root):
                entry = self.turns.get(turn_id)
                if entry is not None:
                    old, skip, skip_depth = entry
                    self.turns[turn_id] = (msgspec.structs.replace(old, fs_root=fs_root), skip, skip_depth)
            case BlobRec(oid=oid, data=data):
                self.blobs[oid] = data
            case MarksRec(last_turn=last_turn, last_context=last_context):
                self.last_turn = max(self.last_turn, last_turn)
                self.last_context = max(self.last_context, last_context)
            case KeptTurnsRec(records=records):
                for record in records:
                    self._load_kept_turn(record)
            case LiveContextRec():
                self._load_live_context(rec)

    def _load_kept_turn(self, record: TurnRecord) -> None:
        """A turn of a compacted log: its parent (a lower id) is loaded already; no head moves."""
        turn_id, parent_id = record.turn_id, record.parent_turn_id
        self.last_turn = max(self.last_turn, turn_id)
        jump = (0, 0)
        parent_entry = self.turns.get(parent_id) if parent_id else None
        if parent_id and (parent_entry is None or parent_id in self.damaged_turns):
            self.damaged_turns.setdefault(parent_id, f"turn {parent_id} was lost from the log")
        elif parent_entry is not None:
            parent, parent_jump, parent_jump_depth = parent_entry
            if parent.depth + 1 != record.depth:
                self.damaged_turns[turn_id] = f"turn {turn_id} is damaged: its depth does not follow its parent's"
            grand = self.turns.get(parent_jump) if parent_jump else None
            jump = jump_for(
                parent.turn_id, parent.depth, parent_jump_depth, grand[1] if grand else 0, grand[2] if grand else 0
            )
        self.turns[turn_id] = (record, *jump)

    def _load_live_context(self, rec: LiveContextRec) -> None:
        context_id = rec.context_id
        self._load_context(
            ContextRec(
                context_id,
                rec.base_turn_id,
                rec.name,
                rec.parent_context_id,
                rec.metadata,
                rec.created_at_ms,
                rec.creation_key,
                rec.fingerprint,
            )
        )
        ctx = self.contexts[context_id]
        ctx.head = rec.head_turn_id
        if rec.head_turn_id and rec.head_turn_id not in self.turns:
            self.damaged_turns.setdefault(rec.head_turn_id, f"turn {rec.head_turn_id} was lost from the log")
        self._set_updated(context_id, ctx, rec.updated_at_ms)
        for key, turn_id in rec.turn_keys:
            self.keys[(context_id, key)] = turn_id
            ctx.turn_keys.append(key)

    def _load_turn(self, record: TurnRecord) -> bool:
        """Load one turn and move its context's head; False if it changed no context.

        After damage, a sound turn whose parent is damaged or lost is still loaded (its own bytes are
        good), without a skip link past that parent: any walk through the parent stops there with
        ``IntegrityError``, and nothing beyond it is inferred."""
        turn_id, context_id, parent_id = record.turn_id, record.context_id, record.parent_turn_id
        self.last_turn = max(self.last_turn, turn_id)
        key = record.idempotency_key
        if key is not None:
            self.keys[(context_id, key)] = turn_id
            if context_id in self.contexts:
                self.contexts[context_id].turn_keys.append(key)
        jump = (0, 0)
        if parent_id:
            parent_entry = self.turns.get(parent_id)
            if parent_entry is None:
                self.damaged_turns.setdefault(parent_id, f"turn {parent_id} was lost from the log")
            elif parent_entry[0].depth + 1 != record.depth:
                self.damaged_turns[turn_id] = f"turn {turn_id} is damaged: its depth does not follow its parent's"
                if context_id in self.contexts:
                    self.contexts[context_id].head = turn_id
                return False
            elif parent_id not in self.damaged_turns:
                parent, parent_jump, parent_jump_depth = parent_entry
                grand = self.turns.get(parent_jump) if parent_jump else None
                jump = jump_for(
                    parent.turn_id, parent.depth, parent_jump_depth, grand[1] if grand else 0, grand[2] if grand else 0
                )
        self.turns[turn_id] = (record, *jump)
        ctx = self.contexts.get(context_id)
        if ctx is None:
            self._damage_context(context_id, "turns were logged for a context the log lost")
            return False
        ctx.head = turn_id
        return True

    def _touch(self, context_id: int, now: int) -> None:
        ctx = self.contexts[context_id]
        self._set_updated(context_id, ctx, next_updated(ctx.updated, now))

    def _set_updated(self, context_id: int, ctx: _Ctx, updated: int) -> None:
        if context_id not in self.damaged_contexts:
            self._updated.remove((ctx.updated, context_id))
            self._updated.add((updated, context_id))
        ctx.updated = updated

    def _load_context(self, rec: ContextRec) -> None:
        context_id = rec.context_id
        self.last_context = max(self.last_context, context_id)
        ctx = _Ctx(
            rec.head_turn_id, rec.name, rec.parent_context_id, rec.metadata, rec.created_at_ms, rec.created_at_ms
        )
        self.contexts[context_id] = ctx
        if rec.idempotency_key is not None and rec.fingerprint is not None:
            self.context_keys[rec.idempotency_key] = (context_id, rec.fingerprint)
            ctx.creation_key = rec.idempotency_key
        if rec.name is not None:
            self.names[rec.name] = context_id
            insort(self._sorted_names, rec.name)
        insort(self._created, context_id)
        if rec.parent_context_id:
            insort(self._children.setdefault(rec.parent_context_id, []), context_id)
        self._updated.add((ctx.updated, context_id))
        if rec.head_turn_id and rec.head_turn_id not in self.turns:
            self.damaged_turns.setdefault(rec.head_turn_id, f"turn {rec.head_turn_id} was lost from the log")

    def _to_erase(self, command: EraseTurns) -> list[int]:
        """The turns ``command`` erases, newest first: down the chain from where it starts to the
        first turn already erased (whose ancestors all are)."""
        context_id = command.context_id
        head = self._ctx(context_id).head
        start = head
        if command.keep_last is not None:
            depth = self._depth_of_head(context_id, head)
            start = self.ancestor_at(head, depth - command.keep_last) if command.keep_last < depth else 0
        elif command.before_turn_id is not None:
            before = command.before_turn_id
            cursor = self.turns.get(before)
            if cursor is None or not head or self.ancestor_at(head, cursor[0].depth) != before:
                raise InvalidInput(f"turn {before} is not on the chain of context {context_id}")
            start = cursor[0].parent_turn_id
        out: list[int] = []
        while start:
            record = self._turn(start)
            if record.erased:
                break
            out.append(start)
            start = record.parent_turn_id
        return out

    def _delete_context(self, context_id: int) -> None:
        ctx = self.contexts.pop(context_id, None)
        if ctx is None:
            self._damage_context(context_id, "a delete was logged for a context the log lost")
            return
        if ctx.name is not None and self.names.get(ctx.name) == context_id:
            del self.names[ctx.name]
            names = self._sorted_names
            del names[bisect_left(names, ctx.name)]
        if ctx.creation_key is not None and self.context_keys.get(ctx.creation_key, (0,))[0] == context_id:
            del self.context_keys[ctx.creation_key]
        for key in ctx.turn_keys:
            self.keys.pop((context_id, key), None)
        created = self._created
        del created[bisect_left(created, context_id)]
        if ctx.parent:
            siblings = self._children[ctx.parent]
            del siblings[bisect_left(siblings, context_id)]
        if context_id in self.damaged_contexts:
            del self.damaged_contexts[context_id]  # what was damaged is gone
        else:
            self._updated.remove((ctx.updated, context_id))

    # -- garbage collection ----------------------------------------------------------------------------

    def collectable(self, cutoff_ms: int) -> list[int]:
        """The turns no live context reaches (through heads, bases and parents), created at or before
        ``cutoff_ms``, highest id first. (Unlike SQLite, which keeps the highest turn so its next id
        stays above it, a core keeps its id marks apart from its turns: ``MarksRec``.)"""
        turns = self.turns
        stack: list[int] = []
        for ctx in self.contexts.values():
            stack += (ctx.head, ctx.base)
        stack += [turn_id for turn_id, entry in turns.items() if entry[0].created_at_ms > cutoff_ms]
        kept: set[int] = set()
        while stack:
            turn_id = stack.pop()
            while turn_id and turn_id not in kept and turn_id in turns:
                kept.add(turn_id)
                turn_id = turns[turn_id][0].parent_turn_id
        return sorted((turn_id for turn_id in turns if turn_id not in kept), reverse=True)

    def reclaim(self, turn_ids: Iterable[int]) -> int:
        """Forget ``turn_ids`` (from :meth:`collectable`: nothing live stands on them) and the keys that
        name them; returns their payload bytes."""
        freed = 0
        unkeyed: dict[int, set[str]] = {}
        for turn_id in turn_ids:
            entry = self.turns.pop(turn_id, None)
            if entry is None:
                continue
            record = entry[0]
            freed += len(record.payload)
            key = record.idempotency_key
            if key is not None and self.keys.get((record.context_id, key)) == turn_id:
                del self.keys[(record.context_id, key)]
                unkeyed.setdefault(record.context_id, set()).add(key)
        for context_id, keys in unkeyed.items():
            ctx = self.contexts.get(context_id)
            if ctx is not None:
                ctx.turn_keys = [key for key in ctx.turn_keys if key not in keys]
        return freed

    @property
    def damaged(self) -> bool:
        """Whether anything read from the log was damaged (``check`` says what)."""
        return bool(self.problems or self.damaged_turns or self.damaged_contexts or self.damaged_bundles)

    def compacted(self, leave_out: set[int], max_bytes: int = 1 << 62) -> Iterator[Record]:
        """The records of a log that rebuilds this state (less the turns ``leave_out``) when loaded
        into an empty core: the id marks, the turns (ascending, as they are now), bundles, blobs, then
        the live contexts. Nothing deleted, erased or reclaimed is in them. A record of kept turns
        holds at most ``KEPT_PER_RECORD`` turns and, unless one turn alone is more, ``max_bytes`` of
        payload (a log frame's length has 31 bits: 1,024 turns of 2 MiB were past it)."""
        yield MarksRec(self.last_turn, self.last_context)
        kept: list[TurnRecord] = []
        size = 0
        for turn_id in sorted(self.turns):
            if turn_id in leave_out:
                continue
            record = self.turns[turn_id][0]
            if kept and size + len(record.payload) > max_bytes:
                yield KeptTurnsRec(kept)
                kept, size = [], 0
            kept.append(record)
            size += len(record.payload)
            if len(kept) == KEPT_PER_RECORD:
                yield KeptTurnsRec(kept)
                kept, size = [], 0
        if kept:
            yield KeptTurnsRec(kept)
        for bundle_id, data in self.bundles.items():
            yield BundleRec(bundle_id, data)
        for oid, blob in self.blobs.items():
            yield BlobRec(oid, blob)
        for context_id in sorted(self.contexts):
            ctx = self.contexts[context_id]
            fingerprint = None
            if ctx.creation_key is not None:
                fingerprint = self.context_keys.get(ctx.creation_key, (0, None))[1]
            turn_keys = [
                (key, self.keys[(context_id, key)])
                for key in ctx.turn_keys
                if self.keys.get((context_id, key), 0) not in leave_out and (context_id, key) in self.keys
            ]
            yield LiveContextRec(
                context_id,
                ctx.head,
                ctx.base,
                ctx.name,
                ctx.parent,
                ctx.metadata,
                ctx.created,
                ctx.updated,
                ctx.creation_key if fingerprint is not None else None,
                fingerprint,
                turn_keys,
            )

    # -- damage ----------------------------------------------------------------------------------------

    def load_damaged(self, rec: Record, where: str) -> None:
        """A record read back from a damaged frame (``where`` says which): keep the ids it names,
        marked damaged, so nothing reads it as good data and no later write reuses them."""
        why = f"it was logged in a damaged record ({where})"
        match rec:
            case TurnRec(record=record):
                self._damage_turns([record], why)
            case BatchRec(records=records):
                self._damage_turns(records, why)
            case ContextRec():
                self._load_context(rec)  # keeps its name and key taken; nothing reads it as good
                self._damage_context(rec.context_id, why)
            case HeadRec(context_id=context_id) | MetaRec(context_id=context_id) | DeleteRec(context_id=context_id):
                self._damage_context(context_id, why)
            case BundleRec(bundle_id=bundle_id):
                self.damaged_bundles[bundle_id] = f"registry bundle {bundle_id!r} is damaged: {why}"
            case AttachRec(turn_id=turn_id):
                self.damaged_turns[turn_id] = f"turn {turn_id}'s fs_root is damaged: {why}"
            case EraseRec(turn_ids=turn_ids):
                # Erased or not, no payload of these is served as good data.
                for turn_id in turn_ids:
                    self.damaged_turns[turn_id] = f"turn {turn_id}'s erasure is damaged: {why}"
            case BlobRec():
                pass  # blobs are checked against their id on every read: a lost one is ObjectNotFound
            # A compacted log is written with indexed frames only (see damage_index); these are for
            # completeness.
            case KeptTurnsRec(records=records):
                self._damage_turns(records, why)
            case LiveContextRec(context_id=context_id):
                self._damage_context(context_id, why)
            case MarksRec(last_turn=last_turn, last_context=last_context):
                self.damage_index(Index(marks=[last_turn, last_context]), where)

    def damage_index(self, index: Index, where: str) -> None:
        """A record that could not be read, whose index could: mark what it changed damaged."""
        why = f"it was logged in a damaged record ({where})"
        for turn_id, context_id, key in index.turns:
            self.last_turn = max(self.last_turn, turn_id)
            self.damaged_turns[turn_id] = f"turn {turn_id} is damaged: {why}"
            if key is not None and context_id:
                self.keys[(context_id, key)] = turn_id  # a retry finds the damage, not a fresh append
            ctx = self.contexts.get(context_id) if context_id else None
            if ctx is not None:
                ctx.head = turn_id  # reads of the context raise until its head moves on
            elif context_id:
                self._damage_context(context_id, "turns were logged for a context the log lost")
        for context_id, name in index.names:
            if name not in self.names:
                self.names[name] = context_id  # taken still: no second context gets it
                insort(self._sorted_names, name)
        for context_id, key in index.context_keys:
            self.context_keys[key] = (context_id, "")  # a retry finds the damaged context
        for context_id in index.contexts:
            self._damage_context(context_id, why)
        for bundle_id in index.bundles:
            self.damaged_bundles[bundle_id] = f"registry bundle {bundle_id!r} is damaged: {why}"
        if len(index.marks) == 2:
            self.last_turn = max(self.last_turn, index.marks[0])
            self.last_context = max(self.last_context, index.marks[1])

    def _damage_turns(self, records: Iterable[TurnRecord], why: str) -> None:
        for record in records:
            self.last_turn = max(self.last_turn, record.turn_id)
            self.damaged_turns[record.turn_id] = f"turn {record.turn_id} is damaged: {why}"
            if record.idempotency_key is not None:
                self.keys[(record.context_id, record.idempotency_key)] = record.turn_id
            ctx = self.contexts.get(record.context_id)
            if ctx is not None:
                ctx.head = record.turn_id  # reads of the context raise until its head moves on

    def _damage_context(self, context_id: int, why: str) -> None:
        self.last_context = max(self.last_context, context_id)
        if context_id in self.damaged_contexts:
            return
        self.damaged_contexts[context_id] = f"context {context_id} is damaged: {why}"
        ctx = self.contexts.get(context_id)
        if ctx is not None:
            self._updated.remove((ctx.updated, context_id))

    def lost(self, where: str, size: int) -> None:
        """``size`` bytes of the log could not be read at all. The ids they held are unknown, so new
        ids skip ``size`` past the last ones seen (a record takes at least a byte): none is reused."""
        self.problems.append(f"{where}: {size} bytes could not be read; what they held is lost")
        self.last_turn += size
        self.last_context += size

    # -- reads -----------------------------------------------------------------------------------------

    def _ctx(self, context_id: int, what: str = "") -> _Ctx:
        ctx = self.contexts.get(context_id)
        if ctx is None or context_id in self.damaged_contexts:
            if context_id in self.damaged_contexts:
                raise IntegrityError(self.damaged_contexts[context_id])
            raise ContextNotFound(f"no context {context_id}{what}")
        return ctx

    def _entry(self, turn_id: int, what: str = "") -> tuple[TurnRecord, int, int]:
        entry = self.turns.get(turn_id)
        if entry is None or (self.damaged_turns and turn_id in self.damaged_turns):
            if turn_id in self.damaged_turns:
                raise IntegrityError(self.damaged_turns[turn_id])
            raise TurnNotFound(f"no turn {turn_id}{what}")
        return entry

    def _turn(self, turn_id: int, what: str = "") -> TurnRecord:
        return self._entry(turn_id, what)[0]

    def get_turn(self, turn_id: int) -> TurnRecord:
        return self._turn(turn_id)

    def _depth_of_head(self, context_id: int, head: int) -> int:
        if not head:
            return 0
        entry = self.turns.get(head)
        if entry is None or (self.damaged_turns and head in self.damaged_turns):
            why = self.damaged_turns.get(head, f"turn {head} is missing")
            raise IntegrityError(f"context {context_id}'s head is unreadable: {why}")
        return entry[0].depth

    def get_head(self, context_id: int) -> ContextHead:
        head = self._ctx(context_id).head
        return ContextHead(context_id, head, self._depth_of_head(context_id, head))

    def context_info(self, context_id: int) -> ContextInfo:
        ctx = self._ctx(context_id)
        head = ctx.head
        return ContextInfo(
            context_id,
            head,
            self._depth_of_head(context_id, head),
            ctx.name,
            ctx.base,
            ctx.parent,
            decode_metadata(ctx.metadata),
            ctx.created,
            ctx.updated,
        )

    def find_context(self, name: str) -> ContextInfo | None:
        context_id = self.names.get(name)
        return None if context_id is None else self.context_info(context_id)

    def get_turn_by_key(self, context_id: int, key: str) -> TurnRecord | None:
        self._ctx(context_id)
        return self._stored_key(context_id, key)

    def list_contexts(
        self,
        prefix: str | None,
        parent_context_id: int | None,
        order: ContextOrder,
        after: tuple[Any, ...] | None,
        limit: int,
    ) -> list[ContextInfo]:
        """Up to ``limit + 1`` contexts (see ``TurnStoreBase._list_contexts``).

        Without a filter, or with a prefix in name order, this walks the order's own index from the
        cursor: O(log n + limit). With a filter in another order it walks the order's index too, but
        only as far as the filter's own set is large (m contexts, counted in O(log n)); if that
        finds no full page, it sorts the filter's set instead. So a page costs O(limit * n / m) when
        the filtered contexts are spread through the order (a prefix that matches most contexts costs
        about the limit), and never more than O(m log m)."""
        want = limit + 1
        if order == "name":
            ordered = (self.names[name] for name in self._named(prefix or "", None if after is None else after[0]))
            if parent_context_id is None:
                return self._listable(ordered, want)
        elif order == "created":
            created = self._created
            top = len(created) if after is None else bisect_left(created, after[0])
            ordered = (created[i] for i in range(top - 1, -1, -1))
        else:
            ordered = (context_id for _, context_id in self._updated.descending(None if after is None else after))
        if parent_context_id is None and prefix is None:
            return self._listable(ordered, want)
        members: Iterable[int] = ()
        if parent_context_id is not None:
            children = self._children.get(parent_context_id, [])
            members, size = children, len(children)
        else:
            size = self._count_named(prefix or "")

        def passes(context_id: int) -> bool:
            ctx = self.contexts.get(context_id)
            if ctx is None:
                return False  # a name a damaged record took
            if parent_context_id is not None and ctx.parent != parent_context_id:
                return False
            return prefix is None or (ctx.name is not None and ctx.name.startswith(prefix))

        out: list[ContextInfo] = []
        for scanned, context_id in enumerate(ordered):
            if scanned >= size:
                break  # sorting the filter's own set costs less from here on
            if passes(context_id):
                out += self._listable((context_id,))
                if len(out) == want:
                    return out
        else:
            return out
        if parent_context_id is None:
            members = (self.names[name] for name in self._named(prefix or "", None))
        keyed: list[tuple[tuple[Any, ...], int]] = []
        for context_id in members:
            if not passes(context_id):
                continue
            ctx = self.contexts[context_id]
            if order == "name":
                if ctx.name is not None:
                    keyed.append(((ctx.name,), context_id))
            elif order == "created":
                keyed.append(((context_id,), context_id))
            else:
                keyed.append(((ctx.updated, context_id), context_id))
        descending = order != "name"
        keyed.sort(reverse=descending)
        if after is not None:
            keyed = [k for k in keyed if (k[0] < after if descending else k[0] > after)]
        return self._listable((context_id for _, context_id in keyed), want)

    def _count_named(self, prefix: str) -> int:
        """How many names start with ``prefix``: O(log n)."""
        names = self._sorted_names
        high = name_successor(prefix) if prefix else None
        return (len(names) if high is None else bisect_left(names, high)) - bisect_left(names, prefix)

    def _listable(self, ids: Iterable[int], want: int | None = None) -> list[ContextInfo]:
        """The infos of ``ids`` in order, up to ``want``, leaving out damaged contexts (``check``
        names them)."""
        out: list[ContextInfo] = []
        damaged = self.damaged_contexts
        for context_id in ids:
            if context_id in damaged:
                continue
            try:
                out.append(self.context_info(context_id))
            except IntegrityError:
                continue
            if len(out) == want:
                break
        return out

    def _named(self, prefix: str, after: str | None) -> Iterable[str]:
        """Names that start with ``prefix`` (and are greater than ``after``), ascending."""
        names = self._sorted_names
        i = bisect_left(names, prefix)
        if after is not None:
            i = max(i, bisect_right(names, after))
        while i < len(names) and names[i].startswith(prefix):
            yield names[i]
            i += 1

    def ancestor_at(self, turn_id: int, depth: int) -> int:
        """The ancestor of ``turn_id`` at ``depth``, in O(log depth) steps over the skip links."""
        record, jump, jump_depth = self._entry(turn_id)
        while record.depth > depth:
            turn_id = jump if jump_depth >= depth else record.parent_turn_id
            record, jump, jump_depth = self._entry(turn_id)
        return turn_id

    def chain(self, top: int, limit: int) -> list[TurnRecord]:
        """Oldest to newest, the ``limit`` turns that end at ``top`` (0: none)."""
        out: list[TurnRecord] = []
        turn_id = top
        while turn_id and len(out) < limit:
            record = self._entry(turn_id)[0]
            out.append(record)
            turn_id = record.parent_turn_id
        out.reverse()
        return out

    def list_turns(self, context_id: int, before_turn_id: int | None, limit: int) -> list[TurnRecord]:
        head = self._ctx(context_id).head
        start = head
        if before_turn_id is not None:
            cursor = self.turns.get(before_turn_id)
            if cursor is None or not head or self.ancestor_at(head, cursor[0].depth) != before_turn_id:
                raise InvalidInput(f"turn {before_turn_id} is not on the chain of context {context_id}")
            start = cursor[0].parent_turn_id
        return self.chain(start, limit)

    def get_blob(self, oid: str) -> bytes:
        data = self.blobs.get(oid)
        if data is None:
            raise ObjectNotFound(f"no blob {oid}")
        if hash_object(BLOB, data).hex() != oid:
            raise IntegrityError(f"blob {oid} is damaged: its bytes do not match its id")
        return data

    def check(self) -> list[str]:
        """Everything damaged or inconsistent, one line each."""
        problems = list(self.problems)
        problems += sorted(self.damaged_contexts.values())
        problems += [self.damaged_turns[t] for t in sorted(self.damaged_turns)]
        problems += sorted(self.damaged_bundles.values())
        for turn_id, (record, _, _) in self.turns.items():
            if turn_id in self.damaged_turns:
                continue
            if record.erased:
                if record.payload or record.payload_hash or record.refs:
                    problems.append(f"turn {turn_id} is marked erased but still holds a payload")
                parent = self.turns.get(record.parent_turn_id) if record.parent_turn_id else None
                if parent is not None and not parent[0].erased:
                    problems.append(f"turn {turn_id} is erased but its parent {record.parent_turn_id} is not")
            elif payload_hash(record.payload) != record.payload_hash:
                problems.append(f"turn {turn_id} does not match its payload_hash")
            parent = self.turns.get(record.parent_turn_id) if record.parent_turn_id else None
            if record.depth != (parent[0].depth if parent else 0) + 1:
                problems.append(f"turn {turn_id}'s depth is not its parent's plus one")
        for oid, data in self.blobs.items():
            if hash_object(BLOB, data).hex() != oid:
                problems.append(f"blob {oid} does not match its id")
        return problems
