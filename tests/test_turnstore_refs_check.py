"""A turn's refs are checked against the CAS before the write: in one call when the CAS answers for
many (``has_many``), one per ref for a CAS without it; either way a missing one stores nothing."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from pforge_async import ObjectNotFound, open_store
from pforge_async.cas.store import Cas
from pforge_async.turnstore import NewTurn

pytestmark = pytest.mark.anyio

MISSING = "ab" * 32


class Counting:
    """Wraps the CAS's ``has`` and ``has_many``, counting the calls of each."""

    def __init__(self, cas: Cas) -> None:
        self.has_calls = 0
        self.many_calls: list[int] = []
        self._cas_has = cas.has
        self._cas_has_many = cas.has_many

    async def has(self, oid: str) -> bool:
        self.has_calls += 1
        return await self._cas_has(oid)

    async def has_many(self, oids: Sequence[str]) -> list[bool]:
        self.many_calls.append(len(oids))
        return await self._cas_has_many(oids)


@pytest.mark.parametrize("batched", [True, False])
async def test_refs_checked_in_one_call_when_the_cas_can(tmp_path: Path, batched: bool) -> None:
    async with open_store(tmp_path / "s") as store:
        counting = Counting(store.cas)
        # Only what the turn store calls on its CAS is swapped: the CAS itself is left as it is.
        setattr(store.cas, "has", counting.has)  # noqa: B010
        # with has_many (the CAS's own, counted) or, as a CAS without one, none
        setattr(store.cas, "has_many", counting.has_many if batched else None)  # noqa: B010
        oids = [await store.turns.put_blob(b"value %d" % i) for i in range(5)]
        ctx = await store.turns.open_context("refs")

        record = await store.turns.append_turn(ctx.context_id, "t", b"one", refs=oids)
        assert record.refs == tuple(sorted(oids))
        records = await store.turns.append_turns(
            [
                NewTurn(ctx.context_id, "t", b"two", refs=tuple(oids[:3])),
                NewTurn(ctx.context_id, "t", b"three", refs=tuple(oids[2:])),
            ]
        )
        assert [r.refs for r in records] == [tuple(sorted(oids[:3])), tuple(sorted(oids[2:]))]
        if batched:
            assert counting.many_calls == [5, 5] and counting.has_calls == 0
        else:
            assert counting.has_calls == 10

        # A missing ref among present ones: named, and nothing of the write is stored.
        with pytest.raises(ObjectNotFound, match=MISSING):
            await store.turns.append_turn(ctx.context_id, "t", b"bad", refs=[*oids, MISSING])
        with pytest.raises(ObjectNotFound, match=MISSING):
            await store.turns.append_turns([NewTurn(ctx.context_id, "t", b"bad", refs=(oids[0], MISSING))])
        head = await store.turns.get_head(ctx.context_id)
        assert head.head_turn_id == records[-1].turn_id
        # and the store still serves
        after = await store.turns.append_turn(ctx.context_id, "t", b"four", refs=oids[:1])
        assert after.parent_turn_id == records[-1].turn_id
