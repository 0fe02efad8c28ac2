"""Purging expired nonces and reservations (issue 13: "expired nonces and reservations go too").

A purged nonce is never accepted again, not even by replaying the command that issued it; a purge
never changes what was spent or what is held; it runs beside consumers in slices, and a purge killed
anywhere leaves ledgers whose invariants hold. Every test runs on each backend (tests/_ledger_backends.py)."""

from __future__ import annotations

import base64
import json
import random
import signal
import time
from pathlib import Path

import anyio
import pytest

from pforge_async import (
    InvalidInput,
    NonceExpired,
    NonceReplayed,
    NonceUnknown,
    NotFound,
    Store,
)
from pforge_async.ledgers import Usage
from pforge_async.ledgers.budget import PURGE_SLICE as BUDGET_SLICE
from pforge_async.ledgers.nonces import PURGE_SLICE, IssueNonce, nonce_expiry

from ._ledger_backends import OPEN, open_target, store, target
from ._procs import spawn, wait_for_line

__all__ = ["store", "target"]  # the fixtures, imported for pytest to find

pytestmark = pytest.mark.anyio

BAD_GRACE = (-1, -0.001, float("nan"), float("inf"), 10**16, "1", None, True, [0])


async def _count(actor: object, table: str) -> int:
    row = await actor.fetchone(f"SELECT COUNT(*) FROM {table}")  # type: ignore[attr-defined]
    return int(row[0])


async def _until_past(expiry_ms: int) -> None:
    await anyio.sleep(max(0.0, expiry_ms / 1000 - time.time()) + 0.01)


async def test_purged_nonces_are_never_accepted_again(store: Store) -> None:
    nonces = store.nonces
    # The consumed one is consumed at once, well inside its second; then the test waits for the expiry
    # each nonce carries, not for a fixed time a slow machine may overrun.
    consumed = await nonces.issue("tool:shell", 1)
    await nonces.consume(consumed, "tool:shell")
    short = [consumed] + [await nonces.issue("tool:shell", 0.05) for _ in range(2)]
    live = await nonces.issue("tool:shell", 600)
    assert abs(nonce_expiry(live) - (time.time() + 600) * 1000) < 5_000  # it carries its expiry
    await _until_past(max(nonce_expiry(n) for n in short))
    assert await nonces.purge_expired(grace_s=3600) == 0  # expired, but within the grace period
    assert await nonces.purge_expired() == 3  # consumed or not
    assert await nonces.purge_expired() == 0
    for purged in short:
        with pytest.raises(NonceUnknown):
            await nonces.consume(purged, "tool:shell")
        # The command that issued it, replayed as it was, makes another nonce (a later expiry).
        token = base64.urlsafe_b64encode(base64.urlsafe_b64decode(purged + "=")[8:]).decode()
        again = await nonces._actor.call(IssueNonce(token, "tool:shell", 50))
        assert again != purged and again[11:] == purged[11:] and nonce_expiry(again) > nonce_expiry(purged)
        with pytest.raises(NonceUnknown):
            await nonces.consume(purged, "tool:shell")
    # A live nonce is not purged, and is honoured once.
    await nonces.consume(live, "tool:shell")
    with pytest.raises(NonceReplayed):
        await nonces.consume(live, "tool:shell")
    assert await _count(nonces._actor, "nonces") == 1 + len(short)
    assert (await store.check()).ok


async def test_purge_runs_in_slices_and_takes_every_expired_nonce(store: Store) -> None:
    nonces = store.nonces
    many = PURGE_SLICE * 2 + 7
    async with anyio.create_task_group() as tg:
        for _ in range(many):
            tg.start_soon(nonces.issue, "s", 0.001)
    await anyio.sleep(0.01)
    batches = nonces._actor.batches
    assert await nonces.purge_expired() == many
    assert nonces._actor.batches - batches >= 3  # one short transaction per slice
    assert await _count(nonces._actor, "nonces") == 0


