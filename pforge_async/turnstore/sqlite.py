"""The SQLite turn store that ``open_store`` exposes as ``store.turns`` (``turns.db``).

Schema version 2 (``turns_schema.sql``) adds sessions: context names (a partial unique index), lineage,
metadata, ``updated_at_ms`` and creation keys. ``turns_v2.sql`` upgrades a version 1 file at open, in
one transaction under the writers' lock. Version 3 (``turns_v3.sql``) adds ``deleted_at_ms``: a deleted
context keeps its row (its turns name it) without name, metadata or creation key, and reads treat it as
absent. Version 4 (``turns_v4.sql``) adds ``turns.erased``: an erased turn's row keeps everything but its
payload (``X''``), hash (``''``) and refs (NULL); the writer runs with ``PRAGMA secure_delete`` from its first erasure
on, so the cells an erasure frees are zeroed, and ``gc`` takes the old bytes out of the WAL. Version 5
(``turns_v5.sql``) adds ``turns.refs``: the CAS objects a turn keeps alive, space-separated. Version 6
(``turns_v6.sql``) indexes the "updated" order by ``updated_bucket`` (``updated_at_ms`` in 64 ms steps), which
the writer sets only when the step changes, so an append no longer moves an index entry; and indexes
``context_keys`` by context.
"""

from __future__ import annotations

import sqlite3
import sys
from collections.abc import AsyncIterator, Awaitable, Sequence
from pathlib import Path
from typing import Any, ClassVar

from ..cas.store import Cas
from ..clock import now_ms
from ..errors import ActorClosed, Conflict, ContextNotFound, HeadConflict, IntegrityError, InvalidInput, TurnNotFound
from ..sqlite import actor as sqlite_actor
from ..sqlite.actor import SqliteActor, split_statements
from .base import ContextKey, TurnStoreBase
from .commands import (
    AppendTurn,
    AppendTurns,
    AttachFs,
    CreateContext,
    DeleteContext,
    EraseTurns,
    PublishBundle,
    PutBlob,
    SetContextMetadata,
    SetHead,
    TurnCommand,
)
from .gc import (
    CollectContexts,
    CollectTurns,
    TurnGcReport,
    collect,
    collect_contexts,
    collect_turns,
    validate_grace,
)
from .rules import (
    DEFAULT_MAX_PAYLOAD,
    check_creation_retry,
    check_idempotent,
    creation_fingerprint,
    decode_metadata,
    jump_for,
    next_updated,
    payload_hash,
    verify_turn,
)
from .types import ContextHead, ContextInfo, ContextOrder, TurnRecord

__all__ = ["SqliteTurnStore", "TurnActor", "name_successor"]

COLUMNS = (
    "turn_id, context_id, parent_turn_id, depth, type_id, type_version, payload, payload_hash, "
    "idempotency_key, created_at_ms, fs_root, erased, refs"
)


def _record(row: Any) -> TurnRecord:
    refs = () if row[12] is None else tuple(row[12].split(" "))
    return TurnRecord(
        row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7], row[8], row[9], row[10], bool(row[11]), refs
    )


#: turn id -> (depth, skip link, skip link's depth, context it was appended in)
Node = tuple[int, int, int, int]
#: an idempotency key, with the context it is scoped to
KeyPair = tuple[int, str]
#: a context created in the running batch: (name, base turn, parent context, metadata, created_at_ms)
NewContext = tuple[str | None, int, int, bytes, int]


#: what the turns actor carries: the store's commands and gc's slices
ActorCommand = TurnCommand | CollectTurns | CollectContexts


