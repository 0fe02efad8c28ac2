"""``budget`` and ``memory``: the token budget ledger and constellation memory."""

from __future__ import annotations

import argparse
import time
from typing import Any

from ..errors import NotFound
from ..ledgers.budget import DAY_MS, Totals
from ..store import Store
from .app import Cli
from .sqlread import SqlReader
from .term import cost_text, finite, ms_text, safe

__all__ = ["register"]


def register(commands: Any, common: argparse.ArgumentParser) -> None:
    p = commands.add_parser("budget", parents=[common], help="spend, held and remaining per vendor")
    p.add_argument("vendor", metavar="VENDOR", nargs="?", help="only this vendor")
    p.add_argument("--tags", action="store_true", help="spend and held amounts by tag")
    p.set_defaults(func=budget)

    p = commands.add_parser("memory", parents=[common], help="what constellation memory learned in a state")
    p.add_argument("state", metavar="STATE", nargs="?", help="a state (without one: every state)")
    p.set_defaults(func=memory)


# -- budget ---------------------------------------------------------------------------------------


def _totals_json(totals: Totals) -> dict[str, int]:
    return {
        "input_tokens": totals.input_tokens,
        "output_tokens": totals.output_tokens,
        "tokens": totals.tokens,
        "cost": totals.cost,
        "held_tokens": totals.reserved_tokens,
        "held_cost": totals.reserved_cost,
        "over_tokens": totals.over_tokens,
        "over_cost": totals.over_cost,
    }


def _remaining(limit: int | None, spent: int, held: int) -> int | None:
    return None if limit is None else limit - spent - held


async def _vendor(store: Store, sql: SqlReader, vendor: str, tags: bool) -> dict[str, Any]:
    totals = await store.budget.totals(vendor)
    held = await sql.rows(
        "budget.db",
        "SELECT COUNT(*) FROM reservations WHERE vendor = ? AND state = 'held' AND expires_at_ms > ?",
        (vendor, int(time.time() * 1000)),
    )
    doc: dict[str, Any] = {"vendor": vendor, **_totals_json(totals), "held_reservations": held[0][0], "budgets": []}
    limits = await sql.rows(
        "budget.db",
        "SELECT window, token_limit, cost_limit FROM budgets WHERE vendor = ? ORDER BY window DESC",
        (vendor,),
    )
    for window, token_limit, cost_limit in limits:
        spent = totals
        if window == "day":
            spent = await store.budget.totals(vendor, since=time.time() - DAY_MS / 1000)
        doc["budgets"].append(
            {
                "window": window,
                "token_limit": token_limit,
                "cost_limit": cost_limit,
                "spent_tokens": spent.tokens,
                "spent_cost": spent.cost,
                "remaining_tokens": _remaining(token_limit, spent.tokens, spent.reserved_tokens),
                "remaining_cost": _remaining(cost_limit, spent.cost, spent.reserved_cost),
            }
        )
    if tags:
        pairs = await sql.rows(
            "budget.db",
            "SELECT DISTINCT t.tag, t.value FROM spend_tags t JOIN spend s ON s.spend_id = t.spend_id "
            "WHERE s.vendor = ? UNION SELECT DISTINCT t.tag, t.value FROM reservation_tags t "
            "JOIN reservations r ON r.reservation_id = t.reservation_id WHERE r.vendor = ? AND r.state = 'held' "
            "ORDER BY 1, 2",
            (vendor, vendor),
        )
        doc["tags"] = [
            {"tag": tag, "value": value, **_totals_json(await store.budget.totals(vendor, tags={tag: value}))}
            for tag, value in pairs
        ]
    return doc


def _amount(tokens: int, cost: int) -> str:
    return f"{tokens:,} tokens, cost {cost_text(cost)}"


