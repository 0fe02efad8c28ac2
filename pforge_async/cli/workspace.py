"""``diff``, ``cat-file``, ``snapshot`` and ``restore``: workspaces and objects in the CAS."""

from __future__ import annotations

import argparse
import base64
import difflib
import os
import stat
from typing import Any

from ..cas import TreeEntry
from ..cas.objects import validate_oid
from ..errors import InvalidInput
from ..store import Store
from . import resolve
from .app import Cli
from .payloads import printable_text
from .term import Progress, hexdump, safe, safe_bytes

__all__ = ["register"]

_DIR, _LINK, _GITLINK = 0o40000, 0o120000, 0o160000


def register(commands: Any, common: argparse.ArgumentParser) -> None:
    p = commands.add_parser(
        "diff", parents=[common], help="what changed in the workspace between the snapshots of two turns"
    )
    p.add_argument("a", metavar="TURN_A", help="a turn id (its fs_root) or a tree id")
    p.add_argument("b", metavar="TURN_B", help="a turn id (its fs_root) or a tree id")
    p.add_argument("--patch", "-p", action="store_true", help="a unified diff of every changed text file")
    p.set_defaults(func=diff)

    p = commands.add_parser("cat-file", parents=[common], help="one CAS object: a blob, a tree or a commit")
    p.add_argument("oid", metavar="OID", help="the object id (64 hex characters)")
    p.add_argument("-t", dest="type_only", action="store_true", help="only its type")
    p.set_defaults(func=cat_file)

    p = commands.add_parser("snapshot", parents=[common], help="store a directory, print its tree id")
    p.add_argument("directory", metavar="DIR")
    p.set_defaults(func=snapshot)

    p = commands.add_parser("restore", parents=[common], help="recreate a tree in a new or empty directory")
    p.add_argument("tree", metavar="TREE", help="a tree id, or a turn id for its fs_root")
    p.add_argument("directory", metavar="DIR", help="missing or empty")
    p.set_defaults(func=restore)


# -- diff -----------------------------------------------------------------------------------------


def _mode(mode: int) -> str:
    return f"{mode:o}"


def _is_text(data: bytes) -> bool:
    if b"\0" in data[:8000]:
        return False
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


async def _patch(store: Store, path: str, old: TreeEntry | None, new: TreeEntry | None) -> list[str]:
    """A unified diff of one file, or a line saying the file is binary or not a file."""
    for entry in (old, new):
        if entry is not None and entry.mode == _GITLINK:
            return [f"Submodule {path} differs"]
    before = b"" if old is None else await store.cas.read_blob(old.oid)
    after = b"" if new is None else await store.cas.read_blob(new.oid)
    a = "/dev/null" if old is None else f"a/{path}"
    b = "/dev/null" if new is None else f"b/{path}"
    if not (_is_text(before) and _is_text(after)):
        return [f"Binary files {a} and {b} differ"]
    lines = difflib.unified_diff(
        before.decode().splitlines(keepends=True), after.decode().splitlines(keepends=True), a, b
    )
    out = []
    for line in lines:
        if line.endswith("\n"):
            out.append(line[:-1])
        else:
            out.append(line)
            out.append("\\ No newline at end of file")
    return out


async def diff(cli: Cli, args: argparse.Namespace) -> int:
    async with cli.store() as store:
        tree_a, what_a = await resolve.tree_of(store, args.a)
        tree_b, what_b = await resolve.tree_of(store, args.b)
        old = {e.name: e for e in await store.cas.read_tree(tree_a, recursive=True)}
        new = {e.name: e for e in await store.cas.read_tree(tree_b, recursive=True)}
        changes: list[tuple[str, str, TreeEntry | None, TreeEntry | None]] = []
        for path in sorted(old.keys() | new.keys(), key=lambda p: p.encode("utf-8", "surrogateescape")):
            a, b = old.get(path), new.get(path)
            if a is None:
                changes.append(("A", path, a, b))
            elif b is None:
                changes.append(("D", path, a, b))
            elif (a.mode, a.oid) != (b.mode, b.oid):
                changes.append(("M", path, a, b))
        patch: list[str] = []
        if args.patch:
            for status, path, a, b in changes:
                if status != "M" or a is None or b is None or a.oid != b.oid:
                    patch += await _patch(store, path, a, b)
                else:
                    patch += [f"mode change {_mode(a.mode)} => {_mode(b.mode)} {path}"]
    added = sum(1 for c in changes if c[0] == "A")
    removed = sum(1 for c in changes if c[0] == "D")
    modified = len(changes) - added - removed
    if cli.out.json:
        doc: dict[str, Any] = {
            "a": tree_a,
            "b": tree_b,
            "added": [_entry_json(b) for s, _, _, b in changes if s == "A" and b is not None],
            "removed": [_entry_json(a) for s, _, a, _ in changes if s == "D" and a is not None],
            "modified": [
                {
                    "path": a.name,
                    "old_mode": _mode(a.mode),
                    "new_mode": _mode(b.mode),
                    "old_oid": a.oid,
                    "new_oid": b.oid,
                }
                for s, _, a, b in changes
                if s == "M" and a is not None and b is not None
            ],
        }
        if args.patch:
            doc["patch"] = "\n".join(patch) + ("\n" if patch else "")
        cli.out.document(doc)
        return 0
    out = cli.out
    out.line(f"{what_a} -> {what_b}: {added} added, {removed} removed, {modified} modified")
    for status, path, a, b in changes:
        extra = ""
        if status == "M" and a is not None and b is not None and a.mode != b.mode:
            extra = f"  (mode {_mode(a.mode)} -> {_mode(b.mode)})"
        out.line(f"{status} {safe(path)}{extra}")
    if patch:
        out.line()
        for line in patch:
            out.line(safe(line))
    return 0


