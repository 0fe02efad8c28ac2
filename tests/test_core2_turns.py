"""Turn store inputs taken the same way on every backend (memory, fs log, SQLite, PostgreSQL):
``refs`` as any iterable of object ids, and context metadata given as dict subclasses."""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from pforge_async import IdempotencyConflict, InvalidInput, NewTurn
from pforge_async.postgres.cas import open_pg_cas
from pforge_async.turnstore.base import TurnStoreBase

from .test_pg_turnstore import open_pg_turns
from .test_turnstore import open_backend

pytestmark = pytest.mark.anyio

BACKENDS = ["memory", "fs", "sqlite", "postgres"]


@asynccontextmanager
async def open_any(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[TurnStoreBase]:
    """The conformance suites' backends (test_turnstore.py's three, test_pg_turnstore.py's PostgreSQL
    one with its CAS in the same schema), opened the way those suites open them."""
    if kind != "postgres":
        async with open_backend(kind, tmp_path) as opened:
            yield opened
        return
    dsn, schema = request.getfixturevalue("pg_dsn"), request.getfixturevalue("pg_schema")
    async with open_pg_cas(dsn, schema=schema) as cas, open_pg_turns(dsn, schema, cas) as opened:  # type: ignore[arg-type]
        yield opened


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[TurnStoreBase]:
    async with open_any(request.param, request, tmp_path) as opened:
        yield opened


class Counted:
    """An iterable that is not a tuple, list or set, counting how often it is iterated."""

    def __init__(self, items: list[str]) -> None:
        self.items = items
        self.iterations = 0

    def __iter__(self) -> Iterator[str]:
        self.iterations += 1
        return iter(self.items)


# -- refs: any iterable ------------------------------------------------------------------------------


async def test_refs_take_any_iterable_read_once(store: TurnStoreBase) -> None:
    blobs = [await store.put_blob(b"blob %d" % i) for i in range(3)]
    want = tuple(sorted(blobs))
    ctx = await store.create_context()
    pulled: list[str] = []

    def generator() -> Iterator[str]:
        for oid in [blobs[2], blobs[0], blobs[1], blobs[0]]:
            pulled.append(oid)
            yield oid

    record = await store.append_turn(ctx.context_id, "t", b"a", refs=generator(), idempotency_key="k")
    assert record.refs == want
    assert len(pulled) == 4  # read once, to its end
    assert (await store.get_turn(record.turn_id)).refs == want

    # Other iterables: a custom one, a dict's keys, a map; each read once.
    counted = Counted([blobs[1], blobs[0]])
    custom = await store.append_turn(ctx.context_id, "t", b"b", refs=counted)
    assert custom.refs == tuple(sorted(blobs[:2])) and counted.iterations == 1
    keys = await store.append_turn(ctx.context_id, "t", b"c", refs=dict.fromkeys(blobs).keys())
    assert keys.refs == want
    mapped = await store.append_turn(ctx.context_id, "t", b"d", refs=map(str.lower, blobs))
    assert mapped.refs == want

    # A retry names them by a generator too: the same turn back; other refs still conflict.
    again = await store.append_turn(ctx.context_id, "t", b"a", refs=iter(reversed(blobs)), idempotency_key="k")
    assert again == record
    with pytest.raises(IdempotencyConflict, match="refs"):
        await store.append_turn(ctx.context_id, "t", b"a", refs=(b for b in blobs[:1]), idempotency_key="k")

    # A batch's NewTurn takes one as well.
    [batched] = await store.append_turns([NewTurn(ctx.context_id, "t", b"e", refs=(b for b in blobs))])  # type: ignore[arg-type]
    assert batched.refs == want and (await store.get_turn(batched.turn_id)).refs == want
    assert await store.check() == []


async def test_refs_that_are_not_ids_store_nothing(store: TurnStoreBase) -> None:
    blob = await store.put_blob(b"kept")
    ctx = await store.create_context()

    def failing() -> Iterator[str]:
        yield blob
        raise RuntimeError("the caller's source broke")

    def endless() -> Iterator[str]:
        while True:
            yield blob

    # Factories: a generator is read once, so each call gets its own.
    bad: list[tuple[Callable[[], object], str]] = [
        (lambda: blob, "iterable of object ids, got str"),  # a str is an iterable of characters
        (lambda: blob.encode(), "iterable of object ids, got bytes"),
        (lambda: bytearray(blob.encode()), "got bytearray"),
        (lambda: 7, "iterable of object ids, got int"),
        (lambda: None, "got NoneType"),
        (failing, "could not be read"),
        (endless, "over the maximum of 4096"),
        (lambda: (oid for oid in [blob, "not an id"]), "invalid ref"),
        (lambda: iter([blob, 5]), "invalid ref"),
    ]
    for make, message in bad:
        with pytest.raises(InvalidInput, match=message):
            await store.append_turn(ctx.context_id, "t", b"x", refs=make())  # type: ignore[arg-type]
        with pytest.raises(InvalidInput, match=message):
            await store.append_turns([NewTurn(ctx.context_id, "t", b"x", refs=make())])  # type: ignore[arg-type]
    head = await store.get_head(ctx.context_id)
    assert (head.head_turn_id, await store.list_turns(ctx.context_id)) == (0, [])
    # ... and the store serves on.
    served = await store.append_turn(ctx.context_id, "t", b"x", refs=iter([blob]))
    assert served.refs == (blob,)


# -- metadata: dict subclasses as plain dicts ----------------------------------------------------------


class Role(enum.StrEnum):
    USER = "user"


class Level(enum.IntEnum):
    HIGH = 3


class Tracked(dict[str, Any]):
    """A user's dict subclass whose ``items`` lies: what it holds is what is stored."""

    def items(self) -> Any:
        return [("invented", True)]


def plain_types(value: object) -> bool:
    """Whether ``value`` is built of exact JSON types only."""
    if type(value) is dict:
        return all(type(k) is str and plain_types(v) for k, v in value.items())
    if type(value) is list:
        return all(plain_types(v) for v in value)
    return value is None or type(value) in (str, int, float, bool)


async def test_metadata_takes_dict_subclasses_as_plain_dicts(store: TurnStoreBase) -> None:
    given = OrderedDict(
        [("z", 1), ("role", Role.USER), (Role.USER, [Level.HIGH, 1.5, Tracked(deep=OrderedDict(x=None))])]
    )
    want = {"z": 1, "role": "user", "user": [3, 1.5, {"deep": {"x": None}}]}
    made = await store.create_context(name="a", metadata=given, idempotency_key="create-a")
    assert made.metadata == want and plain_types(made.metadata)
    read = await store.get_context(made.context_id)
    assert read.metadata == want and plain_types(read.metadata)
    # The same request again as a plain dict is a retry of it, not another request.
    assert (await store.create_context(name="a", metadata=want, idempotency_key="create-a")) == made

    turn = await store.append_turn(made.context_id, "t", b"x")
    forked = await store.fork_context(turn.turn_id, metadata=Tracked(k="v"))
    assert (await store.get_context(forked.context_id)).metadata == {"k": "v"}
    opened = await store.open_context("b", metadata=OrderedDict(n=Level.HIGH))
    assert opened.metadata == {"n": 3} and type(opened.metadata["n"]) is int
    changed = await store.set_context_metadata(made.context_id, Tracked(new=[Role.USER]))
    assert changed.metadata == {"new": ["user"]}
    again = await store.get_context(made.context_id)
    assert again.metadata == {"new": ["user"]} and plain_types(again.metadata)
    assert await store.check() == []


async def test_metadata_still_refuses_what_json_does_not_carry(store: TurnStoreBase) -> None:
    ctx = await store.create_context(metadata={"kept": 1})
    for bad in (OrderedDict(t=(1, 2)), Tracked(b=b"x"), OrderedDict(f=float("nan")), {1: "int key"}, [("a", 1)]):
        with pytest.raises(InvalidInput, match="metadata"):
            await store.set_context_metadata(ctx.context_id, bad)  # type: ignore[arg-type]
    assert (await store.get_context(ctx.context_id)).metadata == {"kept": 1}
