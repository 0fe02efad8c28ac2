"""One flipped byte anywhere in the fs turn log: no read returns wrong data, damage stays local, and the
store still opens, reports the damage and serves everything else."""

from __future__ import annotations

import random
import struct
from pathlib import Path
from typing import Any

import msgspec
import pytest

from pforge_async import (
    ContextNotFound,
    IntegrityError,
    NewTurn,
    ObjectNotFound,
    TurnNotFound,
)
from pforge_async.turnstore import ContextInfo, FsTurnStore, TurnRecord
from pforge_async.turnstore.fs import MAGIC

pytestmark = pytest.mark.anyio

TRIALS = 80


async def build(root: Path) -> dict[str, Any]:
    """A log with every kind of record, and what each read gave before any damage."""
    async with FsTurnStore(root, durability="normal") as store:
        a = await store.open_context("app/a", metadata={"x": 1})
        a_turns = [
            await store.append_turn(a.context_id, "t", b"a%d" % i * 40, idempotency_key=f"a{i}") for i in range(5)
        ]
        b = await store.fork_context(a_turns[2].turn_id, name="app/b", idempotency_key="fork-b")
        await store.append_turns(
            [NewTurn(ctx.context_id, "t", b"batch %d" % i * 40) for ctx in (a, b) for i in range(3)]
        )
        await store.set_context_metadata(a.context_id, {"x": 2, "note": "changed"})
        await store.set_head(b.context_id, a_turns[1].turn_id)
        await store.append_turn(b.context_id, "t", b"after the rewind" * 10)
        c = await store.create_context()
        for i in range(3):
            await store.append_turn(c.context_id, "u", b"c%d" % i * 40)
        await store.publish_registry_bundle("bundle", b'{"types": {}}')
        blob = await store.put_blob(b"a blob" * 20)
        before_last = await store.get_context(a.context_id)
        await store.append_turn(a.context_id, "t", b"last" * 10)  # so no record above is the last frame
        turns = {t.turn_id: t for ctx in (a, b, c) async for t in store.iter_turns(ctx.context_id)}
        for turn in a_turns:
            turns[turn.turn_id] = await store.get_turn(turn.turn_id)
        contexts = {ctx.context_id: await store.get_context(ctx.context_id) for ctx in (a, b, c)}
        chains = {ctx: [t.turn_id for t in await store.list_turns(ctx, limit=1000)] for ctx in contexts}
        assert await store.check() == []
    keyed = [(a.context_id, f"a{i}", b"a%d" % i * 40, t.turn_id) for i, t in enumerate(a_turns)]
    fork = (a_turns[2].turn_id, b.context_id)
    return {
        "turns": turns,
        "contexts": contexts,
        "chains": chains,
        "blob": blob,
        "before_last": before_last,
        "keyed": keyed,
        "fork": fork,
    }


