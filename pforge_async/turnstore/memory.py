"""``MemoryTurnStore``: deterministic, in-process, for tests. Each instance is independent."""

from __future__ import annotations

from collections.abc import Callable

from ..clock import now_ms
from .base import TreeSource
from .commands import TurnCommand
from .core import TurnCore
from .incore import InCoreStore
from .rules import DEFAULT_MAX_PAYLOAD

__all__ = ["MemoryTurnStore"]


class MemoryTurnStore(InCoreStore):
    """Ids count up from 1; ``clock`` (milliseconds) may be fixed to make records fully deterministic.
    ``trees`` (e.g. ``store.cas``) is where ``fs_root`` oids are checked to be trees."""

    def __init__(
        self,
        *,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD,
        clock: Callable[[], int] = now_ms,
        trees: TreeSource | None = None,
    ) -> None:
        super().__init__(max_payload_bytes=max_payload_bytes, trees=trees)
        self._core = TurnCore(clock)

    async def _write(self, command: TurnCommand) -> object:
        return self._core.apply(command)

    def _core_for_read(self) -> TurnCore:
        return self._core

    async def _collect(self, grace_ms: int) -> tuple[int, int, int, int, bool]:
        core = self._core
        doomed = core.collectable(core.clock() - grace_ms)
        return len(doomed), core.reclaim(doomed), 0, 0, False
