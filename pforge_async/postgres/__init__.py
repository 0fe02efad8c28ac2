"""The store on PostgreSQL (``connect_pg`` / ``open_store("postgresql://...")``): the same API and
guarantees as the embedded SQLite store, for agents running on many machines.

Needs the ``postgres`` extra (asyncpg). One schema holds a whole store (``schema=``, default
``pforge``), so several stores can share a database. See :mod:`.actor` for the group-commit actor
every part runs on, :mod:`.migrate` for how schemas are created and upgraded, :mod:`.store` for
``connect_pg`` and ``PgStore``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .actor import PgActor, PgConn, translate
from .migrate import check_schema_name, migrate

if TYPE_CHECKING:
    from .store import PgStore, connect_pg

__all__ = ["PgActor", "PgConn", "PgStore", "check_schema_name", "connect_pg", "migrate", "translate"]


def __getattr__(name: str) -> Any:
    # The store pulls in every part (turns, cas, ledgers): loaded on first use, not with the actor.
    if name in ("PgStore", "connect_pg"):
        from . import store

        return getattr(store, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
