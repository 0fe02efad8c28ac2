"""The workspace boundary, second review: what a tool can put in a workspace while it is snapshotted
or restored. Each test failed before the fix its docstring names."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pforge_async import StorageError
from pforge_async.cas import odb as odb_module
from pforge_async.cas.odb import ObjectDB
from pforge_async.postgres import cas as pg_cas_module
from pforge_async.postgres.cas import _RowView

from .test_cas2_depth import _remove as _remove_deep
from .test_cas2_depth import backend, descriptors  # noqa: F401 (file store without its watch, and PgCas)
from .test_pg_cas import Backend

pytestmark = pytest.mark.anyio


_CTTY_CHILD = textwrap.dedent(
    """
    import os
    import sys
    from pforge_async.cas.dirfd import open_file_at
    from pforge_async.cas.odb import open_for_reading

    def has_ctty():
        try:
            os.close(os.open("/dev/tty", os.O_RDWR))
        except OSError:
            return False
        return True

    try:
        master, slave = os.openpty()  # opened with O_NOCTTY: the child still has no terminal
    except OSError as exc:
        print("no pty", exc)
        raise SystemExit(0)
    print("before", has_ctty())
    name = os.ttyname(slave)
    directory = os.open(os.path.dirname(name), os.O_RDONLY | os.O_DIRECTORY)
    # A terminal where the listing saw a file: refused, and not taken as the controlling terminal.
    print("opened", open_file_at(directory, os.fsencode(os.path.basename(name))))
    print("after", has_ctty())
    # The same through ObjectDB.write_file_blob's open, and a FIFO there does not block it.
    os.close(open_for_reading(name))
    print("after open_for_reading", has_ctty())
    fifo = os.path.join(sys.argv[1], "fifo")
    os.mkfifo(fifo)
    os.close(open_for_reading(fifo))
    print("fifo opened")
    """
)


def test_a_terminal_in_a_files_place_does_not_become_the_controlling_terminal(tmp_path: Path) -> None:
    """The scan opened files without ``O_NOCTTY``: a session leader without a terminal (a daemon, a
    service, ``setsid``) that met a terminal device swapped in for a file acquired it as its
    controlling terminal (and with it hangups and job-control signals from whoever holds its master).
    Now every open of a workspace path has ``O_NOCTTY``; ``ObjectDB.write_file_blob``'s open also
    lacked ``O_NONBLOCK`` and waited for a writer on a FIFO."""
    proc = subprocess.run(
        [sys.executable, "-c", _CTTY_CHILD, str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
        start_new_session=True,  # a session leader with no controlling terminal
        timeout=300,  # a bound on a hang (a FIFO open waits for ever), not a measure
    )
    assert proc.returncode == 0, proc.stderr
    if proc.stdout.startswith("no pty"):
        pytest.skip(f"this machine gives no pseudo-terminal to test with ({proc.stdout.strip()})")
    assert proc.stdout.split("\n")[:5] == [
        "before False",
        "opened None",
        "after False",
        "after open_for_reading False",
        "fifo opened",
    ], proc.stdout


async def test_a_file_made_under_a_restored_name_meanwhile_is_never_replaced(
    backend: Backend,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``restore`` renamed each file's temp into place, and ``rename`` replaces: a file a tool made
    under the same name while the restore wrote the content (or, in a case-folding directory, the
    file restored just before as ``Makefile`` when ``makefile`` followed) was silently lost and the
    restore reported success. Now the name is hard-linked (``EEXIST`` where something stands): the
    restore fails naming the path, removes what it made, and leaves the other file as it was."""
    cas = backend.cas
    first = await cas.write_blob(b"first\n")
    content = await cas.write_blob(b"from the tree\n")
    tree = await cas.write_tree([("a.txt", "100644", first), ("b.txt", "100644", content)])
    out = backend.tmp_path / "out"

    def tool_writes_first(original: Callable[..., Any]) -> Callable[..., Any]:
        # The tool acts while the restore copies b.txt's blob into its temp file.
        def copy_blob(self: Any, oid: str, fd: int) -> Any:
            if oid == content and not (out / "b.txt").exists():
                (out / "b.txt").write_bytes(b"the tool's\n")
            return original(self, oid, fd)

        return copy_blob

    monkeypatch.setattr(ObjectDB, "copy_blob", tool_writes_first(ObjectDB.copy_blob))
    monkeypatch.setattr(_RowView, "copy_blob", tool_writes_first(_RowView.copy_blob))
    with pytest.raises(StorageError, match=r"b\.txt"):
        await cas.restore(tree, out)
    assert (out / "b.txt").read_bytes() == b"the tool's\n"
    assert sorted(os.listdir(out)) == ["b.txt"]  # a.txt, which the restore made, is removed again
    monkeypatch.undo()
    (out / "b.txt").unlink()
    await cas.restore(tree, out)  # the store still serves, and the restore works
    assert (out / "b.txt").read_bytes() == b"from the tree\n"


