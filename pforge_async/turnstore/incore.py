"""The read side shared by the backends that hold the whole store in a :class:`TurnCore` (memory, fs)."""

from __future__ import annotations

from abc import abstractmethod

from ..errors import IntegrityError, InvalidInput
from .base import ContextKey, TurnStoreBase
from .core import TurnCore
from .types import ContextHead, ContextInfo, ContextOrder, TurnRecord

__all__ = ["InCoreStore"]


class InCoreStore(TurnStoreBase):
    """Reads answered from a :class:`TurnCore`. Such a store holds blobs, not trees: ``fs_root`` is
    checked against the ``trees`` it was given (e.g. ``store.cas`` of an open store); without one, an
    oid of its own blobs is ``InvalidInput`` (not a tree) and any other ``ObjectNotFound``."""

    @abstractmethod
    def _core_for_read(self) -> TurnCore:
        """The core, if reads may be served from it now (else raise)."""

    async def _get_head(self, context_id: int) -> ContextHead:
        return self._core_for_read().get_head(context_id)

    async def _get_turn(self, turn_id: int) -> TurnRecord:
        return self._core_for_read().get_turn(turn_id)

    async def _list_turns(self, context_id: int, before_turn_id: int | None, limit: int) -> list[TurnRecord]:
        return self._core_for_read().list_turns(context_id, before_turn_id, limit)

    async def _get_context(self, context_id: int) -> ContextInfo:
        return self._core_for_read().context_info(context_id)

    async def _find_context(self, name: str) -> ContextInfo | None:
        return self._core_for_read().find_context(name)

    async def _list_contexts(
        self,
        prefix: str | None,
        parent_context_id: int | None,
        order: ContextOrder,
        after: ContextKey | None,
        limit: int,
    ) -> list[ContextInfo]:
        return self._core_for_read().list_contexts(prefix, parent_context_id, order, after, limit)

    async def _get_turn_by_key(self, context_id: int, key: str) -> TurnRecord | None:
        return self._core_for_read().get_turn_by_key(context_id, key)

    async def _chain(self, top_turn_id: int, limit: int) -> list[TurnRecord]:
        return self._core_for_read().chain(top_turn_id, limit)

    async def _ancestor_at(self, turn_id: int, depth: int) -> int:
        return self._core_for_read().ancestor_at(turn_id, depth)

    async def _get_registry_bundle(self, bundle_id: str) -> bytes | None:
        core = self._core_for_read()
        if bundle_id in core.damaged_bundles:
            raise IntegrityError(core.damaged_bundles[bundle_id])
        return core.bundles.get(bundle_id)

    async def _get_blob(self, oid: str) -> bytes:
        return self._core_for_read().get_blob(oid)

    async def _check_tree(self, oid: str) -> None:
        if self._trees is None and oid in self._core_for_read().blobs:
            raise InvalidInput(f"fs_root {oid} is a blob, not a tree")
        await super()._check_tree(oid)

    async def _check_ref(self, oid: str) -> None:
        if oid not in self._core_for_read().blobs:
            await super()._check_ref(oid)

    async def check(self) -> list[str]:
        return self._core_for_read().check()
