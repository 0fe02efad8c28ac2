"""``sessions``, ``contexts``, ``log``, ``show`` and ``tree``: what the turn store holds."""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
from typing import Any

import msgspec

from ..agent import SessionTree, load_session_tree
from ..agent.records import AssistantTurn, ToolCallEnd, UserTurn
from ..errors import ContextNotFound
from ..store import Store
from ..turnstore.rules import MAX_LIST_LIMIT
from ..turnstore.types import ContextInfo, ContextOrder, TurnRecord
from . import resolve
from .app import Cli
from .payloads import Bundles, describe_payload, export_line, summary
from .term import hexdump, json_text, ms_text, safe, safe_bytes, size_text

__all__ = ["register"]


_MAX_LIMIT = 2**63 - 1


def positive(text: str) -> int:
    # the length first: int() refuses over 4,300 digits with a ValueError of its own
    if len(text.strip().lstrip("+0")) > len(str(_MAX_LIMIT)):
        raise argparse.ArgumentTypeError(f"must be at most {_MAX_LIMIT}, got {len(text)} characters")
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    if value > _MAX_LIMIT:  # past what SQLite binds: the store would name a database as failing
        raise argparse.ArgumentTypeError(f"must be at most {_MAX_LIMIT}, got {value}")
    return value


def register(commands: Any, common: argparse.ArgumentParser) -> None:
    p = commands.add_parser("sessions", parents=[common], help="named contexts (agent sessions)")
    p.add_argument("--prefix", default="", help="only names that start with this")
    p.add_argument("--limit", type=positive, default=50, help="at most this many (default 50)")
    p.add_argument("--all", action="store_true", help="every one, however many")
    p.add_argument("--order", choices=("name", "updated", "created"), default="name")
    p.set_defaults(func=sessions)

    p = commands.add_parser("contexts", parents=[common], help="every context, named or not")
    p.add_argument("--limit", type=positive, default=50, help="at most this many (default 50)")
    p.add_argument("--all", action="store_true", help="every one, however many")
    p.add_argument("--order", choices=("created", "updated", "name"), default="created")
    p.set_defaults(func=contexts)

    p = commands.add_parser("log", parents=[common], help="a context's turns, oldest first, ending at its head")
    p.add_argument("context", metavar="CONTEXT", help="a name or an id (id:N or name:X to say which)")
    p.add_argument("--limit", type=positive, default=20, help="the last N turns (default 20)")
    p.add_argument("--before", metavar="TURN", help="the turns just before this one")
    p.add_argument("--all", action="store_true", help="every turn of the context")
    p.set_defaults(func=log)

    p = commands.add_parser("show", parents=[common], help="one turn, its payload decoded")
    p.add_argument("turn", metavar="TURN", help="a turn id")
    p.add_argument("--full", action="store_true", help="all of a long binary payload, not its first 4 KiB")
    p.set_defaults(func=show)

    p = commands.add_parser("tree", parents=[common], help="a session's subagent tree, summarised")
    p.add_argument("session", metavar="SESSION", help="a session name (or a context id)")
    p.set_defaults(func=tree)


# -- sessions / contexts --------------------------------------------------------------------------


async def _page(
    store: Store, prefix: str | None, order: ContextOrder, limit: int | None
) -> tuple[list[ContextInfo], bool]:
    found: list[ContextInfo] = []
    cursor: str | None = None
    while True:
        want = MAX_LIST_LIMIT if limit is None else min(MAX_LIST_LIMIT, limit - len(found))
        page = await store.turns.list_contexts(prefix=prefix, order=order, after=cursor, limit=want)
        found += page.contexts
        cursor = page.cursor
        if cursor is None or (limit is not None and len(found) >= limit):
            return found, cursor is not None


