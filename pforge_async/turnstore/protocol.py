"""The turn store's interfaces as typed Protocols: what an agent loop or pipeline may depend on."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from .types import ContextHead, TurnRecord

__all__ = ["ArtifactStore", "TurnStore", "TypedTurnStore"]


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
class TypedTurnStore(TurnStore, Protocol):
    async def publish_registry_bundle(self, bundle_id: str, bundle_json: bytes) -> None: ...

    async def get_registry_bundle(self, bundle_id: str) -> bytes | None: ...


@runtime_checkable
class ArtifactStore(Protocol):
    async def put_blob(self, data: bytes) -> str: ...

    async def get_blob(self, oid: str) -> bytes: ...

    async def attach_fs(self, turn_id: int, fs_root: str) -> None: ...
