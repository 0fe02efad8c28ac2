"""Checkpoint state: how a ``CheckpointRecord``'s ``context`` is encoded, where it is kept (inline, or
by reference in the CAS when it is larger than the writer's ``inline_state_max``), and how a resume
loads the latest checkpoint back.

``load_latest_checkpoint`` costs the same however many checkpoints a run has: the run's checkpoint log
is a named context whose head is the latest checkpoint, so it is a lookup by name, one turn read by id
and (for large state) one blob read.
"""

from __future__ import annotations

import msgspec

from ..cas.objects import BLOB, hash_object
from ..errors import IntegrityError, InvalidInput, NotFound, ObjectNotFound
from ..turnstore.protocol import SessionStore
from ..turnstore.types import TurnRecord
from .keys import (
    checkpoint_key,
    checkpoints_context_name,
    validate_node_id,
    validate_run_id,
    validate_sequence_no,
)
from .records import CHECKPOINT, CheckpointEvent, CheckpointRecord, StateRef, decode_record
from .target import Target, blobs_of, find_run, turns_of

__all__ = [
    "DEFAULT_INLINE_STATE",
    "decode_checkpoint_turn",
    "encode_state",
    "load_checkpoint",
    "load_latest_checkpoint",
    "load_state",
    "state_oid",
    "validate_checkpoint",
]

#: state up to this many encoded bytes stays in the record; more goes to the CAS
DEFAULT_INLINE_STATE = 64 << 10

# Sorted keys: a context rebuilt by a resume (decoded, then added to) encodes to the same bytes as
# the one an uninterrupted run built, whatever order its keys were set in.
_state_encoder = msgspec.msgpack.Encoder(order="deterministic")
_state_decoder = msgspec.msgpack.Decoder(dict[str, object])


def validate_checkpoint(checkpoint: object) -> CheckpointRecord:
    """Every field of a ``CheckpointRecord`` checked (a Struct does not check at construction)."""
    if not isinstance(checkpoint, CheckpointRecord):
        raise InvalidInput(f"checkpoint must be a CheckpointRecord, got {type(checkpoint).__name__}")
    run_id = validate_run_id(checkpoint.run_id)
    where = f"run {run_id!r} checkpoint"
    validate_node_id(checkpoint.checkpoint_id, f"{where} checkpoint_id")
    validate_sequence_no(checkpoint.sequence_no)
    validate_node_id(checkpoint.current_node, f"{where} current_node")
    if checkpoint.next_node is not None:
        validate_node_id(checkpoint.next_node, f"{where} next_node")
    if not isinstance(checkpoint.completed_nodes, list):
        raise InvalidInput(f"{where} completed_nodes must be a list, got {type(checkpoint.completed_nodes).__name__}")
    for node in checkpoint.completed_nodes:
        validate_node_id(node, f"{where} completed_nodes item")
    if not isinstance(checkpoint.node_retries, dict):
        raise InvalidInput(f"{where} node_retries must be a dict, got {type(checkpoint.node_retries).__name__}")
    for node, retries in checkpoint.node_retries.items():
        validate_node_id(node, f"{where} node_retries key")
        if not isinstance(retries, int) or isinstance(retries, bool) or not 0 <= retries < 1 << 31:
            raise InvalidInput(f"{where} node_retries[{node!r}] must be an int from 0 to 2**31-1, got {retries!r}")
    if not isinstance(checkpoint.context, dict):
        raise InvalidInput(f"{where} context must be a dict, got {type(checkpoint.context).__name__}")
    return checkpoint


def encode_state(checkpoint: CheckpointRecord) -> bytes:
    """The checkpoint's ``context`` as msgpack with sorted keys (``InvalidInput`` if it cannot be)."""
    where = f"run {checkpoint.run_id!r} checkpoint {checkpoint.sequence_no}"
    for key in checkpoint.context:
        if not isinstance(key, str):
            raise InvalidInput(f"{where}: context keys must be str, got {type(key).__name__} {key!r:.80}")
    try:
        return _state_encoder.encode(checkpoint.context)
    except (msgspec.EncodeError, TypeError, OverflowError, ValueError) as exc:
        raise InvalidInput(f"{where}: its context cannot be encoded as msgpack: {exc}") from exc


def state_oid(data: bytes) -> str:
    """The id the CAS gives ``data`` (git's SHA-256 blob id), computed without writing it."""
    return hash_object(BLOB, data).hex()


def _where(stored: CheckpointEvent) -> str:
    return f"run {stored.run_id!r} checkpoint {stored.sequence_no} ({stored.checkpoint_id!r})"


