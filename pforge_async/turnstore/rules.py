"""What every backend checks and decides the same way: argument validation, idempotency, skip links,
context names, metadata, listing cursors and payload verification.

Ids of contexts and turns are ints from 1 to 2**63-1 (SQLite's signed 64-bit INTEGER); 0 means none
where a parameter allows it. Anything else is ``InvalidInput``. Text (type ids, keys, names, bundle
ids, metadata strings) must be encodable as UTF-8: a lone surrogate is ``InvalidInput``.

Skip links: each turn keeps one extra pointer, ``jump``, to an ancestor chosen as in Myers' skew-binary
lists, so the ancestor at any depth is found in O(log depth) steps. That is what makes a paging
cursor's "is this turn on the context's chain" check cost the same at depth 10 and at depth 10^6.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Sequence
from typing import Any, Protocol, TypeVar, cast

import msgspec

from ..cas.objects import validate_oid
from ..errors import IdempotencyConflict, IntegrityError, InvalidInput, PforgeError
from .commands import AppendTurn, CreateContext
from .types import ContextInfo, ContextOrder, TurnRecord

__all__ = [
    "DEFAULT_MAX_PAYLOAD",
    "MAX_BATCH_TURNS",
    "MAX_ID",
    "MAX_LIST_LIMIT",
    "MAX_METADATA",
    "MAX_NAME",
    "MAX_PAGE_SIZE",
    "ORDERS",
    "check_creation_retry",
    "check_idempotent",
    "check_text",
    "creation_fingerprint",
    "decode_cursor",
    "decode_metadata",
    "encode_cursor",
    "encode_metadata",
    "jump_for",
    "name_successor",
    "next_updated",
    "payload_hash",
    "plain_bytes",
    "plain_int",
    "plain_str",
    "split_batches",
    "validate_append",
    "validate_bundle",
    "validate_id",
    "validate_limit",
    "validate_name",
    "validate_order",
    "validate_prefix",
    "verify_turn",
]

DEFAULT_MAX_PAYLOAD = 16 << 20
#: SQLite's INTEGER is signed 64-bit: ids above this cannot be stored.
MAX_ID = (1 << 63) - 1
MAX_TYPE_ID = 256
MAX_KEY = 1024
#: CAS objects one turn may name in ``refs``
MAX_REFS = 4096
#: a context name or prefix, in UTF-8 bytes
MAX_NAME = 1024
#: a context's metadata, as canonical JSON (``encode_metadata``), in bytes
MAX_METADATA = 64 << 10
_MAX_METADATA_DEPTH = 64
#: turns in one ``append_turns`` batch
MAX_BATCH_TURNS = 4096
#: a batch's payloads together (or ``max_payload_bytes``, if that is more)
MAX_BATCH_BYTES = 64 << 20
MAX_LIST_LIMIT = 10_000
MAX_PAGE_SIZE = 65_536
ORDERS: tuple[ContextOrder, ...] = ("updated", "created", "name")


def check_text(value: str, what: str) -> None:
    """``InvalidInput`` for a str that UTF-8 cannot encode (a lone surrogate)."""
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidInput(f"{what} {value!r} has a lone surrogate (not encodable as UTF-8)") from exc


def plain_str(value: str) -> str:
    """``value`` as an exact ``str``: a subclass (a ``str`` enum, a framework's typed id) becomes its
    value, which is what every backend stores (msgpack encodes no subclass; ``str()`` of an enum
    member is its name, not its value)."""
    return value if type(value) is str else str.__str__(value)


def plain_int(value: int) -> int:
    """``value`` as an exact ``int`` (see ``plain_str``; ``int()`` could call an overridden ``__int__``)."""
    return value if type(value) is int else int.__int__(value)


def plain_bytes(value: object, what: str = "payload") -> bytes:
    """A bytes-like argument as exact ``bytes`` (its raw bytes, whatever a memoryview's format), or
    ``InvalidInput`` for one that cannot be read (a released memoryview). Other types are returned
    as they are, for the caller's type check to refuse."""
    if type(value) is bytes or not isinstance(value, (bytes, bytearray, memoryview)):
        return value  # type: ignore[return-value]
    try:
        return bytes(memoryview(value))
    except ValueError as exc:  # released
        raise InvalidInput(f"{what} cannot be read: {exc}") from exc


def validate_id(value: object, what: str, *, allow_zero: bool = False) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidInput(f"{what} must be an int, got {type(value).__name__} {value!r}")
    if not (0 if allow_zero else 1) <= value <= MAX_ID:
        raise InvalidInput(f"{what} {value} is out of range")
    return plain_int(value)


def validate_append(command: AppendTurn, max_payload: int) -> AppendTurn:
    """Everything about one append that needs no stored state (the base checks ``fs_root`` names a
    tree): the command itself, or a copy in plain types if a field held a subclass (``plain_str``)."""
    validate_id(command.context_id, "context_id")
    type_id = command.type_id
    if not isinstance(type_id, str) or not type_id or len(type_id) > MAX_TYPE_ID:
        raise InvalidInput(f"type_id must be a non-empty str of at most {MAX_TYPE_ID} chars, got {type_id!r}")
    if not type_id.isascii():
        check_text(type_id, "type_id")
    version = command.type_version
    if not isinstance(version, int) or isinstance(version, bool) or not 0 <= version < 1 << 32:
        raise InvalidInput(f"type_version must be an int from 0 to 2**32-1, got {version!r}")
    payload = command.payload
    if not isinstance(payload, bytes):
        raise InvalidInput(f"payload must be bytes, got {type(payload).__name__}")
    if len(payload) > max_payload:
        raise InvalidInput(f"payload of {len(payload)} bytes is over the maximum of {max_payload}")
    if command.parent_turn_id is not None:
        validate_id(command.parent_turn_id, "parent_turn_id", allow_zero=True)
    if command.idempotency_key is not None:
        validate_key(command.idempotency_key)
    if command.expected_head is not None:
        validate_id(command.expected_head, "expected_head", allow_zero=True)
    if command.fs_root is not None:
        validate_oid(command.fs_root, "fs_root")
    return _plain_append(command) if _has_subclass(command) else command


def _has_subclass(command: AppendTurn) -> bool:
    # Only exact types are checked: an append of plain values (every caller's usual) costs this test.
    return not (
        type(command.context_id) is int
        and type(command.type_id) is str
        and type(command.payload) is bytes
        and type(command.type_version) is int
        and type(command.parent_turn_id) in (int, type(None))
        and type(command.idempotency_key) in (str, type(None))
        and type(command.expected_head) in (int, type(None))
        and type(command.fs_root) in (str, type(None))
    )


def _plain_append(command: AppendTurn) -> AppendTurn:
    def opt_int(value: int | None) -> int | None:
        return None if value is None else plain_int(value)

    def opt_str(value: str | None) -> str | None:
        return None if value is None else plain_str(value)

    return msgspec.structs.replace(
        command,
        context_id=plain_int(command.context_id),
        type_id=plain_str(command.type_id),
        payload=plain_bytes(command.payload),
        type_version=plain_int(command.type_version),
        parent_turn_id=opt_int(command.parent_turn_id),
        idempotency_key=opt_str(command.idempotency_key),
        expected_head=opt_int(command.expected_head),
        fs_root=opt_str(command.fs_root),
    )


class _HasPayload(Protocol):
    @property
    def payload(self) -> bytes: ...


_Turn = TypeVar("_Turn", bound=_HasPayload)


def split_batches(turns: Sequence[_Turn]) -> list[list[_Turn]]:
    """``turns`` cut, in order, into batches ``append_turns`` takes at once (at most
    ``MAX_BATCH_TURNS`` turns and ``MAX_BATCH_BYTES`` of payload each, or a single turn over that).
    Always at least one batch: ``[[]]`` for no turns."""
    batches: list[list[_Turn]] = [[]]
    size = 0
    for turn in turns:
        if batches[-1] and (len(batches[-1]) >= MAX_BATCH_TURNS or size + len(turn.payload) > MAX_BATCH_BYTES):
            batches.append([])
            size = 0
        batches[-1].append(turn)
        size += len(turn.payload)
    return batches


def validate_refs(refs: object) -> tuple[str, ...]:
    """``refs`` as stored: any iterable of object ids (at most ``MAX_REFS``; a generator is read
    once), sorted, each once. A str or bytes is refused: it iterates as characters, never as ids."""
    if type(refs) is tuple and not refs:  # the default of every append: no set, no sort
        return ()
    if isinstance(refs, (str, bytes, bytearray, memoryview)):
        raise InvalidInput(f"refs must be an iterable of object ids, got {type(refs).__name__}")
    # The built-in collections are counted as they are; any other iterable is read first, once.
    builtin = type(refs) in (tuple, list, set, frozenset)
    items = cast("tuple[object, ...]", refs) if builtin else _read_refs(refs)
    if len(items) > MAX_REFS:
        raise InvalidInput(f"{len(items)} refs is over the maximum of {MAX_REFS} per turn")
    return tuple(sorted({plain_str(validate_oid(oid, "ref")) for oid in items}))


def _read_refs(refs: object) -> tuple[object, ...]:
    """The items of any other iterable, read once and at most one past ``MAX_REFS`` (an endless
    generator is refused, not run forever). What its own iteration raises is ``InvalidInput``."""
    if not hasattr(type(refs), "__iter__") and not hasattr(type(refs), "__getitem__"):
        raise InvalidInput(f"refs must be an iterable of object ids, got {type(refs).__name__}")
    try:
        return tuple(itertools.islice(iter(refs), MAX_REFS + 1))  # type: ignore[call-overload]
    except PforgeError:
        raise
    except Exception as exc:  # the caller's iterator failed: nothing was validated, nothing stored
        raise InvalidInput(f"refs could not be read: {exc!r:.200}") from exc


def validate_key(key: object, what: str = "idempotency_key") -> str | None:
    if key is None:
        return None
    if not isinstance(key, str) or not key or len(key) > MAX_KEY:
        raise InvalidInput(f"{what} must be None or a non-empty str of at most {MAX_KEY} chars, got {key!r}")
    check_text(key, what)
    return plain_str(key)


def validate_limit(limit: object, what: str = "limit", *, low: int = 0, high: int = MAX_ID) -> int:
    """``limit`` if it is an int from ``low`` to ``high`` (by default what a database stores: a limit
    past it was refused by the backend's bind, not as bad input)."""
    if not isinstance(limit, int) or isinstance(limit, bool) or not low <= limit <= high:
        # repr() of an int of over 4,300 digits raises ValueError of its own
        huge = isinstance(limit, int) and limit.bit_length() > 64
        shown = f"an int of {cast(int, limit).bit_length()} bits" if huge else repr(limit)
        raise InvalidInput(f"{what} must be an int from {low} to {high}, got {shown}")
    return plain_int(limit)


def validate_bundle(bundle_id: object, bundle_json: object) -> None:
    if not isinstance(bundle_id, str) or not bundle_id or len(bundle_id) > MAX_KEY:
        raise InvalidInput(f"bundle_id must be a non-empty str, got {bundle_id!r}")
    check_text(bundle_id, "bundle_id")
    if not isinstance(bundle_json, bytes):
        raise InvalidInput(f"bundle_json must be bytes, got {type(bundle_json).__name__}")
    try:
        json.loads(bundle_json)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested past the parser's depth
        raise InvalidInput(f"bundle {bundle_id!r} is not valid JSON: {exc}") from exc


def payload_hash(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def verify_turn(record: TurnRecord) -> TurnRecord:
    """The record itself, or ``IntegrityError`` naming the turn if its payload does not match its hash.

    Every read of a turn goes through this (in ``TurnStoreBase``), so a damaged payload is never
    returned as good data, whichever backend held it. An erased turn passes if it holds nothing: one
    marked erased that still holds bytes is damaged (those bytes are never returned)."""
    if record.erased:
        if record.payload or record.payload_hash or record.refs:
            raise IntegrityError(
                f"turn {record.turn_id} (context {record.context_id}) is damaged: it is marked erased but "
                "still holds a payload"
            )
        return record
    if hashlib.sha256(record.payload).hexdigest() != record.payload_hash:
        raise IntegrityError(
            f"turn {record.turn_id} (context {record.context_id}) is damaged: its payload does not match "
            f"its payload_hash {record.payload_hash}"
        )
    return record


# -- contexts: names, metadata, creation keys, versions -----------------------------------------------


def validate_name(value: object, what: str = "name") -> str:
    """A context name: a non-empty str of at most 1,024 UTF-8 bytes, no NUL, no lone surrogate.
    ``/`` is the conventional separator of hierarchies (``app/user/session``); nothing enforces it."""
    if not isinstance(value, str) or not value:
        raise InvalidInput(f"{what} must be a non-empty str, got {type(value).__name__} {value!r:.80}")
    return _name_text(value, what)


def validate_prefix(value: object) -> str:
    """A ``list_contexts`` prefix: like a name, but may be empty (every named context)."""
    if not isinstance(value, str):
        raise InvalidInput(f"prefix must be a str, got {type(value).__name__} {value!r:.80}")
    return _name_text(value, "prefix")


def _name_text(value: str, what: str) -> str:
    if "\0" in value:
        raise InvalidInput(f"{what} {value!r:.80} contains NUL")
    check_text(value, what)
    size = len(value) if value.isascii() else len(value.encode("utf-8"))
    if size > MAX_NAME:
        raise InvalidInput(f"{what} of {size} UTF-8 bytes is over the maximum of {MAX_NAME}: {value[:40]!r}...")
    return plain_str(value)


def name_successor(prefix: str) -> str | None:
    """The least str greater than every str that starts with ``prefix`` (non-empty, no lone
    surrogate), or None if there is none (``prefix`` is all U+10FFFF). Code point order is UTF-8 byte
    order, so ``prefix <= name < successor`` is "name starts with prefix" in every backend."""
    stem = prefix.rstrip(chr(0x10FFFF))
    if not stem:
        return None
    last = ord(stem[-1]) + 1
    if last == 0xD800:  # names hold no surrogates
        last = 0xE000
    return stem[:-1] + chr(last)


def encode_metadata(value: object) -> bytes:
    """Context metadata as canonical JSON bytes (sorted keys, no spaces, UTF-8), or ``InvalidInput``.

    Accepted: a dict with str keys whose values are None, bool, int, finite float, str, list or dict
    (nested at most 64 deep), at most 64 KiB encoded. A value of a subclass of one of these (an
    ``OrderedDict``, a str enum, an ``IntEnum``) is taken as its plain value, as every other argument
    is, and comes back as the plain type. Not accepted: tuples, bytes, NaN, other types (they would
    not come back as they went in)."""
    if value is None:
        return b"{}"
    if not isinstance(value, dict):
        raise InvalidInput(f"metadata must be a dict, got {type(value).__name__}")
    if not value:
        return b"{}"
    plain = _plain_json(value, 0)
    try:
        data = json.dumps(plain, ensure_ascii=False, sort_keys=True, separators=(",", ":"), allow_nan=False)
        encoded = data.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInput("metadata has a str with a lone surrogate (not encodable as UTF-8)") from exc
    except (ValueError, RecursionError) as exc:
        raise InvalidInput(f"metadata is not JSON-compatible: {exc}") from exc
    if len(encoded) > MAX_METADATA:
        raise InvalidInput(f"metadata of {len(encoded)} bytes (JSON) is over the maximum of {MAX_METADATA}")
    return encoded


def _plain_json(value: object, depth: int) -> object:
    """``value`` checked and rebuilt from plain JSON types: a subclass becomes its plain value, read
    through the built-in type's own methods (an override of ``items``, ``__iter__``, ``__str__`` or
    ``__float__`` is not asked), so what is encoded is what the value holds."""
    if depth > _MAX_METADATA_DEPTH:
        raise InvalidInput(f"metadata is nested more than {_MAX_METADATA_DEPTH} deep")
    if value is None or type(value) is bool:
        return value
    if isinstance(value, dict):
        plain: dict[str, object] = {}
        for key, item in dict.items(value):
            if not isinstance(key, str):
                raise InvalidInput(f"metadata keys must be str, got {type(key).__name__} {key!r:.80}")
            plain[plain_str(key)] = _plain_json(item, depth + 1)
        if len(plain) != dict.__len__(value):  # keys unequal as given but equal as plain str
            raise InvalidInput("metadata has two keys with the same value")
        return plain
    if isinstance(value, list):
        return [_plain_json(item, depth + 1) for item in list.__iter__(value)]
    if isinstance(value, str):
        return plain_str(value)
    if isinstance(value, int):
        return plain_int(value)
    if isinstance(value, float):
        number = float.__float__(value)
        if not math.isfinite(number):
            raise InvalidInput(f"metadata holds {number!r}, which JSON cannot carry")
        return number
    raise InvalidInput(f"metadata values must be JSON types, got {type(value).__name__} {value!r:.80}")


def decode_metadata(data: bytes | str) -> dict[str, Any]:
    """A fresh dict from stored canonical JSON (every read gets its own copy)."""
    if data == b"{}" or data == "{}":
        return {}
    try:
        value = json.loads(data)
    except ValueError as exc:
        raise IntegrityError(f"stored context metadata is not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise IntegrityError("stored context metadata is not a JSON object")
    return value


_fingerprint_encoder = msgspec.msgpack.Encoder()


def creation_fingerprint(command: CreateContext) -> str:
    """What an idempotent context creation compares on a retry: the request as the caller made it
    (base turn, name, metadata, parent as asked, and whether it was a get-or-create), as SHA-256 hex.
    Backends store it beside the key."""
    request = (
        command.base_turn_id,
        command.name,
        command.metadata,
        command.parent_context_id,
        command.open_existing,
    )
    return hashlib.sha256(_fingerprint_encoder.encode(request)).hexdigest()


def check_creation_retry(key: str, context_id: int, stored: str, command: CreateContext) -> None:
    """``IdempotencyConflict`` unless ``command`` is the same request the key first created
    ``context_id`` with."""
    if creation_fingerprint(command) != stored:
        raise IdempotencyConflict(
            f"idempotency key {key!r} created context {context_id} with a different request "
            "(base turn, name, metadata or parent)"
        )


def next_updated(previous: int, now: int) -> int:
    """A context's ``updated_at_ms`` after a change: strictly increasing, so it is a version too."""
    return now if now > previous else previous + 1


# -- list_contexts: orders and cursors -----------------------------------------------------------------


def validate_order(order: object) -> ContextOrder:
    if order not in ORDERS or not isinstance(order, str):
        raise InvalidInput(f"order must be one of {', '.join(map(repr, ORDERS))}, got {order!r:.80}")
    return order  # type: ignore[return-value]


def encode_cursor(order: ContextOrder, info: ContextInfo) -> str:
    """The cursor after ``info``: opaque to callers, the same in every backend. It is ``info``'s key in
    its order: ``(updated_at_ms, context_id)`` for "updated" and ``(context_id,)`` for "created", listed
    from the greatest key down; ``(name,)`` for "name", listed up (unnamed contexts are not listed by
    name). The next page holds the contexts strictly after this key in the order, as they stand when it
    is read: each context appears at most once in one pass; one changed during the pass may move ahead
    of the cursor and then is not seen again in that pass ("updated" order)."""
    if order == "updated":
        return f"u.{info.updated_at_ms}.{info.context_id}"
    if order == "created":
        return f"c.{info.context_id}"
    assert info.name is not None
    return "n." + info.name


def decode_cursor(order: ContextOrder, cursor: object) -> tuple[int, int] | tuple[int] | tuple[str]:
    """The key a cursor stands for, or ``InvalidInput`` (not a cursor, or one of another order)."""
    if not isinstance(cursor, str):
        raise InvalidInput(f"after must be a cursor str from list_contexts, got {type(cursor).__name__}")
    bad = InvalidInput(f"after {cursor!r:.80} is not a cursor of order {order!r}")
    tag, _, rest = cursor.partition(".")
    if tag != order[0]:
        raise bad
    if order == "name":
        if not rest:
            raise bad
        return (validate_prefix(rest),)
    parts = rest.split(".")
    if len(parts) != (2 if order == "updated" else 1) or not all(p.isdigit() and p.isascii() for p in parts):
        raise bad
    numbers = [int(p) for p in parts]
    if any(n > MAX_ID for n in numbers):
        raise bad
    return (numbers[0], numbers[1]) if order == "updated" else (numbers[0],)


def check_idempotent(existing: TurnRecord, command: AppendTurn, digest: str) -> TurnRecord:
    """The turn a retried append returns, or ``IdempotencyConflict`` if the retry differs.

    The parent compared is the one the caller asked for, never the resolved head: a retry whose first
    attempt landed finds the head moved to that very turn and must get it back, not a conflict.
    """
    differs: list[str] = []
    # An erased turn's payload cannot be compared: the retry gets the erased record back.
    if existing.payload_hash != digest and not existing.erased:
        differs.append("payload")
    if existing.type_id != command.type_id or existing.type_version != command.type_version:
        differs.append("type")
    if command.parent_turn_id is not None and command.parent_turn_id != existing.parent_turn_id:
        differs.append("parent")
    if command.fs_root is not None and command.fs_root != existing.fs_root:
        differs.append("fs_root")
    if command.refs and command.refs != existing.refs and not existing.erased:
        differs.append("refs")
    if differs:
        raise IdempotencyConflict(
            f"idempotency key {command.idempotency_key!r} in context {command.context_id} was used for "
            f"turn {existing.turn_id} with a different {' and '.join(differs)}"
        )
    return existing


def jump_for(
    parent: int, parent_depth: int, parent_jump_depth: int, grand_jump: int, grand_jump_depth: int
) -> tuple[int, int]:
    """The skip link of a new child of ``parent``, as ``(turn, depth)``.

    ``parent_jump_depth`` is the depth of the parent's own skip link, ``grand_jump`` that link's
    skip link (0, depth 0: the virtual root above every first turn).
    """
    if parent_depth - parent_jump_depth == parent_jump_depth - grand_jump_depth:
        return grand_jump, grand_jump_depth
    return parent, parent_depth
