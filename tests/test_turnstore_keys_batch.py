"""The SQLite turn actor looks up the idempotency keys of a whole group commit's appends in one query
before it decides them. Retries, conflicts and repeats must come out exactly as with a lookup per
append: keys stored before the batch, keys new in it, keys its own earlier commands wrote (also when
an erase or delete in the middle of the batch made it write them out early)."""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest

from pforge_async import IdempotencyConflict, open_store
from pforge_async.store import Store
from pforge_async.turnstore import NewTurn, TurnRecord

pytestmark = pytest.mark.anyio


class Statements:
    """What the turns writer runs, by kind (the batch's transactions, its key lookups)."""

    def __init__(self, store: Store) -> None:
        self._lock = threading.Lock()
        self.seen: list[str] = []
        conn = store.turns._actor._conn  # type: ignore[attr-defined]
        assert conn is not None
        conn.set_trace_callback(self._trace)

    def _trace(self, sql: str) -> None:
        with self._lock:
            self.seen.append(sql)

    def count(self, start: str, *, contains: str = "") -> int:
        with self._lock:
            return sum(1 for sql in self.seen if sql.lstrip().startswith(start) and contains in sql)

    def clear(self) -> None:
        with self._lock:
            self.seen.clear()


async def in_one_batch(store: Store, calls: list[Callable[[], Awaitable[Any]]]) -> list[Any]:
    """Run ``calls`` concurrently, in this order, as one group commit; each one's reply or error."""
    outcomes: list[Any] = [None] * len(calls)

    async def run(i: int) -> None:
        try:
            outcomes[i] = await calls[i]()
        except Exception as exc:  # the outcome under test
            outcomes[i] = exc

    before = store.turns._actor.batches  # type: ignore[attr-defined]
    async with anyio.create_task_group() as tg:
        for i in range(len(calls)):
            tg.start_soon(run, i)
    assert store.turns._actor.batches - before == 1, "the calls did not land in one group commit"  # type: ignore[attr-defined]
    return outcomes


async def chain_of(store: Store, context_id: int) -> list[int]:
    return [turn.turn_id for turn in await store.turns.list_turns(context_id, limit=1000)]


async def test_a_batch_of_stored_and_new_keys_decides_each_as_alone(tmp_path: Path) -> None:
    async with open_store(tmp_path / "s", watch_workspaces=False) as store:
        turns = store.turns
        contexts = [(await turns.create_context()).context_id for _ in range(12)]
        first = {c: await turns.append_turn(c, "t", b"first %d" % c, idempotency_key="k0") for c in contexts}
        statements = Statements(store)

        calls: list[Callable[[], Awaitable[Any]]] = []
        for n, c in enumerate(contexts):
            # a retry whose first attempt landed, with an expected head long gone
            calls.append(partial(turns.append_turn, c, "t", b"first %d" % c, idempotency_key="k0", expected_head=0))
            calls.append(partial(turns.append_turn, c, "t", b"new %d" % c, idempotency_key="k1"))
            if n % 3 == 0:  # the same key for something else
                calls.append(partial(turns.append_turn, c, "t", b"other", idempotency_key="k0"))
            if n % 4 == 0:  # a key the batch itself stores, twice
                calls += [partial(turns.append_turn, c, "t", b"twice", idempotency_key="k2")] * 2
                calls.append(partial(turns.append_turn, c, "t", b"not twice", idempotency_key="k2"))
        outcomes = iter(await in_one_batch(store, calls))

        for n, c in enumerate(contexts):
            assert next(outcomes) == first[c]
            new = next(outcomes)
            assert isinstance(new, TurnRecord) and new.payload == b"new %d" % c
            assert new.parent_turn_id == first[c].turn_id
            expected = [first[c].turn_id, new.turn_id]
            if n % 3 == 0:
                assert isinstance(next(outcomes), IdempotencyConflict)
            if n % 4 == 0:
                once, again, differs = next(outcomes), next(outcomes), next(outcomes)
                assert isinstance(once, TurnRecord) and again == once and once.parent_turn_id == new.turn_id
                assert isinstance(differs, IdempotencyConflict)
                expected.append(once.turn_id)
            assert await chain_of(store, c) == expected
            assert await turns.get_turn_by_key(c, "k1") == new
        # One transaction decided the whole batch (none of it ran again), and one statement looked up its keys.
        assert statements.count("BEGIN") == 1
        assert statements.count("SELECT", contains="idempotency_key = ?") == 0
        assert statements.count("SELECT", contains="VALUES") == 1
        assert await turns.check() == []


