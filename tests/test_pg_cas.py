"""The CAS contract on PostgreSQL: one suite run against the file CAS and ``PgCas`` alike, and what only
the table store has (10,000 objects, processes sharing one server, damaged rows, ``export_git`` checked
by the real ``git fsck --strict``, gc).

tests/test_cas.py and tests/test_cas_git.py open a file store inside each test, so their classes
cannot be pointed at another backend: the contract tests here take a ``backend`` fixture instead and
reuse those modules' workspaces, oracles and tables of refused input.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from pforge_async import (
    ActorClosed,
    IntegrityError,
    InvalidInput,
    ObjectNotFound,
    RefConflict,
    StorageError,
    open_store,
)
from pforge_async.cas import EMPTY_TREE, TreeEntry
from pforge_async.postgres.cas import CHUNK_BYTES, CHUNKED_ABOVE, PgCas, open_pg_cas

from ._pg import PgCluster
from ._procs import run_all, spawn
from .test_cas import git, git_fsck, make_workspace, tree_listing
from .test_cas_git import (
    BAD_CALLS,
    DIR,
    FILE,
    LINK,
    REFUSED_COMMITS,
    REFUSED_DOTFILES,
    REFUSED_ENTRIES,
    foreign_objects,
    git_fsck_named,
)
from .test_cas_workspace import CALL_BOUND_S, RACE_S, Racer, blobs_of, make_outside, outside_state

pytestmark = pytest.mark.anyio


class Backend:
    """One CAS under test, with what a test needs beside its public API."""

    def __init__(self, name: str, cas: Any, tmp_path: Path, dsn: str = "", schema: str = "") -> None:
        self.name = name
        self.cas = cas
        self.tmp_path = tmp_path
        self.dsn = dsn
        self.schema = schema
        self._exports = 0

    async def gitdir(self) -> Path:
        """A git repository holding every object and ref: the file CAS's own, or an export."""
        if self.name == "file":
            return Path(self.cas.path)
        self._exports += 1
        out = self.tmp_path / f"export-{self._exports}.git"
        await self.cas.export_git(out)
        return out

    async def count(self) -> int:
        return int((await self.cas.fsck()).checked)

    async def plant(self, kind: bytes, body: bytes) -> str:
        """Store an object with no check at all, as another tool writing the store would."""
        if self.name == "file":
            from .test_cas_git import put_loose

            return put_loose(Path(self.cas.path), kind, body)
        import hashlib

        oid = hashlib.sha256(b"%s %d\0" % (kind, len(body)) + body).hexdigest()
        kinds = {b"commit": 1, b"tree": 2, b"blob": 3}
        await self.sql(
            f'INSERT INTO "{self.schema}".cas_objects (oid, kind, size, body) VALUES ($1, $2, $3, $4) '
            "ON CONFLICT DO NOTHING",
            bytes.fromhex(oid),
            kinds[kind],
            len(body),
            body,
        )
        return oid

    async def sql(self, query: str, *args: Any) -> Any:
        import asyncpg

        conn = await asyncpg.connect(self.dsn)
        try:
            return await conn.fetch(query, *args)
        finally:
            await conn.close()


@asynccontextmanager
async def open_backend(request: pytest.FixtureRequest, tmp_path: Path, **store_options: Any) -> AsyncIterator[Backend]:
    """The CAS ``request.param`` names: the file store's (``open_store`` with ``store_options``) or
    ``PgCas`` on the test server."""
    if request.param == "file":
        async with open_store(tmp_path / ".pforge", **store_options) as store:
            yield Backend("file", store.cas, tmp_path)
    else:
        dsn = request.getfixturevalue("pg_dsn")
        schema = request.getfixturevalue("pg_schema")
        async with open_pg_cas(dsn, schema=schema, cache_dir=tmp_path / "cache") as cas:
            yield Backend("pg", cas, tmp_path, dsn, schema)


