"""The ``pforge`` command: look into a store from the shell.

``pforge check [--root .pforge]`` runs the store's own integrity check (exit status 1 if anything is
wrong); ``pforge log CONTEXT_ID`` prints a context's turns, oldest first.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import anyio

from .errors import PforgeError
from .store import DEFAULT_ROOT, open_store

__all__ = ["main"]


async def _check(root: str) -> int:
    async with open_store(root, watch_workspaces=False) as store:
        report = await store.check()
    if report.ok:
        print(f"ok: {report.cas.checked} CAS objects verified; turns, memory, nonces and budget databases sound")
        return 0
    for problem in report.problems:
        print(problem)
    print(f"{len(report.problems)} problem(s) in {root}", file=sys.stderr)
    return 1


async def _log(root: str, context_id: int, limit: int) -> int:
    async with open_store(root, watch_workspaces=False) as store:
        head = await store.turns.get_head(context_id)
        turns = await store.turns.list_turns(context_id, limit=limit)
    print(f"context {head.context_id}: head turn {head.head_turn_id}, depth {head.head_depth}")
    for turn in turns:
        text = turn.payload[:60].decode("utf-8", "replace").replace("\n", " ")
        attached = f" fs={turn.fs_root[:12]}" if turn.fs_root else ""
        print(f"{turn.turn_id:>8} d={turn.depth:<5} {turn.type_id} v{turn.type_version}{attached}: {text}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pforge", description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=DEFAULT_ROOT, help="the store (default: ./.pforge)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("check", help="verify every object, database and invariant of the store")
    log = commands.add_parser("log", help="print a context's turns, oldest first")
    log.add_argument("context_id", type=int)
    log.add_argument("--limit", type=int, default=64)
    args = parser.parse_args(argv)
    try:
        if args.command == "check":
            return anyio.run(_check, args.root)
        return anyio.run(_log, args.root, args.context_id, args.limit)
    except PforgeError as exc:
        print(f"pforge: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
