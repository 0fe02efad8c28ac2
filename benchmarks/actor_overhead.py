"""The cost of one empty command round trip through an actor, beside a plain ``await`` of the same work.

Run: ``python benchmarks/actor_overhead.py``. Prints microseconds per call at 1 and 64 concurrent
callers and the ratio actor/plain.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import describe, run_callers

from pforge_async import Actor


class Noop(msgspec.Struct, frozen=True, tag=True):
    n: int


class NoopActor(Actor[Noop]):
    command_type = Noop
    name = "noop"

    async def handle_batch(self, commands: Sequence[Noop]) -> list[Any]:
        return [await work(c.n) for c in commands]


async def work(n: int) -> int:
    return n


async def timed(callers: int, per_caller: int, call: Any) -> float:
    return await run_callers(callers, per_caller, call) / (callers * per_caller) * 1e6


async def main() -> None:
    print(describe())
    total = 64_000
    print(f"{'callers':>8} {'plain us/call':>14} {'actor us/call':>14} {'ratio':>8} {'mean batch':>11}")
    for callers in (1, 64):
        per_caller = total // callers
        plain = await timed(callers, per_caller, work)
        actor = NoopActor(mailbox_size=256, max_batch=256)
        async with anyio.create_task_group() as tg:
            await tg.start(actor.run)

            def call(n: int, actor: NoopActor = actor) -> Any:
                return actor.call(Noop(n))

            await timed(callers, 100, call)  # warm up
            through = await timed(callers, per_caller, call)
            await actor.aclose()
        mean = actor.commands / actor.batches
        print(f"{callers:>8} {plain:>14.2f} {through:>14.2f} {through / plain:>8.1f} {mean:>11.1f}")


if __name__ == "__main__":
    anyio.run(main)
