"""The workspace trust boundary of the CAS: ``snapshot`` and ``restore`` against hostile workspaces.

Untrusted agent tools run inside the workspaces the store snapshots and restores, and may swap, rename
and delete files while a call runs. These tests race a second *process* against the store and check
that nothing outside the workspace is read or written and no call blocks; and that no workspace
content and no I/O error kills the CAS actor.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import anyio
import pytest

from pforge_async import ActorClosed, InvalidInput, PforgeError, StorageError, open_store
from pforge_async.cas.actor import CasActor, PutObjects, Snapshot, UpdateRef

from ._procs import spawn, wait_for_line

pytestmark = pytest.mark.anyio

#: how long each racing test lets the racer run, and the bound no single call may block past.
RACE_S = 3.5
CALL_BOUND_S = 15.0

# The racer: swaps components of a workspace in a tight loop until its stdin closes (or 60 s pass).
# Each swap is one atomic syscall, so the name always exists and only its type flips under the store.
#   dirs    <work> <outside> <names...>: each directory <name> <-> a symlink to <outside>
#           (renameat2 RENAME_EXCHANGE; where the file system lacks it, rename aside and symlink)
#   fifos   <work> <outside> <names...>: each regular file <name> <-> a FIFO (exchanged likewise, or
#           renamed over it and back); the racer holds every FIFO open read-write, so a reader that opened one without
#           O_NONBLOCK blocks in read() until the racer exits (then it gets EOF: the test fails, not hangs)
#   restore <base> <outside>: every directory under <base>/<target>/ (two levels) -> a symlink to
#           <outside>, the directory kept aside as <name>.aside (never swapped back)
RACER = r"""
import ctypes, os, select, sys, time

mode, work, outside, names = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
libc = ctypes.CDLL(None, use_errno=True)
deadline = time.monotonic() + 60
swaps = 0


def exchange(a, b):
    return libc.renameat2(-100, os.fsencode(a), -100, os.fsencode(b), 2) == 0  # RENAME_EXCHANGE


def stop_requested():
    return bool(select.select([sys.stdin], [], [], 0)[0]) or time.monotonic() > deadline


def swap_restore_targets():
    global swaps
    try:
        targets = [e.path for e in os.scandir(work) if e.is_dir(follow_symlinks=False)]
    except OSError:
        return
    for target in targets:
        stack = [(target, 0)]
        while stack:
            path, depth = stack.pop()
            try:
                entries = list(os.scandir(path))
            except OSError:
                continue
            for e in entries:
                if e.name.endswith(".aside") or not e.is_dir(follow_symlinks=False):
                    continue
                try:
                    os.rename(e.path, e.path + ".aside")
                    os.symlink(outside, e.path)
                    swaps += 1
                except OSError:
                    pass
                if depth == 0:
                    stack.append((e.path + ".aside", 1))


paths = [os.path.join(work, n) for n in names]
held = []
use_exchange = False
other = {"dirs": ".link", "fifos": ".fifo"}.get(mode, "")
if mode == "dirs":
    for p in paths:
        os.symlink(outside, p + other)
elif mode == "fifos":
    for p in paths:
        os.mkfifo(p + other)
        held.append(os.open(p + other, os.O_RDWR | os.O_NONBLOCK))
if paths:
    use_exchange = exchange(paths[0], paths[0] + other) and exchange(paths[0], paths[0] + other)
print("started", flush=True)

i = 0
while True:
    i += 1
    if i % 16 == 0 and stop_requested():
        break
    if mode == "restore":
        swap_restore_targets()
        continue
    for p in paths:  # phase 1: every component swapped
        try:
            if use_exchange:
                exchange(p, p + other)
            elif mode == "dirs":
                os.rename(p, p + ".aside")
                os.symlink(outside, p)
            else:
                os.link(p, p + ".aside")
                os.link(p + ".fifo", p + ".tmp")
                os.rename(p + ".tmp", p)
            swaps += 1
        except OSError:
            pass
    for p in paths:  # phase 2: every component back
        try:
            if use_exchange:
                exchange(p, p + other)
            elif mode == "dirs":
                os.unlink(p)
                os.rename(p + ".aside", p)
            else:
                os.rename(p + ".aside", p)
        except OSError:
            pass

