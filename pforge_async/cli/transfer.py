"""``export`` and ``import``: a context's chain of turns as JSON Lines, and back.

One line per turn, oldest first (depth 1 to the head), each a JSON object with the turn's fields and
its payload in the most readable form that gives back the very same bytes (see
:mod:`.payloads`). ``import`` reads such a file into a new context: the same types, versions,
payloads, idempotency keys and workspace snapshots, in the same order, so exporting the new context
gives the same lines but for the ids and times the store allocates. Everything in the file is read
and checked (every payload against its hash) before anything is written; the turns are then
appended in batches of up to 4,096, each batch all or nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import stat
import sys
from typing import Any, TextIO

from ..errors import InvalidInput, ObjectNotFound, StorageError
from ..turnstore.commands import AppendTurn
from ..turnstore.rules import split_batches, validate_append
from ..turnstore.types import NewTurn
from . import resolve
from .app import Cli
from .payloads import ImportedTurn, export_line, parse_export_line
from .term import Progress, safe

__all__ = ["register"]


def register(commands: Any, common: argparse.ArgumentParser) -> None:
    p = commands.add_parser("export", parents=[common], help="a context's turns as JSON Lines, oldest first")
    p.add_argument("context", metavar="CONTEXT", help="a name or an id")
    p.add_argument("--output", "-o", metavar="FILE", help="write here instead of stdout")
    p.set_defaults(func=export)

    p = commands.add_parser("import", parents=[common], help="read an export back into a new context")
    p.add_argument("file", metavar="FILE", help="an export (- for stdin)")
    p.add_argument("--name", help="name the new context")
    p.set_defaults(func=import_)


async def export(cli: Cli, args: argparse.Namespace) -> int:
    async with cli.store() as store:
        info = await resolve.context(store, args.context)
        bundles = await resolve.bundles(store, cli.sql)
        target: TextIO | None = None
        if args.output is not None:
            cli.refuse_inside(args.output, "export to")
            try:
                # a local file, written line by line as the turns come: no need for a thread per line
                target = open(args.output, "w", encoding="utf-8")  # noqa: SIM115, ASYNC230 - closed below
            except OSError as exc:
                raise StorageError(f"cannot write {args.output}: {exc.strerror}") from exc
        progress = Progress(f"export {info.name or info.context_id}", total=info.head_depth)
        progress.start()
        written = 0
        try:
            async for turn in store.turns.iter_turns(info.context_id):
                line = export_line(turn, bundles) + "\n"
                if target is None:
                    cli.out.write(line)
                else:
                    _write(target, args.output, line)
                written += 1
                progress.advance()
            if target is not None:
                file, target = target, None
                _write(file, args.output, None)
        except BaseException:
            if args.output is not None:
                _discard(target, args.output)
            raise
        finally:
            progress.close()
    if args.output is not None:
        cli.out.note(f"exported {written} turn(s) of context {info.context_id} to {args.output}")
    return 0


def _write(target: TextIO, path: str, line: str | None) -> None:
    """A line into the export file, or (``line`` None) its last flush and close."""
    try:
        if line is None:
            target.close()
        else:
            target.write(line)
    except OSError as exc:
        raise StorageError(f"cannot write {path}: {exc.strerror}") from exc


def _discard(target: TextIO | None, path: str) -> None:
    """An export that failed part way: its lines would import as a whole chain, shorter than the
    context's, so the file goes (a device or a pipe named by ``-o`` stays, of course)."""
    if target is not None:
        with contextlib.suppress(OSError):
            target.close()
    with contextlib.suppress(OSError):
        if stat.S_ISREG(os.lstat(path).st_mode):
            os.unlink(path)


def _read(file: str) -> list[ImportedTurn]:
    try:
        if file == "-":
            if sys.stdin is None:  # started with stdin closed (``<&-``)
                raise InvalidInput("cannot import -: standard input is closed")
            lines = sys.stdin.read().splitlines()
        else:
            with open(file, encoding="utf-8") as f:
                lines = f.read().splitlines()
    except FileNotFoundError:
        raise InvalidInput(f"no file {file}") from None
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"{file} is not UTF-8 text (an export is JSON Lines): {exc}") from exc
    except OSError as exc:
        raise StorageError(f"cannot read {file}: {exc.strerror}") from exc
    turns = [parse_export_line(line, n) for n, line in enumerate(lines, 1) if line.strip()]
    for position, turn in enumerate(turns, 1):
        if turn.depth is not None and turn.depth != position:
            raise InvalidInput(
                f"{file}: turn {position} of the file has depth {turn.depth}: an export is a whole chain, "
                "from depth 1 to its head, in order"
            )
    return turns


def _check(turns: list[ImportedTurn], file: str, max_payload: int) -> None:
    """What the turn store would refuse of each turn on its own, and a key the file repeats, refused
    before the new context is made: a batch that failed after it would leave it behind, partly filled.
    (Within one context a key names one turn: the second turn of a repeated key would be taken for a
    retry of the first, and silently dropped.)"""
    seen: dict[str, int] = {}
    for turn in turns:
        command = AppendTurn(
            1,  # the context it goes to does not exist yet: any valid id
            turn.type_id,
            turn.payload,
            type_version=turn.type_version,
            idempotency_key=turn.idempotency_key,
            fs_root=turn.fs_root,
        )
        try:
            validate_append(command, max_payload)
        except InvalidInput as exc:
            raise InvalidInput(f"{file}: line {turn.line}: {exc}") from exc
        key = turn.idempotency_key
        if key is not None:
            if key in seen:
                raise InvalidInput(
                    f"{file}: line {turn.line} repeats the idempotency key {key!r} of line {seen[key]}: one "
                    "context holds a key once (an export crossing a fork where both contexts used the key "
                    "cannot be imported into one context)"
                )
            seen[key] = turn.line


async def import_(cli: Cli, args: argparse.Namespace) -> int:
    turns = _read(args.file)
    async with cli.store(write=True) as store:
        _check(turns, args.file, store.turns.max_payload_bytes)
        # The workspace snapshots the turns point at must be in this store: checked before the
        # context is created, so a refused import leaves nothing behind.
        for oid in sorted({t.fs_root for t in turns if t.fs_root}):
            if not await store.cas.has(oid):
                raise ObjectNotFound(f"{args.file}: fs_root {oid} is not in this store's CAS")
        info = await store.turns.create_context(name=args.name)
        progress = Progress(f"import {os.path.basename(args.file)}", total=len(turns))
        progress.start()
        head = 0
        try:
            for batch in split_batches(turns):
                if not batch:
                    continue
                records = await store.turns.append_turns(
                    [
                        NewTurn(
                            info.context_id,
                            t.type_id,
                            t.payload,
                            type_version=t.type_version,
                            idempotency_key=t.idempotency_key,
                            fs_root=t.fs_root,
                        )
                        for t in batch
                    ],
                    expected_heads={info.context_id: head},
                )
                head = records[-1].turn_id
                progress.advance(len(batch))
        finally:
            progress.close()
    if cli.out.json:
        cli.out.document({"context_id": info.context_id, "name": info.name, "turns": len(turns), "head_turn_id": head})
    else:
        named = f" ({info.name})" if info.name is not None else ""
        cli.out.line(safe(f"imported {len(turns)} turn(s) into context {info.context_id}{named}, head {head}"))
    return 0
