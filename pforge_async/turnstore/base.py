"""The public turn store API, written once: backends differ in how a command is carried and applied,
and in how reads are served."""

from __future__ import annotations

from abc import ABC, abstractmethod

from ..cas.objects import validate_oid
from ..errors import InvalidInput
from .commands import AppendTurn, AttachFs, CreateContext, PublishBundle, PutBlob, TurnCommand
from .rules import (
    DEFAULT_MAX_PAYLOAD,
    validate_append,
    validate_bundle,
    validate_id,
    validate_limit,
)
from .types import ContextHead, TurnRecord

__all__ = ["TurnStoreBase"]


class TurnStoreBase(ABC):
    """``TurnStore`` + ``TypedTurnStore`` + ``ArtifactStore``; see ``pforge_async.turnstore``."""

    def __init__(self, *, max_payload_bytes: int = DEFAULT_MAX_PAYLOAD) -> None:
        validate_limit(max_payload_bytes)
        self.max_payload_bytes = max_payload_bytes

    @abstractmethod
    async def _write(self, command: TurnCommand) -> object:
        """Carry a validated command to where it is applied, and return its reply."""

    # -- TurnStore: writes -------------------------------------------------------------------------

    async def create_context(self, base_turn_id: int | None = None) -> ContextHead:
        """A new context, empty or starting at ``base_turn_id`` (which it shares, not copies)."""
        base = 0 if base_turn_id is None else validate_id(base_turn_id, "base_turn_id")
        head = await self._write(CreateContext(base))
        assert isinstance(head, ContextHead)
        return head

    async def fork_context(self, from_turn_id: int) -> ContextHead:
        """A new context whose head is ``from_turn_id``: O(1), nothing is copied."""
        return await self.create_context(validate_id(from_turn_id, "from_turn_id"))

    async def append_turn(
        self,
        context_id: int,
        type_id: str,
        payload: bytes,
        *,
        type_version: int = 1,
        parent_turn_id: int | None = None,
        idempotency_key: str | None = None,
    ) -> TurnRecord:
        """Append a turn (its parent defaults to the head) and move the head to it.

        With ``idempotency_key``, a retry returns the turn first stored and writes nothing; the same
        key for a different payload, type or explicit parent raises ``IdempotencyConflict``.
        """
        if isinstance(payload, (bytearray, memoryview)):
            payload = bytes(payload)
        command = AppendTurn(context_id, type_id, payload, type_version, parent_turn_id, idempotency_key)
        validate_append(command, self.max_payload_bytes)
        record = await self._write(command)
        assert isinstance(record, TurnRecord)
        return record

    # -- TurnStore: reads --------------------------------------------------------------------------

    async def get_head(self, context_id: int) -> ContextHead:
        return await self._get_head(validate_id(context_id, "context_id"))

    async def get_turn(self, turn_id: int) -> TurnRecord:
        return await self._get_turn(validate_id(turn_id, "turn_id"))

    @abstractmethod
    async def _get_head(self, context_id: int) -> ContextHead: ...

    @abstractmethod
    async def _get_turn(self, turn_id: int) -> TurnRecord: ...

    async def list_turns(
        self, context_id: int, *, before_turn_id: int | None = None, limit: int = 64
    ) -> list[TurnRecord]:
        """Oldest to newest, the ``limit`` turns that end at the head, or just before
        ``before_turn_id`` (which must be on the context's chain)."""
        validate_id(context_id, "context_id")
        if before_turn_id is not None:
            validate_id(before_turn_id, "before_turn_id")
        validate_limit(limit)
        return await self._list_turns(context_id, before_turn_id, limit)

    @abstractmethod
    async def _list_turns(self, context_id: int, before_turn_id: int | None, limit: int) -> list[TurnRecord]: ...

    # -- TypedTurnStore ----------------------------------------------------------------------------

    async def publish_registry_bundle(self, bundle_id: str, bundle_json: bytes) -> None:
        """Publish a type registry bundle (JSON). Republishing the same bytes is a no-op; other
        bytes under the same id raise ``Conflict``."""
        validate_bundle(bundle_id, bundle_json)
        await self._write(PublishBundle(bundle_id, bundle_json))

    async def get_registry_bundle(self, bundle_id: str) -> bytes | None:
        if not isinstance(bundle_id, str):
            raise InvalidInput(f"bundle_id must be a str, got {type(bundle_id).__name__}")
        return await self._get_registry_bundle(bundle_id)

    @abstractmethod
    async def _get_registry_bundle(self, bundle_id: str) -> bytes | None: ...

    # -- ArtifactStore -----------------------------------------------------------------------------

    async def put_blob(self, data: bytes) -> str:
        """Store bytes; returns their id (git's SHA-256 blob id, the same in every backend)."""
        if isinstance(data, (bytearray, memoryview)):
            data = bytes(data)
        if not isinstance(data, bytes):
            raise InvalidInput(f"put_blob takes bytes, got {type(data).__name__}")
        return await self._put_blob(data)

    async def _put_blob(self, data: bytes) -> str:
        oid = await self._write(PutBlob(data))
        assert isinstance(oid, str)
        return oid

    async def get_blob(self, oid: str) -> bytes:
        return await self._get_blob(validate_oid(oid))

    @abstractmethod
    async def _get_blob(self, oid: str) -> bytes: ...

    async def attach_fs(self, turn_id: int, fs_root: str) -> None:
        """Attach a workspace snapshot (a CAS tree id) to a turn, once."""
        validate_id(turn_id, "turn_id")
        validate_oid(fs_root, "fs_root")
        await self._write(AttachFs(turn_id, fs_root))

    async def __aenter__(self) -> TurnStoreBase:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        return None
