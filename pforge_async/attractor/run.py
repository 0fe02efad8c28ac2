"""``load_run``: a pipeline run rebuilt from the store alone: its events, its stages with their attempts
and outcomes, its checkpoints, and the agent session tree of every stage attempt (through the agent's
``load_session_tree``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec

from ..agent.tree import SessionTree, load_session_tree
from ..errors import ContextNotFound, IntegrityError
from ..turnstore.types import ContextInfo, TurnRecord
from .keys import validate_run_id
from .records import (
    RECORD_TYPES,
    AttractorRecorded,
    CheckpointEvent,
    RunEvent,
    StageAgentLink,
    StageEvent,
    decode_record,
)
from .target import Target, find_run, turns_of

__all__ = ["AgentLinkView", "AttemptView", "RunView", "StageView", "load_run"]


@dataclass(frozen=True)
class AgentLinkView:
    """A stage attempt's link to the agent session that did it, and that session's whole tree."""

    link: StageAgentLink
    recorded: AttractorRecorded
    session: SessionTree


@dataclass
class AttemptView:
    """One attempt of a stage: its events in order and the agent sessions linked to it."""

    node_id: str
    attempt: int
    events: list[AttractorRecorded] = field(default_factory=list)
    agents: list[AgentLinkView] = field(default_factory=list)

    @property
    def stage_attempt_id(self) -> str:
        return f"{self.node_id}#{self.attempt}"

    def _last(self, *statuses: str) -> StageEvent | None:
        for recorded in reversed(self.events):
            event = recorded.record
            if isinstance(event, StageEvent) and event.status in statuses:
                return event
        return None

    @property
    def status(self) -> str:
        """``finished`` or ``failed`` once the attempt ended, ``started`` while it runs, ``pending`` if
        only its ``retried`` event (the announcement of this attempt) is recorded."""
        ended = self._last("finished", "failed")
        if ended is not None:
            return ended.status
        return "started" if self._last("started") is not None else "pending"

    @property
    def outcome(self) -> str | None:
        ended = self._last("finished", "failed")
        return None if ended is None else ended.outcome

    @property
    def error(self) -> str | None:
        ended = self._last("failed")
        return None if ended is None else ended.error


@dataclass
class StageView:
    """A stage (a node of the pipeline) and its attempts in order."""

    node_id: str
    attempts: list[AttemptView] = field(default_factory=list)

    @property
    def status(self) -> str:
        """The status of its last attempt."""
        return self.attempts[-1].status if self.attempts else "pending"

    @property
    def outcome(self) -> str | None:
        return self.attempts[-1].outcome if self.attempts else None

    def attempt(self, number: int) -> AttemptView:
        for attempt in self.attempts:
            if attempt.attempt == number:
                return attempt
        raise KeyError(f"stage {self.node_id!r} has no attempt {number}")


@dataclass(frozen=True)
class RunView:
    """A run as stored. ``records``: every pipeline record of the run's context in the order written;
    ``events``: the run events among them; ``stages``: in the order each first appeared;
    ``checkpoints``: in order (each with its state reference; ``load_checkpoint`` loads one's state);
    ``other_turns``: turns in the run's context that are not pipeline records."""

    run_id: str
    context: ContextInfo
    records: list[AttractorRecorded]
    events: list[AttractorRecorded]
    stages: list[StageView]
    checkpoints: list[AttractorRecorded]
    other_turns: list[TurnRecord]

    @property
    def metadata(self) -> dict[str, Any]:
        return self.context.metadata

    def stage(self, node_id: str) -> StageView:
        for stage in self.stages:
            if stage.node_id == node_id:
                return stage
        raise KeyError(f"run {self.run_id!r} has no stage {node_id!r}")

    def event(self, kind: str, event_id: str = "") -> RunEvent | None:
        for recorded in self.events:
            event = recorded.record
            assert isinstance(event, RunEvent)
            if event.kind == kind and event.event_id == event_id:
                return event
        return None

    @property
    def latest_checkpoint(self) -> CheckpointEvent | None:
        if not self.checkpoints:
            return None
        latest = self.checkpoints[-1].record
        assert isinstance(latest, CheckpointEvent)
        return latest

    def summary(self) -> str:
        """A few lines: the run, each stage's attempts with their outcome and agent sessions, the
        checkpoints."""
        lines = [f"run {self.run_id!r} (context {self.context.context_id}): {len(self.records)} records"]
        kinds = []
        for recorded in self.events:
            event = recorded.record
            assert isinstance(event, RunEvent)
            kinds.append(f"{event.kind} ({event.event_id})" if event.event_id else event.kind)
        lines.append(f"  events: {', '.join(kinds) or 'none'}")
        for stage in self.stages:
            for attempt in stage.attempts:
                sessions = ", ".join(
                    f"{agent.link.agent_session_name} ({len(agent.session.records)} records, "
                    f"{sum(1 for _ in agent.session.walk()) - 1} subagents)"
                    for agent in attempt.agents
                )
                result = _short(attempt.outcome or attempt.error or "")
                lines.append(
                    f"  stage {attempt.stage_attempt_id}: {attempt.status}"
                    + (f" ({result})" if result else "")
                    + (f"; agent {sessions}" if sessions else "")
                )
        for recorded in self.checkpoints:
            checkpoint = recorded.record
            assert isinstance(checkpoint, CheckpointEvent)
            where = f"CAS {checkpoint.state.oid[:12]}" if checkpoint.state.oid else "inline"
            lines.append(
                f"  checkpoint {checkpoint.sequence_no} after {checkpoint.current_node}: next "
                f"{checkpoint.next_node}, state {checkpoint.state.size} bytes ({where})"
            )
        return "\n".join(lines)


def _short(text: str, width: int = 60) -> str:
    line = text.splitlines()[0] if text else ""
    return line if len(line) <= width and "\n" not in text else line[: width - 3] + "..."


async def load_run(target: Target, run_id: str) -> RunView:
    """Run ``run_id`` as stored, with the agent session tree of every linked stage attempt.
    ``ContextNotFound`` naming the run if there is none; ``IntegrityError`` if a record does not decode
    or a link names a session that is missing or is another context."""
    turns = turns_of(target)
    validate_run_id(run_id)
    info = await find_run(turns, run_id)
    records: list[AttractorRecorded] = []
    other: list[TurnRecord] = []
    async for turn in turns.iter_turns(info.context_id):
        if turn.type_id not in RECORD_TYPES:
            other.append(turn)
            continue
        try:
            record = decode_record(turn.type_id, turn.payload)
        except msgspec.DecodeError as exc:
            where = f"run {run_id!r}: turn {turn.turn_id} ({turn.type_id})"
            raise IntegrityError(f"{where} does not decode: {exc}") from exc
        records.append(AttractorRecorded(record, turn))
    stages: dict[str, StageView] = {}
    attempts: dict[tuple[str, int], AttemptView] = {}

    def attempt_of(node_id: str, number: int) -> AttemptView:
        found = attempts.get((node_id, number))
        if found is None:
            stage = stages.setdefault(node_id, StageView(node_id))
            found = attempts[(node_id, number)] = AttemptView(node_id, number)
            stage.attempts.append(found)
            stage.attempts.sort(key=lambda a: a.attempt)
        return found

    sessions: dict[str, SessionTree] = {}
    for recorded in records:
        record = recorded.record
        if isinstance(record, StageEvent):
            attempt_of(record.node_id, record.attempt).events.append(recorded)
        elif isinstance(record, StageAgentLink):
            tree = sessions.get(record.agent_session_name)
            if tree is None:
                tree = sessions[record.agent_session_name] = await _session(target, run_id, record)
            attempt_of(record.node_id, record.attempt).agents.append(AgentLinkView(record, recorded, tree))
    return RunView(
        run_id,
        info,
        records,
        [r for r in records if isinstance(r.record, RunEvent)],
        list(stages.values()),
        [r for r in records if isinstance(r.record, CheckpointEvent)],
        other,
    )


async def _session(target: Target, run_id: str, link: StageAgentLink) -> SessionTree:
    where = (
        f"run {run_id!r}: stage {link.node_id}#{link.attempt} is linked to session {link.agent_session_name!r} "
        f"(context {link.agent_context_id})"
    )
    try:
        tree = await load_session_tree(target, link.agent_session_name)
    except ContextNotFound as exc:
        raise IntegrityError(f"{where}, which does not exist") from exc
    if tree.context.context_id != link.agent_context_id:
        raise IntegrityError(f"{where}, but that session is context {tree.context.context_id}")
    return tree
