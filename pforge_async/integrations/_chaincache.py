"""A session's cache of its chain: the payloads of the last turns up to the head it last read.

Turns are immutable, so what a chain holds up to a given turn id never changes: a reader that knows
the chain up to turn ``t`` only needs the turns after ``t`` to know the chain up to a newer head, and
nothing at all when the head is still ``t``. Two things can still change under a cache, and neither
is signalled to other processes:

- the head moves (appends, ``set_head`` back or to another branch, a context deleted and made
  again): the reader confirms the head with one small read each time and reads only the turns the
  cache does not hold, or starts again from a full read;
- a payload is erased (``erase_turns``, ``prune_context``, from this context or any other sharing
  the turns). Erasure always takes a whole prefix of a chain (an erased turn's ancestors are erased
  too), so if any cached turn was erased, the oldest cached turn was: one read of that turn, after
  the head's, tells whether the whole cache still holds.

Entries are keyed by turn id and located by depth (a turn's depth on its chain is fixed too). The
cache is bounded by the bytes of the payloads it holds: past ``max_bytes`` it drops its oldest
entries and then holds only a suffix of the chain (``complete`` False), which still serves reads of
the last items.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["ChainCache"]


class ChainCache:
    """The payloads of consecutive turns of one chain, oldest first. ``complete``: the oldest one is
    the chain's first readable turn (its first turn, or the first after an erased prefix), so the
    cache holds every item of the chain up to :attr:`head`."""

    __slots__ = ("_bytes", "_depth0", "_ids", "_index", "_payloads", "complete", "max_bytes")

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._ids: list[int] = []
        self._payloads: list[bytes] = []
        self._index: dict[int, int] = {}  # turn id -> depth
        self._depth0 = 0  # depth of the oldest cached turn
        self._bytes = 0
        self.complete = False

    def __contains__(self, turn_id: int) -> bool:
        return turn_id in self._index

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def head(self) -> int:
        """The newest cached turn (0: none)."""
        return self._ids[-1] if self._ids else 0

    @property
    def head_depth(self) -> int:
        return self._depth0 + len(self._ids) - 1 if self._ids else 0

    @property
    def oldest(self) -> int:
        """The oldest cached turn (0: none): the one whose erasure check covers the whole cache."""
        return self._ids[0] if self._ids else 0

    def clear(self) -> None:
        self._ids.clear()
        self._payloads.clear()
        self._index.clear()
        self._depth0 = self._bytes = 0
        self.complete = False

    def cut(self, turn_id: int) -> None:
        """Make ``turn_id`` (cached) the newest: the head moved back to it, or the chain grows from it."""
        keep = self._index[turn_id] - self._depth0 + 1
        for gone in self._ids[keep:]:
            del self._index[gone]
        self._bytes -= sum(len(p) for p in self._payloads[keep:])
        del self._ids[keep:], self._payloads[keep:]

    def extend(self, turns: Iterable[tuple[int, int, int, bytes]], *, complete: bool = False) -> None:
        """Add ``(turn_id, parent_turn_id, depth, payload)`` turns, oldest first, that continue the
        cached chain (or start it, if the cache is empty: ``complete`` says whether the first of them
        begins the chain's readable items). A turn that does not continue it starts the cache again
        from that turn, as a suffix of its chain (not complete)."""
        for turn_id, parent, depth, payload in turns:
            if self._ids and (parent != self._ids[-1] or depth != self.head_depth + 1):
                self.clear()
            if not self._ids:
                self._depth0 = depth
                self.complete = complete
            self._ids.append(turn_id)
            self._payloads.append(payload)
            self._index[turn_id] = depth
            self._bytes += len(payload)
        self._trim()

    def tail(self, count: int | None) -> list[bytes] | None:
        """The payloads of the last ``count`` items (None: every item), or None when the cache does
        not hold that many and the chain may have more."""
        if count is None or count >= len(self._ids):
            return list(self._payloads) if self.complete else None
        return self._payloads[len(self._payloads) - count :]

    def _trim(self) -> None:
        drop = 0
        size = self._bytes
        while size > self.max_bytes and drop < len(self._ids):
            size -= len(self._payloads[drop])
            drop += 1
        if not drop:
            return
        for gone in self._ids[:drop]:
            del self._index[gone]
        del self._ids[:drop], self._payloads[:drop]
        self._bytes = size
        self._depth0 += drop
        self.complete = False