async def test_budget_purge_never_changes_what_was_spent_or_held(store: Store) -> None:
    budget = store.budget
    await budget.set_budget("v", tokens=1000, cost=1000)
    committed = await budget.reserve("v", tokens=10, cost=10, ttl_s=0.05, idempotency_key="k-committed")
    spent = await budget.commit(committed, Usage(3, 4, 5))
    late = await budget.reserve("v", tokens=10, cost=10, ttl_s=0.05, tags={"session": "s"})
    released = await budget.reserve("v", tokens=10, cost=10, ttl_s=0.05, idempotency_key="k-released")
    await budget.release(released)
    expired = await budget.reserve("v", tokens=10, cost=10, ttl_s=0.05, idempotency_key="k-expired")
    held = await budget.reserve("v", tokens=20, cost=20, ttl_s=600, tags={"session": "s"})
    await anyio.sleep(0.1)
    late_spent = await budget.commit(late, Usage(1, 1, 1))  # after its expiry: recorded, as late
    assert late_spent.late
    before = await budget.totals("v")
    tagged = await budget.totals("v", tags={"session": "s"})
    assert await budget.purge_expired(grace_s=3600) == 0
    assert await budget.purge_expired() == 2  # the released one and the expired one
    assert await budget.purge_expired() == 0
    assert await budget.totals("v") == before
    assert await budget.totals("v", tags={"session": "s"}) == tagged
    assert (before.tokens, before.cost, before.reserved_tokens) == (9, 6, 20)
    # Committed reservations stay with their spend: a retried commit is answered as before.
    assert await budget.commit(committed, Usage(3, 4, 5)) == spent
    assert await budget.commit(late, Usage(1, 1, 1)) == late_spent
    assert (await budget.find_reservation("k-committed")) is not None
    for purged in (released, expired):
        with pytest.raises(NotFound, match="purged"):
            await budget.commit(purged, Usage(1, 0, 0))
        with pytest.raises(NotFound):
            await budget.extend(purged, 60)
        with pytest.raises(NotFound):
            await budget.release(purged)
    assert await budget.find_reservation("k-expired") is None
    assert [r.reservation_id for r in await budget.list_reservations("v")] == [held.reservation_id]
    assert await _count(budget._actor, "reservation_tags") == 2  # the held one's and the late committed one's
    assert (await store.check()).ok


async def test_purges_beside_consumers_lose_and_double_nothing(store: Store) -> None:
    """Consumers of live nonces and reservers run while purges run again and again: every live nonce
    is honoured exactly once, every commit lands, and no caller sees an error of the purge's making."""
    nonces, budget = store.nonces, store.budget
    await budget.set_budget("v", tokens=10**12)
    async with anyio.create_task_group() as tg:
        for _ in range(1500):
            tg.start_soon(nonces.issue, "s", 0.001)
    live = [await nonces.issue("s", 600) for _ in range(200)]
    wins: list[str] = []
    replays = 0
    spent = 0
    stop = anyio.Event()

    async def purger() -> None:
        while not stop.is_set():
            await nonces.purge_expired()
            await budget.purge_expired()
            await anyio.sleep(0.001)

    async def consumer(offset: int) -> None:
        nonlocal replays
        for i in range(len(live)):
            nonce = live[(i + offset) % len(live)]
            try:
                await nonces.consume(nonce, "s")
                wins.append(nonce)
            except NonceReplayed:
                replays += 1

    async def spender(n: int) -> None:
        nonlocal spent
        for i in range(20):
            short = await budget.reserve("v", tokens=5, ttl_s=0.001)  # expires at once: purge fodder
            del short
            held = await budget.reserve("v", tokens=5, ttl_s=600, idempotency_key=f"k{n}-{i}")
            await budget.commit(held, Usage(2, 1, 0))
            spent += 3

    async with anyio.create_task_group() as outer:
        outer.start_soon(purger)
        async with anyio.create_task_group() as tg:
            for offset in range(4):
                tg.start_soon(consumer, offset * 50)
            for n in range(4):
                tg.start_soon(spender, n)
        stop.set()
    assert sorted(wins) == sorted(live) and replays == 3 * len(live)
    assert (await budget.totals("v")).tokens == spent == 4 * 20 * 3
    await anyio.sleep(0.01)
    await nonces.purge_expired()
    assert await _count(nonces._actor, "nonces") == len(live)
    assert (await store.check()).ok


