"""The progress bar, drawn on stderr when stderr is a terminal, names what it works on: a session's
name (``export``), a file's (``import``) or a directory's (``snapshot``). Any of them may hold escape
sequences; the terminal gets them escaped, as every other line the command writes, not raw."""

from __future__ import annotations

from pathlib import Path

import anyio

from pforge_async import open_store

from .test_adv_cli_common import EVIL, PFORGE
from .test_cli import _under_pty


def raw_controls(tty: bytes) -> list[bytes]:
    """What the terminal got that acts on it, but the bar's own carriage returns and erase-line
    sequences (the pty turns each newline into CR LF). (A raw CR of the name is told apart by the
    caller: the name's escaped form ends in a visible ``\\r``.)"""
    text = tty.replace(b"\r\n", b"\n").replace(b"\x1b[K", b"").replace(b"\r", b"")
    bidi = "\u202e".encode()
    return [bytes([b]) for b in text if b < 0x20 and b != 0x0A] + ([bidi] if bidi in text else [])


def test_names_in_the_progress_bar_reach_the_terminal_escaped(tmp_path: Path) -> None:
    root = tmp_path / ".pforge"
    workspace = tmp_path / EVIL
    workspace.mkdir()
    (workspace / "file.txt").write_text("x")

    async def fill() -> None:
        async with open_store(root, watch_workspaces=False) as store:
            ctx = await store.turns.open_context(EVIL)
            await store.turns.append_turn(ctx.context_id, "plain", b"hello")

    anyio.run(fill)
    export = tmp_path / f"{EVIL}.jsonl"
    runs = [
        ["export", f"name:{EVIL}", "-o", str(export)],
        ["import", str(export), "--name", "copy"],
        ["snapshot", str(workspace)],
    ]
    for args in runs:
        code, _, tty = _under_pty([*PFORGE, "--root", str(root), *args])
        assert code == 0, (args, tty)
        assert b"[" in tty, (args, tty)  # a bar was drawn
        assert raw_controls(tty) == [], (args, tty)
        assert b"\\x1b]0;pwned\\x07\\x1b[2J\\u202ename\\r" in tty, (args, tty)
