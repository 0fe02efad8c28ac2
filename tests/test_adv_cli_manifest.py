"""A ``pforge.json`` that is not a regular file (a FIFO, a symlink to ``/dev/zero``) made every open of
the store, read-only ``pforge check`` included, wait forever (a FIFO with no writer) or read without
end (``/dev/zero``). The open refuses it at once, naming the file, and changes nothing."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from .test_adv_cli_common import ENV, PFORGE, listing, ok, pforge


@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_a_manifest_that_is_not_a_regular_file_is_refused_at_once(tmp_path: Path, kind: str) -> None:
    root = tmp_path / ".pforge"
    ok(pforge("--root", str(root), "init"))
    manifest = root / "pforge.json"
    manifest.unlink()
    if kind == "fifo":
        os.mkfifo(manifest)
    else:
        manifest.symlink_to("/dev/zero")
    before = listing(root)
    for args in (["check"], ["sessions"], ["gc"]):
        try:
            proc = subprocess.run(
                [*PFORGE, "--root", str(root), *args], capture_output=True, env=ENV, timeout=30, check=False
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"pforge {args[0]} still waiting after 30 s on a manifest that is a {kind}")
        err = proc.stderr.decode("utf-8", "replace")
        assert proc.returncode == 1 and "Traceback" not in err, (args, proc.returncode, err)
        assert "pforge.json" in err + proc.stdout.decode(), (args, err)
    assert listing(root) == before
