"""``pforge export`` writes JSON Lines to stdout, often a terminal. ``json.dumps(ensure_ascii=False)``
escapes C0 controls but leaves C1 controls (U+009B is an 8-bit CSI) and bidirectional overrides raw:
a payload, key or type id holding them reached the terminal unescaped. They are written as ``\\u``
escapes, which JSON reads back as the same characters, so the export still imports to the same bytes."""

from __future__ import annotations

import json
from pathlib import Path

import anyio

from pforge_async import open_store

from .test_adv_cli_common import ok, pforge

HOSTILE = "a\u202eb\u009b31mc\u2066d\x85e\x7f"


def test_export_lines_carry_no_raw_c1_or_bidi_controls_and_still_round_trip(tmp_path: Path) -> None:
    root = tmp_path / ".pforge"

    async def fill() -> None:
        async with open_store(root, watch_workspaces=False) as store:
            ctx = await store.turns.open_context("hostile")
            await store.turns.append_turn(ctx.context_id, "plain", HOSTILE.encode(), idempotency_key=HOSTILE)
            await store.turns.append_turn(ctx.context_id, "plain", json.dumps({HOSTILE: HOSTILE}).encode())

    anyio.run(fill)
    exported = ok(pforge("--root", str(root), "export", "hostile")).decode("utf-8")
    for char in "\u202e\u009b\u2066\x85\x7f":
        assert char not in exported, repr(char)
    file = tmp_path / "hostile.jsonl"
    file.write_text(exported)
    ok(pforge("--root", str(root), "import", str(file), "--name", "copy"))
    again = ok(pforge("--root", str(root), "export", "copy")).decode("utf-8").splitlines()
    hashes = [json.loads(line)["payload_sha256"] for line in exported.splitlines()]
    assert [json.loads(line)["payload_sha256"] for line in again] == hashes
    assert json.loads(exported.splitlines()[0])["idempotency_key"] == HOSTILE
