"""The SQLite turn store that ``open_store`` exposes as ``store.turns`` (``turns.db``)."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from ..cas.objects import validate_oid
from ..cas.store import Cas
from ..clock import now_ms
from ..errors import Conflict, ContextNotFound, InvalidInput, ObjectNotFound, TurnNotFound
from ..sqlite.actor import SqliteActor
from .base import TurnStoreBase
from .commands import AppendTurn, AttachFs, CreateContext, PublishBundle, PutBlob, TurnCommand
from .rules import DEFAULT_MAX_PAYLOAD, check_idempotent, jump_for, payload_hash
from .types import ContextHead, TurnRecord

__all__ = ["SqliteTurnStore", "TurnActor"]

COLUMNS = (
    "turn_id, context_id, parent_turn_id, depth, type_id, type_version, payload, payload_hash, "
    "idempotency_key, created_at_ms, fs_root"
)


def _record(row: Any) -> TurnRecord:
    return TurnRecord(*row)


class TurnActor(SqliteActor[TurnCommand]):
    """The one writer of ``turns.db``.

    An append checks everything it needs first (context, idempotency key, parent) and writes
    nothing itself: its rows wait in memory until :meth:`flush` inserts the whole batch with two
    ``executemany`` calls. So no command can fail half-written, and savepoints are not needed.
    Heads and recent turns are cached between batches; a commit by another process (seen in
    ``PRAGMA data_version``) drops the cache.
    """

    command_type = TurnCommand
    name = "turns"
    schema_file = "turns_schema.sql"
    schema_version = 1
    savepoints = False
    _CACHE_LIMIT = 100_000
    invariants = (
        (
            "turns whose parent is missing",
            "SELECT t.turn_id FROM turns t LEFT JOIN turns p ON p.turn_id = t.parent_turn_id "
            "WHERE t.parent_turn_id != 0 AND p.turn_id IS NULL",
        ),
        (
            "turns whose depth is not their parent's plus one",
            "SELECT t.turn_id FROM turns t LEFT JOIN turns p ON p.turn_id = t.parent_turn_id "
            "WHERE t.depth != COALESCE(p.depth, 0) + 1",
        ),
        (
            "turns whose skip link is not a shallower turn",
            "SELECT t.turn_id FROM turns t LEFT JOIN turns j ON j.turn_id = t.jump_turn_id "
            "WHERE (t.jump_turn_id = 0 AND t.jump_depth != 0) OR (t.jump_turn_id != 0 AND "
            "(j.turn_id IS NULL OR j.depth != t.jump_depth OR j.depth >= t.depth))",
        ),
        (
            "contexts whose head is missing",
            "SELECT c.context_id FROM contexts c LEFT JOIN turns t ON t.turn_id = c.head_turn_id "
            "WHERE c.head_turn_id != 0 AND t.turn_id IS NULL",
        ),
        (
            "turns appended to a context that does not exist",
            "SELECT t.turn_id FROM turns t LEFT JOIN contexts c ON c.context_id = t.context_id "
            "WHERE c.context_id IS NULL",
        ),
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._heads: dict[int, int] = {}
        #: turn id -> (depth, skip link, skip link's depth)
        self._nodes: dict[int, tuple[int, int, int]] = {}
        self._next_turn = 0
        self._next_context = 0
        self._new_contexts: list[tuple[int, int, int]] = []
        self._new_turns: list[tuple[Any, ...]] = []
        self._moved_heads: dict[int, int] = {}
        self._new_keys: dict[tuple[int, str], TurnRecord] = {}

    # -- the batch's life --------------------------------------------------------------------------

    def begin(self, conn: sqlite3.Connection, changed_elsewhere: bool) -> None:
        if changed_elsewhere or not self._next_turn or len(self._nodes) > self._CACHE_LIMIT:
            self._heads.clear()
            self._nodes.clear()
            self._next_turn = conn.execute("SELECT COALESCE(MAX(turn_id), 0) + 1 FROM turns").fetchone()[0]
            self._next_context = conn.execute("SELECT COALESCE(MAX(context_id), 0) + 1 FROM contexts").fetchone()[0]
        elif len(self._heads) > self._CACHE_LIMIT:
            self._heads.clear()

    def flush(self, conn: sqlite3.Connection) -> None:
        if self._new_contexts:
            conn.executemany(
                "INSERT INTO contexts (context_id, head_turn_id, created_at_ms) VALUES (?, ?, ?)",
                self._new_contexts,
            )
        if self._new_turns:
            conn.executemany(
                "INSERT INTO turns (turn_id, context_id, parent_turn_id, depth, jump_turn_id, jump_depth, "
                "type_id, type_version, payload, payload_hash, idempotency_key, created_at_ms) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                self._new_turns,
            )
        if self._moved_heads:
            conn.executemany(
                "UPDATE contexts SET head_turn_id = ? WHERE context_id = ?",
                [(head, context_id) for context_id, head in self._moved_heads.items()],
            )
        self._forget_pending()

    def abort(self) -> None:
        self._forget_pending()
        self._heads.clear()
        self._nodes.clear()
        self._next_turn = self._next_context = 0

    def _forget_pending(self) -> None:
        self._new_contexts, self._new_turns = [], []
        self._moved_heads, self._new_keys = {}, {}

    # -- lookups through the cache -----------------------------------------------------------------

    def _head(self, conn: sqlite3.Connection, context_id: int) -> int:
        head = self._heads.get(context_id)
        if head is None:
            row = conn.execute("SELECT head_turn_id FROM contexts WHERE context_id = ?", (context_id,)).fetchone()
            if row is None:
                raise ContextNotFound(f"no context {context_id}")
            head = self._heads[context_id] = row[0]
        return head

    def _node(self, conn: sqlite3.Connection, turn_id: int, what: str = "") -> tuple[int, int, int]:
        node = self._nodes.get(turn_id)
        if node is None:
            row = conn.execute(
                "SELECT depth, jump_turn_id, jump_depth FROM turns WHERE turn_id = ?", (turn_id,)
            ).fetchone()
            if row is None:
                raise TurnNotFound(f"no turn {turn_id}{what}")
            node = self._nodes[turn_id] = (row[0], row[1], row[2])
        return node

    # -- commands ----------------------------------------------------------------------------------

    def apply(self, conn: sqlite3.Connection, command: TurnCommand) -> Any:
        match command:
            case AppendTurn():
                return self._append(conn, command)
            case CreateContext(base_turn_id=base):
                depth = self._node(conn, base)[0] if base else 0
                context_id = self._next_context
                self._next_context += 1
                self._new_contexts.append((context_id, base, now_ms()))
                self._heads[context_id] = base
                return ContextHead(context_id, base, depth)
            case PublishBundle(bundle_id=bundle_id, bundle_json=data):
                row = conn.execute(
                    "SELECT bundle_json FROM registry_bundles WHERE bundle_id = ?", (bundle_id,)
                ).fetchone()
                if row is None:
                    conn.execute("INSERT INTO registry_bundles VALUES (?, ?, ?)", (bundle_id, data, now_ms()))
                elif row[0] != data:
                    raise Conflict(f"registry bundle {bundle_id!r} is already published with other content")
                return None
            case AttachFs(turn_id=turn_id, fs_root=fs_root):
                self.flush(conn)  # the turn may be one of this batch's
                row = conn.execute("SELECT fs_root FROM turns WHERE turn_id = ?", (turn_id,)).fetchone()
                if row is None:
                    raise TurnNotFound(f"no turn {turn_id}")
                if row[0] is not None and row[0] != fs_root:
                    raise Conflict(f"turn {turn_id} already has fs_root {row[0]}")
                conn.execute("UPDATE turns SET fs_root = ? WHERE turn_id = ?", (fs_root, turn_id))
                return None
            case PutBlob():
                raise InvalidInput("blobs of the SQLite turn store live in the CAS")
        raise InvalidInput(f"unknown turn store command {command!r}")

    def _append(self, conn: sqlite3.Connection, command: AppendTurn) -> TurnRecord:
        context_id = command.context_id
        head = self._head(conn, context_id)
        digest = payload_hash(command.payload)
        key = command.idempotency_key
        if key is not None:
            first = self._new_keys.get((context_id, key))
            if first is None:
                row = conn.execute(
                    f"SELECT {COLUMNS} FROM turns WHERE context_id = ? AND idempotency_key = ?",
                    (context_id, key),
                ).fetchone()
                first = None if row is None else _record(row)
            if first is not None:
                return check_idempotent(first, command, digest)
        parent = head if command.parent_turn_id is None else command.parent_turn_id
        jump, jump_depth, depth = 0, 0, 1
        if parent:
            parent_depth, parent_jump, parent_jump_depth = self._node(conn, parent, " to append to")
            grand_jump, grand_jump_depth = self._node(conn, parent_jump)[1:] if parent_jump else (0, 0)
            jump, jump_depth = jump_for(parent, parent_depth, parent_jump_depth, grand_jump, grand_jump_depth)
            depth = parent_depth + 1
        turn_id = self._next_turn
        self._next_turn += 1
        record = TurnRecord(
            turn_id,
            context_id,
            parent,
            depth,
            command.type_id,
            command.type_version,
            command.payload,
            digest,
            key,
            now_ms(),
        )
        self._new_turns.append(
            (
                turn_id,
                context_id,
                parent,
                depth,
                jump,
                jump_depth,
                record.type_id,
                record.type_version,
                record.payload,
                digest,
                key,
                record.created_at_ms,
            )
        )
        self._nodes[turn_id] = (depth, jump, jump_depth)
        self._heads[context_id] = self._moved_heads[context_id] = turn_id
        if key is not None:
            self._new_keys[(context_id, key)] = record
        return record


_ANCESTOR_AT = """
WITH RECURSIVE walk (turn_id, depth, parent, jump, jump_depth) AS (
    SELECT turn_id, depth, parent_turn_id, jump_turn_id, jump_depth FROM turns WHERE turn_id = :start
    UNION ALL
    SELECT t.turn_id, t.depth, t.parent_turn_id, t.jump_turn_id, t.jump_depth
    FROM walk w JOIN turns t
      ON t.turn_id = (CASE WHEN w.jump_depth >= :depth THEN w.jump ELSE w.parent END)
    WHERE w.depth > :depth
)
SELECT turn_id FROM walk WHERE depth = :depth
"""

_CHAIN_FROM = """
WITH RECURSIVE chain (turn_id, n) AS (
    {seed}
    UNION ALL
    SELECT t.parent_turn_id, c.n + 1 FROM chain c JOIN turns t ON t.turn_id = c.turn_id
    WHERE c.n < :limit AND t.parent_turn_id != 0
)
SELECT {columns}
FROM chain c JOIN turns t ON t.turn_id = c.turn_id ORDER BY c.n DESC
"""
_COLUMNS_OF_T = ", ".join("t." + c.strip() for c in COLUMNS.split(","))
#: the ``limit`` turns that end at ``:start``
_CHAIN = _CHAIN_FROM.format(seed="SELECT :start, 1", columns=_COLUMNS_OF_T)
#: the same from a context's head, in one query (one trip to the reader) instead of two
_CHAIN_FROM_HEAD = _CHAIN_FROM.format(
    seed="SELECT head_turn_id, 1 FROM contexts WHERE context_id = :context AND head_turn_id != 0",
    columns=_COLUMNS_OF_T,
)


class SqliteTurnStore(TurnStoreBase):
    """``store.turns``: writes group-committed through the turns actor, reads on their own connection,
    blobs in the CAS."""

    def __init__(self, actor: TurnActor, cas: Cas, *, max_payload_bytes: int = DEFAULT_MAX_PAYLOAD) -> None:
        super().__init__(max_payload_bytes=max_payload_bytes, trees=cas)
        self._actor = actor
        self._cas = cas

    @property
    def path(self) -> Path:
        return self._actor.path

    async def _write(self, command: TurnCommand) -> object:
        return await self._actor.call(command)

    async def _get_head(self, context_id: int) -> ContextHead:
        row = await self._actor.fetchone(
            "SELECT c.head_turn_id, COALESCE(t.depth, 0) FROM contexts c "
            "LEFT JOIN turns t ON t.turn_id = c.head_turn_id WHERE c.context_id = ?",
            (context_id,),
        )
        if row is None:
            raise ContextNotFound(f"no context {context_id}")
        return ContextHead(context_id, row[0], row[1])

    async def _get_turn(self, turn_id: int) -> TurnRecord:
        row = await self._actor.fetchone(f"SELECT {COLUMNS} FROM turns WHERE turn_id = ?", (turn_id,))
        if row is None:
            raise TurnNotFound(f"no turn {turn_id}")
        return _record(row)

    async def check(self) -> list[str]:
        """What is wrong in ``turns.db``: SQLite's integrity check, the DAG's invariants, and every
        payload re-hashed."""
        problems = await self._actor.check()
        after = 0
        while rows := await self._actor.fetchall(
            "SELECT turn_id, payload, payload_hash FROM turns WHERE turn_id > ? ORDER BY turn_id LIMIT 1000", (after,)
        ):
            problems += [
                f"turns.db: turn {turn_id} does not match its payload_hash"
                for turn_id, payload, digest in rows
                if payload_hash(payload) != digest
            ]
            after = rows[-1][0]
        return problems

    async def _list_turns(self, context_id: int, before_turn_id: int | None, limit: int) -> list[TurnRecord]:
        if before_turn_id is None and limit:
            rows = await self._actor.fetchall(_CHAIN_FROM_HEAD, {"context": context_id, "limit": limit})
            if not rows:
                await self._get_head(context_id)  # an empty context, or ContextNotFound
            return [_record(row) for row in rows]
        head = (await self.get_head(context_id)).head_turn_id
        start = head
        if before_turn_id is not None:
            cursor = await self._actor.fetchone(
                "SELECT depth, parent_turn_id FROM turns WHERE turn_id = ?", (before_turn_id,)
            )
            on_chain = False
            if cursor is not None and head:
                found = await self._actor.fetchone(_ANCESTOR_AT, {"start": head, "depth": cursor[0]})
                on_chain = found is not None and found[0] == before_turn_id
            if not on_chain:
                raise InvalidInput(f"turn {before_turn_id} is not on the chain of context {context_id}")
            start = cursor[1]
        if not start or not limit:
            return []
        rows = await self._actor.fetchall(_CHAIN, {"start": start, "limit": limit})
        return [_record(row) for row in rows]

    async def _get_registry_bundle(self, bundle_id: str) -> bytes | None:
        row = await self._actor.fetchone("SELECT bundle_json FROM registry_bundles WHERE bundle_id = ?", (bundle_id,))
        return None if row is None else bytes(row[0])

    async def _put_blob(self, data: bytes) -> str:
        return await self._cas.write_blob(data)

    async def _get_blob(self, oid: str) -> bytes:
        return await self._cas.read_blob(oid)

    async def attach_fs(self, turn_id: int, fs_root: str) -> None:
        validate_oid(fs_root, "fs_root")
        if not await self._cas.has(fs_root):
            raise ObjectNotFound(f"fs_root {fs_root} is not in the CAS")
        await super().attach_fs(turn_id, fs_root)
