"""``pforge`` started with standard output closed (``>&-`` in a script) or, for ``import -``, standard
input closed (``<&-``): Python then has no ``sys.stdout`` / ``sys.stdin`` at all, and the command
died of an ``AttributeError`` traceback. Each is one line and a non-zero exit."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from .test_adv_cli_common import ENV, PFORGE, ok, pforge


def closed(args: list[str], fd: int) -> subprocess.CompletedProcess[bytes]:
    """Run with file descriptor ``fd`` (0 or 1) closed in the child."""
    script = f'exec "$@" {fd}>&-' if fd else 'exec "$@" <&-'
    return subprocess.run(["bash", "-c", script, "bash", *args], capture_output=True, env=ENV, timeout=120, check=False)


def test_closed_stdout_and_stdin_are_one_line_errors(tmp_path: Path) -> None:
    root = tmp_path / ".pforge"
    ok(pforge("--root", str(root), "init"))
    for args, fd, code, expected in [
        (["stats"], 1, 1, "standard output"),
        (["--json", "check"], 1, 1, "standard output"),
        (["import", "-"], 0, 2, "standard input"),
    ]:
        proc = closed([*PFORGE, "--root", str(root), *args], fd)
        err = proc.stderr.decode("utf-8", "replace")
        assert proc.returncode == code, (args, proc.returncode, err)
        assert "Traceback" not in err and len(err.splitlines()) == 1 and expected in err, (args, err)
    assert json.loads(ok(pforge("--root", str(root), "--json", "sessions")))["contexts"] == []
