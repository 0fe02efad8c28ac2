"""What every backend checks and decides the same way: argument validation, idempotency, skip links.

Skip links: each turn keeps one extra pointer, ``jump``, to an ancestor chosen as in Myers' skew-binary
lists, so the ancestor at any depth is found in O(log depth) steps. That is what makes a paging
cursor's "is this turn on the context's chain" check cost the same at depth 10 and at depth 10^6.
"""

from __future__ import annotations

import hashlib
import json

from ..errors import IdempotencyConflict, InvalidInput
from .commands import AppendTurn
from .types import TurnRecord

__all__ = [
    "DEFAULT_MAX_PAYLOAD",
    "check_idempotent",
    "jump_for",
    "payload_hash",
    "validate_append",
    "validate_bundle",
    "validate_id",
    "validate_limit",
]

DEFAULT_MAX_PAYLOAD = 16 << 20
MAX_ID = (1 << 64) - 1
MAX_TYPE_ID = 256
MAX_KEY = 1024


def validate_id(value: object, what: str, *, allow_zero: bool = False) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidInput(f"{what} must be an int, got {type(value).__name__} {value!r}")
    if not (0 if allow_zero else 1) <= value <= MAX_ID:
        raise InvalidInput(f"{what} {value} is out of range")
    return value


def validate_append(command: AppendTurn, max_payload: int) -> None:
    validate_id(command.context_id, "context_id")
    type_id = command.type_id
    if not isinstance(type_id, str) or not type_id or len(type_id) > MAX_TYPE_ID:
        raise InvalidInput(f"type_id must be a non-empty str of at most {MAX_TYPE_ID} chars, got {type_id!r}")
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
    key = command.idempotency_key
    if key is not None and (not isinstance(key, str) or not key or len(key) > MAX_KEY):
        raise InvalidInput(f"idempotency_key must be None or a non-empty str of at most {MAX_KEY} chars")


def validate_limit(limit: object) -> int:
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
        raise InvalidInput(f"limit must be an int >= 0, got {limit!r}")
    return limit


def validate_bundle(bundle_id: object, bundle_json: object) -> None:
    if not isinstance(bundle_id, str) or not bundle_id or len(bundle_id) > MAX_KEY:
        raise InvalidInput(f"bundle_id must be a non-empty str, got {bundle_id!r}")
    if not isinstance(bundle_json, bytes):
        raise InvalidInput(f"bundle_json must be bytes, got {type(bundle_json).__name__}")
    try:
        json.loads(bundle_json)
    except ValueError as exc:
        raise InvalidInput(f"bundle {bundle_id!r} is not valid JSON: {exc}") from exc


def payload_hash(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def check_idempotent(existing: TurnRecord, command: AppendTurn, digest: str) -> TurnRecord:
    """The turn a retried append returns, or ``IdempotencyConflict`` if the retry differs.

    The parent compared is the one the caller asked for, never the resolved head: a retry whose first
    attempt landed finds the head moved to that very turn and must get it back, not a conflict.
    """
    differs: list[str] = []
    if existing.payload_hash != digest:
        differs.append("payload")
    if existing.type_id != command.type_id or existing.type_version != command.type_version:
        differs.append("type")
    if command.parent_turn_id is not None and command.parent_turn_id != existing.parent_turn_id:
        differs.append("parent")
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