async def load_state(turns: SessionStore, stored: CheckpointEvent) -> dict[str, object]:
    """The ``context`` a stored checkpoint holds, read back from the CAS if it is there.
    ``ObjectNotFound`` naming the object if the CAS no longer has it."""
    ref: StateRef = stored.state
    if ref.oid is not None:
        blobs = blobs_of(turns)
        if blobs is None:
            raise ObjectNotFound(
                f"{_where(stored)}: its state object {ref.oid} is in a CAS, and {type(turns).__name__} has none"
            )
        try:
            data = await blobs.get_blob(ref.oid)
        except ObjectNotFound as exc:
            raise ObjectNotFound(f"{_where(stored)}: its state object {ref.oid} is missing from the CAS") from exc
    elif ref.inline is not None:
        data = ref.inline
    else:
        raise IntegrityError(f"{_where(stored)}: this copy of the record holds no state (read its checkpoint log)")
    if len(data) != ref.size:
        raise IntegrityError(f"{_where(stored)}: its state is {len(data)} bytes, the record says {ref.size}")
    try:
        return _state_decoder.decode(data)
    except (msgspec.DecodeError, RecursionError) as exc:  # RecursionError: nested past msgspec's depth
        raise IntegrityError(f"{_where(stored)}: its state does not decode: {exc}") from exc


def decode_checkpoint_turn(turn: TurnRecord, run_id: str) -> CheckpointEvent:
    """The checkpoint a turn of a run's checkpoint log holds; ``IntegrityError`` if it is not one."""
    if turn.type_id != CHECKPOINT:
        raise IntegrityError(f"run {run_id!r}: turn {turn.turn_id} in its checkpoint log is a {turn.type_id}")
    try:
        stored = decode_record(CHECKPOINT, turn.payload)
    except msgspec.DecodeError as exc:
        raise IntegrityError(f"run {run_id!r}: checkpoint turn {turn.turn_id} does not decode: {exc}") from exc
    assert isinstance(stored, CheckpointEvent)
    if stored.run_id != run_id:
        raise IntegrityError(f"run {run_id!r}: checkpoint turn {turn.turn_id} belongs to run {stored.run_id!r}")
    return stored


def _loaded(stored: CheckpointEvent, context: dict[str, object]) -> CheckpointRecord:
    return CheckpointRecord(
        stored.run_id,
        stored.checkpoint_id,
        stored.sequence_no,
        stored.current_node,
        list(stored.completed_nodes),
        dict(stored.node_retries),
        context,
        stored.next_node,
    )


async def _checkpoint_log(turns: SessionStore, run_id: str) -> int | None:
    """The run's checkpoint log context id; None if the run has none yet. ``ContextNotFound`` if there
    is no such run."""
    info = await turns.find_context(checkpoints_context_name(run_id))
    if info is None:
        await find_run(turns, run_id)  # no run at all: ContextNotFound naming it
        return None
    return info.context_id


async def load_latest_checkpoint(target: Target, run_id: str) -> CheckpointRecord | None:
    """The run's latest checkpoint with its state loaded back, or None if it has none yet.
    ``ContextNotFound`` for an unknown run; ``ObjectNotFound`` naming the state object if the CAS lost
    it. Its cost does not grow with the number of checkpoints."""
    turns = turns_of(target)
    validate_run_id(run_id)
    info = await turns.find_context(checkpoints_context_name(run_id))
    if info is None:
        await find_run(turns, run_id)
        return None
    if not info.head_turn_id:
        return None
    stored = decode_checkpoint_turn(await turns.get_turn(info.head_turn_id), run_id)
    return _loaded(stored, await load_state(turns, stored))


async def load_checkpoint(target: Target, run_id: str, sequence_no: int) -> CheckpointRecord:
    """Checkpoint ``sequence_no`` of the run with its state (by key: O(1) too). ``ContextNotFound`` for
    an unknown run, ``NotFound`` for a sequence number it has no checkpoint for."""
    turns = turns_of(target)
    validate_run_id(run_id)
    validate_sequence_no(sequence_no)
    log = await _checkpoint_log(turns, run_id)
    turn = None if log is None else await turns.get_turn_by_key(log, checkpoint_key(run_id, sequence_no))
    if turn is None:
        raise NotFound(f"run {run_id!r} has no checkpoint {sequence_no}")
    stored = decode_checkpoint_turn(turn, run_id)
    return _loaded(stored, await load_state(turns, stored))
