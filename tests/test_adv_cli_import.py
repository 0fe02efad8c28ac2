"""``pforge import`` refuses a file the store would refuse, before anything is written: a line the
turn store refuses (an empty or over-long type id, a type version out of range, an over-long key, an
fs_root that is no object id), whether in the first batch or after 4,096 good lines, and a key the
file repeats (an export whose chain crosses a fork where both contexts used one key: appended into
one context, the second turn would be taken for a retry of the first and silently dropped). No
context is created, so the same ``--name`` is free for the corrected file."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest

from pforge_async import open_store

from .test_adv_cli_common import listing, ok, one_line_error, pforge


def line(type_id: object = "plain", payload: str = "x", **extra: object) -> str:
    return json.dumps({"type_id": type_id, "encoding": "text", "payload": payload, **extra})


GOOD = line()


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("import") / ".pforge"
    assert ok(pforge("--root", str(root), "init"))
    return root


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ([line(type_id="")], "line 1: type_id"),
        ([GOOD, line(type_id="t" * 257)], "line 2: type_id"),
        ([GOOD, line(type_version=2**40)], "line 2: type_version"),
        ([line(idempotency_key="k" * 2000)], "line 1: idempotency_key"),
        ([line(fs_root="not-an-oid")], "line 1: "),
        ([GOOD] * 4096 + [line(type_id="")], "line 4097: type_id"),
        ([line(idempotency_key="k"), GOOD, line(idempotency_key="k")], "line 3"),
    ],
)
def test_a_file_the_store_would_refuse_writes_nothing(
    root: Path, tmp_path: Path, lines: list[str], expected: str
) -> None:
    file = tmp_path / "bad.jsonl"
    file.write_text("\n".join(lines) + "\n")
    before = listing(root)
    message = one_line_error(pforge("--root", str(root), "import", str(file), "--name", "imported"), 2)
    assert expected in message, message
    assert listing(root) == before
    sessions = json.loads(ok(pforge("--root", str(root), "--json", "sessions")))
    assert sessions["contexts"] == []


def test_an_export_crossing_a_fork_that_reused_a_key_is_refused_not_shortened(tmp_path: Path) -> None:
    root = tmp_path / ".pforge"

    async def fill() -> None:
        async with open_store(root, watch_workspaces=False) as store:
            parent = await store.turns.open_context("parent")
            first = await store.turns.append_turn(parent.context_id, "plain", b"same", idempotency_key="k")
            child = await store.turns.fork_context(first.turn_id, name="child")
            await store.turns.append_turn(child.context_id, "plain", b"same", idempotency_key="k")
            await store.turns.append_turn(child.context_id, "plain", b"other")

    anyio.run(fill)
    file = tmp_path / "child.jsonl"
    file.write_bytes(ok(pforge("--root", str(root), "export", "child")))
    assert len(file.read_text().splitlines()) == 3
    message = one_line_error(pforge("--root", str(root), "import", str(file), "--name", "copy"), 2)
    assert "line 2" in message and "line 1" in message
    assert json.loads(ok(pforge("--root", str(root), "--json", "sessions", "--prefix", "copy")))["contexts"] == []


def test_a_good_file_still_imports_whole(tmp_path: Path) -> None:
    root = tmp_path / ".pforge"
    ok(pforge("--root", str(root), "init"))
    file = tmp_path / "good.jsonl"
    file.write_text("\n".join([line(idempotency_key="a"), GOOD, line(idempotency_key="b")]) + "\n")
    doc = json.loads(ok(pforge("--root", str(root), "--json", "import", str(file), "--name", "good")))
    assert doc["turns"] == 3
    assert json.loads(ok(pforge("--root", str(root), "--json", "log", "good")))["context"]["head_depth"] == 3
