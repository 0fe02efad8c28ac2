"""``FsTurnStore``: the turn store as one append-only log file, for local parity and offline inspection.

The file starts with a magic line; then each record is a frame::

    <u32 record length | 1<<31><u32 crc32 of the record><u32 index length><u32 crc32 of those 12 bytes>
    <u32 n><index: n bytes of msgpack><u32 crc32 of those n + 4 bytes>
    <msgpack record>

The index says what the record changes (turn ids with their contexts and keys, contexts, names,
creation keys, bundles), under a checksum of its own and self-delimiting, so a record that cannot be
trusted still says which ids not to trust. Logs written before sessions hold frames without an index
(``<u32 length><u32 crc32 of the record><u32 crc32 of those 8 bytes><record>``, the top bit of the
length clear); they are read as they are and appended to with indexed frames. Appends never rewrite
earlier bytes. One write command is one record, so one frame: an ``append_turns`` batch or a fork
with its key is on disk whole or not at all. At open the log is replayed into memory:

- A frame cut short at the very end (a torn write, or the zeros a crash can leave past it), or a last
  frame whose record fails its checksum, is truncated away: its write was never acknowledged as
  durable (with ``durability="full"`` an acknowledged write was fsynced whole; a flipped byte in the
  very last frame is therefore taken for a torn write).
- Damage anywhere before the end stays local. What a damaged record changed (read from its index, or
  from the record itself in an unindexed frame) is marked damaged: reads of those turns and contexts,
  retries of their keys, and writes that would build on them raise ``IntegrityError`` naming the turn
  log offset; ``list_contexts`` leaves damaged contexts out. A sound turn whose parent is damaged
  still reads by id, and a walk through the parent stops there with ``IntegrityError``. A context
  whose head is a damaged turn reads again once ``set_head`` moves it. Bytes that cannot be read at
  all are skipped up to the next sound frame, and new ids skip past anything they might have held.
  A change lost this way may leave a context's ``updated_at_ms`` behind what it was. ``check()``
  lists every damaged frame and id. The log is not rewritten: the damage is reported at every open.
- Headers have checksums of their own, so a damaged length is never mistaken for a torn tail; a
  damaged magic line before a sound first frame is reported, not fatal.

Writes go through an actor, so concurrent appends are group-committed: one write and one fsync per
batch. One process at a time may open a directory (a file lock says so).

``gc`` reclaims the turns no live context reaches (as the SQLite backend does) and then compacts the
log: the state as it is now (id marks, turns, bundles, blobs, live contexts; see
``TurnCore.compacted``) is written to ``turns.log.compact``, fsynced, and renamed over ``turns.log``
(then the directory is fsynced), so erased payloads and deleted contexts are in no file any more. A
crash leaves the old log or the new one, never half of one: a leftover ``turns.log.compact`` is
removed at the next open. It runs as one command of the actor, between batches: writers wait for it
(the rewrite costs the size of the live state), readers do not. A log that holds damage is not
rewritten (``gc`` raises ``IntegrityError``): what the damage lost stays reported at every open.
"""

from __future__ import annotations

import logging
import os
import stat
import struct
import zlib
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Annotated, Any

import anyio
import msgspec

from ..actor import Actor, Failed
from ..cas.pack import fsync_dir
from ..clock import now_ms
from ..errors import ActorClosed, IntegrityError, InvalidInput, LockTimeout, PforgeError, StorageError
from ..fslock import FsLock
from .base import TreeSource
from .commands import TurnCommand
from .core import BatchRec, Index, KeptTurnsRec, Record, TurnCore, TurnRec, index_of
from .incore import InCoreStore
from .rules import DEFAULT_MAX_PAYLOAD, MAX_ID

__all__ = ["COMPACT_NAME", "CompactLog", "FsTurnStore", "replay"]

MAGIC = b"pforge-turns v1\n"
#: where a compaction writes the new log before it renames it over the old one
COMPACT_NAME = "turns.log.compact"
#: a frame without an index (what logs held before sessions): size, record crc, crc of those 8 bytes
_FRAME = struct.Struct("<III")
#: an indexed frame: size | _INDEXED, record crc, index part size, crc of those 12 bytes
_FRAME2 = struct.Struct("<IIII")
_INDEXED = 1 << 31
#: the longest record a frame can hold: its length is the header's low 31 bits
_MAX_RECORD = _INDEXED - 1
_U32 = struct.Struct("<I")
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Record)
_index_decoder = msgspec.msgpack.Decoder(Index)
log = logging.getLogger(__name__)