for fd in held:
    os.close(fd)
print(swaps, flush=True)
"""


class Racer:
    """The racing process: started before the store's calls, stopped (always) after them."""

    def __init__(self, mode: str, work: Path, outside: Path, names: list[str] = []) -> None:  # noqa: B006
        self.proc = spawn(RACER, mode, work, outside, *names, stdin=subprocess.PIPE)
        wait_for_line(self.proc, "started")

    def stop(self) -> int:
        """Stop it and return how many swaps it made."""
        out, err = self.proc.communicate(input="stop\n", timeout=90)
        assert self.proc.returncode == 0, err
        return int(out.split()[-1])


def make_outside(tmp_path: Path) -> tuple[Path, bytes]:
    """A directory outside every workspace, holding a secret no snapshot may ever contain."""
    outside = tmp_path / "outside"
    (outside / "deeper").mkdir(parents=True)
    marker = os.urandom(16).hex().encode()
    (outside / "secret.txt").write_bytes(b"SECRET " + marker + b"\n")
    (outside / "deeper" / "secret.txt").write_bytes(b"SECRET " + marker + b"\n")
    return outside, marker


def outside_state(outside: Path) -> dict[str, bytes | str]:
    """Everything under ``outside``: each path with its bytes (files) or its kind."""
    state: dict[str, bytes | str] = {}
    for dirpath, dirs, files in os.walk(outside):
        for name in dirs + files:
            path = Path(dirpath) / name
            rel = str(path.relative_to(outside))
            if path.is_symlink():
                state[rel] = "link -> " + os.readlink(path)
            elif path.is_dir():
                state[rel] = "dir"
            else:
                state[rel] = path.read_bytes()
    return state


async def blobs_of(cas: object, tree: str, seen: set[str]) -> list[tuple[str, bytes]]:
    """(path, bytes) of every blob below ``tree`` not already in ``seen``."""
    out = []
    for entry in await cas.read_tree(tree, recursive=True):  # type: ignore[attr-defined]
        if entry.oid not in seen:
            seen.add(entry.oid)
            out.append((entry.name, await cas.read_blob(entry.oid)))  # type: ignore[attr-defined]
    return out


class TestRacingSnapshots:
    @pytest.mark.parametrize("watch", [True, False], ids=["watch", "nowatch"])
    async def test_directories_swapped_for_symlinks_never_leak_outside_files(self, tmp_path: Path, watch: bool) -> None:
        outside, marker = make_outside(tmp_path)
        work = tmp_path / "work"
        names = [f"sub{i}" for i in range(8)]
        for name in names:
            (work / name / "inner").mkdir(parents=True)
            for j in range(10):
                (work / name / f"f{j}.txt").write_text(f"{name} file {j}\n")
            (work / name / "inner" / "deep.txt").write_text(f"{name} deep\n")
        (work / "top.txt").write_text("top\n")
        trees: set[str] = set()
        async with open_store(tmp_path / ".pforge", watch_workspaces=watch) as store:
            racer = Racer("dirs", work, outside, names)
            try:
                end = time.monotonic() + RACE_S
                # Two differing snapshots at least, however loaded the machine (then RACE_S is a minimum).
                while time.monotonic() < end or (len(trees) < 2 and time.monotonic() < end + 60):
                    with anyio.fail_after(CALL_BOUND_S):
                        trees.add(await store.cas.snapshot(work))
            finally:
                swaps = racer.stop()
            assert swaps > 100, f"the racer made only {swaps} swaps"
            seen: set[str] = set()
            for tree in trees:
                for path, data in await blobs_of(store.cas, tree, seen):
                    assert marker not in data, f"snapshot {tree} holds {path}, read from outside the workspace"
            # Quiet again, the workspace snapshots whole.
            final = await store.cas.snapshot(work)
            paths = {e.name for e in await store.cas.read_tree(final, recursive=True)}
            assert {f"{n}/f{j}.txt" for n in names for j in range(10)} <= paths
            assert not any("secret" in p for p in paths)
        assert len(trees) > 1  # it did snapshot the workspace in its changing states

    async def test_files_swapped_for_fifos_never_block(self, tmp_path: Path) -> None:
        outside, _marker = make_outside(tmp_path)
        work = tmp_path / "work"
        (work / "d").mkdir(parents=True)
        # Few names, flipped fast: what matters is how often a flip lands between a scan's stat and open.
        names = ["f0.txt", "d/g0.txt", "big.bin"]
        for name in [*names, "f1.txt", "d/g1.txt"]:
            (work / name).write_bytes(name.encode() * 100)
        (work / "big.bin").write_bytes(os.urandom((1 << 20) + 5))  # streamed, through its descriptor
        (work / "static-fifo").parent.mkdir(exist_ok=True)
        os.mkfifo(work / "static-fifo")
        count = 0
        async with open_store(tmp_path / ".pforge") as store:
            racer = Racer("fifos", work, outside, names)
            try:
                end = time.monotonic() + RACE_S
                # Four snapshots at least, however loaded the machine (then RACE_S is a minimum).
                while time.monotonic() < end or (count < 4 and time.monotonic() < end + 60):
                    with anyio.fail_after(CALL_BOUND_S):
                        tree = await store.cas.snapshot(work)
                    count += 1
            finally:
                swaps = racer.stop()
            assert swaps > 100, f"the racer made only {swaps} swaps"
            assert count > 3
            entries = {e.name: e for e in await store.cas.read_tree(tree, recursive=True)}
            assert "static-fifo" not in entries
            final = {e.name for e in await store.cas.read_tree(await store.cas.snapshot(work), recursive=True)}
            assert {*names, "f1.txt", "d/g1.txt"} <= final


