"""The turn store's shared types: frozen msgspec Structs, so they encode to msgpack as they are."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

__all__ = [
    "ContextHead",
    "ContextInfo",
    "ContextOrder",
    "ContextPage",
    "Correlation",
    "NewTurn",
    "TurnEnvelope",
    "TurnRecord",
]

#: How ``list_contexts`` orders: ``"updated"`` (most recently changed first), ``"created"`` (newest
#: first) or ``"name"`` (ascending by code point, which is also UTF-8 byte order; named contexts only).
ContextOrder = Literal["updated", "created", "name"]


class ContextHead(msgspec.Struct, frozen=True):
    """Where a context stands: its id, its head turn (0 while empty) and that turn's depth."""

    context_id: int
    head_turn_id: int
    head_depth: int


class ContextInfo(ContextHead, frozen=True):
    """Everything a context holds besides its turns. A ``ContextHead`` too (it extends it), so code
    written for ``create_context() -> ContextHead`` keeps working.

    - ``name``: unique among the store's contexts, or None.
    - ``base_turn_id``: the turn it started from (0: it started empty). Its head may move anywhere later.
    - ``parent_context_id``: the context it was forked from (0: none). Lineage only: a parent's later
      changes do not touch the child.
    - ``metadata``: a JSON-compatible dict (at most 64 KiB encoded); a copy, changing it changes nothing.
    - ``updated_at_ms``: when the context last changed: a turn appended in it, a ``set_head``, a
      ``set_context_metadata``. Every such write sets it to ``max(now, updated_at_ms + 1)``, so it
      strictly increases with every change and serves as the context's version for
      ``set_context_metadata(..., expected_updated_at_ms=)``. A new context has
      ``updated_at_ms == created_at_ms``.
    """

    name: str | None
    base_turn_id: int
    parent_context_id: int
    metadata: dict[str, Any]
    created_at_ms: int
    updated_at_ms: int


class ContextPage(msgspec.Struct, frozen=True):
    """One page of ``list_contexts``: pass ``cursor`` as ``after`` for the next; None at the end."""

    contexts: list[ContextInfo]
    cursor: str | None


class NewTurn(msgspec.Struct, frozen=True):
    """One turn of an ``append_turns`` batch: what ``append_turn`` takes, with its context.

    ``parent_turn_id`` None means the context's head *as the batch has moved it so far*: the turns of
    one context chain in the order given.
    """

    context_id: int
    type_id: str
    payload: bytes
    type_version: int = 1
    parent_turn_id: int | None = None
    idempotency_key: str | None = None
    fs_root: str | None = None
    #: CAS objects the turn keeps alive besides ``fs_root`` (see ``append_turn``)
    refs: tuple[str, ...] = ()


class TurnRecord(msgspec.Struct, frozen=True):
    """One immutable turn. ``parent_turn_id`` is 0 for a first turn, whose ``depth`` is 1.

    ``erased``: its payload was erased (``erase_turns``, ``prune_context``); ``payload`` is then
    ``b""``, ``payload_hash`` ``""`` and ``refs`` ``()`` for good, and everything else is as it was
    (``fs_root`` too), so chains hold.

    ``refs``: the CAS objects the turn keeps alive besides ``fs_root``, sorted, each once.
    """

    turn_id: int
    context_id: int
    parent_turn_id: int
    depth: int
    type_id: str
    type_version: int
    payload: bytes
    payload_hash: str
    idempotency_key: str | None
    created_at_ms: int
    fs_root: str | None = None
    erased: bool = False
    refs: tuple[str, ...] = ()


class Correlation(msgspec.Struct, frozen=True, omit_defaults=True):
    """What ties a turn to the run, pipeline node, agent session and thread it belongs to."""

    run_id: str | None = None
    pipeline_context_id: int | None = None
    node_id: str | None = None
    stage_attempt_id: str | None = None
    agent_session_id: str | None = None
    agent_context_id: int | None = None
    agent_head_turn_id: int | None = None
    parent_turn_id: int | None = None
    sequence_no: int | None = None
    thread_key: str | None = None


class TurnEnvelope(msgspec.Struct, frozen=True, omit_defaults=True):
    """A typed event as agents and pipelines write it into a turn's payload (msgpack)."""

    event_kind: str
    timestamp_ms: int
    payload: bytes = b""
    correlation: Correlation = Correlation()
    run_id: str | None = None
    session_id: str | None = None
    node_id: str | None = None
    stage_attempt_id: str | None = None
    schema_version: int = 1

    def encode(self) -> bytes:
        return _encoder.encode(self)

    @classmethod
    def decode(cls, data: bytes) -> TurnEnvelope:
        return _decoder.decode(data)


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(TurnEnvelope)
