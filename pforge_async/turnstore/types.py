"""The turn store's shared types: frozen msgspec Structs, so they encode to msgpack as they are."""

from __future__ import annotations

import msgspec

__all__ = ["ContextHead", "Correlation", "TurnEnvelope", "TurnRecord"]


class ContextHead(msgspec.Struct, frozen=True):
    """Where a context stands: its id, its head turn (0 while empty) and that turn's depth."""

    context_id: int
    head_turn_id: int
    head_depth: int


class TurnRecord(msgspec.Struct, frozen=True):
    """One immutable turn. ``parent_turn_id`` is 0 for a first turn, whose ``depth`` is 1."""

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
