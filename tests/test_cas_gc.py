"""The CAS's garbage collection (issue 13): what it keeps and drops, grace and freshening, beside live
writers in this process and another, SIGKILL at random points, bad input, read-only stores."""

from __future__ import annotations

import math
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import anyio
import pytest

from pforge_async import open_store
from pforge_async.cas import gc as cas_gc
from pforge_async.cas.objects import BLOB, hash_object
from pforge_async.cas.retired import JOURNAL
from pforge_async.errors import IntegrityError, InvalidInput, ObjectNotFound
from pforge_async.store import Store

from ._procs import spawn, wait_for_line

pytestmark = pytest.mark.anyio

HOUR = 3600.0


def git_fsck(gitdir: Path) -> None:
    proc = subprocess.run(
        ["git", f"--git-dir={gitdir}", "fsck", "--strict", "--no-dangling", "--no-progress"],
        capture_output=True,
        text=True,
        check=False,
    )
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if not line.startswith("notice:")]
    assert proc.returncode == 0 and not lines, "\n".join(lines)


def object_files(root: Path) -> dict[str, int]:
    """Every file under cas/objects with its size."""
    out = {}
    for directory, _dirs, files in os.walk(root / "cas" / "objects"):
        for name in files:
            path = Path(directory) / name
            out[str(path.relative_to(root))] = path.stat().st_size
    return out


def blob_id(data: bytes) -> str:
    return hash_object(BLOB, data).hex()


def age_everything(root: Path, seconds: float) -> None:
    """Make every object file look ``seconds`` old (what waiting that long would do)."""
    then = time.time() - seconds
    for rel in object_files(root):
        os.utime(root / rel, (then, then))


async def write_files(store: Store, prefix: str, n: int, size: int = 40) -> tuple[str, dict[str, bytes]]:
    """A tree of ``n`` blobs (one batch each, so one pack each); returns it and the contents."""
    contents = {f"{prefix}/{i}.txt": (f"{prefix}-{i}-".encode() * size)[: size + i] for i in range(n)}
    entries = [(path, "100644", await store.cas.write_blob(data)) for path, data in contents.items()]
    return await store.cas.write_tree(entries), contents


async def assert_tree(store: Store, tree: str, contents: dict[str, bytes]) -> None:
    entries = await store.cas.read_tree(tree, recursive=True)
    assert {e.name: await store.cas.read_blob(e.oid) for e in entries} == contents


async def test_gc_drops_the_unreachable_keeps_the_reachable_and_the_young(tmp_path: Path) -> None:
    root = tmp_path / "s"
    async with open_store(root, watch_workspaces=False) as store:
        cas = store.cas
        kept_tree, kept = await write_files(store, "kept", 30)
        commit1 = await cas.write_commit(kept_tree, message="one")
        ref_tree, by_ref = await write_files(store, "ref", 10)
        commit2 = await cas.write_commit(ref_tree, [commit1], message="two")
        await cas.update_ref("refs/heads/main", commit2)
        garbage_tree, garbage = await write_files(store, "garbage", 60, size=2000)
        garbage_commit = await cas.write_commit(garbage_tree, message="gone")
        age_everything(root, 2 * HOUR)
        young_tree, young = await write_files(store, "young", 5)
        before = object_files(root)

        dry = await cas.gc([kept_tree], grace_s=HOUR, dry_run=True)
        assert dry.dry_run and dry.objects_reclaimed == 63  # 60 blobs, 2 trees, the commit
        assert object_files(root) == before  # a dry run changes nothing

        report = await cas.gc([kept_tree], grace_s=HOUR)
        print(report)
        assert report.objects_reclaimed == 63
        assert report.objects_kept == 30 + 2 + 10 + 2 + 2  # blobs, trees, commits (via the ref)
        assert report.objects_young == 7
        assert report.packs_before == len([f for f in before if f.endswith(".idx")]) > 100
        assert report.packs_after == 2  # the kept objects, and the young ones' cruft pack
        assert report.bytes_after < report.bytes_before / 4
        assert sum(object_files(root).values()) == report.bytes_after
        assert report.bytes_freed == report.bytes_before - report.bytes_after
        assert report.seconds >= 0 and report.missing == [] and report.unreadable == []

        await assert_tree(store, kept_tree, kept)
        await assert_tree(store, young_tree, young)
        assert list((await cas.read_commit(commit2)).parents) == [commit1]
        await assert_tree(store, (await cas.read_commit(commit1)).tree, kept)
        await assert_tree(store, ref_tree, by_ref)
        for oid in (garbage_tree, garbage_commit, *[blob_id(data) for data in garbage.values()]):
            assert not await cas.has(oid)
            with pytest.raises(ObjectNotFound):
                await cas.read_blob(oid)
        assert (await cas.fsck()).ok
        assert (await store.check()).problems == []

        # Nothing more to do: a second gc leaves the store as it is.
        again = await cas.gc([kept_tree], grace_s=HOUR)
        assert again.objects_reclaimed == 0 and again.packs_after == 2

    git_fsck(root / "cas")
    # The young expire in their turn: their cruft pack carries each one's own age (whole seconds,
    # rounded up), which touching the files does not change; waiting does.
    age_everything(root, 2 * HOUR)
    time.sleep(2.1)
    async with open_store(root, watch_workspaces=False) as store:
        report = await store.cas.gc([kept_tree], grace_s=1.0)
        assert report.objects_reclaimed == 7 and report.packs_after == 1
        assert not await store.cas.has(young_tree)
        await assert_tree(store, kept_tree, kept)
        assert (await store.check()).problems == []
    git_fsck(root / "cas")


