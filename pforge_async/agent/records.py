"""The records an agent session writes: one frozen msgspec Struct per turn type, encoded to msgpack.

A record holds only what its hook was given (and what follows from it, such as a tool output's size
and hash), never a clock reading: the same hook call always encodes to the same bytes, which is what
lets a resumed loop re-issue a call and find it already recorded. When a turn was written is the
turn's own ``created_at_ms``.

Positional records carry ``seq``, their place in their session (0, 1, 2, ...). The two link records
carry the subagent id instead: subagents are spawned and closed by concurrent tasks, in an order no
re-run reproduces, so their place in the parent's chain is not part of their identity.
"""

from __future__ import annotations

import functools
from typing import Any, Final

import msgspec

from ..ledgers.budget import Usage
from ..turnstore.registry import schema_bundle
from ..turnstore.types import TurnRecord

__all__ = [
    "ASSISTANT_TURN",
    "BUNDLE_ID",
    "EVENT",
    "LINK_TYPES",
    "POSITIONAL_TYPES",
    "RECORD_TYPES",
    "SESSION_END",
    "SESSION_START",
    "STEERING_TURN",
    "SUBAGENT_CLOSE",
    "SUBAGENT_SPAWN",
    "SYSTEM_TURN",
    "TOOL_CALL_END",
    "TOOL_CALL_START",
    "TOOL_RESULTS_TURN",
    "TYPE_VERSION",
    "USER_TURN",
    "AgentRecord",
    "AssistantTurn",
    "Event",
    "PositionalRecord",
    "Recorded",
    "SessionEnd",
    "SessionStart",
    "SteeringTurn",
    "SubagentClose",
    "SubagentSpawn",
    "SystemTurn",
    "ToolCall",
    "ToolCallEnd",
    "ToolCallStart",
    "ToolOutput",
    "ToolResult",
    "ToolResultsTurn",
    "UserTurn",
    "decode_record",
    "decodes_to_itself",
    "encode_record",
    "registry_bundle",
]

USER_TURN: Final = "pforge.agent.user_turn"
ASSISTANT_TURN: Final = "pforge.agent.assistant_turn"
TOOL_RESULTS_TURN: Final = "pforge.agent.tool_results_turn"
SYSTEM_TURN: Final = "pforge.agent.system_turn"
STEERING_TURN: Final = "pforge.agent.steering_turn"
TOOL_CALL_START: Final = "pforge.agent.tool_call_start"
TOOL_CALL_END: Final = "pforge.agent.tool_call_end"
EVENT: Final = "pforge.agent.event"
SESSION_START: Final = "pforge.agent.session_start"
SESSION_END: Final = "pforge.agent.session_end"
SUBAGENT_SPAWN: Final = "pforge.link.subagent_spawn"
SUBAGENT_CLOSE: Final = "pforge.link.subagent_close"

#: every record type is at version 1; a later change of a Struct gets a new version and bundle
TYPE_VERSION: Final = 1
BUNDLE_ID: Final = "pforge.agent.v1"


class _Record(msgspec.Struct, frozen=True, omit_defaults=True, gc=False):
    """Records hold JSON-like data only (a recorder keeps the decoded copy), never a cycle: the
    garbage collector need not track them, which keeps its passes short in a long session."""


class SessionStart(_Record, frozen=True):
    """The loop began (or a subagent's loop did)."""

    seq: int
    session_name: str
    model: str | None = None
    metadata: dict[str, Any] = {}


class SessionEnd(_Record, frozen=True):
    seq: int
    outcome: str = "completed"
    metadata: dict[str, Any] = {}


class UserTurn(_Record, frozen=True):
    seq: int
    text: str
    metadata: dict[str, Any] = {}


class ToolCall(_Record, frozen=True):
    """A tool call the model asked for. ``arguments``: any JSON-compatible value."""

    call_id: str
    name: str
    arguments: Any = None


