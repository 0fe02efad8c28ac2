"""The PostgreSQL CAS's snapshot sink and a file that grows while it reads it: the file is never read
whole into memory however far it grows, and what is stored is what the file holds."""

from __future__ import annotations

import hashlib
import os
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from pforge_async.cas.objects import BLOB, hash_object

pytestmark = pytest.mark.anyio

MiB = 1 << 20


class _GrowsAtFstat:
    """``os`` for the sink's module, but its ``fstat`` of the watched file extends the file right
    after measuring it: the tool, between the sink's measure and its read."""

    def __init__(self, watched: Path, to: int) -> None:
        self._watched = os.stat(watched).st_ino
        self._path = watched
        self._to = to

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def fstat(self, fd: int) -> os.stat_result:
        st = os.fstat(fd)
        if st.st_ino == self._watched and st.st_size < self._to:
            os.truncate(self._path, self._to)  # sparse: instant
        return st


async def test_a_file_grown_past_its_measure_is_streamed_not_held(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pg_dsn: str, pg_schema: str
) -> None:
    import pforge_async.postgres.cas as pg_cas_module
    from pforge_async.postgres.cas import open_pg_cas

    work = tmp_path / "work"
    work.mkdir()
    grower = work / "grows.log"
    grower.write_bytes(b"x" * (2 * MiB))  # over the 1 MiB the scan reads whole: handed to the sink
    grown = 96 * MiB
    async with open_pg_cas(pg_dsn, schema=pg_schema, cache_dir=tmp_path / "cache") as cas:
        monkeypatch.setattr(pg_cas_module, "os", _GrowsAtFstat(grower, grown))
        tracemalloc.start()
        try:
            tree = await cas.snapshot(work)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
            monkeypatch.undo()
        # Never the whole file (before: 716 MiB of this 96 MiB file); chunks of 8 MiB in flight.
        assert peak < grown, f"the sink held {peak / MiB:.0f} MiB of a {grown // MiB} MiB file measured at 2 MiB"
        (entry,) = await cas.read_tree(tree)
        expected = hash_object(BLOB, grower.read_bytes()).hex()
        assert entry.oid == expected
        data = await cas.read_blob(entry.oid)
        assert len(data) == grown and hashlib.sha256(data).digest() == hashlib.sha256(grower.read_bytes()).digest()
