"""Adversarial inputs to the turn store's public API, on every backend: values of subclasses of the
accepted types (a ``StrEnum`` type id, an ``int`` subclass id, a ``bytes`` subclass payload) and
buffers that cannot be read. Each backend must give the same answer: the value as its plain type, or
a named ``pforge_async`` error, never a ``TypeError`` from an encoder and nothing stored."""

from __future__ import annotations

import enum
from pathlib import Path

import pytest

from pforge_async import InvalidInput, NewTurn
from pforge_async.turnstore.base import TurnStoreBase

from .test_turnstore import BACKENDS, open_backend

pytestmark = pytest.mark.anyio


class Text(str):
    """A str subclass, as a framework's typed ids are."""


class Number(int):
    """An int subclass without an ``IntEnum``'s encoder support."""


class Blob(bytes):
    """A bytes subclass (a framework's typed payload)."""


class Kind(str, enum.Enum):
    """A mixed-in str enum: ``str()`` of a member is ``'Kind.USER'``, its value ``'user'``."""

    USER = "user"


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path):  # type: ignore[no-untyped-def]
    async with open_backend(request.param, tmp_path) as opened:
        yield opened


async def test_subclass_values_are_stored_as_their_plain_types(store: TurnStoreBase) -> None:
    ctx = await store.create_context(name=Text("chat"), idempotency_key=Text("create"))
    assert type(ctx.name) is str and ctx.name == "chat"
    first = await store.append_turn(
        Number(ctx.context_id), Kind.USER, Blob(b"hi"), idempotency_key=Text("k1"), type_version=Number(2)
    )
    assert (type(first.type_id), first.type_id, type(first.payload), first.payload) == (str, "user", bytes, b"hi")
    assert type(first.idempotency_key) is str and first.idempotency_key == "k1"
    assert type(first.type_version) is int
    # the retry of the same append, in plain types, is the same turn
    again = await store.append_turn(ctx.context_id, "user", b"hi", idempotency_key="k1", type_version=2)
    assert again.turn_id == first.turn_id
    second = await store.append_turn(
        ctx.context_id, "t", b"x", parent_turn_id=Number(first.turn_id), expected_head=Number(first.turn_id)
    )
    [third] = await store.append_turns(
        [NewTurn(Number(ctx.context_id), Text("t"), Blob(b"y"), idempotency_key=Kind.USER)],
        expected_heads={Number(ctx.context_id): Number(second.turn_id)},
    )
    assert type(third.payload) is bytes and third.idempotency_key == "user"
    await store.set_head(Number(ctx.context_id), Number(second.turn_id), expected_head=Number(third.turn_id))
    await store.set_context_metadata(Number(ctx.context_id), {"a": 1})
    fork = await store.fork_context(
        Number(first.turn_id), parent_context_id=Number(ctx.context_id), name=Kind.USER, idempotency_key=Text("f")
    )
    assert fork.name == "user" and type(fork.name) is str
    assert (await store.open_context(Text("chat"))).context_id == ctx.context_id
    assert (await store.get_turn_by_key(Number(ctx.context_id), Text("k1"))).turn_id == first.turn_id  # type: ignore[union-attr]
    assert await store.prune_context(Number(ctx.context_id), keep_last=Number(1)) == 1
    await store.delete_context(Number(fork.context_id))
    assert [t.turn_id for t in await store.list_turns(ctx.context_id)] == [first.turn_id, second.turn_id]
    assert await store.check() == []


@pytest.mark.parametrize("batch", [False, True])
async def test_a_released_buffer_is_invalid_input(store: TurnStoreBase, batch: bool) -> None:
    ctx = await store.create_context()
    view = memoryview(b"gone")
    view.release()
    with pytest.raises(InvalidInput):
        if batch:
            await store.append_turns([NewTurn(ctx.context_id, "t", view)])  # type: ignore[arg-type]
        else:
            await store.append_turn(ctx.context_id, "t", view)  # type: ignore[arg-type]
    assert await store.list_turns(ctx.context_id) == []
    assert (await store.append_turn(ctx.context_id, "t", b"ok")).depth == 1