class TestRacingRestores:
    async def test_target_directories_swapped_for_symlinks_never_send_writes_outside(self, tmp_path: Path) -> None:
        outside, _marker = make_outside(tmp_path)
        before = outside_state(outside)
        source = tmp_path / "source"
        expected: dict[str, bytes] = {}
        for i in range(4):
            for j in range(3):
                for k in range(8):
                    rel = f"d{i}/s{j}/f{k}.txt"
                    expected[f"f{k}.txt"] = f"file {k}\n".encode() * 50
                    (source / rel).parent.mkdir(parents=True, exist_ok=True)
                    (source / rel).write_bytes(expected[f"f{k}.txt"])
            (source / f"d{i}" / "link").symlink_to("../elsewhere")
        base = tmp_path / "targets"
        base.mkdir()
        restored = failed = 0
        async with open_store(tmp_path / ".pforge") as store:
            tree = await store.cas.snapshot(source)
            racer = Racer("restore", base, outside)
            try:
                end = time.monotonic() + RACE_S
                # At least 4 restores however loaded the machine is (then RACE_S is a minimum).
                while time.monotonic() < end or (restored + failed < 4 and time.monotonic() < end + 60):
                    target = base / f"t{restored + failed}"
                    started = time.monotonic()
                    try:
                        await store.cas.restore(tree, target)
                        restored += 1
                    except StorageError:
                        failed += 1
                    assert time.monotonic() - started < CALL_BOUND_S
            finally:
                swaps = racer.stop()
        assert swaps > 20, f"the racer made only {swaps} swaps"
        assert outside_state(outside) == before, "a restore wrote outside its target"
        # Whatever a restore left, finished or failed, holds no partly written file.
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                path = Path(dirpath) / name
                if path.is_symlink():
                    continue
                assert not name.startswith(".pforge-restore-"), f"temp file {path} left behind"
                assert path.read_bytes() == expected[name], f"{path} is partly written"
        assert restored + failed > 3


def nasty_workspace(work: Path) -> dict[bytes, bytes]:
    """A workspace with names that are not UTF-8; returns relative path bytes -> content or link target."""
    root = os.fsencode(work)
    files = {
        b"caf\xe9.txt": b"latin-1 name\n",
        b"dir\xff/inner\xfe.bin": b"\x00\x01\x02",
        b"ok.txt": b"plain\n",
        "données.txt".encode(): b"utf-8 name\n",
    }
    for rel, data in files.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    os.symlink(b"target\xfd", os.path.join(root, b"link\xfc"))
    return {**files, b"link\xfc": b"target\xfd"}


