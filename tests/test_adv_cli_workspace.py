"""``pforge restore`` into a path that is a file (or a symlink to one) is the user's mistake, a bad
argument (exit 2) like a target that is not empty, not the storage failing (exit 1); the file is
left as it was and nothing is created."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from pforge_async import open_store

from .test_adv_cli_common import listing, one_line_error, pforge


@pytest.mark.parametrize("kind", ["file", "symlink to a file", "below a file"])
def test_restore_into_a_file_is_a_bad_argument(tmp_path: Path, kind: str) -> None:
    root = tmp_path / ".pforge"
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "a.txt").write_text("a\n")

    async def fill() -> str:
        async with open_store(root, watch_workspaces=False) as store:
            return await store.cas.snapshot(ws)

    tree = anyio.run(fill)
    file = tmp_path / "a-file"
    file.write_text("keep me\n")
    target = {"file": file, "symlink to a file": tmp_path / "link", "below a file": file / "sub"}[kind]
    if kind == "symlink to a file":
        target.symlink_to(file)
    before = listing(root)
    line = one_line_error(pforge("--root", str(root), "restore", tree, str(target)), 2)
    assert "not a directory" in line
    assert file.read_text() == "keep me\n"
    assert listing(root) == before


def test_restore_into_the_store_itself_is_refused(tmp_path: Path) -> None:
    """A restore below the store root would make files the store takes for its own (a tree holding a
    file named like a loose object, restored into a missing ``cas/objects/xx``)."""
    root = tmp_path / ".pforge"
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / ("ab" * 31)).write_text("not an object\n")

    async def fill() -> str:
        async with open_store(root, watch_workspaces=False) as store:
            return await store.cas.snapshot(ws)

    tree = anyio.run(fill)
    before = listing(root)
    for target in (root / "cas" / "objects" / "ab", root / "restored"):
        line = one_line_error(pforge("--root", str(root), "restore", tree, str(target)), 2)
        assert "inside the store" in line
    assert listing(root) == before
