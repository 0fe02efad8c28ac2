"""How ``PforgeSaver`` lays a LangGraph thread out in the turn store.

Each (thread, checkpoint namespace) is one named context whose chain is a log, oldest first, of two
kinds of turn: a checkpoint (``CHECKPOINT``) and a batch of pending writes (``WRITES``) attached to a
checkpoint by its id. Every turn also records the largest checkpoint id in the log up to it and the
depth of the turn holding it (``top_id``, ``top_depth``), because LangGraph reads checkpoints in id
order (the latest is the largest id), which need not be the order they were put in: from the head
alone a reader knows where the latest checkpoint is, and a newest-first walk knows when nothing older
can still come before what it has found.
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

from ..errors import IntegrityError
from ..turnstore.types import TurnRecord
from ._blobs import Ref

__all__ = ["CHECKPOINT", "WRITES", "CheckpointEntry", "Entry", "Write", "WritesEntry", "decode", "encode", "pending"]

CHECKPOINT = "langgraph.checkpoint"
WRITES = "langgraph.writes"


class CheckpointEntry(msgspec.Struct, array_like=True, frozen=True, omit_defaults=True):
    """One checkpoint: its id, its parent's ("" for none), the checkpoint without its values and id
    (``skeleton``: serde type and bytes), its metadata (likewise) and a reference per channel value.

    ``early``: the depth of the first writes turn made to it *before* it (0: none). LangGraph puts a
    checkpoint only once the previous put finished, but hands over the writes of its tasks as they
    finish, so some may land first; a reader looking for its writes goes back that far."""

    top_id: str
    top_depth: int
    checkpoint_id: str
    parent_id: str
    skeleton: tuple[str, bytes]
    metadata: tuple[str, bytes]
    channels: dict[str, Ref]
    early: int = 0


class Write(msgspec.Struct, array_like=True, frozen=True):
    """One pending write: ``idx`` is LangGraph's (the position, or the special channel's negative index)."""

    task_id: str
    task_path: str
    idx: int
    channel: str
    value: Ref


class WritesEntry(msgspec.Struct, array_like=True, frozen=True):
    top_id: str
    top_depth: int
    checkpoint_id: str
    writes: list[Write]


Entry = CheckpointEntry | WritesEntry

_encoder = msgspec.msgpack.Encoder()
_checkpoint = msgspec.msgpack.Decoder(CheckpointEntry)
_writes = msgspec.msgpack.Decoder(WritesEntry)


def encode(entry: Entry) -> bytes:
    return _encoder.encode(entry)


def decode(record: TurnRecord) -> Entry:
    """The entry a turn holds; ``IntegrityError`` naming the turn for anything else."""
    try:
        if record.type_id == CHECKPOINT:
            return _checkpoint.decode(record.payload)
        if record.type_id == WRITES:
            return _writes.decode(record.payload)
    except msgspec.DecodeError as exc:
        raise IntegrityError(f"turn {record.turn_id} ({record.type_id}) does not decode: {exc}") from exc
    raise IntegrityError(
        f"turn {record.turn_id} of context {record.context_id} is a {record.type_id!r}, not a LangGraph "
        "checkpoint or writes turn: the context's name is taken by something else"
    )


def pending(writes: Iterable[Write]) -> list[Write]:
    """The pending writes of one checkpoint from every write made to it, oldest first: for a normal
    channel the first write of a (task, idx) wins, for the special channels (error, interrupt, resume,
    scheduled: negative idx) the last; sorted as LangGraph applies them (task path, task id, idx)."""
    chosen: dict[tuple[str, int], Write] = {}
    for write in writes:
        key = (write.task_id, write.idx)
        if write.idx >= 0:
            chosen.setdefault(key, write)
        else:
            chosen[key] = write
    return sorted(chosen.values(), key=lambda w: (w.task_path, w.task_id, w.idx))