def read_back(directory: Path) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    root = os.fsencode(directory)
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            out[rel] = os.readlink(path) if os.path.islink(path) else open(path, "rb").read()  # noqa: SIM115
    return out


class TestNames:
    async def test_a_name_that_is_not_utf8_round_trips_byte_exact(self, tmp_path: Path) -> None:
        work = tmp_path / os.fsdecode(b"work\xff")  # the workspace's own path need not be UTF-8 either
        work.mkdir()
        expected = nasty_workspace(work)
        out = tmp_path / os.fsdecode(b"out\xfe")
        async with open_store(tmp_path / ".pforge") as store:
            tree = await store.cas.snapshot(work)
            names = {os.fsencode(e.name) for e in await store.cas.read_tree(tree, recursive=True)}
            assert names == set(expected)
            # The stat cache (keyed by these names) is written and read back: same tree.
            assert await store.cas.snapshot(work) == tree
            await store.cas.restore(tree, out)
            assert read_back(out) == expected
            again = await store.cas.snapshot(out)
            assert again == tree
            gitdir = store.cas.path
        listing = subprocess.run(
            ["git", f"--git-dir={gitdir}", "ls-tree", "-r", "-z", "--name-only", tree],
            capture_output=True,
            check=True,
        ).stdout
        assert set(listing.split(b"\0")[:-1]) == set(expected)
        # A new process (a cold stat cache load) gives the same tree.
        async with open_store(tmp_path / ".pforge") as store:
            assert await store.cas.snapshot(work) == tree

    @pytest.mark.parametrize(
        "name",
        [".git.", ".GIT ", "git~1", "GIT~1", ".g\u200cit", "sub/.Git\u200d", ".gitmodules-link"],
    )
    async def test_a_name_git_refuses_fails_the_snapshot_and_the_store_serves_on(
        self, tmp_path: Path, name: str
    ) -> None:
        work = tmp_path / "work"
        (work / "sub").mkdir(parents=True)
        (work / "fine.txt").write_text("fine\n")
        if name == ".gitmodules-link":
            name = ".gitmodules"
            (work / name).symlink_to("fine.txt")
        else:
            (work / name).write_text("refused\n")
        async with open_store(tmp_path / ".pforge") as store:
            with pytest.raises(InvalidInput, match="git refuses") as caught:
                await store.cas.snapshot(work)
            assert name in str(caught.value)  # named relative to the workspace
            assert await store.cas.read_blob(await store.cas.write_blob(b"still here")) == b"still here"
            os.unlink(work / name)
            tree = await store.cas.snapshot(work)
            assert [e.name for e in await store.cas.read_tree(tree, recursive=True)] == ["fine.txt"]

    async def test_the_workspaces_own_git_repository_is_left_out(self, tmp_path: Path) -> None:
        work = tmp_path / "work"
        for git_dir in (".git", "sub/.GIT"):
            (work / git_dir).mkdir(parents=True)
            (work / git_dir / "config").write_text("[core]\n")
        (work / "sub" / "a.txt").write_text("a\n")
        async with open_store(tmp_path / ".pforge") as store:
            tree = await store.cas.snapshot(work)
            assert [e.name for e in await store.cas.read_tree(tree, recursive=True)] == ["sub/a.txt"]


