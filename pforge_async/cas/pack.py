"""Git packfiles (version 2) with their ``.idx`` (version 2), in SHA-256 form.

Bulk writes go into one pack per batch instead of one file per object: a pack costs one create, one
rename and (durably) one fsync whatever the number of objects in it. We write every object whole
(no deltas); reading also applies ``OFS_DELTA``/``REF_DELTA`` entries, so a store that ``git repack``
rewrote is still readable.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import mmap
import os
import struct
import zlib
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from typing import NamedTuple

from ..errors import IntegrityError, PforgeError
from .objects import TYPE_NAMES, object_header

__all__ = [
    "PackEntry",
    "PackIndex",
    "PackReader",
    "PackScan",
    "apply_delta",
    "fsync_dir",
    "read_mtimes",
    "write_all",
    "write_idx",
    "write_mtimes",
    "write_pack",
    "zlib_stream",
]

OFS_DELTA, REF_DELTA = 6, 7
_ENTRY_TYPES = (*TYPE_NAMES, OFS_DELTA, REF_DELTA)
_IDX_MAGIC = b"\xfftOc"
_RAW = 32  # SHA-256
_PACK_HEADER = 12  # "PACK", version, object count
#: git's own bound on a delta chain (pack.depth may not exceed it).
_MAX_DELTA_DEPTH = 4095


def zlib_stream(data: bytes, level: int) -> list[bytes]:
    """Compress ``data`` as one zlib stream. Level 0 writes stored blocks by hand, which costs a copy
    less than ``zlib.compress(data, 0)``; git reads both."""
    if level:
        return [zlib.compress(data, level)]
    parts = [b"\x78\x01"]
    n = len(data)
    if n == 0:
        parts.append(b"\x01\x00\x00\xff\xff")
    view = memoryview(data)
    for start in range(0, n, 0xFFFF):
        block = view[start : start + 0xFFFF]
        size = len(block)
        final = 1 if start + size >= n else 0
        parts.append(struct.pack("<BHH", final, size, size ^ 0xFFFF))
        parts.append(block.tobytes() if size != n else data)
    parts.append(zlib.adler32(data).to_bytes(4, "big"))
    return parts


def entry_header(type_num: int, size: int) -> bytes:
    byte = (type_num << 4) | (size & 0x0F)
    size >>= 4
    out = bytearray()
    while size:
        out.append(byte | 0x80)
        byte = size & 0x7F
        size >>= 7
    out.append(byte)
    return bytes(out)


def write_pack(
    directory: str,
    objects: Iterable[tuple[bytes, int, bytes]],
    count: int,
    *,
    level: int,
    fsync: bool,
    temp_prefix: str,
    publish: Callable[[str], AbstractContextManager[object]] | None = None,
    before_publish: Callable[[str, str], bool] | None = None,
    version: int = 2,
) -> tuple[str, list[tuple[bytes, int]]]:
    """Write ``count`` objects ``(raw oid, type, body)`` as ``pack-<hash>.pack`` + ``.idx`` in
    ``directory``. The ``.idx`` is renamed into place last, so a reader sees the pack whole or not at
    all. Returns the pack's hex name and ``(raw oid, offset)`` per object.

    ``publish(name)`` is held around the two renames (gc's gate: a collection never decides while a
    pack is half published, and no retired name is reused while gc deletes it). ``before_publish(name,
    pack_temp_path)`` runs first (a cruft pack's ``.mtimes``) and may say not to publish at all (the
    temp files are removed). gc writes ``version`` 3, which git reads as it reads 2: its packs then
    never share a name (the checksum) with a writer's."""
    pack_tmp = os.path.join(directory, f"{temp_prefix}.pack")
    idx_tmp = os.path.join(directory, f"{temp_prefix}.idx")
    offsets: list[tuple[bytes, int, int]] = []  # raw oid, offset, crc32
    digest = hashlib.sha256()
    try:
        fd = os.open(pack_tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
        try:
            pending = [b"PACK" + struct.pack(">II", version, count)]
            position = len(pending[0])
            crc32, adler32, block_header = zlib.crc32, zlib.adler32, struct.Struct("<BHH").pack
            for raw, type_num, body in objects:
                n = len(body)
                if level == 0 and n < 0xFFFF:  # the common case: one stored block
                    entry = b"".join(
                        (
                            entry_header(type_num, n),
                            b"\x78\x01",
                            block_header(1, n, n ^ 0xFFFF),
                            body,
                            adler32(body).to_bytes(4, "big"),
                        )
                    )
                else:
                    entry = b"".join((entry_header(type_num, n), *zlib_stream(body, level)))
                offsets.append((raw, position, crc32(entry)))
                position += len(entry)
                pending.append(entry)
                if len(pending) >= 512:
                    chunk = b"".join(pending)
                    digest.update(chunk)
                    write_all(fd, chunk)
                    pending = []
            if len(offsets) != count:
                raise RuntimeError(f"pack promised {count} objects, got {len(offsets)}")
            chunk = b"".join(pending)
            digest.update(chunk)
            trailer = digest.digest()
            write_all(fd, chunk + trailer)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        name = trailer.hex()
        write_idx(idx_tmp, offsets, trailer, fsync)
        if before_publish is None or before_publish(name, pack_tmp):
            with publish(name) if publish is not None else contextlib.nullcontext():
                os.rename(pack_tmp, os.path.join(directory, f"pack-{name}.pack"))
                os.rename(idx_tmp, os.path.join(directory, f"pack-{name}.idx"))
        else:
            for leftover in (pack_tmp, idx_tmp):
                os.unlink(leftover)
    except BaseException:
        for leftover in (pack_tmp, idx_tmp):
            try:
                os.unlink(leftover)
            except FileNotFoundError:
                pass
        raise
    if fsync:
        fsync_dir(directory)
    return name, [(raw, offset) for raw, offset, _ in offsets]


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def write_idx(path: str, offsets: Iterable[tuple[bytes, int, int]], pack_hash: bytes, fsync: bool) -> None:
    """Write the ``.idx`` of ``(raw oid, offset, crc32)`` entries of the pack whose checksum is ``pack_hash``."""
    entries = sorted(offsets)
    fanout = [0] * 256
    for raw, _, _ in entries:
        fanout[raw[0]] += 1
    total = 0
    for i in range(256):
        total += fanout[i]
        fanout[i] = total
    large: list[int] = []
    small = []
    for _, offset, _ in entries:
        if offset < 0x80000000:
            small.append(offset)
        else:
            small.append(0x80000000 | len(large))
            large.append(offset)
    body = b"".join(
        [
            _IDX_MAGIC,
            struct.pack(">I", 2),
            struct.pack(">256I", *fanout),
            b"".join(raw for raw, _, _ in entries),
            struct.pack(f">{len(entries)}I", *(crc for _, _, crc in entries)),
            struct.pack(f">{len(small)}I", *small),
            struct.pack(f">{len(large)}Q", *large),
            pack_hash,
        ]
    )
    with open(path, "xb", buffering=0) as f:
        f.write(body + hashlib.sha256(body).digest())
        if fsync:
            os.fsync(f.fileno())


_MTIMES_MAGIC = b"MTME"


def write_mtimes(path: str, mtimes: Sequence[int], pack_hash: bytes, fsync: bool) -> None:
    """Write git's ``.mtimes`` of a cruft pack: one 32-bit mtime per object, in index (sorted id) order."""
    body = b"".join([_MTIMES_MAGIC, struct.pack(">II", 1, 2), struct.pack(f">{len(mtimes)}I", *mtimes), pack_hash])
    with open(path, "xb", buffering=0) as f:
        f.write(body + hashlib.sha256(body).digest())
        if fsync:
            os.fsync(f.fileno())


def read_mtimes(path: str, count: int, pack_hash: bytes) -> list[int] | None:
    """The mtimes of a cruft pack's ``.mtimes`` (index order), or None if it is missing, damaged or
    another pack's: its objects then count as old as the pack file's mtime, never older."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    size = 12 + 4 * count + 2 * _RAW
    if (
        len(data) != size
        or data[:4] != _MTIMES_MAGIC
        or data[4:12] != struct.pack(">II", 1, 2)
        or data[-2 * _RAW : -_RAW] != pack_hash
        or hashlib.sha256(data[:-_RAW]).digest() != data[-_RAW:]
    ):
        return None
    return list(struct.unpack(f">{count}I", data[12 : 12 + 4 * count]))


def fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PackIndex:
    """The ``(raw oid -> offset)`` table of one ``.idx`` file, loaded whole and checked: its own
    checksum, its layout, and (given the pack) that it belongs to that pack and points inside it."""

    def __init__(self, path: str, pack: PackReader | None = None) -> None:
        with open(path, "rb") as f:
            data = f.read()
        self.path = path
        try:
            self._parse(data, pack)
        except (struct.error, IndexError, ValueError) as exc:
            raise IntegrityError(f"pack index {path} is malformed: {exc}") from exc

    def _parse(self, data: bytes, pack: PackReader | None) -> None:
        path = self.path
        if len(data) < 8 + 256 * 4 + 2 * _RAW or data[:4] != _IDX_MAGIC or struct.unpack(">I", data[4:8])[0] != 2:
            raise IntegrityError(f"pack index {path} is not a version 2 pack index")
        if hashlib.sha256(data[:-_RAW]).digest() != data[-_RAW:]:
            raise IntegrityError(f"pack index {path} fails its checksum")
        fanout = struct.unpack(">256I", data[8 : 8 + 256 * 4])
        count = fanout[255]
        if any(a > b for a, b in itertools.pairwise(fanout)):
            raise IntegrityError(f"pack index {path} has a fanout table that goes down")
        names_at = 8 + 256 * 4
        crc_at = names_at + count * _RAW
        off_at = crc_at + count * 4
        large_at = off_at + count * 4
        offsets = struct.unpack(f">{count}I", data[off_at:large_at])
        n_large = sum(1 for offset in offsets if offset & 0x80000000)
        if len(data) != large_at + 8 * n_large + 2 * _RAW:
            raise IntegrityError(f"pack index {path} has {len(data)} bytes, its table of {count} objects wants more")
        self.pack_hash = data[-2 * _RAW : -_RAW]
        self.offsets: dict[bytes, int] = {}
        limit = len(pack) - _RAW if pack is not None else None
        for i, offset in enumerate(offsets):
            if offset & 0x80000000:
                at = large_at + (offset & 0x7FFFFFFF) * 8
                offset = struct.unpack(">Q", data[at : at + 8])[0]
            if offset < _PACK_HEADER or (limit is not None and offset >= limit):
                raise IntegrityError(f"pack index {path} points outside its pack (offset {offset})")
            self.offsets[data[names_at + i * _RAW : names_at + (i + 1) * _RAW]] = offset
        if pack is not None and pack.trailer != self.pack_hash:
            raise IntegrityError(f"pack index {path} does not belong to its pack (the pack checksums differ)")

    def __len__(self) -> int:
        return len(self.offsets)

    @staticmethod
    def listed(path: str) -> set[bytes]:
        """The object ids a damaged index still lists, as far as its layout can be read (none if it
        cannot): what the pack held, so a read of one that cannot be recovered says so."""
        try:
            with open(path, "rb") as f:
                data = f.read()
            count = struct.unpack(">I", data[8 + 255 * 4 : 8 + 256 * 4])[0]
        except (OSError, struct.error):
            return set()
        names_at = 8 + 256 * 4
        if data[:4] != _IDX_MAGIC or names_at + count * _RAW > len(data):
            return set()
        return {data[names_at + i * _RAW : names_at + (i + 1) * _RAW] for i in range(count)}


class PackEntry(NamedTuple):
    """One entry a scan of a pack found: the object's raw id, its offset, and the CRC-32 of its bytes."""

    raw: bytes
    offset: int
    crc32: int


class PackScan(NamedTuple):
    """What :meth:`PackReader.scan` recovered, and what is wrong with the pack (empty: nothing)."""

    entries: list[PackEntry]
    problems: list[str]


class PackReader:
    """Reads whole objects out of one pack file by offset (``mmap``, so reads need no seek state).

    Every offset, size and type read from the pack is checked before it is used: a damaged pack
    raises ``IntegrityError`` naming it, never another exception, and never reads outside its entry
    data. The header and trailer are not required to be sound to read (reads re-hash every object);
    :attr:`problems` says what is wrong with them.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            size = st.st_size
            #: which file this is: gc's journal names retired packs by name and inode.
            self.ino = st.st_ino
            if size < _PACK_HEADER + _RAW:
                raise IntegrityError(f"pack {path} is too short to be a pack ({size} bytes)")
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._limit = len(self._map) - _RAW  # entry data ends where the trailer starts
        self.trailer = bytes(self._map[-_RAW:])
        self.problems: list[str] = []
        #: a cruft pack (gc's, with a ``.mtimes``): its objects are freshened one by one, never by
        #: touching it (which would make every object in it young).
        self.cruft = os.path.exists(path[:-5] + ".mtimes")
        version, self.count = struct.unpack(">II", self._map[4:12])
        if self._map[:4] != b"PACK" or version not in (2, 3):
            self.problems.append(f"pack {path} has a damaged header")

    def __len__(self) -> int:
        return len(self._map)

    def close(self) -> None:
        self._map.close()

    def _byte(self, pos: int) -> int:
        if not _PACK_HEADER <= pos < self._limit:
            raise IntegrityError(f"pack {self.path}: entry runs past its data (at byte {pos})")
        return self._map[pos]

    def _entry_header(self, offset: int) -> tuple[int, int, int, int]:
        """``(type, size, data position, delta base offset or 0)`` of the entry at ``offset``."""
        byte = self._byte(offset)
        type_num = (byte >> 4) & 7
        size = byte & 0x0F
        shift = 4
        pos = offset + 1
        while byte & 0x80:
            if shift > 60:
                raise IntegrityError(f"pack {self.path}: entry at {offset} has a size beyond 2**64")
            byte = self._byte(pos)
            pos += 1
            size |= (byte & 0x7F) << shift
            shift += 7
        if type_num not in _ENTRY_TYPES:
            raise IntegrityError(f"pack {self.path}: entry at {offset} has type {type_num}, which no object has")
        base = 0
        if type_num == OFS_DELTA:
            byte = self._byte(pos)
            pos += 1
            back = byte & 0x7F
            while byte & 0x80:
                if back > self._limit:
                    break
                byte = self._byte(pos)
                pos += 1
                back = ((back + 1) << 7) | (byte & 0x7F)
            base = offset - back
            if not _PACK_HEADER <= base < offset:
                raise IntegrityError(f"pack {self.path}: delta at {offset} names a base outside the pack")
        return type_num, size, pos, base

    def entry_type(self, offset: int) -> int:
        """The type of the entry at ``offset`` as its header says (a delta's is OFS_DELTA/REF_DELTA)."""
        return self._entry_header(offset)[0]

    def read(self, offset: int, resolve_ref: Callable[[bytes], tuple[int, bytes]]) -> tuple[int, bytes]:
        """The ``(type, body)`` at ``offset``, with deltas applied."""
        deltas: list[tuple[int, int]] = []  # (data position, size), outermost first
        while True:
            if len(deltas) > _MAX_DELTA_DEPTH:
                raise IntegrityError(f"pack {self.path}: delta chain at {offset} is longer than {_MAX_DELTA_DEPTH}")
            type_num, size, pos, base_offset = self._entry_header(offset)
            if type_num == OFS_DELTA:
                deltas.append((pos, size))
                offset = base_offset
                continue
            if type_num == REF_DELTA:
                if pos + _RAW > self._limit:
                    raise IntegrityError(f"pack {self.path}: delta at {offset} runs past its data")
                base_type, body = resolve_ref(bytes(self._map[pos : pos + _RAW]))
                deltas.append((pos + _RAW, size))
                break
            base_type, body = type_num, self._inflate(pos, size)
            break
        for pos, size in reversed(deltas):
            body = apply_delta(body, self._inflate(pos, size))
        return base_type, body

    def _inflate(self, pos: int, size: int) -> bytes:
        return self._inflate_at(pos, size)[0]

    def _inflate_at(self, pos: int, size: int) -> tuple[bytes, int]:
        """The ``size`` bytes of the zlib stream at ``pos``, and where the stream ends."""
        limit = self._limit
        if not _PACK_HEADER <= pos < limit:
            raise IntegrityError(f"pack {self.path}: entry data at {pos} is outside the pack")
        d = zlib.decompressobj()
        # First read: above zlib's compressBound and the stored-block overhead, so one is enough.
        end = min(pos + size + (size >> 10) + 64, limit)
        try:
            out = d.decompress(self._map[pos:end], size + 1)
            while not d.eof and len(out) <= size and end < limit:  # an unusual encoder: read on
                more = min(end + max(size, 1 << 16), limit)
                out += d.decompress(self._map[end:more], size + 1 - len(out))
                end = more
        except zlib.error as exc:
            raise IntegrityError(f"pack {self.path}: bad zlib data at offset {pos}: {exc}") from exc
        if len(out) != size or not d.eof:
            raise IntegrityError(f"pack {self.path}: object at offset {pos} does not inflate to {size} bytes")
        return out, end - len(d.unused_data)

    def checksum_ok(self) -> bool:
        """Whether the trailer is the SHA-256 of everything before it (reads the whole pack)."""
        digest = hashlib.sha256()
        for start in range(0, self._limit, 1 << 24):
            digest.update(self._map[start : min(start + (1 << 24), self._limit)])
        return digest.digest() == self.trailer

    def scan(self, resolve_ref: Callable[[bytes], tuple[int, bytes]]) -> PackScan:
        """Walk the pack's entries from the start and re-hash each object: what an index is rebuilt
        from. Stops at the first entry that cannot be walked (what follows it cannot be found)."""
        entries: list[PackEntry] = []
        problems = list(self.problems)
        pos = _PACK_HEADER
        expected = self.count if not self.problems else None
        while pos < self._limit and (expected is None or len(entries) < expected):
            try:
                type_num, size, data_at, _ = self._entry_header(pos)
                if type_num == REF_DELTA:
                    data_at += _RAW
                body, end = self._inflate_at(data_at, size)
                base_type = type_num
                if type_num in (OFS_DELTA, REF_DELTA):
                    base_type, body = self.read(pos, resolve_ref)
            except PforgeError as exc:
                problems.append(f"pack {self.path}: cannot walk past byte {pos}: {exc}")
                return PackScan(entries, problems)
            raw = hashlib.sha256(object_header(base_type, len(body)) + body).digest()
            entries.append(PackEntry(raw, pos, zlib.crc32(self._map[pos:end])))
            pos = end
        if expected is not None and len(entries) < expected:
            problems.append(f"pack {self.path} holds {len(entries)} objects, its header says {expected}")
        elif pos != self._limit:
            problems.append(f"pack {self.path} has {self._limit - pos} bytes past its last object")
        if not self.checksum_ok():
            problems.append(f"pack {self.path} fails its checksum")
        return PackScan(entries, problems)


def _varint(delta: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if shift > 63:
            raise IntegrityError("delta size is beyond 2**64")
        byte = delta[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def apply_delta(base: bytes, delta: bytes) -> bytes:
    """Apply a git delta (copy/insert instructions) to ``base``."""
    try:
        src_size, pos = _varint(delta, 0)
        dst_size, pos = _varint(delta, pos)
    except IndexError as exc:
        raise IntegrityError("delta header is cut short") from exc
    if src_size != len(base):
        raise IntegrityError(f"delta expects a base of {src_size} bytes, got {len(base)}")
    out = bytearray()
    n = len(delta)
    try:
        while pos < n:
            op = delta[pos]
            pos += 1
            if op & 0x80:
                offset = size = 0
                for i in range(4):
                    if op & (1 << i):
                        offset |= delta[pos] << (8 * i)
                        pos += 1
                for i in range(3):
                    if op & (0x10 << i):
                        size |= delta[pos] << (8 * i)
                        pos += 1
                size = size or 0x10000
                if offset + size > len(base):
                    raise IntegrityError(f"delta copies bytes {offset}..{offset + size} of a {len(base)}-byte base")
                out += base[offset : offset + size]
            elif op:
                if pos + op > n:
                    raise IntegrityError("delta inserts past its own end")
                out += delta[pos : pos + op]
                pos += op
            else:
                raise IntegrityError("delta has a zero opcode")
            if len(out) > dst_size:
                raise IntegrityError(f"delta produces more than the {dst_size} bytes it promises")
    except IndexError as exc:
        raise IntegrityError("delta instruction is cut short") from exc
    if len(out) != dst_size:
        raise IntegrityError(f"delta produced {len(out)} bytes, want {dst_size}")
    return bytes(out)