async def _parent_names(store: Store, infos: list[ContextInfo]) -> dict[int, str]:
    names = {info.context_id: info.name for info in infos if info.name is not None}
    for info in infos:
        parent = info.parent_context_id
        if parent and parent not in names:
            try:
                named = (await store.turns.get_context(parent)).name
            except ContextNotFound:
                named = None
            names[parent] = named if named is not None else f"#{parent}"
    return {k: v for k, v in names.items() if v is not None}


def context_json(info: ContextInfo) -> dict[str, Any]:
    out: dict[str, Any] = msgspec.to_builtins(info)
    return out


async def _list(cli: Cli, args: argparse.Namespace, prefix: str | None, what: str) -> int:
    async with cli.store() as store:
        infos, more = await _page(store, prefix, args.order, None if args.all else args.limit)
        parents = await _parent_names(store, infos)
    if cli.out.json:
        cli.out.document({"contexts": [context_json(i) for i in infos], "more": more})
        return 0
    if not infos:
        cli.out.note(f"no {what} in {cli.root_path}")
        return 0
    rows = [
        [
            info.name if info.name is not None else "-",
            str(info.context_id),
            str(info.head_turn_id),
            str(info.head_depth),
            ms_text(info.updated_at_ms),
            parents.get(info.parent_context_id, f"#{info.parent_context_id}") if info.parent_context_id else "-",
        ]
        for info in infos
    ]
    cli.out.table(["NAME", "ID", "HEAD", "DEPTH", "LAST ACTIVITY", "PARENT"], rows, right=(1, 2, 3))
    if more:
        cli.out.line(f"... more {what}: --limit N or --all")
    return 0


async def sessions(cli: Cli, args: argparse.Namespace) -> int:
    return await _list(cli, args, args.prefix, "sessions")


async def contexts(cli: Cli, args: argparse.Namespace) -> int:
    return await _list(cli, args, None, "contexts")


# -- log ------------------------------------------------------------------------------------------

_SHORT = (("pforge.agent.", ""), ("pforge.link.", "link."))


def short_type(type_id: str) -> str:
    for prefix, replacement in _SHORT:
        if type_id.startswith(prefix):
            return replacement + type_id[len(prefix) :]
    return type_id


def turn_json(turn: TurnRecord, bundles: Bundles) -> dict[str, Any]:
    """A turn as ``--json`` shows it: the same object as its ``export`` line."""
    out: dict[str, Any] = json.loads(export_line(turn, bundles))
    return out


def _log_line(turn: TurnRecord, context_id: int, bundles: Bundles) -> str:
    where = f" (context {turn.context_id})" if turn.context_id != context_id else ""
    fs = f" [fs {turn.fs_root[:12]}]" if turn.fs_root else ""
    text = summary(turn.type_id, turn.payload, bundles)
    created = ms_text(turn.created_at_ms)
    return safe(f"{turn.turn_id:>8} {turn.depth:>6}  {created}  {short_type(turn.type_id)}{where}{fs}: {text}")


async def log(cli: Cli, args: argparse.Namespace) -> int:
    out = cli.out
    async with cli.store() as store:
        info = await resolve.context(store, args.context)
        bundles = await resolve.bundles(store, cli.sql)
        header = f"context {info.context_id}" + (f" {info.name!r}" if info.name is not None else "")
        header += f": head {info.head_turn_id}, depth {info.head_depth}"
        if args.all and not out.json:
            # every turn, however many: written as they are read, a page at a time
            out.line(safe(header + (", every turn" if info.head_depth else ", no turns")))
            async for turn in store.turns.iter_turns(info.context_id):
                out.line(_log_line(turn, info.context_id, bundles))
            return 0
        if args.all:
            turns = [t async for t in store.turns.iter_turns(info.context_id)]
        else:
            before = None if args.before is None else resolve.parse_id(args.before, "turn id")
            turns = await store.turns.list_turns(info.context_id, before_turn_id=before, limit=args.limit)
    older = turns[0].depth - 1 if turns else 0
    if out.json:
        out.document({"context": context_json(info), "turns": [turn_json(t, bundles) for t in turns], "older": older})
        return 0
    out.line(safe(header + (f", {len(turns)} shown" if turns else ", no turns")))
    for turn in turns:
        out.line(_log_line(turn, info.context_id, bundles))
    if older:
        again = f"pforge log {shlex.quote(args.context)} --before {turns[0].turn_id}"
        out.line(safe(f"... {older} older turn(s): {again}, or --limit N, or --all"))
    return 0


