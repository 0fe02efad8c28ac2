"""``SessionRecorder``: the hooks an agent loop awaits at each step, writing its session to a store.

A session is a named context of the turn store. Each hook call takes the next position (``seq``) of
its session and writes one record there under a deterministic key (session name, position, kind).
A recorder started on a session that already has records knows them: a hook call at a recorded
position is compared with the record and writes nothing (a conflict if it differs), so a restarted
loop can re-issue its calls, or read ``records`` and ``seek`` past them.

Subagents: ``spawn_subagent`` forks the child's context from the parent's head (once: a re-run finds
it by name) and writes a link record in the parent; ``close`` writes the close record in the child
and the parent in one atomic write. Both link records are keyed by the subagent id.

One loop drives one recorder: its positional hooks are meant to be awaited in the loop's own order.
Hooks of different recorders (an orchestrator and its subagents) may run concurrently.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any, cast

import anyio
import msgspec

from ..errors import (
    BudgetExceeded,
    Conflict,
    IdempotencyConflict,
    IntegrityError,
    InvalidInput,
    NotFound,
    PersistenceError,
)
from ..ledgers._checks import show, whole
from ..ledgers._checks import text as ledger_text
from ..ledgers.budget import BudgetLedger, Reservation, Usage
from ..store import Store
from ..turnstore.protocol import ArtifactStore, SessionStore, TypedTurnStore
from ..turnstore.rules import validate_limit, validate_name
from ..turnstore.types import ContextInfo, NewTurn
from .keys import budget_key, child_context_key, close_key, record_key, spawn_key, subagent_session_name
from .modes import Mode, PersistenceFailure, logger, validate_mode
from .output import DEFAULT_MAX_OUTPUT, tool_output
from .records import (
    BUNDLE_ID,
    TYPE_VERSION,
    AgentRecord,
    AssistantTurn,
    Event,
    PositionalRecord,
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
    decode_record,
    decodes_to_itself,
    encode_record,
    registry_bundle,
)
from .tree import load_own_turns

__all__ = ["SessionRecorder", "Target", "ToolResultInput"]

#: what a recorder writes to: a ``Store`` (turns, CAS snapshots and blobs, budget), any turn store
#: (turns only), or None with ``mode="off"``
Target = Store | SessionStore | None
#: one tool result handed to ``tool_results``: (call id, output) or (call id, output, is_error)
ToolResultInput = tuple[str, str | bytes] | tuple[str, str | bytes, bool]
#: what runs after a positional record is written (or found, when replayed: the flag)
After = Callable[[Recorded, bool], Awaitable[None]]
#: a record of a batch, waiting for the batch's write: its position, record, turn and ``After``
Queued = tuple[int, PositionalRecord, NewTurn, After | None]

#: reservations a session's end lists at a time to release them (it lists again until none are left)
_SETTLE_PAGE = 1000
#: the largest output whose record a recorder keeps for the tool results that repeat it
_REUSED_OUTPUT_MAX = 1 << 20

# Turn stores that hold the registry bundle already (checked or published by some recorder).
_bundled: weakref.WeakSet[object] = weakref.WeakSet()


class SessionRecorder:
    """The persistence hooks of one agent session. Create it with :meth:`start`."""

    def __init__(
        self,
        name: str,
        mode: Mode,
        *,
        turns: SessionStore | None,
        store: Store | None,
        max_output_bytes: int,
        metadata: dict[str, Any] | None,
        failures: list[PersistenceFailure],
        parent: SessionRecorder | None = None,
        subagent_id: str | None = None,
        thread_key: str | None = None,
    ) -> None:
        self.name = name
        self.mode: Mode = mode
        self._off = mode == "off"
        self._required = mode == "required"
        self._turns = turns
        self._store = store
        self._blobs = isinstance(turns, ArtifactStore)
        self.max_output_bytes = max_output_bytes
        self._metadata = metadata
        #: every failure of this session and of its subagents (shared along the tree)
        self.failures = failures
        self.parent = parent
        self.subagent_id = subagent_id
        self.thread_key = thread_key
        self._context: ContextInfo | None = None
        self._records: list[Recorded] = []
        self._by_seq: dict[int, Recorded] = {}
        self._spawns: dict[str, Recorded] = {}
        self._closed: Recorded | None = None
        # The subagents whose close record this (parent) session holds.
        self._child_closes: set[str] = set()
        self._cursor = 0
        self._position = 0
        self._budget: BudgetLedger | None = None if store is None else store.budget
        #: the session whose name tags this one's budget reservations and spend (the root's)
        self.root_name: str = name if parent is None else parent.root_name
        # Assistant turns called so far: a budget reservation is keyed by the turn it is for.
        self._assistant_calls = 0
        # Reservations made for assistant turns not yet charged, by turn: a batch may queue a turn
        # and reserve for the next before the first is charged.
        self._pending: dict[int, Reservation] = {}
        # Of those, the ones made for a turn an earlier run recorded (and charged) without them.
        self._fresh: set[int] = set()
        # Assistant turns among the records (counted as they are remembered, not at each reserve).
        self._assistant_records = 0
        # Assistant turns with usage left uncharged, by index (skipped by seek(), or their charge
        # failed or was cancelled): charged when the session ends.
        self._skipped: dict[int, AssistantTurn] = {}
        self._batch: list[Queued] | None = None
        self._published = False
        self._opening: anyio.Lock | None = None
        # The oids of the last whole outputs stored (an ordered set): tool results repeat them.
        self._stored_blobs: dict[str, None] = {}
        # The last output recorded (the object itself), its record and blob: the tool results that
        # hand a tool call's output back repeat it, and need not encode and hash it again.
        self._last_output: tuple[str | bytes, int, ToolOutput, bytes | None] | None = None

    # -- creation ----------------------------------------------------------------------------------

    @classmethod
    async def start(
        cls,
        target: Target,
        session_name: str,
        *,
        mode: Mode = "best_effort",
        metadata: dict[str, Any] | None = None,
        max_output_bytes: int = DEFAULT_MAX_OUTPUT,
    ) -> SessionRecorder:
        """The recorder of session ``session_name``: opened (created with ``metadata`` if new) and,
        if it has records already, loaded, so ``position`` and ``records`` say what is recorded.

        ``target``: a ``Store``, any turn store, or None (only with ``mode="off"``). ``mode``:
        ``"off"``, ``"best_effort"`` or ``"required"`` (see :mod:`pforge_async.agent.modes`); a store
        that cannot open the session is a failure of that mode (in ``best_effort`` the recorder tries
        again at its next write). ``max_output_bytes``: how much of a tool's output a record holds.
        """
        checked = validate_mode(mode)
        validate_name(session_name)
        validate_limit(max_output_bytes, "max_output_bytes")
        if checked == "off":
            return cls(
                session_name,
                checked,
                turns=None,
                store=None,
                max_output_bytes=max_output_bytes,
                metadata=None,
                failures=[],
            )
        store = target if isinstance(target, Store) else None
        turns = target.turns if isinstance(target, Store) else target
        if turns is None:
            raise InvalidInput(f"session {session_name!r}: mode {checked!r} needs a Store or a turn store, got None")
        if not isinstance(turns, SessionStore):
            raise InvalidInput(
                f"session {session_name!r}: target must be a Store or a turn store, got {type(target).__name__}"
            )
        recorder = cls(
            session_name,
            checked,
            turns=turns,
            store=store,
            max_output_bytes=max_output_bytes,
            metadata=metadata,
            failures=[],
        )
        try:
            await recorder._open()
        except Exception as exc:
            recorder._fail("start", None, exc)
        return recorder

    # -- what is recorded --------------------------------------------------------------------------

    @property
    def position(self) -> int:
        """How far the session is recorded: one past the highest recorded position (0: nothing yet).
        A restarted loop skips the steps below it."""
        return self._position

    @property
    def cursor(self) -> int:
        """The position the next hook call takes. It starts at 0, also on a recorded session, so a
        re-run loop's calls meet their records; :meth:`seek` moves it."""
        return self._cursor

    @property
    def replaying(self) -> bool:
        """True while the next hook call meets a recorded position: its work was done before."""
        return self._cursor in self._by_seq

    @property
    def records(self) -> Sequence[Recorded]:
        """This session's records (not its subagents'), in the order they are in the store, then as
        written. Read-only."""
        return self._records

    @property
    def context_id(self) -> int | None:
        """The session's context in the turn store (None while it could not be opened, or ``off``)."""
        return None if self._context is None else self._context.context_id

    @property
    def closed(self) -> Recorded | None:
        """A subagent's close record, once written."""
        return self._closed

    def peek(self) -> PositionalRecord | None:
        """The record at the cursor, if that position is recorded: what the next hook call will meet."""
        found = self._by_seq.get(self._cursor)
        return None if found is None else found.record  # type: ignore[return-value]

    def seek(self, position: int) -> None:
        """Move the cursor: ``seek(recorder.position)`` continues after everything recorded (for a loop
        that rebuilt its state from ``records`` instead of re-issuing its calls)."""
        if not isinstance(position, int) or isinstance(position, bool) or position < 0:
            raise InvalidInput(f"position must be an int >= 0, got {show(position)}")
        skipped_from = self._cursor
        self._cursor = position
        assistant = sorted(
            (seq for seq, found in self._by_seq.items() if seq < position and isinstance(found.record, AssistantTurn)),
        )
        self._assistant_calls = len(assistant)
        # The turns skipped over are not replayed, so not charged here: a run killed between such a
        # turn's write and its charge left it uncharged. The session's end charges them (once: by key).
        for index, seq in enumerate(assistant):
            record = self._by_seq[seq].record
            if seq >= skipped_from and isinstance(record, AssistantTurn) and record.usage is not None:
                self._skipped[index] = record

    def batch(self) -> AbstractAsyncContextManager[None]:
        """Hooks called in the block write nothing until it ends; then everything they recorded is
        written in one atomic write (every record or none): one step of a loop as one write. Inside,
        a hook returns None (its record is in ``records`` after the block); a call at a recorded
        position is still checked at once, and a workspace is snapshotted when its hook is called.
        Subagent spawns and closes are not batched. A block left by an exception writes what it
        recorded, then the exception goes on; a cancelled one writes nothing (those positions stay
        empty and a re-run fills them). A failed write fails the whole batch, as its mode says."""
        return _Batch(self)

    def subagent_recorded(self, subagent_id: str) -> Recorded | None:
        """The spawn link record of ``subagent_id`` in this session, if it is recorded."""
        return self._spawns.get(subagent_id)

    # -- hooks -------------------------------------------------------------------------------------

    async def session_start(
        self, *, model: str | None = None, metadata: dict[str, Any] | None = None
    ) -> Recorded | None:
        if self._off:
            return None
        return await self._positional("session_start", lambda seq: SessionStart(seq, self.name, model, metadata or {}))

    async def session_end(
        self, outcome: str = "completed", *, metadata: dict[str, Any] | None = None
    ) -> Recorded | None:
        if self._off:
            return None
        return await self._positional(
            "session_end", lambda seq: SessionEnd(seq, outcome, metadata or {}), after=self._settle_budget
        )

    async def user_turn(self, text: str, *, metadata: dict[str, Any] | None = None) -> Recorded | None:
        if self._off:
            return None
        return await self._positional("user_turn", lambda seq: UserTurn(seq, text, metadata or {}))

    async def assistant_turn(
        self,
        text: str = "",
        *,
        tool_calls: Sequence[ToolCall] = (),
        usage: Usage | None = None,
        model: str | None = None,
        vendor: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Recorded | None:
        """What the model answered. ``usage`` (``cost`` in micro-units) and ``vendor`` are kept on the
        record. With a ``Store`` target and ``usage``, the spend is charged to its budget ledger, once:
        by committing the reservation :meth:`reserve_budget` made for this turn (also one an earlier,
        interrupted run made), or, with none or with more used than it holds, by recording the spend
        under ``vendor`` (never refused: a spend over the limit is recorded as overdrawn) and giving
        the reservation back. Tagged ``session`` (the root session) and
        ``agent`` (this session)."""
        if self._off:
            return None
        index = self._assistant_calls
        self._assistant_calls = index + 1

        budget = self._budget
        charge: After | None = None
        if usage is not None and budget is not None:

            async def charge(recorded: Recorded, replayed: bool) -> None:
                # Nothing reserved for it and no vendor to charge it to: nothing to do, and no
                # coroutine of _charge to make for it (most turns of a loop without reservations).
                if vendor is not None or replayed or self._pending:
                    try:
                        await self._charge(budget, index, usage, vendor, model, replayed)
                    except BaseException:
                        # The turn is written: charged again when the session ends (by its key,
                        # once), not left to a best-effort loop that goes on, or a cancelled one.
                        self._skipped[index] = cast(AssistantTurn, recorded.record)
                        raise

        def build(seq: int) -> AssistantTurn:
            if usage is not None:
                # Checked before the write: a charge refused after it left the turn stored.
                _check_usage(usage, vendor, model, charged=budget is not None)
            return AssistantTurn(seq, text, _listed(tool_calls, "tool_calls"), usage, model, vendor, metadata or {})

        try:
            return await self._positional("assistant_turn", build, after=charge)
        except PersistenceError:
            if self._assistant_calls == index + 1:  # a retry is for the same turn: the same reservation
                self._assistant_calls = index
            raise

    async def reserve_budget(
        self, vendor: str, *, tokens: int = 0, cost: int = 0, model: str = "", ttl_s: float = 300
    ) -> Reservation | None:
        """Reserve budget for the next assistant turn (call it before the model call): a ``Store``
        target's ``budget.reserve``, keyed by the session and the turn it is for (a restarted loop
        gets the same reservation back) and tagged ``session`` and ``agent``. The turn's
        ``assistant_turn(usage=...)`` commits it; one never committed is released when the session
        ends (``session_end``, or ``close`` for a subagent).

        ``BudgetExceeded`` is raised in every mode: the loop must not make the call. Other failures
        follow the mode (None in ``best_effort``). None, too, in ``off`` mode or without a ``Store``."""
        if self._off or self._budget is None:
            return None
        index = self._assistant_calls
        key = budget_key(self.name, index)
        try:
            # For a turn an earlier run recorded, a reservation its key did not make already is new:
            # that run charged the turn without one (or not at all), so it is not this turn's to commit.
            fresh = self._assistant_recorded(index) and await self._budget.find_reservation(key) is None
            reservation = await self._budget.reserve(
                vendor,
                tokens=tokens,
                cost=cost,
                model=model,
                ttl_s=ttl_s,
                idempotency_key=key,
                tags=self._tags(),
            )
        except BudgetExceeded:
            raise
        except Exception as exc:
            self._fail("reserve_budget", None, exc)
            return None
        self._pending[index] = reservation
        if fresh:
            self._fresh.add(index)
        return reservation

    def _assistant_recorded(self, index: int) -> bool:
        """Whether this session's ``index``-th assistant turn is recorded (asked only in a resumed
        run, with records past its cursor)."""
        return self._cursor < self._position and self._assistant_records > index

    async def tool_results(
        self, results: Sequence[ToolResultInput], *, metadata: dict[str, Any] | None = None
    ) -> Recorded | None:
        """The turn that hands tool results back to the model: ``(call_id, output)`` or
        ``(call_id, output, is_error)`` each; outputs are truncated as in :meth:`tool_call_end`."""
        if self._off:
            return None
        blobs: list[bytes] = []

        def build(seq: int) -> ToolResultsTurn:
            made = []
            for result in _listed(results, "results"):
                if not isinstance(result, tuple) or len(result) not in (2, 3):
                    raise InvalidInput(f"a tool result must be (call_id, output[, is_error]), got {show(result)}")
                output, blob = self._output(result[1])
                if blob is not None:
                    blobs.append(blob)
                made.append(ToolResult(result[0], output, bool(result[2]) if len(result) == 3 else False))
            return ToolResultsTurn(seq, made, metadata or {})

        return await self._positional("tool_results", build, blobs=blobs)

    async def system_turn(self, text: str, *, metadata: dict[str, Any] | None = None) -> Recorded | None:
        if self._off:
            return None
        return await self._positional("system_turn", lambda seq: SystemTurn(seq, text, metadata or {}))

    async def steering_turn(self, text: str, *, metadata: dict[str, Any] | None = None) -> Recorded | None:
        if self._off:
            return None
        return await self._positional("steering_turn", lambda seq: SteeringTurn(seq, text, metadata or {}))

    async def tool_call_start(
        self, call_id: str, name: str, arguments: Any = None, *, metadata: dict[str, Any] | None = None
    ) -> Recorded | None:
        if self._off:
            return None
        return await self._positional(
            "tool_call_start", lambda seq: ToolCallStart(seq, call_id, name, arguments, metadata or {})
        )

    async def tool_call_end(
        self,
        call_id: str,
        output: str | bytes = "",
        *,
        error: str | None = None,
        workspace: str | os.PathLike[str] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Recorded | None:
        """A tool call finished with ``output`` (or failed: ``error``). At most ``max_output_bytes`` of
        the output are in the record, with the size and SHA-256 of all of it; the whole is stored as a
        blob when it was cut and the target keeps blobs. ``workspace``: a directory to snapshot into
        the CAS (a ``Store`` target only) and attach to this turn in the same write. A call at a
        recorded position takes no snapshot."""
        if self._off:
            return None
        blobs: list[bytes] = []

        def build(seq: int) -> ToolCallEnd:
            recorded, blob = self._output(output)
            if blob is not None:
                blobs.append(blob)
            return ToolCallEnd(seq, call_id, recorded, error, metadata or {})

        return await self._positional("tool_call_end", build, blobs=blobs, workspace=workspace)

    async def event(self, name: str, data: Any = None) -> Recorded | None:
        """A free-form event: ``data`` is any JSON-compatible value."""
        if self._off:
            return None
        return await self._positional("event", lambda seq: Event(seq, name, data))

    def _output(self, output: str | bytes) -> tuple[ToolOutput, bytes | None]:
        """The record of a tool output (and the blob to store), reusing the last one's when this is
        the same object: a str or bytes is immutable, so the same object is the same output."""
        last = self._last_output
        if last is not None and last[0] is output and last[1] == self.max_output_bytes:
            return last[2], last[3]
        recorded, blob = tool_output(output, self.max_output_bytes, keeps_blobs=self._blobs)
        if type(output) in (str, bytes) and len(output) <= _REUSED_OUTPUT_MAX:
            self._last_output = (output, self.max_output_bytes, recorded, blob)
        return recorded, blob

    # -- subagents ---------------------------------------------------------------------------------

    async def spawn_subagent(
        self, subagent_id: str, *, thread_key: str | None = None, metadata: dict[str, Any] | None = None
    ) -> SessionRecorder:
        """The recorder of a new subagent session, named ``<this session>/<subagent_id>``: its context
        is forked from this session's head (or found, if a run before made it) and the link record
        is written here. In ``best_effort`` a failed spawn is retried at the child's first write.
        ``subagent_id``: unique within this session, without ``/``."""
        if not isinstance(subagent_id, str) or not subagent_id or "/" in subagent_id:
            raise InvalidInput(f"subagent_id must be a non-empty str without '/', got {show(subagent_id)}")
        child = SessionRecorder(
            subagent_session_name(self.name, subagent_id),
            self.mode,
            turns=self._turns,
            store=self._store,
            max_output_bytes=self.max_output_bytes,
            metadata=metadata,
            failures=self.failures,
            parent=self,
            subagent_id=subagent_id,
            thread_key=thread_key,
        )
        if self._off:
            return child
        try:
            await child._open()
        except Exception as exc:
            child._fail("spawn_subagent", None, exc)
        return child

    async def close(self, outcome: str = "completed", *, metadata: dict[str, Any] | None = None) -> Recorded | None:
        """End a subagent: the close record is written in its session and its parent's, in one write."""
        if self.parent is None:
            raise InvalidInput(f"session {self.name!r} is not a subagent: end it with session_end()")
        if self._off:
            return None
        try:
            return await self._close(outcome, metadata or {})
        except Exception as exc:
            self._fail("close", None, exc)
            return None

    # -- writing -----------------------------------------------------------------------------------

    async def _positional(
        self,
        hook: str,
        build: Callable[[int], PositionalRecord],
        *,
        blobs: list[bytes] | None = None,
        workspace: str | os.PathLike[str] | None = None,
        after: After | None = None,
    ) -> Recorded | None:
        """Write the record ``build`` makes at the next position (or find it there already: a
        replayed call), then run ``after`` with it and whether it was replayed. Inside a batch,
        queue it (None). One coroutine from the hook to the store: a hook is awaited at every step."""
        seq = self._cursor
        self._cursor = seq + 1
        try:
            # ``build`` fills ``blobs`` with the outputs to store whole.
            type_id, payload, record = _checked(build(seq))
            turns = self._turns if self._context is not None else await self._open()
            assert turns is not None
            found = self._by_seq.get(seq)
            if found is not None:
                # The bytes decide when the records differ as values: NaN is unequal to itself.
                if found.record != record and found.turn.payload != payload:
                    raise IdempotencyConflict(
                        f"session {self.name!r} position {seq}: this {_kind(type_id)} call differs from the "
                        f"{_kind(found.type_id)} recorded there (turn {found.turn.turn_id})"
                    )
                if after is not None:
                    await after(found, True)
                return found
            fs_root = None
            if blobs or workspace is not None:
                if workspace is not None and self._store is None:
                    raise InvalidInput(f"session {self.name!r}: a workspace snapshot needs a Store target (with a CAS)")
                fs_root = await self._store_outputs(turns, blobs or [], _blob_oids(record), workspace)
            key = record_key(self.name, seq, type_id)
            context_id = self._context_id()
            if self._batch is not None:
                new = NewTurn(context_id, type_id, payload, TYPE_VERSION, idempotency_key=key, fs_root=fs_root)
                self._batch.append((seq, record, new, after))
                return None
            if not self._published:
                await self._publish_bundle(turns)
            turn = await turns.append_turn(
                context_id, type_id, payload, type_version=TYPE_VERSION, idempotency_key=key, fs_root=fs_root
            )
            recorded = Recorded(record, turn)
            self._remember(recorded)
            if after is not None:
                await after(recorded, False)
            return recorded
        except Exception as exc:
            # In required mode the loop sees the error and may retry the call: at the same position.
            if self._required and self._cursor == seq + 1:
                self._cursor = seq
            self._fail(hook, seq, exc)
            return None

    async def _store_outputs(
        self, turns: SessionStore, blobs: list[bytes], oids: list[str], workspace: str | os.PathLike[str] | None
    ) -> str | None:
        """Store whole outputs as blobs (once: tool results repeat the tool call's output) and snapshot
        the workspace, side by side; the snapshot's tree id."""
        fs_root: str | None = None
        errors: list[Exception] = []  # the first is raised as itself, not in an exception group

        async def put(blob: bytes, oid: str) -> None:
            try:
                stored = await cast(ArtifactStore, turns).put_blob(blob)
                if stored != oid:
                    raise IntegrityError(f"session {self.name!r}: the blob store named tool output {oid} {stored}")
            except Exception as exc:
                errors.append(exc)
                return
            self._stored_blobs[oid] = None
            while len(self._stored_blobs) > 64:
                del self._stored_blobs[next(iter(self._stored_blobs))]

        async def snapshot(directory: str | os.PathLike[str]) -> None:
            nonlocal fs_root
            assert self._store is not None
            try:
                fs_root = await self._store.cas.snapshot(directory)
            except Exception as exc:
                errors.append(exc)

        jobs: list[Awaitable[None]] = [
            put(blob, oid) for blob, oid in zip(blobs, oids, strict=True) if oid not in self._stored_blobs
        ]
        if workspace is not None:
            jobs.append(snapshot(workspace))
        if len(jobs) == 1:  # most often: a task group costs more than the store's answer
            await jobs[0]
        elif jobs:
            async with anyio.create_task_group() as tg:
                for job in jobs:
                    tg.start_soon(_run, job)
        if errors:
            raise errors[0]
        return fs_root

    async def _flush(self, pending: list[Queued]) -> None:
        """Write a batch's records in one atomic write, then run what follows each."""
        if not pending:
            return
        first, last = pending[0][0], pending[-1][0]
        try:
            turns = await self._open()
            await self._publish_bundle(turns)
            written = await turns.append_turns([new for _, _, new, _ in pending])
            # Every record is remembered before any after-hook runs, and every hook runs: one that
            # fails (a charge) must not leave the later records unknown or their spend uncharged.
            afters: list[tuple[After, Recorded]] = []
            for (_, record, _, after), turn in zip(pending, written, strict=True):
                recorded = Recorded(record, turn)
                self._remember(recorded)
                if after is not None:
                    afters.append((after, recorded))
            failed: Exception | None = None
            for after, recorded in afters:
                try:
                    await after(recorded, False)
                except Exception as exc:
                    failed = failed or exc
            if failed is not None:
                raise failed
        except Exception as exc:
            if self._required and self._cursor == last + 1:
                self._cursor = first
                # The retried step's assistant turns are the same turns: the same budget keys.
                self._assistant_calls -= sum(1 for _, record, _, _ in pending if type(record) is AssistantTurn)
            self._fail("batch", first, exc)

    async def _close(self, outcome: str, metadata: dict[str, Any]) -> Recorded:
        parent, subagent_id = self.parent, self.subagent_id
        assert parent is not None and subagent_id is not None
        turns = await self._open()
        record = SubagentClose(parent.name, subagent_id, self.name, outcome, metadata)
        type_id, payload, record = _checked(record)
        if self._closed is not None:
            # As for positional records, the bytes decide when the values differ: NaN is unequal to itself.
            if self._closed.record != record and self._closed.turn.payload != payload:
                turn_id = self._closed.turn.turn_id
                raise IdempotencyConflict(
                    f"session {self.name!r} was closed with another outcome or metadata (turn {turn_id})"
                )
            await self._settle_budget(self._closed, True)
            return self._closed
        await self._publish_bundle(turns)
        mine, theirs = await turns.append_turns(
            [
                NewTurn(self._context_id(), type_id, payload, TYPE_VERSION, idempotency_key=close_key(self.name)),
                NewTurn(
                    parent._context_id(),
                    type_id,
                    payload,
                    TYPE_VERSION,
                    idempotency_key=close_key(parent.name, subagent_id),
                ),
            ]
        )
        self._remember(Recorded(record, mine))
        parent._remember(Recorded(record, theirs))
        assert self._closed is not None
        await self._settle_budget(self._closed, False)
        return self._closed

    # -- budget ------------------------------------------------------------------------------------

    def _tags(self) -> dict[str, str]:
        return {"session": self.root_name, "agent": self.name}

    async def _charge(
        self, budget: BudgetLedger, index: int, usage: Usage, vendor: str | None, model: str | None, replayed: bool
    ) -> None:
        """Charge assistant turn ``index``'s usage once, whichever run gets here, and however often.
        Called only with something to charge: a vendor, a reservation pending, or a replayed turn."""
        await self._charge_once(budget, index, usage, vendor, model, replayed)
        # Only once charged: a charge that failed is made again, with them, at the session's end.
        self._pending.pop(index, None)
        self._fresh.discard(index)

    async def _charge_once(
        self, budget: BudgetLedger, index: int, usage: Usage, vendor: str | None, model: str | None, replayed: bool
    ) -> None:
        key = budget_key(self.name, index)
        reservation = self._pending.get(index)
        fresh = index in self._fresh
        if reservation is None and replayed:
            # An earlier run reserved (and maybe committed) for this turn, or charged it unreserved.
            reservation = await budget.find_reservation(key)
        unused: Reservation | None = None
        if reservation is not None:
            if reservation.state == "committed":
                return  # charged already
            if reservation.state == "released":
                # Given back (a session's end released it while this turn was unwritten): the spend
                # happened all the same, so it is charged unreserved below, by the turn's key.
                pass
            elif not fresh and usage.tokens <= reservation.tokens and usage.cost <= reservation.cost:
                try:
                    await budget.commit(reservation, usage)
                    return
                except NotFound:
                    pass  # purged once expired (budget.purge_expired): charged unreserved below
            else:
                # More than was reserved, which the ledger does not commit, or a reservation made
                # after an earlier run charged the turn without it: charged unreserved below (by the
                # turn's key: once), then the reservation is given back.
                unused = reservation
            # The turn's own model, as an unreserved charge names it (not the reservation's): every
            # run charging this turn by its key must give the same values, or the key conflicts.
            vendor = vendor or reservation.vendor
        if vendor is not None:
            await budget.record_spend(
                vendor,
                model or vendor,
                input_tokens=usage.input_tokens,
                output_tokens=usage.output_tokens,
                cost=usage.cost,
                idempotency_key=key,
                tags=self._tags(),
                allow_overdraw=True,
            )
        if unused is not None:
            try:
                await budget.release(unused)
            except NotFound:
                pass  # purged meanwhile (it had expired): nothing is held any more

    async def _settle_budget(self, recorded: Recorded, replayed: bool) -> None:
        """Release what this session still holds: reservations its ending turns made no use of."""
        budget = self._budget
        if budget is None:
            return
        failed: Exception | None = None
        while self._skipped:  # first: their reservations are charged, not released
            index, turn = next(iter(self._skipped.items()))
            assert turn.usage is not None
            try:
                await self._charge(budget, index, turn.usage, turn.vendor, turn.model, True)
            except Exception as exc:
                failed = failed or exc  # the rest are charged and released all the same
            del self._skipped[index]
        while True:  # a listing is capped: what it leaves is listed again once these are released
            held = await budget.list_reservations(tags=self._tags(), limit=_SETTLE_PAGE)
            for reservation in held:
                try:
                    await budget.release(reservation)
                except NotFound:
                    pass  # purged meanwhile (it had expired): nothing is held any more
            if len(held) < _SETTLE_PAGE:
                break
        self._pending.clear()
        self._fresh.clear()
        if failed is not None:
            raise failed

    async def _publish_bundle(self, turns: SessionStore) -> None:
        """Publish the records' registry bundle, once per turn store, at its first write."""
        if self._published:
            return
        if turns in _bundled or not isinstance(turns, TypedTurnStore):
            self._published = True
            return
        bundle = registry_bundle()
        if await turns.get_registry_bundle(BUNDLE_ID) != bundle:
            await turns.publish_registry_bundle(BUNDLE_ID, bundle)
        _bundled.add(turns)
        self._published = True

    def _fail(self, hook: str, seq: int | None, exc: Exception) -> None:
        failure = PersistenceFailure(self.name, hook, seq, exc)
        self.failures.append(failure)
        if self._required:
            raise PersistenceError(str(failure)) from exc
        logger.warning("%s", failure)

    # -- opening and loading -----------------------------------------------------------------------

    def _context_id(self) -> int:
        assert self._context is not None
        return self._context.context_id

    async def _open(self) -> SessionStore:
        """The turn store, once this session's context is open and its records loaded."""
        turns = self._turns
        assert turns is not None
        if self._context is not None:
            return turns
        if self._opening is None:
            self._opening = anyio.Lock()
        async with self._opening:  # two tasks writing before it is open load the records once
            if self._context is None:
                if self.parent is None:
                    info = await turns.find_context(self.name)
                    if info is None:
                        info = await turns.open_context(self.name, metadata=self._metadata)
                else:
                    info = await self.parent._open_child(self)
                await self._load(turns, info)
                self._context = info
        return turns

    async def _open_child(self, child: SessionRecorder) -> ContextInfo:
        """Find or make ``child``'s context, and write (or find) its link record here."""
        turns = await self._open()
        subagent_id = child.subagent_id
        assert subagent_id is not None
        spawned = self._spawns.get(subagent_id)
        if spawned is not None:
            link = spawned.record
            assert isinstance(link, SubagentSpawn)
            wanted = (child.name, child.thread_key, child._metadata or {})
            if (link.child_session_name, link.thread_key, link.metadata) != wanted:
                raise IdempotencyConflict(
                    f"session {self.name!r}: subagent {subagent_id!r} was spawned with another thread key or "
                    f"metadata (turn {spawned.turn.turn_id})"
                )
            info = await turns.get_context(link.child_context_id)
            if info.name != child.name:
                raise IntegrityError(
                    f"session {self.name!r}: the link of subagent {subagent_id!r} names context "
                    f"{link.child_context_id}, which is {info.name!r}, not {child.name!r}"
                )
            return info
        parent_id = self._context_id()
        # The link checked before the fork (its ids are not known yet): a thread key or metadata the
        # record refuses would otherwise leave the child's context made and unlinked.
        _checked(SubagentSpawn(self.name, subagent_id, child.name, 0, 0, child.thread_key, child._metadata or {}))
        # A fork that landed before a crash is found by its name; the key guards a concurrent retry.
        existing = await turns.find_context(child.name)
        if existing is None:
            head = (await turns.get_head(parent_id)).head_turn_id
            lineage = {
                "pforge.agent": {
                    "parent_session": self.name,
                    "subagent_id": subagent_id,
                    "thread_key": child.thread_key,
                }
            }
            metadata = {**(child._metadata or {}), **lineage}
            key = child_context_key(self.name, subagent_id)
            if head:
                info = await turns.fork_context(
                    head, parent_context_id=parent_id, name=child.name, metadata=metadata, idempotency_key=key
                )
            else:
                info = await turns.create_context(
                    name=child.name, metadata=metadata, parent_context_id=parent_id, idempotency_key=key
                )
        elif existing.parent_context_id != parent_id:
            raise Conflict(
                f"session {child.name!r} exists (context {existing.context_id}) but is not a subagent of "
                f"session {self.name!r} (context {parent_id})"
            )
        else:
            info = existing
        link = SubagentSpawn(
            self.name,
            subagent_id,
            child.name,
            info.context_id,
            info.base_turn_id,
            child.thread_key,
            child._metadata or {},
        )
        type_id, payload, link = _checked(link)
        await self._publish_bundle(turns)
        turn = await turns.append_turn(
            parent_id, type_id, payload, type_version=TYPE_VERSION, idempotency_key=spawn_key(self.name, subagent_id)
        )
        self._remember(Recorded(link, turn))
        return info

    async def _load(self, turns: SessionStore, info: ContextInfo) -> None:
        records, _ = await load_own_turns(turns, info, self.name)
        for recorded in records:
            self._remember(recorded)

    def _remember(self, recorded: Recorded) -> None:
        record = recorded.record
        kind = type(record)  # records are decoded by their own decoders: exact types
        if kind is SubagentSpawn:
            assert isinstance(record, SubagentSpawn)
            if record.subagent_id in self._spawns:
                return
            self._spawns[record.subagent_id] = recorded
        elif kind is SubagentClose:
            assert isinstance(record, SubagentClose)
            if record.child_session_name == self.name:  # this session's own close (not a child's)
                if self._closed is not None:
                    return
                self._closed = recorded
            elif record.subagent_id in self._child_closes:  # closed by several tasks: one record
                return
            else:
                self._child_closes.add(record.subagent_id)
        else:
            seq: int = record.seq  # type: ignore[union-attr]
            by_seq = self._by_seq
            if seq in by_seq:
                return
            by_seq[seq] = recorded
            if kind is AssistantTurn:
                self._assistant_records += 1
            if seq >= self._position:
                self._position = seq + 1
        self._records.append(recorded)

    def __repr__(self) -> str:
        return f"<SessionRecorder {self.name!r} mode={self.mode} cursor={self._cursor} position={self._position}>"


class _Batch:
    """The block of :meth:`SessionRecorder.batch`. A class rather than an ``asynccontextmanager``:
    a loop enters one at every step, and the generator and its wrapper cost more than the step's
    hooks queue."""

    __slots__ = ("_pending", "_recorder")

    def __init__(self, recorder: SessionRecorder) -> None:
        self._recorder = recorder
        self._pending: list[Queued] | None = None

    async def __aenter__(self) -> None:
        if self._pending is not None:
            # Its exit would end the outer block's batch early: every later hook a write of its own.
            raise InvalidInput("this batch() block is already entered; call recorder.batch() for a nested block")
        recorder = self._recorder
        if recorder._off or recorder._batch is not None:  # nothing to write, or a batch within a batch
            return
        self._pending = recorder._batch = []

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        pending = self._pending
        if pending is None:
            return
        self._pending = None
        self._recorder._batch = None
        # Left by an exception: what was recorded is written, then the exception goes on (this
        # returns None). Cancelled (a BaseException): nothing is written.
        if exc_type is None or issubclass(exc_type, Exception):
            await self._recorder._flush(pending)


def _checked(record: AgentRecord) -> tuple[str, bytes, Any]:
    """Encode ``record`` and decode it back: every field checked against the Struct's types (so nothing
    is stored that a reader cannot decode) and normalized (a tuple becomes a list) for comparison, and
    the record kept a copy of its own. A record that ``decodes_to_itself`` is all that already: the
    decoding would only copy it (a decode per hook is a tenth of a hook's own work)."""
    try:
        type_id, payload = encode_record(record)
        if decodes_to_itself(record):
            return type_id, payload, record
        return type_id, payload, decode_record(type_id, payload)
    except (msgspec.EncodeError, msgspec.ValidationError, TypeError, OverflowError, UnicodeEncodeError) as exc:
        # UnicodeEncodeError: a lone surrogate in a str, which UTF-8 cannot hold.
        raise InvalidInput(f"{_kind(type(record).__name__)} record: {exc}") from exc


def _listed(values: object, what: str) -> list[Any]:
    """``values`` (a sequence or other iterable a hook was handed) as a list; ``InvalidInput`` if it is
    not iterable."""
    if isinstance(values, list):
        return values
    try:
        return list(cast(Iterable[Any], values))
    except TypeError as exc:
        raise InvalidInput(f"{what} must be a sequence, got {type(values).__name__} {show(values)}") from exc


def _check_usage(usage: object, vendor: str | None, model: str | None, *, charged: bool) -> None:
    """Refuse usage the budget ledger could never count (``InvalidInput``), and, when it is
    ``charged`` to a vendor, a vendor or model name the ledger refuses."""
    if not isinstance(usage, Usage):
        raise InvalidInput(f"usage must be a Usage, got {type(usage).__name__} {show(usage)}")
    whole(usage.input_tokens, "usage.input_tokens")
    whole(usage.output_tokens, "usage.output_tokens")
    whole(usage.cost, "usage.cost")
    whole(usage.input_tokens + usage.output_tokens, "usage tokens (input plus output)")
    if charged:  # the names a charge gives the ledger: the vendor (or the reservation's) and model
        if vendor is not None:
            ledger_text(vendor, "vendor")
        if model:
            ledger_text(model, "model")


async def _run(job: Awaitable[None]) -> None:
    await job


def _kind(type_id: str) -> str:
    return type_id.rsplit(".", 1)[-1]


def _blob_oids(record: PositionalRecord) -> list[str]:
    """The blob ids a record names for outputs stored whole, in the order they were built."""
    if isinstance(record, ToolCallEnd):
        outputs = [record.output]
    elif isinstance(record, ToolResultsTurn):
        outputs = [result.output for result in record.results]
    else:
        outputs = []
    return [output.oid for output in outputs if output.oid is not None]
