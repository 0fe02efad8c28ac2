"""The README's tour is code a user will paste: it must run as written."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_readme_opens_with_the_two_commands() -> None:
    first_block = README.read_text().split("```")[1]
    assert "make demo" in first_block and "make test" in first_block


def test_the_tour_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    # The tour is the one block that opens a store of its own (the PostgreSQL section needs a server).
    (tour,) = [b for b in blocks if "open_store" in b and "postgresql://" not in b]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "workspace").mkdir()
    (tmp_path / "workspace" / "main.py").write_text("print('hello')\n")
    replay = tmp_path / "replay"
    tour = tour.replace('"/tmp/replay"', repr(str(replay)))
    exec(compile(tour, str(README), "exec"), {"__name__": "__readme__"})
    assert (replay / "main.py").read_text() == "print('hello')\n"
    assert os.path.isdir(tmp_path / ".pforge" / "cas")