def replay(path: Path, core: TurnCore) -> int:
    """Load every record into ``core``; truncate a torn tail. Returns the log's good length."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return 0
    except OSError as exc:
        raise StorageError(f"cannot read turn log {path}: {exc.strerror}") from exc
    if not data:
        return 0
    if not data.startswith(MAGIC):
        if MAGIC.startswith(data):
            _truncate(path, 0, len(data))  # torn while the magic itself was written
            return 0
        differing = sum(a != b for a, b in zip(data[: len(MAGIC)], MAGIC, strict=False))
        if len(data) < len(MAGIC) or differing > 2 or _next_frame(data, len(MAGIC)) != len(MAGIC):
            raise IntegrityError(f"{path} is not a pforge turn log")
        # A damaged magic line before a sound first frame: the log is ours, say so and read on.
        log.error("turn log %s: the magic line is damaged", path)
        core.problems.append(f"turn log {path}: the magic line at byte 0 is damaged")
    pos = len(MAGIC)
    end = len(data)
    while pos < end:
        if pos + _FRAME.size > end:
            break  # torn header
        size, crc, header_crc = _FRAME.unpack_from(data, pos)
        where = f"turn log {path} at byte {pos}"
        indexed = False
        if size & _INDEXED and pos + _FRAME2.size > end:
            break  # torn header
        if zlib.crc32(data[pos : pos + 8]) == header_crc:
            start = pos + _FRAME.size  # a frame written before records carried their index
        elif size & _INDEXED and pos + _FRAME2.size <= end and _header_sound(data, pos):
            indexed = True
            size, crc, index_size, _ = _FRAME2.unpack_from(data, pos)
            size &= ~_INDEXED
            start = pos + _FRAME2.size + index_size
        else:
            if not data[pos:].strip(b"\0"):
                break  # zeros past the last write: a torn tail
            # The header is damaged, so the frame's length is unknown; an indexed frame still says
            # what it changed, right after its header.
            index = _read_index(data, pos + _FRAME2.size, end)
            resume = _next_frame(data, index[1] if index else pos + 1)
            log.error("%s: damaged frame header; %d bytes skipped", where, resume - pos)
            if index is not None:
                core.problems.append(
                    f"{where}: the frame header is damaged (what its record changed is marked damaged)"
                )
                core.damage_index(index[0], where)
            else:
                core.lost(where + " (damaged frame header)", resume - pos)
            pos = resume
            continue
        body_end = start + size
        if body_end > end:
            break  # torn body
        body = data[start:body_end]
        sound = zlib.crc32(body) == crc
        if not sound and body_end == end:
            break  # the last frame, half on disk when the writer died
        if indexed and sound and _read_index(data, pos + _FRAME2.size, start) is None:
            core.problems.append(f"{where}: the record's index is damaged (the record itself is sound)")
        if not sound and indexed:
            index = _read_index(data, pos + _FRAME2.size, start)
            log.error("%s: record fails its checksum; what its index names is marked damaged", where)
            if index is not None:
                core.problems.append(f"{where}: the record fails its checksum (what it changed is marked damaged)")
                core.damage_index(index[0], where)
            else:
                core.lost(where + " (record and index damaged)", body_end - pos)
            pos = body_end
            continue
        try:
            record = _decoder.decode(body)
        except msgspec.DecodeError:
            log.error("%s: undecodable record of %d bytes", where, size)
            core.lost(where + (" (undecodable record)" if sound else " (checksum mismatch, undecodable)"), size)
            pos = body_end
            continue
        if sound:
            core.load(record)
        elif _ids_in_range(record):
            # A frame without an index: its record, decoded despite the damage, names what it changed.
            log.error("%s: record fails its checksum; the ids it names are marked damaged", where)
            core.problems.append(f"{where}: the record fails its checksum (what it names is marked damaged)")
            core.load_damaged(record, where)
        else:
            core.lost(where + " (checksum mismatch, ids out of range)", size)
        pos = body_end
    if pos < end:
        _truncate(path, pos, end - pos)
    return pos


def _header_sound(data: bytes, pos: int) -> bool:
    return bool(zlib.crc32(data[pos : pos + 12]) == _FRAME2.unpack_from(data, pos)[3])


def _read_index(data: bytes, start: int, limit: int) -> tuple[Index, int] | None:
    """The index at ``start`` and where it ends, if it is whole before ``limit`` and sound."""
    if start + 8 > limit:
        return None
    (size,) = _U32.unpack_from(data, start)
    end = start + 4 + size + 4
    if end > limit or zlib.crc32(data[start : start + 4 + size]) != _U32.unpack_from(data, end - 4)[0]:
        return None
    try:
        return _index_decoder.decode(data[start + 4 : end - 4]), end
    except msgspec.DecodeError:
        return None


def _next_frame(data: bytes, start: int) -> int:
    """The offset of the next sound frame (header and record checksums both right), or the end."""
    end = len(data)
    for pos in range(start, end - _FRAME.size + 1):
        size, crc, header_crc = _FRAME.unpack_from(data, pos)
        if zlib.crc32(data[pos : pos + 8]) == header_crc:
            body_start = pos + _FRAME.size
        elif size & _INDEXED and pos + _FRAME2.size <= end and _header_sound(data, pos):
            size, crc, index_size, _ = _FRAME2.unpack_from(data, pos)
            size &= ~_INDEXED
            body_start = pos + _FRAME2.size + index_size
        else:
            continue
        if body_start + size <= end and zlib.crc32(data[body_start : body_start + size]) == crc:
            return pos
    return end


def _ids_in_range(record: Record) -> bool:
    """Whether the turn ids a damaged record names could be real (else it holds nothing to keep)."""
    if isinstance(record, TurnRec):
        records = [record.record]
    elif isinstance(record, (BatchRec, KeptTurnsRec)):
        records = record.records
    else:
        return True
    return all(0 < r.turn_id <= MAX_ID and 0 < r.context_id <= MAX_ID for r in records)


def _truncate(path: Path, size: int, dropped: int) -> None:
    log.warning("truncating a torn tail of %d bytes from %s", dropped, path)
    try:
        with open(path, "r+b") as f:
            f.truncate(size)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise StorageError(f"cannot truncate the torn tail of {path}: {exc.strerror}") from exc


def frame(record: Record) -> bytes:
    """An indexed frame: header, the record's index (self-delimiting, with its own checksum), record.
    ``InvalidInput`` for a record longer than a frame's 31-bit length can say (it would be written
    with a wrong length: that frame and every later one unreadable at the next open)."""
    body = _encoder.encode(record)
    if len(body) > _MAX_RECORD:
        raise InvalidInput(
            f"a write of {len(body)} encoded bytes is over the turn log's maximum of {_MAX_RECORD} per write"
        )
    index = _encoder.encode(index_of(record))
    index_part = _U32.pack(len(index)) + index
    index_part += _U32.pack(zlib.crc32(index_part))
    head = struct.pack("<III", len(body) | _INDEXED, zlib.crc32(body), len(index_part))
    return head + _U32.pack(zlib.crc32(head)) + index_part + body


class CompactLog(msgspec.Struct, frozen=True, tag="compact_log"):
    """Reclaim the unreachable turns created more than ``grace_ms`` ago, then rewrite the log. The
    reply is ``(turns, payload bytes, log bytes before, after, True)``."""

    grace_ms: Annotated[int, msgspec.Meta(ge=0, le=10**12)]


LogCommand = TurnCommand | CompactLog


class _LogWriteFailed(RuntimeError):
    """A log write failed after its batch was loaded into memory: memory holds what the log may
    not, so the actor dies (its callers get ``ActorClosed`` naming this; reads are refused) and the
    next open replays the log, truncating a torn last frame."""


#: bytes of frames a compaction buffers before it writes them out
_COMPACT_CHUNK = 1 << 20


class _LogActor(Actor[LogCommand]):
    command_type = LogCommand
    name = "fs-turn-log"

    def __init__(self, core: TurnCore, fd: int, fsync: bool, path: Path) -> None:
        super().__init__(mailbox_size=256, max_batch=256)
        self.core = core
        self.fd = fd
        self.fsync = fsync
        self.path = path
        self._limiter = anyio.CapacityLimiter(1)
        #: the log's size right after this actor's last rewrite (-1: none yet)
        self._compacted_size = -1

    async def handle_batch(self, commands: Sequence[LogCommand]) -> list[Any]:
        outcomes: list[Any] = []
        frames: list[bytes] = []
        core = self.core
        for command in commands:
            if isinstance(command, CompactLog):
                # What the batch decided so far goes to the old log first: the new one is written
                # from memory, and the frames after this command go to the new one.
                if frames:
                    await self._flush(frames, recover=False)  # later ones may be on disk: no undo
                    frames = []
                try:
                    outcomes.append(await self._compact(command.grace_ms))
                except PforgeError as exc:
                    outcomes.append(Failed(exc))
                continue
            try:
                result, record = core.decide(command)
                if record is not None:
                    # Framed first: a record too long for a frame fails its caller, loaded nowhere.
                    # Loaded before it is on disk, so later commands of this batch see it; nobody is
                    # answered before the write below, and a failed write kills the actor (the log on
                    # disk stays the truth, replayed at the next open; see _flush).
                    frames.append(frame(record))
                    core.load(record)
                outcomes.append(core.finish(result))
            except PforgeError as exc:
                outcomes.append(Failed(exc))
        if frames:
            await self._flush(frames, recover=not any(isinstance(c, CompactLog) for c in commands))
        return outcomes

    async def _flush(self, frames: list[bytes], *, recover: bool) -> None:
        """Write a batch's frames. They are in memory already, so a failed write must not leave
        the actor serving that memory (it would build on turns never written, after a torn frame
        later frames would bury). With ``recover`` (nothing of the batch was written before), the
        log is cut back to where the batch began and memory rebuilt from it: the batch fails with
        ``StorageError`` and the store serves on (a full disk freed later takes writes again).
        Otherwise, or if that fails too, the actor dies and the next open replays the log."""
        size = os.fstat(self.fd).st_size if recover else -1
        try:
            await anyio.to_thread.run_sync(self._write, b"".join(frames), limiter=self._limiter)
        except StorageError as exc:
            if not recover:
                raise _LogWriteFailed(str(exc)) from exc
            try:
                self.core = await anyio.to_thread.run_sync(self._undo, size, limiter=self._limiter)
            except (OSError, PforgeError) as undo:
                raise _LogWriteFailed(f"{exc}; then the log could not be cut back: {undo}") from exc
            raise

    def _undo(self, size: int) -> TurnCore:
        """The log cut back to ``size`` bytes (synced) and a core replayed from it alone."""
        os.ftruncate(self.fd, size)
        if self.fsync:
            os.fsync(self.fd)
        core = TurnCore(self.core.clock)
        replay(self.path, core)
        return core

    def _write(self, data: bytes) -> None:
        try:
            _write_all(self.fd, data)
            if self.fsync:
                os.fsync(self.fd)
        except OSError as exc:
            raise StorageError(f"cannot append to the turn log: {exc.strerror}") from exc

    async def _compact(self, grace_ms: int) -> tuple[int, int, int, int, bool]:
        """Reclaim, then rewrite the log from memory. Runs inside the actor, so no write lands
        meanwhile; readers keep reading memory, which changes only once the new log is in place."""
        core = self.core
        if core.damaged:
            raise IntegrityError(
                f"turn log {self.path} holds damage (see check()): gc does not rewrite it, so the damage stays reported"
            )
        doomed = await anyio.to_thread.run_sync(core.collectable, core.clock() - grace_ms, limiter=self._limiter)
        before = os.fstat(self.fd).st_size
        if not doomed and before == self._compacted_size:
            return 0, 0, before, before, True  # nothing logged since the last rewrite: it is compact
        fd = await anyio.to_thread.run_sync(self._rewrite, set(doomed), limiter=self._limiter)
        old, self.fd = self.fd, fd
        os.close(old)
        payload = core.reclaim(doomed)
        self._compacted_size = os.fstat(fd).st_size
        return len(doomed), payload, before, self._compacted_size, True

    def _rewrite(self, leave_out: set[int]) -> int:
        """Write the compacted log beside the old one, sync it, rename it over the old one, sync the
        directory; the descriptor to append to it from then on. Opened for appending before the
        rename, so once the rename is done nothing can keep the writer on the old file."""
        tmp = self.path.with_name(COMPACT_NAME)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StorageError(f"cannot create {tmp} to compact the turn log: {exc.strerror}") from exc
        try:
            pending = [MAGIC]
            size = len(MAGIC)
            for record in self.core.compacted(leave_out, max_bytes=_MAX_RECORD // 4):
                data = frame(record)
                pending.append(data)
                size += len(data)
                if size >= _COMPACT_CHUNK:
                    _write_all(fd, b"".join(pending))
                    pending, size = [], 0
            _write_all(fd, b"".join(pending))
            os.fsync(fd)
            os.rename(tmp, self.path)
        except BaseException as exc:
            os.close(fd)
            try:
                os.unlink(tmp)
            except OSError:
                pass
            if isinstance(exc, OSError):
                raise StorageError(f"cannot compact the turn log {self.path}: {exc.strerror}") from exc
            raise
        try:
            fsync_dir(str(self.path.parent))
        except OSError:
            log.warning("compacted %s, but its directory could not be synced", self.path, exc_info=True)
        return fd


def _refuse_unless_regular(path: Path) -> None:
    """``StorageError`` unless ``path`` is missing or a regular file (through symlinks): a FIFO
    would make the open wait for a writer forever, a device read without end (``/dev/zero``) or
    refuse an fsync with a raw ``OSError`` (``/dev/null``). ``stat`` opens nothing, so never blocks."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StorageError(f"cannot read turn log {path}: {exc.strerror}") from exc
    if not stat.S_ISREG(mode):
        raise StorageError(f"turn log {path} is not a regular file")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class FsTurnStore(InCoreStore):
    """``async with FsTurnStore(directory) as store:`` — the log is ``directory/turns.log``.
    ``trees`` (e.g. ``store.cas``) is where ``fs_root`` oids are checked to be trees."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        durability: str = "full",
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD,
        clock: Callable[[], int] = now_ms,
        trees: TreeSource | None = None,
    ) -> None:
        super().__init__(max_payload_bytes=max_payload_bytes, trees=trees)
        if durability not in ("full", "normal"):
            raise InvalidInput(f"durability must be 'full' or 'normal', got {durability!r}")
        self.directory = Path(directory)
        self.path = self.directory / "turns.log"
        self.durability = durability
        self._clock = clock
        self._core = TurnCore(clock)
        self._stack: AsyncExitStack | None = None
        self._actor: _LogActor | None = None

    async def __aenter__(self) -> FsTurnStore:
        stack = AsyncExitStack()
        await stack.__aenter__()
        try:
            await anyio.to_thread.run_sync(self._open, stack)
            tg = await stack.enter_async_context(anyio.create_task_group())
            await tg.start(self._actor_or_fail().run)
            stack.push_async_callback(self._actor_or_fail().aclose)
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        return self

    def _open(self, stack: AsyncExitStack) -> None:
        self._actor = None
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create {self.directory}: {exc.strerror}") from exc
        lock = FsLock(self.directory / "turns.lock", timeout=0)
        try:
            lock.acquire()
        except LockTimeout as exc:
            raise StorageError(f"{self.directory} is open in another process") from exc
        stack.callback(lock.release)
        try:
            # A compaction that did not reach its rename: the old log is the whole truth.
            os.unlink(self.directory / COMPACT_NAME)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StorageError(f"cannot remove {self.directory / COMPACT_NAME}: {exc.strerror}") from exc
        _refuse_unless_regular(self.path)
        # The log alone is the truth: an object opened before may hold what it never wrote (a
        # failed write) or miss what another writer appended since, so its memory starts afresh.
        self._core = TurnCore(self._clock)
        replay(self.path, self._core)
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StorageError(f"cannot open turn log {self.path}: {exc.strerror}") from exc
        stack.callback(self._close_log, fd)
        if os.fstat(fd).st_size == 0:
            os.write(fd, MAGIC)
            if self.durability == "full":
                os.fsync(fd)
                fsync_dir(str(self.directory))
        self._actor = _LogActor(self._core, fd, fsync=self.durability == "full", path=self.path)

    def _close_log(self, opened: int) -> None:
        # A compaction replaces the descriptor the log was opened with: close the one in use.
        os.close(self._actor.fd if self._actor is not None else opened)

    def _actor_or_fail(self) -> _LogActor:
        if self._actor is None:
            raise ActorClosed("FsTurnStore is not open: use `async with FsTurnStore(...)`")
        return self._actor

    def _readable(self) -> TurnCore:
        # After a close, or a failed log write the actor could not undo, memory may hold what the
        # log does not: refuse. The actor's core: one rebuilt after an undone write replaces it.
        if self._actor is None or self._actor.closed:
            raise ActorClosed(f"FsTurnStore {self.directory} is closed")
        self._core = self._actor.core
        return self._core

    async def __aexit__(self, *exc_info: object) -> None:
        if self._stack is not None:
            stack, self._stack = self._stack, None
            await stack.aclose()

    def _write(self, command: TurnCommand) -> Awaitable[object]:
        # The actor's awaitable handed on: no coroutine of ours for each reply to resume.
        return self._actor_or_fail().send(command)

    def _core_for_read(self) -> TurnCore:
        return self._readable()

    async def _collect(self, grace_ms: int) -> tuple[int, int, int, int, bool]:
        turns, payload, before, after, rewritten = await self._actor_or_fail().call(CompactLog(grace_ms))
        return int(turns), int(payload), int(before), int(after), bool(rewritten)