@pytest.fixture(params=["file", "pg"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    async with open_backend(request, tmp_path) as opened:
        yield opened


@pytest.fixture
async def pg(tmp_path: Path, pg_dsn: str, pg_schema: str) -> AsyncIterator[Backend]:
    async with open_pg_cas(pg_dsn, schema=pg_schema, cache_dir=tmp_path / "cache") as cas:
        yield Backend("pg", cas, tmp_path, pg_dsn, pg_schema)


# -- the contract, on both backends ----------------------------------------------------------------


class TestContract:
    async def test_round_trips(self, backend: Backend) -> None:
        cas = backend.cas
        for data in (b"", b"x", bytes(range(256)) * 1000):
            assert await cas.read_blob(await cas.write_blob(data)) == data
        a = await cas.write_blob(b"a")
        assert await cas.has(a) and not await cas.has("ab" * 32)
        tree = await cas.write_tree([("d/e/f.txt", "100644", a), ("g", "100755", a)])
        top = await cas.read_tree(tree)
        assert [(e.name, e.mode, e.is_tree) for e in top] == [("d", 0o40000, True), ("g", 0o100755, False)]
        assert await cas.read_tree(tree, recursive=True) == [
            TreeEntry("d/e/f.txt", 0o100644, a),
            TreeEntry("g", 0o100755, a),
        ]
        assert await cas.write_tree([]) == EMPTY_TREE
        commit = await cas.write_commit(tree, message="m", metadata={"K": "v"}, timestamp=5)
        got = await cas.read_commit(commit)
        assert (got.tree, got.parents, got.message, got.metadata, got.timestamp) == (tree, (), "m", {"K": "v"}, 5)
        assert await cas.get_ref("refs/heads/nothing") is None

    async def test_ids_are_gits(self, backend: Backend) -> None:
        cas = backend.cas
        blob = await cas.write_blob(b"hello world\n")
        exe = await cas.write_blob(b"#!/bin/sh\n")
        tree = await cas.write_tree([("README", "100644", blob), ("bin/run", 0o100755, exe), ("bin/link", LINK, blob)])
        first = await cas.write_commit(tree, message="first", timestamp=1_700_000_000)
        second = await cas.write_commit(
            tree, [first], message="second", author="Agent <agent@example.com>", timestamp=1_700_000_100
        )
        await cas.update_ref("refs/heads/main", second)
        gitdir = await backend.gitdir()
        git_fsck(gitdir)
        assert git(gitdir, "hash-object", "--stdin", input=b"hello world\n").strip() == blob
        assert git(gitdir, "cat-file", "-p", blob) == "hello world\n"
        log = git(gitdir, "log", "--format=%H %an %s", "main")
        assert log.splitlines() == [f"{second} Agent second", f"{first} pforge first"]
        assert git(gitdir, "rev-parse", "HEAD").strip() == second

    async def test_writing_an_object_twice_stores_it_once(self, backend: Backend) -> None:
        first = await backend.cas.write_blob(b"same")
        before = await backend.count()
        assert await backend.cas.write_blob(b"same") == first
        assert await backend.count() == before

    async def test_ref_compare_and_swap(self, backend: Backend) -> None:
        cas = backend.cas
        tree = await cas.write_tree([])
        c1 = await cas.write_commit(tree, message="1")
        c2 = await cas.write_commit(tree, [c1], message="2")
        await cas.update_ref("refs/heads/main", c1, expected="0" * 64)
        with pytest.raises(RefConflict, match="refs/heads/main"):
            await cas.update_ref("refs/heads/main", c2, expected="0" * 64)
        with pytest.raises(RefConflict):
            await cas.update_ref("refs/heads/main", c2, expected=c2)
        await cas.update_ref("refs/heads/main", c2, expected=c1)
        assert await cas.get_ref("refs/heads/main") == c2
        assert await cas.get_ref("HEAD") == c2

    async def test_snapshot_then_restore_reproduces_the_workspace(self, backend: Backend) -> None:
        work = backend.tmp_path / "work"
        make_workspace(work)
        tree = await backend.cas.snapshot(work)
        names = {e.name for e in await backend.cas.read_tree(tree, recursive=True)}
        assert not any(n.startswith(".git") for n in names) and "emptydir" not in names
        out = backend.tmp_path / "restored"
        await backend.cas.restore(tree, out)
        expected = {k: v for k, v in tree_listing(work).items() if not k.startswith(".pforge")}
        assert tree_listing(out) == expected
        assert os.readlink(out / "dangling") == "../nowhere"
        assert (out / "run.sh").stat().st_mode & 0o111
        # git computes the same tree id from the same files.
        scratch = backend.tmp_path / "scratch.git"
        subprocess.run(["git", "init", "-q", "--bare", "--object-format=sha256", str(scratch)], check=True)
        git(scratch, f"--work-tree={work}", "add", "-A", "--", ".", ":!.pforge")
        assert git(scratch, f"--work-tree={work}", "write-tree").strip() == tree

    async def test_a_change_is_seen_even_right_after_a_snapshot(self, backend: Backend) -> None:
        work = backend.tmp_path / "work"
        make_workspace(work)
        target = work / "src" / "main.py"
        cas = backend.cas
        before = await cas.snapshot(work)
        assert await cas.snapshot(work) == before
        stamp = target.stat()
        target.write_text("import pkX\n" * 100)  # same size, same mtime: the racily-clean case
        os.utime(target, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
        after = await cas.snapshot(work)
        assert after != before
        entries = {e.name: e.oid for e in await cas.read_tree(after, recursive=True)}
        assert await cas.read_blob(entries["src/main.py"]) == b"import pkX\n" * 100
        (work / "run.sh").chmod(0o644)
        assert await cas.snapshot(work) != after
        (work / "src" / "pkg" / "mod.py").unlink()
        names = {e.name for e in await cas.read_tree(await cas.snapshot(work), recursive=True)}
        assert "src/pkg/mod.py" not in names

    async def test_restore_refuses_a_non_empty_target(self, backend: Backend) -> None:
        busy = backend.tmp_path / "busy"
        busy.mkdir()
        (busy / "keep.txt").write_text("mine")
        tree = await backend.cas.write_tree([])
        with pytest.raises(InvalidInput, match="not empty"):
            await backend.cas.restore(tree, busy)
        assert (busy / "keep.txt").read_text() == "mine"

    async def test_64_tasks_writing_overlapping_blobs(self, backend: Backend) -> None:
        results: dict[int, list[str]] = {}

        async def writer(n: int) -> None:
            results[n] = [await backend.cas.write_blob(b"blob %d" % (i % 16)) for i in range(n, n + 16)]

        async with anyio.create_task_group() as tg:
            for n in range(64):
                tg.start_soon(writer, n)
        distinct = {oid for oids in results.values() for oid in oids}
        assert len(distinct) == 16
        report = await backend.cas.fsck()
        assert report.ok and report.checked == 16

    @pytest.mark.parametrize("oid", ["../../etc/passwd", "A" * 64, "a" * 63, "a" * 65, "g" * 64, "", None, 42])
    async def test_malformed_oids_are_rejected(self, backend: Backend, oid: object) -> None:
        with pytest.raises(InvalidInput, match="invalid object id"):
            await backend.cas.read_blob(oid)
        with pytest.raises(InvalidInput):
            await backend.cas.read_tree(oid)
        with pytest.raises(InvalidInput):
            await backend.cas.has(oid)
        with pytest.raises(InvalidInput):
            await backend.cas.restore(oid, backend.tmp_path / "out")
        with pytest.raises(InvalidInput):
            await backend.cas.write_tree([("f", FILE, oid)])
        with pytest.raises(InvalidInput):
            await backend.cas.update_ref("refs/heads/x", oid)
        assert not (backend.tmp_path / "out").exists()
        assert await backend.count() == 0

    async def test_names_modes_and_types_git_rejects_are_refused(self, backend: Backend) -> None:
        cas = backend.cas
        blob = await cas.write_blob(b"x")
        tree = await cas.write_tree([("f", FILE, blob)])
        before = await backend.count()
        for path, mode in REFUSED_ENTRIES:
            with pytest.raises(InvalidInput) as caught:
                await cas.write_tree([(path, mode, tree if mode == DIR else blob), ("fine.txt", FILE, blob)])
            assert repr(path) in str(caught.value)
        with pytest.raises(InvalidInput, match=r"'d'.*mode 40000.*is a blob"):
            await cas.write_tree([("d", DIR, blob)])
        with pytest.raises(InvalidInput, match=r"'f'.*is a tree"):
            await cas.write_tree([("f", FILE, tree)])
        with pytest.raises(ObjectNotFound, match="ab" * 32):
            await cas.write_tree([("m", FILE, "ab" * 32)])
        for name, content, match in REFUSED_DOTFILES:
            bad = await cas.write_blob(content)
            before += 1
            with pytest.raises(InvalidInput, match=match):
                await cas.write_tree([(name, FILE, bad)])
        for kwargs, match in REFUSED_COMMITS:
            with pytest.raises(InvalidInput, match=match):
                await cas.write_commit(tree, **kwargs)
        with pytest.raises(InvalidInput, match=r"tree .* is a blob"):
            await cas.write_commit(blob)
        with pytest.raises(InvalidInput, match=r"parent .* is a tree"):
            await cas.write_commit(tree, [tree])
        with pytest.raises(ObjectNotFound, match="ab" * 32):
            await cas.write_commit("ab" * 32)
        with pytest.raises(ObjectNotFound, match="ab" * 32):
            await cas.update_ref("refs/heads/main", "ab" * 32)
        assert await backend.count() == before
        assert await cas.get_ref("refs/heads/main") is None
        git_fsck(await backend.gitdir())

    async def test_bad_arguments_are_invalid_input_and_the_store_serves_on(self, backend: Backend) -> None:
        class Holder:
            cas = backend.cas

        blob = await backend.cas.write_blob(b"x")
        tree = await backend.cas.write_tree([("f", FILE, blob)])
        commit = await backend.cas.write_commit(tree)
        wrong = []
        for label, call in BAD_CALLS:
            try:
                await call(Holder, blob, tree, backend.tmp_path)
            except InvalidInput:
                pass
            except Exception as exc:
                wrong.append((label, repr(exc)))
            else:
                wrong.append((label, "accepted"))
            assert not (backend.tmp_path / "r1").exists()
            again = await backend.cas.write_blob(b"after " + label.encode())
            assert await backend.cas.read_blob(again) == b"after " + label.encode()
        assert not wrong
        await backend.cas.update_ref("refs/heads/ok", commit)
        assert await backend.cas.get_ref("refs/heads/ok") == commit

    async def test_fsck_names_every_object_git_fsck_names(self, backend: Backend) -> None:
        blob = await backend.cas.write_blob(b"good")
        tree = await backend.cas.write_tree([("a/b.txt", FILE, blob), (".gitmodules", FILE, blob)])
        await backend.cas.update_ref("refs/heads/main", await backend.cas.write_commit(tree))
        assert (await backend.cas.fsck()).ok
        # Objects another tool wrote, each one git fsck --strict rejects: planted as they are.
        scratch = backend.tmp_path / "foreign.git"
        subprocess.run(["git", "init", "-q", "--bare", "--object-format=sha256", str(scratch)], check=True)
        planted = foreign_objects(scratch)
        for path in (scratch / "objects").glob("??/*"):
            kind, _, body = zlib.decompress(path.read_bytes()).partition(b"\0")
            await backend.plant(kind.split(b" ")[0], body)
        code, git_named, output = git_fsck_named(await backend.gitdir())
        assert code != 0
        report = await backend.cas.fsck()
        text = "\n".join(report.invalid + report.missing + report.corrupt)
        assert not sorted(oid for oid in git_named if oid not in text), output + "\n---\n" + text
        assert all(oid in text for oid in planted), text
        assert blob not in text and tree not in text

    async def test_fsck_names_links_to_missing_objects(self, backend: Backend) -> None:
        blob = await backend.cas.write_blob(b"here")
        absent = "ab" * 32
        tree = await backend.plant(b"tree", b"100644 a\0" + bytes.fromhex(blob) + b"100644 b\0" + bytes.fromhex(absent))
        report = await backend.cas.fsck()
        assert report.missing == [absent] and not report.corrupt and not report.invalid, report
        assert report.checked == 2
        with pytest.raises(ObjectNotFound, match=absent):
            await backend.cas.restore(tree, backend.tmp_path / "out")

    async def test_non_utf8_names_round_trip_byte_exact(self, backend: Backend) -> None:
        raw_names = [b"caf\xe9.txt", b"\xff\xfe", "zoë".encode(), b"d\x80ir"]
        work = backend.tmp_path / "work"
        work.mkdir()
        for n in raw_names:
            with open(os.path.join(os.fsencode(work), n), "wb") as f:
                f.write(b"data " + n)
        snap = await backend.cas.snapshot(work)
        out = backend.tmp_path / "out"
        await backend.cas.restore(snap, out)
        assert sorted(os.listdir(os.fsencode(out))) == sorted(raw_names)
        for n in raw_names:
            with open(os.path.join(os.fsencode(out), n), "rb") as f:
                assert f.read() == b"data " + n


# -- PostgreSQL only -------------------------------------------------------------------------------


class TestPgCas:
    async def test_10000_objects_round_trip(self, pg: Backend) -> None:
        cas: PgCas = pg.cas
        datas = [b"object %d " % i + os.urandom(64) for i in range(10_000)]
        oids: list[str] = [""] * len(datas)

        async def writer(start: int) -> None:
            for i in range(start, len(datas), 32):
                oids[i] = await cas.write_blob(datas[i])

        async with anyio.create_task_group() as tg:
            for start in range(32):
                tg.start_soon(writer, start)
        assert len(set(oids)) == 10_000
        for i in range(0, 10_000, 7):
            assert await cas.read_blob(oids[i]) == datas[i]
        tree = await cas.write_tree([(f"d{i % 10}/f{i}", FILE, oid) for i, oid in enumerate(oids)])
        out = pg.tmp_path / "out"
        await cas.restore(tree, out)
        assert (out / "d3" / "f9993").read_bytes() == datas[9993]
        assert sum(1 for _ in out.rglob("f*")) == 10_000
        report = await cas.fsck()
        assert report.ok and report.checked == 10_000 + 11
        rows = await pg.sql(f'SELECT count(*) AS n FROM "{pg.schema}".cas_objects')
        assert rows[0]["n"] == 10_011

    async def test_concurrent_reads_answer_each_caller_its_own(self, pg: Backend) -> None:
        # Reads in one turn of the event loop share one query: each caller still gets its own answer.
        cas: PgCas = pg.cas
        datas = [b"read %d" % i for i in range(64)]
        oids = [await cas.write_blob(d) for d in datas]
        tree = await cas.write_tree([("f", FILE, oids[0])])
        results: dict[int, object] = {}

        async def read(i: int, oid: str) -> None:
            try:
                results[i] = await cas.read_blob(oid)
            except Exception as exc:
                results[i] = exc

        async with anyio.create_task_group() as tg:
            for i, oid in enumerate(oids):
                tg.start_soon(read, i, oid)
            tg.start_soon(read, 64, "ef" * 32)
            tg.start_soon(read, 65, tree)
            tg.start_soon(read, 66, oids[5])
        assert [results[i] for i in range(64)] == datas and results[66] == datas[5]
        assert isinstance(results[64], ObjectNotFound) and isinstance(results[65], InvalidInput)

    async def test_two_processes_and_many_tasks_store_each_object_once(self, pg: Backend) -> None:
        procs = [spawn(WRITE_SHARED_AND_OWN, pg.dsn, pg.schema, f"p{i}") for i in range(2)]
        # This process writes the shared objects as well, from 16 tasks, while they run.
        async with anyio.create_task_group() as tg:
            for t in range(16):
                tg.start_soon(_write_range, pg.cas, range(t, 300, 16))
        outs = run_all(procs)
        for out in outs:
            assert out.split()[0] == "done"
        rows = await pg.sql(f'SELECT count(*) AS n, count(DISTINCT oid) AS d FROM "{pg.schema}".cas_objects')
        assert rows[0]["n"] == rows[0]["d"] == 300 + 2 * 100
        report = await pg.cas.fsck()
        assert report.ok and report.checked == 500
        for i in range(0, 300, 13):
            oid = await pg.cas.write_blob(b"shared %d" % i * 50)
            assert await pg.cas.read_blob(oid) == b"shared %d" % i * 50

    async def test_two_processes_racing_a_ref_update_have_one_winner(self, pg: Backend) -> None:
        tree = await pg.cas.write_tree([])
        base = await pg.cas.write_commit(tree, message="base", timestamp=0)
        await pg.cas.update_ref("refs/heads/race", base)
        for _round in range(3):
            procs = [spawn(RACE_REF, pg.dsn, pg.schema, f"p{i}", base, stdin=subprocess.PIPE) for i in range(2)]
            from ._procs import wait_for_line

            for p in procs:
                wait_for_line(p, "ready")
            for p in procs:
                assert p.stdin is not None
                p.stdin.write("go\n")
                p.stdin.flush()
            results = [p.communicate(timeout=60)[0] for p in procs]
            winners = [r for r in results if r.startswith("won")]
            assert len(winners) == 1, results
            assert await pg.cas.get_ref("refs/heads/race") == winners[0].split()[1]
            await pg.cas.update_ref("refs/heads/race", base)

    async def test_a_workspace_with_symlinks_and_exec_bits_round_trips_identical(self, pg: Backend) -> None:
        work = pg.tmp_path / "work"
        make_workspace(work)
        (work / "deep" / "er" / "est").mkdir(parents=True)
        (work / "deep" / "er" / "est" / "tool").write_bytes(os.urandom(3 << 20))  # past the large-file bound
        (work / "deep" / "er" / "est" / "tool").chmod(0o755)
        (work / "deep" / "abs-link").symlink_to("/etc/passwd")
        (work / "deep" / "dir-link").symlink_to("er")
        tree = await pg.cas.snapshot(work)
        out = pg.tmp_path / "restored"
        await pg.cas.restore(tree, out)
        assert tree_listing(out) == tree_listing(work)
        assert os.readlink(out / "deep" / "abs-link") == "/etc/passwd"
        assert (out / "deep" / "dir-link").is_symlink()
        # Snapshot of the restored copy: the same id; and a second open of the store agrees.
        assert await pg.cas.snapshot(out) == tree
        async with open_pg_cas(pg.dsn, schema=pg.schema) as other:
            assert await other.snapshot(work) == tree

    async def test_export_git_passes_git_fsck_strict(self, pg: Backend) -> None:
        work = pg.tmp_path / "work"
        make_workspace(work)
        tree = await pg.cas.snapshot(work)
        commit = await pg.cas.write_commit(tree, message="snap", metadata={"Run-Id": "r1"}, timestamp=1)
        await pg.cas.update_ref("refs/heads/main", commit)
        await pg.cas.update_ref("refs/tags/v1", commit)
        out = pg.tmp_path / "export.git"
        written = await pg.cas.export_git(out)
        assert written == (await pg.cas.fsck()).checked
        git_fsck(out)
        assert git(out, "rev-parse", "HEAD").strip() == commit
        assert git(out, "rev-parse", "v1").strip() == commit
        assert git(out, "cat-file", "-p", f"{commit}:run.sh") == "#!/bin/sh\necho run\n"
        # Exporting again into the same repository adds only what is new.
        blob = await pg.cas.write_blob(b"later")
        assert await pg.cas.export_git(out) == 1
        assert git(out, "cat-file", "-p", blob) == "later"
        git_fsck(out)
        # A clone of it checks out the workspace.
        clone = pg.tmp_path / "clone"
        subprocess.run(["git", "clone", "-q", str(out), str(clone)], check=True, capture_output=True)
        assert (clone / "src" / "pkg" / "mod.py").read_text() == "print('hi')\n"
        with pytest.raises(InvalidInput, match="not empty"):
            busy = pg.tmp_path / "busy"
            busy.mkdir()
            (busy / "x").write_text("x")
            await pg.cas.export_git(busy)

    async def test_a_flipped_byte_in_a_row_is_named_by_fsck_and_refused_on_read(self, pg: Backend) -> None:
        cas = pg.cas
        victim = await cas.write_blob(b"stored payload " * 10)
        other = await cas.write_blob(b"an innocent neighbour")
        tree = await cas.write_tree([("v", FILE, victim), ("o", FILE, other)])
        await pg.sql(
            f'UPDATE "{pg.schema}".cas_objects SET body = set_byte(body, 3, get_byte(body, 3) # 1) WHERE oid = $1',
            bytes.fromhex(victim),
        )
        with pytest.raises(IntegrityError, match=victim):
            await cas.read_blob(victim)
        with pytest.raises(IntegrityError, match=victim):
            await cas.restore(tree, pg.tmp_path / "out")
        assert not (pg.tmp_path / "out").exists() or not any((pg.tmp_path / "out").iterdir())
        with pytest.raises(IntegrityError, match=victim):
            await cas.export_git(pg.tmp_path / "export.git")
        report = await cas.fsck()
        assert report.corrupt == [victim] and not report.ok
        # A changed type is caught the same way; nothing else is lost, and the store still writes.
        await pg.sql(f'UPDATE "{pg.schema}".cas_objects SET kind = 1 WHERE oid = $1', bytes.fromhex(other))
        assert (await cas.fsck()).corrupt == sorted([victim, other])
        assert await cas.read_blob(await cas.write_blob(b"new")) == b"new"

    async def test_bad_input_stores_nothing(self, pg: Backend) -> None:
        cas = pg.cas
        for bad in ("../../x", "A" * 64, None, 7):
            with pytest.raises(InvalidInput):
                await cas.write_tree([("f", FILE, bad)])
            with pytest.raises(InvalidInput):
                await cas.update_ref("refs/heads/x", bad)
        with pytest.raises(InvalidInput):
            await cas.write_blob("text")
        # Raw commands that reach the actor are checked again there.
        from pforge_async.postgres.cas import PutObjects, UpdateRef

        with pytest.raises(InvalidInput, match="unknown object type"):
            await cas._actor.call(PutObjects([(9, b"x")]))
        with pytest.raises(InvalidInput):
            await cas._actor.call(UpdateRef("refs/heads/x", "zz"))
        with pytest.raises(InvalidInput):
            await cas._actor.call_raw(b"\x92\x01\x02")
        rows = await pg.sql(
            f'SELECT (SELECT count(*) FROM "{pg.schema}".cas_objects) AS o, '
            f'(SELECT count(*) FROM "{pg.schema}".cas_refs) AS r'
        )
        assert (rows[0]["o"], rows[0]["r"]) == (0, 0)
        assert await cas.read_blob(await cas.write_blob(b"still serving")) == b"still serving"

    async def test_a_failing_command_fails_only_its_caller_in_a_batch(self, pg: Backend) -> None:
        from pforge_async.postgres.cas import PutObjects

        good: list[str] = []
        errors: list[BaseException] = []
        tree_missing = b"100644 f\0" + bytes.fromhex("cd" * 32)

        async def bad() -> None:
            try:
                await pg.cas._actor.call(PutObjects([(2, tree_missing)]))
            except ObjectNotFound as exc:
                errors.append(exc)

        async def ok(i: int) -> None:
            good.append(await pg.cas.write_blob(b"fine %d" % i))

        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(ok, i)
                if i % 5 == 0:
                    tg.start_soon(bad)
        assert len(errors) == 4 and len(good) == 20
        assert (await pg.cas.fsck()).checked == 20

    async def test_gc_reclaims_the_unreachable_past_grace_and_freshening_keeps(self, pg: Backend) -> None:
        cas = pg.cas
        keep = await cas.write_blob(b"kept by a ref")
        tree = await cas.write_tree([("k", FILE, keep)])
        commit = await cas.write_commit(tree, message="c", timestamp=0)
        await cas.update_ref("refs/heads/main", commit)
        rooted = await cas.write_blob(b"kept by a root")
        reached = await cas.write_blob(b"kept: a young tree reaches it")
        junk = [await cas.write_blob(b"junk %d" % i) for i in range(5)]
        for bad in ({"grace_s": -1}, {"grace_s": float("nan")}, {"grace_s": 10}, {"dry_run": 1}):
            with pytest.raises(InvalidInput):
                await cas.gc([], **{"grace_s": 3600, **bad})
        with pytest.raises(InvalidInput):
            await cas.gc(["zz"], grace_s=3600)
        with pytest.raises(InvalidInput):
            await cas.gc(rooted, grace_s=3600)
        await _age(pg.dsn, pg.schema, 7200)
        young = await cas.write_tree([("r", FILE, reached)])  # after the aging: young, and so is what it reaches
        # has() of an old object freshens it: it survives.
        assert await cas.has(junk[0])
        dry = await cas.gc([rooted], grace_s=3600, dry_run=True)
        assert (dry.objects_before, dry.objects_kept, dry.objects_young, dry.objects_reclaimed) == (11, 4, 3, 4)
        assert dry.bytes_freed == sum(len(b"junk %d" % i) for i in range(1, 5)) and dry.missing == []
        assert (await pg.sql(f'SELECT count(*) FROM "{pg.schema}".cas_objects'))[0][0] == 11  # dry: nothing gone
        report = await cas.gc([rooted, "cd" * 32], grace_s=3600)
        assert report.objects_reclaimed == 4 and report.bytes_freed == dry.bytes_freed
        assert report.missing == ["cd" * 32] and report.slices == 1
        assert await cas.has_many(junk) == [True, False, False, False, False]
        assert all(await cas.has_many([keep, tree, commit, rooted, young, reached]))
        # A re-put of an old object freshens it too; an old root no longer given goes.
        await _age(pg.dsn, pg.schema, 7200)
        await cas.write_blob(b"junk 0")
        report = await cas.gc([], grace_s=3600)
        assert await cas.has_many([rooted, junk[0], young, reached, keep]) == [False, True, False, False, True]
        await _age(pg.dsn, pg.schema, 7200)
        await cas.gc([], grace_s=3600)
        assert await cas.has_many([junk[0], keep]) == [False, True]
        # roots_taken_at: an object freshened since the caller began gathering its roots stays.
        late = await cas.write_blob(b"freshened 30 minutes ago")
        await _age(pg.dsn, pg.schema, 1800)
        began = time.time() - 2400  # the caller began 40 minutes ago
        assert (await cas.gc([], grace_s=60, roots_taken_at=began, dry_run=True)).objects_reclaimed == 0
        assert (await cas.gc([], grace_s=60, dry_run=True)).objects_reclaimed == 1
        await cas.gc([], grace_s=60, roots_taken_at=began)
        assert await cas.has_many([late, keep]) == [True, True]
        assert (await cas.fsck()).ok


class TestPgCasFaults:
    async def test_a_read_only_cas_reads_and_writes_nothing(self, pg: Backend) -> None:
        blob = await pg.cas.write_blob(b"before")
        work = pg.tmp_path / "work"
        make_workspace(work)
        async with open_pg_cas(pg.dsn, schema=pg.schema, readonly=True) as ro:
            assert await ro.read_blob(blob) == b"before"
            assert await ro.has(blob)
            for call in (
                lambda: ro.write_blob(b"x"),
                lambda: ro.write_tree([("f", FILE, blob)]),
                lambda: ro.update_ref("refs/heads/main", blob),
                lambda: ro.snapshot(work),
                lambda: ro.gc([], grace_s=3600),
                lambda: ro.gc([], grace_s=3600, dry_run=True),
            ):
                with pytest.raises(InvalidInput, match="read-only"):
                    await call()
        assert (await pg.cas.fsck()).checked == 1
        with pytest.raises(StorageError, match="schema version 0"):
            async with open_pg_cas(pg.dsn, schema=pg.schema + "_none", readonly=True):
                pass

    async def test_sigkill_mid_snapshot_leaves_a_verifiable_store(self, pg: Backend) -> None:
        work = pg.tmp_path / "work"
        for d in range(10):
            (work / f"d{d}").mkdir(parents=True)
            for f in range(100):
                (work / f"d{d}" / f"f{f}").write_bytes(os.urandom(2048))
        child = spawn(SNAPSHOT_FOREVER, pg.dsn, pg.schema, work)
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line.startswith("snap"), child.stderr.read() if child.stderr else ""
        for f in range(0, 100, 3):
            (work / "d0" / f"f{f}").write_bytes(os.urandom(2048))
        time.sleep(0.05 + (time.monotonic() % 0.1))
        child.send_signal(signal.SIGKILL)
        child.wait()
        report = await pg.cas.fsck()
        assert report.ok, report
        assert len(await pg.cas.read_tree(line.split()[1], recursive=True)) == 1000
        git_fsck(await pg.gitdir())

    async def test_a_server_restart_mid_load_loses_nothing_acknowledged(
        self, pg: Backend, pg_cluster: tuple[str, PgCluster | None]
    ) -> None:
        cluster = pg_cluster[1]
        if cluster is None:
            pytest.skip("PFORGE_TEST_PG_DSN names a server these tests did not start, so they cannot restart it")
        acknowledged: dict[str, bytes] = {}
        failures: list[BaseException] = []
        stop = anyio.Event()

        async def writer(n: int) -> None:
            i = 0
            while not stop.is_set():
                data = b"writer %d item %d " % (n, i) + os.urandom(16)
                i += 1
                try:
                    acknowledged[await pg.cas.write_blob(data)] = data
                except StorageError as exc:
                    failures.append(exc)
                    await anyio.sleep(0.01)

        async def until_acknowledged(count: int) -> None:
            # Load measured in writes, not seconds: a loaded CI machine may ack few in a fixed time.
            for _ in range(2400):  # 120 s at most
                if len(acknowledged) >= count:
                    return
                await anyio.sleep(0.05)
            raise AssertionError(f"{len(acknowledged)} writes acknowledged in 120 s, wanted {count} ({failures[-3:]})")

        async with anyio.create_task_group() as tg:
            for n in range(8):
                tg.start_soon(writer, n)
            await anyio.sleep(0.5)
            await until_acknowledged(60)
            await anyio.to_thread.run_sync(cluster.restart)
            await anyio.sleep(1.0)
            await until_acknowledged(len(acknowledged) + 50)  # the writers write on after the restart
            stop.set()
        assert len(acknowledged) > 100
        # Every caller either succeeded or got StorageError (checked above); the actor reconnected.
        after = await pg.cas.write_blob(b"after the restart")
        assert await pg.cas.read_blob(after) == b"after the restart"
        for oid, data in acknowledged.items():
            assert await pg.cas.read_blob(oid) == data
        assert (await pg.cas.fsck()).ok

    async def test_gc_beside_writers_never_leaves_a_dangling_link(
        self, tmp_path: Path, pg_dsn: str, pg_schema: str
    ) -> None:
        async with open_pg_cas(pg_dsn, schema=pg_schema, freshen_s=0) as cas:
            blobs = [await cas.write_blob(b"old blob %d" % i) for i in range(40)]
            subtrees = [await cas.write_tree([("b", FILE, blob)]) for blob in blobs]
            await _age(pg_dsn, pg_schema, 3600)
            written: list[str] = []
            refused: list[BaseException] = []
            stop = anyio.Event()

            async def writer(n: int) -> None:
                # Trees over old, unreachable subtrees (and through them old blobs): a gc must keep
                # the subtree and its blob for every tree a writer was told is stored.
                i = n
                while not stop.is_set():
                    sub = subtrees[i % len(subtrees)]
                    try:
                        written.append(await cas.write_tree([("d", DIR, sub), ("n", FILE, blobs[i % len(blobs)])]))
                    except ObjectNotFound as exc:
                        refused.append(exc)  # the gc took it first: refused, never dangling
                    i += 7

            sweeps = []
            async with anyio.create_task_group() as tg:
                for n in range(4):
                    tg.start_soon(writer, n)
                for _ in range(15):
                    sweeps.append(await cas.gc([], grace_s=0))
                    await _age(pg_dsn, pg_schema, 3600)
                stop.set()
            assert sum(s.objects_reclaimed for s in sweeps) > 0 and written
            report = await cas.fsck()
            assert report.ok, report
            # One more sweep with nothing written beside it takes everything (no ref, no root, all old).
            await _age(pg_dsn, pg_schema, 3600)
            await cas.gc([], grace_s=0)
            assert (await cas.fsck()).ok

    async def test_the_sweep_keeps_what_was_linked_or_freshened_after_the_mark(
        self, tmp_path: Path, pg_dsn: str, pg_schema: str
    ) -> None:
        async with open_pg_cas(pg_dsn, schema=pg_schema, freshen_s=0) as cas:
            blob = await cas.write_blob(b"deep blob")
            inner = await cas.write_tree([("b", FILE, blob)])
            sub = await cas.write_tree([("i", DIR, inner)])
            touched = await cas.write_blob(b"touched after the mark")
            junk = await cas.write_blob(b"junk")
            await _age(pg_dsn, pg_schema, 3600)
            # The mark: everything is old and unreachable.
            mark = await cas._mark([], 0)
            assert {raw.hex() for raw in mark.doomed} == {blob, inner, sub, touched, junk}
            # Between the mark and the sweep: a new tree links to `sub` (and through it to `inner` and
            # `blob`, which it does not name), and `touched` is looked at.
            top = await cas.write_tree([("s", DIR, sub)])
            assert await cas.has(touched)
            deleted, reclaimed = await cas._sweep(mark.doomed, mark.cutoff_us)
            assert (deleted, reclaimed) == (1, len(b"junk"))
            assert not await cas.has(junk)
            report = await cas.fsck()
            assert report.ok and report.checked == 5, report
            out = tmp_path / "out"
            await cas.restore(top, out)
            assert (out / "s" / "i" / "b").read_bytes() == b"deep blob"

    async def test_a_sweep_in_the_same_batch_as_a_write_keeps_what_the_write_names(
        self, tmp_path: Path, pg_dsn: str, pg_schema: str
    ) -> None:
        from pforge_async.cas.objects import TREE, encode_tree
        from pforge_async.postgres.cas import Gc, PutObjects

        async with open_pg_cas(pg_dsn, schema=pg_schema, freshen_s=0) as cas:
            blob = await cas.write_blob(b"deep")
            sub = await cas.write_tree([("b", FILE, blob)])
            await _age(pg_dsn, pg_schema, 3600)
            mark = await cas._mark([], 0)
            top_body = encode_tree([(b"s", DIR, bytes.fromhex(sub))])
            before = cas._actor.batches
            replies: dict[str, Any] = {}

            async def put() -> None:
                replies["put"] = await cas._actor.call(PutObjects([(TREE, top_body)]))

            async def sweep() -> None:
                replies["gc"] = await cas._actor.call(Gc(mark.doomed, mark.cutoff_us))

            async with anyio.create_task_group() as tg:
                tg.start_soon(put)
                tg.start_soon(sweep)
            assert cas._actor.batches == before + 1  # one batch, one transaction
            assert tuple(replies["gc"]) == (0, 0)
            report = await cas.fsck()
            assert report.ok and report.checked == 3, report


class TestPgLargeBlobs:
    async def test_a_large_blob_is_stored_in_chunks_and_round_trips(self, pg: Backend) -> None:
        cas = pg.cas
        data = os.urandom(CHUNKED_ABOVE + 3 * CHUNK_BYTES + 12345)
        oid = await cas.write_blob(data)
        chunks = await pg.sql(f'SELECT count(*) FROM "{pg.schema}".cas_chunks WHERE oid = $1', bytes.fromhex(oid))
        assert chunks[0][0] == -(-len(data) // CHUNK_BYTES)
        assert await cas.write_blob(data) == oid  # again: nothing more stored
        assert (await pg.sql(f'SELECT count(*) FROM "{pg.schema}".cas_chunks'))[0][0] == chunks[0][0]
        assert await cas.read_blob(oid) == data
        tree = await cas.write_tree([("big.bin", 0o100755, oid), ("small", FILE, await cas.write_blob(b"s"))])
        out = pg.tmp_path / "out"
        await cas.restore(tree, out)
        assert (out / "big.bin").read_bytes() == data and os.access(out / "big.bin", os.X_OK)
        report = await cas.fsck()
        assert report.ok and report.checked == 3
        gitdir = await pg.gitdir()
        git_fsck(gitdir)
        assert git(gitdir, "cat-file", "-s", oid).strip() == str(len(data))
        # The same bytes through a workspace: the same id, found stored, nothing uploaded again.
        work = pg.tmp_path / "work"
        work.mkdir()
        (work / "big.bin").write_bytes(data)
        (work / "big.bin").chmod(0o755)
        (work / "small").write_bytes(b"s")
        assert await cas.snapshot(work) == tree

    async def test_a_damaged_or_missing_chunk_is_named(self, pg: Backend) -> None:
        cas = pg.cas
        data = os.urandom(CHUNKED_ABOVE + 10)
        oid = await cas.write_blob(data)
        tree = await cas.write_tree([("big", FILE, oid)])
        await pg.sql(
            f'UPDATE "{pg.schema}".cas_chunks SET data = set_byte(data, 7, get_byte(data, 7) # 1) '
            "WHERE oid = $1 AND seq = 2",
            bytes.fromhex(oid),
        )
        with pytest.raises(IntegrityError, match=oid):
            await cas.read_blob(oid)
        with pytest.raises(IntegrityError, match=oid):
            await cas.restore(tree, pg.tmp_path / "out")
        assert not any((pg.tmp_path / "out").iterdir())  # the temp file is gone
        with pytest.raises(IntegrityError, match=oid):
            await cas.export_git(pg.tmp_path / "export.git")
        assert (await cas.fsck()).corrupt == [oid]
        await pg.sql(f'DELETE FROM "{pg.schema}".cas_chunks WHERE oid = $1 AND seq = 1', bytes.fromhex(oid))
        with pytest.raises(IntegrityError, match="chunk 1 is missing"):
            await cas.read_blob(oid)
        assert (await cas.fsck()).corrupt == [oid]

    async def test_gc_takes_a_large_blobs_chunks_and_those_of_uploads_cut_short(self, pg: Backend) -> None:
        cas = pg.cas
        gone = await cas.write_blob(os.urandom(CHUNKED_ABOVE + 1))
        kept = await cas.write_blob(os.urandom(CHUNKED_ABOVE + 2))
        # An upload cut short: chunks and no object row.
        from pforge_async.postgres.cas import SealChunked

        await cas._put_chunk(b"\x01" * 32, 0, b"half an upload")
        with pytest.raises(StorageError, match="1 of 5 chunks"):
            await cas._actor.call(SealChunked(b"\x01" * 32, CHUNKED_ABOVE + 1))
        await _age(pg.dsn, pg.schema, 7200)
        await pg.sql(f"UPDATE \"{pg.schema}\".cas_chunks SET touched_at = now() - interval '2 hours'")
        report = await cas.gc([kept], grace_s=3600)
        assert report.objects_reclaimed == 1 and report.bytes_freed == CHUNKED_ABOVE + 1
        left = await pg.sql(f'SELECT DISTINCT oid FROM "{pg.schema}".cas_chunks')
        assert {bytes(r[0]).hex() for r in left} == {kept}
        assert not await cas.has(gone)
        assert (await cas.fsck()).ok

    async def test_a_large_file_snapshots_and_restores_in_bounded_memory(self, pg: Backend) -> None:
        big = pg.tmp_path / "big"
        big.mkdir()
        with open(big / "huge.bin", "wb") as f:
            block = os.urandom(1 << 20)
            for i in range(256):
                f.write(block[i:] + block[:i])
        child = spawn(PG_SNAPSHOT_RESTORE_RSS, pg.dsn, pg.schema, big, pg.tmp_path / "restored")
        (out,) = run_all([child], timeout=600)
        tree, ok, rss_kib = out.split()
        assert ok == "True"
        # 256 MiB through the table: a bounded amount of it in memory at once (chunks of 8 MiB).
        assert int(rss_kib) < 160 * 1024, f"peak RSS {int(rss_kib) // 1024} MiB"
        with open(big / "huge.bin", "rb") as a, open(pg.tmp_path / "restored" / "huge.bin", "rb") as b:
            while chunk := a.read(1 << 24):
                assert b.read(1 << 24) == chunk
        entries = await pg.cas.read_tree(tree)
        assert [e.name for e in entries] == ["huge.bin"]


PG_SNAPSHOT_RESTORE_RSS = (
    (
        "def peak_rss_kib():\n"
        "    with open('/proc/self/status') as f:\n"
        "        return next(int(line.split()[1]) for line in f if line.startswith('VmHWM:'))\n"
    )
    + """
import sys, anyio
from pforge_async.postgres.cas import open_pg_cas
async def main():
    async with open_pg_cas(sys.argv[1], schema=sys.argv[2]) as cas:
        tree = await cas.snapshot(sys.argv[3])
        ok = (await cas.fsck()).ok
        await cas.restore(tree, sys.argv[4])
    print(tree, ok, peak_rss_kib())
anyio.run(main)
"""
)


class TestPgWorkspaceBoundary:
    """tests/test_cas_workspace.py's racing processes against PgCas: the same scan and restore code,
    reading and writing the table instead of packs, with the same guarantees."""

    async def test_directories_swapped_for_symlinks_never_leak_outside_files(self, pg: Backend) -> None:
        outside, marker = make_outside(pg.tmp_path)
        work = pg.tmp_path / "work"
        names = [f"sub{i}" for i in range(8)]
        for name in names:
            (work / name / "inner").mkdir(parents=True)
            for j in range(10):
                (work / name / f"f{j}.txt").write_text(f"{name} file {j}\n")
            (work / name / "inner" / "deep.txt").write_text(f"{name} deep\n")
        trees: set[str] = set()
        racer = Racer("dirs", work, outside, names)
        try:
            end = time.monotonic() + RACE_S
            # Two differing snapshots at least, however loaded the machine (then RACE_S is a minimum).
            while time.monotonic() < end or (len(trees) < 2 and time.monotonic() < end + 60):
                with anyio.fail_after(CALL_BOUND_S):
                    trees.add(await pg.cas.snapshot(work))
        finally:
            swaps = racer.stop()
        assert swaps > 100, f"the racer made only {swaps} swaps"
        seen: set[str] = set()
        for tree in trees:
            for path, data in await blobs_of(pg.cas, tree, seen):
                assert marker not in data, f"snapshot {tree} holds {path}, read from outside the workspace"
        final = await pg.cas.snapshot(work)
        paths = {e.name for e in await pg.cas.read_tree(final, recursive=True)}
        assert {f"{n}/f{j}.txt" for n in names for j in range(10)} <= paths
        assert len(trees) > 1

    async def test_files_swapped_for_fifos_never_block(self, pg: Backend) -> None:
        outside, _marker = make_outside(pg.tmp_path)
        work = pg.tmp_path / "work"
        (work / "d").mkdir(parents=True)
        names = ["f0.txt", "d/g0.txt", "big.bin"]
        for name in [*names, "f1.txt"]:
            (work / name).write_bytes(name.encode() * 100)
        (work / "big.bin").write_bytes(os.urandom((1 << 20) + 5))
        os.mkfifo(work / "static-fifo")
        count = 0
        racer = Racer("fifos", work, outside, names)
        try:
            end = time.monotonic() + RACE_S
            # Four snapshots at least, however loaded the machine (then RACE_S is a minimum).
            while time.monotonic() < end or (count < 4 and time.monotonic() < end + 60):
                with anyio.fail_after(CALL_BOUND_S):
                    tree = await pg.cas.snapshot(work)
                count += 1
        finally:
            swaps = racer.stop()
        assert swaps > 100 and count > 3
        assert "static-fifo" not in {e.name for e in await pg.cas.read_tree(tree, recursive=True)}
        final = {e.name for e in await pg.cas.read_tree(await pg.cas.snapshot(work), recursive=True)}
        assert {*names, "f1.txt"} <= final

    async def test_target_directories_swapped_for_symlinks_never_send_writes_outside(self, pg: Backend) -> None:
        outside, _marker = make_outside(pg.tmp_path)
        before = outside_state(outside)
        source = pg.tmp_path / "source"
        expected: dict[str, bytes] = {}
        for i in range(4):
            for j in range(3):
                for k in range(8):
                    rel = f"d{i}/s{j}/f{k}.txt"
                    expected[f"f{k}.txt"] = f"file {k}\n".encode() * 50
                    (source / rel).parent.mkdir(parents=True, exist_ok=True)
                    (source / rel).write_bytes(expected[f"f{k}.txt"])
            (source / f"d{i}" / "link").symlink_to("../elsewhere")
        base = pg.tmp_path / "targets"
        base.mkdir()
        restored = failed = 0
        tree = await pg.cas.snapshot(source)
        racer = Racer("restore", base, outside)
        try:
            end = time.monotonic() + RACE_S
            # At least 4 restores however loaded the machine is (a restore from the table is slower).
            while time.monotonic() < end or (restored + failed < 4 and time.monotonic() < end + 60):
                target = base / f"t{restored + failed}"
                try:
                    with anyio.fail_after(CALL_BOUND_S):
                        await pg.cas.restore(tree, target)
                    restored += 1
                except StorageError:
                    failed += 1
        finally:
            swaps = racer.stop()
        # Fewer than on the file CAS: a restore from the table takes longer, so fewer targets to swap.
        assert swaps > 5, f"the racer made only {swaps} swaps"
        assert outside_state(outside) == before, "a restore wrote outside its target"
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                path = Path(dirpath) / name
                if path.is_symlink():
                    continue
                assert not name.startswith(".pforge-restore-"), f"temp file {path} left behind"
                assert path.read_bytes() == expected[name], f"{path} is partly written"
        assert restored + failed > 3

    async def test_calls_after_close_raise_actor_closed(self, tmp_path: Path, pg_dsn: str, pg_schema: str) -> None:
        async with open_pg_cas(pg_dsn, schema=pg_schema) as cas:
            blob = await cas.write_blob(b"x")
        for call in (
            lambda: cas.write_blob(b"y"),
            lambda: cas.read_blob(blob),
            lambda: cas.has(blob),
            lambda: cas.fsck(),
            lambda: cas.snapshot(tmp_path),
            lambda: cas.get_ref("refs/heads/main"),
        ):
            with pytest.raises(ActorClosed):
                await call()


async def _age(dsn: str, schema: str, seconds: int) -> None:
    """Make every object look written ``seconds`` ago (past any grace and the sweep's margin)."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'UPDATE "{schema}".cas_objects SET touched_at = now() - make_interval(secs => $1)', seconds)
    finally:
        await conn.close()


SNAPSHOT_FOREVER = """
import sys, anyio
from pforge_async.postgres.cas import open_pg_cas
async def main():
    async with open_pg_cas(sys.argv[1], schema=sys.argv[2]) as cas:
        n = 0
        while True:
            n += 1
            tree = await cas.snapshot(sys.argv[3])
            await cas.write_blob(b"marker %d" % n * 1000)
            print("snap", tree, flush=True)
anyio.run(main)
"""


async def _write_range(cas: Any, indexes: range) -> None:
    for i in indexes:
        await cas.write_blob(b"shared %d" % i * 50)


WRITE_SHARED_AND_OWN = """
import sys, anyio
from pforge_async.postgres.cas import open_pg_cas
async def main():
    async with open_pg_cas(sys.argv[1], schema=sys.argv[2]) as cas:
        async def shared(t):
            for i in range(t, 300, 8):
                await cas.write_blob(b"shared %d" % i * 50)
        async def own(t):
            for i in range(t, 100, 8):
                await cas.write_blob(b"own %s %d" % (sys.argv[3].encode(), i))
        async with anyio.create_task_group() as tg:
            for t in range(8):
                tg.start_soon(shared, t)
                tg.start_soon(own, t)
    print("done", flush=True)
anyio.run(main)
"""

RACE_REF = """
import sys, anyio
from pforge_async import RefConflict
from pforge_async.postgres.cas import open_pg_cas
async def main():
    async with open_pg_cas(sys.argv[1], schema=sys.argv[2]) as cas:
        tree = await cas.write_tree([])
        mine = await cas.write_commit(tree, message=sys.argv[3], timestamp=0)
        print("ready", flush=True)
        sys.stdin.readline()
        try:
            await cas.update_ref("refs/heads/race", mine, expected=sys.argv[4])
            print("won", mine, flush=True)
        except RefConflict:
            print("lost", flush=True)
anyio.run(main)
"""


# -- the private stat-cache directory ---------------------------------------------------------------


def test_private_cache_dirs_outlive_no_killed_owner(tmp_path: Path) -> None:
    """Each store given no ``cache_dir`` gets a directory under one per-user parent, named after its
    owner process: a new one removes those whose owner is gone (SIGKILLed, or its pid now another
    process's), keeps those of live owners, and touches nothing else there."""
    import sys

    from pforge_async.postgres.cachedir import private_cache_dir

    code = (
        "import sys, time\nfrom pforge_async.postgres.cachedir import private_cache_dir\n"
        "print(private_cache_dir(sys.argv[1]), flush=True)\ntime.sleep(600)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        left = Path(child.stdout.readline().strip())
        parent = left.parent
        assert parent == tmp_path / f"pforge-pgcas-cache-{os.getuid()}" and (parent.stat().st_mode & 0o777) == 0o700
        (left / "cache").write_bytes(b"x")
        mine = Path(private_cache_dir(str(tmp_path)))
        assert left.is_dir() and mine.is_dir() and mine.parent == parent  # its owner lives: kept
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    reused = parent / f"{os.getpid()}-1-abc"  # this pid, but a process that started at another time
    reused.mkdir()
    unrelated = parent / "notes"
    unrelated.mkdir()
    other = Path(private_cache_dir(str(tmp_path)))
    assert not left.exists() and not reused.exists()
    assert mine.is_dir() and other.is_dir() and unrelated.is_dir() and mine != other


def test_an_untrusted_cache_parent_is_not_shared(tmp_path: Path) -> None:
    """A parent others may write to (or not a directory) is not used: a private directory beside it."""
    from pforge_async.postgres.cachedir import private_cache_dir

    parent = tmp_path / f"pforge-pgcas-cache-{os.getuid()}"
    parent.mkdir(mode=0o777)
    parent.chmod(0o777)
    made = Path(private_cache_dir(str(tmp_path)))
    assert made.parent == tmp_path and made.is_dir() and (made.stat().st_mode & 0o077) == 0
    assert list(parent.iterdir()) == []


async def test_a_store_without_cache_dir_removes_its_own_at_close(
    tmp_path: Path, pg_dsn: str, pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    async with open_store(f"{pg_dsn}?schema={pg_schema}") as store:
        ws = tmp_path / "ws"
        ws.mkdir()
        (ws / "f").write_text("hello")
        tree = await store.cas.snapshot(ws)
        assert [e.name for e in await store.cas.read_tree(tree)] == ["f"]
        made = [p for p in (tmp_path / f"pforge-pgcas-cache-{os.getuid()}").iterdir()]
        assert len(made) == 1 and made[0].name.startswith(f"{os.getpid()}-")
    assert not made[0].exists()