async def test_bad_grace_is_refused_and_removes_nothing(store: Store) -> None:
    nonces, budget = store.nonces, store.budget
    await budget.set_budget("v", tokens=100)
    expired_nonce = await nonces.issue("s", 0.001)
    expired = await budget.reserve("v", tokens=1, ttl_s=0.001)
    await anyio.sleep(0.01)
    for bad in BAD_GRACE:
        with pytest.raises(InvalidInput, match="grace_s"):
            await nonces.purge_expired(grace_s=bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidInput, match="grace_s"):
            await budget.purge_expired(grace_s=bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        await nonces.purge_expired(3600)  # type: ignore[misc]
    # Raw commands out of bounds are refused by the decoder.
    from pforge_async.ledgers.budget import PurgeReservations
    from pforge_async.ledgers.nonces import PurgeExpired

    with pytest.raises(InvalidInput):
        await nonces._actor.call(PurgeExpired(-1, 10))
    with pytest.raises(InvalidInput):
        await budget._actor.call(PurgeReservations(0, 0))
    assert await _count(nonces._actor, "nonces") == 1
    assert await _count(budget._actor, "reservations") == 1
    # Still serving: the ledgers purge and honour as before.
    with pytest.raises(NonceExpired):
        await nonces.consume(expired_nonce, "s")
    assert await nonces.purge_expired() == 1
    assert await budget.purge_expired() == 1
    with pytest.raises(NotFound):
        await budget.commit(expired, Usage(1, 0, 0))
    assert (await store.check()).ok


# -- crash ------------------------------------------------------------------------------------------

#: The child fills both ledgers with expired rows beside live ones (written to a file first), says
#: "ready" and purges until it is killed.
CHILD = (
    OPEN
    + r"""
import json
from pforge_async.ledgers import Usage

async def main(root, out, fill):
    async with await open_target(root, "normal") as store:
        nonces, budget = store.nonces, store.budget
        await budget.set_budget("v", tokens=10**12)
        live = [await nonces.issue("s", 3600) for _ in range(20)]
        held = [(await budget.reserve("v", tokens=7, ttl_s=3600)).reservation_id for _ in range(5)]
        spent = await budget.reserve("v", tokens=9, ttl_s=0.001)
        await anyio.sleep(0.01)
        await budget.commit(spent, Usage(4, 5, 0))
        async with anyio.create_task_group() as tg:
            for i in range(fill):
                tg.start_soon(nonces.issue, "s", 0.001)
                tg.start_soon(lambda: budget.reserve("v", tokens=1, ttl_s=0.001, tags={"t": "x"}))
        with open(out, "w") as f:
            json.dump({"live": live, "held": held}, f)
        await anyio.sleep(0.01)
        print("ready", flush=True)
        while True:
            await nonces.purge_expired()
            await budget.purge_expired()

anyio.run(main, sys.argv[1], sys.argv[2], int(sys.argv[3]))
"""
)

RUNS = 4


async def test_a_purge_killed_anywhere_leaves_sound_ledgers(target: str, tmp_path: Path) -> None:
    rng = random.Random(1313)
    fill = max(PURGE_SLICE, BUDGET_SLICE) * 3
    for run in range(RUNS):
        out = tmp_path / f"live-{run}.json"
        child = spawn(CHILD, target, out, fill)
        try:
            wait_for_line(child, "ready", timeout=120)
            time.sleep(rng.uniform(0.0, 0.4))
        finally:
            child.send_signal(signal.SIGKILL)
            child.communicate(timeout=30)
        made = json.loads(out.read_text())
        async with await open_target(target) as store:
            problems = (await store.check()).problems
            assert problems == [], problems
            nonces, budget = store.nonces, store.budget
            totals = await budget.totals("v")
            assert (totals.tokens, totals.reserved_tokens) == (9 * (run + 1), 7 * 5 * (run + 1))
            # Every live nonce and reservation survived, and is honoured once.
            for nonce in made["live"]:
                await nonces.consume(nonce, "s")
                with pytest.raises(NonceReplayed):
                    await nonces.consume(nonce, "s")
            held = {r.reservation_id for r in await budget.list_reservations("v", limit=10_000)}
            assert set(made["held"]) <= held
            # The purge can run again to its end.
            await nonces.purge_expired()
            await budget.purge_expired()
            assert await _count(nonces._actor, "nonces") == 20 * (run + 1)
            assert await _count(budget._actor, "reservations") == 6 * (run + 1)
            assert await _count(budget._actor, "reservation_tags") == 0
