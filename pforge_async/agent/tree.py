"""``load_session_tree``: a session, its records, its tool calls paired and its subagents, recursively,
rebuilt from the store alone (the link records say which contexts are whose subagents)."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import msgspec

from ..errors import ContextNotFound, IntegrityError, InvalidInput
from ..store import Store
from ..turnstore.protocol import SessionStore
from ..turnstore.rules import validate_name
from ..turnstore.types import ContextInfo, TurnRecord
from .records import (
    RECORD_TYPES,
    Recorded,
    SessionEnd,
    SessionStart,
    SubagentClose,
    SubagentSpawn,
    ToolCallEnd,
    ToolCallStart,
    decode_record,
)

__all__ = ["SessionTree", "SubagentBranch", "ToolCallPair", "load_own_turns", "load_session_tree"]


@dataclass(frozen=True)
class ToolCallPair:
    """A tool call's start and end records (either may be missing: a run stopped between them, or a
    best-effort write failed)."""

    call_id: str
    name: str | None
    start: Recorded | None
    end: Recorded | None

    @property
    def fs_root(self) -> str | None:
        """The workspace snapshot attached to the end, if any."""
        return None if self.end is None else self.end.turn.fs_root


@dataclass(frozen=True)
class SubagentBranch:
    """A subagent as its parent recorded it: the spawn link, the close record (in the parent; None
    while open) and the subagent's own session."""

    subagent_id: str
    spawn: Recorded
    close: Recorded | None
    session: SessionTree


@dataclass(frozen=True)
class SessionTree:
    """One session: its context, its own records in the order they are stored (its parent's turns,
    which its chain starts with, are not repeated), its tool calls paired by call id in order, its
    subagents in the order they were spawned, the close record if it is a subagent, and the turns in
    its context that are not agent records."""

    name: str
    context: ContextInfo
    records: list[Recorded]
    tool_calls: list[ToolCallPair] = field(default_factory=list)
    subagents: list[SubagentBranch] = field(default_factory=list)
    closed: Recorded | None = None
    other_turns: list[TurnRecord] = field(default_factory=list)

    @property
    def start(self) -> SessionStart | None:
        for recorded in self.records:
            if isinstance(recorded.record, SessionStart):
                return recorded.record
        return None

    @property
    def end(self) -> SessionEnd | None:
        for recorded in reversed(self.records):
            if isinstance(recorded.record, SessionEnd):
                return recorded.record
        return None

    def positional(self) -> list[Recorded]:
        """The records that have a position, in position order (what the loop's hook calls were)."""
        return sorted((r for r in self.records if r.seq is not None), key=lambda r: r.seq or 0)

    def walk(self) -> Iterator[tuple[int, SessionTree]]:
        """Every session of the tree with its depth (this one 0), depth first in spawn order."""
        stack: list[tuple[int, SessionTree]] = [(0, self)]
        while stack:
            depth, tree = stack.pop()
            yield depth, tree
            stack.extend((depth + 1, branch.session) for branch in reversed(tree.subagents))

    def summary(self, *, max_sessions: int = 12) -> str:
        """A few lines per the tree's shape: each session with its counts, the first ``max_sessions``."""
        lines = []
        sessions = list(self.walk())
        for depth, tree in sessions[:max_sessions]:
            snapshots = sum(1 for call in tree.tool_calls if call.fs_root)
            state = "open"
            if tree.closed is not None:
                assert isinstance(tree.closed.record, SubagentClose)
                state = f"closed: {tree.closed.record.outcome}"
            elif tree.end is not None:
                state = f"ended: {tree.end.outcome}"
            lines.append(
                f"{'  ' * depth}{tree.name} (context {tree.context.context_id}): {len(tree.records)} records, "
                f"{len(tree.tool_calls)} tool calls ({snapshots} with a workspace snapshot), "
                f"{len(tree.subagents)} subagents, {state}"
            )
        if len(sessions) > max_sessions:
            lines.append(f"... and {len(sessions) - max_sessions} more sessions")
        return "\n".join(lines)


