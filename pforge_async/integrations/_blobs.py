"""Content-addressed values for the adapters: a value is kept inline when its reference would be as
large as it is, else stored once in the store's blob space (the CAS on the SQLite store) under its
git blob id, however many checkpoints name it.

A list is cut into chunks of a fixed number of items. Its full chunks are blobs, so a list that grows
by appending (a chat's messages) stores each of them once; its last, partial chunk, which every
append rewrites, is kept inline in the checkpoint that changed the list (up to ``TAIL_INLINE_MAX``),
and becomes a blob when checkpoints carry the list unchanged (``promote``; the saver says when).
Full chunks already stored for the same items (the same objects: LangGraph's reducers replace items,
they do not change them in place) are not serialized again.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import anyio
import msgspec

from ..cas.objects import BLOB, hash_object
from ..errors import IntegrityError
from ..turnstore.base import TurnStoreBase

__all__ = ["INLINE_MAX", "LIST_CHUNK", "BlobCache", "ChunkMemo", "Ref", "ValueCodec", "chunk_size", "refs_of"]

#: a value whose encoding is at most this many bytes stays inline: a reference costs about as much
INLINE_MAX = 64
#: items per chunk of a chunked list
LIST_CHUNK = 16
#: chunks of one list at most (see ``chunk_size``)
MAX_CHUNKS = 2048
#: a list's partial last chunk up to this many bytes stays inline while the list changes
TAIL_INLINE_MAX = 64 << 10

INLINE, BLOB_REF, CHUNKS = 0, 1, 2

Dumps = Callable[[Any], tuple[str, bytes]]
Loads = Callable[[tuple[str, bytes]], Any]


def chunk_size(items: int) -> int:
    """Items per chunk of a list of ``items``: 16, doubled as often as it takes to keep a list within
    ``MAX_CHUNKS`` chunks (a turn names at most 4,096 blobs), so a growing list changes its chunking
    only when it doubles past 32,768 items."""
    size = LIST_CHUNK
    while items > size * MAX_CHUNKS:
        size *= 2
    return size


class Ref(msgspec.Struct, array_like=True, frozen=True, omit_defaults=True):
    """How one value is stored: ``kind`` INLINE (``data`` is the encoding, ``type`` its serde type),
    BLOB_REF (``data`` is the raw 32-byte blob id; the blob holds type and encoding) or CHUNKS (a
    list: ``data`` is the raw ids of its chunk blobs, each a list, concatenated in order, and
    ``tail``, if any, the encoding of its last items, of serde type ``type``)."""

    kind: int
    type: str
    data: bytes
    tail: bytes = b""

    def oids(self) -> list[str]:
        if self.kind == INLINE:
            return []
        return [self.data[i : i + 32].hex() for i in range(0, len(self.data), 32)]


def refs_of(refs: Iterable[Ref]) -> tuple[str, ...]:
    """The blobs the references name, sorted, each once: what a turn naming them keeps alive."""
    return tuple(sorted({oid for ref in refs for oid in ref.oids()}))


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

    def forget(self, oids: Iterable[str]) -> None:
        """No longer take these blobs as stored (gc may have collected them since)."""
        for oid in oids:
            self._known.pop(oid, None)
            blob = self._data.pop(oid, None)
            if blob is not None:
                self._size -= len(blob)

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


class ChunkMemo:
    """The full chunks of the list a channel last held: their items (the objects) and blob ids."""

    __slots__ = ("chunks",)

    def __init__(self) -> None:
        self.chunks: list[tuple[tuple[Any, ...], bytes]] = []


class ValueCodec:
    """Turns values into ``Ref``s (storing what must be stored) and back, through one turn store's
    blobs and a ``serde``'s ``dumps_typed`` / ``loads_typed``."""

    def __init__(self, turns: TurnStoreBase, dumps: Dumps, loads: Loads, cache: BlobCache) -> None:
        self._turns = turns
        self._dumps = dumps
        self._loads = loads
        self._cache = cache

    # -- writing -----------------------------------------------------------------------------------

    def encode(self, value: Any, pending: dict[str, bytes], memo: ChunkMemo | None = None) -> Ref:
        """The reference for a channel's ``value``; blobs not yet known stored go into ``pending``
        (oid -> bytes), for :meth:`store` to write before anything that names them. ``memo``: the
        channel's last list, updated to this one."""
        if type(value) is list and value:
            return self._encode_list(value, pending, memo)
        return self.encode_plain(value, pending, INLINE_MAX)

    def inline(self, value: Any) -> Ref:
        """``value`` inline, whatever its size (a list whole): for a turn that names its limit of blobs."""
        return Ref(INLINE, *self._dumps(value))

    def encode_plain(self, value: Any, pending: dict[str, bytes], inline_max: int) -> Ref:
        """``value`` inline up to ``inline_max`` bytes of encoding, else a blob."""
        type_, data = self._dumps(value)
        if len(data) <= inline_max:
            return Ref(INLINE, type_, data)
        return Ref(BLOB_REF, "", self._stage(_blob(type_, data), pending))

    def _encode_list(self, value: list[Any], pending: dict[str, bytes], memo: ChunkMemo | None) -> Ref:
        size = chunk_size(len(value))
        full = len(value) // size
        known = memo.chunks if memo is not None else []
        chunks: list[tuple[tuple[Any, ...], bytes]] = []
        oids = bytearray()
        for k in range(full):
            items = tuple(value[k * size : (k + 1) * size])
            raw: bytes | None = None
            if k < len(known):
                old_items, old_raw = known[k]
                same = len(old_items) == size and all(a is b for a, b in zip(old_items, items, strict=True))
                if same and (self._cache.knows(old_raw.hex()) or old_raw.hex() in pending):
                    raw = old_raw
            if raw is None:
                type_, data = self._dumps(list(items))
                raw = self._stage(_blob(type_, data), pending)
            chunks.append((items, raw))
            oids += raw
        if memo is not None:
            memo.chunks = chunks
        rest = value[full * size :]
        if not rest:
            return Ref(CHUNKS, "", bytes(oids))
        type_, data = self._dumps(rest)
        if not oids and len(data) <= INLINE_MAX:
            return Ref(INLINE, type_, data)  # a short list: as any small value
        if len(data) <= TAIL_INLINE_MAX:
            return Ref(CHUNKS, type_, bytes(oids), data)
        return Ref(CHUNKS, "", bytes(oids) + self._stage(_blob(type_, data), pending))

    def promote(self, ref: Ref, pending: dict[str, bytes]) -> Ref:
        """``ref`` carried unchanged into another checkpoint: an inline tail longer than a reference
        becomes a blob, so from here on every checkpoint shares it."""
        if ref.kind != CHUNKS or len(ref.tail) <= INLINE_MAX:
            return ref
        return Ref(CHUNKS, "", ref.data + self._stage(_blob(ref.type, ref.tail), pending))

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

    def decode(self, ref: Ref, blobs: dict[str, bytes], memo: ChunkMemo | None = None) -> Any:
        """The value of ``ref``; its blobs must be in ``blobs`` (see :meth:`fetch`). ``memo``: the
        channel's memo, given the chunks just read (the very objects returned), so a checkpoint that
        carries this list on does not serialize its stored chunks again."""
        if ref.kind == INLINE:
            return self._loads((ref.type, ref.data))
        if ref.kind == BLOB_REF:
            oid = ref.data.hex()
            return self._loads(_unblob(oid, blobs[oid]))
        if ref.kind == CHUNKS:
            items: list[Any] = []
            chunks: list[tuple[tuple[Any, ...], bytes]] = []
            for oid in ref.oids():
                part = self._loads(_unblob(oid, blobs[oid]))
                if not isinstance(part, list):
                    raise IntegrityError(f"a chunk of a stored list holds a {type(part).__name__}, not a list")
                items.extend(part)
                chunks.append((tuple(part), bytes.fromhex(oid)))
            if ref.tail:
                tail = self._loads((ref.type, ref.tail))
                if not isinstance(tail, list):
                    raise IntegrityError(f"a chunk of a stored list holds a {type(tail).__name__}, not a list")
                items.extend(tail)
            if memo is not None:
                memo.chunks = chunks
            return items
        raise IntegrityError(f"unknown value reference kind {ref.kind}")
