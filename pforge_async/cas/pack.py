"""Git packfiles (version 2) with their ``.idx`` (version 2), in SHA-256 form.

Bulk writes go into one pack per batch instead of one file per object: a pack costs one create, one
rename and (durably) one fsync whatever the number of objects in it. We write every object whole
(no deltas); reading also applies ``OFS_DELTA``/``REF_DELTA`` entries, so a store that ``git repack``
rewrote is still readable.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
import zlib
from collections.abc import Callable, Iterable

from ..errors import IntegrityError

__all__ = ["PackIndex", "PackReader", "apply_delta", "fsync_dir", "write_all", "write_pack", "zlib_stream"]

OFS_DELTA, REF_DELTA = 6, 7
_IDX_MAGIC = b"\xfftOc"
_RAW = 32  # SHA-256


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
) -> tuple[str, list[tuple[bytes, int]]]:
    """Write ``count`` objects ``(raw oid, type, body)`` as ``pack-<hash>.pack`` + ``.idx`` in
    ``directory``. The ``.idx`` is renamed into place last, so a reader sees the pack whole or not at
    all. Returns the pack's hex name and ``(raw oid, offset)`` per object."""
    pack_tmp = os.path.join(directory, f"{temp_prefix}.pack")
    idx_tmp = os.path.join(directory, f"{temp_prefix}.idx")
    offsets: list[tuple[bytes, int, int]] = []  # raw oid, offset, crc32
    digest = hashlib.sha256()
    try:
        fd = os.open(pack_tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
        try:
            pending = [b"PACK" + struct.pack(">II", 2, count)]
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
        _write_idx(idx_tmp, offsets, trailer, fsync)
        os.rename(pack_tmp, os.path.join(directory, f"pack-{name}.pack"))
        os.rename(idx_tmp, os.path.join(directory, f"pack-{name}.idx"))
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


def _write_idx(path: str, offsets: list[tuple[bytes, int, int]], pack_hash: bytes, fsync: bool) -> None:
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


def fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PackIndex:
    """The ``(raw oid -> offset)`` table of one ``.idx`` file, loaded whole."""

    def __init__(self, path: str) -> None:
        with open(path, "rb") as f:
            data = f.read()
        if data[:4] != _IDX_MAGIC or struct.unpack(">I", data[4:8])[0] != 2:
            raise IntegrityError(f"{path} is not a version 2 pack index")
        if hashlib.sha256(data[:-_RAW]).digest() != data[-_RAW:]:
            raise IntegrityError(f"{path} fails its checksum")
        count = struct.unpack(">I", data[8 + 255 * 4 : 8 + 256 * 4])[0]
        names_at = 8 + 256 * 4
        crc_at = names_at + count * _RAW
        off_at = crc_at + count * 4
        large_at = off_at + count * 4
        offsets = struct.unpack(f">{count}I", data[off_at:large_at])
        self.path = path
        self.pack_hash = data[-2 * _RAW : -_RAW]
        self.offsets: dict[bytes, int] = {}
        for i, offset in enumerate(offsets):
            if offset & 0x80000000:
                at = large_at + (offset & 0x7FFFFFFF) * 8
                offset = struct.unpack(">Q", data[at : at + 8])[0]
            self.offsets[data[names_at + i * _RAW : names_at + (i + 1) * _RAW]] = offset

    def __len__(self) -> int:
        return len(self.offsets)


class PackReader:
    """Reads whole objects out of one pack file by offset (``mmap``, so reads need no seek state)."""

    def __init__(self, path: str) -> None:
        self.path = path
        with open(path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        if self._map[:4] != b"PACK":
            raise IntegrityError(f"{path} is not a pack file")

    def close(self) -> None:
        self._map.close()

    def read(self, offset: int, resolve_ref: Callable[[bytes], tuple[int, bytes]]) -> tuple[int, bytes]:
        """The ``(type, body)`` at ``offset``, with deltas applied."""
        m = self._map
        byte = m[offset]
        type_num = (byte >> 4) & 7
        size = byte & 0x0F
        shift = 4
        pos = offset + 1
        while byte & 0x80:
            byte = m[pos]
            pos += 1
            size |= (byte & 0x7F) << shift
            shift += 7
        if type_num == OFS_DELTA:
            byte = m[pos]
            pos += 1
            back = byte & 0x7F
            while byte & 0x80:
                byte = m[pos]
                pos += 1
                back = ((back + 1) << 7) | (byte & 0x7F)
            base_type, base = self.read(offset - back, resolve_ref)
            return base_type, apply_delta(base, self._inflate(pos, size))
        if type_num == REF_DELTA:
            base_type, base = resolve_ref(bytes(m[pos : pos + _RAW]))
            return base_type, apply_delta(base, self._inflate(pos + _RAW, size))
        return type_num, self._inflate(pos, size)

    def _inflate(self, pos: int, size: int) -> bytes:
        d = zlib.decompressobj()
        end = pos + size + (size >> 10) + 64  # above zlib's compressBound and stored-block overhead
        try:
            out = d.decompress(self._map[pos:end], size + 1)
            if not d.eof and end < len(self._map):  # an unusual encoder: read on to the end
                out += d.decompress(self._map[end:], size + 1 - len(out))
        except zlib.error as exc:
            raise IntegrityError(f"{self.path}: bad zlib data at offset {pos}: {exc}") from exc
        if len(out) != size or not d.eof:
            raise IntegrityError(f"{self.path}: object at offset {pos} does not inflate to {size} bytes")
        return out


def _varint(delta: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = delta[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def apply_delta(base: bytes, delta: bytes) -> bytes:
    """Apply a git delta (copy/insert instructions) to ``base``."""
    src_size, pos = _varint(delta, 0)
    dst_size, pos = _varint(delta, pos)
    if src_size != len(base):
        raise IntegrityError(f"delta expects a base of {src_size} bytes, got {len(base)}")
    out = bytearray()
    n = len(delta)
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
            out += base[offset : offset + (size or 0x10000)]
        elif op:
            out += delta[pos : pos + op]
            pos += op
        else:
            raise IntegrityError("delta has a zero opcode")
    if len(out) != dst_size:
        raise IntegrityError(f"delta produced {len(out)} bytes, want {dst_size}")
    return bytes(out)