# -- show -----------------------------------------------------------------------------------------

_SHOW_BYTES = 4096


async def show(cli: Cli, args: argparse.Namespace) -> int:
    async with cli.store() as store:
        record = await resolve.turn(store, args.turn)
        bundles = await resolve.bundles(store, cli.sql)
        try:
            context = await store.turns.get_context(record.context_id)
        except ContextNotFound:
            context = None
    view = describe_payload(record.type_id, record.payload, bundles)
    verified = hashlib.sha256(record.payload).hexdigest() == record.payload_hash
    if cli.out.json:
        fields = msgspec.to_builtins(record)
        fields.pop("payload")
        fields["context_name"] = None if context is None else context.name
        fields["payload_verified"] = verified
        cli.out.document({"turn": fields, "payload": view.as_json(record.payload)})
        return 0
    out = cli.out
    named = f" ({context.name})" if context is not None and context.name is not None else ""
    schema = view.schema
    typed = f" ({schema.name}, bundle {schema.bundle_id})" if schema is not None and schema.name else ""
    rows = [
        ("turn", str(record.turn_id)),
        ("context", f"{record.context_id}{named}"),
        ("parent", str(record.parent_turn_id) if record.parent_turn_id else "- (first turn)"),
        ("depth", str(record.depth)),
        ("type", f"{record.type_id} v{record.type_version}{typed}"),
        ("created", f"{ms_text(record.created_at_ms)} ({record.created_at_ms} ms)"),
        ("key", record.idempotency_key if record.idempotency_key is not None else "-"),
        ("fs_root", record.fs_root or "-"),
        (
            "payload",
            f"{len(record.payload)} bytes, sha256 {record.payload_hash} "
            + ("(verified)" if verified else "(DOES NOT MATCH)"),
        ),
    ]
    for key, value in rows:
        out.line(f"{key:<8} {safe(value)}")
    for problem in view.problems:
        out.line(safe(f"note: {problem}"))
    out.line()
    payload = record.payload
    if view.kind in ("record", "msgpack", "json"):
        out.line(f"-- {view.kind if view.kind != 'record' else 'agent record (msgpack)'}:")
        out.line(json_text(view.value, indent=2))
    elif view.kind == "text":
        out.line("-- text:")
        out.line(safe(view.value, lines=True))
    elif view.kind == "empty":
        out.line("-- empty payload")
    else:
        shown = payload if args.full else payload[:_SHOW_BYTES]
        printable = sum(1 for b in shown if 0x20 <= b < 0x7F or b in (9, 10, 13))
        if shown and printable / len(shown) >= 0.75:
            out.line("-- binary (escaped):")
            out.line(safe_bytes(shown))
        else:
            out.line("-- binary (hex):")
            for line in hexdump(shown):
                out.line(line)
        if len(shown) < len(payload):
            out.line(f"... {len(payload) - len(shown)} more bytes (--full shows them)")
    return 0


# -- tree -----------------------------------------------------------------------------------------


def _state(tree: SessionTree) -> str:
    closed = tree.closed
    if closed is not None:
        return f"closed: {getattr(closed.record, 'outcome', '?')}"
    if tree.end is not None:
        return f"ended: {tree.end.outcome}"
    return "open"


def _counts(tree: SessionTree) -> dict[str, int]:
    counts: dict[str, int] = {}
    for recorded in tree.records:
        kind = short_type(recorded.type_id)
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def _usage(tree: SessionTree) -> tuple[int, int]:
    tokens = cost = 0
    for recorded in tree.records:
        record = recorded.record
        if isinstance(record, AssistantTurn) and record.usage is not None:
            tokens += record.usage.input_tokens + record.usage.output_tokens
            cost += record.usage.cost
    return tokens, cost


