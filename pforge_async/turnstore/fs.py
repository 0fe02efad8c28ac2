"""``FsTurnStore``: the turn store as one append-only log file, for local parity and offline inspection.

The file starts with a magic line; then each record is a frame ``<u32 length><u32 crc32 of the
record><u32 crc32 of those 8 bytes><msgpack record>``. Appends never rewrite earlier bytes. One write
command is one record, so one frame: an ``append_turns`` batch or a fork with its key is on disk whole
or not at all. At open the log is replayed into memory:

- A frame cut short at the very end (a torn write, or the zeros a crash can leave past it), or a last
  frame whose checksum fails, is truncated away: its write was never acknowledged as durable.
- Damage anywhere before the end stays local. A frame whose header is sound but whose record fails its
  checksum is decoded if it can be, and only the ids it names are kept, marked damaged: reads of those
  turns and contexts raise ``IntegrityError`` naming the turn log offset, and nothing built on them is
  served as good data. Bytes that cannot be read at all (a damaged header) are skipped up to the next
  sound frame; new ids then skip past anything they might have held. ``check()`` lists every damaged
  frame and id. The log is not rewritten: the damage is reported again at every open until the log is
  repaired by hand or its store rebuilt.
- The header has a checksum of its own, so a damaged length is never mistaken for a torn tail.

Writes go through an actor, so concurrent appends are group-committed: one write and one fsync per
batch. One process at a time may open a directory (a file lock says so).
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import anyio
import msgspec

from ..actor import Actor, Failed
from ..cas.pack import fsync_dir
from ..clock import now_ms
from ..errors import ActorClosed, IntegrityError, InvalidInput, LockTimeout, PforgeError, StorageError
from ..fslock import FsLock
from .base import TreeSource
from .commands import TurnCommand
from .core import BatchRec, Record, TurnCore, TurnRec
from .incore import InCoreStore
from .rules import DEFAULT_MAX_PAYLOAD, MAX_ID

__all__ = ["FsTurnStore", "replay"]

MAGIC = b"pforge-turns v1\n"
_FRAME = struct.Struct("<III")
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Record)
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
        if not MAGIC.startswith(data):
            raise IntegrityError(f"{path} is not a pforge turn log")
        _truncate(path, 0, len(data))  # torn while the magic itself was written
        return 0
    pos = len(MAGIC)
    end = len(data)
    while pos < end:
        if pos + _FRAME.size > end:
            break  # torn header
        size, crc, header_crc = _FRAME.unpack_from(data, pos)
        where = f"turn log {path} at byte {pos}"
        if zlib.crc32(data[pos : pos + 8]) != header_crc:
            if not data[pos:].strip(b"\0"):
                break  # zeros past the last write: a torn tail
            resume = _next_frame(data, pos + 1)
            log.error("%s: damaged frame header; %d bytes skipped", where, resume - pos)
            core.lost(where + " (damaged frame header)", resume - pos)
            pos = resume
            continue
        body_end = pos + _FRAME.size + size
        if body_end > end:
            break  # torn body
        body = data[pos + _FRAME.size : body_end]
        sound = zlib.crc32(body) == crc
        if not sound and body_end == end:
            break  # the last frame, half on disk when the writer died
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
            log.error("%s: record fails its checksum; the ids it names are marked damaged", where)
            core.problems.append(f"{where}: the record fails its checksum (what it names is marked damaged)")
            core.load_damaged(record, where)
        else:
            core.lost(where + " (checksum mismatch, ids out of range)", size)
        pos = body_end
    if pos < end:
        _truncate(path, pos, end - pos)
    return pos


def _next_frame(data: bytes, start: int) -> int:
    """The offset of the next sound frame (header and record checksums both right), or the end."""
    end = len(data)
    for pos in range(start, end - _FRAME.size + 1):
        size, crc, header_crc = _FRAME.unpack_from(data, pos)
        body_end = pos + _FRAME.size + size
        if (
            zlib.crc32(data[pos : pos + 8]) == header_crc
            and body_end <= end
            and zlib.crc32(data[pos + _FRAME.size : body_end]) == crc
        ):
            return pos
    return end


def _ids_in_range(record: Record) -> bool:
    """Whether the turn ids a damaged record names could be real (else it holds nothing to keep)."""
    if isinstance(record, TurnRec):
        records = [record.record]
    elif isinstance(record, BatchRec):
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
    body = _encoder.encode(record)
    head = struct.pack("<II", len(body), zlib.crc32(body))
    return head + struct.pack("<I", zlib.crc32(head)) + body


class _LogActor(Actor[TurnCommand]):
    command_type = TurnCommand
    name = "fs-turn-log"

    def __init__(self, core: TurnCore, fd: int, fsync: bool) -> None:
        super().__init__(mailbox_size=256, max_batch=256)
        self.core = core
        self.fd = fd
        self.fsync = fsync
        self._limiter = anyio.CapacityLimiter(1)

    async def handle_batch(self, commands: Sequence[TurnCommand]) -> list[Any]:
        outcomes: list[Any] = []
        frames: list[bytes] = []
        core = self.core
        for command in commands:
            try:
                result, record = core.decide(command)
                if record is not None:
                    # Loaded before it is on disk, so later commands of this batch see it; nobody is
                    # answered before the write below, and a failed write kills the actor (the log on
                    # disk stays the truth, replayed at the next open).
                    core.load(record)
                    frames.append(frame(record))
                outcomes.append(core.finish(result))
            except PforgeError as exc:
                outcomes.append(Failed(exc))
        if frames:
            await anyio.to_thread.run_sync(self._write, b"".join(frames), limiter=self._limiter)
        return outcomes

    def _write(self, data: bytes) -> None:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view) :]
            if self.fsync:
                os.fsync(self.fd)
        except OSError as exc:
            raise StorageError(f"cannot append to the turn log: {exc.strerror}") from exc


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
        replay(self.path, self._core)
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StorageError(f"cannot open turn log {self.path}: {exc.strerror}") from exc
        stack.callback(os.close, fd)
        if os.fstat(fd).st_size == 0:
            os.write(fd, MAGIC)
            if self.durability == "full":
                os.fsync(fd)
                fsync_dir(str(self.directory))
        self._actor = _LogActor(self._core, fd, fsync=self.durability == "full")

    def _actor_or_fail(self) -> _LogActor:
        if self._actor is None:
            raise ActorClosed("FsTurnStore is not open: use `async with FsTurnStore(...)`")
        return self._actor

    def _readable(self) -> TurnCore:
        # After a close, or a failed log write, memory may hold what the log does not: refuse.
        if self._actor is None or self._actor.closed:
            raise ActorClosed(f"FsTurnStore {self.directory} is closed")
        return self._core

    async def __aexit__(self, *exc_info: object) -> None:
        if self._stack is not None:
            stack, self._stack = self._stack, None
            await stack.aclose()

    async def _write(self, command: TurnCommand) -> object:
        return await self._actor_or_fail().call(command)

    def _core_for_read(self) -> TurnCore:
        return self._readable()
