"""Everything the CAS accepts, git accepts; ``store.check()`` finds what ``git fsck --strict`` finds.

git itself is the oracle: accepted trees and commits must pass ``git fsck --strict``, raw objects that
other tools wrote into the repository must be named by ``check()`` wherever git names them, and the
names the CAS refuses must be names git rejects (apart from the few documented stricter rules).
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import subprocess
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pforge_async import IntegrityError, InvalidInput, ObjectNotFound, StorageError, open_store
from pforge_async.cas.gitrules import dotfile_blob_problem, tree_name_problem
from pforge_async.store import Store

pytestmark = pytest.mark.anyio

FILE, EXEC, LINK, DIR, GITLINK = 0o100644, 0o100755, 0o120000, 0o40000, 0o160000
OID_RE = re.compile(r"\b[0-9a-f]{64}\b")


# -- git as the oracle -----------------------------------------------------------------------------


def git_fsck_named(gitdir: Path) -> tuple[int, set[str], str]:
    """Run ``git fsck --strict``: its exit status, every object id its errors name, its output. Its
    warnings (``gitmodulesParse``: a ``.gitmodules`` git cannot parse, which it accepts) name none."""
    proc = subprocess.run(
        ["git", f"--git-dir={gitdir}", "fsck", "--strict", "--no-dangling", "--no-progress"],
        capture_output=True,
        text=True,
        check=False,
    )
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if not line.startswith(("notice:", "dangling"))]
    named = {oid for line in lines if not line.startswith("warning") for oid in OID_RE.findall(line)}
    return proc.returncode, named, "\n".join(lines)


def assert_git_fsck_clean(gitdir: Path) -> None:
    code, named, output = git_fsck_named(gitdir)
    assert code == 0 and not named, output


def put_loose(gitdir: Path, kind: bytes, body: bytes) -> str:
    """Write an object as ``git hash-object --literally -w`` would: no check at all."""
    data = b"%s %d\0" % (kind, len(body)) + body
    oid = hashlib.sha256(data).hexdigest()
    path = gitdir / "objects" / oid[:2] / oid[2:]
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(zlib.compress(data))
    return oid


def raw_tree(*entries: tuple[bytes, bytes, str]) -> bytes:
    """A tree body from ``(mode text, name, hex oid)`` in the order given (no sorting, no checks)."""
    return b"".join(b"%s %s\0" % (mode, name) + bytes.fromhex(oid) for mode, name, oid in entries)


def commit_body(tree: str, ident: bytes = b"A U Thor <a@example.com> 1700000000 +0000", tail: bytes = b"") -> bytes:
    return b"tree %s\nauthor %s\ncommitter %s\n\nmessage\n%s" % (tree.encode(), ident, ident, tail)


@contextmanager
def store_in_portal(root: Path) -> Iterator[tuple[anyio.from_thread.BlockingPortal, Store]]:
    """An open store usable from synchronous code (hypothesis drives its examples synchronously)."""
    with anyio.from_thread.start_blocking_portal("asyncio") as portal:
        with portal.wrap_async_context_manager(open_store(root)) as store:
            yield portal, store


# -- names: hypothesis biased to the spellings git refuses -----------------------------------------

NASTY_NAMES = [
    ".git",
    ".GIT",
    ".Git",
    ".git.",
    ".git ",
    ".git. . ",
    ".git::$INDEX_ALLOCATION",
    "git~1",
    "GIT~1",
    "Git~1 .",
    ".g\u200cit",
    ".\u200dgit",
    ".gi\u200et",
    ".git\u200f",
    ".g\u202ait",
    ".g\u206fit",
    "\ufeff.git",
    ".GI\ufeffT",
    ".git\\hooks",
    "x\\.git",
    "x\\.git\\y",
    "x\\git~1",
    ".gitmodules",
    ".GITMODULES",
    ".gitmodules.",
    ".gitmodules :$DATA",
    "gitmod~1",
    "GITMOD~4",
    "gi7eba~1",
    "x\\.gitmodules",
    ".gitattributes",
    "gitatt~1",
    "gi7d29~2",
    ".gitignore",
    "gitign~1",
    ".mailmap",
    "mailma~1",
    ".",
    "..",
    "",
    "a/b",
    "/abs",
    "..\\..",
    ".gitx",
    "git~2",
    "gitmod~5",
    "x.git",
    ".git-foo",
    "ordinary.txt",
    os.fsdecode(b"caf\xe9"),
    os.fsdecode(b".git\xff"),
    os.fsdecode(b".g\xe2\x80it"),
]
PIECES = [".", "g", "i", "t", "G", "I", "T", "~", "1", "4", " ", "\\", ":", "\u200c", "\ufeff", "m", "o", "d"]
PIECES += ["u", "l", "e", "s", "a", "r", "b", "x", "/", os.fsdecode(b"\xff"), "é", "ü"]

names = st.one_of(
    st.sampled_from(NASTY_NAMES),
    st.from_regex(r"[A-Za-z0-9._~ -]{1,10}", fullmatch=True),
    st.lists(st.sampled_from(PIECES), min_size=1, max_size=14).map("".join),
    st.binary(min_size=1, max_size=12).map(os.fsdecode),
    st.text(min_size=1, max_size=12),
)
# Mostly modes the CAS takes, some it refuses (a gitlink, modes git --strict rejects, zero-padding).
modes = st.sampled_from([FILE] * 4 + [EXEC, LINK, LINK, DIR, DIR, "100644", "40000"] + [GITLINK, 0o100664, "040000"])


prefixes = st.sampled_from(["", "d/", "d/e/"])
rightly = st.sampled_from([True] * 5 + [False])  # whether the object's type matches the mode


class Targets:
    """One blob (also valid as .gitmodules / .gitattributes / a symlink target) and one tree."""

    def __init__(self, portal: anyio.from_thread.BlockingPortal, store: Store) -> None:
        self.blob = portal.call(store.cas.write_blob, b"[core]\n\tx = 1\n")
        self.tree = portal.call(store.cas.write_tree, [("inner.txt", FILE, self.blob)])

    def pick(self, mode: object, draw_right: bool) -> str:
        wants_tree = mode in (DIR, "40000", "040000")
        return self.tree if wants_tree == draw_right else self.blob


def test_every_tree_write_tree_accepts_passes_git_fsck(tmp_path: Path) -> None:
    root = tmp_path / ".pforge"
    outcome = {"stored": 0, "refused": 0}
    with store_in_portal(root) as (portal, store):
        targets = Targets(portal, store)

        @settings(
            max_examples=400,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        )
        @given(st.lists(st.tuples(prefixes, names, modes, rightly), min_size=1, max_size=2))
        def write_one(entries: list[tuple[str, str, object, bool]]) -> None:
            items: Any = [(prefix + name, mode, targets.pick(mode, right)) for prefix, name, mode, right in entries]
            try:
                portal.call(store.cas.write_tree, items)
            except InvalidInput:
                outcome["refused"] += 1
            else:
                outcome["stored"] += 1

        write_one()
        assert portal.call(store.cas.write_blob, b"still serving")
    # Both sides were exercised, and one git fsck over everything stored passes.
    assert outcome["stored"] > 40 and outcome["refused"] > 40, outcome
    assert_git_fsck_clean(root / "cas")


authors = st.one_of(
    st.sampled_from(
        [
            "A U Thor <a@example.com>",
            " <>",
            "a <b> c <d>",
            "x<y> <z>",
            "x <y>>",
            "x <<y>",
            "x\n <y>",
            "x <y\n>",
            "x <y",
            "<y>",
            "x<y>",
            "x <y\0>",
            "n\ud800 <e>",
            "Zoë <zoë@exämple.com>",
            "",
        ]
    ),
    st.builds(lambda n, e: f"{n} <{e}>", st.text(max_size=8), st.text(max_size=8)),
)
timestamps = st.one_of(
    st.sampled_from([None, 0, 1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64, 2**64 + 1, -1, -(2**63), 1.5, True]),
    st.integers(min_value=-(2**70), max_value=2**70),
)
messages = st.one_of(st.text(max_size=40), st.sampled_from(["", "\n\n\n", "a\0b", "\ud800", "x\n\nKey: v", "\r\n"]))
metadata = st.one_of(
    st.none(),
    st.dictionaries(
        st.one_of(st.sampled_from(["Key", "a-b", "-x", "", "k\ud800", "é", "K:"]), st.text(max_size=6)),
        st.one_of(st.sampled_from(["v", "", "a\nb", "\0", "\ud800", " sp "]), st.text(max_size=10)),
        max_size=3,
    ),
)


def test_every_commit_write_commit_accepts_passes_git_fsck(tmp_path: Path) -> None:
    root = tmp_path / ".pforge"
    outcome = {"stored": 0, "refused": 0}
    with store_in_portal(root) as (portal, store):
        targets = Targets(portal, store)

        @settings(
            max_examples=300,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        )
        @given(authors, timestamps, messages, metadata)
        def write_one(author: str, timestamp: Any, message: str, meta: dict[str, str] | None) -> None:
            try:
                portal.call(
                    lambda: store.cas.write_commit(
                        targets.tree, message=message, author=author, timestamp=timestamp, metadata=meta
                    )
                )
            except InvalidInput:
                outcome["refused"] += 1
            else:
                outcome["stored"] += 1

        write_one()
    assert outcome["stored"] > 20 and outcome["refused"] > 20, outcome
    assert_git_fsck_clean(root / "cas")


# -- the named examples, each refused and nothing stored -------------------------------------------


async def object_count(store: Store) -> int:
    return (await store.cas.fsck()).checked


REFUSED_ENTRIES = [
    (".git.", FILE),
    (".git ", FILE),
    ("git~1", FILE),
    ("GIT~1", FILE),
    (".g\u200cit", FILE),
    (".git\\hooks", FILE),
    ("sub/.GIT", DIR),
    ("sub/x\\.git", FILE),
    (".gitmodules", LINK),
    ("GITMOD~1", LINK),
    ("d/.gitattributes", LINK),
    (".gitignore", LINK),
    (".mailmap", LINK),
    (".gitmodules/inner", FILE),
    ("sub", GITLINK),
]


async def test_names_and_modes_git_rejects_are_refused(tmp_path: Path) -> None:
    async with open_store(tmp_path / ".pforge") as store:
        blob = await store.cas.write_blob(b"x")
        tree = await store.cas.write_tree([("f", FILE, blob)])
        before = await object_count(store)
        wrong = []
        for path, mode in REFUSED_ENTRIES:
            target = tree if mode == DIR else blob
            try:
                await store.cas.write_tree([(path, mode, target), ("fine.txt", FILE, blob)])
            except InvalidInput as exc:
                if repr(path) not in str(exc):
                    wrong.append((path, f"message does not name it: {exc}"))
            else:
                wrong.append((path, "accepted"))
        assert not wrong
        assert await object_count(store) == before
    assert_git_fsck_clean(tmp_path / ".pforge" / "cas")


async def test_entry_types_must_match_their_mode(tmp_path: Path) -> None:
    async with open_store(tmp_path / ".pforge") as store:
        blob = await store.cas.write_blob(b"x")
        tree = await store.cas.write_tree([("f", FILE, blob)])
        before = await object_count(store)
        with pytest.raises(InvalidInput, match=r"'d'.*mode 40000.*is a blob"):
            await store.cas.write_tree([("d", DIR, blob)])
        with pytest.raises(InvalidInput, match=r"'f'.*is a tree"):
            await store.cas.write_tree([("f", FILE, tree)])
        with pytest.raises(InvalidInput, match=r"'l'.*is a tree"):
            await store.cas.write_tree([("l", LINK, tree)])
        with pytest.raises(ObjectNotFound, match="'m'"):
            await store.cas.write_tree([("m", FILE, "ab" * 32)])
        assert await object_count(store) == before
        # The right types are fine, and a directory given by id nests as git would.
        top = await store.cas.write_tree([("d", DIR, tree), ("f", FILE, blob), ("l", LINK, blob)])
        assert [e.name for e in await store.cas.read_tree(top, recursive=True)] == ["d/f", "f", "l"]
    assert_git_fsck_clean(tmp_path / ".pforge" / "cas")


REFUSED_DOTFILES = [
    (".gitmodules", b'[submodule "../../x"]\n\tpath = x\n\turl = https://example.com/x\n', "submodule name"),
    (".gitmodules", b'[submodule "x"]\n\tpath = x\n\turl = -upload-pack=evil\n', "submodule url"),
    (".gitmodules", b'[submodule "x"]\n\turl = ../../:evil\n', "submodule url"),
    (".gitmodules", b'[submodule "x"]\n\turl = https://%0aexample.com/x\n', "submodule url"),
    (".gitmodules", b'[submodule "x"]\n\tpath = --help\n', "submodule path"),
    (".gitmodules", b'[submodule "x"]\n\tupdate = !rm -rf /\n', "update setting"),
    ("GITMOD~1", b'[submodule "a\\\\..\\\\b"]\n\tpath = x\n', "submodule name"),
    (".gitattributes", b"*.c text\n" + b"x" * 3000 + b" binary\n", r"line of \d+ bytes"),
]


async def test_dotfile_contents_git_rejects_are_refused(tmp_path: Path) -> None:
    async with open_store(tmp_path / ".pforge") as store:
        for name, content, match in REFUSED_DOTFILES:
            blob = await store.cas.write_blob(content)
            with pytest.raises(InvalidInput, match=match):
                await store.cas.write_tree([(name, FILE, blob)])
            # The same bytes under another name are just a file.
            await store.cas.write_tree([("notes.txt", FILE, blob)])
        # A well-formed .gitmodules is fine.
        good = await store.cas.write_blob(b'[submodule "lib"]\n\tpath = lib\n\turl = https://example.com/lib.git\n')
        await store.cas.write_tree([(".gitmodules", FILE, good), (".gitattributes", FILE, good)])
    assert_git_fsck_clean(tmp_path / ".pforge" / "cas")


REFUSED_COMMITS: list[tuple[dict[str, Any], str]] = [
    ({"timestamp": 2**64}, "timestamp"),
    ({"timestamp": 2**63}, "timestamp"),
    ({"timestamp": -1}, "timestamp"),
    ({"timestamp": 1.5}, "timestamp"),
    ({"timestamp": True}, "timestamp"),
    ({"author": "a <b> <c>"}, "author"),
    ({"author": "a <b>c>"}, "author"),
    ({"author": "a\n <b>"}, "author"),
    ({"author": "a <b\0>"}, "author"),
    ({"author": "<b>"}, "author"),
    ({"author": "a <b\ud800>"}, "author"),
    ({"author": 5}, "author"),
    ({"message": "a\0b"}, "NUL"),
    ({"message": "x\ud800"}, "commit message"),
    ({"message": None}, "commit message"),
    ({"metadata": {"k\ud800": "v"}}, "metadata key"),
    ({"metadata": {"k": "v\ud800"}}, "metadata value"),
    ({"metadata": {"k": "a\nb"}}, "metadata value"),
    ({"metadata": {"k": 5}}, "metadata value"),
    ({"metadata": ["k", "v"]}, "metadata"),
    ({"parents": 5}, "parents"),
    ({"parents": ["x"]}, "parent"),
]


async def test_commit_fields_git_rejects_are_refused(tmp_path: Path) -> None:
    async with open_store(tmp_path / ".pforge") as store:
        tree = await store.cas.write_tree([])
        before = await object_count(store)
        for kwargs, match in REFUSED_COMMITS:
            with pytest.raises(InvalidInput, match=match):
                await store.cas.write_commit(tree, **kwargs)
        assert await object_count(store) == before
        # At git's limit exactly, the date is stored and git accepts it.
        await store.cas.write_commit(tree, timestamp=2**63 - 1, author="Zoë <zoë@example.com>", message="m\r\n")
    assert_git_fsck_clean(tmp_path / ".pforge" / "cas")


async def test_commit_links_must_be_the_right_type(tmp_path: Path) -> None:
    async with open_store(tmp_path / ".pforge") as store:
        blob = await store.cas.write_blob(b"x")
        tree = await store.cas.write_tree([("f", FILE, blob)])
        with pytest.raises(InvalidInput, match=r"tree .* is a blob"):
            await store.cas.write_commit(blob)
        with pytest.raises(InvalidInput, match=r"parent .* is a tree"):
            await store.cas.write_commit(tree, [tree])
        commit = await store.cas.write_commit(tree)
        await store.cas.write_commit(tree, [commit])
    assert_git_fsck_clean(tmp_path / ".pforge" / "cas")


# -- check() finds what git fsck --strict finds ----------------------------------------------------


def foreign_objects(gitdir: Path) -> list[str]:
    """Objects another tool wrote straight into the repository, each one git fsck --strict rejects."""
    blob = put_loose(gitdir, b"blob", b"x\n")
    tree = put_loose(gitdir, b"tree", raw_tree((b"100644", b"ok", blob)))
    bad_modules = put_loose(gitdir, b"blob", b'[submodule "../up"]\n\tpath = up\n')
    long_attributes = put_loose(gitdir, b"blob", b"y" * 5000 + b"\n")
    trees = [
        raw_tree((b"100644", b"..", blob)),
        raw_tree((b"100644", b".", blob)),
        raw_tree((b"100644", b"a/b", blob)),
        raw_tree((b"100644", b".git", blob)),
        raw_tree((b"40000", b".GIT", tree)),
        raw_tree((b"100644", b".git.", blob)),
        raw_tree((b"100644", b"git~1", blob)),
        raw_tree((b"100644", ".g\u200cit".encode(), blob)),
        raw_tree((b"100644", b".git\\hooks", blob)),
        raw_tree((b"160000", b"sub", "cd" * 32)),
        raw_tree((b"160000", b".git", "ef" * 32)),
        raw_tree((b"100664", b"group", blob)),
        raw_tree((b"040000", b"padded", tree)),
        raw_tree((b"100644", b"b", blob), (b"100644", b"a", blob)),
        raw_tree((b"100644", b"a", blob), (b"100644", b"a", blob)),
        raw_tree((b"100644", b"a", blob), (b"100644", b"a.c", blob), (b"40000", b"a", tree)),
        raw_tree((b"100644", b"null", "00" * 32)),
        raw_tree((b"120000", b".gitmodules", blob)),
        raw_tree((b"40000", b".gitmodules", tree)),
        raw_tree((b"100644", b".gitmodules", bad_modules)),
        raw_tree((b"100644", b".gitattributes", long_attributes)),
        raw_tree((b"40000", b"dir-is-a-blob", blob)),
    ]
    oids = [put_loose(gitdir, b"tree", body) for body in trees]
    commits = [
        commit_body(tree, b"A <a@x> 18446744073709551616 +0000"),
        commit_body(tree, b"A <a@x> 0123 +0000"),
        commit_body(tree, b"A <a@x> 1 +000"),
        commit_body(tree, b"A a@x> 1 +0000"),
        commit_body(tree, b"A <a@x"),
        commit_body(tree, tail=b"nul \0 in the message\n"),
        commit_body(blob),
        b"tree %s\ncommitter A <a@x> 1 +0000\n\nno author\n" % tree.encode(),
    ]
    oids += [put_loose(gitdir, b"commit", body) for body in commits]
    return oids


async def test_check_names_every_object_git_fsck_names(tmp_path: Path) -> None:
    root = tmp_path / ".pforge"
    async with open_store(root) as store:
        # A good store first: both clean.
        blob = await store.cas.write_blob(b"good")
        tree = await store.cas.write_tree([("a/b.txt", FILE, blob), (".gitmodules", FILE, blob)])
        await store.cas.update_ref("refs/heads/main", await store.cas.write_commit(tree))
        assert (await store.check()).problems == []
        assert_git_fsck_clean(root / "cas")

        planted = foreign_objects(root / "cas")
        code, git_named, output = git_fsck_named(root / "cas")
        assert code != 0
        problems = (await store.check()).problems
        text = "\n".join(problems)
        unnamed = sorted(oid for oid in git_named if oid not in text)
        assert not unnamed, f"git fsck names {unnamed} that check() does not:\n{output}\n---\n{text}"
        # Every planted object is bad in git's eyes, and check() names each (a gitlink and an
        # unsorted tree included), with a reason.
        assert all(oid in text for oid in planted), text
        assert len(git_named) >= 15, output
        assert "git fsck --strict rejects it" in text
        # The good objects are not blamed.
        assert blob not in text and tree not in text


async def test_read_tree_never_returns_a_name_git_refuses(tmp_path: Path) -> None:
    root = tmp_path / ".pforge"
    async with open_store(root) as store:
        blob = await store.cas.write_blob(b"x")
        for name in (b"..", b"a/b", b"/abs", b".git", b"GIT~1", b"."):
            bad = put_loose(root / "cas", b"tree", raw_tree((b"100644", name, blob)))
            with pytest.raises(IntegrityError, match=bad):
                await store.cas.read_tree(bad)
            outer = put_loose(root / "cas", b"tree", raw_tree((b"40000", b"outer", bad)))
            with pytest.raises(IntegrityError, match=bad):
                await store.cas.read_tree(outer, recursive=True)
            with pytest.raises(IntegrityError, match=bad):
                await store.cas.restore(outer, tmp_path / f"out-{len(name)}-{name[0]}")
        assert not (tmp_path / "outside").exists()
        assert await store.cas.read_blob(blob) == b"x"


async def test_non_utf8_names_round_trip_byte_exact(tmp_path: Path) -> None:
    root = tmp_path / ".pforge"
    raw_names = [b"caf\xe9.txt", b"\xff\xfe", "zoë".encode(), b"d\x80ir"]
    async with open_store(root) as store:
        blob = await store.cas.write_blob(b"x")
        entries = [(os.fsdecode(n) + ("/inner" if n.startswith(b"d") else ""), FILE, blob) for n in raw_names]
        tree = await store.cas.write_tree(entries)
        listed = await store.cas.read_tree(tree, recursive=True)
        assert sorted(os.fsencode(e.name) for e in listed) == sorted(
            n + (b"/inner" if n.startswith(b"d") else b"") for n in raw_names
        )
        # read_tree -> write_tree gives the same tree, so the bytes are exactly the same.
        assert await store.cas.write_tree([(e.name, e.mode, e.oid) for e in listed]) == tree
        # Through a workspace: snapshot reads the names as bytes, restore writes the same bytes.
        work = tmp_path / "work"
        work.mkdir()
        for n in raw_names:
            with open(os.path.join(os.fsencode(work), n), "wb") as f:
                f.write(b"data " + n)
        snap = await store.cas.snapshot(work)
        out = tmp_path / "out"
        await store.cas.restore(snap, out)
        assert sorted(os.listdir(os.fsencode(out))) == sorted(raw_names)
        for n in raw_names:
            with open(os.path.join(os.fsencode(out), n), "rb") as f:
                assert f.read() == b"data " + n
    listing = subprocess.run(
        ["git", f"--git-dir={root / 'cas'}", "ls-tree", "-z", "--name-only", tree], capture_output=True, check=True
    ).stdout
    assert sorted(listing.split(b"\0")[:-1]) == sorted(n for n in raw_names)
    assert_git_fsck_clean(root / "cas")


# -- every bad argument is a named error, and the store still serves -------------------------------

LONG_REF = "refs/heads/" + "x" * 5000

# The store is typed Any: these calls break the signatures on purpose.
BAD_CALLS: list[tuple[str, Callable[[Any, str, str, Path], Any]]] = [
    ("surrogate ref", lambda s, b, t, p: s.cas.update_ref("refs/heads/\ud800", b)),
    ("surrogate ref get", lambda s, b, t, p: s.cas.get_ref("refs/heads/a\udcff")),
    ("5000-char ref", lambda s, b, t, p: s.cas.update_ref(LONG_REF, b)),
    ("5000-char ref get", lambda s, b, t, p: s.cas.get_ref(LONG_REF)),
    ("300-byte component", lambda s, b, t, p: s.cas.update_ref("refs/heads/" + "é" * 150, b)),
    ("NUL ref", lambda s, b, t, p: s.cas.update_ref("refs/heads/a\0b", b)),
    ("bytes ref", lambda s, b, t, p: s.cas.get_ref(b"refs/heads/x")),
    ("surrogate path", lambda s, b, t, p: s.cas.write_tree([("a\ud800", FILE, b)])),
    ("NUL path", lambda s, b, t, p: s.cas.write_tree([("a\0b", FILE, b)])),
    ("bytes path", lambda s, b, t, p: s.cas.write_tree([(b"a", FILE, b)])),
    ("write_tree(None)", lambda s, b, t, p: s.cas.write_tree(None)),
    ("write_tree(5)", lambda s, b, t, p: s.cas.write_tree(5)),
    ("write_tree(str)", lambda s, b, t, p: s.cas.write_tree("abc")),
    ("write_tree([None])", lambda s, b, t, p: s.cas.write_tree([None])),
    ("write_tree dict", lambda s, b, t, p: s.cas.write_tree({"a": (FILE, b)})),
    ("mode None", lambda s, b, t, p: s.cas.write_tree([("a", None, b)])),
    ("mode 2**70", lambda s, b, t, p: s.cas.write_tree([("a", 2**70, b)])),
    ("surrogate message", lambda s, b, t, p: s.cas.write_commit(t, message="\ud800")),
    ("surrogate author", lambda s, b, t, p: s.cas.write_commit(t, author="a\udc80 <b>")),
    ("surrogate metadata key", lambda s, b, t, p: s.cas.write_commit(t, metadata={"\ud800": "v"})),
    ("surrogate metadata value", lambda s, b, t, p: s.cas.write_commit(t, metadata={"k": "\ud800"})),
    ("timestamp 2**64", lambda s, b, t, p: s.cas.write_commit(t, timestamp=2**64)),
    ("timestamp 1e300", lambda s, b, t, p: s.cas.write_commit(t, timestamp=1e300)),
    ("snapshot(123)", lambda s, b, t, p: s.cas.snapshot(123)),
    ("snapshot(None)", lambda s, b, t, p: s.cas.snapshot(None)),
    ("snapshot NUL", lambda s, b, t, p: s.cas.snapshot(str(p) + "\0x")),
    ("snapshot surrogate", lambda s, b, t, p: s.cas.snapshot(str(p) + "/\ud800")),
    ("restore(123, dir)", lambda s, b, t, p: s.cas.restore(123, p / "r1")),
    ("restore(tree, 123)", lambda s, b, t, p: s.cas.restore(t, 123)),
    ("restore NUL", lambda s, b, t, p: s.cas.restore(t, str(p) + "/r\0")),
    ("restore surrogate", lambda s, b, t, p: s.cas.restore(t, str(p) + "/\ud800")),
    ("read_blob(5)", lambda s, b, t, p: s.cas.read_blob(5)),
    ("read_blob surrogate", lambda s, b, t, p: s.cas.read_blob("\ud800" * 64)),
    ("read_tree(None)", lambda s, b, t, p: s.cas.read_tree(None)),
    ("read_commit(b'')", lambda s, b, t, p: s.cas.read_commit(b"")),
    ("has(2**70)", lambda s, b, t, p: s.cas.has(2**70)),
    ("write_blob(str)", lambda s, b, t, p: s.cas.write_blob("text")),
]


async def test_bad_arguments_are_invalid_input(tmp_path: Path) -> None:
    root = tmp_path / ".pforge"
    async with open_store(root) as store:
        blob = await store.cas.write_blob(b"x")
        tree = await store.cas.write_tree([("f", FILE, blob)])
        commit = await store.cas.write_commit(tree)
        wrong = []
        for label, call in BAD_CALLS:
            try:
                await call(store, blob, tree, tmp_path)
            except InvalidInput:
                pass
            except Exception as exc:  # any other class, named or not, is what this test is against
                wrong.append((label, repr(exc)))
            else:
                wrong.append((label, "accepted"))
            # Nothing reached the file system, and the store still serves everyone.
            assert [p.name for p in (root / "cas" / "refs").rglob("*") if p.is_file()] in ([], ["ok"]), label
            assert not (tmp_path / "r1").exists()
            again = await store.cas.write_blob(b"after " + label.encode())
            assert await store.cas.read_blob(again) == b"after " + label.encode()
            await store.cas.update_ref("refs/heads/ok", commit)
            assert await store.cas.get_ref("refs/heads/ok") == commit
        assert not wrong


def test_refusals_are_gits(tmp_path: Path) -> None:
    """The names the CAS refuses are names git fsck --strict rejects: each candidate is planted as a
    one-entry tree in a plain git repository and git's verdict compared with tree_name_problem's.
    The CAS is stricter only where it says so (.gitignore / .mailmap / .gitattributes symlinks, names
    over 4,096 bytes); directories named like .gitmodules are blamed by git on their target, so left out here."""
    repo = tmp_path / "repo.git"
    subprocess.run(["git", "init", "-q", "--bare", "--object-format=sha256", str(repo)], check=True)
    blob = put_loose(repo, b"blob", b"hello\n")
    candidates = {os.fsencode(n) for n in NASTY_NAMES if n and "/" not in n}
    alphabet = [os.fsencode(p) for p in PIECES if p != "/"]
    rng = random.Random(9)
    for _ in range(700):
        candidates.add(b"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 10))))
    verdicts: dict[str, tuple[bytes, int, str | None]] = {}
    for name in sorted(candidates):
        for mode in (FILE, LINK):
            oid = put_loose(repo, b"tree", raw_tree((b"%o" % mode, name, blob)))
            verdicts[oid] = (name, mode, tree_name_problem(name, mode))
    _, git_named, _ = git_fsck_named(repo)
    # git 2.39 only warns about these symlinks; the CAS refuses them.
    stricter = ("'.gitignore' or '.mailmap' that is a symlink", "'.gitattributes' that is a symlink")
    disagree = [
        (name, oct(mode), why)
        for oid, (name, mode, why) in verdicts.items()
        if (oid in git_named) != (why is not None) and not (why and why.endswith(stricter))
    ]
    assert not disagree, disagree[:20]
    assert sum(1 for _, _, why in verdicts.values() if why) > 50


def make_dir_with_file(path: Path) -> None:
    # Not empty: an empty directory has no place in a git tree, whatever its name.
    path.mkdir()
    (path / "f").write_text("x")


async def test_snapshot_refuses_what_git_rejects_and_stores_the_rest(tmp_path: Path) -> None:
    """A workspace entry git would reject fails the snapshot with InvalidInput naming it (the workspace's
    own .git directory is left out, not refused); a workspace git accepts snapshots clean."""
    root = tmp_path / ".pforge"
    bad_entries: list[tuple[str, Callable[[Path], Any]]] = [
        (".git.", lambda p: (p / ".git.").write_text("x")),
        ("GIT~1", lambda p: make_dir_with_file(p / "GIT~1")),
        (".g\u200cit", lambda p: (p / ".g\u200cit").write_text("x")),
        (".git\\hooks", lambda p: (p / ".git\\hooks").write_text("x")),
        (".gitmodules", lambda p: (p / ".gitmodules").symlink_to("elsewhere")),
        (".gitmodules", lambda p: (p / ".gitmodules").write_text('[submodule "../../x"]\n\tpath = x\n')),
        (".gitmodules", lambda p: (p / ".gitmodules").write_text('[submodule "x"]\n\turl = -evil\n')),
        (".gitattributes", lambda p: (p / ".gitattributes").write_text("a" * 4000 + " text\n")),
        (".gitattributes", lambda p: make_dir_with_file(p / ".gitattributes")),
        ("gitmod~1", lambda p: (p / "gitmod~1").write_text('[submodule "a/../.."]\n\tpath = x\n')),
    ]
    async with open_store(root) as store:
        for i, (name, make) in enumerate(bad_entries):
            work = tmp_path / f"work{i}"
            (work / "sub").mkdir(parents=True)
            (work / "sub" / "fine.txt").write_text("fine")
            make(work / "sub")
            with pytest.raises(InvalidInput, match=re.escape(name)):
                await store.cas.snapshot(work)
        good = tmp_path / "good"
        (good / ".git" / "hooks").mkdir(parents=True)
        (good / ".git" / "hooks" / "post-checkout").write_text("#!/bin/sh\n")
        (good / ".gitmodules").write_text('[submodule "lib"]\n\tpath = lib\n\turl = https://example.com/lib.git\n')
        (good / ".gitattributes").write_text("*.bin binary\n" * 200)
        (good / ".gitignore").write_text("*.o\n")
        (good / ".git-blame-ignore-revs").write_text("")
        tree = await store.cas.snapshot(good)
        names = [e.name for e in await store.cas.read_tree(tree, recursive=True)]
        assert names == [".git-blame-ignore-revs", ".gitattributes", ".gitignore", ".gitmodules"]
    assert_git_fsck_clean(root / "cas")


DOTFILE_CONTENTS: list[tuple[str, bytes]] = [
    ("gitmodules", b'[submodule "ok"]\n\tpath = ok\n\turl = https://example.com/ok.git\n'),
    ("gitmodules", b'[submodule "../x"]\n\tpath = x\n'),
    ("gitmodules", b'[submodule "x/.."]\n\tpath = x\n'),
    ("gitmodules", b'[submodule "x\\\\..\\\\y"]\n\tpath = x\n'),
    ("gitmodules", b'[submodule "..."]\n\tpath = x\n'),
    ("gitmodules", b'[submodule ".."]\n'),
    ("gitmodules", b'[submodule ""]\n\tpath = x\n'),
    ("gitmodules", b"[submodule.x.y]\n\tpath = -x\n"),
    ("gitmodules", b'[SubModule "x"]\n\tPATH = -x\n'),
    ("gitmodules", b'[submodule "x"]\n\tpath = "-x"\n'),
    ("gitmodules", b'[submodule "x"]\n\tpath = \\\n-x\n'),
    ("gitmodules", b'[submodule "x"]\n\tpath = x ; -y\n'),
    ("gitmodules", b'[submodule "x"]\n\tpath = x\n\tupdate = !sh\n'),
    ("gitmodules", b'[submodule "x"]\n\tupdate = "!sh"\n'),
    ("gitmodules", b'[submodule "x"]\n\tupdate = merge\n'),
    ("gitmodules", b'[submodule "x"]\n\turl = -u\n'),
    ("gitmodules", b'[submodule "x"]\n\turl = https:///example.com/x\n'),
    ("gitmodules", b'[submodule "x"]\n\turl = https://user@/x\n'),
    ("gitmodules", b'[submodule "x"]\n\turl = https://example.com/%0a/x\n'),
    ("gitmodules", b'[submodule "x"]\n\turl = http::https://example.com/x\n'),
    ("gitmodules", b'[submodule "x"]\n\turl = http::nothing\n'),
    ("gitmodules", b'[submodule "x"]\n\turl = ./x%0ay\n'),
    ("gitmodules", b'[submodule "x"]\n\turl = ../../:x\n'),
    ("gitmodules", b'[submodule "x"]\n\turl = ..//x\n'),
    ("gitmodules", b'[submodule "x"]\n\turl = ./../x\n'),
    ("gitmodules", b'[submodule "x"]\n\turl = ../x\n'),
    ("gitmodules", b'[submodule "x"]\n\turl = git://example.com/%0a\n'),
    ("gitmodules", b'[submodule "x"]\n\turl = ssh://host/%0a\n'),
    ("gitmodules", b'[submodule "x"]\n\turl = file:///tmp/x\n'),
    ("gitmodules", b'[submodule "../crlf"]\r\n\tpath = x\r\n'),
    ("gitmodules", b'[submodule "x"]\n\tpath = "unterminated\n[submodule "../after"]\n\tpath = y\n'),
    ("gitmodules", b'[submodule "../before"]\n\tpath = y\n\tbroken line\n'),
    ("gitmodules", b"\x00\xff binary junk \xfe\n"),
    ("gitmodules", b"[core]\n\tpath = -x\n"),
    ("gitattributes", b"*.c text\n"),
    ("gitattributes", b"a" * 2047 + b"\n"),
    ("gitattributes", b"a" * 2048 + b"\n"),
    ("gitattributes", b"x\0" + b"a" * 4000),
    ("gitattributes", b"a" * 3000),
]


def test_dotfile_verdicts_are_gits(tmp_path: Path) -> None:
    """dotfile_blob_problem agrees with git fsck --strict on each .gitmodules / .gitattributes content."""
    repo = tmp_path / "repo.git"
    subprocess.run(["git", "init", "-q", "--bare", "--object-format=sha256", str(repo)], check=True)
    verdicts: dict[str, tuple[bytes, str | None]] = {}
    for kind, content in DOTFILE_CONTENTS:
        blob = put_loose(repo, b"blob", content)
        put_loose(repo, b"tree", raw_tree((b"100644", b"." + kind.encode(), blob)))
        verdicts[blob] = (content, dotfile_blob_problem(kind, content))
    _, git_named, output = git_fsck_named(repo)
    disagree = [(content, why) for oid, (content, why) in verdicts.items() if (oid in git_named) != (why is not None)]
    assert not disagree, f"{disagree}\n{output}"
    # Stricter than git in one place: git's in-memory config reader misses a UTF-8 byte order mark
    # (and stops parsing there); the CAS reads past it, as git does for a config file on disk.
    assert dotfile_blob_problem("gitmodules", b'\xef\xbb\xbf[submodule "../bom"]\n\tpath = x\n')
    assert sum(1 for _, why in verdicts.values() if why) > 20


async def test_a_storage_error_always_carries_its_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An OSError without an errno (strerror None) used to come out as 'cannot read .../big: None'."""
    import pforge_async.cas.snapshot as snapshot_module

    def failing_read(fd: int, size: int) -> bytes:
        raise OSError("the device went away")

    work = tmp_path / "work"
    work.mkdir()
    (work / "big").write_bytes(b"x" * 100)
    async with open_store(tmp_path / ".pforge") as store:
        monkeypatch.setattr(snapshot_module, "_read_all", failing_read)
        with pytest.raises(StorageError, match=r"big: .*the device went away") as info:
            await store.cas.snapshot(work)
        assert "None" not in str(info.value)
        monkeypatch.undo()
        assert await store.cas.snapshot(work)  # and the store still serves
