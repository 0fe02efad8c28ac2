"""Single-writer actors: a bounded mailbox of encoded commands, drained in batches by one task.

The idea is aiosqlite's (one owner drains a queue of work items) moved onto the event loop: every
caller encodes a frozen ``msgspec.Struct`` command to msgpack, puts the bytes and a reply slot in the
mailbox, and waits on the slot. The actor task takes every envelope waiting (up to ``max_batch``),
decodes them with one reused decoder and hands the whole batch to :meth:`Actor.handle_batch`, so a
database actor can commit a batch as one transaction.

Shutdown is the closing of the mailbox's send side: the end-of-stream marker queues behind real work,
so everything sent before :meth:`Actor.aclose` still runs.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import warnings
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Generator, Sequence
from typing import Any, Generic, TypeVar

import anyio
import msgspec
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .errors import ActorClosed, InvalidInput, PforgeError
from .interrupts import hold_sigint, release_sigint

__all__ = ["Actor", "Failed"]

C = TypeVar("C")
log = logging.getLogger(__name__)


class Failed:
    """An outcome that fails only its own caller; a batch handler returns it in a command's slot."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def __repr__(self) -> str:
        return f"Failed({self.error!r})"


class _Envelope:
    """Command bytes and the future their reply goes to. The reply never travels inside the bytes.

    A bare asyncio future rather than an ``anyio.Event``: the store is asyncio-only (as aiosqlite
    is), and on the hot path a future costs a tenth of an event. If the caller is cancelled, its
    future is cancelled with it and the reply is simply dropped.
    """

    __slots__ = ("data", "reply")

    def __init__(self, data: bytes, reply: asyncio.Future[Any]) -> None:
        self.data = data
        self.reply = reply

    def resolve(self, outcome: Any) -> None:
        if self.reply.done():
            return
        if isinstance(outcome, Failed):
            self.reply.set_exception(outcome.error)
        else:
            self.reply.set_result(outcome)

    def fail(self, error: BaseException) -> None:
        if not self.reply.done():
            self.reply.set_exception(error)


class _WhenRoom:
    """What ``Actor.send`` returns when the mailbox is full: awaited, it waits for room, mails the
    envelope and waits for the reply; dropped unawaited it mailed nothing, and says so."""

    __slots__ = ("_actor", "_awaited", "_envelope", "_what")

    def __init__(self, actor: Actor[Any], envelope: _Envelope, what: str) -> None:
        self._actor = actor
        self._envelope = envelope
        self._what = what
        self._awaited = False

    def __await__(self) -> Generator[Any, None, Any]:
        if self._awaited:
            raise RuntimeError(f"{self._actor.name}: what send() returned for {self._what} was awaited already")
        self._awaited = True
        return self._actor._post_when_room(self._envelope).__await__()

    def __del__(self) -> None:
        if not self._awaited:
            warnings.warn(
                f"{self._actor.name}: {self._what} was sent while the mailbox was full and never awaited, so it "
                "was never mailed: await what Actor.send returns",
                RuntimeWarning,
                stacklevel=2,
            )