def frames(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of each frame of a sound log."""
    out = []
    pos = len(MAGIC)
    while pos < len(data):
        (size,) = struct.unpack_from("<I", data, pos)
        out.append((pos, pos + 12 + size))
        pos += 12 + size
    return out


def same_context(got: ContextInfo, want: ContextInfo, damaged: bool) -> bool:
    # A change logged in a damaged record is lost, so updated_at_ms may be behind what it was.
    if damaged:
        got = msgspec.structs.replace(got, updated_at_ms=want.updated_at_ms)
    return got == want


async def test_one_flipped_byte_anywhere(tmp_path: Path) -> None:
    pristine_dir = tmp_path / "pristine"
    expected = await build(pristine_dir)
    pristine = (pristine_dir / "turns.log").read_bytes()
    last_frame = frames(pristine)[-1]
    rng = random.Random(1234)
    positions = [rng.randrange(len(pristine)) for _ in range(TRIALS - 2)] + [3, last_frame[0] - 5]
    for trial, at in enumerate(positions):
        root = tmp_path / f"trial{trial}"
        root.mkdir()
        damaged = bytearray(pristine)
        damaged[at] ^= 1 << rng.randrange(8)
        (root / "turns.log").write_bytes(bytes(damaged))
        in_last = last_frame[0] <= at
        try:
            await verify(root, expected, at, in_last)
        except AssertionError as exc:
            raise AssertionError(f"byte {at} flipped (trial {trial}): {exc}") from exc


async def verify(root: Path, expected: dict[str, Any], at: int, in_last: bool) -> None:
    turns: dict[int, TurnRecord] = expected["turns"]
    contexts: dict[int, ContextInfo] = expected["contexts"]
    async with FsTurnStore(root, durability="normal") as store:
        problems = await store.check()
        # Every byte but the last frame's is under a checksum: damage there is always reported. A
        # damaged last frame is a torn write: truncated, as if it never was.
        assert problems or in_last, "damage went unreported"
        damage = bool(problems)
        lost = (TurnNotFound, ContextNotFound) if damage or in_last else ()
        for turn_id, want in turns.items():
            try:
                assert await store.get_turn(turn_id) == want, f"turn {turn_id} came back wrong"
            except IntegrityError:
                assert damage
            except lost:
                pass
        for context_id, info in contexts.items():
            try:
                got = await store.get_context(context_id)
                # A torn last write (the last append to "app/a") may be gone, as if never made.
                torn = in_last and got == expected["before_last"]
                assert same_context(got, info, damage) or torn, f"context {context_id} came back wrong: {got}"
            except IntegrityError:
                assert damage
            except lost:
                pass
            try:
                chain = [t.turn_id for t in await store.list_turns(context_id, limit=1000)]
                assert chain == expected["chains"][context_id] or (in_last and not damage)
            except IntegrityError:
                assert damage
            except lost:
                pass
            try:
                chain = [t.turn_id async for t in store.iter_turns(context_id, newest_first=True, page_size=2)]
                assert chain == expected["chains"][context_id][::-1] or (in_last and not damage)
            except IntegrityError:
                assert damage
            except lost:
                pass
        for order in ("updated", "created", "name"):
            page = await store.list_contexts(order=order, limit=100)  # type: ignore[arg-type]
            for got in page.contexts:
                torn = in_last and got == expected["before_last"]
                assert same_context(got, contexts[got.context_id], damage) or torn, f"listed wrong: {got}"
        for name in ("app/a", "app/b"):
            try:
                found = await store.find_context(name)
                torn = in_last and found == expected["before_last"]
                assert found is None or same_context(found, contexts[found.context_id], damage) or torn
            except IntegrityError:
                assert damage
        try:
            bundle = await store.get_registry_bundle("bundle")
            assert bundle in (b'{"types": {}}', None)
        except IntegrityError:
            assert damage
        try:
            assert await store.get_blob(expected["blob"]) == b"a blob" * 20
        except (IntegrityError, ObjectNotFound):
            assert damage or in_last
        # Retries of keyed writes find what they wrote (or the damage), never write it again.
        for context_id, key, payload, turn_id in expected["keyed"]:
            try:
                again = await store.append_turn(context_id, "t", payload, idempotency_key=key)
                assert again.turn_id == turn_id, f"retry of {key} appended turn {again.turn_id}"
            except IntegrityError:
                assert damage
            except lost:
                pass
        base, fork_id = expected["fork"]
        try:
            refork = await store.fork_context(base, name="app/b", idempotency_key="fork-b")
            assert refork.context_id == fork_id
        except IntegrityError:
            assert damage
        except lost:
            pass
        # Still serving: new writes get ids nothing damaged could have held.
        fresh = await store.create_context(name="fresh")
        turn = await store.append_turn(fresh.context_id, "t", b"new")
        assert fresh.context_id not in contexts
        assert turn.turn_id not in turns or (in_last and not damage)  # a torn last write's id is free
    async with FsTurnStore(root, durability="normal") as store:  # and again after a reopen
        assert await store.check() == problems
        assert (await store.get_turn(turn.turn_id)).payload == b"new"


async def test_a_damaged_magic_line_is_reported_not_fatal(tmp_path: Path) -> None:
    async with FsTurnStore(tmp_path) as store:
        ctx = await store.create_context()
        first = await store.append_turn(ctx.context_id, "t", b"x")
        await store.append_turn(ctx.context_id, "t", b"y")
    log = tmp_path / "turns.log"
    data = bytearray(log.read_bytes())
    data[2] ^= 0x10
    log.write_bytes(bytes(data))
    async with FsTurnStore(tmp_path) as store:
        assert any("magic" in p for p in await store.check())
        assert await store.get_turn(first.turn_id) == first
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "turns.log").write_bytes(b"some other file entirely\n" * 10)
    with pytest.raises(IntegrityError, match="not a pforge turn log"):
        async with FsTurnStore(tmp_path / "other"):
            pass


async def test_a_log_written_before_sessions_still_opens(tmp_path: Path) -> None:
    """Frames without an index, records without the session fields: read as they were, then
    appended to with indexed frames."""
    import hashlib
    import zlib

    def old_frame(record: dict[str, Any]) -> bytes:
        body = msgspec.msgpack.encode(record)
        head = struct.pack("<II", len(body), zlib.crc32(body))
        return head + struct.pack("<I", zlib.crc32(head)) + body

    turn = {
        "type": "turn",
        "record": {
            "turn_id": 1,
            "context_id": 1,
            "parent_turn_id": 0,
            "depth": 1,
            "type_id": "user",
            "type_version": 1,
            "payload": b"old",
            "payload_hash": hashlib.sha256(b"old").hexdigest(),
            "idempotency_key": "k",
            "created_at_ms": 5,
        },
    }
    log = tmp_path / "turns.log"
    log.write_bytes(MAGIC + old_frame({"type": "ctx", "context_id": 1, "head_turn_id": 0}) + old_frame(turn))
    async with FsTurnStore(tmp_path) as store:
        info = await store.get_context(1)
        assert (info.head_turn_id, info.name, info.metadata, info.updated_at_ms) == (1, None, {}, 5)
        assert (await store.get_turn_by_key(1, "k")).payload == b"old"  # type: ignore[union-attr]
        named = await store.open_context("new")
        await store.append_turn(1, "user", b"new")
    async with FsTurnStore(tmp_path) as store:
        assert await store.check() == []
        assert [t.payload for t in await store.list_turns(1)] == [b"old", b"new"]
        assert await store.find_context("new") == await store.get_context(named.context_id)