def _entry_json(entry: TreeEntry) -> dict[str, str]:
    return {"path": entry.name, "mode": _mode(entry.mode), "oid": entry.oid}


# -- cat-file -------------------------------------------------------------------------------------


async def _read_object(store: Store, oid: str) -> tuple[str, Any]:
    """(type, what it holds): blob bytes, tree entries or a commit. A blob is the likeliest, so it
    is asked for first; the CAS says ``InvalidInput`` when the object is of another type."""
    try:
        return "blob", await store.cas.read_blob(oid)
    except InvalidInput:
        pass
    try:
        return "tree", await store.cas.read_tree(oid)
    except InvalidInput:
        pass
    return "commit", await store.cas.read_commit(oid)


def _entry_type(mode: int) -> str:
    return "tree" if mode == _DIR else "commit" if mode == _GITLINK else "blob"


async def cat_file(cli: Cli, args: argparse.Namespace) -> int:
    oid = validate_oid(args.oid)
    async with cli.store() as store:
        kind, body = await _read_object(store, oid)
    out = cli.out
    if args.type_only:
        if out.json:
            out.document({"oid": oid, "type": kind})
        else:
            out.line(kind)
        return 0
    if kind == "blob":
        data: bytes = body
        if out.json:
            text = printable_text(data)
            if text is not None:
                out.document({"oid": oid, "type": "blob", "size": len(data), "text": text})
            else:
                b64 = base64.b64encode(data).decode("ascii")
                out.document({"oid": oid, "type": "blob", "size": len(data), "base64": b64})
            return 0
        if not out.tty:
            # into a file or a pipe: the blob's bytes as they are (``> file`` gives back the file)
            out.write_bytes(data)
            return 0
        text = printable_text(data)
        if text is not None:
            out.line(safe(text, lines=True).rstrip("\n"))
        elif sum(1 for b in data if 0x20 <= b < 0x7F) >= 0.75 * len(data):
            out.line(safe_bytes(data))
        else:
            for line in hexdump(data):
                out.line(line)
        return 0
    if kind == "tree":
        entries: list[TreeEntry] = body
        if out.json:
            out.document(
                {
                    "oid": oid,
                    "type": "tree",
                    "entries": [{**_entry_json(e), "type": _entry_type(e.mode)} for e in entries],
                }
            )
            return 0
        for e in entries:
            out.line(f"{e.mode:06o} {_entry_type(e.mode)} {e.oid}\t{safe(e.name)}")
        return 0
    commit = body
    if out.json:
        out.document(
            {
                "oid": oid,
                "type": "commit",
                "tree": commit.tree,
                "parents": list(commit.parents),
                "author": commit.author,
                "committer": commit.committer,
                "timestamp": commit.timestamp,
                "message": commit.message,
                "metadata": commit.metadata,
            }
        )
        return 0
    out.line(f"tree {commit.tree}")
    for parent in commit.parents:
        out.line(f"parent {parent}")
    out.line(safe(f"author {commit.author} {commit.timestamp}"))
    if commit.committer:
        out.line(safe(f"committer {commit.committer}"))
    out.line()
    out.line(safe(commit.message, lines=True).rstrip("\n"))
    return 0


# -- snapshot / restore ---------------------------------------------------------------------------


async def snapshot(cli: Cli, args: argparse.Namespace) -> int:
    directory = os.path.abspath(args.directory)
    if not os.path.isdir(directory):
        raise InvalidInput(f"cannot snapshot {directory}: not a directory")
    async with cli.store(write=True) as store:
        async with Progress(f"snapshot {os.path.basename(directory) or directory}").running():
            tree = await store.cas.snapshot(directory)
        files = len(await store.cas.read_tree(tree, recursive=True))
    if cli.out.json:
        cli.out.document({"tree": tree, "directory": directory, "files": files})
    else:
        cli.out.line(tree)
        cli.out.note(f"{files} file(s) of {directory} stored as tree {tree[:12]}")
    return 0


def _check_target(directory: str) -> None:
    """A target that is a file, or lies below one, is the user's mistake (exit 2). The restore would
    refuse it too, but as the storage failing (exit 1)."""
    try:
        is_dir = stat.S_ISDIR(os.stat(directory).st_mode)
    except FileNotFoundError:
        return  # the restore creates it
    except NotADirectoryError:
        raise InvalidInput(f"cannot restore into {directory}: a path above it is not a directory") from None
    except OSError:
        return  # the restore names what is wrong
    if not is_dir:
        raise InvalidInput(f"cannot restore into {directory}: it is not a directory")


async def restore(cli: Cli, args: argparse.Namespace) -> int:
    directory = os.path.abspath(args.directory)
    cli.refuse_inside(directory, "restore into")
    _check_target(directory)
    async with cli.store() as store:
        tree, what = await resolve.tree_of(store, args.tree)
        files = len(await store.cas.read_tree(tree, recursive=True))
        async with Progress(f"restore {what}").running():
            await store.cas.restore(tree, directory)
    if cli.out.json:
        cli.out.document({"tree": tree, "directory": directory, "files": files})
    else:
        cli.out.line(safe(f"restored {what} (tree {tree[:12]}, {files} file(s)) into {directory}"))
    return 0