# Runs a scenario in a child process without CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH, so file modes
# bind it even when the tests run as root. Capabilities drop before any thread starts.
UNSEARCHABLE = r"""
import ctypes, json, os, sys
if os.geteuid() == 0:
    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]
    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]
    libc = ctypes.CDLL(None, use_errno=True)
    header, data = Header(0x20080522, 0), (Data * 2)()
    assert libc.capget(ctypes.byref(header), data) == 0
    data[0].effective &= ~((1 << 1) | (1 << 2)) & 0xFFFFFFFF  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
    assert libc.capset(ctypes.byref(header), data) == 0, ctypes.get_errno()

import anyio
from pforge_async import PforgeError, open_store

base = sys.argv[1]
async def main():
    out = {}
    async with open_store(os.path.join(base, ".pforge")) as store:
        for what in ("unsearchable", "unreadable-file", "unsearchable"):
            try:
                await store.cas.snapshot(os.path.join(base, what))
                out[what] = "ok"
            except PforgeError as exc:
                out[what] = [type(exc).__name__, str(exc)]
        blob = await store.cas.write_blob(b"after")
        out["blob"] = (await store.cas.read_blob(blob)).decode()
        out["fine"] = await store.cas.snapshot(os.path.join(base, "fine"))
    print(json.dumps(out))
anyio.run(main)
"""


