"""PforgeSaver against LangGraph's own checkpointer conformance suite (langgraph-checkpoint-conformance,
run as its README says: register a factory, ``validate``), on the SQLite store, the memory backend and
the filesystem backend: every capability, base and optional, must pass."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from langgraph.checkpoint.conformance import checkpointer_test, validate
from langgraph.checkpoint.conformance.report import CapabilityReport

from pforge_async import FsTurnStore, MemoryTurnStore, open_store
from pforge_async.integrations.langgraph import PforgeSaver

pytestmark = pytest.mark.anyio

ALL_CAPABILITIES = {
    "put",
    "put_writes",
    "get_tuple",
    "list",
    "delete_thread",
    "delete_for_runs",
    "copy_thread",
    "prune",
}


def _check(report: CapabilityReport) -> None:
    report.print_report()
    results = report.to_dict()["results"]
    assert set(results) == ALL_CAPABILITIES
    failures = {name: r["failures"] for name, r in results.items() if r["failures"]}
    assert not failures, failures
    assert all(r["detected"] and r["passed"] is True and not r["tests_skipped"] for r in results.values()), results
    # 81 tests at langgraph-checkpoint-conformance 0.0.2; a later release may add some: all must pass
    assert sum(r["tests_passed"] for r in results.values()) >= 81, results
    assert report.conformance_level() == "FULL"


async def test_conformance_sqlite_store(tmp_path: Path) -> None:
    count = 0

    @checkpointer_test(name="PforgeSaver[sqlite]")
    async def saver() -> AsyncIterator[PforgeSaver]:
        nonlocal count
        count += 1
        async with open_store(tmp_path / f"store{count}", durability="normal") as store:
            yield PforgeSaver(store)

    _check(await validate(saver))


async def test_conformance_memory_backend() -> None:
    @checkpointer_test(name="PforgeSaver[memory]")
    async def saver() -> AsyncIterator[PforgeSaver]:
        yield PforgeSaver(MemoryTurnStore())

    _check(await validate(saver))


async def test_conformance_fs_backend(tmp_path: Path) -> None:
    count = 0

    @checkpointer_test(name="PforgeSaver[fs]")
    async def saver() -> AsyncIterator[PforgeSaver]:
        nonlocal count
        count += 1
        async with FsTurnStore(tmp_path / f"turns{count}") as turns:
            yield PforgeSaver(turns)

    _check(await validate(saver))
