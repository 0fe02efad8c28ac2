"""The read side shared by the backends that hold the whole store in a :class:`TurnCore` (memory, fs)."""

from __future__ import annotations

import time
from abc import abstractmethod

from ..errors import IntegrityError, InvalidInput
from .base import ContextKey, TurnStoreBase
from .core import TurnCore
from .gc import TurnGcReport
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

    async def gc(self, *, grace_s: float = 3600.0, drop_deleted_rows: bool = False) -> TurnGcReport:
        """Reclaim the turns no live context reaches (through heads, bases and parents), leaving
        everything created in the last ``grace_s`` seconds (as the SQLite backend's gc, but for one
        thing: that gc keeps the highest turn, and what it reaches, so as never to give its id again;
        a core keeps its id counters apart, so here they go too). A deleted context leaves no row behind here, so
        ``drop_deleted_rows`` (accepted for the SQLite signature) has nothing to drop. Keys of
        reclaimed turns go with them. The filesystem backend then rewrites its log (see
        ``FsTurnStore``)."""
        if isinstance(grace_s, bool) or not isinstance(grace_s, (int, float)) or not 0 <= grace_s < 10**9:
            raise InvalidInput(f"grace_s must be a number of seconds from 0, got {grace_s!r}")
        if not isinstance(drop_deleted_rows, bool):
            raise InvalidInput(f"drop_deleted_rows must be a bool, got {drop_deleted_rows!r}")
        started = time.monotonic()
        turns, payload, before, after, rewritten = await self._collect(int(grace_s * 1000))
        return TurnGcReport(
            turns_reclaimed=turns,
            payload_bytes_reclaimed=payload,
            contexts_reclaimed=0,
            slices=1,
            wal_truncated=rewritten,
            bytes_before=before,
            bytes_after=after,
            seconds=time.monotonic() - started,
        )

    @abstractmethod
    async def _collect(self, grace_ms: int) -> tuple[int, int, int, int, bool]:
        """Reclaim what is unreachable and older than ``grace_ms``: (turns, payload bytes, file bytes
        before, after, whether the backend's file was rewritten)."""
