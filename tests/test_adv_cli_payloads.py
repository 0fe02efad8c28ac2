"""Turn payloads nested deeper than a parser recurses (any writer may store any bytes): ``show``,
``log`` and ``export`` show them as text or bytes instead of dying of a ``RecursionError``, an export
of them still imports back to the same bytes, and an import line nested that deeply is a bad
argument naming its line, with nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import msgspec
import pytest

from pforge_async import open_store

from .test_adv_cli_common import listing, ok, one_line_error, pforge

#: 100,000 nested arrays as JSON text and as msgpack: deeper than any recursive parser goes
DEEP_JSON = b"[" * 100_000 + b"]" * 100_000
DEEP_MSGPACK = b"\x91" * 100_000 + b"\xc0"
#: as deep as a terminal view is still worth reading: shown as the structure it is
SHALLOW_JSON = b"[" * 50 + b"1" + b"]" * 50


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    root = tmp_path_factory.mktemp("payloads") / ".pforge"

    async def go() -> dict[str, int]:
        async with open_store(root, watch_workspaces=False) as opened:
            ctx = await opened.turns.open_context("deep")
            ids = {"context": ctx.context_id}
            for name, payload in (("json", DEEP_JSON), ("msgpack", DEEP_MSGPACK), ("shallow", SHALLOW_JSON)):
                ids[name] = (await opened.turns.append_turn(ctx.context_id, "plain", payload)).turn_id
            return ids

    return root, anyio.run(go)


@pytest.mark.parametrize("which", ["json", "msgpack"])
def test_show_of_a_deeply_nested_payload(store: tuple[Path, dict[str, int]], which: str) -> None:
    root, ids = store
    text = ok(pforge("--root", str(root), "show", str(ids[which])))
    assert f"turn     {ids[which]}".encode() in text
    doc = json.loads(ok(pforge("--root", str(root), "--json", "show", str(ids[which]))))
    assert doc["turn"]["payload_verified"] is True
    assert doc["payload"]["kind"] in ("text", "binary")


def test_a_payload_of_reasonable_depth_is_still_shown_as_json(store: tuple[Path, dict[str, int]]) -> None:
    root, ids = store
    doc = json.loads(ok(pforge("--root", str(root), "--json", "show", str(ids["shallow"]))))
    assert doc["payload"]["kind"] == "json"
    assert doc["payload"]["value"] == json.loads(SHALLOW_JSON)


def test_log_and_export_of_deeply_nested_payloads_round_trip(
    store: tuple[Path, dict[str, int]], tmp_path: Path
) -> None:
    root, ids = store
    ctx = str(ids["context"])
    ok(pforge("--root", str(root), "log", ctx))
    ok(pforge("--root", str(root), "log", ctx, "--all"))
    ok(pforge("--root", str(root), "--json", "log", ctx))
    exported = ok(pforge("--root", str(root), "export", ctx))
    lines = exported.decode().splitlines()
    assert len(lines) == 3
    file = tmp_path / "deep.jsonl"
    file.write_bytes(exported)
    imported = json.loads(ok(pforge("--root", str(root), "--json", "import", str(file), "--name", "deep copy")))
    again = ok(pforge("--root", str(root), "export", "deep copy")).decode().splitlines()
    assert imported["turns"] == 3
    assert [json.loads(line)["payload_sha256"] for line in again] == [
        json.loads(line)["payload_sha256"] for line in lines
    ]


@pytest.mark.parametrize(
    ("encoding", "depth"),
    [("msgpack", 100_000), ("json", 100_000), ("text", 100_000), ("msgpack", 500)],
)
def test_an_import_line_nested_too_deeply_is_a_bad_argument_and_writes_nothing(
    store: tuple[Path, dict[str, int]], tmp_path: Path, encoding: str, depth: int
) -> None:
    """100,000 levels: too deep for the line's JSON parser; 500: the line parses, and the payload is
    too deep for the encoder that turns it back into bytes."""
    root, _ = store
    file = tmp_path / "deep-line.jsonl"
    payload = "[" * depth + "]" * depth
    file.write_text('{"type_id": "t", "encoding": "' + encoding + '", "payload": ' + payload + "}\n")
    before = listing(root)
    assert "line 1" in one_line_error(pforge("--root", str(root), "import", str(file), "--name", "never"), 2)
    assert listing(root) == before


def test_a_bundle_whose_schema_refers_to_itself_without_end_does_not_stop_show(tmp_path: Path) -> None:
    """Any writer may publish a registry bundle: one whose schema is an object type made of itself
    leaves the payload shown as decoded, with a note, instead of a ``RecursionError``."""
    root = tmp_path / ".pforge"
    bundle = {
        "encoding": "msgpack",
        "types": {"evil.type": {"version": 1, "schema": {"$ref": "#/$defs/X"}}},
        "$defs": {"X": {"type": "object", "anyOf": [{"$ref": "#/$defs/X"}]}},
    }

    async def go() -> int:
        async with open_store(root, watch_workspaces=False) as opened:
            await opened.turns.publish_registry_bundle("evil", json.dumps(bundle).encode())
            ctx = await opened.turns.open_context("typed")
            return (
                await opened.turns.append_turn(ctx.context_id, "evil.type", msgspec.msgpack.encode({"a": 1}))
            ).turn_id

    turn_id = anyio.run(go)
    doc = json.loads(ok(pforge("--root", str(root), "--json", "show", str(turn_id))))
    assert doc["payload"]["value"] == {"a": 1}
    assert any("refers to itself" in problem for problem in doc["payload"]["problems"])
    ok(pforge("--root", str(root), "log", "typed"))
