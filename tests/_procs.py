"""Helpers to run Python code in child processes (real processes, not threads)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
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


def next_line(proc: subprocess.Popen[str], timeout: float = 120) -> str:
    """The child's next line ("" at its end), read within ``timeout`` or the child is killed and the
    test fails. Read by ``readline`` itself on a thread, never by ``select`` on the pipe: the text
    stream reads ahead, so a line that came with the one before sits in its buffer, where ``select``
    cannot see it and waits for output that may never come."""
    assert proc.stdout is not None
    stdout = proc.stdout
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not got:
        proc.kill()
        reader.join(10)  # the kill closes the pipe: readline returns
        raise AssertionError(f"child printed no line in {timeout}s")
    return got[0]


def wait_for_line(proc: subprocess.Popen[str], expected: str, timeout: float = 120) -> None:
    """Block until the child prints ``expected`` (it flushes), or fail with its stderr. The default
    bound only catches a child that never gets there: on a loaded CI machine an interpreter that
    imports the store can take many seconds to start, and waiting longer costs a passing run nothing."""
    try:
        line = next_line(proc, timeout).strip()
    except AssertionError:
        raise AssertionError(f"child did not print {expected!r} in {timeout}s") from None
    if line != expected:
        proc.kill()
        err = proc.stderr.read() if proc.stderr else ""
        raise AssertionError(f"child printed {line!r}, wanted {expected!r}: {err}")


def whole_lines(out: str) -> list[str]:
    """The lines a killed child finished printing. Under ``PYTHONUNBUFFERED`` (CI sets it, and
    ``spawn`` passes the environment on) one ``print`` is a write per argument, so a kill can leave
    the last line cut short, without its newline: it is dropped."""
    return out.split("\n")[:-1]
