"""The ``pforge`` command, run as a user runs it (``python -m pforge_async`` in a child process), on a
store ``examples/demo.py`` filled, plus a few contexts this module adds through the public API
(payloads of every kind, a long context, a blob alone in its pack)."""

from __future__ import annotations

import base64
import glob
import json
import os
import pty
import select
import shutil
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import anyio
import msgspec
import pytest

from pforge_async import NewTurn, open_store
from pforge_async.agent import UserTurn, load_session_tree
from pforge_async.cas.pack import PackIndex

ROOT = Path(__file__).resolve().parent.parent
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"} | {"PYTHONPATH": str(ROOT)}
PFORGE = [sys.executable, "-m", "pforge_async"]

TEXT = "hello \x1b[31mred\x1b[0m \u202eevil\nsecond line"
BINARY = bytes(range(256))
PY_JSON = json.dumps({"a": 1, "b": [True, None, "x"], "é": "ü"}).encode()
COMPACT_JSON = b'{"k":"v","n":[1,2.5]}'
MSGPACK = msgspec.msgpack.encode({"n": 1, "blob": b"\x00\x01", "list": [1, "two"]})
FLOAT32 = b"\xca\x3f\x80\x00\x00"  # msgpack float32 1.0: msgspec re-encodes it as float64
BIG_TURNS = 3000


@dataclass
class Filled:
    root: Path
    extra_id: int
    turns: dict[str, int]
    marker_blob: str
    marker_tree: str
    demo: Demo


@dataclass
class Demo:
    """What the demo left, read through the library: what the command's output must agree with."""

    contexts: int
    depth: int
    sessions: int
    records: int
    tool_calls: int
    subagents: int
    own_records: int
    task: str
    states: list[str]
    first_state_count: int
    transitions: int
    names: list[str]  # every session of the tree
    first_subagent: str
    helper: str  # a subagent's subagent
    helper_parent: str
    helper_calls: int


def run(*args: str, root: Path | None = None, stdin: str | None = None, cwd: Path | None = None) -> Result:
    argv = [*PFORGE, *(["--root", str(root)] if root is not None else []), *args]
    proc = subprocess.run(argv, capture_output=True, input=stdin, env=ENV, cwd=cwd, timeout=120, check=False)
    return Result(proc.returncode, proc.stdout, proc.stderr.decode("utf-8", "replace"))


