"""The turn store as an in-memory state machine, behind the memory and filesystem backends.

Every write becomes a *record* (what was decided: ids, timestamps) before anything changes, and
:meth:`TurnCore.load` is the one place a record changes the state. The filesystem backend logs the
record first and replays the same records at open, so both backends share one behaviour.
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from ..cas.objects import BLOB, hash_object, validate_oid
from ..clock import now_ms
from ..errors import Conflict, ContextNotFound, InvalidInput, ObjectNotFound, TurnNotFound
from .commands import AppendTurn, AttachFs, CreateContext, PublishBundle, PutBlob, TurnCommand
from .rules import check_idempotent, jump_for, payload_hash, validate_id
from .types import ContextHead, TurnRecord

__all__ = ["Record", "TurnCore"]


class ContextRec(msgspec.Struct, frozen=True, tag="ctx"):
    context_id: int
    head_turn_id: int


class TurnRec(msgspec.Struct, frozen=True, tag="turn"):
    record: TurnRecord


class BundleRec(msgspec.Struct, frozen=True, tag="bundle"):
    bundle_id: str
    bundle_json: bytes


class AttachRec(msgspec.Struct, frozen=True, tag="attach"):
    turn_id: int
    fs_root: str


class BlobRec(msgspec.Struct, frozen=True, tag="blob"):
    oid: str
    data: bytes


Record = ContextRec | TurnRec | BundleRec | AttachRec | BlobRec


class TurnCore:
    def __init__(self, clock: Callable[[], int] = now_ms) -> None:
        self.clock = clock
        self.heads: dict[int, int] = {}
        #: turn id -> (record, skip link, skip link's depth)
        self.turns: dict[int, tuple[TurnRecord, int, int]] = {}
        self.keys: dict[tuple[int, str], int] = {}
        self.bundles: dict[str, bytes] = {}
        self.blobs: dict[str, bytes] = {}
        self.last_context = 0
        self.last_turn = 0

    # -- writes: decide a record, then load it ---------------------------------------------------

    def decide(self, command: TurnCommand) -> tuple[object, Record | None]:
        """The reply to a command and the record that makes it so (None: nothing to change)."""
        match command:
            case CreateContext(base_turn_id=base):
                if base:
                    self._turn(base)
                return self._context_rec(self.last_context + 1, base)
            case AppendTurn():
                return self._append(command)
            case PublishBundle(bundle_id=bundle_id, bundle_json=data):
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

    def _context_rec(self, context_id: int, head: int) -> tuple[ContextHead, ContextRec]:
        depth = self.turns[head][0].depth if head else 0
        return ContextHead(context_id, head, depth), ContextRec(context_id, head)

    def _append(self, command: AppendTurn) -> tuple[TurnRecord, TurnRec | None]:
        context_id = command.context_id
        head = self.heads.get(context_id)
        if head is None:
            raise ContextNotFound(f"no context {context_id}")
        digest = payload_hash(command.payload)
        key = command.idempotency_key
        if key is not None:
            first = self.keys.get((context_id, key))
            if first is not None:
                return check_idempotent(self.turns[first][0], command, digest), None
        parent = head if command.parent_turn_id is None else command.parent_turn_id
        depth = self._turn(parent).depth + 1 if parent else 1
        record = TurnRecord(
            turn_id=self.last_turn + 1,
            context_id=context_id,
            parent_turn_id=parent,
            depth=depth,
            type_id=command.type_id,
            type_version=command.type_version,
            payload=command.payload,
            payload_hash=digest,
            idempotency_key=key,
            created_at_ms=self.clock(),
        )
        return record, TurnRec(record)

    def load(self, rec: Record) -> None:
        """Apply a decided record: the only place the state changes (also on replay)."""
        match rec:
            case ContextRec(context_id=context_id, head_turn_id=head):
                self.heads[context_id] = head
                self.last_context = max(self.last_context, context_id)
            case TurnRec(record=record):
                jump = (0, 0)
                if record.parent_turn_id:
                    parent, parent_jump, parent_jump_depth = self.turns[record.parent_turn_id]
                    grand = self.turns[parent_jump] if parent_jump else None
                    jump = jump_for(
                        parent.turn_id,
                        parent.depth,
                        parent_jump_depth,
                        grand[1] if grand else 0,
                        grand[2] if grand else 0,
                    )
                self.turns[record.turn_id] = (record, *jump)
                self.heads[record.context_id] = record.turn_id
                if record.idempotency_key is not None:
                    self.keys[(record.context_id, record.idempotency_key)] = record.turn_id
                self.last_turn = max(self.last_turn, record.turn_id)
            case BundleRec(bundle_id=bundle_id, bundle_json=data):
                self.bundles[bundle_id] = data
            case AttachRec(turn_id=turn_id, fs_root=fs_root):
                old, skip, skip_depth = self.turns[turn_id]
                self.turns[turn_id] = (msgspec.structs.replace(old, fs_root=fs_root), skip, skip_depth)
            case BlobRec(oid=oid, data=data):
                self.blobs[oid] = data

    def apply(self, command: TurnCommand) -> object:
        result, rec = self.decide(command)
        if rec is not None:
            self.load(rec)
        return result

    # -- reads -----------------------------------------------------------------------------------

    def _entry(self, turn_id: int) -> tuple[TurnRecord, int, int]:
        entry = self.turns.get(turn_id)
        if entry is None:
            raise TurnNotFound(f"no turn {turn_id}")
        return entry

    def _turn(self, turn_id: int) -> TurnRecord:
        return self._entry(turn_id)[0]

    def get_turn(self, turn_id: int) -> TurnRecord:
        return self._turn(validate_id(turn_id, "turn_id"))

    def get_head(self, context_id: int) -> ContextHead:
        validate_id(context_id, "context_id")
        head = self.heads.get(context_id)
        if head is None:
            raise ContextNotFound(f"no context {context_id}")
        return ContextHead(context_id, head, self.turns[head][0].depth if head else 0)

    def ancestor_at(self, turn_id: int, depth: int) -> int:
        """The ancestor of ``turn_id`` at ``depth``, in O(log depth) steps over the skip links."""
        record, jump, jump_depth = self.turns[turn_id]
        while record.depth > depth:
            turn_id = jump if jump_depth >= depth else record.parent_turn_id
            record, jump, jump_depth = self.turns[turn_id]
        return turn_id

    def list_turns(self, context_id: int, before_turn_id: int | None, limit: int) -> list[TurnRecord]:
        head = self.get_head(context_id).head_turn_id
        start = head
        if before_turn_id is not None:
            validate_id(before_turn_id, "before_turn_id")
            cursor = self.turns.get(before_turn_id)
            if cursor is None or not head or self.ancestor_at(head, cursor[0].depth) != before_turn_id:
                raise InvalidInput(f"turn {before_turn_id} is not on the chain of context {context_id}")
            start = cursor[0].parent_turn_id
        out: list[TurnRecord] = []
        turn_id = start
        while turn_id and len(out) < limit:
            record = self.turns[turn_id][0]
            out.append(record)
            turn_id = record.parent_turn_id
        out.reverse()
        return out

    def get_blob(self, oid: str) -> bytes:
        validate_oid(oid)
        data = self.blobs.get(oid)
        if data is None:
            raise ObjectNotFound(f"no blob {oid}")
        return data