class AssistantTurn(_Record, frozen=True):
    """What the model answered: text, the tool calls it made, what it used (``usage.cost`` in
    micro-units), the model and the budget vendor the usage was charged to."""

    seq: int
    text: str = ""
    tool_calls: list[ToolCall] = []
    usage: Usage | None = None
    model: str | None = None
    vendor: str | None = None
    metadata: dict[str, Any] = {}


class ToolOutput(_Record, frozen=True):
    """A tool's output as recorded: at most the recorder's ``max_output_bytes`` of it, in ``text``
    (whole UTF-8 characters) for a str output or in ``data`` for a bytes one, with the size (in bytes,
    UTF-8 for text) and SHA-256 of all of it. ``oid``: the git blob id (SHA-256) of the full output in
    the store's CAS or blob store, when it was truncated and the target has one."""

    size: int
    sha256: str
    text: str = ""
    data: bytes | None = None
    truncated: bool = False
    oid: str | None = None


class ToolResult(_Record, frozen=True):
    call_id: str
    output: ToolOutput
    is_error: bool = False


class ToolResultsTurn(_Record, frozen=True):
    """The turn that hands tool results back to the model."""

    seq: int
    results: list[ToolResult]
    metadata: dict[str, Any] = {}


class SystemTurn(_Record, frozen=True):
    seq: int
    text: str
    metadata: dict[str, Any] = {}


class SteeringTurn(_Record, frozen=True):
    """Guidance injected into a running loop (by a user or an orchestrator)."""

    seq: int
    text: str
    metadata: dict[str, Any] = {}


class ToolCallStart(_Record, frozen=True):
    seq: int
    call_id: str
    name: str
    arguments: Any = None
    metadata: dict[str, Any] = {}


class ToolCallEnd(_Record, frozen=True):
    """A tool call finished: its output, or ``error`` when it failed. A workspace snapshot taken at
    the end is the turn's ``fs_root`` (attached in the same write)."""

    seq: int
    call_id: str
    output: ToolOutput
    error: str | None = None
    metadata: dict[str, Any] = {}


class Event(_Record, frozen=True):
    """Anything else worth keeping: ``data`` is any JSON-compatible value."""

    seq: int
    name: str
    data: Any = None


class SubagentSpawn(_Record, frozen=True):
    """Written in the parent when a subagent starts: the parent session, the turn the child's context
    was forked from (0: the parent had no turn yet), the child's context and session name."""

    session_name: str
    subagent_id: str
    child_session_name: str
    child_context_id: int
    parent_turn_id: int
    thread_key: str | None = None
    metadata: dict[str, Any] = {}


class SubagentClose(_Record, frozen=True):
    """Written in both the child and the parent, in one write, when a subagent is closed."""

    session_name: str
    subagent_id: str
    child_session_name: str
    outcome: str = "completed"
    metadata: dict[str, Any] = {}


PositionalRecord = (
    SessionStart
    | SessionEnd
    | UserTurn
    | AssistantTurn
    | ToolResultsTurn
    | SystemTurn
    | SteeringTurn
    | ToolCallStart
    | ToolCallEnd
    | Event
)
AgentRecord = PositionalRecord | SubagentSpawn | SubagentClose

#: type id -> Struct, for every record the recorder writes
RECORD_TYPES: Final[dict[str, type[AgentRecord]]] = {
    SESSION_START: SessionStart,
    SESSION_END: SessionEnd,
    USER_TURN: UserTurn,
    ASSISTANT_TURN: AssistantTurn,
    TOOL_RESULTS_TURN: ToolResultsTurn,
    SYSTEM_TURN: SystemTurn,
    STEERING_TURN: SteeringTurn,
    TOOL_CALL_START: ToolCallStart,
    TOOL_CALL_END: ToolCallEnd,
    EVENT: Event,
    SUBAGENT_SPAWN: SubagentSpawn,
    SUBAGENT_CLOSE: SubagentClose,
}
LINK_TYPES: Final = frozenset({SUBAGENT_SPAWN, SUBAGENT_CLOSE})
POSITIONAL_TYPES: Final = frozenset(RECORD_TYPES) - LINK_TYPES
TYPE_IDS: Final[dict[type[AgentRecord], str]] = {cls: type_id for type_id, cls in RECORD_TYPES.items()}


