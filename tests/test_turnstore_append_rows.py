"""The SQLite turn actor writes a batch's turns with one of two statements: without the nullable
columns (no key, fs_root or refs in the whole batch) or with them (0 binds NULL). Turns of both
shapes in one group commit must come back, and sit in ``turns.db``, exactly as appended."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import anyio
import pytest

from pforge_async import open_store
from pforge_async.turnstore import NewTurn

pytestmark = pytest.mark.anyio


async def test_mixed_shapes_in_one_group_commit_store_what_was_asked(tmp_path: Path) -> None:
    async with open_store(tmp_path / "s", watch_workspaces=False) as store:
        turns = store.turns
        blob = await store.cas.write_blob(b"kept by a ref")
        tree = await store.cas.write_tree([("a.txt", "100644", blob)])
        contexts = [(await turns.create_context()).context_id for _ in range(8)]
        asked: dict[int, tuple[str | None, str | None, tuple[str, ...], bytes]] = {}

        async def writer(w: int) -> None:
            for i in range(40):
                shape = (w + i) % 5
                key = f"k{w}-{i}" if shape in (1, 4) else None
                fs_root = tree if shape in (2, 4) else None
                refs = (blob,) if shape in (3, 4) else ()
                payload = b"" if i % 7 == 0 else f"{w}/{i}".encode()
                record = await turns.append_turn(
                    contexts[w], "t", payload, idempotency_key=key, fs_root=fs_root, refs=refs
                )
                asked[record.turn_id] = (key, fs_root, refs, payload)

        batches_before = store.turns._actor.batches
        async with anyio.create_task_group() as tg:
            for w in range(8):
                tg.start_soon(writer, w)
        # 320 appends from 8 concurrent writers went through far fewer commits: shapes were mixed.
        assert store.turns._actor.batches - batches_before < 320
        # and an append_turns batch of both shapes
        records = await turns.append_turns(
            [NewTurn(contexts[0], "t", b"lean"), NewTurn(contexts[0], "t", b"keyed", idempotency_key="batch-k")]
        )
        asked[records[0].turn_id] = (None, None, (), b"lean")
        asked[records[1].turn_id] = ("batch-k", None, (), b"keyed")
        for turn_id, (key, fs_root, refs, payload) in asked.items():
            got = await turns.get_turn(turn_id)
            assert (got.idempotency_key, got.fs_root, got.refs, got.payload) == (key, fs_root, refs, payload)
        assert await turns.check() == []

    conn = sqlite3.connect(tmp_path / "s" / "turns.db")
    try:
        rows = conn.execute(
            "SELECT typeof(idempotency_key), typeof(fs_root), typeof(refs), typeof(payload), count(*) "
            "FROM turns GROUP BY 1, 2, 3, 4"
        ).fetchall()
    finally:
        conn.close()
    # NULL where nothing was given (never the 0 bound for it), text where something was, the
    # payload a blob (bound as a bytearray), the empty one included.
    assert {r[:4] for r in rows} == {
        ("null", "null", "null", "blob"),
        ("text", "null", "null", "blob"),
        ("null", "text", "null", "blob"),
        ("null", "null", "text", "blob"),
        ("text", "text", "text", "blob"),
    }
    assert sum(r[4] for r in rows) == len(asked)
