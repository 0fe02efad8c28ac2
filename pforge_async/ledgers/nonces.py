"""Capability nonces (``store.nonces``): each one honoured once, ever, across tasks and processes.

A nonce carries its own expiry: its first 8 bytes are the expiry in epoch milliseconds (big-endian),
as the actor decided it when it stored the nonce, the other 24 are random (192 bits: as unguessable as
ever). The row is the authority while it exists; once a nonce has expired, ``purge_expired`` may delete
its row, and then nothing brings that nonce back: the command that issued it, replayed (the mailbox
protocol is a wire protocol), makes a nonce with a later expiry, so another value; and a purged nonce
is unknown. So a purged nonce, consumed or not, is never accepted again.
"""

from __future__ import annotations

import base64
import re
import secrets
import sqlite3
from collections.abc import Sequence
from typing import Annotated, Any

import msgspec

from ..clock import now_ms
from ..errors import InvalidInput, NonceExpired, NonceReplayed, NonceUnknown, PforgeError
from ..sqlite.actor import SqliteActor
from ._checks import MAX_SECONDS, Millis, Text, bound_values, number, seconds, text

__all__ = ["NonceActor", "NonceLedger"]

#: 32 random bytes, URL-safe base64 without padding.
_NONCE_PATTERN = r"\A[A-Za-z0-9_-]{43}\Z"
_NONCE_RE = re.compile(_NONCE_PATTERN)
Nonce = Annotated[str, msgspec.Meta(pattern=_NONCE_PATTERN)]
#: the random part of a nonce the facade draws: 24 bytes, URL-safe base64
Token = Annotated[str, msgspec.Meta(pattern=r"\A[A-Za-z0-9_-]{32}\Z")]
#: rows deleted per purge command (one short transaction under the writers' lock)
PURGE_SLICE = 2_000
#: a grace period of at most this many seconds (the longest time to live)
MAX_GRACE_S = MAX_SECONDS
GraceMillis = Annotated[int, msgspec.Meta(ge=0, le=MAX_GRACE_S * 1000)]
SliceSize = Annotated[int, msgspec.Meta(ge=1, le=100_000)]


def new_nonce(expires_at_ms: int, token: str) -> str:
    """The nonce of ``token`` (24 random bytes, base64) that expires at ``expires_at_ms``."""
    raw = expires_at_ms.to_bytes(8, "big") + base64.urlsafe_b64decode(token)
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def nonce_expiry(nonce: str) -> int:
    """The expiry a nonce carries (for a nonce made before nonces carried one: 8 random bytes)."""
    return int.from_bytes(base64.urlsafe_b64decode(nonce + "=")[:8], "big")


class IssueNonce(msgspec.Struct, frozen=True, tag="issue"):
    """Store a nonce made of ``token`` and the expiry the actor decides (now + ``ttl_ms``)."""

    token: Token
    subject: Text
    ttl_ms: Millis


class ConsumeNonce(msgspec.Struct, frozen=True, tag="consume"):
    nonce: Nonce
    subject: Text


class PurgeExpired(msgspec.Struct, frozen=True, tag="purge"):
    """Delete up to ``limit`` nonces that expired more than ``grace_ms`` ago; the reply is how many."""

    grace_ms: GraceMillis = 0
    limit: SliceSize = PURGE_SLICE


NonceCommand = IssueNonce | ConsumeNonce | PurgeExpired


