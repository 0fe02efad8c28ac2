"""The turn store's interfaces as typed Protocols: what an agent loop or pipeline may depend on."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from .types import ContextHead, ContextInfo, ContextOrder, ContextPage, NewTurn, TurnRecord

__all__ = ["ArtifactStore", "SessionStore", "TurnStore", "TypedTurnStore"]


@runtime_checkable
class TurnStore(Protocol):
    async def create_context(self, base_turn_id: int | None = None) -> ContextHead: ...

    async def append_turn(
        self,
        context_id: int,
        type_id: str,
        payload: bytes,
        *,
        type_version: int = 1,
        parent_turn_id: int | None = None,
        idempotency_key: str | None = None,
    ) -> TurnRecord: ...

    async def fork_context(self, from_turn_id: int) -> ContextHead: ...

    async def get_head(self, context_id: int) -> ContextHead: ...

    async def get_turn(self, turn_id: int) -> TurnRecord: ...

    async def list_turns(
        self, context_id: int, *, before_turn_id: int | None = None, limit: int = 64
    ) -> list[TurnRecord]: ...


@runtime_checkable
class SessionStore(TurnStore, Protocol):
    """Named contexts, lineage, listing, compare-and-set heads, atomic batches and whole-chain reads:
    what a session service or checkpointer builds on. Every backend is one; the contract of each
    method is in ``pforge_async.turnstore.base.TurnStoreBase``."""

    async def create_context(
        self,
        base_turn_id: int | None = None,
        *,
        name: str | None = None,
        metadata: dict[str, Any] | None = None,
        parent_context_id: int | None = None,
        idempotency_key: str | None = None,
    ) -> ContextInfo: ...

    async def fork_context(
        self,
        from_turn_id: int,
        *,
        parent_context_id: int | None = None,
        name: str | None = None,
        metadata: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> ContextInfo: ...

    async def open_context(
        self,
        name: str,
        *,
        base_turn_id: int | None = None,
        parent_context_id: int | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> ContextInfo: ...

    async def get_context(self, context_id: int) -> ContextInfo: ...

    async def find_context(self, name: str) -> ContextInfo | None: ...

    async def list_contexts(
        self,
        *,
        prefix: str | None = None,
        parent_context_id: int | None = None,
        order: ContextOrder = "updated",
        after: str | None = None,
        limit: int = 100,
    ) -> ContextPage: ...

    async def set_context_metadata(
        self, context_id: int, metadata: dict[str, Any], *, expected_updated_at_ms: int | None = None
    ) -> ContextInfo: ...

    async def set_head(self, context_id: int, turn_id: int, *, expected_head: int | None = None) -> ContextInfo: ...

    async def append_turn(
        self,
        context_id: int,
        type_id: str,
        payload: bytes,
        *,
        type_version: int = 1,
        parent_turn_id: int | None = None,
        idempotency_key: str | None = None,
        expected_head: int | None = None,
        fs_root: str | None = None,
    ) -> TurnRecord: ...

    async def append_turns(
        self, turns: Sequence[NewTurn], *, expected_heads: Mapping[int, int] | None = None
    ) -> list[TurnRecord]: ...

    async def get_turn_by_key(self, context_id: int, key: str) -> TurnRecord | None: ...

    def iter_turns(
        self, context_id: int, *, newest_first: bool = False, page_size: int = 256
    ) -> AsyncIterator[TurnRecord]: ...


@runtime_checkable
class TypedTurnStore(TurnStore, Protocol):
    async def publish_registry_bundle(self, bundle_id: str, bundle_json: bytes) -> None: ...

    async def get_registry_bundle(self, bundle_id: str) -> bytes | None: ...


@runtime_checkable
class ArtifactStore(Protocol):
    async def put_blob(self, data: bytes) -> str: ...

    async def get_blob(self, oid: str) -> bytes: ...

    async def attach_fs(self, turn_id: int, fs_root: str) -> None: ...
