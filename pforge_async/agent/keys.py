"""The deterministic idempotency keys of an agent session's writes, all under ``pforge-agent:v1``
(``turnstore.keys.agent_key``: length-prefixed parts, so no two inputs share a key).

A positional record is keyed by (session name, sequence number, kind); a link record by (session
name, kind, subagent id), since subagents come and go in no fixed order. The same session replayed
gives the same keys, so a write that already landed is found, never duplicated.
"""

from __future__ import annotations

import hashlib

from ..turnstore.keys import agent_key
from ..turnstore.rules import MAX_KEY, MAX_NAME

__all__ = [
    "budget_key",
    "child_context_key",
    "close_key",
    "kind_of",
    "record_key",
    "spawn_key",
    "subagent_session_name",
]

_PREFIXES = ("pforge.agent.", "pforge.link.")


def kind_of(type_id: str) -> str:
    """``pforge.agent.user_turn`` -> ``user_turn``."""
    kind = _kinds.get(type_id)
    if kind is None:
        kind = type_id
        for prefix in _PREFIXES:
            if type_id.startswith(prefix):
                kind = type_id[len(prefix) :]
                break
        if len(_kinds) < 256:  # the record types, a handful: computed once each
            _kinds[type_id] = kind
    return kind


_kinds: dict[str, str] = {}


def record_key(session_name: str, seq: int, type_id: str) -> str:
    """The key of the positional record ``seq`` of a session: ``agent_key(session_name, seq, kind)``.

    Every hook call makes one, so the encoded session name and kind are kept (a session's name and
    its record types repeat at every call) and only the position is encoded: the same string as
    ``agent_key`` gives, at a fraction of its cost."""
    head = _heads.get(session_name)
    if head is None:
        head = f"{_AGENT_PREFIX}s{len(session_name)}:{session_name}|"
        if len(_heads) >= _MAX_HEADS:
            _heads.pop(next(iter(_heads)))  # the oldest: sessions end, names are not reused often
        _heads[session_name] = head
    tail = _tails.get(type_id)
    if tail is None:
        kind = kind_of(type_id)
        tail = f"s{len(kind)}:{kind}|"
        if len(_tails) < 256:
            _tails[type_id] = tail
    position = str(seq)
    key = f"{head}i{len(position)}:{position}|{tail}"
    if len(key) > MAX_KEY:  # too long for the store: agent_key hashes it
        return agent_key(session_name, seq, kind_of(type_id))
    return key


_AGENT_PREFIX = "pforge-agent:v1|"
_MAX_HEADS = 4096
_heads: dict[str, str] = {}
_tails: dict[str, str] = {}


def spawn_key(session_name: str, subagent_id: str) -> str:
    """The key of the link record a parent writes when it spawns ``subagent_id``."""
    return agent_key(session_name, "subagent_spawn", subagent_id)


def child_context_key(session_name: str, subagent_id: str) -> str:
    """The key (scoped to the store) of the fork that makes a subagent's context."""
    return agent_key(session_name, "subagent_context", subagent_id)


def close_key(session_name: str, subagent_id: str | None = None) -> str:
    """The key of a close record: in the child's own context (``subagent_id`` None) or in its
    parent's (the child's subagent id)."""
    if subagent_id is None:
        return agent_key(session_name, "subagent_close")
    return agent_key(session_name, "subagent_close", subagent_id)


def budget_key(session_name: str, index: int) -> str:
    """The key of the budget charge (reservation or spend) of a session's ``index``-th assistant turn
    (counted from 0): by turn, not position, so other hooks between the reservation and the turn
    change nothing."""
    return agent_key(session_name, "assistant", index, "budget")


def subagent_session_name(parent_name: str, subagent_id: str) -> str:
    """``parent/subagent``: a subagent's session is named under its parent's, so a prefix lists a
    whole tree. A name longer than the store accepts keeps its start and ends in the SHA-256 of the
    full name, so nesting can go to any depth and two subagents never share a name."""
    name = f"{parent_name}/{subagent_id}"
    encoded = name.encode("utf-8", "surrogatepass")
    if len(encoded) <= MAX_NAME:
        return name
    digest = hashlib.sha256(encoded).hexdigest()
    head = encoded[: MAX_NAME - len(digest) - 1].decode("utf-8", "ignore")
    return f"{head}~{digest}"
