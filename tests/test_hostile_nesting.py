"""Payloads nested past the decoders' depth, and limits past what a database stores: named errors,
never a ``RecursionError`` or a backend's bind error, and the store still serving."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from pforge_async import IntegrityError, InvalidInput, open_store
from pforge_async.agent import SessionRecorder, load_session_tree
from pforge_async.attractor import AttractorWriter, load_run

pytestmark = pytest.mark.anyio

#: a msgpack map {"metadata": {"k": [[[...None...]]]}}, 100,000 arrays deep
DEEP = b"\x81" + msgspec.msgpack.encode("metadata") + b"\x81\xa1k" + b"\x91" * 100_000 + b"\xc0"


async def test_an_agent_record_nested_too_deeply_is_an_integrity_error(tmp_path: Path) -> None:
    async with open_store(tmp_path / ".pforge", watch_workspaces=False) as store:
        recorder = await SessionRecorder.start(store, "sess", mode="required")
        await recorder.session_start()
        info = await store.turns.find_context("sess")
        assert info is not None
        # Any writer may store such bytes under an agent type id; readers must name the turn.
        await store.turns.append_turn(info.context_id, "pforge.agent.user_turn", DEEP)
        with pytest.raises(IntegrityError, match="does not decode"):
            await load_session_tree(store, "sess")
        resumed = await SessionRecorder.start(store, "sess")  # best_effort: the failure is kept, not raised
        assert [type(failure.error) for failure in resumed.failures] == [IntegrityError]
        other = await SessionRecorder.start(store, "other", mode="required")
        assert await other.user_turn("still serving") is not None
        assert (await store.check()).ok


async def test_a_registry_bundle_nested_too_deeply_is_invalid_input(tmp_path: Path) -> None:
    async with open_store(tmp_path / ".pforge", watch_workspaces=False) as store:
        with pytest.raises(InvalidInput, match="not valid JSON"):
            await store.turns.publish_registry_bundle("deep", b"[" * 100_000 + b"]" * 100_000)
        assert await store.turns.get_registry_bundle("deep") is None
        await store.turns.open_context("still serving")


@pytest.mark.parametrize("limit", [2**63, 10**20, 10**5000], ids=["2**63", "10**20", "10**5000"])
async def test_a_limit_past_what_a_database_stores_is_invalid_input(tmp_path: Path, limit: int) -> None:
    async with open_store(tmp_path / ".pforge", watch_workspaces=False) as store:
        info = await store.turns.open_context("c")
        await store.turns.append_turn(info.context_id, "t", b"x")
        with pytest.raises(InvalidInput, match="limit must be an int from 0 to 9223372036854775807"):
            await store.turns.list_turns(info.context_id, limit=limit)
        assert len(await store.turns.list_turns(info.context_id, limit=2**63 - 1)) == 1


async def test_a_pipeline_record_nested_too_deeply_is_an_integrity_error(tmp_path: Path) -> None:
    async with open_store(tmp_path / ".pforge", watch_workspaces=False) as store:
        writer = AttractorWriter(store)
        run = await writer.create_run_context("run")
        await writer.append_run_event("run", "started")
        await store.turns.append_turn(run.context.context_id, "pforge.attractor.run_event", DEEP)
        with pytest.raises(IntegrityError, match="does not decode"):
            await load_run(store, "run")
        await writer.create_run_context("still serving")
        assert (await store.check()).ok
