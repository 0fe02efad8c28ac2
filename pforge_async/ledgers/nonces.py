"""Capability nonces (``store.nonces``): each one honoured once, ever, across tasks and processes."""

from __future__ import annotations

import re
import secrets
import sqlite3
from typing import Annotated

import msgspec

from ..clock import now_ms
from ..errors import InvalidInput, NonceExpired, NonceReplayed, NonceUnknown
from ..sqlite.actor import SqliteActor
from ._checks import Millis, Text, bound_values, seconds, text

__all__ = ["NonceActor", "NonceLedger"]

#: 32 random bytes, URL-safe base64 without padding.
_NONCE_PATTERN = r"\A[A-Za-z0-9_-]{43}\Z"
_NONCE_RE = re.compile(_NONCE_PATTERN)
Nonce = Annotated[str, msgspec.Meta(pattern=_NONCE_PATTERN)]


class IssueNonce(msgspec.Struct, frozen=True, tag="issue"):
    nonce: Nonce
    subject: Text
    ttl_ms: Millis


class ConsumeNonce(msgspec.Struct, frozen=True, tag="consume"):
    nonce: Nonce
    subject: Text


class PurgeExpired(msgspec.Struct, frozen=True, tag="purge"):
    pass


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
            case IssueNonce(nonce=nonce, subject=subject, ttl_ms=ttl_ms):
                conn.execute(
                    "INSERT INTO nonces (nonce, subject, issued_at_ms, expires_at_ms) VALUES (?, ?, ?, ?)",
                    (nonce, subject, now, now + ttl_ms),
                )
                return nonce
            case ConsumeNonce(nonce=nonce, subject=subject):
                row = conn.execute(
                    "SELECT subject, expires_at_ms, consumed_at_ms FROM nonces WHERE nonce = ?", (nonce,)
                ).fetchone()
                if row is None:
                    raise NonceUnknown(f"nonce {nonce[:8]}... was never issued, or was purged")
                issued_for, expires_at, consumed_at = row
                if consumed_at is not None:
                    raise NonceReplayed(f"nonce {nonce[:8]}... was already consumed")
                if issued_for != subject:
                    raise InvalidInput(f"nonce {nonce[:8]}... was issued for another subject than {subject!r}")
                if expires_at <= now:
                    raise NonceExpired(f"nonce {nonce[:8]}... expired {now - expires_at} ms ago")
                conn.execute(
                    "UPDATE nonces SET consumed_at_ms = ? WHERE nonce = ? AND consumed_at_ms IS NULL",
                    (now, nonce),
                )
                return None
            case PurgeExpired():
                return conn.execute("DELETE FROM nonces WHERE expires_at_ms <= ?", (now,)).rowcount
        raise InvalidInput(f"unknown nonce command {command!r}")


class NonceLedger:
    """``store.nonces``."""

    def __init__(self, actor: NonceActor) -> None:
        self._actor = actor

    async def issue(self, subject: str, ttl_s: float) -> str:
        """A new unguessable nonce (256 random bits) for ``subject``, valid for ``ttl_s`` seconds."""
        command = IssueNonce(secrets.token_urlsafe(32), text(subject, "subject"), seconds(ttl_s, "ttl_s"))
        return str(await self._actor.call(command))

    async def consume(self, nonce: str, subject: str) -> None:
        """Honour ``nonce`` for ``subject``, once: exactly one consumer ever succeeds. Raises
        ``NonceReplayed``, ``NonceExpired``, ``NonceUnknown``, or ``InvalidInput`` for another subject."""
        if not isinstance(nonce, str) or not _NONCE_RE.match(nonce):
            raise InvalidInput("malformed nonce: want the 43-character string that issue() returned")
        await self._actor.call(ConsumeNonce(str.__str__(nonce), text(subject, "subject")))

    async def purge_expired(self) -> int:
        """Delete expired nonces (consumed or not); returns how many. A purged nonce is unknown
        from then on, so it can never be consumed."""
        return int(await self._actor.call(PurgeExpired()))