class TurnActor(SqliteActor[ActorCommand]):
    """The one writer of ``turns.db``.

    Every command checks everything it needs first and writes nothing itself: what it decided waits
    in memory until :meth:`flush` writes the whole batch with a few ``executemany`` calls (new
    contexts, creation keys, turns, moved heads, metadata). So no command can fail half-written, and
    savepoints are not needed; an ``append_turns`` decides its whole batch before it changes any of
    this state, so one bad turn leaves nothing of it, and its neighbours in the group commit are
    untouched. Each context's head and ``updated_at_ms`` and each turn's place in the DAG are cached
    between batches; a commit by another process (seen in ``PRAGMA data_version``) drops the cache.
    Names and creation keys are never cached: each is looked up inside the batch's transaction, under
    the lock every writer of ``turns.db`` holds around its batch, so a get-or-create by name sees
    every other process's creations (the unique index on names is the backstop).
    """

    command_type = ActorCommand
    name = "turns"
    schema_file = "turns_schema.sql"
    schema_version = 6
    #: the version ``schema_file`` creates: a fresh file then runs the migrations after it
    schema_file_version: ClassVar[int] = 5
    migrations: ClassVar[dict[int, str]] = {
        2: "turns_v2.sql",
        3: "turns_v3.sql",
        4: "turns_v4.sql",
        5: "turns_v5.sql",
        6: "turns_v6.sql",
    }
    savepoints = False
    #: ``updated_bucket = updated_at_ms >> UPDATED_SHIFT`` (turns_v6.sql): the "updated" order's index
    #: key, which moves at most once per 64 ms however often a context changes.
    UPDATED_SHIFT: ClassVar[int] = 6
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
        (
            "contexts whose base turn is missing",
            "SELECT c.context_id FROM contexts c LEFT JOIN turns t ON t.turn_id = c.base_turn_id "
            "WHERE c.base_turn_id != 0 AND t.turn_id IS NULL",
        ),
        (
            "contexts whose parent context is missing",
            "SELECT c.context_id FROM contexts c LEFT JOIN contexts p ON p.context_id = c.parent_context_id "
            "WHERE c.parent_context_id != 0 AND p.context_id IS NULL",
        ),
        (
            "contexts changed before they were created",
            "SELECT context_id FROM contexts WHERE updated_at_ms < created_at_ms",
        ),
        (
            "contexts whose name is empty or not text",
            "SELECT context_id FROM contexts WHERE name IS NOT NULL AND (typeof(name) != 'text' OR name = '')",
        ),
        (
            "contexts whose metadata is not a JSON object",
            "SELECT context_id FROM contexts WHERE NOT json_valid(CAST(metadata AS TEXT)) "
            "OR json_type(CAST(metadata AS TEXT)) != 'object'",
        ),
        (
            "context creation keys of contexts that do not exist",
            "SELECT k.idempotency_key FROM context_keys k LEFT JOIN contexts c ON c.context_id = k.context_id "
            "WHERE c.context_id IS NULL OR c.deleted_at_ms IS NOT NULL",
        ),
        (
            "erased turns that still hold a payload",
            "SELECT turn_id FROM turns WHERE erased != 0 AND (length(payload) != 0 OR payload_hash != '' "
            "OR refs IS NOT NULL)",
        ),
        (
            "erased turns whose parent is not erased",
            "SELECT t.turn_id FROM turns t JOIN turns p ON p.turn_id = t.parent_turn_id "
            "WHERE t.erased != 0 AND p.erased = 0",
        ),
        (
            "deleted contexts that still hold a name",
            "SELECT context_id FROM contexts WHERE deleted_at_ms IS NOT NULL AND name IS NOT NULL",
        ),
        (
            "contexts whose updated_bucket is not their updated_at_ms >> 6",
            "SELECT context_id FROM contexts WHERE updated_bucket != updated_at_ms >> 6",
        ),
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: context id -> (head, updated_at_ms), as the batch so far left them
        self._state: dict[int, tuple[int, int]] = {}
        #: context id -> updated_bucket as stored (committed, or flushed in this batch): a flush sets
        #: the column (and so moves the index entry) only when it changes. Dropped with ``_state``;
        #: a context missing here gets the column written, which is always right.
        self._buckets: dict[int, int] = {}
        self._nodes: dict[int, Node] = {}
        self._next_turn = 0
        self._next_context = 0
        # What the running batch decided, written by flush.
        self._new_contexts: dict[int, NewContext] = {}
        self._new_names: dict[str, int] = {}
        self._new_context_keys: dict[str, tuple[int, str]] = {}
        self._new_turns: list[tuple[Any, ...]] = []
        #: some of _new_turns have the nullable columns (see _INSERT_TURNS)
        self._full_rows = False
        self._new_keys: dict[tuple[int, str], TurnRecord] = {}
        #: the keys the batch's appends name, as :meth:`begin` found them stored (None: not stored):
        #: one query for the batch instead of one per append. Good until the batch writes turns
        #: (a flush), which forgets it.
        self._looked_up: dict[KeyPair, TurnRecord | None] = {}
        self._moved: set[int] = set()
        self._new_metadata: dict[int, bytes] = {}

    def _migrate(self, conn: sqlite3.Connection) -> None:
        """As :class:`SqliteActor`'s (one transaction, under the writers' lock its caller holds), but a
        fresh file runs ``turns_schema.sql`` (version :attr:`schema_file_version`) and then the
        migrations after it, so a fresh file and a migrated one are made by the same statements."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Read again under the lock: another process may have migrated meanwhile.
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            scripts = [self.schema_file] if version == 0 else []
            start = self.schema_file_version if version == 0 else version
            scripts += [self.migrations[v] for v in range(start + 1, self.schema_version + 1)]
            for name in scripts:
                for statement in split_statements(sqlite_actor.load_script(name)):
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {int(self.schema_version)}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    # -- the batch's life --------------------------------------------------------------------------

    def begin(self, conn: sqlite3.Connection, changed_elsewhere: bool, commands: Sequence[ActorCommand]) -> None:
        if changed_elsewhere or not self._next_turn or len(self._nodes) > self._CACHE_LIMIT:
            self._state.clear()
            self._buckets.clear()
            self._nodes.clear()
            self._next_turn = conn.execute("SELECT COALESCE(MAX(turn_id), 0) + 1 FROM turns").fetchone()[0]
            self._next_context = conn.execute("SELECT COALESCE(MAX(context_id), 0) + 1 FROM contexts").fetchone()[0]
        elif len(self._state) > self._CACHE_LIMIT:
            self._state.clear()
            self._buckets.clear()
        self._looked_up = _stored_keys(conn, commands)

    def flush(self, conn: sqlite3.Connection) -> None:
        new = self._new_contexts
        shift = self.UPDATED_SHIFT
        buckets = self._buckets
        if new:
            rows = []
            for context_id, (name, base, parent, metadata, created) in new.items():
                head, updated = self._state[context_id]
                metadata = self._new_metadata.pop(context_id, metadata)
                buckets[context_id] = bucket = updated >> shift
                rows.append((context_id, head, created, name, base, parent, metadata, updated, bucket))
            conn.executemany(
                "INSERT INTO contexts (context_id, head_turn_id, created_at_ms, name, base_turn_id, "
                "parent_context_id, metadata, updated_at_ms, updated_bucket) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
        if self._new_context_keys:
            conn.executemany(
                "INSERT INTO context_keys (idempotency_key, context_id, fingerprint) VALUES (?, ?, ?)",
                [(key, context_id, digest) for key, (context_id, digest) in self._new_context_keys.items()],
            )
        if rows := self._new_turns:
            if not self._full_rows:
                conn.executemany(_INSERT_LEAN_TURNS, rows)
            else:
                conn.executemany(_INSERT_TURNS, [row if len(row) > _LEAN else (*row, 0, 0, 0) for row in rows])
        if self._moved:
            state = self._state
            same: list[tuple[int, int, int]] = []
            moved: list[tuple[int, int, int, int]] = []
            for context_id in self._moved:
                if context_id in new:
                    continue
                head, updated = state[context_id]
                bucket = updated >> shift
                if buckets.get(context_id) == bucket:
                    same.append((head, updated, context_id))
                else:
                    buckets[context_id] = bucket
                    moved.append((head, updated, bucket, context_id))
            # Without updated_bucket in its SET, an UPDATE leaves the contexts_updated entry alone.
            if same:
                conn.executemany("UPDATE contexts SET head_turn_id = ?, updated_at_ms = ? WHERE context_id = ?", same)
            if moved:
                conn.executemany(
                    "UPDATE contexts SET head_turn_id = ?, updated_at_ms = ?, updated_bucket = ? WHERE context_id = ?",
                    moved,
                )
        if self._new_metadata:
            conn.executemany(
                "UPDATE contexts SET metadata = ? WHERE context_id = ?",
                [(metadata, context_id) for context_id, metadata in self._new_metadata.items()],
            )
        self._forget_pending()

    def abort(self) -> None:
        self._forget_pending()
        self._state.clear()
        self._buckets.clear()
        self._nodes.clear()
        self._next_turn = self._next_context = 0

    def _forget_pending(self) -> None:
        self._new_contexts, self._new_names, self._new_context_keys = {}, {}, {}
        self._new_turns, self._new_keys, self._full_rows = [], {}, False
        self._looked_up = {}
        self._moved, self._new_metadata = set(), {}

    # -- lookups through the cache -----------------------------------------------------------------

    def _context(self, conn: sqlite3.Connection, context_id: int, what: str = "") -> tuple[int, int]:
        """(head, updated_at_ms) of a context, or ``ContextNotFound``."""
        state = self._state.get(context_id)
        if state is None:
            row = conn.execute(
                "SELECT head_turn_id, updated_at_ms, updated_bucket FROM contexts "
                "WHERE context_id = ? AND deleted_at_ms IS NULL",
                (context_id,),
            ).fetchone()
            if row is None:
                raise ContextNotFound(f"no context {context_id}{what}")
            state = self._state[context_id] = (row[0], row[1])
            self._buckets[context_id] = row[2]
        return state

    def _node(self, conn: sqlite3.Connection, turn_id: int, what: str = "") -> Node:
        node = self._nodes.get(turn_id)
        if node is None:
            row = conn.execute(
                "SELECT depth, jump_turn_id, jump_depth, context_id FROM turns WHERE turn_id = ?", (turn_id,)
            ).fetchone()
            if row is None:
                raise TurnNotFound(f"no turn {turn_id}{what}")
            node = self._nodes[turn_id] = (row[0], row[1], row[2], row[3])
        return node

    def _stored_key(self, conn: sqlite3.Connection, context_id: int, key: str) -> TurnRecord | None:
        pair = (context_id, key)
        first = self._new_keys.get(pair)
        if first is None:
            looked_up = self._looked_up
            if pair in looked_up:
                return looked_up[pair]
            row = conn.execute(
                f"SELECT {COLUMNS} FROM turns WHERE context_id = ? AND idempotency_key = ?", (context_id, key)
            ).fetchone()
            first = None if row is None else _record(row)
        return first

    def _info(self, conn: sqlite3.Connection, context_id: int) -> ContextInfo:
        """A context as the batch so far left it."""
        head, updated = self._context(conn, context_id)
        new = self._new_contexts.get(context_id)
        if new is None:
            row = conn.execute(
                "SELECT name, base_turn_id, parent_context_id, metadata, created_at_ms FROM contexts "
                "WHERE context_id = ?",
                (context_id,),
            ).fetchone()
            new = (row[0], row[1], row[2], row[3], row[4])
        name, base, parent, metadata, created = new
        metadata = self._new_metadata.get(context_id, metadata)
        depth = self._node(conn, head)[0] if head else 0
        return ContextInfo(context_id, head, depth, name, base, parent, decode_metadata(metadata), created, updated)

    # -- commands ----------------------------------------------------------------------------------

    def apply(self, conn: sqlite3.Connection, command: ActorCommand) -> Any:
        # Appends first: a case is an isinstance check, and they are nearly every command.
        if type(command) is AppendTurn:
            return self._append(conn, command)
        match command:
            case AppendTurns():
                return self._append_batch(conn, command)
            case CollectTurns():
                self.flush(conn)  # this batch's appends may name a candidate as parent
                reply = collect_turns(conn, command)
                for turn_id in command.turn_ids:
                    self._nodes.pop(turn_id, None)
                return reply
            case CollectContexts():
                self.flush(conn)
                return collect_contexts(conn, command)
            case CreateContext():
                return self._create(conn, command)
            case SetHead(context_id=context_id, turn_id=turn_id, expected_head=expected):
                head, updated = self._context(conn, context_id)
                if expected is not None and head != expected:
                    raise HeadConflict(context_id, expected, head)
                if turn_id:
                    self._node(conn, turn_id)
                self._state[context_id] = (turn_id, next_updated(updated, now_ms()))
                self._moved.add(context_id)
                return self._info(conn, context_id)
            case SetContextMetadata(context_id=context_id, metadata=metadata, expected_updated_at_ms=expected):
                head, updated = self._context(conn, context_id)
                if expected is not None and updated != expected:
                    raise Conflict(f"context {context_id} changed since updated_at_ms {expected}: it is now {updated}")
                self._state[context_id] = (head, next_updated(updated, now_ms()))
                self._moved.add(context_id)
                self._new_metadata[context_id] = metadata
                return self._info(conn, context_id)
            case DeleteContext(context_id=context_id):
                self._context(conn, context_id)
                self.flush(conn)  # it may be one of this batch's
                conn.execute(
                    "UPDATE contexts SET deleted_at_ms = ?, name = NULL, metadata = X'7B7D', head_turn_id = 0, "
                    "base_turn_id = 0 WHERE context_id = ?",
                    (now_ms(), context_id),
                )
                conn.execute("DELETE FROM context_keys WHERE context_id = ?", (context_id,))
                del self._state[context_id]
                self._buckets.pop(context_id, None)
                return None
            case EraseTurns():
                return self._erase(conn, command)
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

    def _erase(self, conn: sqlite3.Connection, command: EraseTurns) -> int:
        context_id = command.context_id
        head = self._context(conn, context_id)[0]
        self.flush(conn)  # the chain may hold this batch's turns
        start = head
        if command.keep_last is not None:
            depth = self._node(conn, head)[0] if head else 0
            start = 0
            if command.keep_last < depth:
                start = conn.execute(_ANCESTOR_AT, {"start": head, "depth": depth - command.keep_last}).fetchone()[0]
        elif command.before_turn_id is not None:
            before = command.before_turn_id
            cursor = conn.execute("SELECT depth, parent_turn_id FROM turns WHERE turn_id = ?", (before,)).fetchone()
            found = None
            if cursor is not None and head:
                found = conn.execute(_ANCESTOR_AT, {"start": head, "depth": cursor[0]}).fetchone()
            if found is None or found[0] != before:
                raise InvalidInput(f"turn {before} is not on the chain of context {context_id}")
            start = cursor[1]
        if not start:
            return 0
        # Zero what the update frees (cells, overflow pages) rather than leave it in free space.
        conn.execute("PRAGMA secure_delete = ON")
        cursor = conn.execute(_ERASE_DOWN_FROM, {"start": start})
        return int(cursor.rowcount)

    def _create(self, conn: sqlite3.Connection, command: CreateContext) -> ContextInfo:
        key = command.idempotency_key
        if key is not None:
            known = self._new_context_keys.get(key)
            if known is None:
                row = conn.execute(
                    "SELECT context_id, fingerprint FROM context_keys WHERE idempotency_key = ?", (key,)
                ).fetchone()
                known = None if row is None else (row[0], row[1])
            if known is not None:
                check_creation_retry(key, known[0], known[1], command)
                return self._info(conn, known[0])
        name = command.name
        if name is not None:
            holder = self._new_names.get(name)
            if holder is None:
                row = conn.execute("SELECT context_id FROM contexts WHERE name = ?", (name,)).fetchone()
                holder = None if row is None else row[0]
            if holder is not None:
                if command.open_existing:
                    return self._info(conn, holder)
                raise Conflict(f"context name {name!r} is taken (context {holder})")
        base = command.base_turn_id
        parent = command.parent_context_id
        depth = 0
        if base:
            depth, _, _, base_context = self._node(conn, base)
            if parent is None:
                # the context it was appended in, unless that was deleted since
                try:
                    self._context(conn, base_context)
                    parent = base_context
                except ContextNotFound:
                    parent = 0
        if parent:
            self._context(conn, parent, " (parent_context_id)")
        parent = parent or 0
        now = now_ms()
        context_id = self._next_context
        self._next_context += 1
        self._new_contexts[context_id] = (name, base, parent, command.metadata, now)
        self._state[context_id] = (base, now)
        if name is not None:
            self._new_names[name] = context_id
        if key is not None:
            self._new_context_keys[key] = (context_id, creation_fingerprint(command))
        return ContextInfo(context_id, base, depth, name, base, parent, decode_metadata(command.metadata), now, now)

    def _new_turn(
        self,
        conn: sqlite3.Connection,
        command: AppendTurn,
        turn_id: int,
        head: int,
        digest: str,
        now: int,
        nodes: dict[int, Node],
        rows: list[tuple[Any, ...]],
    ) -> TurnRecord:
        """The record of a new turn; its node goes into ``nodes`` and its row into ``rows`` (the
        actor's own, or an ``append_turns``'s, taken in once it is all decided)."""
        context_id = command.context_id
        parent = head if command.parent_turn_id is None else command.parent_turn_id
        jump, jump_depth, depth = 0, 0, 1
        if parent:
            parent_node = nodes.get(parent) or self._node(conn, parent, " to append to")
            parent_depth, parent_jump, parent_jump_depth, _ = parent_node
            grand_jump, grand_jump_depth = 0, 0
            if parent_jump:
                grand = nodes.get(parent_jump) or self._node(conn, parent_jump)
                grand_jump, grand_jump_depth = grand[1], grand[2]
            jump, jump_depth = jump_for(parent, parent_depth, parent_jump_depth, grand_jump, grand_jump_depth)
            depth = parent_depth + 1
        key = command.idempotency_key
        payload = command.payload
        fs_root = command.fs_root
        refs = command.refs
        record = TurnRecord(
            turn_id,
            context_id,
            parent,
            depth,
            command.type_id,
            command.type_version,
            payload,
            digest,
            key,
            now,
            fs_root,
            False,
            refs,
        )
        # Bound as _INSERT_TURNS wants them (see there): the payload as a bytearray, and the nullable
        # columns only for a turn that has one of them (0 for NULL).
        row = (
            turn_id,
            context_id,
            parent,
            depth,
            jump,
            jump_depth,
            command.type_id,
            command.type_version,
            bytearray(payload) if payload else payload,
            digest,
            now,
        )
        if key is None and fs_root is None and not refs:
            rows.append(row)
        else:
            self._full_rows = True
            nullable = (0 if key is None else key, 0 if fs_root is None else fs_root, " ".join(refs) if refs else 0)
            rows.append(row + nullable)
        nodes[turn_id] = (depth, jump, jump_depth, context_id)
        return record

    def _append(self, conn: sqlite3.Connection, command: AppendTurn) -> TurnRecord:
        context_id = command.context_id
        head, updated = self._context(conn, context_id)
        digest = payload_hash(command.payload)
        key = command.idempotency_key
        if key is not None:
            first = self._stored_key(conn, context_id, key)
            if first is not None:
                return check_idempotent(first, command, digest)
        expected = command.expected_head
        if expected is not None and expected != head:
            raise HeadConflict(context_id, expected, head)
        now = now_ms()
        turn_id = self._next_turn
        record = self._new_turn(conn, command, turn_id, head, digest, now, self._nodes, self._new_turns)
        self._next_turn = turn_id + 1
        self._state[context_id] = (turn_id, now if now > updated else updated + 1)
        self._moved.add(context_id)
        if key is not None:
            self._new_keys[(context_id, key)] = record
        return record

    def _append_batch(self, conn: sqlite3.Connection, command: AppendTurns) -> list[TurnRecord]:
        """Decide every turn against the state the batch's earlier turns leave, check the expected
        heads, and only then change the actor's state: a failure anywhere leaves it as it was."""
        now = now_ms()
        state = self._state
        #: context -> its head as the batch's turns so far leave it
        heads: dict[int, int] = {}
        #: the contexts the batch appends to (not only retries)
        written: set[int] = set()
        nodes: dict[int, Node] = {}
        keys: dict[KeyPair, TurnRecord] = {}
        rows: list[tuple[Any, ...]] = []
        replies: list[TurnRecord] = []
        turn_id = self._next_turn
        for turn in command.turns:
            context_id = turn.context_id
            head = heads.get(context_id)
            if head is None:
                head = self._context(conn, context_id)[0]
            digest = payload_hash(turn.payload)
            key = turn.idempotency_key
            if key is not None:
                first = keys.get((context_id, key)) or self._stored_key(conn, context_id, key)
                if first is not None:
                    heads[context_id] = head
                    replies.append(check_idempotent(first, turn, digest))
                    continue
            record = self._new_turn(conn, turn, turn_id, head, digest, now, nodes, rows)
            heads[context_id] = turn_id
            turn_id += 1
            written.add(context_id)
            replies.append(record)
            if key is not None:
                keys[(context_id, key)] = record
        for context_id, expected in command.expected_heads.items():
            if context_id in heads and context_id not in written:
                continue  # every turn it has in the batch is a retry that landed
            actual = self._context(conn, context_id)[0]
            if actual != expected:
                raise HeadConflict(context_id, expected, actual)
        self._next_turn = turn_id
        self._nodes.update(nodes)
        self._new_turns += rows
        self._new_keys.update(keys)
        moved = self._moved
        for context_id in written:
            updated = state[context_id][1]
            state[context_id] = (heads[context_id], next_updated(updated, now))
            moved.add(context_id)
        return replies