async def test_large_loose_objects_stay_loose_when_kept_and_go_when_not(tmp_path: Path) -> None:
    root = tmp_path / "s"
    work = tmp_path / "work"
    work.mkdir()
    (work / "big.bin").write_bytes(os.urandom(1 << 20))
    (work / "small.txt").write_bytes(b"small")
    async with open_store(root, watch_workspaces=False) as store:
        kept = await store.cas.snapshot(work)
        (work / "big.bin").write_bytes(os.urandom((1 << 20) + 1))
        dropped = await store.cas.snapshot(work)
        assert len([f for f in object_files(root) if "/pack/" not in f]) == 2  # two loose big blobs
        age_everything(root, 2 * HOUR)
        report = await store.cas.gc([kept], grace_s=HOUR)
        assert report.objects_reclaimed == 2  # the second tree and its big blob
        assert report.loose_after == 1 and report.packs_after == 1
        out = tmp_path / "out"
        await store.cas.restore(kept, out)
        assert (out / "small.txt").read_bytes() == b"small"
        assert not await store.cas.has(dropped)
        assert (await store.check()).problems == []
    git_fsck(root / "cas")


async def test_freshening_keeps_old_unreachable_objects(tmp_path: Path) -> None:
    """An old unreachable object stored again, checked with has() or has_many(), named by a new tree,
    or named by a ref update becomes young again and survives; an untouched one does not."""
    root = tmp_path / "s"
    async with open_store(root, watch_workspaces=False) as store:
        cas = store.cas
        blobs = [await cas.write_blob(b"old blob %d" % i) for i in range(6)]
        age_everything(root, 2 * HOUR)
        assert await cas.write_blob(b"old blob 0") == blobs[0]  # a deduplicated write
        assert await cas.has(blobs[1])
        tree = await cas.write_tree([("f", "100644", blobs[2])])  # a new tree names it
        await cas.update_ref("refs/tags/t", blobs[3])
        assert await cas.has_many([blobs[4], "ab" * 32]) == [True, False]  # a turn's refs, checked at once
        report = await cas.gc([], grace_s=HOUR)
        assert report.objects_reclaimed == 1
        for oid in (*blobs[:5], tree):
            assert await cas.has(oid), oid
        assert not await cas.has(blobs[5])
        # Each freshening lasts one grace: once it is over, only what the ref holds is left.
        time.sleep(2.1)
        report = await cas.gc([], grace_s=1.0)
        assert report.objects_reclaimed == 5
        assert [await cas.has(oid) for oid in blobs] == [False, False, False, True, False, False]
        assert (await store.check()).problems == []
    git_fsck(root / "cas")


