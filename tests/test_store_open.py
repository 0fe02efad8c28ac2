"""Opening and closing the store: ``connect`` / ``aclose`` from any task, what opening refuses, the
manifest, read-only opens (as a user who cannot write the root), and calls after close."""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from pforge_async import (
    ActorClosed,
    IntegrityError,
    InvalidInput,
    NotFound,
    StorageError,
    Store,
    Usage,
    connect,
    open_store,
)
from pforge_async.turnstore.types import NewTurn

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
#: a store written by commit 9757afc, the release before manifests (tests/data/make_store_9757afc.py).
OLD_STORE = Path(__file__).resolve().parent / "data" / "store_9757afc.tar.gz"


def _tree(root: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every path under ``root`` with its mode, size and content: to prove nothing changed. SQLite's
    shared-memory index (``-shm``) and an empty ``-wal`` hold no data and are left out: a reader of a
    WAL database may make them."""
    out: dict[str, tuple[int, int, bytes]] = {}
    if not root.exists():
        return out
    for path in sorted(root.rglob("*")):
        try:
            st = path.lstat()
        except FileNotFoundError:
            continue
        if path.name.endswith("-shm") or (path.name.endswith("-wal") and st.st_size == 0):
            continue
        data = path.read_bytes() if stat.S_ISREG(st.st_mode) else b""
        out[str(path.relative_to(root))] = (st.st_mode, st.st_size, data)
    return out


# -- any task may hold the store ---------------------------------------------------------------------


async def test_connect_is_awaitable_and_aclose_closes(tmp_path: Path) -> None:
    store = await connect(tmp_path / "s")
    ctx = await store.turns.create_context()
    await store.turns.append_turn(ctx.context_id, "user", b"hello")
    assert not store.closed
    await store.aclose()
    assert store.closed
    await store.aclose()  # twice is fine
    with pytest.raises(ActorClosed):
        await store.turns.get_head(ctx.context_id)
    async with connect(tmp_path / "s") as again:
        assert (await again.turns.list_turns(ctx.context_id))[0].payload == b"hello"
    assert again.closed
    async with await connect(tmp_path / "s") as third:
        assert (await third.turns.get_head(ctx.context_id)).head_depth == 1
    assert third.closed


async def test_open_in_one_task_close_in_another(tmp_path: Path) -> None:
    holder: list[Store] = []
    opened = anyio.Event()

    async def opener() -> None:
        holder.append(await connect(tmp_path / "s"))
        opened.set()

    async def closer() -> None:
        await opened.wait()
        store = holder[0]
        ctx = await store.turns.create_context()
        await store.turns.append_turn(ctx.context_id, "user", b"from the closer")
        await store.aclose()

    async with anyio.create_task_group() as tg:
        tg.start_soon(opener)
        tg.start_soon(closer)
    assert holder[0].closed
    async with open_store(tmp_path / "s") as store:
        assert (await store.turns.get_turn(1)).payload == b"from the closer"


async def test_the_opener_being_cancelled_does_not_close_the_store(tmp_path: Path) -> None:
    holder: list[Store] = []
    with anyio.CancelScope() as scope:

        async def open_then_cancel() -> None:
            holder.append(await connect(tmp_path / "s"))
            scope.cancel()
            await anyio.sleep_forever()

        async with anyio.create_task_group() as tg:
            tg.start_soon(open_then_cancel)
    store = holder[0]
    assert not store.closed
    ctx = await store.turns.create_context()
    assert (await store.turns.append_turn(ctx.context_id, "t", b"still serving")).depth == 1
    await store.aclose()


async def _store_fixture(root: Path) -> AsyncIterator[Store]:
    """A fixture as pytest-asyncio writes one: setup and teardown run in two different tasks."""
    async with connect(root) as store:
        yield store


async def test_a_fixture_whose_setup_and_teardown_run_in_different_tasks(tmp_path: Path) -> None:
    # What pytest-asyncio does with an async generator fixture: the setup (first __anext__) and the
    # teardown (second __anext__) each run in a task of their own. `async with open_store` failed here
    # with "exit cancel scope in a different task".
    agen = _store_fixture(tmp_path / "s")
    store = await asyncio.get_running_loop().create_task(agen.__anext__())  # type: ignore[arg-type,var-annotated]
    ctx = await store.turns.create_context()
    await store.turns.append_turn(ctx.context_id, "user", b"kept")

    async def teardown() -> None:
        with pytest.raises(StopAsyncIteration):
            await agen.__anext__()

    await asyncio.get_running_loop().create_task(teardown())
    assert store.closed
    async with open_store(tmp_path / "s") as reopened:
        assert (await reopened.turns.get_turn(1)).payload == b"kept"


@pytest.fixture
async def held_store(tmp_path: Path) -> AsyncIterator[Store]:
    store = await connect(tmp_path / "fixture")
    yield store
    await store.aclose()
    assert store.closed


async def test_an_async_fixture_yields_a_connected_store(held_store: Store) -> None:
    ctx = await held_store.turns.create_context()
    turn = await held_store.turns.append_turn(ctx.context_id, "user", b"via a fixture")
    assert (await held_store.turns.get_turn(turn.turn_id)).payload == b"via a fixture"
    assert held_store.root.name == "fixture"


async def test_open_store_stays_structured_and_an_error_in_the_block_comes_out_as_itself(tmp_path: Path) -> None:
    with pytest.raises(KeyError, match="inner"):
        async with open_store(tmp_path / "s") as store:
            raise KeyError("inner")
    assert store.closed


# -- what opening refuses; nothing is created by a refused open ----------------------------------------


async def test_create_false_on_nothing_is_not_found_and_creates_nothing(tmp_path: Path) -> None:
    root = tmp_path / "a" / "b" / "store"
    with pytest.raises(NotFound, match=str(root)):
        await connect(root, create=False)
    assert not (tmp_path / "a").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NotFound, match=str(empty)):
        async with open_store(empty, create=False):
            pass
    assert list(empty.iterdir()) == []
    async with open_store(tmp_path / "made"):
        pass
    async with open_store(tmp_path / "made", create=False) as store:
        assert store.root == tmp_path / "made"


async def test_the_empty_string_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InvalidInput, match="empty"):
        await connect("")
    with pytest.raises(InvalidInput, match="empty"):
        async with open_store(""):
            pass
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("root", [None, 42, b"/tmp/x", "/tmp/nul\0here"])
async def test_a_root_that_is_not_a_path_is_refused(tmp_path: Path, root: object) -> None:
    with pytest.raises(InvalidInput):
        await connect(root)  # type: ignore[arg-type]


async def test_a_file_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    root = tmp_path / "file"
    root.write_text("not a store")
    with pytest.raises(InvalidInput, match=f"{root}.*not a directory"):
        await connect(root)
    assert root.read_text() == "not a store"
    with pytest.raises(InvalidInput, match="not a directory"):
        await connect(root / "below")


async def test_a_non_empty_directory_that_is_no_store_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "project"
    root.mkdir()
    (root / "main.py").write_text("print('hi')\n")
    (root / "src").mkdir()
    before = _tree(root)
    for readonly in (False, True):
        with pytest.raises((InvalidInput, NotFound)) as info:
            await connect(root, readonly=readonly)
        assert str(root) in str(info.value)
        if not readonly:
            assert isinstance(info.value, InvalidInput) and "not a pforge store" in str(info.value)
    assert _tree(root) == before


async def test_bad_options_are_refused_before_anything_is_created(tmp_path: Path) -> None:
    for options in ({"durability": "sometimes"}, {"create": "yes"}, {"readonly": 1}):
        with pytest.raises(InvalidInput):
            await connect(tmp_path / "s", **options)  # type: ignore[arg-type]
    assert not (tmp_path / "s").exists()


# -- the manifest ---------------------------------------------------------------------------------------


async def _filled(root: Path) -> dict[str, Any]:
    async with open_store(root, watch_workspaces=False) as store:
        ctx = await store.turns.create_context()
        first = await store.turns.append_turn(ctx.context_id, "user", b"hello")
        await store.memory.record_transition("s", "a", "t", 0.5, True)
        await store.budget.set_budget("v", tokens=1000)
        await store.budget.record_spend("v", "m", input_tokens=1, output_tokens=2, cost=3)
        blob = await store.cas.write_blob(b"a blob")
        return {"context": ctx.context_id, "turn": first.turn_id, "blob": blob}


async def test_a_new_store_records_its_parts(tmp_path: Path) -> None:
    root = tmp_path / "s"
    await _filled(root)
    manifest = json.loads((root / "pforge.json").read_text())
    assert manifest["format"] == "pforge_async store"
    assert manifest["version"] == 1
    assert sorted(manifest["parts"]) == sorted(["cas", "turns.db", "memory.db", "nonces.db", "budget.db"])
    assert stat.S_IMODE(root.stat().st_mode) == 0o700


@pytest.mark.parametrize("part", ["turns.db", "memory.db", "nonces.db", "budget.db"])
@pytest.mark.parametrize("damage", ["truncated", "deleted"])
async def test_a_database_truncated_or_deleted_is_refused_naming_it(tmp_path: Path, part: str, damage: str) -> None:
    root = tmp_path / "s"
    await _filled(root)
    if damage == "truncated":
        (root / part).write_bytes(b"")
    else:
        (root / part).unlink()
    before = _tree(root)
    for readonly in (False, True):
        with pytest.raises(IntegrityError, match=str(root / part)):
            await connect(root, readonly=readonly)
    assert _tree(root) == before  # in particular: no new, empty database


async def test_a_missing_cas_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "s"
    await _filled(root)
    shutil.rmtree(root / "cas")
    with pytest.raises(IntegrityError, match="CAS"):
        await connect(root)
    assert not (root / "cas").exists()


async def test_a_damaged_manifest_is_set_aside_rewritten_and_reported(tmp_path: Path) -> None:
    root = tmp_path / "s"
    ids = await _filled(root)
    text = (root / "pforge.json").read_text()
    (root / "pforge.json").write_text(text.replace("turns.db", "turns.dc"))
    async with open_store(root) as store:
        assert (await store.turns.get_turn(ids["turn"])).payload == b"hello"
        problems = (await store.check()).problems
    assert any("pforge.json is damaged" in p for p in problems), problems
    assert json.loads((root / "pforge.json").read_text())["parts"][1] == "turns.db"
    assert [p.name.split(".")[0] for p in (root / "quarantine").iterdir()] == ["pforge"]
    # A damaged manifest does not lower the guard: every part must be there.
    (root / "pforge.json").write_text("{not json")
    (root / "memory.db").write_bytes(b"")
    with pytest.raises(IntegrityError, match=r"memory\.db"):
        await connect(root)


async def test_a_manifest_from_a_newer_version_is_refused_untouched(tmp_path: Path) -> None:
    from pforge_async.manifest import Manifest

    root = tmp_path / "s"
    await _filled(root)
    parts = ["cas", "turns.db", "memory.db", "nonces.db", "budget.db"]
    newer = {"format": "pforge_async store", "version": 99, "parts": parts}
    newer["checksum"] = Manifest.digest("pforge_async store", 99, parts)
    (root / "pforge.json").write_text(json.dumps(newer))
    before = _tree(root)
    with pytest.raises(StorageError, match="newer"):
        await connect(root)
    assert _tree(root) == before


async def test_an_interrupted_creation_is_finished_by_the_next_open(tmp_path: Path) -> None:
    from pforge_async.manifest import write_manifest

    root = tmp_path / "s"
    root.mkdir()
    write_manifest(root, [])  # what creation writes first, before any part exists
    (root / ".pforge.json.tmp1.dead").write_bytes(b"{")  # and a temp file a crash left
    async with open_store(root, create=False) as store:
        await store.turns.create_context()
    assert len(json.loads((root / "pforge.json").read_text())["parts"]) == 5


def _old_store(tmp_path: Path) -> Path:
    root = tmp_path / "old"
    root.mkdir(mode=0o700)
    with tarfile.open(OLD_STORE) as tar:
        safe: dict[str, Any] = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(root, **safe)
    assert not (root / "pforge.json").exists()
    return root


async def test_a_store_written_before_manifests_is_recognised_and_gets_one(tmp_path: Path) -> None:
    root = _old_store(tmp_path)
    before = _tree(root)
    try:
        async with open_store(root, readonly=True) as store:
            assert (await store.turns.get_turn(1)).payload == b"hello from the old release"
    except StorageError as exc:  # an older schema may need one writable open to be upgraded first
        assert "writable" in str(exc)
    assert _tree(root) == before  # read-only writes nothing, not even the manifest
    async with open_store(root, create=False) as store:
        turns = await store.turns.list_turns(1)
        assert [t.payload for t in turns] == [b"hello from the old release", b"hi"]
        assert [t.payload for t in await store.turns.list_turns(2)] == [b"hello from the old release", b"a fork"]
        assert (await store.memory.stats("s"))[0].action == "a"
        assert (await store.budget.totals("v")).tokens == 30
        assert await store.cas.read_blob(await _old_ref_blob(store)) == b"an old blob"
        assert (await store.check()).ok
    assert len(json.loads((root / "pforge.json").read_text())["parts"]) == 5


async def _old_ref_blob(store: Store) -> str:
    commit = await store.cas.get_ref("refs/heads/main")
    assert commit is not None
    tree = (await store.cas.read_commit(commit)).tree
    (entry,) = await store.cas.read_tree(tree)
    return entry.oid


async def test_a_store_written_before_manifests_with_an_empty_database_is_refused(tmp_path: Path) -> None:
    root = _old_store(tmp_path)
    (root / "turns.db").write_bytes(b"")
    with pytest.raises(IntegrityError, match=r"turns\.db"):
        await connect(root)
    assert not (root / "pforge.json").exists()
    assert (root / "turns.db").stat().st_size == 0


# -- calls after close ----------------------------------------------------------------------------------

#: the facades' reads: named so, or one of these (restore writes outside the store, never in it).
_READ_PREFIXES = ("get_", "find_", "list_", "iter_", "read_")
_READS = {"fsck", "has", "has_many", "restore", "check", "stats", "best_action", "totals"}


def _is_read(method: str) -> bool:
    return method in _READS or method.startswith(_READ_PREFIXES)


def _arguments(ids: dict[str, Any], scratch: Path) -> dict[str, Any]:
    """A sound value for every parameter name the facades' methods take."""
    return {
        "oid": ids["blob"],
        "tree": ids["tree"],
        "new": ids["blob"],
        "directory": scratch,
        "data": b"new bytes",
        "entries": [("f.txt", "100644", ids["blob"])],
        "context_id": ids["context"],
        "type_id": "user",
        "payload": b"new payload",
        "turns": [NewTurn(ids["context"], "user", b"batched")],
        "turn_id": ids["turn"],
        "from_turn_id": ids["turn"],
        "fs_root": ids["tree"],
        "roots": [ids["tree"]],
        "oids": [ids["blob"]],
        "key": "some-key",
        "idempotency_key": "some-key",
        "bundle_id": "bundle",
        "bundle_json": b"{}",
        "metadata": {"k": "v"},
        "state": "s",
        "action": "a",
        "next_state": "t",
        "reward": 0.5,
        "success": True,
        "nonce": ids["nonce"],
        "subject": "x",
        "ttl_s": 60,
        "reservation": ids["reservation"],
        "actual": Usage(1, 1, 0),
        "vendor": "v",
        "model": "m",
        "input_tokens": 1,
        "output_tokens": 1,
        "cost": 0,
    }


_NAMES = {("cas", "name"): "refs/heads/main"}
_BY_TYPE: dict[str, Any] = {"int": 1, "str": "some-text", "bytes": b"some bytes", "bool": True, "float": 1.0}
#: (method, parameter) -> id key, where the shared value would be the wrong kind of object.
_OVERRIDES = {("read_commit", "oid"): "commit", ("read_tree", "oid"): "tree"}


Call = Callable[[], Awaitable[Any]]


def facade_calls(store: Store, ids: dict[str, Any], scratch: Path) -> Iterator[tuple[str, Call]]:
    """Every public method of every part of the store, each with sound arguments."""
    values = _arguments(ids, scratch)
    for part in ("cas", "turns", "memory", "nonces", "budget"):
        facade = getattr(store, part)
        for name, method in inspect.getmembers(facade, inspect.ismethod):
            if name.startswith("_"):
                continue
            kwargs: dict[str, Any] = {}
            for param in inspect.signature(method).parameters.values():
                if param.default is not param.empty or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                    continue
                if (name, param.name) in _OVERRIDES:
                    kwargs[param.name] = ids[_OVERRIDES[name, param.name]]
                elif (part, param.name) in _NAMES:
                    kwargs[param.name] = _NAMES[part, param.name]
                elif param.name == "name":
                    kwargs[param.name] = "app/session"
                elif param.name in values:
                    kwargs[param.name] = values[param.name]
                else:  # a parameter added since: a sound value of its type
                    annotation = str(param.annotation)
                    assert annotation in _BY_TYPE, f"{part}.{name}: no test value for {param.name}: {annotation}"
                    kwargs[param.name] = _BY_TYPE[annotation]
            yield f"{part}.{name}", _caller(method, kwargs)


def _caller(method: Callable[..., Any], kwargs: dict[str, Any]) -> Call:
    async def call() -> Any:
        result = method(**kwargs)
        if inspect.isawaitable(result):
            return await result
        if hasattr(result, "__anext__"):
            return [item async for item in result]
        return result

    return call


async def fill_for_calls(store: Store, work: Path) -> dict[str, Any]:
    ctx = await store.turns.create_context()
    turn = await store.turns.append_turn(ctx.context_id, "user", b"hello")
    blob = await store.cas.write_blob(b"x")
    tree = await store.cas.write_tree([("a.txt", "100644", blob)])
    commit = await store.cas.write_commit(tree, message="m")
    await store.cas.update_ref("refs/heads/main", commit)
    await store.budget.set_budget("v", tokens=10_000)
    reservation = await store.budget.reserve("v", tokens=10)
    nonce = await store.nonces.issue("x", 60)
    await store.memory.record_transition("s", "a", "t", 0.5, True)
    work.mkdir(exist_ok=True)
    (work / "f.txt").write_text("workspace")
    return {
        "context": ctx.context_id,
        "turn": turn.turn_id,
        "blob": blob,
        "tree": tree,
        "commit": commit,
        "reservation": reservation.reservation_id,
        "nonce": nonce,
    }


async def test_every_call_after_close_raises_actor_closed(tmp_path: Path) -> None:
    store = await connect(tmp_path / "s")  # watching workspaces: snapshot must not touch a closed watch
    ids = await fill_for_calls(store, tmp_path / "work")
    await store.cas.snapshot(tmp_path / "work")
    await store.aclose()
    calls = list(facade_calls(store, ids, tmp_path / "out"))
    assert len(calls) >= 40
    wrong = []
    for name, call in calls:
        if name == "cas.snapshot":
            call = _caller(store.cas.snapshot, {"directory": tmp_path / "work"})
        try:
            await call()
        except ActorClosed:
            continue
        except Exception as exc:
            wrong.append(f"{name}: {exc!r}")
        else:
            wrong.append(f"{name}: returned")
    assert wrong == []
    assert not (tmp_path / "out").exists()


# -- read-only ----------------------------------------------------------------------------------------


async def check_readonly(root: Path, ids: dict[str, Any], scratch: Path) -> list[str]:
    """Open ``root`` read-only: every read answers, every write raises InvalidInput. What is wrong."""
    wrong: list[str] = []
    async with connect(root, readonly=True) as store:
        assert store.readonly
        for name, call in facade_calls(store, ids, scratch):
            method = name.split(".")[1]
            if method == "restore":
                shutil.rmtree(scratch, ignore_errors=True)
            if method == "snapshot":
                call = _caller(store.cas.snapshot, {"directory": ROOT / "pforge_async" / "sqlite"})
            try:
                await call()
            except InvalidInput as exc:
                if _is_read(method):
                    wrong.append(f"read {name} refused: {exc!r}")
            except Exception as exc:
                wrong.append(f"{name}: {exc!r}")
            else:
                if not _is_read(method):
                    wrong.append(f"write {name} was accepted")
        assert (await store.turns.get_turn(ids["turn"])).payload == b"hello"
        report = await store.check()
        if not report.ok:
            wrong.append(f"check: {report.problems}")
    return wrong


async def test_readonly_reads_everything_and_refuses_every_write(tmp_path: Path) -> None:
    root = tmp_path / "s"
    async with open_store(root) as store:
        ids = await fill_for_calls(store, tmp_path / "work")
    before = _tree(root)
    assert await check_readonly(root, ids, tmp_path / "out") == []
    assert _tree(root) == before


_CHILD = """
import asyncio, json, os, pwd, sys
from pathlib import Path
import anyio, pytest  # everything imported while still privileged: the interpreter lives under /root
import tests.test_store_open as t
import pforge_async.cas.watch, pforge_async.cli, sqlite3, aiosqlite, shutil
anyio.run(asyncio.sleep, 0)
root, scratch, ids = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
if os.getuid() == 0:
    nobody = pwd.getpwnam("nobody")
    os.setgroups([])
    os.setgid(nobody.pw_gid)
    os.setuid(nobody.pw_uid)
assert not os.access(root, os.W_OK), "the test user can write the store root"
try:
    open(root / "probe", "w")
except PermissionError:
    pass
else:
    raise AssertionError("created a file in the store root")
print(json.dumps(anyio.run(t.check_readonly, root, ids, scratch)))
"""


async def test_readonly_works_for_a_user_who_cannot_write_the_root(tmp_path: Path) -> None:
    base = Path(tempfile.mkdtemp(prefix="pforge-ro-"))
    try:
        base.chmod(0o755)
        root = base / "s"
        async with open_store(root) as store:
            ids = await fill_for_calls(store, base / "work")
        for path in [root, *root.rglob("*")]:
            path.chmod(0o555 if path.is_dir() else 0o444)
        scratch = base / "scratch"
        scratch.mkdir(mode=0o777)
        scratch.chmod(0o777)
        before = _tree(root)
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        child = subprocess.run(
            [sys.executable, "-c", _CHILD, str(root), str(scratch / "out"), json.dumps(ids)],
            env=env,
            cwd=str(base),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert child.returncode == 0, child.stderr
        assert json.loads(child.stdout.strip().splitlines()[-1]) == []
        assert _tree(root) == before
    finally:
        for path in [base, *base.rglob("*")]:
            if path.is_dir() and not path.is_symlink():
                path.chmod(0o755)
        shutil.rmtree(base)


# -- several processes creating one store at once -----------------------------------------------------

_RACER = r"""
import sys, time, traceback, anyio
from pathlib import Path
from pforge_async import connect

async def main(base, rounds, t0, me):
    failures = []
    for r in range(rounds):
        time.sleep(max(0.0, t0 + r * 0.3 - time.time()))  # every process starts round r at once
        try:
            store = await connect(Path(base) / f"r{r}", watch_workspaces=False)
            try:
                ctx = await store.turns.open_context("shared")
                await store.turns.append_turn(ctx.context_id, "t", b"%d" % me)
            finally:
                await store.aclose()
        except Exception:
            failures.append(f"round {r}: {traceback.format_exc(limit=2)}")
    print(repr(failures))

anyio.run(main, sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]))
"""


async def test_a_manifest_renamed_in_between_the_look_and_the_listing_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race two creators run: this opener finds no manifest, the other creator renames its
    manifest in, and this opener's listing of the root shows it. The opener looks again and opens
    the store, instead of calling the directory foreign."""
    import pforge_async.manifest as manifest

    root = tmp_path / "s"
    root.mkdir()
    real = os.listdir

    def listdir_after_another_creator(path: Any) -> list[str]:
        if Path(path) == root and not (root / "pforge.json").exists():
            manifest.write_manifest(root, [])  # the other creator's first step lands just now
        return real(path)

    monkeypatch.setattr(os, "listdir", listdir_after_another_creator)  # the module manifest lists with
    async with open_store(root, watch_workspaces=False) as store:
        await store.turns.create_context(name="ok")
    monkeypatch.undo()
    assert len(json.loads((root / "pforge.json").read_text())["parts"]) == 5


async def test_processes_creating_one_fresh_store_at_once_all_open_it(tmp_path: Path) -> None:
    """Each round, every process connects to the same new root at the same instant: all of them
    open it (none sees the other's half-made root as foreign), and the one store holds every
    process's turn in one context."""
    import time

    from tests._procs import spawn

    processes, rounds = 6, 20
    t0 = time.time() + 3.0  # after every child has imported pforge_async
    children = [spawn(_RACER, tmp_path, rounds, t0, me) for me in range(processes)]
    outputs = [child.communicate(timeout=120) for child in children]
    for child, (out, err) in zip(children, outputs, strict=True):
        assert child.returncode == 0, err
        assert out.strip() == "[]", out
    for r in range(rounds):
        async with open_store(tmp_path / f"r{r}", create=False, watch_workspaces=False) as store:
            ctx = await store.turns.find_context("shared")
            assert ctx is not None
            got = sorted([t.payload async for t in store.turns.iter_turns(ctx.context_id)])
            assert got == sorted(b"%d" % me for me in range(processes))
            assert (await store.check()).problems == []


# -- a PostgreSQL DSN goes to the PostgreSQL backend ---------------------------------------------------


async def test_a_postgres_dsn_is_handed_to_connect_pg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    calls: list[tuple[str, dict[str, Any]]] = []
    sentinel = object()

    async def connect_pg(dsn: str, **options: Any) -> object:
        calls.append((dsn, options))
        return sentinel

    fake = types.ModuleType("pforge_async.postgres.store")
    fake.connect_pg = connect_pg  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pforge_async.postgres.store", fake)
    monkeypatch.chdir(tmp_path)
    for dsn in ("postgresql://u@h/db", "postgres://u@h/db"):
        assert await connect(dsn, readonly=True) is sentinel
    assert [dsn for dsn, _ in calls] == ["postgresql://u@h/db", "postgres://u@h/db"]
    assert calls[0][1]["readonly"] is True and calls[0][1]["durability"] == "full"
    assert list(tmp_path.iterdir()) == []  # no directory named after the DSN


async def test_a_postgres_dsn_without_the_backend_says_which_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pforge_async.postgres.store", None)  # import fails, as without it
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InvalidInput, match=r"postgres.*extra|extra.*postgres"):
        await connect("postgresql://u@h/db")
    assert list(tmp_path.iterdir()) == []
