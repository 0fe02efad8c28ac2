"""gc and check beside hostile turns: any writer may append a turn of an agent or pipeline record type
whose payload is no such record. One nested deeper than msgspec recurses (a map whose ``metadata`` is
100,000 nested arrays) names no object, as any payload that does not decode, instead of making every
``store.gc`` and ``store.check`` (and ``pforge gc`` / ``pforge check``) fail with a ``RecursionError``."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from pforge_async import open_store

from .test_adv_cli_common import ok, pforge

pytestmark = pytest.mark.anyio

DEEP_METADATA = b"\x81" + msgspec.msgpack.encode("metadata") + b"\x81\xa1k" + b"\x91" * 100_000 + b"\xc0"


@pytest.mark.parametrize("type_id", ["pforge.agent.tool_call_end", "pforge.attractor.checkpoint"])
async def test_a_record_type_holding_a_deeply_nested_payload_neither_stops_gc_nor_check(
    tmp_path: Path, type_id: str
) -> None:
    root = tmp_path / ".pforge"
    async with open_store(root, watch_workspaces=False) as store:
        ctx = await store.turns.open_context("deep")
        kept = await store.cas.write_blob(b"named by a live turn")
        await store.turns.append_turn(ctx.context_id, type_id, DEEP_METADATA, refs=[kept])
        assert (await store.check()).ok
        report = await store.gc(grace_s=0)
        assert report.roots == 1
        assert await store.cas.read_blob(kept) == b"named by a live turn"
    assert json.loads(ok(pforge("--root", str(root), "--json", "check")))["ok"] is True
    assert json.loads(ok(pforge("--root", str(root), "--json", "gc", "--grace", "0")))["roots"] == 1
