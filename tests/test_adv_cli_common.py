"""What the ``tests/test_adv_cli_*`` modules share (no tests here): the ``pforge`` command run as a
user runs it (a child process), its one-line errors, and a listing of a store's files to show that a
refused or read-only command changed none of them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"} | {"PYTHONPATH": str(ROOT)}
PFORGE = [sys.executable, "-m", "pforge_async"]

#: a name made of what a terminal acts on: an OSC title change, a screen clear, a bidi override, a CR
EVIL = "evil\x1b]0;pwned\x07\x1b[2J\u202ename\r"


def pforge(*args: str, stdout: int | None = None, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """``pforge ARGS``; its stdout captured unless ``stdout`` says where it goes (a file descriptor)."""
    return subprocess.run(
        [*PFORGE, *args],
        stdout=subprocess.PIPE if stdout is None else stdout,
        stderr=subprocess.PIPE,
        input=stdin,
        env=ENV,
        timeout=120,
        check=False,
    )


def one_line_error(proc: subprocess.CompletedProcess[bytes], code: int) -> str:
    """The one ``pforge: error: ...`` line a failed command wrote, checking its exit status."""
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == code, (proc.returncode, err[-2000:])
    assert "Traceback" not in err, err[-2000:]
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pforge: error: "), err[-2000:]
    return lines[0]


def ok(proc: subprocess.CompletedProcess[bytes]) -> bytes:
    """The stdout of a command that succeeded without a traceback."""
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 0 and "Traceback" not in err, (proc.returncode, err[-2000:])
    return bytes(proc.stdout or b"")


def listing(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` with its size and mtime, but SQLite's ``-wal`` and ``-shm`` files: a
    read-only open makes them (empty) so that it can see a live writer's commits (sqlite/actor.py)."""
    found = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.name.endswith(("-shm", "-wal")):
            st = path.stat()
            found[str(path)] = (st.st_size, st.st_mtime_ns)
    return found