class NonceActor(SqliteActor[NonceCommand]):
    command_type = NonceCommand
    name = "nonces"
    schema_file = "nonces_schema.sql"
    schema_version = 1
    invariants = (
        (
            "nonces consumed before they were issued, or issued expired",
            "SELECT nonce FROM nonces WHERE consumed_at_ms < issued_at_ms OR expires_at_ms <= issued_at_ms",
        ),
    )

    def apply(self, conn: sqlite3.Connection, command: NonceCommand) -> object:
        with bound_values(self.name, command):
            return self._apply(conn, command)

    def _apply(self, conn: sqlite3.Connection, command: NonceCommand) -> object:
        now = now_ms()
        match command:
            case IssueNonce():
                row = issued(command, now)
                conn.execute(f"INSERT INTO nonces ({ISSUED_COLUMNS}) VALUES (?, ?, ?, ?)", row)
                return row[0]
            case ConsumeNonce(nonce=nonce, subject=subject):
                row = conn.execute(f"SELECT {CONSUME_COLUMNS} FROM nonces WHERE nonce = ?", (nonce,)).fetchone()
                refused = consume_refusal(nonce, subject, row, now)
                if refused is not None:
                    raise refused
                # Never stamped before its issue: the wall clock may have stepped back since.
                conn.execute(
                    "UPDATE nonces SET consumed_at_ms = max(?, issued_at_ms) "
                    "WHERE nonce = ? AND consumed_at_ms IS NULL",
                    (now, nonce),
                )
                return None
            case PurgeExpired(grace_ms=grace_ms, limit=limit):
                # Only rows whose expiry has passed: their nonces are refused by IssueNonce for good.
                return conn.execute(
                    "DELETE FROM nonces WHERE nonce IN (SELECT nonce FROM nonces WHERE expires_at_ms <= ? "
                    "ORDER BY expires_at_ms LIMIT ?)",
                    (now - grace_ms, limit),
                ).rowcount
        raise InvalidInput(f"unknown nonce command {command!r}")


# -- the rules, for every backend (see the budget ledger's) ------------------------------------------

ISSUED_COLUMNS = "nonce, subject, issued_at_ms, expires_at_ms"
#: what a consume reads of its nonce's row
CONSUME_COLUMNS = "subject, expires_at_ms, consumed_at_ms"


def issued(command: IssueNonce, now: int) -> tuple[str, str, int, int]:
    """The row ``command`` stores at ``now``, in ``ISSUED_COLUMNS`` order. The value holds the expiry
    decided here: the same command run again later (a replay) makes another nonce, never one that was
    purged."""
    expires = now + command.ttl_ms
    return (new_nonce(expires, command.token), command.subject, now, expires)


def consume_refusal(nonce: str, subject: str, row: Sequence[Any] | None, now: int) -> PforgeError | None:
    """Why ``nonce`` cannot be consumed for ``subject`` at ``now``, given its row (``CONSUME_COLUMNS``,
    None if there is none), in this order: unknown, replayed, another subject, expired. None: it may be."""
    if row is None:
        return NonceUnknown(f"nonce {nonce[:8]}... was never issued, or was purged")
    issued_for, expires_at, consumed_at = row
    if consumed_at is not None:
        return NonceReplayed(f"nonce {nonce[:8]}... was already consumed")
    if issued_for != subject:
        return InvalidInput(f"nonce {nonce[:8]}... was issued for another subject than {subject!r}")
    if expires_at <= now:
        return NonceExpired(f"nonce {nonce[:8]}... expired {now - expires_at} ms ago")
    return None


class NonceLedger:
    """``store.nonces``."""

    def __init__(self, actor: NonceActor) -> None:
        self._actor = actor

    async def issue(self, subject: str, ttl_s: float) -> str:
        """A new unguessable nonce (256 random bits) for ``subject``, valid for ``ttl_s`` seconds."""
        command = IssueNonce(secrets.token_urlsafe(24), text(subject, "subject"), seconds(ttl_s, "ttl_s"))
        return str(await self._actor.call(command))

    async def consume(self, nonce: str, subject: str) -> None:
        """Honour ``nonce`` for ``subject``, once: exactly one consumer ever succeeds. Raises
        ``NonceReplayed``, ``NonceExpired``, ``NonceUnknown``, or ``InvalidInput`` for another subject."""
        if not isinstance(nonce, str) or not _NONCE_RE.match(nonce):
            raise InvalidInput("malformed nonce: want the 43-character string that issue() returned")
        await self._actor.call(ConsumeNonce(str.__str__(nonce), text(subject, "subject")))

    async def purge_expired(self, *, grace_s: float = 0.0) -> int:
        """Delete the nonces (consumed or not) that expired more than ``grace_s`` seconds ago (0 to
        10**15); returns how many. In slices of a few thousand rows, each one short transaction, so
        consumers wait at most a slice, and a purge cut short leaves every row either kept or gone.
        A purged nonce is unknown from then on (``NonceUnknown``), and can never be issued again
        (its expiry has passed), so it can never be consumed."""
        grace_ms = round(number(grace_s, "grace_s", low=0, high=MAX_GRACE_S) * 1000)
        purged = 0
        while True:
            gone = int(await self._actor.call(PurgeExpired(grace_ms, PURGE_SLICE)))
            purged += gone
            if gone < PURGE_SLICE:
                return purged