class TestHostileContent:
    async def test_an_unsearchable_directory_fails_its_snapshot_only(self, tmp_path: Path) -> None:
        locked = tmp_path / "unsearchable" / "locked"
        locked.mkdir(parents=True)
        (locked / "f.txt").write_text("cannot stat me\n")
        (tmp_path / "unreadable-file").mkdir()
        (tmp_path / "unreadable-file" / "f.txt").write_text("cannot read me\n")
        (tmp_path / "fine").mkdir()
        (tmp_path / "fine" / "ok.txt").write_text("ok\n")
        locked.chmod(0o444)  # listable, not searchable
        (tmp_path / "unreadable-file" / "f.txt").chmod(0)
        try:
            child = spawn(UNSEARCHABLE, tmp_path)
            out, err = child.communicate(timeout=120)
        finally:
            locked.chmod(0o755)
        assert child.returncode == 0, err
        result = json.loads(out)
        kind, message = result["unsearchable"]
        assert kind == "StorageError" and "locked" in message
        kind, message = result["unreadable-file"]
        assert kind == "StorageError" and "f.txt" in message
        assert result["blob"] == "after"
        assert len(result["fine"]) == 64

    async def test_a_fifo_in_the_workspace_is_skipped_without_blocking(self, tmp_path: Path) -> None:
        work = tmp_path / "work"
        work.mkdir()
        os.mkfifo(work / "pipe")
        (work / "a.txt").write_text("a\n")
        async with open_store(tmp_path / ".pforge") as store:
            with anyio.fail_after(CALL_BOUND_S):
                tree = await store.cas.snapshot(work)
            assert [e.name for e in await store.cas.read_tree(tree)] == ["a.txt"]

    async def test_a_stat_cache_that_cannot_be_written_fails_nothing(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        work = tmp_path / "work"
        work.mkdir()
        (work / "a.txt").write_text("a\n")
        real_write = os.write

        def disk_full_for_the_cache(fd: int, data: bytes) -> int:
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                target = ""
            if "/cache/snapshot-" in target:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_write(fd, data)

        cache_dir = tmp_path / ".pforge" / "cache"
        async with open_store(tmp_path / ".pforge", watch_workspaces=False) as store:
            monkeypatch.setattr(os, "write", disk_full_for_the_cache)
            first = await store.cas.snapshot(work)
            # The cache is written after the reply, on the actor's thread: one more call waits for it.
            assert await store.cas.read_blob(await store.cas.write_blob(b"x")) == b"x"
            (work / "b.txt").write_text("b\n")
            second = await store.cas.snapshot(work)
            await store.cas.write_blob(b"after the second")
            actor = store.cas._actor
            assert isinstance(actor, CasActor)
            assert actor.stat_caches.failed >= 1 and actor.stat_caches.written == 0
            monkeypatch.undo()
            assert not [p.name for p in cache_dir.iterdir() if p.name.endswith(".tmp")]
            # The actor serves on, and what those snapshots stored is there.
            assert {e.name for e in await store.cas.read_tree(second)} == {"a.txt", "b.txt"}
            assert second != first
            assert await store.cas.snapshot(work) == second
        # Written by the close at the latest, once the disk has room again.
        assert [p for p in cache_dir.iterdir() if p.name.startswith("snapshot-")]
        assert not [p.name for p in cache_dir.iterdir() if p.name.endswith(".tmp")]

        # A cache directory that is not a directory at all: the same.
        for path in cache_dir.iterdir():
            path.unlink()
        cache_dir.rmdir()
        cache_dir.write_bytes(b"not a directory")
        async with open_store(tmp_path / ".pforge", watch_workspaces=False) as store:
            (work / "c.txt").write_text("c\n")
            third = await store.cas.snapshot(work)
            assert {e.name for e in await store.cas.read_tree(third)} == {"a.txt", "b.txt", "c.txt"}
            assert await store.cas.read_blob(await store.cas.write_blob(b"y")) == b"y"
            (work / "d.txt").write_text("d\n")
            fourth = await store.cas.snapshot(work)
            assert {e.name for e in await store.cas.read_tree(fourth)} == {"a.txt", "b.txt", "c.txt", "d.txt"}
        assert cache_dir.read_bytes() == b"not a directory"

    async def test_a_full_disk_under_the_stat_cache_fails_nothing(self, tmp_path: Path) -> None:
        """The same on a real full file system: the store's cache directory on a full tmpfs."""
        small = tmp_path / "small"
        small.mkdir()
        mount = ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)]
        if os.geteuid() != 0 or subprocess.run(mount, capture_output=True, check=False).returncode != 0:
            pytest.skip("mounting a small tmpfs needs root (the monkeypatched ENOSPC test covers the rest)")
        try:
            work = tmp_path / "work"
            work.mkdir()
            (work / "a.txt").write_text("a\n")
            root = tmp_path / ".pforge"
            async with open_store(root):
                pass
            shutil.rmtree(root / "cache", ignore_errors=True)
            (small / "cache").mkdir()
            (root / "cache").symlink_to(small / "cache")
            fd = os.open(small / "filler", os.O_WRONLY | os.O_CREAT)
            try:
                with pytest.raises(OSError) as full:
                    while True:
                        os.write(fd, b"\0" * 4096)
                assert full.value.errno == errno.ENOSPC
            finally:
                os.close(fd)
            async with open_store(root, watch_workspaces=False) as store:
                tree = await store.cas.snapshot(work)
                (work / "b.txt").write_text("b\n")
                assert await store.cas.snapshot(work) != tree
                assert await store.cas.read_blob(await store.cas.write_blob(b"x")) == b"x"
                assert [p.name for p in (small / "cache").iterdir()] == []  # no temp file left
                os.unlink(small / "filler")
                await store.cas.snapshot(work)
            # Written after the replies, by the close at the latest.
            assert [p.name for p in (small / "cache").iterdir() if p.name.startswith("snapshot-")]
        finally:
            subprocess.run(["umount", str(small)], capture_output=True, check=False)

    async def test_a_failing_command_fails_only_its_caller_in_a_batch(self, tmp_path: Path) -> None:
        work = tmp_path / "work"
        work.mkdir()
        (work / "git~1").write_text("refused\n")
        async with open_store(tmp_path / ".pforge") as store:
            results: dict[str, object] = {}

            async def put(i: int) -> None:
                results[f"blob{i}"] = await store.cas.write_blob(b"blob %d" % i)

            async def snap() -> None:
                try:
                    await store.cas.snapshot(work)
                except PforgeError as exc:
                    results["snapshot"] = exc

            async with anyio.create_task_group() as tg:
                for i in range(8):
                    tg.start_soon(put, i)
                tg.start_soon(snap)
                for i in range(8, 16):
                    tg.start_soon(put, i)
            assert isinstance(results["snapshot"], InvalidInput)
            for i in range(16):
                assert await store.cas.read_blob(str(results[f"blob{i}"])) == b"blob %d" % i

    @pytest.mark.parametrize("name", ["refs/heads/" + "a" * 5000, "refs/heads/" + "\u00e9" * 3000, "refs/heads/a\0b"])
    async def test_a_bad_ref_name_that_reaches_the_actor_fails_only_its_caller(self, tmp_path: Path, name: str) -> None:
        async with open_store(tmp_path / ".pforge") as store:
            blob = await store.cas.write_blob(b"x")
            actor = store.cas._actor
            with pytest.raises(PforgeError) as caught:
                await actor.call(UpdateRef(name, blob))
            assert not isinstance(caught.value, ActorClosed)
            assert len(str(caught.value)) < 1000
            assert await store.cas.read_blob(await store.cas.write_blob(b"y")) == b"y"
            await store.cas.update_ref("refs/heads/main", blob)
            assert await store.cas.get_ref("refs/heads/main") == blob


