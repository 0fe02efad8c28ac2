from __future__ import annotations

import os
import signal
import subprocess
import time
import zlib
from pathlib import Path

import anyio
import pytest

from pforge_async import (
    IntegrityError,
    InvalidInput,
    ObjectNotFound,
    RefConflict,
    open_store,
)
from pforge_async.cas import EMPTY_TREE, TreeEntry
from pforge_async.cas import actor as cas_actor
from pforge_async.cas.snapshot import RACY_NS, SnapshotPlan

from ._procs import run_all, spawn, wait_for_line

pytestmark = pytest.mark.anyio


def git(gitdir: Path, *args: str, input: bytes | None = None) -> str:
    proc = subprocess.run(["git", f"--git-dir={gitdir}", *args], input=input, capture_output=True, check=False)
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode("utf-8", "surrogateescape")


def git_fsck(gitdir: Path) -> None:
    proc = subprocess.run(
        ["git", f"--git-dir={gitdir}", "fsck", "--strict", "--no-dangling"],
        capture_output=True,
        text=True,
        check=False,
    )
    problems = [line for line in proc.stderr.splitlines() if not line.startswith("notice:")]
    assert proc.returncode == 0 and not problems, proc.stdout + proc.stderr


def make_workspace(root: Path) -> None:
    (root / "src" / "pkg").mkdir(parents=True)
    (root / "src" / "pkg" / "mod.py").write_text("print('hi')\n")
    (root / "src" / "main.py").write_text("import pkg\n" * 100)
    (root / "run.sh").write_text("#!/bin/sh\necho run\n")
    (root / "run.sh").chmod(0o755)
    (root / "empty.txt").write_bytes(b"")
    (root / "données-é.txt").write_text("non-ascii name\n")
    (root / "bin.dat").write_bytes(bytes(range(256)) * 40)
    (root / "link").symlink_to("src/main.py")
    (root / "dangling").symlink_to("../nowhere")
    (root / "emptydir").mkdir()
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref: refs/heads/x\n")
    (root / "a-dir").mkdir()
    (root / "a-dir" / "x").write_text("x")
    (root / "a-dir.txt").write_text("sorts before a-dir/ in git's order")


def tree_listing(root: Path) -> dict[str, tuple[str, object]]:
    """What a snapshot must reproduce: each file's bytes and exec bit, each symlink's target."""
    out: dict[str, tuple[str, object]] = {}
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d != ".git"]
        for name in dirs + files:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = ("link", os.readlink(path))
            elif path.is_file():
                out[rel] = ("file", (path.read_bytes(), os.access(path, os.X_OK)))
    return out


