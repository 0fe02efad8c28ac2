"""Adversarial review of the CAS workspace boundary: snapshot, restore and the change watch.

Each test here was written against a bug it found (it failed before the fix named in its docstring).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pforge_async import open_store

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
