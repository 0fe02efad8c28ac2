"""Adversarial review of the CAS gc (issue 13): gc must never delete a file outside the store, whatever
the store directory holds (symlinks someone made, a journal that says otherwise), and must leave a
store that check() and git fsck --strict accept."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
import zlib
from pathlib import Path

import msgspec
import pytest

from pforge_async import open_store
from pforge_async.cas.retired import JOURNAL, Retired

pytestmark = pytest.mark.anyio

HOUR = 3600.0


def git_fsck(gitdir: Path) -> None:
    proc = subprocess.run(
        ["git", f"--git-dir={gitdir}", "fsck", "--strict", "--no-dangling", "--no-progress"],
        capture_output=True,
        text=True,
        check=False,
    )
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if not line.startswith("notice:")]
    assert proc.returncode == 0 and not lines, "\n".join(lines)


def loose_object(data: bytes) -> tuple[str, bytes]:
    """A blob's hex id and its loose file's bytes, as git writes them."""
    full = b"blob %d\0" % len(data) + data
    return hashlib.sha256(full).hexdigest(), zlib.compress(full)


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then), follow_symlinks=True)


async def test_a_symlinked_fanout_directory_never_makes_gc_delete_outside_files(tmp_path: Path) -> None:
    """Found by this review: gc's inventory followed objects/<xx>/ through a symlink and finish()
    unlinked objects/<xx>/<rest> through it, deleting a file outside the store."""
    root = tmp_path / "s"
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    async with open_store(root, watch_workspaces=False) as store:
        kept = await store.cas.write_blob(b"kept by a ref")
        await store.cas.update_ref("refs/tags/keep", kept)
        objects = root / "cas" / "objects"
        n = 0
        while True:  # an object whose fan-out directory the store does not have
            oid, body = loose_object(b"someone else's file %d" % n)
            if not (objects / oid[:2]).exists():
                break
            n += 1
        victim = outside / oid[2:]
        victim.write_bytes(body)
        age(victim, 2 * HOUR)
        (objects / oid[:2]).symlink_to(outside, target_is_directory=True)
        await store.cas.gc([], grace_s=HOUR)
        assert victim.exists(), "gc deleted a file outside the store"
        assert await store.cas.read_blob(kept) == b"kept by a ref"


async def test_a_journal_naming_paths_outside_objects_deletes_nothing_there(tmp_path: Path) -> None:
    """Found by this review: finish() joined the journal's names to objects/ unchecked."""
    root = tmp_path / "s"
    async with open_store(root, watch_workspaces=False) as store:
        kept = await store.cas.write_blob(b"kept by a ref")
        await store.cas.update_ref("refs/tags/keep", kept)
    victim = tmp_path / "precious.txt"
    victim.write_bytes(b"not the store's")
    config = root / "cas" / "config"
    journal = Retired(
        [
            (os.path.relpath(victim, root / "cas" / "objects"), victim.stat().st_ino),
            ("../config", config.stat().st_ino),
        ]
    )
    (root / "cas" / JOURNAL).write_bytes(msgspec.msgpack.encode(journal))
    async with open_store(root, watch_workspaces=False) as store:  # a writable open finishes journals
        assert await store.cas.read_blob(kept) == b"kept by a ref"
    assert victim.exists(), "a writable open deleted a file outside the store"
    assert config.exists(), "a writable open deleted the CAS's config"


async def test_a_pack_that_is_a_symlink_keeps_its_target(tmp_path: Path) -> None:
    """A pack someone moved elsewhere and linked back: gc retires the link's name, never its target
    (finish compares the inode of the name itself)."""
    root = tmp_path / "s"
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    async with open_store(root, watch_workspaces=False) as store:
        kept = await store.cas.write_blob(b"kept by a ref")
        await store.cas.update_ref("refs/tags/keep", kept)
        await store.cas.write_blob(b"unreachable")
        pack_dir = root / "cas" / "objects" / "pack"
        packs = sorted(pack_dir.glob("*.pack"))
        moved = outside / packs[-1].name
        shutil.move(packs[-1], moved)
        packs[-1].symlink_to(moved)
        for path in pack_dir.iterdir():
            age(path, 2 * HOUR)
        await store.cas.gc([], grace_s=HOUR)
        assert moved.exists(), "gc deleted the target of a symlink in the store"
        assert await store.cas.read_blob(kept) == b"kept by a ref"
        assert (await store.check()).problems == []
    async with open_store(root, watch_workspaces=False) as store:
        assert await store.cas.read_blob(kept) == b"kept by a ref"
        assert (await store.check()).problems == []
    git_fsck(root / "cas")


async def test_gc_never_follows_a_symlinked_loose_object(tmp_path: Path) -> None:
    """A loose object file that is a symlink to a file outside (a store 'deduplicated' by hand): gc
    may drop the link, never the file it points to."""
    root = tmp_path / "s"
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    async with open_store(root, watch_workspaces=False) as store:
        kept = await store.cas.write_blob(b"kept by a ref")
        await store.cas.update_ref("refs/tags/keep", kept)
        oid, body = loose_object(b"a linked file")
        target = outside / "obj"
        target.write_bytes(body)
        age(target, 2 * HOUR)
        directory = root / "cas" / "objects" / oid[:2]
        directory.mkdir(exist_ok=True)
        (directory / oid[2:]).symlink_to(target)
        await store.cas.gc([], grace_s=HOUR)
        assert target.read_bytes() == body
        assert await store.cas.read_blob(kept) == b"kept by a ref"
        assert (await store.check()).problems == []
    git_fsck(root / "cas")


async def test_gc_after_git_wrote_a_multi_pack_index_leaves_git_fsck_clean(tmp_path: Path) -> None:
    root = tmp_path / "s"
    async with open_store(root, watch_workspaces=False) as store:
        kept = await store.cas.write_blob(b"kept by a ref")
        await store.cas.update_ref("refs/tags/keep", kept)
        await store.cas.write_blob(b"unreachable")
    # Plain git on the store, keeping unreachable objects (its docs ask no more of the user).
    subprocess.run(
        ["git", f"--git-dir={root / 'cas'}", "repack", "-a", "-d", "-k", "--write-midx"],
        check=True,
        capture_output=True,
    )
    assert (root / "cas" / "objects" / "pack" / "multi-pack-index").exists()
    for path in (root / "cas" / "objects" / "pack").iterdir():
        age(path, 2 * HOUR)
    async with open_store(root, watch_workspaces=False) as store:
        report = await store.cas.gc([], grace_s=HOUR)
        assert report.objects_reclaimed == 1
        assert await store.cas.read_blob(kept) == b"kept by a ref"
        assert (await store.check()).problems == []
    git_fsck(root / "cas")