async def test_freshening_one_object_of_a_cruft_pack_keeps_only_it(tmp_path: Path) -> None:
    """Unreachable young objects wait in a cruft pack with their own ages. Freshening one of them
    logs it, and does not touch the pack (which would make all of them young again)."""
    root = tmp_path / "s"
    async with open_store(root, watch_workspaces=False) as store:
        cas = store.cas
        blobs = [await cas.write_blob(b"young %d" % i) for i in range(6)]
        report = await cas.gc([], grace_s=HOUR)
        assert report.objects_young == 6 and report.packs_after == 1
        (pack,) = (root / "cas" / "objects" / "pack").glob("*.mtimes")
        mtime = pack.with_suffix(".pack").stat().st_mtime_ns
        # The two freshened must still be young when gc looks: a grace of 2 s leaves a loaded machine
        # room between the freshening and the gc (1 s was the whole margin); the pause is past the
        # grace and the pack's whole-second ages, so the others are old by then.
        grace = 2.0
        time.sleep(grace + 1.1)
        assert await cas.write_blob(b"young 0") == blobs[0]
        assert await cas.has(blobs[1])
        assert pack.with_suffix(".pack").stat().st_mtime_ns == mtime
        report = await cas.gc([], grace_s=grace)
        assert report.objects_reclaimed == 4 and report.objects_young == 2
        assert [await cas.has(oid) for oid in blobs] == [True, True, False, False, False, False]
        assert (await store.check()).problems == []
    git_fsck(root / "cas")