def run_all(root: Path, *commands: tuple[str, ...]) -> list[Result]:
    """Read-only commands side by side: they open the store read-only, so they may."""
    procs = [
        subprocess.Popen([*PFORGE, "--root", str(root), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
        for args in commands
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        results.append(Result(proc.returncode, out, err.decode("utf-8", "replace")))
    return results


@dataclass
class Result:
    code: int
    raw: bytes
    stderr: str

    @property
    def out(self) -> str:
        return self.raw.decode("utf-8")

    def json(self) -> object:
        return json.loads(self.raw)

    def ok(self) -> Result:
        assert self.code == 0, f"exit {self.code}: {self.stderr}"
        assert "Traceback" not in self.stderr
        return self

    def one_line_error(self, code: int = 2) -> str:
        assert self.code == code, f"exit {self.code}, wanted {code}: {self.stderr!r} {self.raw[:300]!r}"
        assert "Traceback" not in self.stderr
        lines = self.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("pforge: error: "), self.stderr
        return lines[0]


def terminal_safe(data: bytes) -> None:
    """Nothing a terminal would act on: no C0 control but newline, no C1 control, no bidi override."""
    text = data.decode("utf-8")
    bad = [c for c in text if (ord(c) < 0x20 and c != "\n") or 0x7F <= ord(c) <= 0x9F or c in "\u202a\u202e\u2066"]
    assert not bad, bad[:5]


async def _demo_truth(root: Path) -> Demo:
    async with open_store(root, readonly=True, create=False) as store:
        contexts = await store.turns.list_contexts(limit=1000)
        tree = await load_session_tree(store, "demo")
        sessions = [t for _, t in tree.walk()]
        task = next(r.record.text for r in tree.records if isinstance(r.record, UserTurn))
        states = sorted({state for (state,) in await _rows(root / "memory.db", "SELECT state FROM action_stats")})
        first = sum(s.count for s in await store.memory.stats(states[0]))
        (transitions,) = await _rows(root / "memory.db", "SELECT COUNT(*) FROM transitions")
        parent, helper = next((p, b.session) for _, p in tree.walk() for b in p.subagents if p is not tree)
        return Demo(
            len(contexts.contexts),
            tree.context.head_depth,
            len(sessions),
            sum(len(t.records) for t in sessions),
            sum(len(t.tool_calls) for t in sessions),
            len(tree.subagents),
            len(tree.records),
            task,
            states,
            first,
            transitions[0],
            sorted(t.name for t in sessions),
            tree.subagents[0].session.name,
            helper.name,
            parent.name,
            len(helper.tool_calls),
        )


async def _rows(db: Path, sql: str) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


async def _add_contexts(root: Path) -> tuple[int, dict[str, int], str, str]:
    async with open_store(root, watch_workspaces=False) as store:
        marker_blob = await store.cas.write_blob(b"marker blob for the cli test\n")
        marker_tree = await store.cas.write_tree([("marker.txt", "100644", marker_blob)])
        extra = await store.turns.create_context(name="cli/extra")
        turns: dict[str, int] = {}
        for kind, type_id, payload in (
            ("text", "test.text", TEXT.encode()),
            ("py_json", "test.json", PY_JSON),
            ("compact_json", "test.json", COMPACT_JSON),
            ("binary", "test.binary", BINARY),
            ("msgpack", "test.msgpack", MSGPACK),
            ("float32", "test.msgpack", FLOAT32),
            ("empty", "test.empty", b""),
        ):
            record = await store.turns.append_turn(
                extra.context_id, type_id, payload, idempotency_key=f"cli-test|{kind}", type_version=2
            )
            turns[kind] = record.turn_id
        record = await store.turns.append_turn(extra.context_id, "test.text", b"with a tree", fs_root=marker_tree)
        turns["with_tree"] = record.turn_id
        big = await store.turns.create_context(name="cli/big")
        await store.turns.append_turns(
            [NewTurn(big.context_id, "test.text", f"line {i} ".encode() * 12) for i in range(BIG_TURNS)]
        )
        return extra.context_id, turns, marker_blob, marker_tree


@pytest.fixture(scope="module")
def filled(tmp_path_factory: pytest.TempPathFactory) -> Filled:
    base = tmp_path_factory.mktemp("cli")
    root = base / ".pforge"
    demo = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py"), "--root", str(root)],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=base,
        timeout=300,
        check=False,
    )
    assert demo.returncode == 0, demo.stderr
    demo_truth = anyio.run(_demo_truth, root)
    extra_id, turns, blob, tree = anyio.run(_add_contexts, root)
    return Filled(root, extra_id, turns, blob, tree, demo_truth)


def listing(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` with its size and mtime, but for what a read-only open of a database
    makes by design (to see a live writer's commits): its -shm file, which readers share, and an
    empty -wal file. A write leaves a -wal with frames, or changes the database file."""
    found = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            st = path.stat()
            if path.name.endswith("-shm") or (path.name.endswith("-wal") and st.st_size == 0):
                continue
            found[str(path)] = (st.st_size, st.st_mtime_ns)
    return found


# -- listing and reading ---------------------------------------------------------------------------


def test_sessions_and_contexts(filled: Filled) -> None:
    text, js, prefixed, prefixed_js, ctx, ctx_js = run_all(
        filled.root,
        ("sessions",),
        ("sessions", "--json", "--all"),
        ("sessions", "--prefix", "demo/", "--limit", "3"),
        ("--json", "sessions", "--prefix", "demo/", "--limit", "3"),
        ("contexts", "--limit", "2"),
        ("contexts", "--json", "--all"),
    )
    lines = text.ok().out.splitlines()
    assert lines[0].split() == ["NAME", "ID", "HEAD", "DEPTH", "LAST", "ACTIVITY", "PARENT"]
    demo = filled.demo
    helper = next(line for line in lines if line.startswith(f"{demo.helper} "))
    assert helper.split()[-1] == demo.helper_parent
    assert next(line for line in lines if line.startswith("demo ")).split()[-1] == "-"
    doc = js.ok().json()
    assert isinstance(doc, dict) and doc["more"] is False
    names = [c["name"] for c in doc["contexts"]]
    assert names == sorted(names) and "demo" in names and "cli/big" in names and len(names) == filled.demo.contexts + 2
    by_name = {c["name"]: c for c in doc["contexts"]}
    assert by_name[demo.helper]["parent_context_id"] == by_name[demo.helper_parent]["context_id"]
    assert by_name["cli/big"]["head_depth"] == BIG_TURNS

    shown = prefixed.ok().out.splitlines()
    assert [line.split()[0] for line in shown[1:4]] == [n for n in demo.names if n.startswith("demo/")][:3]
    assert shown[4] == "... more sessions: --limit N or --all"
    page = prefixed_js.ok().json()
    assert isinstance(page, dict) and page["more"] is True and len(page["contexts"]) == 3

    assert ctx.ok().out.splitlines()[-1] == "... more contexts: --limit N or --all"
    every = ctx_js.ok().json()
    assert isinstance(every, dict) and len(every["contexts"]) == filled.demo.contexts + 2
    ids = [c["context_id"] for c in every["contexts"]]
    assert ids == sorted(ids, reverse=True)  # newest first


def test_log(filled: Filled) -> None:
    by_name, by_id, before, everything, js, big = run_all(
        filled.root,
        ("log", "demo", "--limit", "5"),
        ("log", "1", "--limit", "5"),
        ("log", "demo", "--limit", "3", "--before", "0"),  # replaced below with a real turn id
        ("log", "demo", "--all"),
        ("log", filled.demo.first_subagent, "--json", "--limit", "4"),
        ("log", "cli/big"),
    )
    lines = by_name.ok().out.splitlines()
    assert lines[:-1] == by_id.ok().out.splitlines()[:-1]  # the last line names the context as typed
    depth = filled.demo.depth
    assert lines[0].startswith("context 1 'demo': head ") and lines[0].endswith(f", depth {depth}, 5 shown")
    assert "session_end" in lines[5]
    assert lines[-1].startswith(f"... {depth - 5} older turn(s): pforge log demo --before ")
    first_shown = int(lines[1].split()[0])
    assert f"--before {first_shown}," in lines[-1]
    before.one_line_error()  # turn id 0 is no turn id
    again = run("log", "demo", "--limit", "3", "--before", str(first_shown), root=filled.root).ok().out.splitlines()
    assert int(again[3].split()[0]) < first_shown and again[-1].startswith(f"... {depth - 8} older turn(s)")
    all_lines = everything.ok().out.splitlines()
    assert len(all_lines) == 1 + depth and "older" not in all_lines[-1]
    assert (
        "session_start" in all_lines[1]
        and f"user_turn: {json.dumps({'text': filled.demo.task}, separators=(',', ':'))}" in all_lines[3]
    )
    doc = js.ok().json()
    assert isinstance(doc, dict) and doc["context"]["name"] == filled.demo.first_subagent and len(doc["turns"]) == 4
    assert doc["older"] == doc["turns"][0]["depth"] - 1 == doc["context"]["head_depth"] - 4
    assert all(t["encoding"] == "msgpack" and isinstance(t["payload"], dict) for t in doc["turns"])
    big_lines = big.ok().out.splitlines()
    assert len(big_lines) == 22 and big_lines[-1].startswith(f"... {BIG_TURNS - 20} older turn(s)")


def test_show_decodes_every_kind_of_payload(filled: Filled) -> None:
    t = filled.turns

    async def a_tool_call_end() -> int:
        async with open_store(filled.root, readonly=True, create=False) as store:
            info = await store.turns.find_context(filled.demo.first_subagent)
            assert info is not None
            async for turn in store.turns.iter_turns(info.context_id):
                if turn.type_id == "pforge.agent.tool_call_end":
                    return turn.turn_id
        raise AssertionError("no tool_call_end in the first subagent")

    record_turn = anyio.run(a_tool_call_end)
    results = run_all(
        filled.root,
        ("show", str(record_turn)),
        ("show", str(record_turn), "--json"),
        *[("show", str(t[kind])) for kind in ("text", "py_json", "binary", "msgpack", "float32", "empty")],
        ("show", str(t["binary"]), "--json"),
    )
    for result in results:
        terminal_safe(result.ok().raw)
    record, record_js, text, py_json, binary, msgpack, float32, empty, binary_js = results
    out = record.out
    assert "type     pforge.agent.tool_call_end v1 (ToolCallEnd, bundle pforge.agent.v1)" in out
    assert '"call_id": "call-' in out and '"output": {' in out and '"truncated": ' in out and "(verified)" in out
    doc = record_js.json()
    assert isinstance(doc, dict)
    assert doc["payload"]["kind"] == "record" and doc["payload"]["schema"] == "ToolCallEnd"
    assert doc["payload"]["value"]["metadata"] == {}  # a default the record left out, from the schema
    assert doc["turn"]["context_name"] == filled.demo.first_subagent and doc["turn"]["payload_verified"] is True

    assert "-- text:" in text.out
    assert "hello \\x1b[31mred\\x1b[0m \\u202eevil\nsecond line" in text.out  # escaped, line kept
    assert "-- json:" in py_json.out and '"é": "ü"' in py_json.out
    assert "-- binary (hex):" in binary.out and "00000000: 0001 0203" in binary.out
    assert "-- msgpack:" in msgpack.out and '"$base64": "AAE="' in msgpack.out
    assert "-- msgpack:" in float32.out and "1.0" in float32.out
    assert "-- empty payload" in empty.out
    bdoc = binary_js.json()
    assert isinstance(bdoc, dict) and base64.b64decode(bdoc["payload"]["base64"]) == BINARY


def test_tree(filled: Filled) -> None:
    text, js, missing, not_agent = run_all(
        filled.root, ("tree", "demo"), ("tree", "demo", "--json"), ("tree", "nobody"), ("tree", str(filled.extra_id))
    )
    lines = text.ok().out.splitlines()
    demo = filled.demo
    assert lines[0].startswith(f"demo  (context 1, ended: completed, {demo.own_records} records, 0 tool calls, ")
    assert f", {demo.subagents} subagents, " in lines[0]
    assert any(line.startswith(f"    {demo.helper}  (context ") for line in lines)
    assert any(line.startswith("    - call-0 grep: ok, output ") and "(truncated)" in line for line in lines)
    assert lines[-1] == f"{demo.sessions} sessions, {demo.records} records, {demo.tool_calls} tool calls"
    doc = js.ok().json()
    assert isinstance(doc, dict) and len(doc["subagents"]) == demo.subagents
    helper = next(s for s in doc["subagents"] if s["name"] == demo.helper_parent)["subagents"][0]
    assert helper["name"] == demo.helper and len(helper["tool_calls"]) == demo.helper_calls
    assert all(call["fs_root"] for call in helper["tool_calls"])
    assert "no session named 'nobody'" in missing.one_line_error()
    assert not_agent.ok().out.startswith("cli/extra  (context ")  # no agent records: an empty tree


# -- the CAS ------------------------------------------------------------------------------------------


def test_snapshot_restore_diff_cat_file(filled: Filled, tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    for ws in (one, two):
        (ws / "src").mkdir(parents=True)
        (ws / "src" / "same.py").write_text("x = 1\n")
        (ws / "blob.bin").write_bytes(b"\x00\x01\x02")
    (one / "src" / "gone.py").write_text("old\n")
    (one / "notes.txt").write_text("first\nsecond\n")
    (two / "notes.txt").write_text("first\nchanged\n")
    (two / "src" / "new.py").write_text("print('new')\n")
    (two / "blob.bin").write_bytes(b"\x00\x01\x03")
    tree_one = run("snapshot", str(one), root=filled.root).ok().out.strip()
    snap = run("snapshot", str(two), "--json", root=filled.root).ok().json()
    assert isinstance(snap, dict) and snap["files"] == 4
    tree_two = snap["tree"]
    assert len(tree_one) == 64 and tree_one != tree_two

    restored = tmp_path / "restored"
    diff, diff_js, patch, cat_tree, cat_tree_js, kind, restore = run_all(
        filled.root,
        ("diff", tree_one, tree_two),
        ("diff", tree_one, tree_two, "--json"),
        ("diff", tree_one, tree_two, "--patch"),
        ("cat-file", tree_two),
        ("cat-file", tree_two, "--json"),
        ("cat-file", "-t", tree_two),
        ("restore", tree_two, str(restored)),
    )
    lines = diff.ok().out.splitlines()
    assert lines[0].endswith(": 1 added, 1 removed, 2 modified")
    assert lines[1:] == ["M blob.bin", "M notes.txt", "D src/gone.py", "A src/new.py"]
    doc = diff_js.ok().json()
    assert isinstance(doc, dict)
    assert [e["path"] for e in doc["added"]] == ["src/new.py"] and [e["path"] for e in doc["removed"]] == [
        "src/gone.py"
    ]
    assert [m["path"] for m in doc["modified"]] == ["blob.bin", "notes.txt"]
    out = patch.ok().out
    assert "--- a/notes.txt\n+++ b/notes.txt\n@@ -1,2 +1,2 @@\n first\n-second\n+changed\n" in out
    assert "Binary files a/blob.bin and b/blob.bin differ" in out
    assert "--- /dev/null\n+++ b/src/new.py\n@@ -0,0 +1 @@\n+print('new')\n" in out
    assert "--- a/src/gone.py\n+++ /dev/null\n" in out

    entries = cat_tree.ok().out.splitlines()
    assert entries[-1].startswith("040000 tree ") and entries[-1].endswith("\tsrc")
    tree_doc = cat_tree_js.ok().json()
    assert isinstance(tree_doc, dict) and tree_doc["type"] == "tree"
    blob_oid = next(e["oid"] for e in tree_doc["entries"] if e["path"] == "blob.bin")
    assert kind.ok().out == "tree\n"
    blob = run("cat-file", blob_oid, root=filled.root).ok()
    assert blob.raw == b"\x00\x01\x03"  # into a pipe: the bytes as they are
    blob_js = run("cat-file", blob_oid, "--json", root=filled.root).ok().json()
    assert isinstance(blob_js, dict) and base64.b64decode(blob_js["base64"]) == b"\x00\x01\x03"

    assert restore.ok().out.startswith(f"restored tree {tree_two[:12]} ")
    assert (restored / "notes.txt").read_text() == "first\nchanged\n"
    assert (restored / "blob.bin").read_bytes() == b"\x00\x01\x03"
    assert sorted(p.name for p in restored.rglob("*")) == ["blob.bin", "new.py", "notes.txt", "same.py", "src"]
    again = run("restore", tree_two, str(restored), root=filled.root).one_line_error()
    assert "not empty" in again

    # a turn's fs_root stands for its tree
    by_turn = run("diff", str(filled.turns["with_tree"]), tree_one, root=filled.root).ok().out.splitlines()
    assert by_turn[0].startswith(f"turn {filled.turns['with_tree']} (tree {filled.marker_tree[:12]}) -> ")
    assert "D marker.txt" in by_turn


# -- ledgers ------------------------------------------------------------------------------------------


def test_budget_and_memory(filled: Filled) -> None:
    text, js, tags, unknown, states, state, state_js, no_state = run_all(
        filled.root,
        ("budget",),
        ("budget", "--json"),
        ("budget", "demo-llm", "--tags"),
        ("budget", "nobody"),
        ("memory",),
        ("memory", filled.demo.states[0]),
        ("memory", filled.demo.states[0], "--json"),
        ("memory", "no-such-state"),
    )

    async def truth() -> tuple[int, int]:
        async with open_store(filled.root, readonly=True, create=False) as store:
            totals = await store.budget.totals("demo-llm")
            return totals.tokens, totals.cost

    tokens, cost = anyio.run(truth)
    lines = text.ok().out.splitlines()
    assert lines[0] == "vendor demo-llm"
    assert lines[1].startswith(f"  spent      {tokens:,} tokens, cost {cost // 10**6}.{cost % 10**6:06d}")
    assert "  budget     all time: 1,000,000,000,000 tokens, cost 1,000,000.000000" in lines
    doc = js.ok().json()
    assert isinstance(doc, dict)
    (vendor,) = doc["vendors"]
    assert vendor["tokens"] == tokens and vendor["cost"] == cost
    (window,) = vendor["budgets"]
    assert window["remaining_tokens"] == 10**12 - tokens - vendor["held_tokens"]
    rows = tags.ok().out.splitlines()
    header = rows.index(next(r for r in rows if r.startswith("TAG ")))
    agents = {r.split()[1]: r.split() for r in rows[header + 1 :] if r.startswith("agent ")}
    assert sorted(agents) == filled.demo.names
    assert sum(int(a[2].replace(",", "")) for a in agents.values()) == tokens
    assert "no budget, spend or reservation for vendor 'nobody'" in unknown.one_line_error()

    assert [line.split()[0] for line in states.ok().out.splitlines()] == ["STATE", *filled.demo.states]
    assert state.ok().out.splitlines()[-1].startswith("best action (UCB1): ")
    sdoc = state_js.ok().json()
    assert isinstance(sdoc, dict) and sum(a["count"] for a in sdoc["actions"]) == filled.demo.first_state_count
    assert sdoc["best_action"] in {a["action"] for a in sdoc["actions"]}
    assert "no action recorded in state 'no-such-state'" in no_state.one_line_error()


# -- the store as a whole -----------------------------------------------------------------------------


def test_check_and_stats_on_a_sound_store(filled: Filled) -> None:
    check, check_js, stats, stats_js = run_all(
        filled.root, ("check",), ("check", "--json"), ("stats",), ("stats", "--json")
    )
    assert check.ok().out.startswith("ok: ") and check.stderr == ""
    doc = check_js.ok().json()
    assert isinstance(doc, dict) and doc["ok"] is True and doc["problems"] == [] and doc["objects_checked"] > 100
    with sqlite3.connect(f"file:{filled.root / 'turns.db'}?mode=ro", uri=True) as conn:
        turns = conn.execute("SELECT COUNT(*) FROM turns").fetchone()[0]
    conn.close()
    table = stats.ok().out.splitlines()
    assert table[1].split()[0] == "PART" and [line.split()[0] for line in table[2:]] == [
        "cas",
        "turns.db",
        "memory.db",
        "nonces.db",
        "budget.db",
    ]
    assert f"{turns:,} turns" in table[3]
    sdoc = stats_js.ok().json()
    assert isinstance(sdoc, dict) and sdoc["parts"]["turns.db"]["turns"] == turns
    assert sdoc["parts"]["memory.db"]["transitions"] == filled.demo.transitions
    assert sdoc["parts"]["cas"]["objects"] > 100


def _pack_holding(root: Path, oid: str) -> Path:
    for idx in glob.glob(str(root / "cas" / "objects" / "pack" / "*.idx")):
        if bytes.fromhex(oid) in PackIndex(idx).offsets:
            return Path(idx).with_suffix(".pack")
    raise AssertionError(f"{oid} is in no pack")


def test_check_names_each_problem(filled: Filled, tmp_path: Path) -> None:
    copies = {}
    for case in ("flipped", "deleted", "edited", "truncated", "emptied"):
        copies[case] = tmp_path / case
        shutil.copytree(filled.root, copies[case])
    # one flipped byte inside the marker blob's compressed data (its pack holds it alone)
    pack = _pack_holding(copies["flipped"], filled.marker_blob)
    data = bytearray(pack.read_bytes())
    data[len(data) // 2] ^= 0x40
    pack.write_bytes(bytes(data))
    # one deleted object: the marker blob's pack and its index, which a tree refers to
    pack = _pack_holding(copies["deleted"], filled.marker_blob)
    assert len(PackIndex(str(pack.with_suffix(".idx"))).offsets) == 1
    pack.unlink()
    pack.with_suffix(".idx").unlink()
    # one turn row edited behind the store's back
    conn = sqlite3.connect(copies["edited"] / "turns.db")
    with conn:
        conn.execute("UPDATE turns SET payload = X'00' WHERE turn_id = ?", (filled.turns["text"],))
    conn.close()
    # a truncated database: half of turns.db; and one cut to nothing, which the store refuses to open
    turns_db = copies["truncated"] / "turns.db"
    os.truncate(turns_db, turns_db.stat().st_size // 2)
    os.truncate(copies["emptied"] / "memory.db", 0)

    results = run_all(tmp_path, *[("--root", str(copies[c]), "check") for c in copies])
    found = {}
    for case, result in zip(copies, results, strict=True):
        assert result.code == 1, (case, result.stderr, result.out)
        assert "Traceback" not in result.stderr
        assert result.stderr.strip() == f"{len(result.out.splitlines())} problem(s) in {copies[case]}"
        found[case] = result.out
    assert f"cas: object {filled.marker_blob} is corrupt" in found["flipped"]
    assert found["deleted"] == f"cas: object {filled.marker_blob} is referenced but missing\n"
    assert f"turns.db: turn {filled.turns['text']} does not match its payload_hash" in found["edited"]
    assert "turns.db" in found["truncated"] and "malformed" in found["truncated"]
    assert (
        found["emptied"].startswith("the store cannot be opened: ")
        and "memory.db is empty (0 bytes)" in found["emptied"]
    )
    doc = run("check", "--json", root=copies["edited"]).json()
    assert isinstance(doc, dict) and doc["ok"] is False and len(doc["problems"]) == 1


def test_argument_errors_are_one_line_and_create_nothing(filled: Filled, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / ".pforge"
    a_file = tmp_path / "a-file"
    a_file.write_bytes(b"not a store")
    empty = tmp_path / "empty"
    empty.mkdir()
    before = listing(filled.root)
    cases = [
        (("--root", str(missing), "check"), "no pforge store at"),
        (("--root", str(missing), "snapshot", str(tmp_path)), "init` creates one"),
        (("--root", str(a_file), "log", "demo"), "is not a directory"),
        (("--root", "", "check"), "empty string"),
        (("--root", str(filled.root), "log", "no-such-session"), "no context or session named 'no-such-session'"),
        (("--root", str(filled.root), "log", "99999"), "'99999' and none with that id"),
        (("--root", str(filled.root), "tree", "no-such-session"), "no session named 'no-such-session'"),
        (("--root", str(filled.root), "cat-file", "abc"), "invalid object id 'abc'"),
        (("--root", str(filled.root), "cat-file", "0" * 64), f"no object {'0' * 64}"),
        (("--root", str(filled.root), "restore", "g" * 64, str(tmp_path / "r")), "invalid tree id"),
        (("--root", str(filled.root), "show", "x1"), "invalid turn id 'x1'"),
        (("--root", str(filled.root), "log"), "the following arguments are required: CONTEXT"),
    ]
    results = run_all(empty, *[args for args, _ in cases])
    for (args, expected), result in zip(cases, results, strict=True):
        line = result.one_line_error()
        assert expected in line, (args, line)
    assert not missing.parent.exists()
    assert a_file.read_bytes() == b"not a store"
    assert list(empty.iterdir()) == []  # no ./.pforge made where the commands ran
    assert not (tmp_path / "r").exists()
    assert listing(filled.root) == before
    # run with no --root in a directory without a store: the default ./.pforge is not created
    result = run("sessions", cwd=empty)
    assert f"no pforge store at {empty / '.pforge'}" in result.one_line_error()
    assert list(empty.iterdir()) == []


def test_console_script_entry_point() -> None:
    from importlib.metadata import entry_points

    from pforge_async.cli import main

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "pforge"]
    assert script.load() is main


# -- export / import ----------------------------------------------------------------------------------


def _comparable(line: str) -> dict[str, object]:
    doc = json.loads(line)
    assert isinstance(doc, dict)
    for key in ("turn_id", "context_id", "parent_turn_id", "created_at_ms"):
        doc.pop(key)
    return doc


def test_export_then_import_round_trips(filled: Filled, tmp_path: Path) -> None:
    for name in (filled.demo.helper_parent, "cli/extra"):
        first = run("export", name, root=filled.root).ok()
        lines = first.out.splitlines()
        file = tmp_path / "export.jsonl"
        file.write_bytes(first.raw)
        copy = f"copy of {name}"
        imported = run("import", str(file), "--name", copy, "--json", root=filled.root).ok().json()
        assert isinstance(imported, dict) and imported["turns"] == len(lines) and imported["name"] == copy
        again = run("export", copy, root=filled.root).ok().out.splitlines()
        assert [_comparable(line) for line in again] == [_comparable(line) for line in lines]

    async def payloads(*names: str) -> list[list[tuple[str, int, bytes, str | None, str | None]]]:
        async with open_store(filled.root, readonly=True, create=False) as store:
            out = []
            for name in names:
                info = await store.turns.find_context(name)
                assert info is not None
                out.append(
                    [
                        (t.type_id, t.type_version, t.payload, t.idempotency_key, t.fs_root)
                        async for t in store.turns.iter_turns(info.context_id)
                    ]
                )
            return out

    original, copied = anyio.run(payloads, "cli/extra", "copy of cli/extra")
    assert copied == original
    encodings = [
        json.loads(line)["encoding"] for line in run("export", "cli/extra", root=filled.root).ok().out.splitlines()
    ]
    # text, python-style json, compact json, binary, msgpack, float32 msgpack, empty, text with a tree
    assert encodings == ["text", "json-python", "json", "base64", "msgpack", "base64", "text", "text"]

    # a line whose payload does not match its hash: refused before anything is written
    lines = (tmp_path / "export.jsonl").read_text().splitlines()
    doc = json.loads(lines[0])
    doc["payload"] = "tampered"
    doc["encoding"] = "text"
    lines[0] = json.dumps(doc)
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    error = run("import", str(tmp_path / "bad.jsonl"), "--name", "never", root=filled.root).one_line_error()
    assert "line 1: the payload does not match its payload_sha256" in error
    assert "never" not in run("sessions", "--prefix", "never", root=filled.root).ok().out
    taken = run("import", str(tmp_path / "export.jsonl"), "--name", "demo", root=filled.root).one_line_error()
    assert "demo" in taken


# -- progress and pipes ---------------------------------------------------------------------------------


def _under_pty(args: list[str]) -> tuple[int, bytes, bytes]:
    """Run with stderr on a pseudo-terminal (stdout a pipe): (status, stdout, what the terminal got)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=slave, env=ENV)
    os.close(slave)
    seen = b""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        elif proc.poll() is not None:
            break
    os.close(master)
    assert proc.stdout is not None
    out = proc.stdout.read()
    proc.stdout.close()
    return proc.wait(timeout=60), out, seen


def test_progress_bar_on_a_terminal_only(filled: Filled, tmp_path: Path) -> None:
    root = str(filled.root)
    code, out, tty = _under_pty([*PFORGE, "--root", root, "check"])
    assert code == 0 and out.startswith(b"ok: ")
    assert b"\rcheck [" in tty and tty.endswith(b"\r\x1b[K")
    code, out, tty = _under_pty([*PFORGE, "--root", root, "export", "cli/big", "-o", str(tmp_path / "big.jsonl")])
    assert code == 0
    assert f"{BIG_TURNS:,}/{BIG_TURNS:,} 100%".encode() in tty
    piped_check, piped_export = run_all(filled.root, ("check",), ("export", "cli/big"))
    assert piped_check.ok().stderr == "" and piped_export.ok().stderr == ""
    assert len(piped_export.out.splitlines()) == BIG_TURNS


def test_a_closed_pipe_ends_quietly(filled: Filled) -> None:
    python = " ".join(PFORGE)
    script = f"set -o pipefail; {python} --root '{filled.root}' log cli/big --all | head -1"
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=ENV, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert proc.stdout.startswith("context ") and proc.stdout.count("\n") == 1
