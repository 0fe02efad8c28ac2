"""The snapshot stat cache keys a file by its device too.

It matched a file to what was stored under the same path by ``(mode, size, mtime, ctime, inode)``.
Inode numbers are per file system: under a bind mount or another file system mounted inside the
workspace, a different file can carry the same numbers, and the snapshot then named the old content.
Making a second device takes root, so the scan's listing is doctored where it stats an entry (the
``os`` the snapshot module sees): the file's recorded stat, on another device. Run on the file CAS
and on ``PgCas``, which share the scan.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgspec
import pytest

from pforge_async.cas import snapshot as snapshot_module
from pforge_async.cas.snapshot import cache_file

from .test_cas2_depth import backend  # noqa: F401 (file store without its watch, and PgCas)
from .test_pg_cas import Backend

pytestmark = pytest.mark.anyio


class _Entry:
    """A listing entry whose ``stat`` says what the test wants for one name."""

    def __init__(self, entry: os.DirEntry[str], fake: Any) -> None:
        self._entry = entry
        self._fake = fake
        self.name = entry.name

    def is_dir(self, *, follow_symlinks: bool = True) -> bool:
        return self._entry.is_dir(follow_symlinks=follow_symlinks)

    def is_file(self, *, follow_symlinks: bool = True) -> bool:
        return self._entry.is_file(follow_symlinks=follow_symlinks)

    def stat(self, *, follow_symlinks: bool = True) -> Any:
        return self._fake


class _Listing:
    def __init__(self, fd: int, fakes: dict[str, Any]) -> None:
        self._scan = os.scandir(fd)
        self._fakes = fakes

    def __enter__(self) -> Iterator[Any]:
        entries = list(self._scan)
        return iter(_Entry(e, self._fakes[e.name]) if e.name in self._fakes else e for e in entries)

    def __exit__(self, *exc: object) -> None:
        self._scan.close()


class _Os:
    """``os`` as the snapshot module sees it, with the listing's stat of some names replaced."""

    def __init__(self, fakes: dict[str, Any]) -> None:
        self.fakes = fakes

    def scandir(self, fd: int) -> _Listing:
        return _Listing(fd, self.fakes)

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


def _as_stat(st: os.stat_result, **changes: int) -> SimpleNamespace:
    fields = {
        name: getattr(st, name) for name in ("st_mode", "st_size", "st_mtime_ns", "st_ctime_ns", "st_ino", "st_dev")
    }
    fields.update(changes)
    return SimpleNamespace(**fields)


def _wait_until_cacheable(path: Path) -> None:
    """Wait until the file's times are clear of the racy window, so a snapshot keeps its entry (50 ms
    after its mtime and ctime; 2 s where the file system keeps whole seconds)."""
    st = os.stat(path)
    coarse = st.st_mtime_ns % 1_000_000_000 == 0 and st.st_ctime_ns % 1_000_000_000 == 0
    clear = max(st.st_mtime_ns, st.st_ctime_ns) + (2_100_000_000 if coarse else 100_000_000)
    while time.time_ns() < clear:
        time.sleep(0.02)


async def _blob_of(under_test: Backend, tree: str, name: str) -> bytes:
    (entry,) = [e for e in await under_test.cas.read_tree(tree) if e.name == name]
    return bytes(await under_test.cas.read_blob(entry.oid))


async def test_a_file_with_equal_numbers_on_another_device_is_read(
    backend: Backend,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    work = backend.tmp_path / "work"
    work.mkdir()
    (work / "a").write_bytes(b"one\n")
    _wait_until_cacheable(work / "a")
    first = await backend.cas.snapshot(work)
    recorded = os.stat(work / "a")
    (work / "a").write_bytes(b"two\n")  # same size; its own stat differs, the doctored one does not
    fake_os = _Os({})
    monkeypatch.setattr(snapshot_module, "os", fake_os)
    # The control: the recorded stat on the recorded device is answered from the cache (as designed:
    # the stat says the file did not change), which shows the entry is there and used.
    fake_os.fakes["a"] = _as_stat(recorded)
    assert await backend.cas.snapshot(work) == first
    # The same numbers on another device: another file, read.
    fake_os.fakes["a"] = _as_stat(recorded, st_dev=recorded.st_dev + 1)
    second = await backend.cas.snapshot(work)
    assert await _blob_of(backend, second, "a") == b"two\n"


async def test_a_cache_written_without_devices_is_never_trusted(tmp_path: Path, backend: Backend) -> None:  # noqa: F811
    """A stat cache file from before the device was in the key (6-field entries) matching the file's
    stat exactly but naming other content: it is dropped, the file is read."""
    work = backend.tmp_path / "work"
    work.mkdir()
    (work / "a").write_bytes(b"two\n")
    _wait_until_cacheable(work / "a")
    stale = await backend.cas.write_blob(b"one\n")
    st = os.stat(work / "a")
    old_entry = (st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, stale)
    cache_dir = Path(backend.cas._cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    cache_file(cache_dir, str(work)).write_bytes(msgspec.msgpack.encode({b"a": old_entry}))
    tree = await backend.cas.snapshot(work)
    assert await _blob_of(backend, tree, "a") == b"two\n"