class Actor(ABC, Generic[C]):
    """Base class of every actor. A subclass names its command union and implements a batch handler.

    ``command_type`` is the tagged union (or single Struct type) the mailbox carries. The subclass
    implements :meth:`handle_batch`, and may override :meth:`setup` and :meth:`teardown` for the
    resources it owns.
    """

    command_type: Any = None
    name = "actor"

    def __init__(self, *, mailbox_size: int = 256, max_batch: int = 256) -> None:
        # An int, not just a number: inf (or NaN) would make the mailbox unbounded, or fail in anyio.
        for what, value in (("mailbox_size", mailbox_size), ("max_batch", max_batch)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidInput(f"{what} must be an int of at least 1, got {value!r}")
        if self.command_type is None:
            raise TypeError(f"{type(self).__name__} must set command_type")
        self.max_batch = max_batch
        self._send: MemoryObjectSendStream[_Envelope]
        self._receive: MemoryObjectReceiveStream[_Envelope]
        self._send, self._receive = anyio.create_memory_object_stream[_Envelope](mailbox_size)
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(self.command_type)
        self._started = False
        #: the event loop the actor runs on (None until it starts): callers must be on it
        self._home: asyncio.AbstractEventLoop | None = None
        self._thread_name = ""
        self._stopped = anyio.Event()
        self._death: BaseException | None = None
        #: batches handled and commands in them, for tests and stats.
        self.batches = 0
        self.commands = 0
        self.largest_batch = 0

    # -- the caller's side ---------------------------------------------------------------------

    async def call(self, command: C) -> Any:
        """Send one command and wait for its reply (or its error)."""
        return await self._post(self._encoder.encode(command))

    def send(self, command: C) -> Awaitable[Any]:
        """``call`` for a caller that hands the awaitable on, as a store's ``_write`` does, without
        a coroutine of its own in between (every reply resumes each coroutine a caller's chain holds).

        The contract: await what it returns, always. With room in the mailbox the command is mailed
        at once and the reply's future returned; with the mailbox full it is mailed only when the
        awaitable is awaited (that wait for room is the backpressure: nothing is queued beyond the
        bound). So an awaitable dropped unawaited sent nothing if the mailbox was full, and a
        ``RuntimeWarning`` naming the actor and the command says so, as Python warns of a
        coroutine never awaited."""
        return self._post(self._encoder.encode(command), type(command).__name__)

    async def call_raw(self, data: bytes) -> Any:
        """Send already-encoded command bytes: the mailbox protocol is a wire protocol."""
        return await self._post(data)

    def _post(self, data: bytes, what: str = "command") -> Awaitable[Any]:
        """Mail ``data`` and return what to await for its reply: the reply's future itself when the
        mailbox has room (no extra trip around the event loop, and no coroutine between the caller
        and the future: a caller is a chain of coroutines that each reply resumes), else a
        ``_WhenRoom`` that waits for room first, once awaited."""
        loop = asyncio.get_running_loop()
        # The mailbox and the reply futures belong to the actor's loop and are not thread-safe: a
        # caller on another thread's loop would never be woken (or wake the actor). One identity
        # test on the loop this call fetches anyway: nothing measurable on the hot path.
        if loop is not self._home and self._home is not None:
            raise self._wrong_loop()
        envelope = _Envelope(data, loop.create_future())
        try:
            self._send.send_nowait(envelope)
        except anyio.WouldBlock:
            return _WhenRoom(self, envelope, what)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            raise self._closed_error() from self._death
        return envelope.reply

    async def _post_when_room(self, envelope: _Envelope) -> Any:
        try:
            await self._send.send(envelope)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            raise self._closed_error() from self._death
        return await envelope.reply

    @property
    def queued(self) -> int:
        """Envelopes waiting in the mailbox now (never more than its size)."""
        return self._send.statistics().current_buffer_used

    @property
    def closed(self) -> bool:
        return self._stopped.is_set()

    def _check_loop(self) -> None:
        """``InvalidInput`` unless called on the actor's event loop: for the ways in other than the
        mailbox (a read pool bound to that loop), where one more look costs nothing."""
        home = self._home
        if home is not None and asyncio.get_running_loop() is not home:
            raise self._wrong_loop()

    def _wrong_loop(self) -> PforgeError:
        """The error of a call from another event loop: ``ActorClosed`` if the actor is closed (or
        its loop has ended), as from its own loop; else ``InvalidInput``."""
        assert self._home is not None
        if self.closed or self._home.is_closed():
            return self._closed_error()
        return InvalidInput(
            f"{self.name} serves the event loop it was started on (thread {self._thread_name!r}), not this "
            "one: a store is used from the one event loop that opened it (from another thread, hand the "
            "call to that loop with asyncio.run_coroutine_threadsafe)"
        )

    def _closed_error(self) -> ActorClosed:
        if self._death is None:
            return ActorClosed(f"{self.name} is closed")
        error = ActorClosed(f"{self.name} died: {self._death!r}")
        error.__cause__ = self._death
        return error

    # -- the actor's side ----------------------------------------------------------------------

    async def setup(self) -> None:
        """Open what the actor owns. Runs in the actor task before it reports started."""

    async def teardown(self) -> None:
        """Close what the actor owns. Runs shielded, after the last batch."""

    @abstractmethod
    async def handle_batch(self, commands: Sequence[C]) -> Sequence[Any]:
        """Run a batch and return one outcome per command, in order.

        An outcome is the reply value, or :class:`Failed` to fail only that command's caller.
        Raising a :class:`PforgeError` says that nothing of the batch took effect: every caller of
        the batch gets that error and the actor goes on. Raising anything else is a bug: the
        actor dies, and its pending and later callers get :class:`ActorClosed` naming the cause.
        """

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """The actor task. Start it with ``await task_group.start(actor.run)``."""
        if self._started:
            raise RuntimeError(f"{self.name} was already started")
        self._started = True
        self._home = asyncio.get_running_loop()
        self._thread_name = threading.current_thread().name
        # Ctrl-C lands between event-loop callbacks while the actor runs (see .interrupts).
        holding_sigint = hold_sigint()
        try:
            try:
                await self.setup()
            except BaseException as exc:
                self._die(exc, [])
                raise
            task_status.started()
            try:
                await self._loop()
            finally:
                with anyio.CancelScope(shield=True):
                    try:
                        await self.teardown()
                    finally:
                        # Cancelled from outside with work still queued: those callers must not hang.
                        self._fail_pending(self._closed_error, [])
        finally:
            self._stopped.set()
            if holding_sigint:
                release_sigint()

    async def _loop(self) -> None:
        receive = self._receive
        while True:
            try:
                first = await receive.receive()
            except anyio.EndOfStream:
                return
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    batch.append(receive.receive_nowait())
                except (anyio.WouldBlock, anyio.EndOfStream):
                    break
            # Once taken from the mailbox a batch runs to its end: callers cancelled meanwhile only
            # stop waiting, they cannot leave a half-written transaction.
            with anyio.CancelScope(shield=True):
                try:
                    await self._run_batch(batch)
                except Exception as exc:  # a bug in the handler: nothing else kills an actor
                    log.exception("%s died", self.name)
                    self._die(exc, batch)
                    return
                except BaseException:
                    # Torn down around us (an event loop closing after a second Ctrl-C cancels
                    # every task, shielded or not): the batch's outcome is unknown to its callers.
                    for envelope in batch:
                        envelope.fail(ActorClosed(f"{self.name} was closed while running this command"))
                    raise

    async def _run_batch(self, batch: list[_Envelope]) -> None:
        decode = self._decoder.decode
        commands: list[C] = []
        envelopes: list[_Envelope] = []
        for envelope in batch:
            try:
                commands.append(decode(envelope.data))
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                envelope.fail(InvalidInput(f"{self.name}: undecodable command: {exc}"))
                continue
            envelopes.append(envelope)
        if not commands:
            return
        try:
            outcomes = await self.handle_batch(commands)
        except PforgeError as exc:
            # The handler's contract: a PforgeError out of handle_batch means none of the batch
            # took effect (a lock it could not take, storage it could not reach). Its callers
            # learn why; the actor goes on serving.
            for envelope in envelopes:
                envelope.fail(exc)
            return
        if len(outcomes) != len(commands):
            raise RuntimeError(
                f"{self.name}.handle_batch returned {len(outcomes)} outcomes for {len(commands)} commands"
            )
        self.batches += 1
        self.commands += len(commands)
        self.largest_batch = max(self.largest_batch, len(commands))
        for envelope, outcome in zip(envelopes, outcomes, strict=True):
            envelope.resolve(outcome)

    def _die(self, cause: BaseException, batch: list[_Envelope]) -> None:
        """Fail the running batch, everything queued and every later call; nobody hangs."""
        self._death = cause
        self._fail_pending(self._closed_error, batch)

    def _fail_pending(self, error: Callable[[], ActorClosed], batch: list[_Envelope]) -> None:
        for envelope in batch:
            envelope.fail(error())
        while True:
            try:
                envelope = self._receive.receive_nowait()
            except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                break
            envelope.fail(error())
        # Closing the receive side wakes senders blocked on a full mailbox with BrokenResourceError.
        self._receive.close()

    async def aclose(self) -> None:
        """Stop taking commands, let everything already queued run, and wait for the actor to stop."""
        self._send.close()
        if self._started:
            await self._stopped.wait()
        else:
            self._receive.close()
            self._stopped.set()