class _Appending:
    """``os`` as a CAS module sees it, with a tool appending a line to ``path`` before every read of it
    (deterministically what a build writing its log during the snapshot does now and then)."""

    def __init__(self, path: Path) -> None:
        self.log_path = path
        self.ino = os.stat(path).st_ino
        self.appended = 0

    def _append(self, fd: int) -> None:
        if os.fstat(fd).st_ino == self.ino:
            with open(self.log_path, "ab") as log:
                log.write(b"another line\n")
            self.appended += 1

    def read(self, fd: int, n: int) -> bytes:
        self._append(fd)
        return os.read(fd, n)

    def pread(self, fd: int, n: int, offset: int) -> bytes:
        self._append(fd)
        return os.pread(fd, n, offset)

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


async def test_a_large_file_a_tool_keeps_appending_to_is_stored_as_its_fstat_sized_it(
    backend: Backend,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A file of 1 MiB or more that changed while it was streamed was read again, and after three
    reads the snapshot failed (``StorageError``, "kept changing"): a workspace holding a log a tool
    writes to (a build running in the background) could not be snapshotted at all. Now the last read
    takes the file as its fstat sized it, as git does; the next snapshot reads it again."""
    work = backend.tmp_path / "work"
    work.mkdir()
    log = work / "build.log"
    log.write_bytes(b"x" * (2 << 20))
    tool = _Appending(log)
    monkeypatch.setattr(odb_module, "os", tool)
    monkeypatch.setattr(pg_cas_module, "os", tool)
    tree = await backend.cas.snapshot(work)
    monkeypatch.undo()
    assert tool.appended >= 3  # it grew during every read
    (entry,) = await backend.cas.read_tree(tree)
    stored = await backend.cas.read_blob(entry.oid)
    now = log.read_bytes()
    assert len(stored) > 2 << 20 and now.startswith(stored)
    # The stat recorded is the first read's: the next snapshot reads the file as it is now.
    (entry,) = await backend.cas.read_tree(await backend.cas.snapshot(work))
    assert await backend.cas.read_blob(entry.oid) == now


def _nest_long_names(root: Path, levels: int) -> None:
    """``levels`` directories of 255-byte names, one inside the other, a small file in each."""
    name = b"n" * 255
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for level in range(levels):
            out = os.open(b"f", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=fd)
            os.write(out, b"%d\n" % level)
            os.close(out)
            os.mkdir(name, dir_fd=fd)
            child = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
    finally:
        os.close(fd)


async def test_deep_long_names_cost_a_snapshot_memory_in_proportion_to_the_names(
    backend: Backend,  # noqa: F811
    descriptors: Callable[[int], None],  # noqa: F811
) -> None:
    """The scan kept every path whole (each open directory's, and each file's as its stat cache
    key): memory grew as the square of the depth. A tool nesting 1,000 directories of 255-byte
    names, a file in each (4 MB of names), made a snapshot allocate about 400 MB, and 2,000 of them
    2 GB and a 500 MB cache file. Now a path past PATH_MAX (4,096 bytes) is kept as its tail and is
    never a cache key (its file is read at every snapshot)."""
    work = backend.tmp_path / "work"
    work.mkdir()
    levels = 1000
    descriptors(levels)
    try:
        _nest_long_names(work, levels)
        tracemalloc.start()
        try:
            tree = await backend.cas.snapshot(work)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 64 << 20, f"a snapshot of {levels} long-named levels allocated {peak >> 20} MiB"
        files = await backend.cas.read_tree(tree, recursive=True)
        assert len(files) == levels
        deepest = max(files, key=lambda e: len(e.name))
        assert await backend.cas.read_blob(deepest.oid) == b"%d\n" % (levels - 1)
        assert await backend.cas.snapshot(work) == tree
    finally:
        _remove_deep(work)
