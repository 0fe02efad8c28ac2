"""Helpers to run Python code in child processes (real processes, not threads)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def spawn(
    code: str, *args: object, stdout: int | None = subprocess.PIPE, stdin: int | None = None
) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen(
        [sys.executable, "-c", code, *map(str, args)],
        stdin=stdin,
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def run_all(procs: list[subprocess.Popen[str]], timeout: float = 120) -> list[str]:
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, f"child failed ({proc.returncode}):\n{err}"
        outputs.append(out)
    return outputs


def wait_for_line(proc: subprocess.Popen[str], expected: str, timeout: float = 120) -> None:
    """Block until the child prints ``expected`` (it flushes), or fail with its stderr. The default
    bound only catches a child that never gets there: on a loaded CI machine an interpreter that
    imports the store can take many seconds to start, and waiting longer costs a passing run nothing."""
    import selectors

    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    if not sel.select(timeout):
        proc.kill()
        raise AssertionError(f"child did not print {expected!r} in {timeout}s")
    line = proc.stdout.readline().strip()
    if line != expected:
        proc.kill()
        err = proc.stderr.read() if proc.stderr else ""
        raise AssertionError(f"child printed {line!r}, wanted {expected!r}: {err}")


def whole_lines(out: str) -> list[str]:
    """The lines a killed child finished printing. Under ``PYTHONUNBUFFERED`` (CI sets it, and
    ``spawn`` passes the environment on) one ``print`` is a write per argument, so a kill can leave
    the last line cut short, without its newline: it is dropped."""
    return out.split("\n")[:-1]
