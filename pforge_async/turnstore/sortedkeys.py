"""A sorted list of keys kept in buckets, so adding and removing cost O(log n + bucket) rather than a
memmove of the whole list: what the memory and filesystem backends order contexts by "updated" with
(every append moves a context in that order)."""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Iterator
from typing import Any, Generic, TypeVar

__all__ = ["SortedKeys"]

K = TypeVar("K", bound=Any)
_LOAD = 512


class SortedKeys(Generic[K]):
    """Distinct keys in ascending order. Buckets hold at most ``2 * _LOAD`` keys each."""

    def __init__(self) -> None:
        self._buckets: list[list[K]] = []
        self._maxes: list[K] = []
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def add(self, key: K) -> None:
        self._len += 1
        if not self._maxes:
            self._buckets.append([key])
            self._maxes.append(key)
            return
        i = bisect_left(self._maxes, key)
        if i == len(self._maxes):
            i -= 1
            self._buckets[i].append(key)
            self._maxes[i] = key
        else:
            insort(self._buckets[i], key)
        bucket = self._buckets[i]
        if len(bucket) > 2 * _LOAD:
            self._buckets[i : i + 1] = [bucket[:_LOAD], bucket[_LOAD:]]
            self._maxes[i : i + 1] = [bucket[_LOAD - 1], bucket[-1]]

    def remove(self, key: K) -> None:
        """Remove ``key``, which must be present."""
        i = bisect_left(self._maxes, key)
        bucket = self._buckets[i]
        j = bisect_left(bucket, key)
        if bucket[j] != key:
            raise KeyError(key)
        del bucket[j]
        self._len -= 1
        if not bucket:
            del self._buckets[i]
            del self._maxes[i]
        elif j == len(bucket):
            self._maxes[i] = bucket[-1]

    def descending(self, below: K | None = None) -> Iterator[K]:
        """Keys from the greatest down, only those strictly less than ``below`` if given: O(log n)
        to start, O(1) a key after that."""
        if not self._maxes:
            return
        if below is None:
            i = len(self._buckets) - 1
            j = len(self._buckets[i]) - 1
        else:
            i = bisect_left(self._maxes, below)
            if i == len(self._maxes):
                i -= 1
                j = len(self._buckets[i]) - 1
            else:
                j = bisect_left(self._buckets[i], below) - 1
        while i >= 0:
            bucket = self._buckets[i]
            while j >= 0:
                yield bucket[j]
                j -= 1
            i -= 1
            if i >= 0:
                j = len(self._buckets[i]) - 1
