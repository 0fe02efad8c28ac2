"""A test actor whose commands exercise every path of the actor runtime."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
import msgspec

from pforge_async import Actor, Failed, InvalidInput


class Echo(msgspec.Struct, frozen=True, tag=True):
    caller: int
    seq: int


class Reject(msgspec.Struct, frozen=True, tag=True):
    why: str


class Crash(msgspec.Struct, frozen=True, tag=True):
    pass


class Sleep(msgspec.Struct, frozen=True, tag=True):
    seconds: float


Command = Echo | Reject | Crash | Sleep


class RecordingActor(Actor[Command]):
    command_type = Command
    name = "recording-actor"

    def __init__(self, *, batch_delay: float = 0.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.batch_delay = batch_delay
        self.executed: list[Command] = []
        self.batch_sizes: list[int] = []
        self.torn_down = False

    async def handle_batch(self, commands: Sequence[Command]) -> list[Any]:
        self.batch_sizes.append(len(commands))
        if self.batch_delay:
            await anyio.sleep(self.batch_delay)
        outcomes: list[Any] = []
        for command in commands:
            self.executed.append(command)
            match command:
                case Echo(caller=caller, seq=seq):
                    outcomes.append((caller, seq))
                case Reject(why=why):
                    outcomes.append(Failed(InvalidInput(why)))
                case Crash():
                    raise RuntimeError("handler crashed on purpose")
                case Sleep(seconds=seconds):
                    await anyio.sleep(seconds)
                    outcomes.append(None)
        return outcomes

    async def teardown(self) -> None:
        self.torn_down = True


@asynccontextmanager
async def running(actor: RecordingActor) -> AsyncIterator[RecordingActor]:
    async with anyio.create_task_group() as tg:
        await tg.start(actor.run)
        try:
            yield actor
        finally:
            await actor.aclose()
