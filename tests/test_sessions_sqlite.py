"""Sessions on the SQLite store (``store.turns``), beyond the conformance suite: the upgrade of a store
the previous release wrote, names and compare-and-set heads raced by several processes, one group
commit holding a failing batch, SIGKILL in the middle of batches and keyed forks, and the indexes that
keep ``list_contexts`` at O(limit + log n)."""

from __future__ import annotations

import io
import json
import random
import selectors
import signal
import sqlite3
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from pforge_async import (
    ContextNotFound,
    HeadConflict,
    IntegrityError,
    NewTurn,
    StorageError,
    TurnRecord,
    open_store,
)
from pforge_async.sqlite import actor as sqlite_actor
from pforge_async.turnstore import sqlite as turnstore_sqlite
from pforge_async.turnstore.sqlite import SqliteTurnStore, name_successor

from ._procs import ROOT, run_all, spawn, wait_for_line, whole_lines

pytestmark = pytest.mark.anyio

#: the release before sessions: its turns.db is schema version 1
OLD_COMMIT = "9757afc"
#: the last commit whose turns.db is schema version 5 (before the "updated" index took 64 ms buckets)
V5_COMMIT = "5b0e515"
#: the schema version this tree writes
SCHEMA_VERSION = 6


def opened(root: Path) -> Any:
    return open_store(root, durability="normal", watch_workspaces=False)


def raw(root: Path) -> sqlite3.Connection:
    """turns.db read directly, beside (or after) the store."""
    conn = sqlite3.connect(f"file:{root / 'turns.db'}?mode=ro", uri=True)
    conn.execute("PRAGMA query_only = ON")
    return conn


def go(procs: list[subprocess.Popen[str]]) -> None:
    """Wait until every child is ready, then release them together."""
    for proc in procs:
        wait_for_line(proc, "ready", timeout=120)
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()


def spawn_ready(code: str, *args: object) -> subprocess.Popen[str]:
    return spawn(code, *args, stdin=subprocess.PIPE)


# -- the upgrade from version 1 ------------------------------------------------------------------------


def release(commit: str, dest: Path) -> Path:
    """The package as ``commit`` had it, from this repository's history, extracted under ``dest``."""
    try:
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", "--format=tar", commit, "pforge_async"],
            capture_output=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"needs git and this repository's history (commit {commit}): {exc}")
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        if hasattr(tarfile, "data_filter"):  # Python 3.10.12+, 3.11.4+
            tar.extractall(dest, filter="data")
        else:
            tar.extractall(dest)  # our own repository's archive
    return dest


@pytest.fixture(scope="module")
def old_release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package as commit 9757afc had it (its turns.db is version 1)."""
    return release(OLD_COMMIT, tmp_path_factory.mktemp("old-release"))


@pytest.fixture(scope="module")
def v5_release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package as commit 5b0e515 had it (its turns.db is version 5)."""
    return release(V5_COMMIT, tmp_path_factory.mktemp("v5-release"))


OLD_WRITER = """
import json, sys, anyio, msgspec, pforge_async
from pforge_async import open_store
assert pforge_async.__file__.startswith(sys.argv[2]), pforge_async.__file__

async def main():
    async with open_store(sys.argv[1], watch_workspaces=False) as store:
        t = store.turns
        main = await t.create_context()
        m = [await t.append_turn(main.context_id, "user", b"m%d" % i, idempotency_key=f"m{i}") for i in range(5)]
        fork = await t.fork_context(m[2].turn_id)
        await t.append_turn(fork.context_id, "assistant", b"in the fork", type_version=2, idempotency_key="f0")
        based = await t.create_context(m[4].turn_id)  # started at a turn, nothing appended yet
        empty = await t.create_context()
        await t.append_turn(main.context_id, "user", b"a branch", parent_turn_id=m[1].turn_id)
        blob = await store.cas.write_blob(b"workspace")
        tree = await store.cas.write_tree([("a.txt", "100644", blob)])
        await t.attach_fs(m[0].turn_id, tree)
        await t.publish_registry_bundle("bundle", b'{"types": []}')
        contexts = {}
        for c in (main, fork, based, empty):
            head = await t.get_head(c.context_id)
            contexts[c.context_id] = [head.head_turn_id, head.head_depth]
        turns = [await t.get_turn(i) for i in range(1, m[-1].turn_id + 3)]
        names = {"main": main.context_id, "fork": fork.context_id, "based": based.context_id,
                 "empty": empty.context_id, "m": [r.turn_id for r in m], "tree": tree}
        print(msgspec.json.encode({"contexts": contexts, "turns": turns, "names": names}).decode(), flush=True)

anyio.run(main)
"""

NEW_OPENER = """
import sys, anyio
from pforge_async import open_store
async def main():
    async with open_store(sys.argv[1], durability="normal", watch_workspaces=False) as store:
        print("ready", flush=True)
        sys.stdin.readline()
        print((await store.turns.open_context("upgraded")).context_id, flush=True)
anyio.run(main)
"""


class Written(msgspec.Struct):
    contexts: dict[int, list[int]]
    turns: list[TurnRecord]
    names: dict[str, Any]


