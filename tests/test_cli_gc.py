"""``pforge gc``, run as a user runs it (a child process): a dry run counts and changes nothing, a real
run reclaims what the library says is garbage and keeps the rest, ``--json`` carries the report, and
bad arguments or a missing store give one line and exit 2, creating nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pforge_async import open_store

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"} | {"PYTHONPATH": str(ROOT)}
PFORGE = [sys.executable, "-m", "pforge_async"]


def pforge(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PFORGE, *args], capture_output=True, text=True, env=ENV, timeout=120, check=False)


async def fill(root: Path, work: Path) -> tuple[dict[str, tuple[int, str]], list[str]]:
    """Ten contexts, each with a workspace snapshot and a blob it names; the first six deleted.
    Returns the kept ones (name -> (context id, tree)) and the deleted ones' trees."""
    kept: dict[str, tuple[int, str]] = {}
    gone: list[str] = []
    async with open_store(root, watch_workspaces=False) as store:
        for c in range(10):
            ws = work / f"w{c}"
            ws.mkdir(parents=True)
            (ws / "notes.txt").write_text(f"context {c}\n" * 50)
            tree = await store.cas.snapshot(ws)
            blob = await store.cas.write_blob(b"blob of context %d" % c)
            ctx = await store.turns.create_context(name=f"c{c}")
            await store.turns.append_turn(ctx.context_id, "t", b"turn %d" % c, fs_root=tree, refs=[blob])
            if c < 6:
                await store.turns.delete_context(ctx.context_id)
                gone.append(tree)
            else:
                kept[f"c{c}"] = (ctx.context_id, tree)
    return kept, gone


async def counts(root: Path) -> tuple[int, int]:
    """Turns and CAS objects, read through the library (read-only)."""
    async with open_store(root, readonly=True, create=False, watch_workspaces=False) as store:
        row = await store.turns._actor.fetchone("SELECT COUNT(*) FROM turns")
        return int(row[0]), (await store.cas.fsck()).checked


async def test_dry_run_counts_and_changes_nothing_then_gc_reclaims(tmp_path: Path) -> None:
    root = tmp_path / ".pforge"
    kept, gone = await fill(root, tmp_path / "work")
    before = await counts(root)

    dry = pforge("--root", str(root), "gc", "--grace", "0", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "Traceback" not in dry.stderr
    assert dry.stdout.startswith("would reclaim 6 turns, 18 objects,"), dry.stdout  # tree, file, blob each
    assert await counts(root) == before

    real = pforge("--root", str(root), "gc", "--grace", "0", "--json")
    assert real.returncode == 0, real.stderr
    report = json.loads(real.stdout)
    assert report["root"] == str(root)
    assert report["dry_run"] is False and report["turns_reclaimed"] == 6 and report["objects_reclaimed"] == 18
    assert report["bytes_after"] < report["bytes_before"]
    assert report["cas"]["objects_reclaimed"] == 18 and report["turns"]["turns_reclaimed"] == 6
    assert await counts(root) == (before[0] - 6, before[1] - 18)

    async with open_store(root, readonly=True, create=False, watch_workspaces=False) as store:
        for name, (context_id, tree) in kept.items():
            [turn] = await store.turns.list_turns(context_id)
            assert turn.fs_root == tree and turn.payload == b"turn %s" % name[1:].encode()
            assert [e.name for e in await store.cas.read_tree(tree)] == ["notes.txt"]
            assert await store.cas.read_blob(turn.refs[0]) == b"blob of context %s" % name[1:].encode()
        for tree in gone:
            assert not await store.cas.has(tree)
        assert (await store.check()).problems == []

    again = pforge("--root", str(root), "gc", "--grace", "0")
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith("reclaimed 0 turns, 0 objects,"), again.stdout


async def test_the_default_grace_keeps_what_is_new(tmp_path: Path) -> None:
    root = tmp_path / ".pforge"
    await fill(root, tmp_path / "work")
    before = await counts(root)
    result = pforge("--root", str(root), "gc", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["grace_s"] == 3600 and report["turns_reclaimed"] == 0 and report["objects_reclaimed"] == 0
    assert await counts(root) == before


@pytest.mark.parametrize("grace", ["-1", "abc", "nan", "1e12"])
def test_a_bad_grace_is_one_line_and_exit_2(tmp_path: Path, grace: str) -> None:
    root = tmp_path / ".pforge"
    result = pforge("--root", str(root), "gc", "--grace", grace)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pforge: error: ") and "grace" in lines[0], result.stderr
    assert not root.exists()


def test_no_store_or_a_file_as_root_is_one_line_and_exit_2(tmp_path: Path) -> None:
    missing = tmp_path / "nothing"
    result = pforge("--root", str(missing), "gc")
    assert result.returncode == 2 and result.stderr.startswith("pforge: error: "), result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1
    assert not missing.exists()
    afile = tmp_path / "file"
    afile.write_bytes(b"x")
    result = pforge("--root", str(afile), "gc", "--dry-run")
    assert result.returncode == 2 and result.stderr.startswith("pforge: error: "), result.stderr
    assert afile.read_bytes() == b"x"


def under_pty(*args: str) -> tuple[int, str, bytes]:
    """Run ``pforge args`` with stderr on a pseudo-terminal: (exit status, stdout, what the terminal got)."""
    import pty
    import select
    import time

    master, slave = pty.openpty()
    proc = subprocess.Popen([*PFORGE, *args], stdout=subprocess.PIPE, stderr=slave, env=ENV)
    os.close(slave)
    seen = b""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        elif proc.poll() is not None:
            break
    os.close(master)
    assert proc.stdout is not None
    out = proc.stdout.read().decode()
    proc.stdout.close()
    return proc.wait(timeout=60), out, seen


async def test_a_progress_bar_on_a_terminal_and_none_in_a_pipe(tmp_path: Path) -> None:
    root = tmp_path / ".pforge"
    await fill(root, tmp_path / "work")
    code, out, terminal = under_pty("--root", str(root), "gc", "--dry-run")
    assert code == 0 and out.startswith("would reclaim"), out
    assert b"\rgc [" in terminal and terminal.endswith(b"\r\x1b[K"), terminal  # drawn, then cleared
    piped = pforge("--root", str(root), "gc", "--dry-run")
    assert piped.returncode == 0 and piped.stderr == ""