#: A batch's new turns, one executemany. Python's sqlite3 (3.11 at least) runs its adapter protocol
#: (a registry lookup and two failed attribute lookups, about 0.5 us) for every bound value that is
#: not exactly an int, float, str or bytearray: so the payload is bound as a bytearray, a batch of
#: turns without key, fs_root and refs leaves those columns out (NULL), and otherwise they take 0
#: for NULL (no key, fs_root or refs is the int 0).
_INSERT_LEAN_TURNS = (
    "INSERT INTO turns (turn_id, context_id, parent_turn_id, depth, jump_turn_id, jump_depth, type_id, "
    "type_version, payload, payload_hash, created_at_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_TURNS = (
    "INSERT INTO turns (turn_id, context_id, parent_turn_id, depth, jump_turn_id, jump_depth, type_id, "
    "type_version, payload, payload_hash, created_at_ms, idempotency_key, fs_root, refs) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULLIF(?, 0), NULLIF(?, 0), NULLIF(?, 0))"
)
#: the values of a row of _INSERT_LEAN_TURNS
_LEAN = 11

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

#: erase the chain down from ``:start`` to the first turn already erased (whose ancestors all are)
_ERASE_DOWN_FROM = """
UPDATE turns SET payload = X'', payload_hash = '', erased = 1, refs = NULL WHERE turn_id IN (
    WITH RECURSIVE down (turn_id) AS (
        SELECT turn_id FROM turns WHERE turn_id = :start AND erased = 0
        UNION ALL
        SELECT p.turn_id FROM down d JOIN turns t ON t.turn_id = d.turn_id JOIN turns p ON p.turn_id = t.parent_turn_id
        WHERE p.erased = 0
    )
    SELECT turn_id FROM down
)
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
#: (context, key) pairs one lookup of :func:`_stored_keys` binds at most: 512 values, under the 999
#: of SQLite's builds before 3.32
_KEYS_PER_QUERY = 256
#: the pair counts a lookup statement is made for: a batch's pairs are padded (with repeats) up to
#: the next, so a few statements serve every batch from sqlite3's statement cache
_KEY_LOOKUP_SIZES = (2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
#: the VALUES list is the outer loop, each pair one probe of the key index
_KEY_LOOKUP = {
    size: f"SELECT {_COLUMNS_OF_T} FROM (VALUES {', '.join(['(?, ?)'] * size)}) AS v "
    "CROSS JOIN turns AS t INDEXED BY turns_idempotency "
    "ON t.context_id = v.column1 AND t.idempotency_key = v.column2"
    for size in _KEY_LOOKUP_SIZES
}


def _stored_keys(conn: sqlite3.Connection, commands: Sequence[ActorCommand]) -> dict[KeyPair, TurnRecord | None]:
    """Each (context, key) pair the appends of ``commands`` name, and its stored turn (or None).

    An agent loop keys every append, so a batch of appends would otherwise make one lookup (one
    statement from Python) per append; a single key is left to :meth:`TurnActor._stored_key`."""
    pairs: dict[KeyPair, TurnRecord | None] = {}
    for command in commands:
        if isinstance(command, AppendTurn):
            if command.idempotency_key is not None:
                pairs[(command.context_id, command.idempotency_key)] = None
        elif isinstance(command, AppendTurns):
            for turn in command.turns:
                if turn.idempotency_key is not None:
                    pairs[(turn.context_id, turn.idempotency_key)] = None
    if len(pairs) < 2:
        return {}
    todo = list(pairs)
    for start in range(0, len(todo), _KEYS_PER_QUERY):
        chunk = todo[start : start + _KEYS_PER_QUERY]
        size = next(size for size in _KEY_LOOKUP_SIZES if size >= len(chunk))
        chunk += [chunk[-1]] * (size - len(chunk))
        for row in conn.execute(_KEY_LOOKUP[size], [value for pair in chunk for value in pair]):
            record = _record(row)
            assert record.idempotency_key is not None  # found by it
            pairs[(record.context_id, record.idempotency_key)] = record
    return pairs


#: the ``limit`` turns that end at ``:start``
_CHAIN = _CHAIN_FROM.format(seed="SELECT :start, 1", columns=_COLUMNS_OF_T)
#: the same from a context's head, in one query (one trip to the reader) instead of two
_CHAIN_FROM_HEAD = _CHAIN_FROM.format(
    seed="SELECT head_turn_id, 1 FROM contexts WHERE context_id = :context AND head_turn_id != 0 "
    "AND deleted_at_ms IS NULL",
    columns=_COLUMNS_OF_T,
)
#: an ``iter_turns`` page, oldest first: the ``:limit`` turns that end at the ancestor of ``:start``
#: at ``:depth``, found over the skip links (O(log depth) steps), in one trip to the reader
_CHAIN_AT_DEPTH = f"""
WITH RECURSIVE walk (turn_id, depth, parent, jump, jump_depth) AS (
    SELECT turn_id, depth, parent_turn_id, jump_turn_id, jump_depth FROM turns WHERE turn_id = :start
    UNION ALL
    SELECT t.turn_id, t.depth, t.parent_turn_id, t.jump_turn_id, t.jump_depth
    FROM walk w JOIN turns t
      ON t.turn_id = (CASE WHEN w.jump_depth >= :depth THEN w.jump ELSE w.parent END)
    WHERE w.depth > :depth
),
chain (turn_id, n) AS (
    SELECT turn_id, 1 FROM walk WHERE depth = :depth
    UNION ALL
    SELECT t.parent_turn_id, c.n + 1 FROM chain c JOIN turns t ON t.turn_id = c.turn_id
    WHERE c.n < :limit AND t.parent_turn_id != 0
)
SELECT {_COLUMNS_OF_T}
FROM chain c JOIN turns t ON t.turn_id = c.turn_id ORDER BY c.n DESC
"""

#: a context's row as ContextInfo takes it: the head's depth joined in
_INFO = (
    "SELECT c.context_id, c.head_turn_id, COALESCE(t.depth, 0), c.name, c.base_turn_id, c.parent_context_id, "
    "c.metadata, c.created_at_ms, c.updated_at_ms FROM contexts c {hint}"
    "LEFT JOIN turns t ON t.turn_id = c.head_turn_id"
)
_INFO_SELECT = _INFO.format(hint="")
_ORDER_BY: dict[str, str] = {
    # the bucket first: the index's own order, so only each bucket's rows are sorted
    "updated": "c.updated_bucket DESC, c.updated_at_ms DESC, c.context_id DESC",
    "created": "c.context_id DESC",
    "name": "c.name",
}


def _info_of(row: Any) -> ContextInfo:
    return ContextInfo(row[0], row[1], row[2], row[3], row[4], row[5], decode_metadata(row[6]), row[7], row[8])


def name_successor(prefix: str) -> str | None:
    """The least str greater than every str that starts with ``prefix`` (a valid, non-empty name
    prefix), or None when there is none (``prefix`` is all U+10FFFF). SQLite compares TEXT as UTF-8
    bytes, which is code point order, as Python compares str: so ``prefix <= name < successor`` is
    "name starts with prefix", and a range scan of the name index."""
    stem = prefix.rstrip(chr(sys.maxunicode))
    if not stem:
        return None
    last = ord(stem[-1]) + 1
    if last == 0xD800:  # no str holds a surrogate (names are checked for lone ones)
        last = 0xE000
    return stem[:-1] + chr(last)


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

    def _write(self, command: TurnCommand) -> Awaitable[object]:
        # The actor's awaitable handed on: no coroutine of ours for each reply to resume.
        return self._actor.send(command)

    async def _create(self, command: CreateContext) -> ContextInfo:
        # An open_context that finds its name on the reader is answered there, without a trip
        # through the writer's lock and transaction: as cheap as get_context. (A delete racing with
        # it may land just after, as it may after any read.)
        if command.open_existing and command.name is not None:
            found = await self._find_context(command.name)
            if found is not None:
                return found
        return await super()._create(command)

    # -- contexts ----------------------------------------------------------------------------------

    async def _get_context(self, context_id: int) -> ContextInfo:
        row = await self._actor.fetchone(
            _INFO_SELECT + " WHERE c.context_id = ? AND c.deleted_at_ms IS NULL", (context_id,)
        )
        if row is None:
            raise ContextNotFound(f"no context {context_id}")
        return _info_of(row)

    async def _find_context(self, name: str) -> ContextInfo | None:
        row = await self._actor.fetchone(_INFO_SELECT + " WHERE c.name = ?", (name,))
        return None if row is None else _info_of(row)

    async def _list_contexts(
        self,
        prefix: str | None,
        parent_context_id: int | None,
        order: ContextOrder,
        after: ContextKey | None,
        limit: int,
    ) -> list[ContextInfo]:
        """One query down one index: the order's own (updated: ``contexts_updated``, created: the
        primary key, name: ``contexts_name``), so a page costs O(limit + log n); with a filter that
        is not the order's own, down the filter's index (``contexts_parent``, or the name range of
        ``prefix``) and sorted, so it costs what passes the filter. ``contexts_updated`` holds
        ``updated_at_ms`` in 64 ms buckets (see ``turns_v6.sql``): the walk goes down the buckets,
        newest first, and sorts within each, so a page also reads the rest of its last bucket (the
        contexts changed in the same 64 ms)."""
        where: list[str] = ["c.deleted_at_ms IS NULL"]
        params: dict[str, Any] = {"want": limit + 1}
        hint = ""
        if parent_context_id is not None:
            where.append("c.parent_context_id = :parent AND c.parent_context_id != 0")
            params["parent"] = parent_context_id
            hint = "INDEXED BY contexts_parent "
        if prefix is not None or order == "name":
            if prefix:
                where.append("c.name >= :low")
                params["low"] = prefix
                high = name_successor(prefix)
                if high is not None:
                    where.append("c.name < :high")
                    params["high"] = high
            else:
                where.append("c.name IS NOT NULL")
            if not hint:
                hint = "INDEXED BY contexts_name "
        if order == "updated" and not hint:
            hint = "INDEXED BY contexts_updated "
        if after is not None:
            if order == "updated":
                # The bucket bound is the index's range; the rest places the cursor within its bucket.
                where.append(
                    "c.updated_bucket <= :bucket "
                    "AND (c.updated_at_ms < :at OR (c.updated_at_ms = :at AND c.context_id < :id))"
                )
                params["at"], params["id"] = after[0], after[1]  # type: ignore[misc]
                params["bucket"] = params["at"] >> TurnActor.UPDATED_SHIFT
            elif order == "created":
                where.append("c.context_id < :id")
                params["id"] = after[0]
            else:
                where.append("c.name > :name")
                params["name"] = after[0]
        sql = _INFO.format(hint=hint) + " WHERE " + " AND ".join(where)
        sql += f" ORDER BY {_ORDER_BY[order]} LIMIT :want"
        return [_info_of(row) for row in await self._actor.fetchall(sql, params)]

    # -- turns -------------------------------------------------------------------------------------

    async def _get_head(self, context_id: int) -> ContextHead:
        row = await self._actor.fetchone(
            "SELECT c.head_turn_id, COALESCE(t.depth, 0) FROM contexts c "
            "LEFT JOIN turns t ON t.turn_id = c.head_turn_id WHERE c.context_id = ? AND c.deleted_at_ms IS NULL",
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

    async def _get_turn_by_key(self, context_id: int, key: str) -> TurnRecord | None:
        row = await self._actor.fetchone(
            f"SELECT c.context_id, {_COLUMNS_OF_T} FROM contexts c LEFT JOIN turns t "
            "ON t.context_id = c.context_id AND t.idempotency_key = :key "
            "WHERE c.context_id = :context AND c.deleted_at_ms IS NULL",
            {"context": context_id, "key": key},
        )
        if row is None:
            raise ContextNotFound(f"no context {context_id}")
        return None if row[1] is None else _record(row[1:])

    async def _chain(self, top_turn_id: int, limit: int) -> list[TurnRecord]:
        rows = await self._actor.fetchall(_CHAIN, {"start": top_turn_id, "limit": limit})
        if not rows:
            raise IntegrityError(f"turn {top_turn_id} is missing from turns.db, though a chain leads to it")
        return [_record(row) for row in rows]

    async def _ancestor_at(self, turn_id: int, depth: int) -> int:
        row = await self._actor.fetchone(_ANCESTOR_AT, {"start": turn_id, "depth": depth})
        if row is None:
            raise TurnNotFound(f"no turn {turn_id} (or no ancestor of it at depth {depth})")
        return int(row[0])

    async def _iter_turns(self, context_id: int, newest_first: bool, page_size: int) -> AsyncIterator[TurnRecord]:
        if newest_first:
            async for record in super()._iter_turns(context_id, newest_first, page_size):
                yield record
            return
        # Oldest first: each page is one query that walks the skip links from the head to the
        # page's last turn and reads the page up from there.
        head = await self._get_head(context_id)
        start = 1
        while start <= head.head_depth:
            end = min(start + page_size - 1, head.head_depth)
            rows = await self._actor.fetchall(
                _CHAIN_AT_DEPTH, {"start": head.head_turn_id, "depth": end, "limit": end - start + 1}
            )
            if len(rows) != end - start + 1:
                raise IntegrityError(
                    f"context {context_id}: the chain from turn {head.head_turn_id} is broken between depths "
                    f"{start} and {end} (a turn is missing from turns.db)"
                )
            for row in rows:
                yield verify_turn(_record(row))
            start = end + 1

    async def check(self) -> list[str]:
        """What is wrong in ``turns.db``: SQLite's integrity check, the DAG's and the contexts'
        invariants, and every payload re-hashed."""
        problems = await self._actor.check()
        after = 0
        while rows := await self._actor.fetchall(
            "SELECT turn_id, payload, payload_hash, erased FROM turns WHERE turn_id > ? ORDER BY turn_id LIMIT 1000",
            (after,),
        ):
            problems += [
                f"turns.db: turn {turn_id} does not match its payload_hash"
                for turn_id, payload, digest, erased in rows
                if not erased and payload_hash(payload) != digest
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

    async def gc(self, *, grace_s: float = 3600.0, drop_deleted_rows: bool = False) -> TurnGcReport:
        """Reclaim the turns no live context reaches (through heads, bases and parents), leaving
        everything created in the last ``grace_s`` seconds; then truncate the WAL, so erased and
        deleted payloads are in no file of ``turns.db``. In slices beside live writers, crash-safe at
        any point (see ``turnstore.gc``).

        With ``drop_deleted_rows``, also the rows of contexts deleted before the grace period that
        nothing names any more (a deleted context's row is a few dozen bytes: its id and times).
        Off by default: SQLite checks each such row against every turn (``turns.context_id`` is a
        foreign key with no index), so it costs a pass over ``turns`` per row, under the lock."""
        grace = validate_grace(grace_s)
        if self._actor.closed:
            raise ActorClosed(f"{self.path}: the store is closed")
        if not isinstance(drop_deleted_rows, bool):
            raise InvalidInput(f"drop_deleted_rows must be a bool, got {drop_deleted_rows!r}")
        if self._actor.readonly:
            # gc writes (slices, a WAL checkpoint) even when it finds nothing to reclaim.
            raise InvalidInput(f"{self.path} is open read-only: gc needs a writable store")
        return await collect(self, grace_s=grace, drop_deleted_rows=drop_deleted_rows)

    async def _get_registry_bundle(self, bundle_id: str) -> bytes | None:
        row = await self._actor.fetchone("SELECT bundle_json FROM registry_bundles WHERE bundle_id = ?", (bundle_id,))
        return None if row is None else bytes(row[0])

    async def _put_blob(self, data: bytes) -> str:
        return await self._cas.write_blob(data)

    async def _get_blob(self, oid: str) -> bytes:
        return await self._cas.read_blob(oid)
