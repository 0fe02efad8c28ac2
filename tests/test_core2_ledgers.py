"""The budget ledger's record_spend replays as reserve does, on SQLite and PostgreSQL (the ledger
contract's backends, tests/_ledger_backends.py)."""

from __future__ import annotations

import pytest

from pforge_async import IdempotencyConflict, Store

from ._ledger_backends import store, target

pytestmark = pytest.mark.anyio
__all__ = ["store", "target"]  # the fixtures, imported for pytest


async def test_record_spend_key_reused_for_another_request_conflicts(store: Store) -> None:
    budget = store.budget
    await budget.set_budget("v", tokens=10_000)
    asked = {"input_tokens": 3, "output_tokens": 4, "cost": 5, "tags": {"session": "s", "agent": "a"}}
    first = await budget.record_spend("v", "m", idempotency_key="k", **asked)  # type: ignore[arg-type]
    before = await budget.totals("v")

    # The identical call (a resumed run repeating it, the tags given in another order) is the first spend.
    same = {**asked, "tags": {"agent": "a", "session": "s"}}
    assert await budget.record_spend("v", "m", idempotency_key="k", **same) == first  # type: ignore[arg-type]
    # allow_overdraw permits a spend; it is not part of it.
    again = await budget.record_spend("v", "m", idempotency_key="k", allow_overdraw=True, **asked)  # type: ignore[arg-type]
    assert again == first

    # Any other field is another request.
    others: list[tuple[str, str, dict[str, object]]] = [
        ("w", "m", {}),
        ("v", "n", {}),
        ("v", "m", {"input_tokens": 4}),
        ("v", "m", {"output_tokens": 5}),
        ("v", "m", {"cost": 6}),
        ("v", "m", {"tags": {"session": "s", "agent": "b"}}),
        ("v", "m", {"tags": {"session": "s"}}),
        ("v", "m", {"tags": {"session": "s", "agent": "a", "extra": "x"}}),
        ("v", "m", {"tags": None}),
    ]
    await budget.set_budget("w", tokens=10_000)
    for vendor, model, change in others:
        with pytest.raises(IdempotencyConflict, match="'k'"):
            await budget.record_spend(vendor, model, idempotency_key="k", **{**asked, **change})  # type: ignore[arg-type]
    assert await budget.totals("v") == before
    assert (await budget.totals("w")).tokens == 0

    # An untagged spend's key conflicts with a tagged retry just the same.
    untagged = await budget.record_spend("v", "m", input_tokens=1, output_tokens=0, cost=0, idempotency_key="u")
    assert await budget.record_spend("v", "m", input_tokens=1, output_tokens=0, cost=0, idempotency_key="u") == untagged
    with pytest.raises(IdempotencyConflict):
        await budget.record_spend(
            "v", "m", input_tokens=1, output_tokens=0, cost=0, idempotency_key="u", tags={"session": "s"}
        )
    report = await store.check()
    assert report.ok, report.problems
