"""Adversarial review of the CAS workspace boundary: snapshot, restore and the change watch.

Each test here was written against a bug it found (it failed before the fix named in its docstring).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pforge_async import StorageError, open_store

from ._procs import spawn

pytestmark = pytest.mark.anyio


def _files(tree_entries: list[object]) -> dict[str, str]:
    return {e.name: e.oid for e in tree_entries}  # type: ignore[attr-defined]


class TestTheWatchAnswersOnlyForTheDirectoryItWatched:
    """The change watch answered "unchanged" by the root's *path*: when that path came to name another
    directory (a symlink re-pointed, a parent renamed), no watched directory saw an event, and the
    snapshot returned the tree of the directory the path named before."""

    async def test_a_root_symlink_re_pointed_gives_the_new_directorys_tree(self, tmp_path: Path) -> None:
        for run, text in (("run1", "one\n"), ("run2", "two\n")):
            (tmp_path / "ws" / run).mkdir(parents=True)
            (tmp_path / "ws" / run / "a.txt").write_text(text)
        current = tmp_path / "ws" / "current"
        current.symlink_to("run1")
        async with open_store(tmp_path / ".pforge", watch_workspaces=True) as store:
            first = await store.cas.snapshot(current)
            # As `ln -sfn run2 current` does it: a new link renamed over the old one.
            (tmp_path / "ws" / "next").symlink_to("run2")
            os.rename(tmp_path / "ws" / "next", current)
            second = await store.cas.snapshot(current)
            assert second != first
            assert second == await store.cas.snapshot(tmp_path / "ws" / "run2")
            blob = _files(await store.cas.read_tree(second))["a.txt"]
            assert await store.cas.read_blob(blob) == b"two\n"
            # Unchanged from here on: the watch may answer again, and answers right.
            assert await store.cas.snapshot(current) == second

    async def test_a_parent_renamed_away_and_replaced_gives_the_new_directorys_tree(self, tmp_path: Path) -> None:
        for parent, text in (("p", "A"), ("q", "B")):
            (tmp_path / parent / "w").mkdir(parents=True)
            (tmp_path / parent / "w" / "x").write_text(text)
        root = tmp_path / "p" / "w"
        async with open_store(tmp_path / ".pforge", watch_workspaces=True) as store:
            first = await store.cas.snapshot(root)
            os.rename(tmp_path / "p", tmp_path / "p.old")
            os.rename(tmp_path / "q", tmp_path / "p")
            second = await store.cas.snapshot(root)
            blob = _files(await store.cas.read_tree(second))["x"]
            assert await store.cas.read_blob(blob) == b"B"
            assert second != first


# A restore that runs out of descriptors half way down a deep tree (one is held per level), in a child
# process so that its lowered limit binds nobody else.
DEEP_RESTORE = r"""
import json, os, resource, sys
import anyio
from pforge_async import PforgeError, open_store

base = sys.argv[1]
async def main():
    out = {}
    async with open_store(os.path.join(base, ".pforge"), watch_workspaces=False) as store:
        blob = await store.cas.write_blob(b"x")
        deep = "/".join(["d"] * 400) + "/f"
        tree = await store.cas.write_tree([(deep, "100644", blob), ("a.txt", "100644", blob)])
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (200, hard))
        try:
            await store.cas.restore(tree, os.path.join(base, "out"))
            out["restore"] = "ok"
        except PforgeError as exc:
            out["restore"] = type(exc).__name__
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        out["left"] = sorted(os.listdir(os.path.join(base, "out")))
        out["blob"] = (await store.cas.read_blob(await store.cas.write_blob(b"after"))).decode()
    print(json.dumps(out))
