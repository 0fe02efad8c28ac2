"""Content-addressed values for the adapters: a value is kept inline when its reference would be as
large as it is, else stored once in the store's blob space (the CAS on the SQLite store) under its
git blob id, however many checkpoints name it.

A list long enough is cut into chunks of a fixed number of items, each chunk its own blob, so a list
that grows by appending (a chat's messages) stores its full chunks once and rewrites only its last.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import anyio
import msgspec

from ..cas.objects import BLOB, hash_object
from ..errors import IntegrityError
from ..turnstore.base import TurnStoreBase

__all__ = ["INLINE_MAX", "LIST_CHUNK", "BlobCache", "Ref", "ValueCodec"]

#: a value whose encoding is at most this many bytes stays inline: a reference costs about as much
INLINE_MAX = 64
#: items per chunk of a chunked list
LIST_CHUNK = 16

INLINE, BLOB_REF, CHUNKS = 0, 1, 2

Dumps = Callable[[Any], tuple[str, bytes]]
Loads = Callable[[tuple[str, bytes]], Any]


class Ref(msgspec.Struct, array_like=True, frozen=True):
    """How one value is stored: ``kind`` INLINE (``data`` is the encoding, ``type`` its serde type),
    BLOB_REF (``data`` is the raw 32-byte blob id; the blob holds type and encoding) or CHUNKS
    (``data`` is the raw ids of the chunk blobs, each a list, concatenated in order)."""

    kind: int
    type: str
    data: bytes

    def oids(self) -> list[str]:
        if self.kind == INLINE:
            return []
        return [self.data[i : i + 32].hex() for i in range(0, len(self.data), 32)]


def _blob(type_: str, data: bytes) -> bytes:
    return type_.encode() + b"\0" + data


def _unblob(oid: str, blob: bytes) -> tuple[str, bytes]:
    cut = blob.find(b"\0")
    if cut < 0:
        raise IntegrityError(f"blob {oid} is not a stored value (no type before its data)")
    return blob[:cut].decode(), blob[cut + 1 :]


class BlobCache:
    """Blobs known to be stored, with their bytes while they fit: content-addressed blobs never
    change, so an entry is never stale. Bounded by ``max_bytes`` of blob data (least recently used
    out first) and ``max_known`` ids remembered as stored."""

    def __init__(self, *, max_bytes: int = 32 << 20, max_known: int = 200_000) -> None:
        self._data: OrderedDict[str, bytes] = OrderedDict()
        self._size = 0
        self._known: OrderedDict[str, None] = OrderedDict()
        self.max_bytes = max_bytes
        self.max_known = max_known

    def knows(self, oid: str) -> bool:
        if oid in self._known:
            self._known.move_to_end(oid)
            return True
        return False

    def get(self, oid: str) -> bytes | None:
        blob = self._data.get(oid)
        if blob is not None:
            self._data.move_to_end(oid)
        return blob

    def add(self, oid: str, blob: bytes) -> None:
        self._known[oid] = None
        self._known.move_to_end(oid)
        while len(self._known) > self.max_known:
            self._known.popitem(last=False)
        if len(blob) > self.max_bytes // 8 or oid in self._data:
            return
        self._data[oid] = blob
        self._size += len(blob)
        while self._size > self.max_bytes:
            _, old = self._data.popitem(last=False)
            self._size -= len(old)


class ValueCodec:
    """Turns values into ``Ref``s (storing what must be stored) and back, through one turn store's
    blobs and a ``serde``'s ``dumps_typed`` / ``loads_typed``."""

    def __init__(self, turns: TurnStoreBase, dumps: Dumps, loads: Loads, cache: BlobCache) -> None:
        self._turns = turns
        self._dumps = dumps
        self._loads = loads
        self._cache = cache

    # -- writing -----------------------------------------------------------------------------------

    def encode(self, value: Any, pending: dict[str, bytes]) -> Ref:
        """The reference for ``value``; blobs not yet known stored go into ``pending`` (oid -> bytes),
        for :meth:`store` to write before anything that names them."""
        if type(value) is list and len(value) > LIST_CHUNK:
            oids = bytearray()
            for start in range(0, len(value), LIST_CHUNK):
                type_, data = self._dumps(value[start : start + LIST_CHUNK])
                oids += self._stage(_blob(type_, data), pending)
            return Ref(CHUNKS, "", bytes(oids))
        type_, data = self._dumps(value)
        if len(data) <= INLINE_MAX:
            return Ref(INLINE, type_, data)
        return Ref(BLOB_REF, "", self._stage(_blob(type_, data), pending))

    def _stage(self, blob: bytes, pending: dict[str, bytes]) -> bytes:
        raw = hash_object(BLOB, blob)
        oid = raw.hex()
        if oid not in pending and not self._cache.knows(oid):
            pending[oid] = blob
        return raw

    async def store(self, pending: dict[str, bytes]) -> None:
        """Write the staged blobs (concurrently: the store batches them into one write)."""
        if not pending:
            return
        items = list(pending.items())
        if len(items) == 1:
            await self._put(*items[0])
            return
        async with anyio.create_task_group() as tg:
            for oid, blob in items:
                tg.start_soon(self._put, oid, blob)

    async def _put(self, oid: str, blob: bytes) -> None:
        stored = await self._turns.put_blob(blob)
        if stored != oid:
            raise IntegrityError(f"the store named blob {oid} {stored}: not git's blob id")
        self._cache.add(oid, blob)

    # -- reading -----------------------------------------------------------------------------------

    async def fetch(self, refs: Sequence[Ref]) -> dict[str, bytes]:
        """Every blob the refs name, from the cache or the store (concurrently)."""
        wanted = {oid for ref in refs for oid in ref.oids()}
        found: dict[str, bytes] = {}
        missing = []
        for oid in wanted:
            blob = self._cache.get(oid)
            if blob is None:
                missing.append(oid)
            else:
                found[oid] = blob

        async def read(oid: str) -> None:
            blob = await self._turns.get_blob(oid)
            self._cache.add(oid, blob)
            found[oid] = blob

        if len(missing) == 1:
            await read(missing[0])
        elif missing:
            async with anyio.create_task_group() as tg:
                for oid in missing:
                    tg.start_soon(read, oid)
        return found

    def decode(self, ref: Ref, blobs: dict[str, bytes]) -> Any:
        """The value of ``ref``; its blobs must be in ``blobs`` (see :meth:`fetch`)."""
        if ref.kind == INLINE:
            return self._loads((ref.type, ref.data))
        if ref.kind == BLOB_REF:
            oid = ref.data.hex()
            return self._loads(_unblob(oid, blobs[oid]))
        if ref.kind == CHUNKS:
            items: list[Any] = []
            for oid in ref.oids():
                chunk = self._loads(_unblob(oid, blobs[oid]))
                if not isinstance(chunk, list):
                    raise IntegrityError(f"blob {oid} should hold a chunk of a list, holds {type(chunk).__name__}")
                items.extend(chunk)
            return items
        raise IntegrityError(f"unknown value reference kind {ref.kind}")
