"""Deep trees: ``write_tree`` and ``snapshot`` take the same depths and refuse the same depths.

``write_tree`` built its subtrees recursively and refused paths past Python's recursion limit (about
1,000 levels) while ``snapshot`` stored 3,000; neither had a bound, though git (``core.maxTreeDepth``,
4,096 trees from the root down) refuses to read deeper trees. Now both build without recursion, both
refuse with ``InvalidInput`` past 4,096 trees (the root counted), and every reader (``read_tree``,
``restore``, ``fsck``, gc's reachability walk, the PostgreSQL restore planner) walks 3,000 levels
without recursing out. Run on the file CAS and on ``PgCas``.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from pforge_async import InvalidInput
from pforge_async.cas.gitrules import MAX_TREE_DEPTH

from .test_cas import git_fsck
from .test_pg_cas import Backend, open_backend

pytestmark = pytest.mark.anyio

#: deeper than Python's recursion limit, well inside git's bound
DEEP = 3000


@pytest.fixture(params=["file", "pg"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    """test_pg_cas's backends, the file store without its change watch: dropping thousands of inotify
    watches (one per directory removed) costs a millisecond each, and the watch is not under test."""
    async with open_backend(request, tmp_path, watch_workspaces=False) as opened:
        yield opened


@pytest.fixture
def descriptors() -> Iterator[Callable[[int], None]]:
    """A scan and a restore hold one descriptor per level: ``descriptors(levels)`` raises the soft
    limit to reach that deep (restored afterwards), or skips saying why it cannot."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)

    def need(levels: int) -> None:
        needed = levels + 1024  # and room for everything else the test process holds
        if soft == resource.RLIM_INFINITY or soft >= needed:
            return
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip(
                f"the hard limit on open files ({hard}) is below the {needed} descriptors a "
                f"{levels}-level snapshot needs (one per level); raise it with ulimit -Hn"
            )
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))

    try:
        yield need
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _chain(levels: int) -> str:
    return "/".join(["d"] * levels)


def _make_deep(root: Path, levels: int, content: bytes) -> None:
    """``root/d/d/.../d/f`` with ``levels`` directories, made relative to descriptors (the path is far
    longer than PATH_MAX)."""
    root.mkdir()
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(levels):
            os.mkdir("d", dir_fd=fd)
            child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
        out = os.open("f", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=fd)
        try:
            os.write(out, content)
        finally:
            os.close(out)
    finally:
        os.close(fd)


def _deepen(root: Path, levels: int) -> None:
    """Move the file at the bottom of ``_make_deep(root, levels)`` into a new directory below it."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(levels):
            child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
        os.mkdir("d", dir_fd=fd)
        os.rename("f", "d/f", src_dir_fd=fd, dst_dir_fd=fd)
    finally:
        os.close(fd)


def _read_deep(root: Path, levels: int) -> bytes:
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(levels):
            child = os.open("d", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = child
        assert sorted(os.listdir(fd)) == ["f"]
        inner = os.open("f", os.O_RDONLY, dir_fd=fd)
        try:
            return os.read(inner, 1 << 16)
        finally:
            os.close(inner)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    """``rm -rf`` without recursion (pytest's rmtree recurses out on these; rm's fts is quadratic)."""
    if not os.path.lexists(path):
        return
    # names[i] is a directory still to remove, inside the directory open on fds[i].
    fds = [os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)]
    names = [os.fsencode(path.name)]
    try:
        while names:
            here = os.open(names[-1], os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fds[-1])
            sub = None
            with os.scandir(here) as listing:
                for entry in listing:
                    if entry.is_dir(follow_symlinks=False):
                        sub = sub or os.fsencode(entry.name)
                    else:
                        os.unlink(entry.name, dir_fd=here)
            if sub is not None:
                fds.append(here)
                names.append(sub)
                continue
            os.close(here)
            os.rmdir(names.pop(), dir_fd=fds[-1])
            os.close(fds.pop())  # the parent is listed again from its own parent
    finally:
        for fd in fds:
            os.close(fd)


async def test_write_tree_takes_what_snapshot_takes_and_every_reader_walks_it(
    backend: Backend, descriptors: Callable[[int], None]
) -> None:
    descriptors(DEEP)
    cas = backend.cas
    work, out = backend.tmp_path / "work", backend.tmp_path / "out"
    try:
        _make_deep(work, DEEP, b"deep\n")
        blob = await cas.write_blob(b"deep\n")
        written = await cas.write_tree([(_chain(DEEP) + "/f", "100644", blob)])
        assert written == await cas.snapshot(work)
        assert [(e.name, e.oid) for e in await cas.read_tree(written, recursive=True)] == [(_chain(DEEP) + "/f", blob)]
        report = await cas.fsck()
        assert report.ok and report.checked >= DEEP + 2
        if backend.name == "file":
            time.sleep(0.2)  # older than the grace below: only reachability keeps the trees
            gc = await cas.gc([written], grace_s=0.05)
            assert gc.objects_kept >= DEEP + 2
        else:
            await cas.gc([written], grace_s=3600)  # PgCas's grace is at least freshen_s (60 s)
        await cas.restore(written, out)
        assert _read_deep(out, DEEP) == b"deep\n"
        git_fsck(await backend.gitdir())
    finally:
        _remove(work)
        _remove(out)


async def test_past_gits_bound_both_refuse_and_at_it_both_agree(
    backend: Backend, descriptors: Callable[[int], None]
) -> None:
    descriptors(MAX_TREE_DEPTH)
    cas = backend.cas
    blob = await cas.write_blob(b"x")
    empty = await cas.write_tree([])
    before = await backend.count()
    # MAX_TREE_DEPTH trees counting the root: MAX_TREE_DEPTH - 1 directories, then the file.
    at_bound = _chain(MAX_TREE_DEPTH - 1) + "/f"
    with pytest.raises(InvalidInput, match="nested deeper than 4096"):
        await cas.write_tree([("d/" + at_bound, "100644", blob)])
    with pytest.raises(InvalidInput, match="nested deeper than 4096"):
        await cas.write_tree([(_chain(MAX_TREE_DEPTH), "40000", empty)])
    assert await backend.count() == before  # nothing stored by the refusals
    work = backend.tmp_path / "work"
    try:
        _make_deep(work, MAX_TREE_DEPTH - 1, b"x")
        assert await cas.snapshot(work) == await cas.write_tree([(at_bound, "100644", blob)])
        stored = await backend.count()
        _deepen(work, MAX_TREE_DEPTH - 1)  # the file one directory further down
        with pytest.raises(InvalidInput, match="nested deeper than 4096"):
            await cas.snapshot(work)
        assert await backend.count() == stored  # nothing stored by the refusal
    finally:
        _remove(work)
    # The store still serves.
    assert await cas.read_blob(blob) == b"x"