async def test_an_object_freshened_while_gc_runs_is_rescued(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer freshens an old unreachable tree after gc's mark: gc's look before it decides finds the
    touched file and keeps the tree and everything it reaches (written anew)."""
    root = tmp_path / "s"
    async with open_store(root, watch_workspaces=False) as store:
        cas = store.cas
        tree, contents = await write_files(store, "t", 8)
        doomed_tree, _ = await write_files(store, "d", 8)
        age_everything(root, 2 * HOUR)
        odb = store.cas._odb
        original = cas_gc._Collector.mark_links

        def mark_then_freshen(self: cas_gc._Collector) -> None:
            original(self)
            assert odb.freshen_one(bytes.fromhex(tree))  # another writer, between mark and decision

        monkeypatch.setattr(cas_gc._Collector, "mark_links", mark_then_freshen)
        report = await cas.gc([], grace_s=HOUR)
        assert report.objects_rescued == 10 and report.objects_reclaimed == 10  # 8 blobs, 2 trees each
        await assert_tree(store, tree, contents)
        assert not await cas.has(doomed_tree)
        assert (await store.check()).problems == []
    git_fsck(root / "cas")


READER = r"""
import sys, anyio
from pforge_async import open_store

async def main(root):
    async with open_store(root, watch_workspaces=False) as store:
        cas = store.cas
        for line in sys.stdin:
            cmd, _, arg = line.strip().partition(" ")
            if cmd == "read":
                tree = await cas.get_ref("refs/tags/main")
                entries = await cas.read_tree(tree, recursive=True)
                data = [await cas.read_blob(e.oid) for e in entries]
                print("ok %d %d" % (len(data), sum(map(len, data))), flush=True)
            elif cmd == "put":
                oid = await cas.write_blob(arg.encode())
                print("ok %s %s" % (oid, await cas.has(oid)), flush=True)

anyio.run(main, sys.argv[1])
"""


async def test_another_process_with_a_stale_pack_list_reads_and_writes_on(tmp_path: Path) -> None:
    root = tmp_path / "s"
    async with open_store(root, watch_workspaces=False) as store:
        tree, contents = await write_files(store, "k", 20)
        await store.cas.update_ref("refs/tags/main", tree)
        gone = await store.cas.write_blob(b"doomed")
        child = spawn(READER, root, stdin=subprocess.PIPE)
        assert child.stdin is not None and child.stdout is not None
        try:

            def ask(line: str) -> str:
                assert child.stdin is not None and child.stdout is not None
                child.stdin.write(line + "\n")
                child.stdin.flush()
                return child.stdout.readline().strip()

            total = sum(map(len, contents.values()))
            assert ask("read") == f"ok 20 {total}"  # the child has every old pack loaded
            age_everything(root, 2 * HOUR)
            report = await store.cas.gc([], grace_s=HOUR)
            assert report.packs_after == 1 and report.objects_reclaimed == 1
            assert not await store.cas.has(gone)
            assert ask("read") == f"ok 20 {total}"  # its old packs are gone: it rescans
            # Its write of what gc dropped is not deduplicated against a retired pack: it is stored.
            assert ask("put doomed") == f"ok {gone} True"
            assert await store.cas.read_blob(gone) == b"doomed"
        finally:
            child.communicate(timeout=30)  # closes its stdin: it ends
        assert child.returncode == 0, child.stderr
        assert (await store.check()).problems == []
    git_fsck(root / "cas")


WRITER = r"""
import sys, anyio, random
from pforge_async import open_store

async def main(root, name, seconds):
    rng = random.Random(name)
    n = errors = 0
    async with open_store(root, watch_workspaces=False) as store:
        cas = store.cas
        deadline = anyio.current_time() + seconds
        while anyio.current_time() < deadline:
            try:
                blobs = [await cas.write_blob(b"%s %d %d" % (name.encode(), n, i)) for i in range(5)]
                await cas.write_blob(b"garbage %s %d" % (name.encode(), n))
                shared = await cas.write_blob(b"shared %d" % rng.randrange(20))
                tree = await cas.write_tree([(f"f{i}", "100644", b) for i, b in enumerate([*blobs, shared])])
                await cas.update_ref(f"refs/tags/{name}", tree)
                got = await cas.read_tree(await cas.get_ref(f"refs/tags/{name}"), recursive=True)
                assert [await cas.read_blob(e.oid) for e in got][:5] == [
                    b"%s %d %d" % (name.encode(), n, i) for i in range(5)
                ]
                assert await cas.has(shared)
                n += 1
            except Exception as exc:
                errors += 1
                print("error", repr(exc), file=sys.stderr, flush=True)
    print(n, errors, flush=True)

anyio.run(main, sys.argv[1], sys.argv[2], float(sys.argv[3]))
"""


async def test_gc_in_a_loop_beside_writers_and_readers_here_and_in_another_process(tmp_path: Path) -> None:
    root = tmp_path / "s"
    seconds = 12.0
    async with open_store(root, watch_workspaces=False) as store:
        cas = store.cas
        await cas.write_blob(b"warm up")
        other = spawn(WRITER, root, "other", seconds)
        errors: list[BaseException] = []
        rounds = {"writes": 0, "gcs": 0, "reclaimed": 0, "rescued": 0}
        held: list[float] = []
        work = tmp_path / "work"
        work.mkdir()

        async def writer(name: str) -> None:
            deadline = anyio.current_time() + seconds
            n = 0
            while anyio.current_time() < deadline:
                try:
                    blobs = [await cas.write_blob(b"%s %d %d" % (name.encode(), n, i)) for i in range(3)]
                    await cas.write_blob(b"garbage %s %d" % (name.encode(), n))
                    tree = await cas.write_tree([(f"f{i}", "100644", b) for i, b in enumerate(blobs)])
                    commit = await cas.write_commit(tree, message=f"{name} {n}")
                    await cas.update_ref(f"refs/heads/{name}", commit)
                    got = await cas.read_commit(await cas.get_ref(f"refs/heads/{name}") or "")
                    assert [e.oid for e in await cas.read_tree(got.tree)] == blobs
                    n += 1
                    rounds["writes"] += 1
                except Exception as exc:
                    errors.append(exc)

        async def snapshotter() -> None:
            deadline = anyio.current_time() + seconds
            n = 0
            while anyio.current_time() < deadline:
                try:
                    (work / f"f{n % 7}").write_bytes(b"version %d" % n)
                    tree = await cas.snapshot(work)
                    await cas.update_ref("refs/tags/work", tree)
                    files = {e.name: await cas.read_blob(e.oid) for e in await cas.read_tree(tree, recursive=True)}
                    assert files[f"f{n % 7}"] == b"version %d" % n
                    n += 1
                except Exception as exc:
                    errors.append(exc)

        async def collector() -> None:
            deadline = anyio.current_time() + seconds
            while anyio.current_time() < deadline:
                try:
                    report = await cas.gc([], grace_s=3.0)
                    rounds["gcs"] += 1
                    rounds["reclaimed"] += report.objects_reclaimed
                    rounds["rescued"] += report.objects_rescued
                    held.append(report.gate_held_s)
                except Exception as exc:
                    errors.append(exc)
                await anyio.sleep(0.05)

        async with anyio.create_task_group() as tg:
            for i in range(3):
                tg.start_soon(writer, f"task{i}")
            tg.start_soon(snapshotter)
            tg.start_soon(collector)
        out, err = await anyio.to_thread.run_sync(lambda: other.communicate(timeout=120))
        assert other.returncode == 0, err
        other_n, other_errors = map(int, out.split())
        print(rounds, "other process:", other_n, "writes", f"longest gate hold {max(held):.3f} s")
        assert errors == [] and other_errors == 0, (errors, err)
        assert rounds["gcs"] >= 3 and rounds["reclaimed"] > 0 and other_n > 0
        # Everything the refs reach is there, whole; one last gc with no grace keeps exactly it.
        await anyio.sleep(0.1)
        report = await cas.gc([], grace_s=0)
        for name in ("task0", "task1", "task2"):
            commit = await cas.read_commit(await cas.get_ref(f"refs/heads/{name}") or "")
            assert len(await cas.read_tree(commit.tree)) == 3
        got = await cas.read_tree(await cas.get_ref("refs/tags/other") or "", recursive=True)
        assert [await cas.read_blob(e.oid) for e in got][:5] == [b"other %d %d" % (other_n - 1, i) for i in range(5)]
        assert report.packs_after <= 2
        assert (await store.check()).problems == []
    git_fsck(root / "cas")


CRASH_CHILD = r"""
import sys, anyio
from pforge_async import open_store

async def main(root, seed):
    async with open_store(root, durability="normal", watch_workspaces=False) as store:
        cas = store.cas
        junk = [await cas.write_blob(b"junk %d %d" % (seed, i) * 50) for i in range(150)]
        tree = await cas.write_tree([(f"j{i}", "100644", oid) for i, oid in enumerate(junk)])
        await cas.write_commit(tree, message="junk %d" % seed)
        print("ready", flush=True)
        n = 0
        while True:
            await cas.gc([], grace_s=0)
            n += 1
            for i in range(20):
                await cas.write_blob(b"more junk %d %d %d" % (seed, n, i))

anyio.run(main, sys.argv[1], int(sys.argv[2]))
"""

RUNS = 24


async def test_gc_killed_at_random_points(tmp_path: Path) -> None:
    root = tmp_path / "s"
    async with open_store(root, watch_workspaces=False) as store:
        kept_tree, kept = await write_files(store, "kept", 40)
        await store.cas.update_ref("refs/heads/main", await store.cas.write_commit(kept_tree, message="kept"))
        tagged_tree, tagged = await write_files(store, "tag", 10)
        await store.cas.update_ref("refs/tags/t", tagged_tree)
    rng = random.Random(13)
    found = {"journal": 0, "temp": 0, "new packs beside old": 0}
    for run in range(RUNS):
        child = spawn(CRASH_CHILD, root, run)
        wait_for_line(child, "ready", timeout=120)
        time.sleep(rng.uniform(0, 0.6))
        child.send_signal(signal.SIGKILL)
        child.communicate(timeout=30)
        files = object_files(root)
        found["journal"] += (root / "cas" / JOURNAL).exists()
        found["temp"] += any("tmp_" in f for f in files)
        found["new packs beside old"] += sum(f.endswith(".idx") for f in files) > 170
        async with open_store(root, watch_workspaces=False) as store:
            assert not (root / "cas" / JOURNAL).exists(), f"run {run}: the open finishes a killed gc's deletions"
            assert not any("tmp_" in f for f in object_files(root)), f"run {run}: temp files cleaned at open"
            assert (await store.cas.fsck()).ok, f"run {run}"
            assert (await store.check()).problems == [], f"run {run}"
            await assert_tree(store, kept_tree, kept)
            await assert_tree(store, tagged_tree, tagged)
        git_fsck(root / "cas")
        async with open_store(root, watch_workspaces=False) as store:
            await store.cas.gc([kept_tree], grace_s=0)
            await assert_tree(store, kept_tree, kept)
    print("kills that found:", found)
    # A killed gc's cruft pack may hold the child's last junk, young for up to a second more (its
    # .mtimes keeps whole seconds, rounded up): wait that out, then nothing but the kept is left.
    time.sleep(1.1)
    async with open_store(root, watch_workspaces=False) as store:
        report = await store.cas.gc([], grace_s=0)
        assert report.packs_after == 1 and report.loose_after == 0, (report, sorted(object_files(root)))
        assert report.objects_before - report.objects_reclaimed == 40 + 2 + 1 + 10 + 2  # blobs, trees, commit
        await assert_tree(store, kept_tree, kept)
        assert (await store.check()).problems == []
    git_fsck(root / "cas")
    assert found["journal"] + found["temp"] + found["new packs beside old"] >= 3, found


async def test_an_unreadable_kept_object_stays_where_it_is(tmp_path: Path) -> None:
    """gc cannot copy a damaged object: the pack holding it stays (and what it reaches), the damage is
    reported as before, nothing else is lost, and the rest is consolidated."""
    root = tmp_path / "s"
    async with open_store(root, watch_workspaces=False) as store:
        tree, contents = await write_files(store, "k", 6)
        for i in range(20):
            await store.cas.write_blob(b"garbage %d" % i)
        victim = blob_id(contents["k/3.txt"])
    pack = next(
        p
        for p in (root / "cas" / "objects" / "pack").glob("*.pack")
        if contents["k/3.txt"] in p.read_bytes() and p.stat().st_size < 400
    )
    data = bytearray(pack.read_bytes())
    at = bytes(data).index(contents["k/3.txt"])
    data[at] ^= 0xFF
    pack.chmod(0o644)
    pack.write_bytes(bytes(data))
    age_everything(root, 2 * HOUR)
    async with open_store(root, watch_workspaces=False) as store:
        report = await store.cas.gc([tree], grace_s=HOUR)
        assert report.unreadable == [victim]
        assert report.objects_reclaimed == 20 and report.packs_after == 2
        assert pack.exists()
        for path, blob in contents.items():
            if path != "k/3.txt":
                assert await store.cas.read_blob(blob_id(blob)) == blob
        with pytest.raises(IntegrityError):
            await store.cas.read_blob(victim)
        assert (await store.cas.fsck()).corrupt == [victim]


async def test_two_collections_at_once_take_turns(tmp_path: Path) -> None:
    root = tmp_path / "s"
    async with open_store(root, watch_workspaces=False) as store:
        tree, contents = await write_files(store, "k", 10)
        for i in range(30):
            await store.cas.write_blob(b"garbage %d" % i)
        age_everything(root, 2 * HOUR)
        reports = []

        async def gc() -> None:
            reports.append(await store.cas.gc([tree], grace_s=HOUR))

        async with anyio.create_task_group() as tg:
            tg.start_soon(gc)
            tg.start_soon(gc)
        assert sorted(r.objects_reclaimed for r in reports) == [0, 30]
        await assert_tree(store, tree, contents)
        assert (await store.check()).problems == []
    git_fsck(root / "cas")


async def test_bad_input_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "s"
    async with open_store(root, watch_workspaces=False) as store:
        cas = store.cas
        tree, contents = await write_files(store, "k", 5)
        await cas.write_blob(b"garbage")
        age_everything(root, 2 * HOUR)
        before = object_files(root)
        bad_calls = [
            ([tree, "../" + "0" * 61],),
            ([tree[:-1]],),
            ([tree.upper()],),
            (tree,),
            (None,),
            ([b"\x00" * 32],),
        ]
        for args in bad_calls:
            with pytest.raises(InvalidInput):
                await cas.gc(*args, grace_s=0)  # type: ignore[arg-type]
        bad_options: list[dict[str, object]] = [
            {"grace_s": -1},
            {"grace_s": math.nan},
            {"grace_s": math.inf},
            {"grace_s": True},
            {"grace_s": "0"},
            {"dry_run": 1},
            {"roots_taken_at": "now"},
            {"roots_taken_at": -5.0},
        ]
        for kwargs in bad_options:
            with pytest.raises(InvalidInput):
                await cas.gc([tree], **kwargs)  # type: ignore[arg-type]
        assert object_files(root) == before
        # A root that is well formed but absent is reported, not an error.
        report = await cas.gc([tree, "ab" * 32], grace_s=0)
        assert report.missing == ["ab" * 32] and report.objects_reclaimed == 1
        await assert_tree(store, tree, contents)
        assert (await store.check()).problems == []


async def test_a_read_only_store_refuses_gc(tmp_path: Path) -> None:
    root = tmp_path / "s"
    async with open_store(root, watch_workspaces=False) as store:
        await store.cas.write_blob(b"garbage")
    age_everything(root, 2 * HOUR)
    before = object_files(root)
    async with open_store(root, readonly=True, create=False, watch_workspaces=False) as store:
        with pytest.raises(InvalidInput, match="read-only"):
            await store.cas.gc([], grace_s=0)
        with pytest.raises(InvalidInput, match="read-only"):
            await store.cas.gc([], grace_s=0, dry_run=True)
        assert await store.cas.has(blob_id(b"garbage"))
    assert object_files(root) == before
