"""The records a pipeline run writes: one frozen msgspec Struct per turn type, encoded to msgpack, each
with the ``AttractorCorrelation`` that ties it to its run, node, stage attempt and agent session.

As with the agent's records, a record holds what its writer call was given and nothing from a clock
(a turn's ``created_at_ms`` says when it was written): the same call always encodes to the same
bytes, so a resumed run that re-issues a call finds it recorded and writes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Literal

import msgspec

from ..turnstore.registry import schema_bundle
from ..turnstore.types import Correlation, TurnRecord

__all__ = [
    "BUNDLE_ID",
    "CHECKPOINT",
    "RECORD_TYPES",
    "RUN_EVENT",
    "STAGE_AGENT_LINK",
    "STAGE_EVENT",
    "STAGE_STATUSES",
    "TYPE_VERSION",
    "AttractorCorrelation",
    "AttractorRecord",
    "AttractorRecorded",
    "CheckpointEvent",
    "CheckpointRecord",
    "RunEvent",
    "StageAgentLink",
    "StageEvent",
    "StageStatus",
    "StateRef",
    "decode_record",
    "encode_record",
    "registry_bundle",
]

RUN_EVENT: Final = "pforge.attractor.run_event"
STAGE_EVENT: Final = "pforge.attractor.stage_event"
CHECKPOINT: Final = "pforge.attractor.checkpoint"
STAGE_AGENT_LINK: Final = "pforge.link.stage_agent"

TYPE_VERSION: Final = 1
BUNDLE_ID: Final = "pforge.attractor.v1"

#: ``started`` and ``finished`` / ``failed`` bracket an attempt; ``retried`` is written when a failed
#: attempt is to be followed by another, with the attempt number of that next attempt.
StageStatus = Literal["started", "finished", "failed", "retried"]
STAGE_STATUSES: Final[tuple[StageStatus, ...]] = ("started", "finished", "failed", "retried")


class AttractorCorrelation(msgspec.Struct, frozen=True, omit_defaults=True):
    """What ties a pipeline record to its run (and the run's context in the turn store), the node and
    stage attempt it is about, the agent session that did that attempt, and the checkpoint's place.
    ``stage_attempt_id`` is ``<node_id>#<attempt>``."""

    run_id: str
    pipeline_context_id: int | None = None
    node_id: str | None = None
    attempt: int | None = None
    stage_attempt_id: str | None = None
    agent_session_id: str | None = None
    agent_context_id: int | None = None
    agent_head_turn_id: int | None = None
    sequence_no: int | None = None
    thread_key: str | None = None

    def to_correlation(self) -> Correlation:
        """The turn store's shared ``Correlation`` with the same values (it has no ``attempt``)."""
        return Correlation(
            run_id=self.run_id,
            pipeline_context_id=self.pipeline_context_id,
            node_id=self.node_id,
            stage_attempt_id=self.stage_attempt_id,
            agent_session_id=self.agent_session_id,
            agent_context_id=self.agent_context_id,
            agent_head_turn_id=self.agent_head_turn_id,
            sequence_no=self.sequence_no,
            thread_key=self.thread_key,
        )


class _Record(msgspec.Struct, frozen=True, omit_defaults=True):
    pass


class RunEvent(_Record, frozen=True):
    """Something that happened to the run as a whole (started, resumed, finished, ...). ``kind`` and
    ``event_id`` are its identity in the run: a second event of one kind needs its own ``event_id``.
    ``data``: any msgpack-encodable value."""

    kind: str
    correlation: AttractorCorrelation
    event_id: str = ""
    data: Any = None


class StageEvent(_Record, frozen=True):
    """A stage attempt started, finished, failed or is retried (see ``StageStatus``)."""

    node_id: str
    attempt: int
    status: StageStatus
    correlation: AttractorCorrelation
    outcome: str | None = None
    error: str | None = None
    data: Any = None


class StateRef(_Record, frozen=True):
    """Where a checkpoint's state (its ``context``, msgpack-encoded) is: in the blob store / CAS under
    ``oid`` (a git SHA-256 blob id, so a read re-hashes it), or ``inline`` (under the turn's payload
    hash). ``size``: of the encoded state, checked when it is loaded back. A checkpoint event in the
    run's own context leaves inline state out (both None): the whole record is in the run's checkpoint
    log."""

    size: int
    oid: str | None = None
    inline: bytes | None = None


class CheckpointEvent(_Record, frozen=True):
    """A checkpoint as stored: a ``CheckpointRecord`` with its ``context`` replaced by a ``StateRef``."""

    run_id: str
    checkpoint_id: str
    sequence_no: int
    current_node: str
    completed_nodes: list[str]
    node_retries: dict[str, int]
    state: StateRef
    correlation: AttractorCorrelation
    next_node: str | None = None


class StageAgentLink(_Record, frozen=True):
    """Which agent session did a stage attempt: its session name and context, and the head of that
    context when the link was written."""

    node_id: str
    attempt: int
    agent_session_name: str
    agent_context_id: int
    correlation: AttractorCorrelation
    agent_head_turn_id: int = 0
    thread_key: str | None = None


class CheckpointRecord(msgspec.Struct, frozen=True):
    """What a resume needs: where the run stood after node ``current_node`` (the nodes completed, the
    retries each node used, the pipeline's ``context`` values, the node to run next; None at the end).
    ``sequence_no`` orders a run's checkpoints and never goes backwards. ``context`` holds any
    msgpack-encodable values (bytes included); a large one is kept in the CAS by reference."""

    run_id: str
    checkpoint_id: str
    sequence_no: int
    current_node: str
    completed_nodes: list[str]
    node_retries: dict[str, int]
    context: dict[str, Any]
    next_node: str | None = None


AttractorRecord = RunEvent | StageEvent | CheckpointEvent | StageAgentLink

RECORD_TYPES: Final[dict[str, type[AttractorRecord]]] = {
    RUN_EVENT: RunEvent,
    STAGE_EVENT: StageEvent,
    CHECKPOINT: CheckpointEvent,
    STAGE_AGENT_LINK: StageAgentLink,
}
_TYPE_IDS: Final[dict[type[AttractorRecord], str]] = {cls: type_id for type_id, cls in RECORD_TYPES.items()}


@dataclass(frozen=True, slots=True)
class AttractorRecorded:
    """A pipeline record as stored: the decoded record and the turn that holds it."""

    record: AttractorRecord
    turn: TurnRecord

    @property
    def type_id(self) -> str:
        return self.turn.type_id


_encoder = msgspec.msgpack.Encoder()
_decoders = {type_id: msgspec.msgpack.Decoder(cls) for type_id, cls in RECORD_TYPES.items()}


def encode_record(record: AttractorRecord) -> tuple[str, bytes]:
    """The record's type id and its msgpack payload."""
    return _TYPE_IDS[type(record)], _encoder.encode(record)


def decode_record(type_id: str, payload: bytes) -> AttractorRecord:
    """The record a turn of ``type_id`` holds (``msgspec.DecodeError`` if the bytes are not one)."""
    try:
        return _decoders[type_id].decode(payload)
    except RecursionError as exc:  # any writer may store bytes nested past msgspec's depth
        raise msgspec.DecodeError("nested too deeply to decode") from exc


def registry_bundle() -> bytes:
    """The registry bundle published under ``BUNDLE_ID``: each type id with its version, encoding and
    JSON Schema, as canonical JSON, so every process publishes the same bytes."""
    return schema_bundle(BUNDLE_ID, TYPE_VERSION, RECORD_TYPES)
