"""Schemas on PostgreSQL: created and migrated forward under an advisory lock, so many processes
starting at once on an empty database never race.

Every part of a store (turns, cas, memory, nonces, budget) keeps its version in one table of the
store's schema, ``pforge_versions (part, version)``. A part's schema is a sequence of SQL scripts:
script ``i`` (counted from 1) upgrades version ``i - 1`` to ``i``, so a fresh schema runs them all in
order and an old one runs only the missing ones. Everything happens in one transaction, begun after
taking ``pg_advisory_lock`` on a key derived from the schema's name: ``CREATE SCHEMA IF NOT EXISTS``
and ``CREATE TABLE IF NOT EXISTS`` are not safe against each other without it (two sessions both see
"absent" and one fails on the catalog's unique index), which is the race LangGraph's Postgres saver has.
A part whose stored version is newer than the code knows is refused, untouched.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import Any

from ..errors import InvalidInput, StorageError

__all__ = ["advisory_key", "check_schema_name", "migrate", "quote_ident", "stored_version"]

#: what a schema name may be: a plain identifier (quoted everywhere all the same), at most 63 bytes,
#: PostgreSQL's limit (a longer one would be cut silently, and two stores could share a schema).
_SCHEMA_RE = re.compile(r"\A[A-Za-z_][A-Za-z0-9_]{0,62}\Z")

VERSIONS_TABLE = "pforge_versions"


def check_schema_name(schema: object) -> str:
    """``schema`` as a str, or ``InvalidInput``: letters, digits and ``_``, not starting with a digit,
    1 to 63 characters, and not ``pg_...`` (reserved by PostgreSQL)."""
    if not isinstance(schema, str) or not _SCHEMA_RE.match(schema):
        raise InvalidInput(f"schema must be 1 to 63 letters, digits or '_' (not starting with a digit), got {schema!r}")
    if schema.lower().startswith("pg_"):
        raise InvalidInput(f"schema names starting with pg_ are reserved by PostgreSQL, got {schema!r}")
    return str.__str__(schema)


def quote_ident(name: str) -> str:
    """A checked identifier in double quotes (it holds no quote: see :func:`check_schema_name`)."""
    return '"' + name.replace('"', '""') + '"'


def advisory_key(*parts: str) -> int:
    """A signed 64-bit advisory-lock key for ``parts`` (stable across processes and machines)."""
    digest = hashlib.blake2b("\0".join(parts).encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


async def stored_version(conn: Any, schema: str, part: str) -> int:
    """The version ``part`` has in ``schema`` (0: the schema, the table or the part is absent)."""
    table = f"{quote_ident(schema)}.{VERSIONS_TABLE}"
    exists = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", table)
    if not exists:
        return 0
    version = await conn.fetchval(f"SELECT version FROM {table} WHERE part = $1", part)
    return int(version or 0)


async def migrate(conn: Any, schema: str, part: str, scripts: Sequence[str], *, where: str = "") -> int:
    """Bring ``part`` in ``schema`` to version ``len(scripts)``; returns the version it had.

    ``conn`` is an asyncpg connection outside any transaction. Safe to call from any number of
    processes at once: the first one that takes the lock creates or upgrades, the others find it done.
    ``where`` names the server in messages."""
    target = len(scripts)
    # Most opens find everything in place: one read, no lock.
    found = await stored_version(conn, schema, part)
    if found == target:
        return found
    if found > target:
        raise _newer(where, schema, part, found, target)
    quoted = quote_ident(schema)
    key = advisory_key("pforge-migrate", schema)
    # A session lock taken before BEGIN: the transaction then starts after the holder committed, with
    # fresh catalog caches (an xact lock waited on inside the transaction left `to_regclass` stale, and
    # the scripts ran twice: "relation ... already exists").
    await conn.execute("SELECT pg_advisory_lock($1)", key)
    try:
        return await _migrate_locked(conn, schema, part, scripts, where, quoted)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", key)


async def _migrate_locked(conn: Any, schema: str, part: str, scripts: Sequence[str], where: str, quoted: str) -> int:
    target = len(scripts)
    async with conn.transaction():
        # Read again under the lock: another process may have migrated meanwhile.
        found = await stored_version(conn, schema, part)
        if found > target:
            raise _newer(where, schema, part, found, target)
        if found == target:
            return found
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {quoted}")
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {quoted}.{VERSIONS_TABLE} "
            "(part text PRIMARY KEY, version integer NOT NULL CHECK (version >= 0))"
        )
        # The scripts name their tables unqualified: they land in this schema.
        await conn.execute(f"SET LOCAL search_path TO {quoted}")
        for script in scripts[found:]:
            await conn.execute(script)
        await conn.execute(
            f"INSERT INTO {quoted}.{VERSIONS_TABLE} (part, version) VALUES ($1, $2) "
            "ON CONFLICT (part) DO UPDATE SET version = excluded.version",
            part,
            target,
        )
    return found


def _newer(where: str, schema: str, part: str, found: int, target: int) -> StorageError:
    return StorageError(
        f"{where}schema {schema!r}: {part} has schema version {found}, newer than this pforge_async "
        f"understands ({target}); it was left untouched"
    )
