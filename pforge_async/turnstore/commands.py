"""The turn store's write commands: one tagged union, the same for every backend."""

from __future__ import annotations

import msgspec

__all__ = [
    "AppendTurn",
    "AttachFs",
    "CreateContext",
    "PublishBundle",
    "PutBlob",
    "TurnCommand",
]


class CreateContext(msgspec.Struct, frozen=True, tag="create_context"):
    """A new context whose head is ``base_turn_id`` (0: empty). A fork is one of these: O(1)."""

    base_turn_id: int = 0


class AppendTurn(msgspec.Struct, frozen=True, tag="append_turn"):
    context_id: int
    type_id: str
    payload: bytes
    type_version: int = 1
    #: None: the context's head. 0: no parent (a new root within the context).
    parent_turn_id: int | None = None
    idempotency_key: str | None = None


class PublishBundle(msgspec.Struct, frozen=True, tag="publish_bundle"):
    bundle_id: str
    bundle_json: bytes


class AttachFs(msgspec.Struct, frozen=True, tag="attach_fs"):
    turn_id: int
    fs_root: str


class PutBlob(msgspec.Struct, frozen=True, tag="put_blob"):
    data: bytes


TurnCommand = CreateContext | AppendTurn | PublishBundle | AttachFs | PutBlob
