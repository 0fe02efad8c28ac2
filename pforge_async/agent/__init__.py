"""Agent persistence: the hooks an agent loop awaits (``SessionRecorder``) and the session tree they
leave in the store (``load_session_tree``). Usable from any Python agent loop."""

from __future__ import annotations

from .modes import MODES, Mode, PersistenceFailure
from .output import DEFAULT_MAX_OUTPUT
from .recorder import SessionRecorder, Target, ToolResultInput
from .records import (
    BUNDLE_ID,
    AgentRecord,
    AssistantTurn,
    Event,
    Recorded,
    SessionEnd,
    SessionStart,
    SteeringTurn,
    SubagentClose,
    SubagentSpawn,
    SystemTurn,
    ToolCall,
    ToolCallEnd,
    ToolCallStart,
    ToolOutput,
    ToolResult,
    ToolResultsTurn,
    UserTurn,
    registry_bundle,
)
from .tree import SessionTree, SubagentBranch, ToolCallPair, load_session_tree

__all__ = [
    "BUNDLE_ID",
    "DEFAULT_MAX_OUTPUT",
    "MODES",
    "AgentRecord",
    "AssistantTurn",
    "Event",
    "Mode",
    "PersistenceFailure",
    "Recorded",
    "SessionEnd",
    "SessionRecorder",
    "SessionStart",
    "SessionTree",
    "SteeringTurn",
    "SubagentBranch",
    "SubagentClose",
    "SubagentSpawn",
    "SystemTurn",
    "Target",
    "ToolCall",
    "ToolCallEnd",
    "ToolCallPair",
    "ToolCallStart",
    "ToolOutput",
    "ToolResult",
    "ToolResultInput",
    "ToolResultsTurn",
    "UserTurn",
    "load_session_tree",
    "registry_bundle",
]