class TestGitCompatibility:
    async def test_git_reads_and_verifies_what_we_write(self, tmp_path: Path) -> None:
        async with open_store(tmp_path / ".pforge") as store:
            cas = store.cas
            blob = await cas.write_blob(b"hello world\n")
            exe = await cas.write_blob(b"#!/bin/sh\n")
            tree = await cas.write_tree(
                [("README", "100644", blob), ("bin/run", 0o100755, exe), ("bin/link", "120000", blob)]
            )
            first = await cas.write_commit(tree, message="first", timestamp=1_700_000_000)
            second = await cas.write_commit(
                tree,
                [first],
                message="second\n\nbody",
                author="Agent <agent@example.com>",
                timestamp=1_700_000_100,
                metadata={"Run-Id": "r-1", "Tree-Sha": tree},
            )
            await cas.update_ref("refs/heads/main", second)
        gitdir = tmp_path / ".pforge" / "cas"
        assert (gitdir / "config").read_text().count("objectformat = sha256") == 1
        git_fsck(gitdir)
        assert git(gitdir, "cat-file", "-p", blob) == "hello world\n"
        assert git(gitdir, "cat-file", "-t", tree) == "tree\n"
        listing = git(gitdir, "cat-file", "-p", tree)
        assert f"100644 blob {blob}\tREADME" in listing
        assert "040000 tree" in listing and "\tbin" in listing
        log = git(gitdir, "log", "--format=%H %an %s", "main")
        assert log.splitlines() == [f"{second} Agent second", f"{first} pforge first"]
        trailers = git(gitdir, "log", "-1", "--format=%(trailers:key=Run-Id,valueonly)", "main")
        assert trailers.strip() == "r-1"
        assert git(gitdir, "rev-parse", "HEAD").strip() == second

    async def test_we_read_what_git_writes(self, tmp_path: Path) -> None:
        async with open_store(tmp_path / ".pforge") as store:
            gitdir = store.cas.path
            oid = git(gitdir, "hash-object", "-w", "--stdin", input=b"written by git\n").strip()
            assert await store.cas.read_blob(oid) == b"written by git\n"

    async def test_snapshot_ids_equal_gits_own_tree_ids(self, tmp_path: Path) -> None:
        work = tmp_path / "work"
        make_workspace(work)
        async with open_store(tmp_path / ".pforge") as store:
            ours = await store.cas.snapshot(work)
        scratch = tmp_path / "scratch.git"
        subprocess.run(["git", "init", "-q", "--bare", "--object-format=sha256", str(scratch)], check=True)
        git(scratch, f"--work-tree={work}", "add", "-A")
        assert git(scratch, f"--work-tree={work}", "write-tree").strip() == ours

    async def test_objects_stay_readable_after_git_repacks_them(self, tmp_path: Path) -> None:
        async with open_store(tmp_path / ".pforge") as store:
            base = b"line of text\n" * 500
            blobs = [await store.cas.write_blob(base + b"variant %d\n" % i) for i in range(20)]
            tree = await store.cas.write_tree([(f"f{i}", "100644", b) for i, b in enumerate(blobs)])
            commit = await store.cas.write_commit(tree, message="keep")
            await store.cas.update_ref("refs/heads/main", commit)
            git(store.cas.path, "repack", "-a", "-d", "-f", "--depth=10")  # deltas now
            git_fsck(store.cas.path)
        async with open_store(tmp_path / ".pforge") as store:
            for i, oid in enumerate(blobs):
                assert await store.cas.read_blob(oid) == base + b"variant %d\n" % i
            assert (await store.cas.fsck()).ok


class TestObjects:
    async def test_round_trips(self, tmp_path: Path) -> None:
        async with open_store(tmp_path / ".pforge") as store:
            cas = store.cas
            for data in (b"", b"x", bytes(range(256)) * 1000):
                assert await cas.read_blob(await cas.write_blob(data)) == data
            a = await cas.write_blob(b"a")
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
            assert (got.tree, got.parents, got.message, got.metadata, got.timestamp) == (
                tree,
                (),
                "m",
                {"K": "v"},
                5,
            )
            assert await cas.get_ref("refs/heads/nothing") is None

    async def test_writing_an_object_twice_stores_it_once(self, tmp_path: Path) -> None:
        async with open_store(tmp_path / ".pforge") as store:
            first = await store.cas.write_blob(b"same")
            before = (await store.cas.fsck()).checked
            assert await store.cas.write_blob(b"same") == first
            assert (await store.cas.fsck()).checked == before

    async def test_ref_compare_and_swap(self, tmp_path: Path) -> None:
        async with open_store(tmp_path / ".pforge") as store:
            cas = store.cas
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


