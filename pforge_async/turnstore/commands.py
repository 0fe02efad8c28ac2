"""The turn store's write commands: one tagged union, the same for every backend.

A backend receives a command only after :class:`~pforge_async.turnstore.base.TurnStoreBase` validated
every field (types, id ranges, text, sizes, that an ``fs_root`` names a tree): what is left for the
backend to decide is what depends on stored state (does the context exist, is the name taken, is the
head still the expected one). Every command is all-or-nothing: a command that fails stored nothing.
"""

from __future__ import annotations

import msgspec

__all__ = [
    "AppendTurn",
    "AppendTurns",
    "AttachFs",
    "CreateContext",
    "DeleteContext",
    "EraseTurns",
    "PublishBundle",
    "PutBlob",
    "SetContextMetadata",
    "SetHead",
    "TurnCommand",
]


class CreateContext(msgspec.Struct, frozen=True, tag="create_context"):
    """A new context whose head is ``base_turn_id`` (0: empty). A fork is one of these: O(1).

    In this order: with ``idempotency_key``, a key already stored (keys of context creation are scoped
    to the store) returns that context as it is now, and creates nothing; the same key for a different
    request (a different :func:`~pforge_async.turnstore.rules.creation_fingerprint`) raises
    ``IdempotencyConflict``. Then, with ``name`` taken: ``open_existing`` returns that context unchanged
    (``open_context``), otherwise ``Conflict``. Then ``base_turn_id`` must exist (``TurnNotFound``) and
    ``parent_context_id`` too (``ContextNotFound``).
    """

    base_turn_id: int = 0
    name: str | None = None
    #: canonical JSON of the metadata dict (``rules.encode_metadata``)
    metadata: bytes = b"{}"
    #: 0: none. None (a fork that did not name its parent): the context ``base_turn_id`` was appended in.
    parent_context_id: int | None = 0
    idempotency_key: str | None = None
    open_existing: bool = False


class AppendTurn(msgspec.Struct, frozen=True, tag="append_turn", omit_defaults=True):
    """Append one turn and move the context's head to it.

    Its fields left at their defaults are not encoded (``omit_defaults``): an agent loop's append
    is four of them, which its caller encodes and the actor decodes, each once.

    In this order: a stored ``idempotency_key`` (scoped to the context) returns the turn first stored,
    whatever the head is now and whatever ``expected_head`` says (a retry whose first attempt landed),
    or ``IdempotencyConflict`` if the retry differs in payload, type, an explicitly given parent or an
    explicitly given ``fs_root``. Otherwise, with ``expected_head`` given and the head not that turn:
    ``HeadConflict``. ``fs_root`` is attached in the same write (the base checked it names a tree).
    """

    context_id: int
    type_id: str
    payload: bytes
    type_version: int = 1
    #: None: the context's head. 0: no parent (a new root within the context).
    parent_turn_id: int | None = None
    idempotency_key: str | None = None
    #: None: no check. 0: the context must be empty (head 0).
    expected_head: int | None = None
    fs_root: str | None = None
    #: sorted, each once (``rules.validate_refs``); the base checked each is in the CAS
    refs: tuple[str, ...] = ()


class AppendTurns(msgspec.Struct, frozen=True, tag="append_turns"):
    """Several appends, all or none, across contexts; turns of one context chain in the order given.

    Each turn is decided as an ``AppendTurn`` (``expected_head`` None) would be, against the state the
    batch's earlier turns left. ``expected_heads`` maps context ids to the head each must have before
    the batch: a context in it is checked unless every turn the batch has for it is a retry whose key
    is stored (so a retried batch whose first attempt landed returns its turns); a context the batch
    has no turn for is always checked. Any failure stores nothing of the batch.
    """

    turns: list[AppendTurn]
    expected_heads: dict[int, int] = {}


class SetHead(msgspec.Struct, frozen=True, tag="set_head"):
    """Move a context's head to any existing turn (any context's), or to 0 (empty). Turns stay."""

    context_id: int
    turn_id: int
    expected_head: int | None = None


class SetContextMetadata(msgspec.Struct, frozen=True, tag="set_context_metadata"):
    """Replace a context's metadata; with ``expected_updated_at_ms``, only if it is still that
    (``Conflict`` otherwise)."""

    context_id: int
    metadata: bytes
    expected_updated_at_ms: int | None = None


class DeleteContext(msgspec.Struct, frozen=True, tag="delete_context"):
    """Remove a live context (``ContextNotFound`` otherwise): its head, name, metadata, creation key
    and the idempotency keys of its turns. Its turns stay (other contexts may share them; ``gc``
    reclaims the ones no live context reaches). Its id is never given to another context."""

    context_id: int


class EraseTurns(msgspec.Struct, frozen=True, tag="erase_turns"):
    """Erase the payloads of a prefix of a context's chain (``ContextNotFound`` if it is not live).

    The prefix ends at the head (``before_turn_id`` and ``keep_last`` None), at the parent of
    ``before_turn_id`` (which must be on the chain: ``InvalidInput``), or ``keep_last`` turns below
    the head. An erased turn's ancestors are always erased too, so the walk down stops at the first
    turn already erased. The reply is how many turns this erased."""

    context_id: int
    before_turn_id: int | None = None
    keep_last: int | None = None


class PublishBundle(msgspec.Struct, frozen=True, tag="publish_bundle"):
    bundle_id: str
    bundle_json: bytes


class AttachFs(msgspec.Struct, frozen=True, tag="attach_fs"):
    turn_id: int
    fs_root: str


class PutBlob(msgspec.Struct, frozen=True, tag="put_blob"):
    data: bytes


TurnCommand = (
    CreateContext
    | AppendTurn
    | AppendTurns
    | SetHead
    | SetContextMetadata
    | DeleteContext
    | EraseTurns
    | PublishBundle
    | AttachFs
    | PutBlob
)
