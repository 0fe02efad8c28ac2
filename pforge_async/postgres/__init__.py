"""The store on PostgreSQL (``connect_pg`` / ``open_store("postgresql://...")``): the same API and
guarantees as the embedded SQLite store, for agents running on many machines.

Needs the ``postgres`` extra (asyncpg). One schema holds a whole store (``schema=``, default
``pforge``), so several stores can share a database. See :mod:`.actor` for the group-commit actor
every part runs on and :mod:`.migrate` for how schemas are created and upgraded.
"""

from __future__ import annotations

from .actor import PgActor, PgConn, translate
from .migrate import check_schema_name, migrate

__all__ = ["PgActor", "PgConn", "check_schema_name", "migrate", "translate"]
