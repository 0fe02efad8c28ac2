"""``AttractorStorageWriter``: what a pipeline runtime calls to record a run, and ``AttractorWriter``, its
implementation over any turn store (or a ``Store``).

Every record goes into the run's context under a deterministic key (``keys``), so a resumed run that
re-issues a call gets the stored turn back and writes nothing; the same key with other content is an
``IdempotencyConflict`` naming the record. A checkpoint is written in one atomic batch to the run's
context and to its checkpoint log, whose head is therefore always the latest checkpoint; the batch
is a compare-and-set on that head, so sequence numbers can only go forward, also between concurrent
writers.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import msgspec

from ..errors import Conflict, ContextNotFound, HeadConflict, IdempotencyConflict, IntegrityError, InvalidInput
from ..turnstore.protocol import SessionStore, TypedTurnStore
from ..turnstore.rules import check_text, validate_id, validate_limit, validate_name
from ..turnstore.types import ContextInfo, NewTurn
from .checkpoints import (
    DEFAULT_INLINE_STATE,
    decode_checkpoint_turn,
    encode_state,
    state_oid,
    validate_checkpoint,
)
from .keys import (
    checkpoint_key,
    checkpoints_context_name,
    link_key,
    run_context_name,
    run_event_key,
    stage_attempt_id,
    stage_event_key,
    validate_attempt,
    validate_node_id,
    validate_run_id,
)
from .records import (
    BUNDLE_ID,
    STAGE_STATUSES,
    TYPE_VERSION,
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
    decode_record,
    encode_record,
    registry_bundle,
)
from .target import Target, blobs_of, find_run, turns_of

__all__ = ["AttractorStorageWriter", "AttractorWriter", "RunContext"]

#: how often a checkpoint append re-reads the log's head after another writer moved it
_CHECKPOINT_TRIES = 16
#: the metadata namespace a run's contexts carry
_META = "pforge.attractor"

_bundled: weakref.WeakSet[object] = weakref.WeakSet()


@dataclass(frozen=True)
class RunContext:
    """A run's two contexts: ``context`` holds every record; ``checkpoints`` (the checkpoint log)
    holds its checkpoints only, its head the latest."""

    run_id: str
    context: ContextInfo
    checkpoints: ContextInfo

    @property
    def context_id(self) -> int:
        return self.context.context_id


@runtime_checkable
class AttractorStorageWriter(Protocol):
    """What a pipeline runtime records a run through. Every call is idempotent: the same call again
    (a resumed run) returns the record first stored and writes nothing."""

    async def create_run_context(self, run_id: str, *, metadata: dict[str, Any] | None = None) -> RunContext: ...

    async def append_run_event(
        self, run_id: str, kind: str, *, event_id: str = "", data: Any = None
    ) -> AttractorRecorded: ...

    async def append_stage_event(
        self,
        run_id: str,
        node_id: str,
        attempt: int,
        status: StageStatus,
        *,
        outcome: str | None = None,
        error: str | None = None,
        data: Any = None,
    ) -> AttractorRecorded: ...

    async def append_checkpoint_event(self, checkpoint: CheckpointRecord) -> AttractorRecorded: ...

    async def append_stage_to_agent_link(
        self,
        run_id: str,
        node_id: str,
        attempt: int,
        *,
        agent_session_name: str,
        agent_context_id: int | None = None,
        agent_head_turn_id: int | None = None,
        thread_key: str | None = None,
    ) -> AttractorRecorded: ...


class AttractorWriter:
    """``AttractorStorageWriter`` over ``target``: a ``Store`` or any turn store.

    ``inline_state_max``: a checkpoint's encoded state larger than this many bytes goes into the CAS
    (a ``Store``'s, or the turn store's blob store) and the record holds its id; smaller state, or any
    state when the turn store has no blob store, stays in the record.
    """

    def __init__(self, target: Target, *, inline_state_max: int = DEFAULT_INLINE_STATE) -> None:
        self._turns = turns_of(target)
        self._blobs = blobs_of(self._turns)
        self.inline_state_max = validate_limit(inline_state_max, "inline_state_max")
        self._runs: dict[str, RunContext] = {}

    @property
    def turns(self) -> SessionStore:
        return self._turns

    # -- runs --------------------------------------------------------------------------------------

    async def create_run_context(self, run_id: str, *, metadata: dict[str, Any] | None = None) -> RunContext:
        """The run's contexts, created with ``metadata`` if new (get-or-create, across processes too):
        a resumed run calls it again and gets the same contexts, its metadata as first stored."""
        validate_run_id(run_id)
        if metadata is not None and not isinstance(metadata, dict):
            raise InvalidInput(f"run {run_id!r}: metadata must be a dict or None, got {type(metadata).__name__}")
        if metadata is not None and _META in metadata:
            raise InvalidInput(f"run {run_id!r}: metadata key {_META!r} is the writer's own")
        info = await self._turns.open_context(
            run_context_name(run_id), metadata={**(metadata or {}), _META: {"run_id": run_id}}
        )
        run = await self._open_log(run_id, info)
        self._runs[run_id] = run
        return run

    async def _open_log(self, run_id: str, info: ContextInfo) -> RunContext:
        log = await self._turns.open_context(
            checkpoints_context_name(run_id),
            parent_context_id=info.context_id,
            metadata={_META: {"run_id": run_id, "checkpoint_log": True}},
        )
        if log.parent_context_id != info.context_id:
            raise IntegrityError(
                f"run {run_id!r}: context {log.context_id} named {log.name!r} is not the checkpoint log of the "
                f"run's context {info.context_id}"
            )
        return RunContext(run_id, info, log)

    async def _run(self, run_id: str) -> RunContext:
        validate_run_id(run_id)
        run = self._runs.get(run_id)
        if run is None:
            # A run another writer (or process) created: found by name; ``ContextNotFound`` if none.
            run = await self._open_log(run_id, await find_run(self._turns, run_id))
            self._runs[run_id] = run
        return run

    # -- records -----------------------------------------------------------------------------------

    async def append_run_event(
        self, run_id: str, kind: str, *, event_id: str = "", data: Any = None
    ) -> AttractorRecorded:
        """An event of the whole run. ``(kind, event_id)`` is its identity: a run records each once."""
        run = await self._run(run_id)
        validate_node_id(kind, "kind")
        if not isinstance(event_id, str) or len(event_id) > 256:
            raise InvalidInput(f"event_id must be a str of at most 256 chars, got {event_id!r:.80}")
        check_text(event_id, "event_id")
        correlation = AttractorCorrelation(run_id, run.context_id)
        record = RunEvent(kind, correlation, event_id, data)
        return await self._append(run, record, run_event_key(run_id, kind, event_id), f"run event {kind!r}")

    async def append_stage_event(
        self,
        run_id: str,
        node_id: str,
        attempt: int,
        status: StageStatus,
        *,
        outcome: str | None = None,
        error: str | None = None,
        data: Any = None,
    ) -> AttractorRecorded:
        """Attempt ``attempt`` (from 1) of stage ``node_id`` started, finished, failed, or is retried
        (``retried`` carries the number of the attempt that follows the failed one)."""
        run = await self._run(run_id)
        validate_node_id(node_id)
        validate_attempt(attempt)
        if status not in STAGE_STATUSES or not isinstance(status, str):
            raise InvalidInput(f"status must be one of {', '.join(map(repr, STAGE_STATUSES))}, got {status!r:.80}")
        for what, text in (("outcome", outcome), ("error", error)):
            if text is not None:
                if not isinstance(text, str):
                    raise InvalidInput(f"{what} must be a str or None, got {type(text).__name__}")
                check_text(text, what)
        attempt_id = stage_attempt_id(node_id, attempt)
        correlation = AttractorCorrelation(run_id, run.context_id, node_id, attempt, attempt_id)
        record = StageEvent(node_id, attempt, status, correlation, outcome, error, data)
        key = stage_event_key(run_id, node_id, attempt, status)
        return await self._append(run, record, key, f"stage {attempt_id} {status}")

    async def append_stage_to_agent_link(
        self,
        run_id: str,
        node_id: str,
        attempt: int,
        *,
        agent_session_name: str,
        agent_context_id: int | None = None,
        agent_head_turn_id: int | None = None,
        thread_key: str | None = None,
    ) -> AttractorRecorded:
        """Record that agent session ``agent_session_name`` (a named context: a ``SessionRecorder``'s
        session) did attempt ``attempt`` of stage ``node_id``. ``agent_context_id`` is checked against
        the session's context if given; ``agent_head_turn_id`` defaults to its head now.
        ``ContextNotFound`` if there is no such session.

        A link is identified by the run, stage attempt and session: linking them again returns the
        stored link (with the head it recorded then), even if the session has moved on since."""
        run = await self._run(run_id)
        validate_node_id(node_id)
        validate_attempt(attempt)
        validate_name(agent_session_name, "agent_session_name")
        if agent_context_id is not None:
            validate_id(agent_context_id, "agent_context_id")
        if agent_head_turn_id is not None:
            validate_id(agent_head_turn_id, "agent_head_turn_id", allow_zero=True)
        if thread_key is not None:
            if not isinstance(thread_key, str):
                raise InvalidInput(f"thread_key must be a str or None, got {type(thread_key).__name__}")
            check_text(thread_key, "thread_key")
        attempt_id = stage_attempt_id(node_id, attempt)
        key = link_key(run_id, node_id, attempt, agent_session_name)
        found = await self._turns.get_turn_by_key(run.context_id, key)
        if found is not None:
            link = self._decode(run, found.type_id, found.payload, found.turn_id)
            if (
                not isinstance(link, StageAgentLink)
                or (agent_context_id is not None and link.agent_context_id != agent_context_id)
                or link.thread_key != thread_key
            ):
                raise IdempotencyConflict(
                    f"run {run_id!r}: stage {attempt_id} is linked to session {agent_session_name!r} already, "
                    f"with another context or thread key (turn {found.turn_id})"
                )
            return AttractorRecorded(link, found)
        session = await self._turns.find_context(agent_session_name)
        if session is None:
            where = f"run {run_id!r}: stage {attempt_id}"
            raise ContextNotFound(f"{where}: there is no agent session {agent_session_name!r}")
        if agent_context_id is not None and agent_context_id != session.context_id:
            raise InvalidInput(
                f"run {run_id!r}: stage {attempt_id}: session {agent_session_name!r} is context "
                f"{session.context_id}, not {agent_context_id}"
            )
        head = session.head_turn_id if agent_head_turn_id is None else agent_head_turn_id
        correlation = AttractorCorrelation(
            run_id,
            run.context_id,
            node_id,
            attempt,
            attempt_id,
            agent_session_name,
            session.context_id,
            head,
            thread_key=thread_key,
        )
        record = StageAgentLink(node_id, attempt, agent_session_name, session.context_id, correlation, head, thread_key)
        return await self._append(run, record, key, f"the link of stage {attempt_id} to {agent_session_name!r}")

    async def append_checkpoint_event(self, checkpoint: CheckpointRecord) -> AttractorRecorded:
        """Record a checkpoint in the run's context and its checkpoint log, in one atomic write.

        Its ``sequence_no`` must be higher than the run's latest checkpoint's (``Conflict`` otherwise:
        a sequence number never goes backwards); the same checkpoint again returns the stored one and
        writes nothing, and another checkpoint under a stored sequence number is an
        ``IdempotencyConflict``. State larger than ``inline_state_max`` goes into the CAS first.
        Returns the record in the run's context (whose state reference leaves inline state out)."""
        validate_checkpoint(checkpoint)
        run_id, seq = checkpoint.run_id, checkpoint.sequence_no
        run = await self._run(run_id)
        data = encode_state(checkpoint)
        in_cas = self._blobs is not None and len(data) > self.inline_state_max
        oid = state_oid(data) if in_cas else None
        correlation = AttractorCorrelation(run_id, run.context_id, checkpoint.current_node, sequence_no=seq)
        full = CheckpointEvent(
            run_id,
            checkpoint.checkpoint_id,
            seq,
            checkpoint.current_node,
            list(checkpoint.completed_nodes),
            dict(checkpoint.node_retries),
            StateRef(len(data), oid, None if in_cas else data),
            correlation,
            checkpoint.next_node,
        )
        summary = msgspec.structs.replace(full, state=StateRef(len(data), oid))
        type_id, log_payload, _ = _checked(full)
        _, run_payload, summary = _checked(summary)
        key = checkpoint_key(run_id, seq)
        where = f"run {run_id!r} checkpoint {seq} ({checkpoint.checkpoint_id!r})"
        log_id = run.checkpoints.context_id
        for _ in range(_CHECKPOINT_TRIES):
            found = await self._turns.get_turn_by_key(log_id, key)
            if found is not None:
                if not _same_checkpoint(decode_checkpoint_turn(found, run_id), full, data):
                    raise IdempotencyConflict(
                        f"{where}: sequence number {seq} holds another checkpoint already (turn {found.turn_id})"
                    )
                return await self._stored_summary(run, key, where)
            head = (await self._turns.get_head(log_id)).head_turn_id
            if head:
                latest = decode_checkpoint_turn(await self._turns.get_turn(head), run_id)
                if seq <= latest.sequence_no:
                    raise Conflict(
                        f"{where}: sequence numbers never go backwards, and the run's latest checkpoint is "
                        f"{latest.sequence_no} ({latest.checkpoint_id!r})"
                    )
            if oid is not None:
                assert self._blobs is not None
                stored = await self._blobs.put_blob(data)
                if stored != oid:
                    raise IntegrityError(f"{where}: the CAS stored its state as {stored}, not {oid}")
            await self._publish_bundle()
            try:
                _, turn = await self._turns.append_turns(
                    [
                        NewTurn(log_id, type_id, log_payload, TYPE_VERSION, idempotency_key=key),
                        NewTurn(run.context_id, type_id, run_payload, TYPE_VERSION, idempotency_key=key),
                    ],
                    expected_heads={log_id: head},
                )
            except HeadConflict:
                continue  # another writer appended a checkpoint meanwhile: check against it
            except IdempotencyConflict as exc:
                raise IdempotencyConflict(f"{where}: recorded already with other content") from exc
            return AttractorRecorded(summary, turn)
        raise Conflict(f"{where}: the checkpoint log kept moving under {_CHECKPOINT_TRIES} tries")

    async def _stored_summary(self, run: RunContext, key: str, where: str) -> AttractorRecorded:
        turn = await self._turns.get_turn_by_key(run.context_id, key)
        if turn is None:
            raise IntegrityError(f"{where}: in the checkpoint log but not in the run's context")
        return AttractorRecorded(self._decode(run, turn.type_id, turn.payload, turn.turn_id), turn)

    # -- writing -----------------------------------------------------------------------------------

    async def _append(self, run: RunContext, record: AttractorRecord, key: str, what: str) -> AttractorRecorded:
        type_id, payload, record = _checked(record)
        await self._publish_bundle()
        try:
            turn = await self._turns.append_turn(
                run.context_id, type_id, payload, type_version=TYPE_VERSION, idempotency_key=key
            )
        except IdempotencyConflict as exc:
            raise IdempotencyConflict(f"run {run.run_id!r}: {what} is recorded already with other content") from exc
        return AttractorRecorded(record, turn)

    def _decode(self, run: RunContext, type_id: str, payload: bytes, turn_id: int) -> AttractorRecord:
        try:
            return decode_record(type_id, payload)
        except (KeyError, msgspec.DecodeError) as exc:
            raise IntegrityError(f"run {run.run_id!r}: turn {turn_id} ({type_id}) is not a pipeline record") from exc

    async def _publish_bundle(self) -> None:
        """Publish the records' registry bundle, once per turn store, before its first record."""
        turns = self._turns
        if turns in _bundled or not isinstance(turns, TypedTurnStore):
            return
        bundle = registry_bundle()
        if await turns.get_registry_bundle(BUNDLE_ID) != bundle:
            await turns.publish_registry_bundle(BUNDLE_ID, bundle)
        _bundled.add(turns)


def _same_checkpoint(stored: CheckpointEvent, wanted: CheckpointEvent, data: bytes) -> bool:
    """Whether a stored checkpoint is ``wanted`` (whose encoded state is ``data``), wherever each keeps
    its state: a writer with another ``inline_state_max`` retrying the same checkpoint is no conflict."""
    state = stored.state
    if state.size != len(data):
        return False
    if state.oid is not None:
        if state.oid != (wanted.state.oid or state_oid(data)):
            return False
    elif state.inline != data:
        return False
    return msgspec.structs.replace(stored, state=wanted.state) == wanted


def _checked(record: AttractorRecord) -> tuple[str, bytes, Any]:
    """Encode ``record`` and decode it back, so nothing is stored that a reader cannot decode, and the
    record returned is the one a reader will see (a tuple becomes a list)."""
    try:
        type_id, payload = encode_record(record)
        return type_id, payload, decode_record(type_id, payload)
    except (msgspec.EncodeError, msgspec.ValidationError, TypeError, OverflowError, ValueError) as exc:
        raise InvalidInput(f"{type(record).__name__} record: {exc}") from exc