class TestRestoreFailure:
    async def test_a_failed_restore_leaves_nothing_it_wrote(self, tmp_path: Path) -> None:
        work = tmp_path / "work"
        (work / "a" / "b").mkdir(parents=True)
        (work / "a" / "b" / "c.txt").write_text("c\n")
        (work / "a" / "link").symlink_to("b")
        (work / "a.txt").write_text("a\n")
        (work / "b.bin").write_bytes(os.urandom((1 << 20) + 1))  # stored loose
        (work / "z.txt").write_text("z\n")
        async with open_store(tmp_path / ".pforge") as store:
            tree = await store.cas.snapshot(work)
            big = next(e.oid for e in await store.cas.read_tree(tree) if e.name == "b.bin")
            os.unlink(store.cas.path / "objects" / big[:2] / big[2:])  # lost: its restore fails midway
            target = tmp_path / "out"
            with pytest.raises(PforgeError):
                await store.cas.restore(tree, target)
            assert os.listdir(target) == []  # a/ and a.txt, restored before, are gone; no temp file
            # The target is empty again, so a good restore into it works.
            good = await store.cas.write_tree([("ok.txt", "100644", await store.cas.write_blob(b"ok"))])
            await store.cas.restore(good, target)
            assert os.listdir(target) == ["ok.txt"]


class TestLifecycle:
    async def test_calls_after_close_raise_actor_closed(self, tmp_path: Path) -> None:
        work = tmp_path / "work"
        work.mkdir()
        (work / "a.txt").write_text("a\n")
        async with open_store(tmp_path / ".pforge") as store:
            tree = await store.cas.snapshot(work)
            assert await store.cas.snapshot(work) == tree  # answered by the watch
        # The watch's descriptor is closed; its number may now be another file's.
        reused = [os.open(work / "a.txt", os.O_RDONLY) for _ in range(8)]
        try:
            with pytest.raises(ActorClosed):
                await store.cas.snapshot(work)
            with pytest.raises(ActorClosed):
                await store.cas.restore(tree, tmp_path / "out")
            with pytest.raises(ActorClosed):
                await store.cas.write_blob(b"x")
            assert [os.lseek(fd, 0, os.SEEK_CUR) for fd in reused] == [0] * 8  # nobody read them
        finally:
            for fd in reused:
                os.close(fd)
        assert not (tmp_path / "out").exists()


class TestReadOnly:
    async def test_a_read_only_actor_writes_nothing(self, tmp_path: Path) -> None:
        work = tmp_path / "work"
        work.mkdir()
        (work / "a.txt").write_text("a\n")
        root = tmp_path / ".pforge"
        async with open_store(root) as store:
            blob = await store.cas.write_blob(b"kept")
        before = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
        actor = CasActor(root / "cas", root / "locks" / "cas-refs.lock", fsync=False, readonly=True)
        async with anyio.create_task_group() as tg:
            await tg.start(actor.run)
            try:
                with pytest.raises(InvalidInput, match="read-only"):
                    await actor.call(UpdateRef("refs/heads/main", blob))
                with pytest.raises(InvalidInput, match="read-only"):
                    await actor.call(PutObjects([(3, b"new")]))
                with pytest.raises(InvalidInput, match="read-only"):
                    await actor.call(Snapshot(os.fsencode(work), os.fsencode(root / "cache" / "x"), []))
                assert actor.odb.read_blob(blob) == b"kept"
            finally:
                await actor.aclose()
        assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == before

    async def test_a_read_only_actor_creates_no_repository(self, tmp_path: Path) -> None:
        actor = CasActor(tmp_path / "cas", tmp_path / "lock", fsync=False, readonly=True)
        with pytest.raises(StorageError):
            await actor.run()
        assert not (tmp_path / "cas").exists()