def _task(tree: SessionTree) -> str | None:
    for recorded in tree.records:
        if isinstance(recorded.record, UserTurn):
            return recorded.record.text
    return None


def _call_json(call: Any) -> dict[str, Any]:
    end = call.end.record if call.end is not None else None
    out: dict[str, Any] = {
        "call_id": call.call_id,
        "name": call.name,
        "start_turn_id": None if call.start is None else call.start.turn.turn_id,
        "end_turn_id": None if call.end is None else call.end.turn.turn_id,
        "fs_root": call.fs_root,
    }
    if isinstance(end, ToolCallEnd):
        out |= {"error": end.error, "output_size": end.output.size, "truncated": end.output.truncated}
    return out


def _tree_json(tree: SessionTree) -> dict[str, Any]:
    tokens, cost = _usage(tree)
    return {
        "name": tree.name,
        "context_id": tree.context.context_id,
        "head_turn_id": tree.context.head_turn_id,
        "state": _state(tree),
        "records": len(tree.records),
        "record_types": _counts(tree),
        "other_turns": len(tree.other_turns),
        "tokens": tokens,
        "cost": cost,
        "task": _task(tree),
        "tool_calls": [_call_json(call) for call in tree.tool_calls],
        "subagents": [
            {
                "subagent_id": branch.subagent_id,
                "spawn_turn_id": branch.spawn.turn.turn_id,
                **_tree_json(branch.session),
            }
            for branch in tree.subagents
        ],
    }


def _tree_lines(tree: SessionTree, depth: int, lines: list[str]) -> None:
    pad = "  " * depth
    tokens, _ = _usage(tree)
    counts = ", ".join(f"{n} {kind}" for kind, n in sorted(_counts(tree).items()))
    lines.append(
        f"{pad}{tree.name}  (context {tree.context.context_id}, {_state(tree)}, {len(tree.records)} records, "
        f"{len(tree.tool_calls)} tool calls, {len(tree.subagents)} subagents, {tokens:,} tokens)"
    )
    task = _task(tree)
    if task is not None:
        lines.append(f"{pad}  task: {' '.join(task.split())[:100]}")
    lines.append(f"{pad}  records: {counts or 'none'}")
    if tree.other_turns:
        lines.append(f"{pad}  other turns: {len(tree.other_turns)}")
    for call in tree.tool_calls:
        end = call.end.record if call.end is not None else None
        if end is None:
            outcome = "no end recorded"
        elif isinstance(end, ToolCallEnd):
            outcome = f"error: {end.error}" if end.error else "ok"
            outcome += f", output {size_text(end.output.size)}" + (" (truncated)" if end.output.truncated else "")
        else:
            outcome = "?"
        fs = f", fs {call.fs_root[:12]}" if call.fs_root else ""
        lines.append(f"{pad}  - {call.call_id} {call.name or '?'}: {outcome}{fs}")
    for branch in tree.subagents:
        _tree_lines(branch.session, depth + 1, lines)


async def tree(cli: Cli, args: argparse.Namespace) -> int:
    async with cli.store() as store:
        name = args.session
        if await store.turns.find_context(name) is None and name.isdigit():
            info = await resolve.context(store, name)
            if info.name is None:
                raise ContextNotFound(f"context {info.context_id} has no name, so it is no session")
            name = info.name
        loaded = await load_session_tree(store, name)
    if cli.out.json:
        cli.out.document(_tree_json(loaded))
        return 0
    lines: list[str] = []
    _tree_lines(loaded, 0, lines)
    sessions = list(loaded.walk())
    calls = sum(len(t.tool_calls) for _, t in sessions)
    for line in lines:
        cli.out.line(safe(line))
    cli.out.line(f"{len(sessions)} sessions, {sum(len(t.records) for _, t in sessions)} records, {calls} tool calls")
    return 0
