from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from pforge_async import open_store

pytestmark = pytest.mark.anyio


def pforge(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pforge_async.cli", *args], capture_output=True, text=True, check=False
    )


async def test_check_and_log_from_the_shell(tmp_path: Path) -> None:
    root = tmp_path / ".pforge"
    async with open_store(root) as store:
        ctx = await store.turns.create_context()
        await store.turns.append_turn(ctx.context_id, "pforge.agent.user_turn", b"hello from the shell")
    ok = pforge("--root", str(root), "check")
    assert ok.returncode == 0 and ok.stdout.startswith("ok:"), ok.stderr
    log = pforge("--root", str(root), "log", str(ctx.context_id))
    assert log.returncode == 0 and "hello from the shell" in log.stdout
    with sqlite3.connect(root / "turns.db") as conn:
        conn.execute("UPDATE turns SET payload_hash = 'x'")
    conn.close()
    bad = pforge("--root", str(root), "check")
    assert bad.returncode == 1 and "payload_hash" in bad.stdout
    missing = pforge("--root", str(root), "log", "999")
    assert missing.returncode == 2 and "no context 999" in missing.stderr
