"""Pipeline (attractor) storage: the records a pipeline runtime writes for a run (run and stage events,
checkpoints, links from stage attempts to the agent sessions that did them), the writer that puts
them in any turn store (``AttractorWriter``), and what a resume and an inspector read back
(``load_latest_checkpoint``, ``load_checkpoint``, ``load_run``)."""

from __future__ import annotations

from .checkpoints import DEFAULT_INLINE_STATE, load_checkpoint, load_latest_checkpoint
from .keys import checkpoints_context_name, run_context_name, stage_attempt_id
from .records import (
    BUNDLE_ID,
    CHECKPOINT,
    RUN_EVENT,
    STAGE_AGENT_LINK,
    STAGE_EVENT,
    STAGE_STATUSES,
    AttractorCorrelation,
    AttractorRecord,
    AttractorRecorded,
    CheckpointEvent,
    CheckpointRecord,
    RunEvent,
    StageAgentLink,
    StageEvent,
    StageStatus,
    StateRef,
    registry_bundle,
)
from .run import AgentLinkView, AttemptView, RunView, StageView, load_run
from .target import Target
from .writer import AttractorStorageWriter, AttractorWriter, RunContext

__all__ = [
    "BUNDLE_ID",
    "CHECKPOINT",
    "DEFAULT_INLINE_STATE",
    "RUN_EVENT",
    "STAGE_AGENT_LINK",
    "STAGE_EVENT",
    "STAGE_STATUSES",
    "AgentLinkView",
    "AttemptView",
    "AttractorCorrelation",
    "AttractorRecord",
    "AttractorRecorded",
    "AttractorStorageWriter",
    "AttractorWriter",
    "CheckpointEvent",
    "CheckpointRecord",
    "RunContext",
    "RunEvent",
    "RunView",
    "StageAgentLink",
    "StageEvent",
    "StageStatus",
    "StageView",
    "StateRef",
    "Target",
    "checkpoints_context_name",
    "load_checkpoint",
    "load_latest_checkpoint",
    "load_run",
    "registry_bundle",
    "run_context_name",
    "stage_attempt_id",
]
