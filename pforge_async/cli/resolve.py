"""Turning what the user typed into what the store holds: contexts by name or id, turns, object ids,
and the registry bundles that name payload types. Each failure is ``InvalidInput`` or ``NotFound``
(exit 2) naming what was typed."""

from __future__ import annotations

import re

from ..errors import ContextNotFound, InvalidInput
from ..store import Store
from ..turnstore.types import ContextInfo, TurnRecord
from .payloads import Bundles
from .sqlread import SqlReader

__all__ = ["bundles", "context", "parse_id", "tree_of", "turn"]

_MAX_ID = 2**63 - 1
_OID = re.compile(r"[0-9a-f]{64}")


def _number(text: str) -> int | None:
    """``text`` as an id if it is one (ASCII digits, 1 to 2**63-1, leading zeros allowed), else None.
    The length is checked before ``int()``, which refuses strings of over 4,300 digits with a
    ``ValueError`` of its own."""
    if not text.isascii() or not text.isdigit() or len(text.lstrip("0")) > len(str(_MAX_ID)):
        return None
    value = int(text)
    return value if 1 <= value <= _MAX_ID else None


def parse_id(text: str, what: str) -> int:
    """A positive id as typed (``InvalidInput`` otherwise)."""
    value = _number(text)
    if value is None:
        shown = text if len(text) <= 40 else text[:40] + "..."
        raise InvalidInput(f"invalid {what} {shown!r}: want a number from 1 to {_MAX_ID}")
    return value


async def context(store: Store, text: str) -> ContextInfo:
    """A context by name or by id. A number is an id when a context has it, and a name otherwise;
    ``id:N`` and ``name:X`` say which one is meant."""
    if text.startswith("id:"):
        return await store.turns.get_context(parse_id(text[3:], "context id"))
    if text.startswith("name:"):
        name = text[5:]
        found = await store.turns.find_context(name)
        if found is None:
            raise ContextNotFound(f"no context named {name!r}")
        return found
    number = _number(text)
    if number is not None:
        try:
            return await store.turns.get_context(number)
        except ContextNotFound:
            pass
    if not text:
        raise InvalidInput("empty context name")
    found = await store.turns.find_context(text)
    if found is None:
        raise ContextNotFound(
            f"no context or session named {text!r}" + (" and none with that id" if text.isdigit() else "")
        )
    return found


async def turn(store: Store, text: str) -> TurnRecord:
    return await store.turns.get_turn(parse_id(text, "turn id"))


async def tree_of(store: Store, text: str) -> tuple[str, str]:
    """A workspace tree: a tree id as it is, or a turn id for the snapshot attached to that turn.
    Returns (tree id, what it is, for messages)."""
    if _OID.fullmatch(text):
        return text, f"tree {text[:12]}"
    if len(text) == 64 or not text.isdigit():
        raise InvalidInput(f"invalid tree id or turn id {text!r}: want 64 lowercase hex characters or a turn number")
    record = await turn(store, text)
    if not record.fs_root:
        raise InvalidInput(f"turn {record.turn_id} has no workspace snapshot attached (no fs_root)")
    return record.fs_root, f"turn {record.turn_id} (tree {record.fs_root[:12]})"


async def bundles(store: Store, sql: SqlReader) -> Bundles:
    """Every registry bundle the store holds (they are few and small): their ids listed from the
    database, each read through the store."""
    rows = await sql.rows("turns.db", "SELECT bundle_id FROM registry_bundles ORDER BY bundle_id")
    found = []
    for (bundle_id,) in rows:
        raw = await store.turns.get_registry_bundle(str(bundle_id))
        if raw is not None:
            found.append((str(bundle_id), raw))
    return Bundles.parse(found)
