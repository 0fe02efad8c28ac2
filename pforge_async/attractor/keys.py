"""Where a run lives in the turn store (its two named contexts) and the deterministic idempotency keys
of its records, all under ``pforge-attractor:v1`` (``turnstore.keys.attractor_key``: length-prefixed
parts, so no two inputs share a key). A resumed run re-issuing a write gets the same key, so a write
that already landed is found, never duplicated.

A run has two contexts: ``pforge.attractor.run/<run_id>`` holds every record of the run in the order
written; ``pforge.attractor.checkpoints/<run_id>`` holds only its checkpoints, so its head is always the
latest checkpoint (found in O(1), however long the run). The two prefixes differ before the run id, so
no run id can name another run's contexts.
"""

from __future__ import annotations

from typing import Final

from ..errors import InvalidInput
from ..turnstore.keys import attractor_key
from ..turnstore.rules import MAX_ID, check_text

__all__ = [
    "CHECKPOINTS_PREFIX",
    "MAX_NODE_ID",
    "MAX_RUN_ID",
    "RUN_PREFIX",
    "checkpoint_key",
    "checkpoints_context_name",
    "link_key",
    "run_context_name",
    "run_event_key",
    "stage_attempt_id",
    "stage_event_key",
    "validate_attempt",
    "validate_node_id",
    "validate_run_id",
    "validate_sequence_no",
]

RUN_PREFIX: Final = "pforge.attractor.run/"
CHECKPOINTS_PREFIX: Final = "pforge.attractor.checkpoints/"
#: in UTF-8 bytes; with either prefix the context name stays within the store's 1,024
MAX_RUN_ID: Final = 512
#: in characters
MAX_NODE_ID: Final = 256
_MAX_ATTEMPT: Final = (1 << 31) - 1


def validate_run_id(run_id: object) -> str:
    if not isinstance(run_id, str) or not run_id:
        raise InvalidInput(f"run_id must be a non-empty str, got {type(run_id).__name__} {run_id!r:.80}")
    if "\0" in run_id:
        raise InvalidInput(f"run_id {run_id!r:.80} contains NUL")
    check_text(run_id, "run_id")
    if len(run_id.encode("utf-8")) > MAX_RUN_ID:
        raise InvalidInput(f"run_id is over {MAX_RUN_ID} UTF-8 bytes: {run_id[:40]!r}...")
    return run_id


def validate_node_id(node_id: object, what: str = "node_id") -> str:
    if not isinstance(node_id, str) or not node_id or len(node_id) > MAX_NODE_ID:
        raise InvalidInput(
            f"{what} must be a non-empty str of at most {MAX_NODE_ID} chars, got {type(node_id).__name__} "
            f"{node_id!r:.80}"
        )
    check_text(node_id, what)
    return node_id


def validate_attempt(attempt: object) -> int:
    if not isinstance(attempt, int) or isinstance(attempt, bool) or not 1 <= attempt <= _MAX_ATTEMPT:
        raise InvalidInput(f"attempt must be an int from 1 to {_MAX_ATTEMPT}, got {attempt!r:.80}")
    return attempt


def validate_sequence_no(sequence_no: object) -> int:
    if not isinstance(sequence_no, int) or isinstance(sequence_no, bool) or not 0 <= sequence_no <= MAX_ID:
        raise InvalidInput(f"sequence_no must be an int from 0 to 2**63-1, got {sequence_no!r:.80}")
    return sequence_no


def run_context_name(run_id: str) -> str:
    """The named context holding every record of run ``run_id``."""
    return RUN_PREFIX + run_id


def checkpoints_context_name(run_id: str) -> str:
    """The named context holding run ``run_id``'s checkpoints; its head is the latest."""
    return CHECKPOINTS_PREFIX + run_id


def stage_attempt_id(node_id: str, attempt: int) -> str:
    """``<node_id>#<attempt>``: the correlation id of one attempt of a stage."""
    return f"{node_id}#{attempt}"


def run_event_key(run_id: str, kind: str, event_id: str) -> str:
    return attractor_key(run_id, "run", kind, event_id)


def stage_event_key(run_id: str, node_id: str, attempt: int, status: str) -> str:
    return attractor_key(run_id, "stage", node_id, attempt, status)


def checkpoint_key(run_id: str, sequence_no: int) -> str:
    """The key of checkpoint ``sequence_no``, the same in the run's context and its checkpoint log."""
    return attractor_key(run_id, "checkpoint", sequence_no)


def link_key(run_id: str, node_id: str, attempt: int, agent_session_name: str) -> str:
    return attractor_key(run_id, "link", node_id, attempt, agent_session_name)