async def load_own_turns(turns: SessionStore, info: ContextInfo, name: str) -> tuple[list[Recorded], list[TurnRecord]]:
    """A session's own turns, oldest first: its records decoded, and the turns that are not records.
    Read newest first down to where the context was forked, so a subagent's cost does not grow with
    its parent's history."""
    own: list[TurnRecord] = []
    async for turn in turns.iter_turns(info.context_id, newest_first=True):
        if turn.context_id != info.context_id:
            break  # the parent's turns, up to the fork
        own.append(turn)
    records, other = [], []
    for turn in reversed(own):
        if turn.type_id not in RECORD_TYPES:
            other.append(turn)
            continue
        try:
            record = decode_record(turn.type_id, turn.payload)
        except msgspec.DecodeError as exc:
            raise IntegrityError(
                f"session {name!r}: turn {turn.turn_id} ({turn.type_id}) does not decode: {exc}"
            ) from exc
        records.append(Recorded(record, turn))
    return records, other


def pair_tool_calls(records: list[Recorded]) -> list[ToolCallPair]:
    """Starts and ends by call id, each end with the earliest start of its id not yet ended."""
    pairs: list[ToolCallPair] = []
    waiting: dict[str, list[int]] = {}
    for recorded in sorted((r for r in records if r.seq is not None), key=lambda r: r.seq or 0):
        record = recorded.record
        if isinstance(record, ToolCallStart):
            waiting.setdefault(record.call_id, []).append(len(pairs))
            pairs.append(ToolCallPair(record.call_id, record.name, recorded, None))
        elif isinstance(record, ToolCallEnd):
            queue = waiting.get(record.call_id)
            if queue:
                at = queue.pop(0)
                started = pairs[at]
                pairs[at] = ToolCallPair(started.call_id, started.name, started.start, recorded)
            else:
                pairs.append(ToolCallPair(record.call_id, None, None, recorded))
    return pairs


def _turns_of(target: object) -> SessionStore:
    turns = target.turns if isinstance(target, Store) else target
    if not isinstance(turns, SessionStore):
        raise InvalidInput(f"target must be a Store or a turn store, got {type(target).__name__}")
    return turns


async def load_session_tree(target: Store | SessionStore, session_name: str) -> SessionTree:
    """The session named ``session_name`` and every subagent under it, to any depth, from the store
    alone. ``ContextNotFound`` if there is no such session; ``IntegrityError`` if a link record names
    a context that is missing, misnamed or already in the tree."""
    turns = _turns_of(target)
    info = await turns.find_context(validate_name(session_name))
    if info is None:
        raise ContextNotFound(f"no session named {session_name!r}")
    root: SessionTree | None = None
    seen = {info.context_id}
    # (context, its name, where to attach it: parent's subagent list, spawn link, parent's close record)
    queue: deque[tuple[ContextInfo, str, list[SubagentBranch] | None, Recorded | None, Recorded | None]]
    queue = deque([(info, session_name, None, None, None)])
    while queue:
        context, name, attach, spawn, close = queue.popleft()
        records, other = await load_own_turns(turns, context, name)
        closed = next(
            (r for r in records if isinstance(r.record, SubagentClose) and r.record.child_session_name == name), None
        )
        tree = SessionTree(name, context, records, pair_tool_calls(records), [], closed, other)
        if attach is None:
            root = tree
        else:
            assert spawn is not None and isinstance(spawn.record, SubagentSpawn)
            attach.append(SubagentBranch(spawn.record.subagent_id, spawn, close, tree))
        closes = {
            r.record.subagent_id: r
            for r in records
            if isinstance(r.record, SubagentClose) and r.record.session_name == name
        }
        for recorded in records:
            link = recorded.record
            if not isinstance(link, SubagentSpawn) or link.session_name != name:
                continue
            child = await _linked_context(turns, name, link, seen)
            queue.append((child, link.child_session_name, tree.subagents, recorded, closes.get(link.subagent_id)))
    assert root is not None
    return root


async def _linked_context(turns: SessionStore, name: str, link: SubagentSpawn, seen: set[int]) -> ContextInfo:
    where = f"session {name!r}: the link of subagent {link.subagent_id!r} names context {link.child_context_id}"
    try:
        child = await turns.get_context(link.child_context_id)
    except ContextNotFound as exc:
        raise IntegrityError(f"{where}, which does not exist") from exc
    if child.name != link.child_session_name:
        raise IntegrityError(f"{where}, named {child.name!r}, not {link.child_session_name!r}")
    if child.context_id in seen:
        raise IntegrityError(f"{where}, which is already in the tree (a link cycle)")
    seen.add(child.context_id)
    return child