@pytest.fixture(params=[True, False], ids=["watched", "stat-cache-only"])
def watch(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


class TestSnapshots:
    async def test_snapshot_then_restore_reproduces_the_workspace(self, tmp_path: Path, watch: bool) -> None:
        work = tmp_path / "work"
        make_workspace(work)
        # the store inside the workspace
        async with open_store(work / ".pforge", watch_workspaces=watch) as store:
            tree = await store.cas.snapshot(work)
            names = {e.name for e in await store.cas.read_tree(tree, recursive=True)}
            assert ".pforge" not in {n.split("/")[0] for n in names}
            assert not any(n.startswith(".git") for n in names)
            assert "emptydir" not in names
            out = tmp_path / "restored"
            await store.cas.restore(tree, out)
        expected = tree_listing(work)
        expected = {k: v for k, v in expected.items() if not k.startswith(".pforge")}
        assert tree_listing(out) == expected
        assert os.readlink(out / "dangling") == "../nowhere"
        assert (out / "run.sh").stat().st_mode & 0o111

    async def test_same_content_gives_the_same_id_anywhere(self, tmp_path: Path, watch: bool) -> None:
        make_workspace(tmp_path / "one")
        make_workspace(tmp_path / "two")
        async with open_store(tmp_path / ".pforge", watch_workspaces=watch) as store:
            first = await store.cas.snapshot(tmp_path / "one")
            assert await store.cas.snapshot(tmp_path / "one") == first
            assert await store.cas.snapshot(tmp_path / "two") == first
        async with open_store(tmp_path / ".other") as store:
            assert await store.cas.snapshot(tmp_path / "one") == first

    async def test_a_change_is_seen_even_right_after_a_snapshot(self, tmp_path: Path, watch: bool) -> None:
        work = tmp_path / "work"
        make_workspace(work)
        target = work / "src" / "main.py"
        async with open_store(tmp_path / ".pforge", watch_workspaces=watch) as store:
            before = await store.cas.snapshot(work)
            # Same size, written at once: the racily-clean case a naive stat cache misses.
            stamp = target.stat()
            target.write_text("import pkX\n" * 100)
            os.utime(target, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
            after = await store.cas.snapshot(work)
            assert after != before
            entries = {e.name: e.oid for e in await store.cas.read_tree(after, recursive=True)}
            assert await store.cas.read_blob(entries["src/main.py"]) == b"import pkX\n" * 100
            (work / "run.sh").chmod(0o644)
            assert await store.cas.snapshot(work) != after
            (work / "src" / "pkg" / "mod.py").unlink()
            again = await store.cas.snapshot(work)
            names = {e.name for e in await store.cas.read_tree(again, recursive=True)}
            assert "src/pkg/mod.py" not in names
            (work / "src" / "new" / "deeper").mkdir(parents=True)
            (work / "src" / "new" / "deeper" / "n.txt").write_text("new")
            newer = await store.cas.snapshot(work)
            names = {e.name for e in await store.cas.read_tree(newer, recursive=True)}
            assert "src/new/deeper/n.txt" in names
            (work / "src" / "new" / "deeper" / "n.txt").write_text("new, changed")
            newest = await store.cas.snapshot(work)
            entries = {e.name: e.oid for e in await store.cas.read_tree(newest, recursive=True)}
            assert await store.cas.read_blob(entries["src/new/deeper/n.txt"]) == b"new, changed"

    async def test_an_unchanged_workspace_is_answered_by_the_watch(self, tmp_path: Path) -> None:
        work = tmp_path / "work"
        make_workspace(work)
        async with open_store(work / ".pforge") as store:  # the store's own writes are no change
            first = await store.cas.snapshot(work)
            await store.cas.write_blob(b"store activity inside the workspace")
            assert await store.cas.snapshot(work) == first
            assert (store.cas.snapshots_scanned, store.cas.snapshots_unchanged) == (1, 1)
            (work / ".git" / "HEAD").write_text("ref: refs/heads/y\n")  # excluded as well
            assert await store.cas.snapshot(work) == first
            assert store.cas.snapshots_unchanged == 2
            (work / "src" / "pkg" / "mod.py").write_text("print('changed')\n")
            assert await store.cas.snapshot(work) != first
            assert store.cas.snapshots_scanned == 2

    async def test_the_stat_cache_survives_reopening(self, tmp_path: Path) -> None:
        # A new process has no watch: the stat cache answers, and must agree.
        work = tmp_path / "work"
        make_workspace(work)
        async with open_store(tmp_path / ".pforge") as store:
            first = await store.cas.snapshot(work)
        async with open_store(tmp_path / ".pforge") as store:
            assert await store.cas.snapshot(work) == first

    async def test_the_stat_cache_answers_from_memory_and_is_written_late(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The cache file is written after the reply: at once the first time, then coalesced (here
        never within the run), and at close. Meanwhile the memory answers: an unchanged file is not
        read again although the file on disk is stale."""
        monkeypatch.setattr(cas_actor, "WRITE_INTERVAL_S", 3600.0)
        reads: list[bytes] = []
        store_file = SnapshotPlan._store_file

        def counted(plan: SnapshotPlan, sink: object, dir_fd: int, name: bytes, rel: bytes) -> object:
            reads.append(rel)
            return store_file(plan, sink, dir_fd, name, rel)  # type: ignore[arg-type]

        monkeypatch.setattr(SnapshotPlan, "_store_file", counted)
        work = tmp_path / "work"
        make_workspace(work)
        await _settle()
        cache_dir = tmp_path / ".pforge" / "cache"
        async with open_store(tmp_path / ".pforge", watch_workspaces=False) as store:
            actor = store.cas._actor
            assert isinstance(actor, cas_actor.CasActor)
            first = await store.cas.snapshot(work)
            await store.cas.write_blob(b"a round trip: the cache write queued before it has run")
            assert actor.stat_caches.written == 1
            (cached,) = cache_dir.iterdir()
            on_disk = cached.read_bytes()
            files = len(reads)
            assert files >= 4
            trees = [first]
            for n in range(5):
                (work / f"new{n}.txt").write_text(f"{n}\n")
                await _settle()
                trees.append(await store.cas.snapshot(work))
            assert len(set(trees)) == 6
            # Each new file read once; none of the others again, the file on disk unchanged.
            assert sorted(reads[files:]) == [f"new{n}.txt".encode() for n in range(5)]
            assert actor.stat_caches.written == 1 and cached.read_bytes() == on_disk
        assert cached.read_bytes() != on_disk  # written at close
        reads.clear()
        async with open_store(tmp_path / ".pforge", watch_workspaces=False) as store:
            assert await store.cas.snapshot(work) == trees[-1]
        assert reads == []  # a new process: the file answered everything

    async def test_a_stale_cache_file_costs_a_rescan_never_a_wrong_tree(self, tmp_path: Path) -> None:
        """A process killed before it wrote its latest cache leaves the file of an older snapshot: the
        next one re-reads what changed since, and its tree is the tree a store with no cache makes."""
        work = tmp_path / "work"
        make_workspace(work)
        await _settle()
        child = spawn(STALE_CACHE_THEN_EXIT, tmp_path / ".pforge", work)
        (out,) = run_all([child])
        assert out.split() == ["1"]  # the first cache written, the second not
        async with open_store(tmp_path / ".pforge", watch_workspaces=False) as store:
            seen = await store.cas.snapshot(work)
        async with open_store(tmp_path / ".fresh", watch_workspaces=False) as fresh:
            truth = await fresh.cas.snapshot(work)
            names = {e.name: e.oid for e in await fresh.cas.read_tree(truth, recursive=True)}
            assert await fresh.cas.read_blob(names["src/main.py"]) == b"changed!!!\n" * 100
        assert seen == truth

    async def test_restore_refuses_a_non_empty_target(self, tmp_path: Path) -> None:
        (tmp_path / "busy").mkdir()
        (tmp_path / "busy" / "keep.txt").write_text("mine")
        async with open_store(tmp_path / ".pforge") as store:
            tree = await store.cas.write_tree([])
            with pytest.raises(InvalidInput, match="not empty"):
                await store.cas.restore(tree, tmp_path / "busy")
        assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"

    async def test_a_1gib_file_snapshots_in_bounded_memory(self, tmp_path: Path) -> None:
        big = tmp_path / "big"
        big.mkdir()
        with open(big / "huge.bin", "wb") as f:
            block = os.urandom(1 << 20)
            for i in range(1024):
                f.write(block[i:] + block[:i])
        child = spawn(SNAPSHOT_AND_REPORT_RSS, tmp_path / ".pforge", big)
        (out,) = run_all([child], timeout=300)
        tree, rss_kib = out.split()
        assert int(rss_kib) < 100 * 1024, f"snapshot peak RSS {int(rss_kib) // 1024} MiB"
        # Verifying and restoring it stream as well.
        child = spawn(RESTORE_AND_REPORT_RSS, tmp_path / ".pforge", tree, tmp_path / "restored")
        (out,) = run_all([child], timeout=300)
        entries, ok, rss_kib = out.split()
        assert (entries, ok) == ("huge.bin", "True")
        assert int(rss_kib) < 100 * 1024, f"fsck + restore peak RSS {int(rss_kib) // 1024} MiB"
        with open(big / "huge.bin", "rb") as a, open(tmp_path / "restored" / "huge.bin", "rb") as b:
            while chunk := a.read(1 << 24):
                assert b.read(1 << 24) == chunk


async def _settle() -> None:
    """Wait out a snapshot's racy window: files written before are old enough for the stat cache
    to hold them (their ctime, which nothing can set back, included)."""
    await anyio.sleep(2 * RACY_NS / 1e9)


STALE_CACHE_THEN_EXIT = """
import os, sys, time, anyio
from pathlib import Path
from pforge_async import open_store
from pforge_async.cas import actor as cas_actor
cas_actor.WRITE_INTERVAL_S = 3600.0
work = Path(sys.argv[2])
async def main():
    async with open_store(sys.argv[1], watch_workspaces=False) as store:
        await store.cas.snapshot(work)
        await store.cas.write_blob(b"sync")
        main_py = work / "src" / "main.py"
        main_py.write_text("changed!!!\\n" * 100)  # the same size
        time.sleep(0.1)  # past the racy window: this snapshot's cache would hold it
        await store.cas.snapshot(work)
        await store.cas.write_blob(b"sync")
        print(store.cas._actor.stat_caches.written, flush=True)
        os._exit(0)  # killed: the second snapshot's cache is never written
anyio.run(main)
"""


# The child's own peak RSS is VmHWM of its address space. ``ru_maxrss`` would not do: when the
# child is started with vfork, exec carries the parent's (pytest's) high-water mark into it.
_PEAK_RSS_KIB = (
    "def peak_rss_kib():\n"
    "    with open('/proc/self/status') as f:\n"
    "        return next(int(line.split()[1]) for line in f if line.startswith('VmHWM:'))\n"
)

SNAPSHOT_AND_REPORT_RSS = (
    _PEAK_RSS_KIB
    + """
import sys, anyio
from pforge_async import open_store
async def main():
    async with open_store(sys.argv[1], durability="normal") as store:
        tree = await store.cas.snapshot(sys.argv[2])
    print(tree, peak_rss_kib())
anyio.run(main)
"""
)

RESTORE_AND_REPORT_RSS = (
    _PEAK_RSS_KIB
    + """
import sys, anyio
from pforge_async import open_store
async def main():
    async with open_store(sys.argv[1], durability="normal") as store:
        entries = [e.name for e in await store.cas.read_tree(sys.argv[2])]
        ok = (await store.cas.fsck()).ok
        await store.cas.restore(sys.argv[2], sys.argv[3])
    print(",".join(entries), ok, peak_rss_kib())
anyio.run(main)
"""
)

WRITE_BLOBS = """
import sys, anyio
from pforge_async import open_store
async def main():
    async with open_store(sys.argv[1]) as store:
        async with anyio.create_task_group() as tg:
            for i in range(200):
                tg.start_soon(store.cas.write_blob, b"shared object %d" % i * 100)
        print("done", flush=True)
anyio.run(main)
"""

RACE_REF = """
import sys, anyio
from pforge_async import open_store, RefConflict
async def main():
    async with open_store(sys.argv[1]) as store:
        tree = await store.cas.write_tree([])
        mine = await store.cas.write_commit(tree, message=sys.argv[2], timestamp=0)
        print("ready", flush=True)
        sys.stdin.readline()
        try:
            await store.cas.update_ref("refs/heads/race", mine, expected=sys.argv[3])
            print("won", mine, flush=True)
        except RefConflict:
            print("lost", flush=True)
anyio.run(main)
"""

SNAPSHOT_FOREVER = """
import sys, anyio
from pforge_async import open_store
async def main():
    async with open_store(sys.argv[1]) as store:
        n = 0
        while True:
            n += 1
            tree = await store.cas.snapshot(sys.argv[2])
            await store.cas.write_blob(b"marker %d" % n * 1000)
            print("snap", tree, flush=True)
anyio.run(main)
"""


class TestConcurrency:
    async def test_64_tasks_writing_overlapping_blobs(self, tmp_path: Path) -> None:
        async with open_store(tmp_path / ".pforge") as store:
            results: dict[int, list[str]] = {}

            async def writer(n: int) -> None:
                results[n] = [await store.cas.write_blob(b"blob %d" % (i % 16)) for i in range(n, n + 16)]

            async with anyio.create_task_group() as tg:
                for n in range(64):
                    tg.start_soon(writer, n)
            distinct = {oid for oids in results.values() for oid in oids}
            assert len(distinct) == 16
            for oid in distinct:
                assert (await store.cas.read_blob(oid)).startswith(b"blob ")
            report = await store.cas.fsck()
            assert report.ok and report.checked == 16
        git_fsck(tmp_path / ".pforge" / "cas")

    async def test_two_processes_writing_the_same_objects(self, tmp_path: Path) -> None:
        root = tmp_path / ".pforge"
        async with open_store(root):
            pass
        run_all([spawn(WRITE_BLOBS, root) for _ in range(2)])
        async with open_store(root) as store:
            report = await store.cas.fsck()
            assert report.ok and report.checked >= 200
            for i in range(200):
                oid = await store.cas.write_blob(b"shared object %d" % i * 100)
                assert await store.cas.read_blob(oid) == b"shared object %d" % i * 100
        git_fsck(root / "cas")

    async def test_two_processes_racing_a_ref_update_have_one_winner(self, tmp_path: Path) -> None:
        root = tmp_path / ".pforge"
        async with open_store(root) as store:
            tree = await store.cas.write_tree([])
            base = await store.cas.write_commit(tree, message="base", timestamp=0)
            await store.cas.update_ref("refs/heads/race", base)
        for _round in range(3):
            procs = [spawn(RACE_REF, root, f"p{i}", base, stdin=subprocess.PIPE) for i in range(2)]
            for p in procs:
                wait_for_line(p, "ready")
            for p in procs:  # release both at once
                assert p.stdin is not None
                p.stdin.write("go\n")
                p.stdin.flush()
            results = [p.communicate(timeout=60)[0] for p in procs]
            winners = [r for r in results if r.startswith("won")]
            assert len(winners) == 1, results
            async with open_store(root) as store:
                assert await store.cas.get_ref("refs/heads/race") == winners[0].split()[1]
                await store.cas.update_ref("refs/heads/race", base)


class TestCrashAndCorruption:
    async def test_sigkill_mid_snapshot_leaves_a_verifiable_store(self, tmp_path: Path) -> None:
        work = tmp_path / "work"
        for d in range(20):
            (work / f"d{d}").mkdir(parents=True)
            for f in range(100):
                (work / f"d{d}" / f"f{f}").write_bytes(os.urandom(2048))
        root = tmp_path / ".pforge"
        child = spawn(SNAPSHOT_FOREVER, root, work)
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line.startswith("snap"), child.stderr.read() if child.stderr else ""
        # Touch files so every snapshot does real work, then kill it in the middle of one.
        for f in range(0, 100, 3):
            (work / "d0" / f"f{f}").write_bytes(os.urandom(2048))
        time.sleep(0.05 + (time.monotonic() % 0.1))
        child.send_signal(signal.SIGKILL)
        child.wait()
        async with open_store(root) as store:
            report = await store.cas.fsck()
            assert report.ok, report
            acknowledged = line.split()[1]
            assert len(await store.cas.read_tree(acknowledged, recursive=True)) == 2000
            assert (await store.check()).ok
        leftovers = [p for p in (root / "cas" / "objects").rglob("tmp_*")]
        assert leftovers == []
        git_fsck(root / "cas")

    async def test_a_flipped_byte_is_caught_on_read_and_by_fsck(self, tmp_path: Path) -> None:
        async with open_store(tmp_path / ".pforge") as store:
            packed = await store.cas.write_blob(b"packed payload " * 10)
            other = await store.cas.write_blob(b"an innocent neighbour")
        pack = next((tmp_path / ".pforge" / "cas" / "objects" / "pack").glob("*.pack"))
        data = bytearray(pack.read_bytes())
        at = data.index(b"packed payload")
        data[at] ^= 0x01
        pack.chmod(0o644)
        pack.write_bytes(bytes(data))
        async with open_store(tmp_path / ".pforge") as store:
            with pytest.raises(IntegrityError, match=packed):
                await store.cas.read_blob(packed)
            report = await store.cas.fsck()
            assert report.corrupt == [packed]
            # nothing else is lost, and the store still writes
            assert await store.cas.read_blob(other) == b"an innocent neighbour"
            assert await store.cas.read_blob(await store.cas.write_blob(b"new")) == b"new"

    async def test_a_corrupt_loose_object_is_caught(self, tmp_path: Path) -> None:
        async with open_store(tmp_path / ".pforge") as store:
            oid = git(store.cas.path, "hash-object", "-w", "--stdin", input=b"loose one\n").strip()
        path = tmp_path / ".pforge" / "cas" / "objects" / oid[:2] / oid[2:]
        path.chmod(0o644)
        path.write_bytes(zlib.compress(b"blob 10\0loose onE\n"))
        async with open_store(tmp_path / ".pforge") as store:
            with pytest.raises(IntegrityError, match=oid):
                await store.cas.read_blob(oid)
            assert (await store.cas.fsck()).corrupt == [oid]

    async def test_crash_leftovers_are_cleaned_at_open(self, tmp_path: Path) -> None:
        root = tmp_path / ".pforge"
        async with open_store(root):
            pass
        objects = root / "cas" / "objects"
        stale = objects / "tmp_obj_999999999_deadbeef"
        stale.write_bytes(b"half an object")
        stale_pack = objects / "pack" / "tmp_pack_999999999_deadbeef.pack"
        stale_pack.write_bytes(b"PACK half")
        live = objects / f"tmp_obj_{os.getpid()}_cafe"
        live.write_bytes(b"a live writer's")
        async with open_store(root) as store:
            assert (await store.cas.fsck()).ok
        assert not stale.exists() and not stale_pack.exists()
        assert live.exists()


class TestBadInput:
    @pytest.mark.parametrize(
        "oid",
        ["../../etc/passwd", "A" * 64, "a" * 63, "a" * 65, "g" * 64, "", None, 42, "a" * 62 + "/x"],
    )
    async def test_malformed_oids_are_rejected_before_any_path(self, tmp_path: Path, oid: object) -> None:
        async with open_store(tmp_path / ".pforge") as store:
            with pytest.raises(InvalidInput, match="invalid object id"):
                await store.cas.read_blob(oid)  # type: ignore[arg-type]
            with pytest.raises(InvalidInput):
                await store.cas.read_tree(oid)  # type: ignore[arg-type]
            with pytest.raises(InvalidInput):
                await store.cas.restore(oid, tmp_path / "out")  # type: ignore[arg-type]
        assert not (tmp_path / "out").exists()

    @pytest.mark.parametrize(
        ("path", "mode", "match"),
        [
            ("", "100644", "bad component"),
            (".", "100644", "bad component"),
            ("..", "100644", "bad component"),
            ("a/../b", "100644", "bad component"),
            ("a//b", "100644", "bad component"),
            ("/abs", "100644", "bad component"),
            (".git", "100644", "bad component"),
            ("ok", "040000", "unknown tree entry mode"),
            ("ok", "100664", "unknown tree entry mode"),
            ("ok", 0o777, "unknown tree entry mode"),
        ],
    )
    async def test_bad_tree_entries(self, tmp_path: Path, path: str, mode: object, match: str) -> None:
        async with open_store(tmp_path / ".pforge") as store:
            blob = await store.cas.write_blob(b"x")
            with pytest.raises(InvalidInput, match=match):
                await store.cas.write_tree([(path, mode, blob)])  # type: ignore[list-item]
            with pytest.raises(InvalidInput, match="duplicate"):
                await store.cas.write_tree([("a", "100644", blob), ("a", "100755", blob)])
            with pytest.raises(InvalidInput, match="through a file"):
                await store.cas.write_tree([("a", "100644", blob), ("a/b", "100644", blob)])
            assert await store.cas.read_blob(blob) == b"x"

    async def test_links_to_missing_objects(self, tmp_path: Path) -> None:
        async with open_store(tmp_path / ".pforge") as store:
            missing = "ab" * 32
            with pytest.raises(ObjectNotFound, match=missing):
                await store.cas.write_commit(missing, message="no tree")
            with pytest.raises(ObjectNotFound, match=missing):
                await store.cas.write_tree([("f", "100644", missing)])
            with pytest.raises(ObjectNotFound, match=missing):
                await store.cas.update_ref("refs/heads/main", missing)
            with pytest.raises(ObjectNotFound, match=missing):
                await store.cas.read_blob(missing)
            assert (await store.cas.fsck()).ok

    async def test_other_bad_input(self, tmp_path: Path) -> None:
        async with open_store(tmp_path / ".pforge") as store:
            cas = store.cas
            blob = await cas.write_blob(b"x")
            tree = await cas.write_tree([("f", "100644", blob)])
            with pytest.raises(InvalidInput, match="not a blob"):
                await cas.read_blob(tree)
            with pytest.raises(InvalidInput, match="not a commit"):
                await cas.read_commit(tree)
            with pytest.raises(InvalidInput, match="bytes"):
                await cas.write_blob("text")  # type: ignore[arg-type]
            for name in ("main", "refs/heads/../x", "refs/heads/a.lock", "refs/heads/a b", "refs//x"):
                with pytest.raises(InvalidInput, match="ref name"):
                    await cas.update_ref(name, blob)
            with pytest.raises(InvalidInput, match="author"):
                await cas.write_commit(tree, author="no email")
            with pytest.raises(InvalidInput, match="metadata"):
                await cas.write_commit(tree, metadata={"bad key": "v"})
            with pytest.raises(InvalidInput, match="not a directory"):
                await cas.snapshot(tmp_path / "missing")
            assert await cas.read_blob(blob) == b"x"
