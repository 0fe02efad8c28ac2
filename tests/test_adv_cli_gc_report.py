"""``pforge gc`` reports the store's size as it was before the command and as it is after it. The
writable open it makes reserves up to 4 MiB of ``-wal`` blocks per database, which gc's compaction
then truncates: measured after the open, a store of 300 KiB that held nothing to reclaim "went" from
16.3 MiB to 300 KiB, "freed 16.0 MiB"."""

from __future__ import annotations

import json
import os
from pathlib import Path

import anyio

from pforge_async import open_store

from .test_adv_cli_common import ok, pforge


def apparent_bytes(root: Path) -> int:
    total = 0
    for directory, _, names in os.walk(root):
        total += sum(os.lstat(os.path.join(directory, name)).st_size for name in names)
    return total


def test_gc_of_a_store_with_nothing_to_reclaim_frees_nothing_it_did_not_make(tmp_path: Path) -> None:
    root = tmp_path / ".pforge"

    async def fill() -> None:
        async with open_store(root, watch_workspaces=False) as store:
            ctx = await store.turns.open_context("kept")
            for i in range(20):
                await store.turns.append_turn(ctx.context_id, "plain", b"turn %d" % i)

    anyio.run(fill)
    before = apparent_bytes(root)
    report = json.loads(ok(pforge("--root", str(root), "--json", "gc", "--grace", "0")))
    after = apparent_bytes(root)
    assert report["turns_reclaimed"] == 0 and report["objects_reclaimed"] == 0
    assert report["bytes_before"] == before, (report["bytes_before"], before)
    assert report["bytes_after"] == after, (report["bytes_after"], after)
    assert report["bytes_freed"] == max(0, before - after)
    dry = json.loads(ok(pforge("--root", str(root), "--json", "gc", "--grace", "0", "--dry-run")))
    assert dry["bytes_before"] == after and dry["bytes_freed"] == 0
