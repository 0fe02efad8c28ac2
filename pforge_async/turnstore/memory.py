"""``MemoryTurnStore``: deterministic, in-process, for tests. Each instance is independent."""

from __future__ import annotations

from collections.abc import Callable

from ..clock import now_ms
from .base import TurnStoreBase
from .commands import TurnCommand
from .core import TurnCore
from .rules import DEFAULT_MAX_PAYLOAD
from .types import ContextHead, TurnRecord

__all__ = ["MemoryTurnStore"]


class MemoryTurnStore(TurnStoreBase):
    """Ids count up from 1; ``clock`` (milliseconds) may be fixed to make records fully deterministic."""

    def __init__(self, *, max_payload_bytes: int = DEFAULT_MAX_PAYLOAD, clock: Callable[[], int] = now_ms) -> None:
        super().__init__(max_payload_bytes=max_payload_bytes)
        self._core = TurnCore(clock)

    async def _write(self, command: TurnCommand) -> object:
        return self._core.apply(command)

    async def _get_head(self, context_id: int) -> ContextHead:
        return self._core.get_head(context_id)

    async def _get_turn(self, turn_id: int) -> TurnRecord:
        return self._core.get_turn(turn_id)

    async def _list_turns(self, context_id: int, before_turn_id: int | None, limit: int) -> list[TurnRecord]:
        return self._core.list_turns(context_id, before_turn_id, limit)

    async def _get_registry_bundle(self, bundle_id: str) -> bytes | None:
        return self._core.bundles.get(bundle_id)

    async def _get_blob(self, oid: str) -> bytes:
        return self._core.get_blob(oid)
