"""The main job: open the embedded store in ./.pforge and drive it from many concurrent tasks."""

from __future__ import annotations

import time
from collections.abc import Sequence

import anyio
import msgspec

from pforge_async import Actor, open_store


class Add(msgspec.Struct, frozen=True, tag=True):
    agent: int
    amount: int


class Tally(Actor[Add]):
    """A toy single-writer actor: one task owns the totals, every agent sends it commands."""

    command_type = Add
    name = "tally"

    def __init__(self) -> None:
        super().__init__(mailbox_size=64, max_batch=64)
        self.totals: dict[int, int] = {}

    async def handle_batch(self, commands: Sequence[Add]) -> list[int]:
        out = []
        for c in commands:
            self.totals[c.agent] = self.totals.get(c.agent, 0) + c.amount
            out.append(self.totals[c.agent])
        return out


async def main() -> None:
    async with open_store(".pforge") as store:
        tally = Tally()
        await store.start_actor(tally)
        start = time.perf_counter()

        async def agent(n: int) -> None:
            for _ in range(100):
                await tally.call(Add(agent=n, amount=1))

        async with anyio.create_task_group() as tg:
            for n in range(64):
                tg.start_soon(agent, n)
        elapsed = time.perf_counter() - start
        print(f"store at {store.root} (durability {store.durability})")
        print(
            f"64 agents x 100 commands through one actor: {tally.commands} commands in "
            f"{tally.batches} batches (largest {tally.largest_batch}), {elapsed * 1000:.0f} ms"
        )
        assert all(v == 100 for v in tally.totals.values())


if __name__ == "__main__":
    anyio.run(main)
