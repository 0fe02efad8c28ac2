"""Ids typed on the command line that are no ids: a number too long for ``int()`` to convert (over
4,300 digits) is a bad argument (one line, exit 2), not a ``ValueError`` traceback; an id with leading
zeros is still that id."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest

from pforge_async import open_store

from .test_adv_cli_common import listing, ok, one_line_error, pforge


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    root = tmp_path_factory.mktemp("ids") / ".pforge"

    async def go() -> int:
        async with open_store(root, watch_workspaces=False) as opened:
            ctx = await opened.turns.open_context("ids")
            return (await opened.turns.append_turn(ctx.context_id, "plain", b"hello")).turn_id

    return root, anyio.run(go)


@pytest.mark.parametrize(
    "args",
    [
        ("show", "9" * 5000),
        ("log", "9" * 5000),
        ("log", "id:" + "9" * 5000),
        ("diff", "9" * 5000, "1"),
        ("restore", "9" * 5000, "/nonexistent/target"),
        ("tree", "9" * 5000),
        ("log", "ids", "--before", "9" * 5000),
    ],
)
def test_a_number_too_long_to_convert_is_a_bad_argument(store: tuple[Path, int], args: tuple[str, ...]) -> None:
    root, _ = store
    before = listing(root)
    line = one_line_error(pforge("--root", str(root), *args), 2)
    assert "Exceeds the limit" not in line
    assert len(line) < 400  # the 5,000 digits are not echoed whole
    assert listing(root) == before


def test_an_id_with_leading_zeros_is_still_that_id(store: tuple[Path, int]) -> None:
    root, turn_id = store
    padded = "0" * 30 + str(turn_id)
    doc = json.loads(ok(pforge("--root", str(root), "--json", "show", padded)))
    assert doc["turn"]["turn_id"] == turn_id
    doc = json.loads(ok(pforge("--root", str(root), "--json", "log", "id:" + padded)))
    assert doc["context"]["name"] == "ids"


@pytest.mark.parametrize("limit", [str(2**63), "9" * 5000])
def test_a_limit_past_any_id_is_a_bad_argument_saying_so(store: tuple[Path, int], limit: str) -> None:
    """A limit SQLite cannot bind was refused as 'database turns.db: cannot store a value' (a read that
    stores nothing), and one of 5,000 digits as 'not a number'."""
    root, _ = store
    for command in (("log", "ids"), ("sessions",), ("contexts",)):
        line = one_line_error(pforge("--root", str(root), *command, "--limit", limit), 2)
        assert "argument --limit" in line and "at most" in line, line
        assert len(line) < 400