def write_version_1(old: Path, root: Path) -> Written:
    proc = subprocess.run(
        [sys.executable, "-c", OLD_WRITER, str(root), str(old)],
        env={"PYTHONPATH": str(old), "PATH": "/usr/bin:/bin"},
        cwd=old,  # not this checkout: ``python -c`` looks in the working directory first
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    with raw(root) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    return msgspec.json.decode(proc.stdout, type=Written)


def schema(conn: sqlite3.Connection) -> dict[str, Any]:
    """Tables' columns and indexes as SQLite reports them (not the text of CREATE TABLE, which an
    ALTER TABLE rewrites)."""
    out: dict[str, Any] = {}
    tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
    for table in tables:
        out[table] = [tuple(r) for r in conn.execute(f"PRAGMA table_xinfo({table})")]
        for index in conn.execute(f"PRAGMA index_list({table})").fetchall():
            out[f"{table}.{index[1]}"] = (
                tuple(index[2:]),
                [tuple(r) for r in conn.execute(f"PRAGMA index_xinfo({index[1]})")],
            )
    for name, sql in conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"):
        out[f"sql {name}"] = " ".join(sql.split())
    return out


async def test_a_version_1_store_upgrades_in_place(tmp_path: Path, old_release: Path) -> None:
    root = tmp_path / "old" / ".pforge"
    old = write_version_1(old_release, root)
    ids = old.names
    main, fork, based, empty = ids["main"], ids["fork"], ids["based"], ids["empty"]
    m = ids["m"]

    # Three processes of the new code open it at once: one migrates (under the writers' lock), the
    # others find it done, and all three agree on a name created meanwhile.
    procs = [spawn_ready(NEW_OPENER, root) for _ in range(3)]
    go(procs)
    assert len({out.strip() for out in run_all(procs)}) == 1

    with raw(root) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        migrated = schema(conn)
    async with opened(tmp_path / "fresh" / ".pforge"):
        pass
    with raw(tmp_path / "fresh" / ".pforge") as conn:
        assert schema(conn) == migrated  # a migrated file is a fresh one

    async with opened(root) as store:
        turns: SqliteTurnStore = store.turns
        assert await turns.check() == []
        assert (await store.check()).problems == []
        # Everything the old release wrote reads back as it was.
        for record in old.turns:
            assert await turns.get_turn(record.turn_id) == record
        for context_id, (head, depth) in old.contexts.items():
            info = await turns.get_context(context_id)
            assert (info.head_turn_id, info.head_depth) == (head, depth)
            assert info.name is None and info.metadata == {}
            chain = [t async for t in turns.iter_turns(context_id)]
            assert chain == await turns.list_turns(context_id, limit=1000)
        # Lineage inferred from how version 1 started contexts; updated_at_ms from the last append.
        by_id = {r.turn_id: r for r in old.turns}
        expected = {main: (0, 0), fork: (m[2], main), based: (m[4], main), empty: (0, 0)}
        for context_id, (base, parent) in expected.items():
            info = await turns.get_context(context_id)
            assert (info.base_turn_id, info.parent_context_id) == (base, parent), context_id
            last = [r.created_at_ms for r in old.turns if r.context_id == context_id]
            assert info.updated_at_ms == max([info.created_at_ms, *last])
        assert (await turns.get_turn(m[0])).fs_root == ids["tree"]
        assert await turns.get_registry_bundle("bundle") == b'{"types": []}'
        # Old idempotency keys still hold: a retry returns the stored turn.
        assert await turns.append_turn(main, "user", b"m3", idempotency_key="m3") == by_id[m[3]]
        assert await turns.get_turn_by_key(fork, "f0") == by_id[old.contexts[fork][0]]

        # And every new feature works on it.
        upgraded = await turns.find_context("upgraded")
        assert upgraded is not None and upgraded.context_id > max(old.contexts)
        named = await turns.open_context("app/u1/s1", metadata={"user": "u1"})
        again = await turns.fork_context(m[4], idempotency_key="k", name="app/u1/s2")
        assert await turns.fork_context(m[4], idempotency_key="k", name="app/u1/s2") == again
        assert again.parent_context_id == main
        # The appends below must be later than the fork above in updated_at_ms, whose unit is a
        # millisecond: within one, the order falls to context ids and the newer fork would lead.
        await anyio.sleep(0.005)
        before = await turns.get_head(main)
        turn = await turns.append_turn(main, "user", b"new", expected_head=before.head_turn_id)
        with pytest.raises(HeadConflict):
            await turns.append_turn(main, "user", b"stale", expected_head=before.head_turn_id)
        await turns.set_head(main, m[4], expected_head=turn.turn_id)
        await turns.append_turns([NewTurn(empty, "t", b"1"), NewTurn(named.context_id, "t", b"2")])
        page = await turns.list_contexts(order="updated", limit=100)
        assert len(page.contexts) == 7 and page.cursor is None
        assert {c.context_id for c in page.contexts[:3]} == {empty, named.context_id, main}
        assert [c.name for c in (await turns.list_contexts(prefix="app/u1/", order="name")).contexts] == [
            "app/u1/s1",
            "app/u1/s2",
        ]
        children = (await turns.list_contexts(parent_context_id=main)).contexts
        assert {c.context_id for c in children} == {again.context_id, based, fork}
        assert [c.updated_at_ms for c in children] == sorted((c.updated_at_ms for c in children), reverse=True)
        assert await turns.check() == []


async def test_a_failed_migration_leaves_version_1_untouched(
    tmp_path: Path, old_release: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / ".pforge"
    write_version_1(old_release, root)
    real = sqlite_actor.load_script

    def failing(name: str) -> str:
        text = real(name)
        # The whole upgrade runs, then one statement fails at its very end.
        return text + "\nSELECT no_such_function();\n" if name == "turns_v2.sql" else text

    monkeypatch.setattr(sqlite_actor, "load_script", failing)
    with pytest.raises(StorageError, match="no_such_function"):
        async with opened(root):
            pass
    with raw(root) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
        assert "name" not in [r[1] for r in conn.execute("PRAGMA table_info(contexts)")]
        assert conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'context_keys'").fetchone()[0] == 0
    monkeypatch.setattr(sqlite_actor, "load_script", real)
    async with opened(root) as store:
        assert await store.turns.check() == []
        assert (await store.turns.open_context("after")).name == "after"
    with raw(root) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


# -- the upgrade from version 5 (the "updated" order's 64 ms buckets) ----------------------------------

V5_WRITER = """
import json, sys, time, anyio, pforge_async
from pforge_async import NewTurn, open_store
assert pforge_async.__file__.startswith(sys.argv[2]), pforge_async.__file__

async def main():
    async with open_store(sys.argv[1], durability="normal", watch_workspaces=False) as store:
        t = store.turns
        ids = []
        for i in range(12):
            ctx = await t.create_context(name=None if i % 3 == 0 else f"s/{i:02d}", idempotency_key=f"k{i}")
            ids.append(ctx.context_id)
        for round_ in range(3):
            # One batch across several contexts: they share an updated_at_ms (ties go by id).
            await t.append_turns([NewTurn(c, "t", b"%d" % round_) for c in ids[round_ :: 2]])
            for c in ids[round_ :: 3]:
                await t.append_turn(c, "t", b"one")
            time.sleep(0.07)  # the next round in a later 64 ms bucket
        await t.delete_context(ids[4])
        page = await t.list_contexts(order="updated", limit=5)
        listed = [c.context_id for c in (await t.list_contexts(order="updated", limit=100)).contexts]
        print(json.dumps({"cursor": page.cursor, "listed": listed}), flush=True)

anyio.run(main)
"""


async def test_a_version_5_store_upgrades_in_place(tmp_path: Path, v5_release: Path) -> None:
    """A store the previous schema wrote gets its buckets at the first writable open: the same
    contexts in the same "updated" order, page by page, and a cursor the old code handed out still
    continues where it was."""
    root = tmp_path / "v5" / ".pforge"
    proc = subprocess.run(
        [sys.executable, "-c", V5_WRITER, str(root), str(v5_release)],
        env={"PYTHONPATH": str(v5_release), "PATH": "/usr/bin:/bin"},
        cwd=v5_release,  # not this checkout: ``python -c`` looks in the working directory first
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    old = json.loads(proc.stdout)
    with raw(root) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 5
        assert "updated_bucket" not in [r[1] for r in conn.execute("PRAGMA table_info(contexts)")]

    async with opened(root) as store:
        turns: SqliteTurnStore = store.turns
        assert await turns.check() == []
        listed = [c.context_id for c in (await turns.list_contexts(order="updated", limit=100)).contexts]
        assert listed == old["listed"]
        paged = []
        cursor = None
        while True:
            page = await turns.list_contexts(order="updated", limit=2, after=cursor)
            paged += [c.context_id for c in page.contexts]
            if page.cursor is None:
                break
            cursor = page.cursor
        assert paged == listed
        rest = await turns.list_contexts(order="updated", limit=100, after=old["cursor"])
        assert [c.context_id for c in rest.contexts] == listed[5:]
        # An old creation key still answers with its context (the writer's second: id 2).
        assert (await turns.create_context(name="s/01", idempotency_key="k1")).context_id == 2
        # New writes keep the bucket in step.
        moved = await turns.append_turn(listed[-1], "t", b"new")
        assert [c.context_id for c in (await turns.list_contexts(order="updated", limit=1)).contexts] == [
            moved.context_id
        ]
        assert await turns.check() == []
    with raw(root) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert (
            conn.execute("SELECT count(*) FROM contexts WHERE updated_bucket != updated_at_ms >> 6").fetchone()[0] == 0
        )
        migrated = schema(conn)
    async with opened(tmp_path / "fresh" / ".pforge"):
        pass
    with raw(tmp_path / "fresh" / ".pforge") as conn:
        assert schema(conn) == migrated  # a migrated file is a fresh one


# -- list_contexts: one index per order ----------------------------------------------------------------


def _plans(conn: sqlite3.Connection, queries: list[tuple[str, Any]]) -> list[list[str]]:
    return [[row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql, params)] for sql, params in queries]


async def test_list_contexts_walks_an_index_for_each_order(tmp_path: Path) -> None:
    """Unfiltered and by name prefix, a page is a range of one index (or of the table, by id) read in
    its order and stopped at the limit, never sorted whole: O(limit + log n). The "updated" order walks
    its 64 ms buckets newest first and sorts only within each (SQLite's "right part" sort, which stops
    with the limit). By a prefix in a time order, the prefix's range of the name index; by a parent,
    the parent index."""
    root = tmp_path / ".pforge"
    async with opened(root) as store:
        turns: SqliteTurnStore = store.turns
        parent = await turns.open_context("p")
        for i in range(30):
            await turns.create_context(name=f"n/{i:02d}", parent_context_id=parent.context_id if i % 2 else None)
        seen: list[tuple[str, Any]] = []
        fetchall = turns._actor.fetchall

        async def capture(sql: str, params: Any = ()) -> list[Any]:
            seen.append((sql, params))
            return await fetchall(sql, params)

        turns._actor.fetchall = capture  # type: ignore[method-assign]
        first = await turns.list_contexts(order="updated", limit=5)
        await turns.list_contexts(order="updated", limit=5, after=first.cursor)
        updated = list(seen)
        seen.clear()
        for order in ("created", "name"):
            first = await turns.list_contexts(order=order, limit=5)
            await turns.list_contexts(order=order, limit=5, after=first.cursor)
        first = await turns.list_contexts(order="name", prefix="n/", limit=5)
        await turns.list_contexts(order="name", prefix="n/", after=first.cursor, limit=5)
        ordered = list(seen)
        seen.clear()
        await turns.list_contexts(prefix="n/1", order="updated")
        first = await turns.list_contexts(parent_context_id=parent.context_id, order="created", limit=5)
        await turns.list_contexts(parent_context_id=parent.context_id, order="created", after=first.cursor, limit=5)
        filtered = list(seen)
        turns._actor.fetchall = fetchall  # type: ignore[method-assign]
    with raw(root) as conn:
        for plan in _plans(conn, ordered):
            text = " | ".join(plan)
            # Read in the index's (or the table's) own order and stopped at the limit: never sorted.
            assert "TEMP B-TREE" not in text, text
        first_plan, after_plan = (" | ".join(p) for p in _plans(conn, updated))
        assert "SCAN c USING INDEX contexts_updated" in first_plan
        assert "SEARCH c USING INDEX contexts_updated (updated_bucket<?)" in after_plan
        for text in (first_plan, after_plan):
            # Sorted within a bucket only: a sort of the whole table would read "FOR ORDER BY".
            assert "USE TEMP B-TREE FOR RIGHT PART OF ORDER BY" in text, text
            assert "TEMP B-TREE FOR ORDER BY" not in text, text
        prefix_plan, parent_plan, parent_after = (" | ".join(p) for p in _plans(conn, filtered))
        assert "SEARCH c USING INDEX contexts_name (name>? AND name<?)" in prefix_plan
        assert "SEARCH c USING INDEX contexts_parent (parent_context_id=?)" in parent_plan
        assert "SEARCH c USING INDEX contexts_parent (parent_context_id=? AND rowid<?)" in parent_after
        assert "TEMP B-TREE" not in parent_plan + parent_after


class Clock:
    """The turn store's clock, set by the test: ``updated_at_ms`` values on both sides of 64 ms
    bucket edges, and ties, without waiting."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, start: int) -> None:
        self.now = start
        monkeypatch.setattr(turnstore_sqlite, "now_ms", lambda: self.now)


def expected_updated(contexts: list[Any]) -> list[int]:
    return [c.context_id for c in sorted(contexts, key=lambda c: (c.updated_at_ms, c.context_id), reverse=True)]


async def pages(turns: SqliteTurnStore, limit: int, **kwargs: Any) -> list[int]:
    ids: list[int] = []
    cursor = None
    while True:
        page = await turns.list_contexts(order="updated", limit=limit, after=cursor, **kwargs)
        ids += [c.context_id for c in page.contexts]
        assert len(page.contexts) <= limit
        if page.cursor is None:
            return ids
        cursor = page.cursor


async def test_the_updated_order_across_buckets_and_ties(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Newest first, ties by the higher id, whatever bucket each context's ``updated_at_ms`` fell in:
    every page size, with a prefix and with a parent, gives the one order; a cursor is a position,
    including one in the middle of a bucket and one inside a run of ties."""
    clock = Clock(monkeypatch, 1_700_000_000_000 // 64 * 64 + 60)  # 4 ms before a bucket's edge
    async with opened(tmp_path / ".pforge") as store:
        turns: SqliteTurnStore = store.turns
        root = await turns.open_context("g/root")
        made = [
            await turns.create_context(name=f"g/{i:02d}", parent_context_id=root.context_id if i % 2 else None)
            for i in range(24)
        ]
        ids = [c.context_id for c in made]
        rng = random.Random(7)
        for step in range(40):
            clock.now += rng.choice([0, 0, 1, 3, 63, 64, 65, 130])
            chosen = rng.sample(ids, rng.randint(1, 6))
            if step % 3 == 0:  # one batch: the contexts it changes tie at one updated_at_ms
                await turns.append_turns([NewTurn(c, "t", b"%d" % step) for c in chosen])
            elif step % 3 == 1:
                for c in chosen:
                    await turns.append_turn(c, "t", b"%d" % step)
            else:
                await turns.set_context_metadata(chosen[0], {"step": step})
        await turns.delete_context(ids[5])
        live = [await turns.get_context(c) for c in [root.context_id, *ids] if c != ids[5]]
        updated = [c.updated_at_ms for c in live]
        assert len(set(updated)) < len(updated), "the run made no ties"
        assert len({u >> 6 for u in updated}) > 3, "the run stayed in too few buckets"
        assert any((a >> 6) == (b >> 6) and a != b for a in updated for b in updated), (
            "no bucket held two different times"
        )
        everything = expected_updated(live)
        for limit in (1, 2, 3, 7, 100):
            assert await pages(turns, limit) == everything, limit
        named = [c for c in live if c.name is not None and c.name.startswith("g/1")]
        assert await pages(turns, 2, prefix="g/1") == expected_updated(named)
        children = [c for c in live if c.parent_context_id == root.context_id]
        assert await pages(turns, 3, parent_context_id=root.context_id) == expected_updated(children)
        # A cursor at each context: the rest of the order after it.
        for at, context in enumerate(sorted(live, key=lambda c: (c.updated_at_ms, c.context_id), reverse=True)):
            cursor = f"u.{context.updated_at_ms}.{context.context_id}"
            rest = await turns.list_contexts(order="updated", after=cursor, limit=100)
            assert [c.context_id for c in rest.contexts] == everything[at + 1 :]
        assert await turns.check() == []
    with raw(tmp_path / ".pforge") as conn:
        assert (
            conn.execute("SELECT count(*) FROM contexts WHERE updated_bucket != updated_at_ms >> 6").fetchone()[0] == 0
        )


async def test_a_change_moves_the_updated_index_only_when_its_bucket_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An append (a head move, a metadata change) within the context's 64 ms bucket writes its row
    but not ``updated_bucket``, so the "updated" index entry stays where it is; the first change in a
    later bucket moves it. Also after a reopen, where the bucket is read back from the file."""
    clock = Clock(monkeypatch, 1_700_000_000_000 // 64 * 64)
    root = tmp_path / ".pforge"
    statements: list[str] = []

    def bucket_writes() -> int:
        found = sum("updated_bucket" in sql for sql in statements if sql.startswith("UPDATE contexts"))
        statements.clear()
        return found

    for reopen in range(2):
        async with opened(root) as store:
            turns: SqliteTurnStore = store.turns
            ctx = await turns.open_context("busy")
            assert turns._actor._conn is not None
            turns._actor._conn.set_trace_callback(statements.append)
            start = clock.now
            for i in range(10):
                clock.now = start + i * 6  # ten changes within one bucket
                turn = await turns.append_turn(ctx.context_id, "t", b"%d" % i)
            await turns.set_head(ctx.context_id, turn.parent_turn_id)
            await turns.set_context_metadata(ctx.context_id, {"n": reopen})
            # 10 appends and a head move write head and time; the metadata change its own row too
            assert sum(sql.startswith("UPDATE contexts") for sql in statements) == 13
            assert bucket_writes() == 0
            clock.now = start + 64  # the next pass, reopened, starts in this bucket
            await turns.append_turn(ctx.context_id, "t", b"next bucket")
            assert bucket_writes() == 1
            assert await turns.check() == []
            listed = await turns.list_contexts(order="updated", limit=1)
            assert [c.context_id for c in listed.contexts] == [ctx.context_id]


def test_name_successor_bounds_every_name_with_the_prefix() -> None:
    top = chr(sys.maxunicode)
    assert name_successor("app/") == "app0"
    assert name_successor("a" + top) == "b"
    assert name_successor(top * 3) is None
    assert name_successor("\ud7ff".encode("utf-8", "surrogatepass").decode()) == "\ue000"
    rng = random.Random(5)
    alphabet = ["a", "/", "z", "\x7f", "\x80", "é", "\ud7ff", "\ue000", "\uffff", "\U00010000", top]
    for _ in range(2000):
        prefix = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 3)))
        name = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 5)))
        high = name_successor(prefix)
        in_range = name >= prefix and (high is None or name < high)
        assert in_range == name.startswith(prefix), (prefix, name, high)
        # SQLite compares UTF-8 bytes: the same order.
        assert (name < prefix) == (name.encode() < prefix.encode())


async def test_a_turn_missing_from_a_chain_is_an_integrity_error(tmp_path: Path) -> None:
    root = tmp_path / ".pforge"
    async with opened(root) as store:
        ctx = await store.turns.open_context("c")
        await store.turns.append_turns([NewTurn(ctx.context_id, "t", b"%d" % i) for i in range(600)])
    with sqlite3.connect(root / "turns.db") as conn:
        conn.execute("DELETE FROM turns WHERE turn_id = 300")
    async with opened(root) as store:
        for newest_first in (False, True):
            with pytest.raises(IntegrityError, match="missing"):
                async for _ in store.turns.iter_turns(ctx.context_id, newest_first=newest_first):
                    pass
        assert any("turns whose parent is missing: (301,)" in p for p in await store.turns.check())


# -- one group commit, one failing batch -----------------------------------------------------------------


async def test_a_failing_batch_leaves_its_group_commit_neighbours(tmp_path: Path) -> None:
    async with opened(tmp_path / ".pforge") as store:
        turns: SqliteTurnStore = store.turns
        a = await turns.open_context("a")
        b = await turns.open_context("b")
        base = await turns.append_turn(a.context_id, "t", b"base")
        batches = turns._actor.batches
        outcomes: dict[str, Any] = {}

        async def run(label: str, call: Any) -> None:
            try:
                outcomes[label] = await call
            except Exception as exc:
                outcomes[label] = exc

        bad = [
            NewTurn(a.context_id, "t", b"1", idempotency_key="x1"),
            NewTurn(b.context_id, "t", b"2", idempotency_key="x2"),
            NewTurn(999, "t", b"3"),  # no such context: the whole batch fails
        ]
        async with anyio.create_task_group() as tg:
            tg.start_soon(run, "before", turns.append_turn(a.context_id, "t", b"before"))
            tg.start_soon(run, "bad", turns.append_turns(bad))
            tg.start_soon(
                run, "good", turns.append_turns([NewTurn(b.context_id, "t", b"g1"), NewTurn(a.context_id, "t", b"g2")])
            )
            tg.start_soon(run, "fork", turns.fork_context(base.turn_id, idempotency_key="f"))
            tg.start_soon(run, "after", turns.append_turn(a.context_id, "t", b"after", idempotency_key="x1"))
        assert turns._actor.batches == batches + 1  # they were one group commit
        assert isinstance(outcomes["bad"], ContextNotFound)
        assert [t.payload for t in await turns.list_turns(a.context_id)] == [b"base", b"before", b"g2", b"after"]
        assert [t.payload for t in await turns.list_turns(b.context_id)] == [b"g1"]
        # The failed batch left no key, no turn and no id behind: its key x1 went to "after".
        assert (await turns.get_turn_by_key(a.context_id, "x1")) == outcomes["after"]
        assert await turns.get_turn_by_key(b.context_id, "x2") is None
        assert outcomes["fork"].base_turn_id == base.turn_id
        ids = [t.turn_id for c in (a, b) for t in await turns.list_turns(c.context_id)]
        assert sorted(ids) == list(range(1, len(ids) + 1))
        assert await turns.check() == []


# -- across processes ------------------------------------------------------------------------------------

NAMES = 100

RACE_OPEN = """
import json, random, sys, anyio
from pforge_async import open_store
root, seed = sys.argv[1], int(sys.argv[2])
async def main():
    async with open_store(root, durability="normal", watch_workspaces=False) as store:
        names = [f"race/{i:03d}" for i in range(NAMES)]
        random.Random(seed).shuffle(names)
        got = {}
        async def walk(share):
            for name in share:
                got[name] = (await store.turns.open_context(name, metadata={"by": seed})).context_id
        print("ready", flush=True)
        sys.stdin.readline()
        async with anyio.create_task_group() as tg:
            tg.start_soon(walk, names[0::2])
            tg.start_soon(walk, names[1::2])
        print(json.dumps(got), flush=True)
anyio.run(main)
""".replace("NAMES", str(NAMES))


async def test_eight_processes_race_open_context_on_the_same_names(tmp_path: Path) -> None:
    root = tmp_path / ".pforge"
    async with opened(root):
        pass  # the schema exists before the race
    procs = [spawn_ready(RACE_OPEN, root, seed) for seed in range(8)]
    go(procs)
    maps = [json.loads(out) for out in run_all(procs)]
    assert all(got == maps[0] for got in maps) and len(maps[0]) == NAMES
    async with opened(root) as store:
        turns = store.turns
        listed, after = [], None
        while True:
            page = await turns.list_contexts(order="name", prefix="race/", after=after, limit=7)
            listed += page.contexts
            if (after := page.cursor) is None:
                break
        assert {c.name: c.context_id for c in listed} == maps[0]
        assert len((await turns.list_contexts(order="created", limit=1000)).contexts) == NAMES
        assert await turns.check() == []
    with raw(root) as conn:
        assert conn.execute("SELECT count(*), count(DISTINCT name) FROM contexts").fetchone() == (NAMES, NAMES)


ROUNDS = 1000


async def test_two_writers_with_the_same_stale_head_in_one_process(tmp_path: Path) -> None:
    async with opened(tmp_path / ".pforge") as store:
        turns = store.turns
        ctx = await turns.open_context("contended")
        head = 0
        for round_ in range(ROUNDS):
            outcomes: list[Any] = []

            async def attempt(
                writer: int, head: int = head, round_: int = round_, outcomes: list[Any] = outcomes
            ) -> None:
                try:
                    outcomes.append(
                        await turns.append_turn(ctx.context_id, "t", b"%d/%d" % (round_, writer), expected_head=head)
                    )
                except HeadConflict as exc:
                    outcomes.append(exc)

            async with anyio.create_task_group() as tg:
                tg.start_soon(attempt, 0)
                tg.start_soon(attempt, 1)
            won = [o for o in outcomes if isinstance(o, TurnRecord)]
            lost = [o for o in outcomes if isinstance(o, HeadConflict)]
            assert len(won) == 1 and len(lost) == 1, outcomes
            assert won[0].parent_turn_id == head
            assert (lost[0].context_id, lost[0].expected, lost[0].actual) == (ctx.context_id, head, won[0].turn_id)
            head = won[0].turn_id
        chain = [t async for t in turns.iter_turns(ctx.context_id, page_size=300)]
        assert len(chain) == ROUNDS and chain[-1].turn_id == head
        assert await turns.check() == []


STALE_HEADS = """
import json, sys, anyio
from pforge_async import HeadConflict, open_store
root, me, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
async def main():
    async with open_store(root, durability="normal", watch_workspaces=False) as store:
        turns = store.turns
        ctx = await turns.open_context("contended")
        print("ready", flush=True)
        sys.stdin.readline()
        attempts = []
        async def attempt(head, writer):
            try:
                won = await turns.append_turn(ctx.context_id, "t", b"%d/%d/%d" % (me, writer, head), expected_head=head)
                attempts.append([head, won.turn_id, won.parent_turn_id])
            except HeadConflict as exc:
                assert exc.expected == head and exc.actual != head, exc
                attempts.append([head, 0, exc.actual])
        while True:
            head = await turns.get_head(ctx.context_id)
            if head.head_depth >= rounds:
                break
            async with anyio.create_task_group() as tg:  # two writers, one stale head
                tg.start_soon(attempt, head.head_turn_id, 0)
                tg.start_soon(attempt, head.head_turn_id, 1)
        print(json.dumps(attempts), flush=True)
anyio.run(main)
"""


async def test_two_writers_with_the_same_stale_head_across_four_processes(tmp_path: Path) -> None:
    root = tmp_path / ".pforge"
    async with opened(root) as store:
        ctx = await store.turns.open_context("contended")
    procs = [spawn_ready(STALE_HEADS, root, me, ROUNDS) for me in range(4)]
    go(procs)
    attempts = [a for out in run_all(procs, timeout=300) for a in json.loads(out)]
    wins: dict[int, list[int]] = {}
    tried: dict[int, int] = {}
    for head, won, parent in attempts:
        tried[head] = tried.get(head, 0) + 1
        if won:
            assert parent == head
            wins.setdefault(head, []).append(won)
    # Every head anyone held was won from exactly once, whoever else held it.
    assert sorted(tried) == sorted(wins) and all(len(w) == 1 for w in wins.values())
    assert len(wins) == ROUNDS and all(n >= 2 for n in tried.values())
    assert sum(n > 2 for n in tried.values()) > 0  # processes did contend with each other
    async with opened(root) as store:
        chain = [t async for t in store.turns.iter_turns(ctx.context_id, page_size=256)]
        assert [t.turn_id for t in chain] == sorted(w[0] for w in wins.values())
        assert [t.parent_turn_id for t in chain] == [0] + [t.turn_id for t in chain[:-1]]
        assert await store.turns.check() == []
    # Each loser was told a head the chain had moved on to, never one from before its own.
    depth = {0: 0} | {t.turn_id: t.depth for t in chain}
    assert all(depth[actual] > depth[head] for head, won, actual in attempts if not won)
    with raw(root) as conn:
        assert conn.execute("SELECT count(*) FROM turns").fetchone()[0] == ROUNDS  # no loser left a turn


PER_TASK = 4

CAS_APPENDS = """
import json, random, sys, anyio
from pforge_async import HeadConflict, open_store
root, me = sys.argv[1], int(sys.argv[2])
async def main():
    async with open_store(root, durability="normal", watch_workspaces=False) as store:
        turns = store.turns
        ctx = await turns.open_context("shared")
        acked = []
        async def task(n):
            rng = random.Random(me * 100 + n)
            for i in range(PER_TASK):
                key = f"{me}-{n}-{i}"
                head = (await turns.get_head(ctx.context_id)).head_turn_id
                while True:
                    try:
                        record = await turns.append_turn(
                            ctx.context_id, "t", key.encode(), idempotency_key=key, expected_head=head
                        )
                        break
                    except HeadConflict as exc:
                        head = exc.actual
                        await anyio.sleep(rng.random() * 0.002)
                acked.append([key, record.turn_id])
        print("ready", flush=True)
        sys.stdin.readline()
        async with anyio.create_task_group() as tg:
            for n in range(16):
                tg.start_soon(task, n)
        print(json.dumps(acked), flush=True)
anyio.run(main)
""".replace("PER_TASK", str(PER_TASK))


async def test_64_tasks_in_4_processes_compare_and_set_one_chain(tmp_path: Path) -> None:
    root = tmp_path / ".pforge"
    async with opened(root) as store:
        ctx = await store.turns.open_context("shared")
    procs = [spawn_ready(CAS_APPENDS, root, me) for me in range(4)]
    go(procs)
    acked = sorted(tuple(a) for out in run_all(procs, timeout=300) for a in json.loads(out))
    assert len(acked) == 64 * PER_TASK
    async with opened(root) as store:
        chain = [t async for t in store.turns.iter_turns(ctx.context_id, page_size=100)]
        # One linear chain holding every acknowledged turn exactly once, and nothing else.
        assert [t.parent_turn_id for t in chain] == [0] + [t.turn_id for t in chain[:-1]]
        assert sorted((t.idempotency_key, t.turn_id) for t in chain) == acked
        assert all(t.payload == (t.idempotency_key or "").encode() for t in chain)
        assert await store.turns.check() == []
    with raw(root) as conn:
        assert conn.execute("SELECT count(*) FROM turns").fetchone()[0] == len(acked)


# -- SIGKILL in the middle of batches and keyed forks -----------------------------------------------------

SESSIONS = 3
BATCH = 40

#: An agent loop with subagents: each round appends one batch across three sessions (compare-and-set
#: on their heads) and then, at once, forks a subagent with a key and writes its first turn, while a
#: second batch goes to a side session: so a kill lands in group commits holding several of them.
#: Rerun from the first round it did not acknowledge: every step of a round is an idempotent retry.
CRASH_LOOP = """
import sys, anyio
from pforge_async import NewTurn, open_store
root, first = sys.argv[1], int(sys.argv[2])
payload = lambda *parts: ("/".join(map(str, parts)) + " ").encode() * 100
async def main():
    async with open_store(root, durability="full", watch_workspaces=False) as store:
        t = store.turns
        sessions = [await t.open_context(f"s{c}") for c in range(SESSIONS)]
        side = await t.open_context("side")
        heads = {c.context_id: (await t.get_head(c.context_id)).head_turn_id for c in sessions}
        i = first
        while True:
            batch = [NewTurn(c.context_id, "t", payload(i, c.context_id, k), idempotency_key=f"b{i}-{c.context_id}-{k}")
                     for c in sessions for k in range(BATCH)]
            records = await t.append_turns(batch, expected_heads=heads)
            heads = {c.context_id: records[(n + 1) * BATCH - 1].turn_id for n, c in enumerate(sessions)}
            async def fork():
                f = await t.fork_context(records[0].turn_id, idempotency_key=f"fork-{i}", metadata={"round": i})
                await t.append_turn(f.context_id, "t", payload("fork", i), idempotency_key="first")
            async def aside():
                await t.append_turns([NewTurn(side.context_id, "t", payload("side", i, k), idempotency_key=f"s{i}-{k}")
                                      for k in range(BATCH)])
            async with anyio.create_task_group() as tg:
                tg.start_soon(fork)
                tg.start_soon(aside)
            print(f"round {i}", flush=True)
            i += 1
anyio.run(main)
""".replace("SESSIONS", str(SESSIONS)).replace("BATCH", str(BATCH))


def run_then_kill(root: Path, first: int, rng: random.Random) -> int:
    """Run the loop from round ``first``, SIGKILL it at a random moment after a few rounds; the
    first round it did not acknowledge."""
    child = spawn(CRASH_LOOP, root, first)
    assert child.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(child.stdout, selectors.EVENT_READ)
    acked = first - 1
    wanted = first + rng.randint(0, 3)
    deadline = time.monotonic() + 120
    while acked < wanted:
        assert sel.select(max(0.0, deadline - time.monotonic())), "the loop acknowledged nothing in time"
        line = child.stdout.readline()
        assert line, child.stderr.read() if child.stderr else "the loop ended"
        acked = int(line.split()[1])
    time.sleep(rng.uniform(0, 0.08))
    child.send_signal(signal.SIGKILL)
    child.wait()
    for line in whole_lines(child.stdout.read()):
        acked = int(line.split()[1])
    return acked + 1


def whole_rounds(conn: sqlite3.Connection) -> int:
    """How many rounds the database holds, having checked each is whole: every batch all there or
    absent, every fork there once with its key and its first turn, no context nobody asked for."""
    sessions = dict(conn.execute("SELECT name, context_id FROM contexts WHERE name IS NOT NULL").fetchall())
    assert set(sessions) == {f"s{c}" for c in range(SESSIONS)} | {"side"}
    by_key: dict[str, int] = {}
    for key, n in conn.execute("SELECT idempotency_key, count(*) FROM turns GROUP BY idempotency_key"):
        by_key[key] = n
    rounds = 0
    while any(f"b{rounds}-{c}-0" in by_key for c in sessions.values()):
        rounds += 1
    for i in range(rounds + 1):
        present = [f"b{i}-{sessions[f's{c}']}-{k}" in by_key for c in range(SESSIONS) for k in range(BATCH)]
        assert all(present) or not any(present), f"batch {i} is torn"
        side = [f"s{i}-{k}" in by_key for k in range(BATCH)]
        assert all(side) or not any(side), f"side batch {i} is torn"
    # Forks: exactly the keyed ones, each created once, each with its key (no orphan).
    forks = conn.execute(
        "SELECT c.context_id, k.idempotency_key, c.base_turn_id, c.parent_context_id FROM contexts c "
        "LEFT JOIN context_keys k ON k.context_id = c.context_id WHERE c.name IS NULL"
    ).fetchall()
    assert all(key is not None for _, key, _, _ in forks), f"orphan forks: {forks}"
    assert sorted(int(key.split("-")[1]) for _, key, _, _ in forks) == list(range(len(forks)))
    assert len(forks) in (rounds - 1, rounds), (len(forks), rounds)
    first_turns = dict(
        conn.execute("SELECT context_id, count(*) FROM turns WHERE idempotency_key = 'first' GROUP BY 1")
    )
    assert all(first_turns.get(context_id, 0) <= 1 for context_id, *_ in forks)
    assert all(n == 1 for key, n in by_key.items() if key != "first")
    return rounds


async def test_sigkill_in_batches_and_keyed_forks_then_rerun(tmp_path: Path) -> None:
    rng = random.Random()
    root = tmp_path / ".pforge"
    first = 0
    for _ in range(4):
        first = run_then_kill(root, first, rng)
        with raw(root) as conn:
            assert whole_rounds(conn) in (first, first + 1)
    # The last rerun finishes the round the kill cut, and one more.
    child = spawn(CRASH_LOOP, root, first)
    wait_for_line(child, f"round {first}", timeout=120)
    wait_for_line(child, f"round {first + 1}", timeout=120)
    child.send_signal(signal.SIGKILL)
    child.wait()
    async with opened(root) as store:
        turns = store.turns
        assert await turns.check() == []
        with raw(root) as conn:
            rounds = whole_rounds(conn)
        assert rounds >= first + 2
        for c in range(SESSIONS):
            info = await turns.find_context(f"s{c}")
            assert info is not None
            chain = [t.idempotency_key async for t in turns.iter_turns(info.context_id, page_size=64)]
            assert chain == [f"b{i}-{info.context_id}-{k}" for i in range(rounds) for k in range(BATCH)]
        s0 = await turns.find_context("s0")
        assert s0 is not None
        forks, after = [], None
        while True:
            page = await turns.list_contexts(parent_context_id=s0.context_id, order="created", after=after, limit=3)
            forks += page.contexts
            if (after := page.cursor) is None:
                break
        assert sorted(f.metadata["round"] for f in forks) == list(range(len(forks)))
        for f in forks:
            first_turn = await turns.get_turn_by_key(f.context_id, "first")
            assert first_turn is None or first_turn.parent_turn_id == f.base_turn_id