anyio.run(main)
"""


class TestAFailedRestoreLeavesTheTargetEmpty:
    async def test_running_out_of_descriptors_deep_down_still_removes_everything(self, tmp_path: Path) -> None:
        """The clean-up removed each directory it made by opening it and clearing it: after a restore
        that failed for want of descriptors (one held per level), the clean-up of the deepest levels
        failed the same way, left their directories, and so every level above failed to remove its
        own: the target kept the whole chain of directories. An empty directory is now removed with
        ``rmdir``, which needs no descriptor."""
        child = spawn(DEEP_RESTORE, tmp_path)
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0, err
        result = json.loads(out)
        assert result == {"restore": "StorageError", "left": [], "blob": "after"}


class TestAFileThatGrowsWhileReadIsNeverHeldWhole:
    async def test_a_small_file_extended_after_its_fstat_streams(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A file under 1 MiB is read whole; one that grew after its fstat was read to its end into
        memory, however far it grew (``truncate -s 100G`` is instant): a tool could make the store's
        process allocate without bound. Now a file that grows past 1 MiB while read streams, as a
        large file does, and the tree names what it grew to."""
        import pforge_async.cas.snapshot as snapshot_module

        work = tmp_path / "work"
        work.mkdir()
        grower = work / "grows.log"
        grower.write_bytes(b"small\n")
        grown = 64 << 20
        real_open = snapshot_module.open_file_at

        def open_then_grow(dir_fd: int, name: bytes) -> object:
            opened = real_open(dir_fd, name)
            if name == b"grows.log":
                os.truncate(grower, grown)  # the tool, right after the scan's fstat
            return opened

        async with open_store(tmp_path / ".pforge", watch_workspaces=False) as store:
            monkeypatch.setattr(snapshot_module, "open_file_at", open_then_grow)
            tracemalloc.start()
            try:
                tree = await store.cas.snapshot(work)
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            monkeypatch.undo()
            assert peak < grown // 2, f"peak {peak >> 20} MiB"
            oid = _files(await store.cas.read_tree(tree))["grows.log"]
            expected = hashlib.sha256(b"blob %d\0" % grown + b"small\n" + bytes(grown - 6)).hexdigest()
            assert oid == expected

    @pytest.mark.parametrize("backend", ["file", "pg"])
    async def test_what_a_grown_file_streams_starts_at_its_first_byte(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str, request: pytest.FixtureRequest
    ) -> None:
        """The grown file is handed on to stream after the bounded read has moved its offset: the
        PostgreSQL CAS's sink reads from where the descriptor stands, so it stored the file without
        its first megabyte. It is now rewound first."""
        import pforge_async.cas.snapshot as snapshot_module

        work = tmp_path / "work"
        work.mkdir()
        grower = work / "grows.log"
        head = b"the first line\n"
        grower.write_bytes(head)
        grown = 4 << 20  # over the 1 MiB read whole, under PostgreSQL's chunked blobs
        real_open = snapshot_module.open_file_at

        def open_then_grow(dir_fd: int, name: bytes) -> object:
            opened = real_open(dir_fd, name)
            if name == b"grows.log":
                with open(grower, "ab") as out:
                    out.write(b"y" * (grown - len(head)))
            return opened

        async with contextlib.AsyncExitStack() as stack:
            if backend == "file":
                cas: Any = (await stack.enter_async_context(open_store(tmp_path / ".pforge"))).cas
            else:
                from pforge_async.postgres.cas import open_pg_cas

                dsn, schema = request.getfixturevalue("pg_dsn"), request.getfixturevalue("pg_schema")
                cas = await stack.enter_async_context(open_pg_cas(dsn, schema=schema, cache_dir=tmp_path / "cache"))
            monkeypatch.setattr(snapshot_module, "open_file_at", open_then_grow)
            tree = await cas.snapshot(work)
            monkeypatch.undo()
            data = await cas.read_blob(_files(await cas.read_tree(tree))["grows.log"])
            assert data[: len(head)] == head and len(data) == grown


