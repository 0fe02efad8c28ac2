"""Where the command's output cannot be written: standard output or ``export -o`` on a full disk
(``/dev/full``) is one line on stderr and exit 1, not a traceback (nor Python's "Exception ignored"
at exit); and an ``export -o`` that fails part way leaves no file behind, since the lines written
until then would import as a whole, shorter chain."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import anyio
import pytest

from pforge_async import open_store

from .test_adv_cli_common import listing, ok, one_line_error, pforge

FULL = Path("/dev/full")
needs_full = pytest.mark.skipif(not FULL.exists(), reason="needs /dev/full (a device every write to fails: ENOSPC)")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    base = tmp_path_factory.mktemp("output")
    root = base / ".pforge"
    (base / "ws").mkdir()
    (base / "ws" / "f.txt").write_text("hello\n")

    async def go() -> str:
        async with open_store(root, watch_workspaces=False) as opened:
            ctx = await opened.turns.open_context("out")
            for i in range(3):
                await opened.turns.append_turn(ctx.context_id, "plain", b"turn %d" % i)
            return await opened.cas.write_blob(b"a blob\n")

    return root, anyio.run(go)


@pytest.mark.parametrize(
    "args",
    [
        ("sessions",),
        ("log", "out"),
        ("--json", "log", "out"),
        ("show", "1"),
        ("export", "out"),
        ("stats",),
        ("check",),
        ("cat-file", "BLOB"),
    ],
)
@needs_full
def test_standard_output_on_a_full_disk_is_one_line_and_exit_1(store: tuple[Path, str], args: tuple[str, ...]) -> None:
    root, blob = store
    args = tuple(blob if a == "BLOB" else a for a in args)
    with FULL.open("wb") as full:
        proc = pforge("--root", str(root), *args, stdout=full.fileno())
    line = one_line_error(proc, 1)
    assert "No space left on device" in line


@needs_full
def test_export_to_a_full_disk_is_one_line_and_exit_1(store: tuple[Path, str]) -> None:
    root, _ = store
    line = one_line_error(pforge("--root", str(root), "export", "out", "-o", str(FULL)), 1)
    assert "cannot write /dev/full" in line and "No space left on device" in line
    assert FULL.exists()  # a device, not a file export removes


def test_an_export_that_fails_part_way_leaves_no_file(tmp_path: Path) -> None:
    root = tmp_path / ".pforge"

    async def go() -> int:
        async with open_store(root, watch_workspaces=False) as opened:
            ctx = await opened.turns.open_context("damaged")
            turns = [await opened.turns.append_turn(ctx.context_id, "plain", b"turn %d" % i) for i in range(3)]
            return turns[2].turn_id

    last = anyio.run(go)
    with sqlite3.connect(root / "turns.db") as conn:  # the last turn's payload no longer matches its hash
        conn.execute("UPDATE turns SET payload = ? WHERE turn_id = ?", (b"tampered", last))
    out = tmp_path / "damaged.jsonl"
    out.write_text("an older export\n")
    line = one_line_error(pforge("--root", str(root), "export", "damaged", "-o", str(out)), 1)
    assert f"turn {last}" in line
    assert not out.exists()


def test_a_good_export_to_a_file_is_whole(store: tuple[Path, str], tmp_path: Path) -> None:
    root, _ = store
    out = tmp_path / "good.jsonl"
    ok(pforge("--root", str(root), "export", "out", "-o", str(out)))
    assert [json.loads(line)["depth"] for line in out.read_text().splitlines()] == [1, 2, 3]


@pytest.mark.parametrize("where", ["turns.db", "new-file", "symlink"])
def test_export_into_the_store_itself_is_refused_and_the_store_stays_whole(tmp_path: Path, where: str) -> None:
    """``export -o .pforge/turns.db`` (a slip of the tab key) truncated the database a read-only command
    was reading: the store was gone. A path inside the store, however spelt, is a bad argument."""
    root = tmp_path / ".pforge"

    async def go() -> None:
        async with open_store(root, watch_workspaces=False) as opened:
            ctx = await opened.turns.open_context("kept")
            await opened.turns.append_turn(ctx.context_id, "plain", b"a turn")

    anyio.run(go)
    target = root / where
    if where == "symlink":
        target = tmp_path / "looks-outside.jsonl"
        target.symlink_to(root / "turns.db")
    before = listing(root)
    line = one_line_error(pforge("--root", str(root), "export", "kept", "-o", str(target)), 2)
    assert "inside the store" in line
    assert listing(root) == before
    assert json.loads(ok(pforge("--root", str(root), "--json", "check")))["ok"] is True
