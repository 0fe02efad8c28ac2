"""``check``, ``stats``, ``init`` and ``gc``: the store as a whole."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import anyio
import msgspec

from ..cas.pack import PackIndex
from ..errors import IntegrityError, InvalidInput, PforgeError, StorageError
from ..lifecycle import store_bytes
from ..manifest import MANIFEST
from ..turnstore.gc import validate_grace
from .app import Cli, one_line
from .term import Progress, safe, size_text

__all__ = ["register"]


def register(commands: Any, common: argparse.ArgumentParser) -> None:
    p = commands.add_parser(
        "check", parents=[common], help="verify every object, database and invariant (exit 1 if anything is wrong)"
    )
    p.set_defaults(func=check)
    p = commands.add_parser("stats", parents=[common], help="counts and bytes per part of the store")
    p.set_defaults(func=stats)
    p = commands.add_parser("init", parents=[common], help="create a store at the root (the only command that does)")
    p.set_defaults(func=init)
    p = commands.add_parser(
        "gc",
        parents=[common],
        help="reclaim turns, objects, nonces and reservations nothing live needs, and give the space back",
        description="Garbage-collect the store beside its live writers: turns no live context reaches, CAS "
        "objects no remaining turn, ref or pipeline checkpoint reaches, expired nonces and never-committed "
        "reservations; then the databases give their free pages back. Nothing younger than --grace is "
        "reclaimed: another process may be about to name it.",
    )
    p.add_argument(
        "--grace",
        type=_seconds,
        default=3600.0,
        metavar="SECONDS",
        help="leave what was made or used in the last SECONDS (default 3600; 0 only when nothing else writes)",
    )
    p.add_argument("--dry-run", action="store_true", help="only count what would be reclaimed; change nothing")
    p.set_defaults(func=gc)


# -- check ----------------------------------------------------------------------------------------


async def check(cli: Cli, args: argparse.Namespace) -> int:
    out = cli.out
    checked = 0
    corrupt: list[str] = []
    missing: list[str] = []
    try:
        async with cli.store() as store:
            async with Progress("check").running():
                report = await store.check()
        problems = list(report.problems)
        checked, corrupt, missing = report.cas.checked, report.cas.corrupt, report.cas.missing
    except (IntegrityError, StorageError) as exc:
        # A store too damaged to open at all (a database its manifest records is gone or empty):
        # that is what check found.
        problems = [f"the store cannot be opened: {one_line(str(exc))}"]
    if out.json:
        out.document(
            {
                "root": str(cli.root_path),
                "ok": not problems,
                "problems": problems,
                "objects_checked": checked,
                "corrupt_objects": corrupt,
                "missing_objects": missing,
            }
        )
    elif not problems:
        out.line(f"ok: {checked} CAS objects verified; turns, memory, nonces and budget databases sound")
    else:
        for problem in problems:
            out.line(safe(problem))
        out.note(f"{len(problems)} problem(s) in {cli.root_path}")
    return 1 if problems else 0


# -- stats ----------------------------------------------------------------------------------------


def _file_bytes(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _cas_stats(gitdir: Path) -> dict[str, Any]:
    """Loose objects and packs as they lie on disk (an object may be both loose and packed)."""
    objects = gitdir / "objects"
    loose = loose_bytes = packs = packed = pack_bytes = refs = 0
    damaged: list[str] = []
    for entry in sorted(os.listdir(objects)) if objects.is_dir() else []:
        path = objects / entry
        if len(entry) == 2 and path.is_dir():
            for name in os.listdir(path):
                if len(name) == 62 and not name.startswith("tmp"):
                    loose += 1
                    loose_bytes += _file_bytes(path / name)
    pack_dir = objects / "pack"
    for name in sorted(os.listdir(pack_dir)) if pack_dir.is_dir() else []:
        path = pack_dir / name
        if name.endswith(".pack"):
            packs += 1
            pack_bytes += _file_bytes(path)
        elif name.endswith(".idx"):
            pack_bytes += _file_bytes(path)
            try:
                packed += len(PackIndex(str(path)).offsets)
            except (PforgeError, OSError) as exc:
                damaged.append(f"{name}: {exc}")
    for _, _, files in os.walk(gitdir / "refs"):
        refs += len(files)
    total = 0
    for dirpath, _, files in os.walk(gitdir):
        total += sum(_file_bytes(Path(dirpath) / f) for f in files)
    doc: dict[str, Any] = {
        "bytes": total,
        "objects": loose + packed,
        "loose_objects": loose,
        "loose_bytes": loose_bytes,
        "packs": packs,
        "packed_objects": packed,
        "pack_bytes": pack_bytes,
        "refs": refs,
    }
    if damaged:
        doc["unreadable_pack_indexes"] = damaged
    return doc


# (file, {what: SQL that counts it})
_COUNTS: tuple[tuple[str, dict[str, str]], ...] = (
    (
        "turns.db",
        {
            "contexts": "SELECT COUNT(*) FROM contexts",
            "named_contexts": "SELECT COUNT(*) FROM contexts WHERE name IS NOT NULL",
            "turns": "SELECT COUNT(*) FROM turns",
            "payload_bytes": "SELECT COALESCE(SUM(LENGTH(payload)), 0) FROM turns",
            "turns_with_fs_root": "SELECT COUNT(*) FROM turns WHERE fs_root IS NOT NULL",
            "registry_bundles": "SELECT COUNT(*) FROM registry_bundles",
        },
    ),
    (
        "memory.db",
        {
            "transitions": "SELECT COUNT(*) FROM transitions",
            "states": "SELECT COUNT(DISTINCT state) FROM action_stats",
            "state_actions": "SELECT COUNT(*) FROM action_stats",
        },
    ),
    (
        "nonces.db",
        {
            "nonces": "SELECT COUNT(*) FROM nonces",
            "consumed": "SELECT COUNT(*) FROM nonces WHERE consumed_at_ms IS NOT NULL",
        },
    ),
    (
        "budget.db",
        {
            "vendors": "SELECT COUNT(*) FROM (SELECT vendor FROM budgets UNION SELECT vendor FROM spend_totals)",
            "budgets": "SELECT COUNT(*) FROM budgets",
            "reservations": "SELECT COUNT(*) FROM reservations",
            "held_reservations": "SELECT COUNT(*) FROM reservations WHERE state = 'held'",
            "spend_rows": "SELECT COUNT(*) FROM spend",
        },
    ),
)


async def stats(cli: Cli, args: argparse.Namespace) -> int:
    root = cli.root_path
    parts: dict[str, dict[str, Any]] = {}
    async with cli.store():  # refuses a root that holds no store, before anything is read
        parts["cas"] = await anyio.to_thread.run_sync(_cas_stats, root / "cas")
        for db, counts in _COUNTS:
            doc: dict[str, Any] = {
                "bytes": sum(_file_bytes(root / (db + suffix)) for suffix in ("", "-wal", "-shm")),
            }
            for what, sql in counts.items():
                try:
                    doc[what] = (await cli.sql.rows(db, sql))[0][0]
                except PforgeError as exc:
                    doc.setdefault("errors", []).append(f"{what}: {one_line(str(exc))}")
            parts[db] = doc
    total = 0
    for dirpath, _, files in os.walk(root):
        total += sum(_file_bytes(Path(dirpath) / f) for f in files)
    if cli.out.json:
        cli.out.document({"root": str(root), "bytes": total, "parts": parts})
        return 0
    out = cli.out
    out.line(safe(f"store {root}: {size_text(total)} on disk"))
    cas = parts["cas"]
    described = {
        "cas": f"{cas['objects']:,} objects ({cas['loose_objects']:,} loose, {cas['packed_objects']:,} in "
        f"{cas['packs']:,} packs), {cas['refs']:,} refs",
    }
    for db, counts in _COUNTS:
        doc = parts[db]
        bits = []
        for what in counts:
            if what in doc:
                value = doc[what]
                shown = size_text(value) if what.endswith("_bytes") else f"{value:,}"
                bits.append(f"{shown} {what.replace('_', ' ')}")
        bits += [f"unreadable: {e}" for e in doc.get("errors", [])]
        described[db] = ", ".join(bits)
    out.table(
        ["PART", "BYTES", "CONTENTS"],
        [[name, size_text(parts[name]["bytes"]), described[name]] for name in parts],
        right=(1,),
    )
    return 0


# -- init -----------------------------------------------------------------------------------------


async def init(cli: Cli, args: argparse.Namespace) -> int:
    root = cli.root_path
    existed = (root / MANIFEST).exists()
    async with cli.store(write=True, create=True):
        pass
    if cli.out.json:
        cli.out.document({"root": str(root), "created": not existed})
    else:
        cli.out.line(safe(f"{'a store was already at' if existed else 'created a store at'} {root}"))
    return 0


# -- gc -------------------------------------------------------------------------------------------


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    try:
        return validate_grace(value)
    except InvalidInput as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


async def gc(cli: Cli, args: argparse.Namespace) -> int:
    out = cli.out
    # The store's size as the user left it: the writable open reserves -wal blocks (up to 4 MiB a
    # database) that gc's compaction truncates again, so the report's own "before", measured after
    # the open, counts as freed what this very command made.
    before = await anyio.to_thread.run_sync(store_bytes, cli.root_path)
    async with cli.store(write=True) as store:  # an existing store only: gc never creates one
        async with Progress("gc").running():
            report = await store.gc(grace_s=args.grace, dry_run=args.dry_run)
    if report.dry_run:
        after = max(0, before - report.bytes_freed)
    else:
        after = await anyio.to_thread.run_sync(store_bytes, cli.root_path)  # closed: as the user finds it
    report = msgspec.structs.replace(report, bytes_before=before, bytes_after=after, bytes_freed=max(0, before - after))
    if out.json:
        out.document({"root": str(cli.root_path), **msgspec.to_builtins(report)})
        return 0
    verb = "would reclaim" if report.dry_run else "reclaimed"
    out.line(
        f"{verb} {report.turns_reclaimed:,} turns, {report.objects_reclaimed:,} objects, "
        f"{report.nonces_purged:,} nonces, {report.reservations_purged:,} reservations "
        f"(grace {report.grace_s:g} s)"
    )
    freed = (
        f"would free {size_text(report.bytes_freed)}" if report.dry_run else f"freed {size_text(report.bytes_freed)}"
    )
    out.line(
        safe(
            f"store {cli.root_path}: {size_text(report.bytes_before)} -> {size_text(report.bytes_after)} "
            f"on disk, {freed}, in {report.seconds:.2f} s"
        )
    )
    if report.cas.missing:
        out.note(f"{len(report.cas.missing)} object(s) named by turns or refs are missing: run `pforge check`")
    return 0
