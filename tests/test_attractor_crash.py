"""The example pipeline (``examples/pipeline.py``) SIGKILLed, then resumed, in real processes on the
SQLite store: after ``--kill-after-stage 2`` the rerun resumes from checkpoint 2 and skips the first two
stages; killed at random points over at least ten runs (a third of them killed again while resuming),
each resume ends with the uninterrupted run's result and view, no record written twice, and a clean
``store.check()``."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from pforge_async import open_store
from pforge_async.attractor import load_run

from .test_attractor import load_example, no_key_twice, outline, own_turn_keys

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "pipeline.py"
RUN = "crashy"
KILLS = 10


def run_example(root: Path, *args: str, kill_after_writes: int | None = None) -> tuple[int, list[str]]:
    """Run the example in a child; SIGKILL it once it reported ``kill_after_writes`` writes (it goes on
    with its next write meanwhile). Returns its exit status and the lines it printed (not "write")."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    command = [sys.executable, str(EXAMPLE), "--root", str(root), "--run-id", RUN, "--durability", "normal"]
    child = subprocess.Popen(
        [*command, "--progress", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    assert child.stdout is not None and child.stderr is not None
    lines: list[str] = []
    writes = 0
    try:
        for line in child.stdout:
            if line.strip() != "write":
                lines.append(line.rstrip("\n"))
                continue
            writes += 1
            if kill_after_writes is not None and writes >= kill_after_writes:
                child.send_signal(signal.SIGKILL)
                break
        status = child.wait(timeout=120)
        if status not in (0, -signal.SIGKILL):
            raise AssertionError(f"the example failed ({status}):\n{child.stderr.read()}")
        return status, lines
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
        child.stderr.close()


def result_of(lines: list[str]) -> dict[str, Any]:
    (line,) = [line for line in lines if line.startswith("result: ")]
    result: dict[str, Any] = json.loads(line.removeprefix("result: "))
    return result


async def stored(root: Path) -> dict[str, Any]:
    """What a finished run left in the store: its view (without the resumes' events), the keys of
    every context, and the store's own check."""
    async with open_store(root, durability="normal", watch_workspaces=False) as store:
        view = await load_run(store, RUN)
        keys = await own_turn_keys(store)
        no_key_twice(keys)
        return {
            "outline": outline(view),
            "keys": {name: sorted(k for k in ks if "run_resumed" not in k) for name, ks in keys.items()},
            "check": (await store.check()).problems,
        }


async def reference(tmp_path: Path) -> tuple[dict[str, Any], dict[str, Any], int]:
    """An uninterrupted run in this process: its result, what it stored, and how many writes it made."""
    writes = 0

    def count() -> None:
        nonlocal writes
        writes += 1

    root = tmp_path / "reference"
    async with open_store(root, durability="normal", watch_workspaces=False) as store:
        done = await load_example().run_pipeline(store, RUN, step=count, say=lambda line: None)
    result = json.loads(json.dumps(done.result, sort_keys=True))
    return result, await stored(root), writes


async def test_kill_after_stage_two_then_rerun_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    expected_result, expected, _ = await reference(tmp_path)
    root = tmp_path / "killed"
    status, lines = run_example(root, "--kill-after-stage", "2")
    assert status == -signal.SIGKILL
    assert lines[-1] == "stage 2's checkpoint is written: killing this process (SIGKILL)"
    assert not any(line.startswith("stage 3") for line in lines)
    status, lines = run_example(root)
    assert status == 0
    assert lines[0].startswith(f"run {RUN!r}: resuming from checkpoint 2 (after implement): skipping plan, implement")
    assert [line.split(" (")[0] for line in lines if line.startswith("stage ")] == ["stage 3 review"]
    assert result_of(lines) == expected_result
    assert await stored(root) == expected
    # Once more: finished, nothing to do, nothing written.
    status, lines = run_example(root)
    assert status == 0 and lines[0] == f"run {RUN!r} finished already: nothing to do"
    assert result_of(lines) == expected_result
    assert await stored(root) == expected


async def test_sigkill_at_random_points_then_resume_always_ends_the_same(tmp_path: Path) -> None:
    seed = int(os.environ.get("PFORGE_CRASH_SEED", time.time_ns() % 10**6))
    rng = random.Random(seed)
    expected_result, expected, writes = await reference(tmp_path)
    assert expected["check"] == [] and writes > 20
    kills: list[list[int]] = []
    for trial in range(KILLS):
        root = tmp_path / f"trial{trial}"
        points = [rng.randint(1, writes)]
        if trial % 3 == 2:  # killed again while resuming
            points.append(rng.randint(1, writes))
        for point in points:
            run_example(root, kill_after_writes=point)
        kills.append(points)
        status, lines = run_example(root)
        where = f"(seed {seed}, trial {trial}, killed after writes {points}; all kills {kills})"
        assert status == 0, where
        assert result_of(lines) == expected_result, where
        got = await stored(root)
        assert got["check"] == [], where
        assert got["outline"] == expected["outline"], where
        assert got["keys"] == expected["keys"], where