async def test_batches_of_turns_with_stored_and_new_keys_in_one_group_commit(tmp_path: Path) -> None:
    async with open_store(tmp_path / "s", watch_workspaces=False) as store:
        turns = store.turns
        a, b = [(await turns.create_context()).context_id for _ in range(2)]
        landed = await turns.append_turns(
            [NewTurn(a, "t", b"a0", idempotency_key="a0"), NewTurn(b, "t", b"b0", idempotency_key="b0")]
        )
        heads = {a: landed[0].turn_id, b: landed[1].turn_id}
        statements = Statements(store)
        outcomes = await in_one_batch(
            store,
            [
                # the landed batch retried, with the heads it expected then
                lambda: turns.append_turns(
                    [NewTurn(a, "t", b"a0", idempotency_key="a0"), NewTurn(b, "t", b"b0", idempotency_key="b0")],
                    expected_heads={a: 0, b: 0},
                ),
                # stored and new keys mixed, chained in the order given
                lambda: turns.append_turns(
                    [
                        NewTurn(a, "t", b"a0", idempotency_key="a0"),
                        NewTurn(a, "t", b"a1", idempotency_key="a1"),
                        NewTurn(b, "t", b"b1", idempotency_key="b1"),
                        NewTurn(a, "t", b"a1", idempotency_key="a1"),  # repeated within the batch
                    ],
                    expected_heads=heads,
                ),
                # a key the previous command of the group commit stored
                lambda: turns.append_turns([NewTurn(b, "t", b"b1", idempotency_key="b1"), NewTurn(b, "t", b"b2")]),
                # one stored key that differs: nothing of this batch is stored
                lambda: turns.append_turns(
                    [NewTurn(a, "t", b"a3", idempotency_key="a3"), NewTurn(b, "t", b"changed", idempotency_key="b0")]
                ),
            ],
        )
        assert outcomes[0] == landed
        a1, b1 = outcomes[1][1], outcomes[1][2]
        assert outcomes[1] == [landed[0], a1, b1, a1]
        assert (a1.parent_turn_id, b1.parent_turn_id) == (landed[0].turn_id, landed[1].turn_id)
        assert outcomes[2][0] == b1 and outcomes[2][1].parent_turn_id == b1.turn_id
        assert isinstance(outcomes[3], IdempotencyConflict)
        assert await chain_of(store, a) == [landed[0].turn_id, a1.turn_id]
        assert await chain_of(store, b) == [landed[1].turn_id, b1.turn_id, outcomes[2][1].turn_id]
        assert await turns.get_turn_by_key(a, "a3") is None
        assert statements.count("BEGIN") == 1
        assert statements.count("SELECT", contains="idempotency_key = ?") == 0
        assert await turns.check() == []


async def test_keys_after_a_write_in_the_middle_of_the_batch(tmp_path: Path) -> None:
    """An erase (or a delete) writes out what the batch decided before it: keys looked up at the
    batch's start are then out of date, and the appends after it see the turns as they are now."""
    async with open_store(tmp_path / "s", watch_workspaces=False) as store:
        turns = store.turns
        a, b, gone = [(await turns.create_context()).context_id for _ in range(3)]
        stored = await turns.append_turn(b, "t", b"kept?", idempotency_key="s")
        await turns.append_turn(gone, "t", b"x", idempotency_key="g")
        statements = Statements(store)
        outcomes = await in_one_batch(
            store,
            [
                lambda: turns.append_turn(a, "t", b"early", idempotency_key="e"),
                lambda: turns.append_turn(b, "t", b"kept?", idempotency_key="s"),
                lambda: turns.erase_turns(b),
                lambda: turns.delete_context(gone),
                # after the erase: the stored turn as it is now (erased), the batch's own turn as written
                lambda: turns.append_turn(b, "t", b"kept?", idempotency_key="s"),
                lambda: turns.append_turn(a, "t", b"early", idempotency_key="e"),
                lambda: turns.append_turn(a, "t", b"late", idempotency_key="l"),
                lambda: turns.append_turn(gone, "t", b"x", idempotency_key="g"),
            ],
        )
        early, before_erase, erased, _, after_erase, early_again, late, on_deleted = outcomes
        assert before_erase == stored and erased == 1
        assert after_erase.turn_id == stored.turn_id and after_erase.erased and after_erase.payload == b""
        assert isinstance(early, TurnRecord) and early_again == early
        assert late.parent_turn_id == early.turn_id
        assert type(on_deleted).__name__ == "ContextNotFound"
        assert await chain_of(store, a) == [early.turn_id, late.turn_id]
        assert statements.count("BEGIN") == 1
        assert await turns.check() == []


#: Each child appends the same keys, with the same payloads, from many tasks at once (so its group
#: commits carry many keys each), in an order of its own; it prints what each key was answered with.
RACING_KEYS_CHILD = r"""
import json, random, sys, anyio
from pforge_async import open_store

async def main(root, seed):
    rng = random.Random(seed)
    keys = [f"k{n}" for n in range(64)]
    rng.shuffle(keys)
    got = {}
    async with open_store(root) as store:
        info = await store.turns.open_context("racing")

        async def worker(mine):
            for key in mine:
                turn = await store.turns.append_turn(
                    info.context_id, "t", key.encode(), idempotency_key=key, parent_turn_id=0
                )
                got[key] = turn.turn_id

        async with anyio.create_task_group() as tg:
            for w in range(16):
                tg.start_soon(worker, keys[w::16])
    print(json.dumps(got))

anyio.run(main, sys.argv[1], int(sys.argv[2]))
"""


async def test_four_processes_racing_the_same_keys_store_each_once_and_agree(tmp_path: Path) -> None:
    import json

    from ._procs import run_all, spawn

    root = tmp_path / "store"
    async with open_store(root) as store:
        await store.turns.open_context("racing")
    answers = [json.loads(out) for out in run_all([spawn(RACING_KEYS_CHILD, root, seed) for seed in range(4)])]
    assert all(answer == answers[0] for answer in answers)  # every process got the one stored turn
    assert len(set(answers[0].values())) == 64
    async with open_store(root) as store:
        info = await store.turns.find_context("racing")
        assert info is not None
        for key, turn_id in answers[0].items():
            found = await store.turns.get_turn_by_key(info.context_id, key)
            assert found is not None and found.turn_id == turn_id and found.payload == key.encode()
        assert (await store.check()).ok