class TestAFailedRestoreRemovesOnlyWhatItMade:
    async def test_a_directory_replaced_before_it_was_opened_is_not_cleared(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A directory the restore made and found replaced before it could open it fails the restore;
        the clean-up then removed whatever stood at that name by then, recursively (it had no inode
        to compare): a tool that put a directory of its own there got it emptied by the store. What
        replaced ours is not ours: it is left alone."""
        import pforge_async.cas.restore as restore_module

        target = tmp_path / "target"
        real_open = restore_module.open_dir_at

        swapped: list[bytes] = []

        def swapped_before_open(dir_fd: int, name: bytes) -> object:
            if name != b"sub" or swapped:
                return real_open(dir_fd, name)
            swapped.append(name)
            # The tool: ours renamed away, a symlink in its place (the open refuses it) ...
            os.rename(target / "sub", tmp_path / "ours-moved-away")
            (target / "sub").symlink_to(tmp_path)
            opened = real_open(dir_fd, name)
            # ... and then, before the clean-up, a directory of its own with its files in it.
            (target / "sub").unlink()
            (target / "sub").mkdir()
            (target / "sub" / "keep.txt").write_text("the tool's own\n")
            return opened

        async with open_store(tmp_path / ".pforge", watch_workspaces=False) as store:
            blob = await store.cas.write_blob(b"x")
            tree = await store.cas.write_tree([("sub/f.txt", "100644", blob), ("a.txt", "100644", blob)])
            monkeypatch.setattr(restore_module, "open_dir_at", swapped_before_open)
            with pytest.raises(StorageError, match="replaced during the restore"):
                await store.cas.restore(tree, target)
            monkeypatch.undo()
            assert (target / "sub" / "keep.txt").read_text() == "the tool's own\n"
            assert await store.cas.read_blob(blob) == b"x"

    async def test_a_symlink_replaced_right_after_it_was_made_is_not_cleared(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The same for a symlink: its inode was taken by an lstat after ``symlinkat``, so a directory
        swapped in between was recorded as ours, and a failing restore emptied it."""
        target = tmp_path / "target"
        real_symlink = os.symlink

        def symlink_then_swapped(src: Any, dst: Any, target_is_directory: bool = False, *, dir_fd: Any = None) -> None:
            real_symlink(src, dst, target_is_directory, dir_fd=dir_fd)
            if dst == b"link":  # the tool, at once: the link replaced by a directory of its own
                os.unlink(target / "link")
                (target / "link").mkdir()
                (target / "link" / "keep.txt").write_text("the tool's own\n")
                (target / "z.txt" / "in-the-way").mkdir(parents=True)  # and the next entry fails

        async with open_store(tmp_path / ".pforge", watch_workspaces=False) as store:
            blob = await store.cas.write_blob(b"x")
            dest = await store.cas.write_blob(b"elsewhere")
            tree = await store.cas.write_tree([("link", "120000", dest), ("z.txt", "100644", blob)])
            monkeypatch.setattr(os, "symlink", symlink_then_swapped)
            with pytest.raises(StorageError, match=r"z\.txt"):
                await store.cas.restore(tree, target)
            monkeypatch.undo()
            assert (target / "link" / "keep.txt").read_text() == "the tool's own\n"


@contextlib.contextmanager
def whole_second_file_system(tmp_path: Path) -> Iterator[Path]:
    """A mounted ext2 with 128-byte inodes: it keeps timestamps in whole seconds (as FAT, which keeps
    two, and older ext3 volumes do)."""
    if os.geteuid() != 0 or shutil.which("mkfs.ext2") is None:
        pytest.skip("needs root and mkfs.ext2 to mount a file system that keeps whole-second timestamps")
    image, mount = tmp_path / "ext2.img", tmp_path / "mnt"
    mount.mkdir()
    with open(image, "wb") as out:
        out.truncate(16 << 20)
    subprocess.run(["mkfs.ext2", "-q", "-F", "-I", "128", str(image)], check=True, capture_output=True)
    mounted = subprocess.run(["mount", "-o", "loop", str(image), str(mount)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a loop file system here: {mounted.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


class TestWholeSecondTimestamps:
    @pytest.mark.parametrize("watch", [True, False], ids=["watch", "nowatch"])
    async def test_a_change_in_the_second_of_a_snapshot_is_never_missed(self, tmp_path: Path, watch: bool) -> None:
        """The stat cache kept a file as clean once its mtime and ctime were 50 ms older than the
        snapshot's start; where timestamps are whole seconds, a file changed after it was read (same
        size, same second) keeps the stat it had, and every later snapshot stored the old content.
        An entry whose times are whole seconds is now kept only once they are 2 s old."""
        with whole_second_file_system(tmp_path) as mount:
            work = mount / "work"
            work.mkdir()
            path = work / "f.txt"
            async with open_store(tmp_path / ".pforge", watch_workspaces=watch) as store:
                for _attempt in range(5):
                    path.write_text("aaaa")
                    before = path.stat()
                    await store.cas.snapshot(work)
                    path.write_text("bbbb")  # a tool, right after the scan read the file
                    after = path.stat()
                    tree = await store.cas.snapshot(work)
                    blob = _files(await store.cas.read_tree(tree))["f.txt"]
                    assert await store.cas.read_blob(blob) == b"bbbb"
                    if (before.st_mtime_ns, before.st_ctime_ns) == (after.st_mtime_ns, after.st_ctime_ns):
                        return  # the stat did not show the change: the case this test is about
                pytest.fail("no change within one second of its snapshot in five tries")
