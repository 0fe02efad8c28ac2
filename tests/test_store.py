from __future__ import annotations

import sqlite3
import stat
from pathlib import Path

import pytest

from pforge_async import ActorClosed, InvalidInput, Store, Usage, open_store

pytestmark = pytest.mark.anyio


async def test_open_store_creates_an_owner_only_layout(tmp_path: Path) -> None:
    root = tmp_path / "deep" / ".pforge"
    async with open_store(root) as store:
        assert store.root == root
        assert store.durability == "full"
        assert (root / "locks").is_dir()
    assert stat.S_IMODE(root.stat().st_mode) == 0o700


async def test_open_store_rejects_an_unknown_durability(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="durability"):
        async with open_store(tmp_path / "s", durability="sometimes"):  # type: ignore[arg-type]
            pass
    assert not (tmp_path / "s").exists()


async def test_open_store_rejects_a_root_that_is_a_file(tmp_path: Path) -> None:
    root = tmp_path / "file"
    root.write_text("not a store")
    with pytest.raises(InvalidInput) as info:
        async with open_store(root):
            pass
    assert "file" in str(info.value)
    assert root.read_text() == "not a store"


async def test_an_error_in_the_block_comes_out_as_itself(tmp_path: Path) -> None:
    cause = KeyError("inner")
    with pytest.raises(ValueError, match="user error") as info:
        async with open_store(tmp_path / "s"):
            raise ValueError("user error") from cause
    assert info.value.__cause__ is cause


async def test_every_part_refuses_calls_after_close(tmp_path: Path) -> None:
    async with open_store(tmp_path / "s") as store:
        blob = await store.cas.write_blob(b"x")
        ctx = await store.turns.create_context()
    calls = [
        store.cas.read_blob(blob),
        store.cas.write_blob(b"y"),
        store.cas.read_tree(blob),
        store.turns.get_head(ctx.context_id),
        store.turns.append_turn(ctx.context_id, "t", b"x"),
        store.memory.stats("s"),
        store.nonces.issue("s", 1),
        store.budget.totals("v"),
    ]
    for call in calls:
        with pytest.raises(ActorClosed):
            await call


async def _fill(store: Store) -> None:
    ctx = await store.turns.create_context()
    first = await store.turns.append_turn(ctx.context_id, "user", b"hello")
    fork = await store.turns.fork_context(first.turn_id)
    await store.turns.append_turn(fork.context_id, "assistant", b"hi")
    await store.memory.record_transition("s", "a", "t", 0.5, True)
    await store.budget.set_budget("v", tokens=1000)
    held = await store.budget.reserve("v", tokens=100)
    await store.budget.commit(held, Usage(10, 20, 0))
    await store.nonces.consume(await store.nonces.issue("x", 60), "x")
    await store.cas.write_blob(b"some blob")


async def test_check_passes_on_a_sound_store_and_names_every_tampering(tmp_path: Path) -> None:
    root = tmp_path / "s"
    async with open_store(root) as store:
        await _fill(store)
        report = await store.check()
        assert report.ok, report.problems
        assert report.cas.checked >= 1
    with sqlite3.connect(root / "turns.db") as conn:
        conn.execute("UPDATE turns SET payload = X'00' WHERE turn_id = 2")
        conn.execute("UPDATE turns SET depth = 7 WHERE turn_id = 1")
    conn.close()
    with sqlite3.connect(root / "memory.db") as conn:
        conn.execute("UPDATE action_stats SET count = 5")
    conn.close()
    with sqlite3.connect(root / "budget.db") as conn:
        conn.execute("UPDATE spend_totals SET tokens = tokens + 1")
    conn.close()
    async with open_store(root) as store:
        problems = (await store.check()).problems
    text = "\n".join(problems)
    assert "turn 2 does not match its payload_hash" in text
    assert "depth is not their parent's plus one" in text
    assert "action_stats that differ" in text
    assert "spend_totals that differ" in text
