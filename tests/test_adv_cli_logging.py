"""What the library logs while a command runs (a damaged pack index it re-indexes, a checkpoint that
will be retried) reached stderr through Python's last-resort handler: raw, unprefixed, with paths
under a ``--root`` that may hold escape sequences, and with tracebacks for warnings logged with
``exc_info``. The command writes each as one escaped ``pforge: warning: ...`` line."""

from __future__ import annotations

import shutil
from pathlib import Path

import anyio

from pforge_async import open_store

from .test_adv_cli_common import EVIL, pforge


def test_library_warnings_are_one_escaped_pforge_line_each(tmp_path: Path) -> None:
    root = tmp_path / EVIL / ".pforge"

    async def fill() -> None:
        async with open_store(root, watch_workspaces=False) as store:
            for i in range(3):
                await store.cas.write_blob(b"blob %d" % i)

    anyio.run(fill)
    index = sorted((root / "cas" / "objects" / "pack").glob("*.idx"))[0]
    data = bytearray(index.read_bytes())
    data[len(data) // 2] ^= 0xFF
    index.write_bytes(bytes(data))
    for args in (["check"], ["stats"]):
        proc = pforge("--root", str(root), *args)
        err = proc.stderr.decode("utf-8", "replace")
        assert "Traceback" not in err, err
        assert "rebuilding it from its pack" in err or "re-indexed" in err + proc.stdout.decode(), err
        for line in err.splitlines():  # but check's own note, "1 problem(s) in ROOT"
            assert line.startswith("pforge: ") or " problem(s) in " in line, line
        assert "\x1b" not in err and "\x07" not in err and "\u202e" not in err, err
    shutil.rmtree(tmp_path / EVIL)