class Recorded(msgspec.Struct, frozen=True, gc=False):
    """A record as stored: the decoded record and the turn that holds it (its id, context, parent,
    time, ``fs_root``)."""

    # Untracked by the garbage collector (gc=False): a recorder keeps every one of its session's, and
    # the collector's full passes walked them all. None can be part of a cycle: the record is a
    # gc=False Struct of decoded JSON-like data, the turn a TurnRecord of scalars, and neither can
    # refer to a Recorded.

    record: AgentRecord
    turn: TurnRecord

    @property
    def type_id(self) -> str:
        return self.turn.type_id

    @property
    def seq(self) -> int | None:
        """The record's position in its session; None for a link record."""
        return getattr(self.record, "seq", None)


_encoder = msgspec.msgpack.Encoder()
_decoders = {type_id: msgspec.msgpack.Decoder(cls) for type_id, cls in RECORD_TYPES.items()}


def encode_record(record: AgentRecord) -> tuple[str, bytes]:
    """The record's type id and its msgpack payload."""
    return TYPE_IDS[type(record)], _encoder.encode(record)


def decode_record(type_id: str, payload: bytes) -> AgentRecord:
    """The record a turn of ``type_id`` holds (``msgspec.DecodeError`` if the bytes are not one)."""
    try:
        return _decoders[type_id].decode(payload)
    except RecursionError as exc:  # any writer may store bytes nested past msgspec's depth
        raise msgspec.DecodeError("nested too deeply to decode") from exc


def decodes_to_itself(record: AgentRecord) -> bool:
    """True when ``record`` needs no decoding of its encoding to be checked and kept: the decoding
    would be an equal record of the same types, holding nothing a caller could change. So: no
    metadata, and every value the caller gave a ``str`` (or None), since encoding refuses a str
    subclass but passes an int; the rest (tool outputs, lists of results) the recorder made. The
    records of most tool calls, tool results and plain turns."""
    # Dispatched on the exact type (a record is built as one): isinstance checks in a row cost a
    # plain turn what the decode would. (``fields``: the record, for mypy, which narrows no ``is``.)
    kind = type(record)
    fields: Any = record
    if kind in _PLAIN_TEXT:
        return not fields.metadata and type(fields.text) is str
    if kind is ToolCallEnd:
        return (
            not fields.metadata
            and type(fields.call_id) is str
            and (fields.error is None or type(fields.error) is str)
            and _exact_output(fields.output)
        )
    if kind is ToolResultsTurn:
        if fields.metadata:
            return False
        for result in fields.results:  # all() with a generator costs what the decode saves
            if type(result.call_id) is not str or not _exact_output(result.output):
                return False
        return True
    return False


def _exact_output(output: ToolOutput) -> bool:
    """``tool_output`` builds every field of exactly the type a reader decodes; checked all the same,
    so a ToolOutput made any other way is decoded (and refused if a reader could not decode it)."""
    return (
        type(output.size) is int
        and type(output.truncated) is bool
        and type(output.text) is str
        and (output.data is None or type(output.data) is bytes)
    )


_PLAIN_TEXT: Final = frozenset({UserTurn, SystemTurn, SteeringTurn})


@functools.cache
def registry_bundle() -> bytes:
    """The registry bundle published under ``BUNDLE_ID``: every type id with its version, encoding and
    JSON Schema (generated by msgspec from the Structs), as canonical JSON (sorted keys, no spaces), so
    the bytes are the same in every process and republishing is a no-op. Made once per process: the
    schemas take msgspec tens of milliseconds, and every store a process opens checks the bundle."""
    return schema_bundle(BUNDLE_ID, TYPE_VERSION, RECORD_TYPES)