async def budget(cli: Cli, args: argparse.Namespace) -> int:
    async with cli.store() as store:
        sql = cli.sql
        rows = await sql.rows(
            "budget.db",
            "SELECT vendor FROM budgets UNION SELECT vendor FROM spend_totals "
            "UNION SELECT vendor FROM reservations WHERE state = 'held' ORDER BY 1",
        )
        vendors = [str(v) for (v,) in rows]
        if args.vendor is not None:
            if args.vendor not in vendors:
                raise NotFound(f"no budget, spend or reservation for vendor {args.vendor!r}")
            vendors = [args.vendor]
        docs = [await _vendor(store, sql, vendor, args.tags) for vendor in vendors]
    if cli.out.json:
        cli.out.document({"vendors": docs})
        return 0
    if not docs:
        cli.out.note(f"no budgets, spend or reservations in {cli.root_path}")
        return 0
    out = cli.out
    for i, doc in enumerate(docs):
        if i:
            out.line()
        out.line(safe(f"vendor {doc['vendor']}"))
        out.line(
            f"  spent      {_amount(doc['tokens'], doc['cost'])}"
            f" ({doc['input_tokens']:,} in, {doc['output_tokens']:,} out)"
        )
        out.line(
            f"  held       {_amount(doc['held_tokens'], doc['held_cost'])} in {doc['held_reservations']} reservation(s)"
        )
        if doc["over_tokens"] or doc["over_cost"]:
            out.line(f"  overdrawn  {_amount(doc['over_tokens'], doc['over_cost'])} (late commits)")
        if not doc["budgets"]:
            out.line("  budget     none set (unlimited)")
        for b in doc["budgets"]:
            tokens = "unlimited" if b["token_limit"] is None else f"{b['token_limit']:,}"
            cost = "unlimited" if b["cost_limit"] is None else cost_text(b["cost_limit"])
            left_tokens = "-" if b["remaining_tokens"] is None else f"{b['remaining_tokens']:,}"
            left_cost = "-" if b["remaining_cost"] is None else cost_text(b["remaining_cost"])
            window = "all time" if b["window"] == "total" else "last 24 h"
            out.line(f"  budget     {window}: {tokens} tokens, cost {cost}")
            out.line(f"  remaining  {window}: {left_tokens} tokens, cost {left_cost}")
        if args.tags:
            rows = [
                [
                    t["tag"],
                    t["value"],
                    f"{t['tokens']:,}",
                    cost_text(t["cost"]),
                    f"{t['held_tokens']:,}",
                    cost_text(t["held_cost"]),
                ]
                for t in doc["tags"]
            ]
            out.line()
            out.table(["TAG", "VALUE", "TOKENS", "COST", "HELD TOKENS", "HELD COST"], rows, right=(2, 3, 4, 5))
    return 0


# -- memory ---------------------------------------------------------------------------------------


async def memory(cli: Cli, args: argparse.Namespace) -> int:
    out = cli.out
    async with cli.store() as store:
        if args.state is None:
            rows = await cli.sql.rows(
                "memory.db",
                "SELECT state, COUNT(*), SUM(count), MAX(last_seen_ms) FROM action_stats GROUP BY state ORDER BY state",
            )
            states = [{"state": s, "actions": a, "transitions": n, "last_seen_ms": last} for s, a, n, last in rows]
            if out.json:
                out.document({"states": states})
            elif not states:
                out.note(f"constellation memory in {cli.root_path} is empty")
            else:
                out.table(
                    ["STATE", "ACTIONS", "TRANSITIONS", "LAST SEEN"],
                    [
                        [s["state"], str(s["actions"]), str(s["transitions"]), ms_text(s["last_seen_ms"])]
                        for s in states
                    ],
                    right=(1, 2),
                )
            return 0
        stats = await store.memory.stats(args.state)
        if not stats:
            raise NotFound(f"constellation memory has no action recorded in state {args.state!r}")
        best = await store.memory.best_action(args.state)
    if out.json:
        out.document(
            {
                "state": args.state,
                "best_action": best,
                "actions": [
                    {
                        "action": s.action,
                        "count": s.count,
                        "successes": s.successes,
                        "success_rate": finite(s.success_rate),
                        "mean_reward": finite(s.mean_reward),
                        "reward_stddev": finite(s.reward_variance**0.5),
                        "last_seen_ms": s.last_seen_ms,
                    }
                    for s in stats
                ],
            }
        )
        return 0
    out.table(
        ["ACTION", "COUNT", "SUCCESS", "MEAN REWARD", "STDDEV", "LAST SEEN"],
        [
            [
                s.action,
                str(s.count),
                f"{s.success_rate:.0%}",
                f"{s.mean_reward:.4f}",
                f"{s.reward_variance**0.5:.4f}",
                ms_text(s.last_seen_ms),
            ]
            for s in stats
        ],
        right=(1, 2, 3, 4),
    )
    out.line(safe(f"best action (UCB1): {best}"))
    return 0
