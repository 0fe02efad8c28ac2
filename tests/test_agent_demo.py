"""`make demo`: a first run records the session; a second resumes it, adds nothing and says so."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from ._procs import ROOT

pytestmark = pytest.mark.anyio


def load_demo() -> ModuleType:
    spec = importlib.util.spec_from_file_location("pforge_demo", ROOT / "examples" / "demo.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


async def test_the_demo_runs_then_resumes_without_adding_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    demo = load_demo()
    root = tmp_path / ".pforge"
    await demo.main("demo", root)
    first = capsys.readouterr().out
    assert "ran 16 subagents (2 with a helper of their own) and 100 tool steps" in first
    assert "persistence failures (best_effort mode): 0" in first
    assert "19 sessions" in first and "100 workspace snapshots attached" in first
    assert "0 reservations left held" in first and ": ok" in first
    assert "git --git-dir" in first and "pforge --root" in first
    before = demo.fingerprint(root)
    await demo.main("demo", root)
    second = capsys.readouterr().out
    assert "already complete, so nothing was run" in second
    assert "nothing was added: every table of every database, and the CAS, is as it was" in second
    assert demo.fingerprint(root) == before
    await demo.main("another", root)  # --session NAME: a new session in the same store
    third = capsys.readouterr().out
    assert "ran 16 subagents" in third and demo.fingerprint(root) != before
