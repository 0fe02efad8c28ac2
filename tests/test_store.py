from __future__ import annotations

import stat
from pathlib import Path

import pytest

from pforge_async import ActorClosed, InvalidInput, StorageError, open_store

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
    with pytest.raises(StorageError) as info:
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
